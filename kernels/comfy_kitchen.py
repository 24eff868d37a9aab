"""``comfy_kitchen`` backend: ComfyUI's kernel package (``pip install comfy-kitchen``) where it computes LowBit's
semantics exactly. Registered by ``kernels/__init__.py`` only when the package is installed.

What it runs (the ops of docs/ARCHITECTURE.md it has an equivalent for):

``linear``, weight-only (``act is None``: W4A16, W2A16, W3A16) on ``int4_group`` / ``int4_channel`` weights
    through ``comfy_kitchen.gemv_awq_w4a16`` (its AWQ W4A16 layout: unsigned nibbles ``u = q + 8``, per-group
    scales [K/G, N], zeros 0; ``W = (u - 8) * scale + zeros``, exactly LowBit's ``q * scale``). Scales are passed
    in fp32, so comfy-kitchen computes in fp32 like the eager reference; the output is cast to x's dtype.
    Constraints: K even and a multiple of the group size (per-channel weights: one group of K), x a float tensor
    (fp32, fp16, bf16). The kitchen-layout tensors are cached on the weight (``pw.cache["comfy_kitchen"]``).

Refused, with the reason, and left to LowBit's kernels: quantized activations (comfy-kitchen's int8 GEMM
quantizes activations dynamically per row and *symmetrically*; LowBit's ``ActQuant`` is asymmetric, static or
per token, so the result would differ), 8-bit weight-only linears and every convolution (comfy-kitchen has no
such op), weight packing/unpacking.

``import comfy_kitchen`` takes seconds (it loads its native backends), so this module never imports it: the
backend accepts calls only once the package is imported by someone (ComfyUI does so at start-up; outside
ComfyUI ``import comfy_kitchen`` first). Which kitchen backend runs the op (eager PyTorch on CPU, CUDA where
it has one) is comfy-kitchen's own choice; ``comfy_kitchen.registry.use_backend("eager")`` forces its eager path.
"""
from __future__ import annotations

import sys

import torch

from .formats import PackedWeight
from .registry import register_backend

backend = register_backend("comfy_kitchen", priority=5,
                           description="comfy-kitchen (ComfyUI's kernels): weight-only int4 linear via its AWQ "
                                       "W4A16 GEMV")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_NIBBLE_FORMATS = ("int4_group", "int4_channel")


def _kitchen():
    return sys.modules.get("comfy_kitchen")


backend.unavailable = lambda: "" if _kitchen() is not None else (
    "comfy_kitchen is installed but not imported (ComfyUI imports it; LowBit does not)")


def _linear_supports(x, pw, bias=None, act=None):
    if _kitchen() is None:
        return False, "comfy_kitchen is installed but not imported (import comfy_kitchen first; ComfyUI does)"
    if act is not None:
        return False, ("quantized activations: comfy-kitchen's int8 GEMM quantizes them per row symmetrically, "
                       "LowBit's ActQuant is asymmetric")
    if not isinstance(pw, PackedWeight) or pw.format not in _NIBBLE_FORMATS:
        return False, f"weight format {getattr(pw, 'format', None)!r}: only int4_group/int4_channel (AWQ W4A16)"
    g = pw.K if pw.group_size is None else pw.group_size
    if pw.K % 2 or pw.K % g:
        return False, f"K={pw.K} must be even and a multiple of the group size {g}"
    if x.dtype not in _FLOATS:
        return False, f"x is {x.dtype}; comfy-kitchen's AWQ GEMV takes fp32, fp16 or bf16"
    if x.device != pw.device:
        return False, f"x is on {x.device}, the weight on {pw.device}"
    return True, ""


def awq_tensors(pw: PackedWeight):
    """(qweight int8 [N, K/2], scales fp32 [G, N], zeros fp32 [G, N], group size) of an int4 PackedWeight in
    comfy-kitchen's AWQ W4A16 layout (the same tensors ``quant.export_comfy`` writes with fp32 scales)."""
    from .formats import unpack_int4

    q = unpack_int4(pw.qdata, pw.K).to(torch.int16) + 8
    packed = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8).contiguous()
    scale = pw.scale.float().reshape(pw.N, -1).t().contiguous()
    g = pw.K if pw.group_size is None else int(pw.group_size)
    return packed, scale, torch.zeros_like(scale), g


@backend.op("linear", supports=_linear_supports)
def linear(x: torch.Tensor, pw: PackedWeight, bias=None, act=None) -> torch.Tensor:
    ck = _kitchen()
    cached = pw.cache.get("comfy_kitchen")
    if cached is None:
        cached = pw.cache["comfy_kitchen"] = awq_tensors(pw)
    qweight, scale, zeros, g = cached
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32)
    y = ck.gemv_awq_w4a16(x.to(torch.float32), qweight, scale, zeros, bias=b, group_size=g)
    return y.to(x.dtype)
