"""``dense`` backend: the float path of quantized weights, for layers where integer kernels lose.

The weight is dequantized **once** and cached in ``pw.cache`` (``dense.w.fp32`` for fp32 inputs, ``dense.w.bf16``
for bf16 inputs; a float copy costs 4 resp. 2 bytes per weight on top of the packed integers: the autotuner reports
that trade; with the reference's activation codes, fp32 layers whose weight is smaller than their input compute the
weight times the activation step at each call instead of scaling the larger input). Activations are fake-quantized
with the codes the integer kernels use (on CPU the fused one-pass quantizer of kernels/cpu.py; elsewhere, and with
``LOWBIT_CPU_EXACT_ACT_QUANT=1``, exactly the reference, ``kernels/eager.py``: ``round(x / scale)``, on CUDA through
the best backend's ``fake_quant_act``, Triton's in one pass; same zero points, per-token / per-sample dynamic
ranges), then a float GEMM / convolution runs. So the function is the reference's, ``F.linear(fake_quant_act(x,
act), dequantize_weight(pw), bias)``, with the float library's speed.

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
    """x fake-quantized with the integer kernels' codes (:func:`_fused`), returned in ``dtype``.

    Static: ``(clamp(round(x / s) + zp, 0, qmax) - zp) * s`` computed as ``clamp(round(x / s), -zp, qmax - zp) * s``
    (the same integers for an integer zp, so the same floats): one temporary, four passes."""
    if act is None:
        return x.to(dtype)
    if x.is_cuda:
        return _gpu_fake_quant(x, act, granularity).to(dtype)
    if act.dynamic:
        return fake_quant_act(x.to(torch.float32), act, granularity).to(dtype)
    if _fused(x, act):
        return _fused_fake_quant(x, act).to(dtype)
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
    if x.is_cuda:
        return _gpu_fake_quant(x, act, granularity), w, bias
    if act.dynamic:
        return fake_quant_act(x, act, granularity), w, bias
    zp = act.zero_point
    if _fused(x, act):
        return _fused_fake_quant(x, act), w, bias
    xq = torch.div(x, act.scale)
    xq.round_().clamp_(-zp, act.qmax - zp)
    if w.numel() < xq.numel():
        return xq, _scaled_weight(pw, w, act.scale), bias
    return xq.mul_(act.scale), w, bias


def _gpu_fake_quant(x, act, granularity):
    """CUDA: Triton's one-pass fake quantizer (the reference's codes) where it is registered, enabled and accepts
    the call, else the reference itself; in x's dtype. Not through dispatch: with the dense backend forced
    (``LOWBIT_BACKEND=dense``), dispatch would look for ``fake_quant_act`` in this backend."""
    from . import registry

    tb = registry._BACKENDS.get("triton")
    if tb is not None and "triton" not in registry._disabled() and tb.check("fake_quant_act", x, act, granularity)[0]:
        return tb.ops["fake_quant_act"].impl(x, act, granularity)
    return fake_quant_act(x, act, granularity)


def _fused(x, *acts) -> bool:
    """CPU static activations take the fused quantizer's codes, as the CPU integer kernels do (kernels/cpu.py), so
    a deployed layer computes with the same integers on either path; ``LOWBIT_CPU_EXACT_ACT_QUANT=1``: the
    reference's codes on both."""
    return x.device.type == "cpu" and not any(a.dynamic for a in acts) and not _cpu().exact_act_quant()


def _fused_parts(x, acts, sizes) -> list:
    """The fused CPU quantizer's quint8 codes of each consecutive channel group ``sizes`` of x, each group with its
    own static quantizer (what the parts of a split convolution compute)."""
    quant = _cpu().quant_static_fused
    return [quant(xi, a) for xi, a in zip(torch.split(x, list(sizes), 1), acts)]


def _fused_fake_quant(x, act):
    """Static x fake-quantized by the fused CPU quantizer, fp32: two passes, one of them over uint8."""
    return _cpu().quant_static_fused(x, act).dequantize()


_CPU = []


def _cpu():
    """kernels.cpu, imported on first use (an import statement at every call costs microseconds per layer)."""
    if not _CPU:
        from . import cpu

        _CPU.append(cpu)
    return _CPU[0]


def _scaled_weight(pw, w, scale: float):
    """``w * scale``, computed at each call (the weight is the smaller operand here, so this pass costs less than
    scaling the input; not kept: a second weight-sized copy would double the float path's memory)."""
    return w * scale


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


