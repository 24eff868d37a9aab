"""``dense`` backend: the float path of quantized weights, for layers where integer kernels lose.

The weight is dequantized **once** and cached in ``pw.cache`` (``dense.w.fp32`` for fp32 inputs, ``dense.w.bf16``
for bf16 inputs; a float copy costs 4 resp. 2 bytes per weight on top of the packed integers: the autotuner reports
that trade). Activations are fake-quantized exactly as the reference (``kernels/eager.py``: ``round(x / scale)``,
same zero points, per-token / per-sample dynamic ranges), then a float GEMM / convolution runs. So the function is
the reference's, ``F.linear(fake_quant_act(x, act), dequantize_weight(pw), bias)``, with the float library's speed.

Priority -10: plain dispatch never picks it (the eager reference, priority 0, accepts everything); it runs when the
autotuner (:mod:`.autotune`) measured it fastest for a shape, or when forced (``LOWBIT_BACKEND=dense``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .eager import fake_quant_act, rows_of
from .registry import register_backend

backend = register_backend("dense", priority=-10,
                           description="float path of quantized weights: dequantized once, cached (autotune fallback)")

_DTYPES = (torch.float32, torch.bfloat16)


def weight_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the cached float weight for input ``x``: bf16 inputs get bf16, everything else fp32."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def cached_weight(pw, dtype: torch.dtype) -> torch.Tensor:
    key = "dense.w." + ("bf16" if dtype == torch.bfloat16 else "fp32")
    w = pw.cache.get(key)
    if w is None or w.device != pw.device:
        from . import ops

        w = pw.cache[key] = ops.dequantize_weight(pw).to(dtype).contiguous()
    return w


def _fake_quant(x: torch.Tensor, act, granularity: str, dtype: torch.dtype) -> torch.Tensor:
    """x fake-quantized with the reference semantics, returned in ``dtype``.

    Static: ``(clamp(round(x / s) + zp, 0, qmax) - zp) * s`` computed as ``clamp(round(x / s), -zp, qmax - zp) * s``
    (the same integers for an integer zp, so the same floats): one temporary, four passes."""
    if act is None:
        return x.to(dtype)
    if act.dynamic:
        return fake_quant_act(x.to(torch.float32), act, granularity).to(dtype)
    y = torch.div(x.to(torch.float32), act.scale)
    y.round_().clamp_(-act.zero_point, act.qmax - act.zero_point).mul_(act.scale)
    return y.to(dtype)


def _supports(x, pw, *rest) -> tuple:
    if x.dtype not in _DTYPES:
        return False, f"x dtype {x.dtype} (supported: float32, bfloat16)"
    if x.device != pw.device:
        return False, f"x on {x.device}, weight on {pw.device}"
    if x.numel() == 0:
        return False, "empty input"
    return True, ""


def _conv_supports(x, pw, bias, stride, padding, dilation, groups, act):
    return _supports(x, pw)


def _fp32_args(x, pw, bias, act, granularity):
    """fp32 input (the common case, and the one where per-call work shows on small layers): no dtype casts, and the
    static activation step folded into whichever is smaller, the weight or the activations:
    ``op(clamp(round(x / s), -zp, qmax - zp), w * s)`` instead of ``op(clamp(...) * s, w)`` saves one pass over the
    activations (the same integers; the products round differently, ~1e-7 relative, like the integer kernels)."""
    w = pw.cache.get("dense.w.fp32")
    if w is None or w.device != x.device:
        w = cached_weight(pw, torch.float32)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if act is None:
        return x, w, bias
    if act.dynamic:
        return fake_quant_act(x, act, granularity), w, bias
    zp = act.zero_point
    xq = torch.div(x, act.scale)
    xq.round_().clamp_(-zp, act.qmax - zp)
    if w.numel() < xq.numel():
        return xq, w * act.scale, bias
    return xq.mul_(act.scale), w, bias


@backend.op("linear", supports=_supports)
def linear(x, pw, bias=None, act=None):
    if x.dtype == torch.float32:
        return F.linear(*_fp32_args(x, pw, bias, act, "token"))
    dt = weight_dtype(x)
    w = cached_weight(pw, dt)
    b = None if bias is None else bias.to(dt)
    return F.linear(_fake_quant(x, act, "token", dt), w, b).to(x.dtype)


@backend.op("conv2d", supports=_conv_supports)
def conv2d(x, pw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None):
    if x.dtype == torch.float32:
        return F.conv2d(*_fp32_args(x, pw, bias, act, "sample"), stride, padding, dilation, groups)
    dt = weight_dtype(x)
    w = cached_weight(pw, dt)
    b = None if bias is None else bias.to(dt)
    return F.conv2d(_fake_quant(x, act, "sample", dt), w, b, stride, padding, dilation, groups).to(x.dtype)


__all__ = ["backend", "cached_weight", "weight_dtype", "rows_of"]
