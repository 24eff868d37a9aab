"""Eager PyTorch reference backend: the semantics every other backend is tested against.

Runs on any device and dtype, accepts every format; slow (dequantizes the weight at every call).
All arithmetic is fp32; outputs are cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import ActQuant, PackedWeight, int_range, pack_int4, unpack_int4
from .registry import register_backend

backend = register_backend("eager", priority=0, description="PyTorch reference: dequantize + float op, any device")


# ----------------------------------------------------------------------------------------------- weights
@backend.op("pack_weight")
def pack_weight(w_int: torch.Tensor, bits: int, scale: torch.Tensor, group_size=None) -> PackedWeight:
    shape = tuple(w_int.shape)
    n = shape[0]
    w2 = w_int.reshape(n, -1)
    lo, hi = int_range(bits)
    if w2.numel() and (int(w2.min()) < lo or int(w2.max()) > hi):
        raise ValueError(f"pack_weight: {bits}-bit values must lie in [{lo}, {hi}], "
                         f"got [{int(w2.min())}, {int(w2.max())}]")
    qdata = pack_int4(w2) if bits <= 4 else w2.to(torch.int8).contiguous()
    return PackedWeight(qdata, scale.to(torch.float32).contiguous(), bits, shape, group_size)


@backend.op("unpack_weight")
def unpack_weight(pw: PackedWeight) -> torch.Tensor:
    q = unpack_int4(pw.qdata, pw.K) if pw.bits <= 4 else pw.qdata
    return q.reshape(pw.shape)


def expand_scale(pw: PackedWeight) -> torch.Tensor:
    """fp32 [N, K] (group-wise) or [N, 1] (per-channel) scale, broadcastable against the [N, K] integer weight."""
    if pw.group_size is None:
        return pw.scale[:, None]
    return pw.scale.repeat_interleave(pw.group_size, dim=1)[:, : pw.K]


@backend.op("dequantize_weight")
def dequantize_weight(pw: PackedWeight) -> torch.Tensor:
    q = unpack_weight(pw).reshape(pw.N, pw.K).to(torch.float32)
    return (q * expand_scale(pw)).reshape(pw.shape)


# ----------------------------------------------------------------------------------------------- activations
def rows_of(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """View ``x`` as [R, L] rows that each get one dynamic scale: tokens (last dim) or samples (dim 0)."""
    if granularity == "token":
        return x.reshape(-1, x.shape[-1])
    if granularity == "sample":  # (the row length spelled out: -1 cannot be inferred for an empty batch)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
    raise ValueError(f"granularity must be 'token' or 'sample', got {granularity!r}")


def dynamic_qparams(x2: torch.Tensor, bits: int):
    """Per-row asymmetric parameters of fp32 rows x2 [R, L] -> (scale fp32 [R], zero_point fp32 [R], integer-valued)."""
    qmax = float((1 << bits) - 1)
    # two reductions: torch.aminmax(dim=1) is ~20x slower than amin + amax on CPU (torch 2.13)
    lo = x2.amin(1).clamp_(max=0.0)
    hi = x2.amax(1).clamp_(min=0.0)
    # a tensor divisor: torch on CUDA divides by a Python number as a product with its reciprocal (not correctly
    # rounded, so not the kernels' division); by a tensor it divides exactly, on every device
    scale = (hi - lo) / torch.full_like(hi, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0.0, qmax)
    return scale, zp


def quantize_act(x: torch.Tensor, act: ActQuant, granularity: str = "token"):
    """Reference activation quantization.

    x   : float [..., L]
    returns (q, scale, zero_point):
        q          : fp32 with integer values in [0, 2^bits-1], shape of x
        scale      : fp32 [R] per row of ``rows_of(x, granularity)`` (dynamic) or 0-d (static)
        zero_point : fp32 (integer-valued), same shape as scale
    """
    xf = x.to(torch.float32)
    qmax = float(act.qmax)
    if act.dynamic:
        x2 = rows_of(xf, granularity)
        scale, zp = dynamic_qparams(x2, act.bits)
        q = torch.clamp(torch.round(x2 / scale[:, None]) + zp[:, None], 0.0, qmax).reshape(x.shape)
        return q, scale, zp
    scale = torch.tensor(act.scale, dtype=torch.float32, device=x.device)
    zp = torch.tensor(float(act.zero_point), dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(xf / scale) + zp, 0.0, qmax)
    return q, scale, zp


@backend.op("fake_quant_act")
def fake_quant_act(x: torch.Tensor, act, granularity: str = "token") -> torch.Tensor:
    if act is None:
        return x
    q, scale, zp = quantize_act(x, act, granularity)
    if act.dynamic:
        q2 = rows_of(q, granularity)
        out = ((q2 - zp[:, None]) * scale[:, None]).reshape(x.shape)
    else:
        out = (q - zp) * scale
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------- layers
@backend.op("linear")
def linear(x: torch.Tensor, pw: PackedWeight, bias=None, act=None) -> torch.Tensor:
    xq = fake_quant_act(x.to(torch.float32), act, "token")
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(xq, dequantize_weight(pw).to(x.device), b).to(x.dtype)


@backend.op("conv2d")
def conv2d(x, pw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None) -> torch.Tensor:
    xq = fake_quant_act(x.to(torch.float32), act, "sample")
    b = None if bias is None else bias.to(torch.float32)
    return F.conv2d(xq, dequantize_weight(pw).to(x.device), b, stride, padding, dilation, groups).to(x.dtype)