def _channel_qparams(acts, sizes, device):
    """Per-input-channel steps fp32 [1, C, 1, 1] of static quantizers ``acts`` over consecutive channel groups
    ``sizes``, and the clamp bounds of the centered codes per run of groups: [(start, stop, lowest, highest)]
    (neighbours with the same bounds merged: one clamp)."""
    s = torch.cat([torch.full((n,), float(a.scale), dtype=torch.float32, device=device)
                   for a, n in zip(acts, sizes)]).view(1, -1, 1, 1)
    runs, off = [], 0
    for a, n in zip(acts, sizes):
        lo, hi = -a.zero_point, a.qmax - a.zero_point
        if runs and runs[-1][2:] == (lo, hi):
            runs[-1] = (runs[-1][0], off + n, lo, hi)
        else:
            runs.append((off, off + n, lo, hi))
        off += n
    return s, tuple(runs)


def channel_codes(x: torch.Tensor, acts, sizes) -> torch.Tensor:
    """``x`` [B, C, H, W] fp32 whose consecutive channel groups ``sizes`` have their own static quantizers ``acts``:
    the centered integer codes ``clamp(round(x_i / s_i), -zp_i, qmax_i - zp_i)`` of every group, in one fp32 buffer
    (the same integers as the reference's ``clamp(round(x_i / s_i) + zp_i, 0, qmax_i) - zp_i``: a true fp32
    division by each element's own step, half-to-even rounding). On CPU, unless ``LOWBIT_CPU_EXACT_ACT_QUANT=1``,
    each group's codes are the fused quantizer's instead, as the CPU kernels and the parts path compute them."""
    if _fused(x, *acts):
        u8 = _cpu()._u8_view
        return torch.cat([u8(q).float() - a.zero_point for q, a in zip(_fused_parts(x, acts, sizes), acts)], 1)
    return _codes(x, *_channel_qparams(acts, sizes, x.device))


def _codes(x, s, runs):
    # a division by the per-channel step vector is one fast pass; a clamp with tensor bounds is not (~10x slower
    # than scalar bounds on CPU, torch 2.13), hence one scalar clamp per run of channels
    y = torch.div(x, s)
    y.round_()
    if len(runs) == 1:
        return y.clamp_(runs[0][2], runs[0][3])
    for a, b, lo, hi in runs:
        y[:, a:b].clamp_(lo, hi)
    return y


def conv2d_concat(x, pws, bias, stride, padding, dilation, acts):
    """The float path of a convolution split along its input channels (quant/split.py), fused:
    ``F.conv2d(cat_i fake_quant(x_i, acts[i]), cat_i dequantize(pws[i]), bias)`` == ``sum_i conv2d(x_i, pws[i],
    acts[i])`` (+ bias) up to float summation order. x fp32 [B, sum C_i, H, W]; pws: each part's PackedWeight
    [N, C_i, kh, kw]; acts: each part's static ActQuant. One convolution instead of one per part plus the adds.

    Caches, in ``pws[0].cache`` (dropped with it on device moves and copies; rebuilt when another part's integers
    change, by its ``cache_id``; counted as float copies by the autotuner's summary): ``fused.w`` the concatenated
    fp32 weight (4 bytes per weight, dequantized once) and, for
    the last quantizers seen, their per-channel parameters (with the reference's codes, the activation steps are
    folded into the weight at each call when the weight is smaller than the activations)."""
    cache = pws[0].cache
    w = cache.get("fused.w")
    src = tuple(pw.cache_id for pw in pws)  # (a part given new integers since: its cache_id changed)
    if w is None or w.device != x.device or cache.get("fused.src") != src:
        from . import ops

        w = cache["fused.w"] = torch.cat([ops.dequantize_weight(pw).to(torch.float32) for pw in pws], 1).contiguous()
        cache["fused.src"] = src
        cache.pop("fused.act", None)
    if _fused(x, *acts):  # the fused CPU codes, as the parts path computes them: one pass per part
        xq = torch.cat([q.dequantize() for q in _fused_parts(x, acts, [pw.shape[1] for pw in pws])], 1)
        return F.conv2d(xq, w, bias, stride, padding, dilation)
    qp = cache.get("fused.act")
    if qp is None or qp[0] != acts:
        qp = cache["fused.act"] = (acts, *_channel_qparams(acts, [pw.shape[1] for pw in pws], x.device))
    _, s, runs = qp
    xq = _codes(x, s, runs)
    if w.numel() < xq.numel():  # (the scaled weight is computed, not kept: see _scaled_weight)
        return F.conv2d(xq, w * s, bias, stride, padding, dilation)
    return F.conv2d(xq.mul_(s), w, bias, stride, padding, dilation)


__all__ = ["backend", "cached_weight", "weight_dtype", "rows_of", "channel_codes", "conv2d_concat"]
