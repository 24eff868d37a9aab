"""Public ops of ``lowbit.kernels`` (the contract in docs/ARCHITECTURE.md).

Each op normalizes its arguments and dispatches through :mod:`.registry` to the highest-priority backend
that accepts the call. Tensors, by shape / dtype (notation in :mod:`.formats`):

    x (Linear) : float [..., K]        fp32 or bf16 (any float dtype on the eager backend)
    x (Conv2d) : float [B, C, H, W]
    bias       : float [N] or None
    act        : ActQuant or None (None = weight-only, W4A16 / W8A16)
    returns    : float, dtype of x: [..., N] (Linear), [B, N, Ho, Wo] (Conv2d; NCHW-contiguous for an
                 NCHW-contiguous x on CPU, as F.conv2d; other backends may return channels_last)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from . import autotune, registry
from . import post as _post
from .formats import ActQuant, PackedWeight, default_format, get_format, int_range

__all__ = ["pack_weight", "unpack_weight", "dequantize_weight", "fake_quant_act", "linear", "conv2d",
           "quantize_weight", "available_backends", "backend_for", "run_on"]

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return v * 2 if len(v) == 1 else v


def pack_weight(w_int: torch.Tensor, bits: int, scale: torch.Tensor, group_size: Optional[int] = None,
                format: Optional[str] = None) -> PackedWeight:
    """Pack integer weights (int tensor of logical shape (N, ...), values in [-2^(b-1), 2^(b-1)-1]) with their fp32
    scale [N] or [N, ceil(K/group_size)] into a :class:`PackedWeight` of the registered ``format`` (default: the
    kernel layout of ``bits``/``group_size``, packed by the backends)."""
    fmt = get_format(format or default_format(int(bits), group_size))
    if fmt.backends is None:
        pw = registry.dispatch("pack_weight", w_int, int(bits), scale, group_size)
        if pw.format != fmt.name:
            raise ValueError(f"pack_weight: format {fmt.name!r} does not store {bits}-bit weights with "
                             f"group_size={group_size} (that is {pw.format!r})")
        return pw
    return fmt.pack(w_int, int(bits), scale, group_size)


def unpack_weight(pw: PackedWeight) -> torch.Tensor:
    """int8 tensor of logical shape ``pw.shape``."""
    fmt = pw.fmt
    return registry.dispatch("unpack_weight", pw) if fmt.backends is None else fmt.unpack(pw)


def dequantize_weight(pw: PackedWeight) -> torch.Tensor:
    """fp32 tensor of logical shape ``pw.shape``: q * scale (per channel or per group), or the format's own rule."""
    fmt = pw.fmt
    return registry.dispatch("dequantize_weight", pw) if fmt.backends is None else fmt.dequantize(pw)


def fake_quant_act(x: torch.Tensor, act: Optional[ActQuant], granularity: str = "token") -> torch.Tensor:
    """x quantized then dequantized (dtype of x). ``granularity`` picks the rows of a dynamic quantizer:
    "token" (last dim; Linear) or "sample" (everything but dim 0; Conv2d). Ignored for static quantizers."""
    return registry.dispatch("fake_quant_act", x, act, granularity)


def linear(x: torch.Tensor, pw: PackedWeight, bias: Optional[torch.Tensor] = None,
           act: Optional[ActQuant] = None, post: Optional[str] = None) -> torch.Tensor:
    """== F.linear(fake_quant_act(x, act), dequantize_weight(pw), bias), computed with integer kernels where a
    backend can; ``post``: an activation applied to that (kernels/post.py: "gelu", "gelu_tanh", "geglu" (half the
    features out)), in the kernel's epilogue where the backend fuses it."""
    if x.shape[-1] != pw.K or len(pw.shape) != 2:
        raise ValueError(f"linear: x [..., {x.shape[-1]}] does not match weight shape {list(pw.shape)}")
    if post is not None:
        _post.check(post, pw.N)
    if _tuned(pw):
        return autotune.run("linear", x, pw, bias, act, post=post)
    return registry.dispatch_post("linear", post, x, pw, bias, act)


def conv2d(x: torch.Tensor, pw: PackedWeight, bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
           padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1,
           act: Optional[ActQuant] = None) -> torch.Tensor:
    """== F.conv2d(fake_quant_act(x, act, "sample"), dequantize_weight(pw), bias, stride, padding, dilation, groups)."""
    if len(pw.shape) != 4 or x.dim() != 4 or x.shape[1] != pw.shape[1] * groups:
        raise ValueError(f"conv2d: x {list(x.shape)} with groups={groups} does not match weight shape {list(pw.shape)}")
    padding = padding if isinstance(padding, str) else _pair(padding)
    if _tuned(pw):
        return autotune.run("conv2d", x, pw, bias, _pair(stride), padding, _pair(dilation), int(groups), act)
    return registry.dispatch("conv2d", x, pw, bias, _pair(stride), padding, _pair(dilation), int(groups), act)


def _tuned(pw: PackedWeight) -> bool:
    """Whether a call on ``pw`` goes through the autotuner (kernels/autotune.py): the weight was attached at
    deployment, tuning is on (LOWBIT_AUTOTUNE) and no backend is forced (LOWBIT_BACKEND / forced_backend)."""
    return autotune.active() and autotune.is_attached(pw)


def quantize_weight(w: torch.Tensor, bits: int, group_size: Optional[int] = None) -> PackedWeight:
    """Convenience: symmetric absmax quantization of a float weight (N, ...) per channel or per group, packed.
    (The calibrated quantizers live in ``lowbit.quant``; this is for tests and benchmarks.)"""
    n = w.shape[0]
    w2 = w.detach().reshape(n, -1).to(torch.float32)
    k = w2.shape[1]
    _, qmax = int_range(bits)
    if group_size is None:
        scale = w2.abs().amax(1).clamp(min=1e-12) / qmax
        q = torch.round(w2 / scale[:, None])
    else:
        g = -(-k // group_size)
        wp = torch.nn.functional.pad(w2, (0, g * group_size - k)).reshape(n, g, group_size)
        scale = wp.abs().amax(2).clamp(min=1e-12) / qmax
        q = torch.round(wp / scale[:, :, None]).reshape(n, -1)[:, :k]
    q = q.clamp(-qmax - 1, qmax).to(torch.int8).reshape(w.shape)
    return pack_weight(q, bits, scale, group_size)


def available_backends() -> List[str]:
    """Names of the registered backends, highest priority first (disabled ones included)."""
    return [b.name for b in registry.backends()]


def backend_for(op: str, *args, **kwargs) -> str:
    """Name of the backend that ``op(*args)`` would run on (same argument normalization as the op)."""
    args = _normalize(op, args, kwargs)
    return registry.select(op, *args).name


def run_on(backend: str, op: str, *args, **kwargs):
    """Run a public op on a named backend (cross-backend tests); raises NoBackendError if it refuses."""
    return registry.run_on(backend, op, *_normalize(op, args, kwargs))


_SIGS: Dict[str, tuple] = {
    "pack_weight": (("w_int", None), ("bits", None), ("scale", None), ("group_size", None)),
    "unpack_weight": (("pw", None),),
    "dequantize_weight": (("pw", None),),
    "fake_quant_act": (("x", None), ("act", None), ("granularity", "token")),
    "linear": (("x", None), ("pw", None), ("bias", None), ("act", None)),
    "conv2d": (("x", None), ("pw", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
               ("groups", 1), ("act", None)),
}


def _normalize(op, args, kwargs):
    if op not in _SIGS:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(_SIGS)}")
    names = _SIGS[op]
    vals = list(args) + [kwargs.pop(n, d) for n, d in names[len(args):]]
    if kwargs:
        raise TypeError(f"{op}: unexpected arguments {sorted(kwargs)}")
    if op == "conv2d":
        vals[3] = _pair(vals[3])
        vals[4] = vals[4] if isinstance(vals[4], str) else _pair(vals[4])
        vals[5] = _pair(vals[5])
        vals[6] = int(vals[6])
    return vals
