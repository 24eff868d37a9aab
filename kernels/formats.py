"""Packed integer formats shared by every backend.

Notation used in the docstrings of ``kernels/``::

    N  output channels (Linear out_features, Conv2d out_channels)
    K  reduction length = prod(shape[1:])  (Linear in_features; Conv2d C/groups * kh * kw, flattened in (c, kh, kw) order)
    G  number of weight groups along K = ceil(K / group_size)
    M  rows of the activation matrix (tokens for Linear)

Everything here is plain PyTorch and host-free; the backends only read these fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

__all__ = ["PackedWeight", "ActQuant", "pack_int4", "unpack_int4", "int_range"]


def int_range(bits: int, signed: bool = True) -> Tuple[int, int]:
    """Inclusive integer range of a ``bits``-wide integer: signed two's complement or unsigned."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values two per byte.

    w_int : integer tensor [N, K], values in [-8, 7]
    returns uint8 [N, ceil(K/2)]: byte j holds k=2j in the low nibble and k=2j+1 in the high nibble,
            both two's complement; an odd K is padded with a zero nibble.
    """
    n, k = w_int.shape
    w = w_int.to(torch.int16)
    if k % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    nib = (w & 0xF).to(torch.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, ceil(K/2)] -> int8 [N, K] (sign-extended nibbles)."""
    p = packed.view(torch.int8)
    lo = (p << 4) >> 4  # arithmetic shift sign-extends the low nibble
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)[:, :k]


@dataclass(eq=False)
class PackedWeight:
    """One quantized weight.

    qdata : int8  [N, K]           when bits in 5..8 (one value per byte)
            uint8 [N, ceil(K/2)]   when bits in 2..4: two signed two's-complement nibbles per byte,
                                   low nibble = even k, high nibble = odd k; odd K padded with a zero nibble
    scale : fp32  [N]              per output channel (group_size None), or
            fp32  [N, G]           group-wise, G = ceil(K / group_size), group g covers k in [g*gs, (g+1)*gs)
    bits  : int in 2..8; integer values are symmetric signed in [-2^(b-1), 2^(b-1)-1] (zero point 0)
    shape : logical float weight shape: (N, K) for Linear, (N, C/groups, kh, kw) for Conv2d
    group_size : int | None
    cache : backend-prepacked forms of this weight (onednn blobs, int4pack tiles, rowsums...), keyed by backend.
            Not persistent: never saved, rebuilt on first use; counted by :meth:`nbytes`.

    Dequantized weight: ``w[n, k] = q[n, k] * scale[n]`` or ``q[n, k] * scale[n, k // group_size]``.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    bits: int
    shape: Tuple[int, ...]
    group_size: Optional[int] = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if not 2 <= self.bits <= 8:
            raise ValueError(f"PackedWeight: bits must be in 2..8, got {self.bits}")
        n, k = self.N, self.K
        if self.bits <= 4:
            want = (n, (k + 1) // 2)
            if self.qdata.dtype != torch.uint8 or tuple(self.qdata.shape) != want:
                raise ValueError(f"PackedWeight: {self.bits}-bit qdata must be uint8 {list(want)} (two nibbles per byte), "
                                 f"got {self.qdata.dtype} {list(self.qdata.shape)}")
        elif self.qdata.dtype != torch.int8 or tuple(self.qdata.shape) != (n, k):
            raise ValueError(f"PackedWeight: {self.bits}-bit qdata must be int8 {[n, k]}, got {self.qdata.dtype} {list(self.qdata.shape)}")
        if self.group_size is None:
            want_s = (n,)
        else:
            if self.group_size <= 0:
                raise ValueError(f"PackedWeight: group_size must be positive or None, got {self.group_size}")
            want_s = (n, math.ceil(k / self.group_size))
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != want_s:
            raise ValueError(f"PackedWeight: scale must be fp32 {list(want_s)}, got {self.scale.dtype} {list(self.scale.shape)}")

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def K(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size is None else self.scale.shape[1]

    def to(self, device) -> "PackedWeight":
        """Copy to ``device`` (the cache is dropped: prepacked forms are device-specific)."""
        return PackedWeight(self.qdata.to(device), self.scale.to(device), self.bits, self.shape, self.group_size)

    def nbytes(self, include_cache: bool = True) -> int:
        """Resident bytes: qdata + scale (+ every tensor in ``cache``, opaque onednn blobs counted by numel*itemsize)."""
        total = _tensor_bytes(self.qdata) + _tensor_bytes(self.scale)
        if include_cache:
            for v in self.cache.values():
                total += _nested_bytes(v)
        return total


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nested_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return _tensor_bytes(v)
    if isinstance(v, dict):
        return sum(_nested_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_nested_bytes(x) for x in v)
    return 0


@dataclass(frozen=True)
class ActQuant:
    """Activation quantizer, asymmetric unsigned ``bits``-bit (q in [0, 2^bits - 1]).

    static  (dynamic=False): one scalar ``scale`` (float > 0) and ``zero_point`` (int in [0, 2^bits-1]) per tensor:
            ``q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``, ``x_hat = (q - zero_point) * scale``.
    dynamic (dynamic=True): scale/zero_point are computed inside the op per token (rows of the last dim, Linear)
            or per sample (Conv2d); ``scale`` must be None (``zero_point`` None or 0, stored as None). With lo = min(min(x_row), 0),
            hi = max(max(x_row), 0): ``scale = (hi - lo) / (2^bits - 1)`` (1.0 if that is 0),
            ``zero_point = clamp(round(-lo / scale), 0, 2^bits - 1)``.
    Rounding is ``torch.round`` (half to even) and ``x / scale`` is a true fp32 division, on every backend.
    """

    bits: int
    scale: Optional[float] = None
    zero_point: Optional[int] = None
    dynamic: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"ActQuant: bits must be in 2..8, got {self.bits}")
        if self.dynamic:
            if self.scale is not None or self.zero_point not in (None, 0):
                raise ValueError("ActQuant: a dynamic quantizer computes scale/zero_point per token; pass scale=None "
                                 "(zero_point None or 0)")
            object.__setattr__(self, "zero_point", None)
        else:
            if self.scale is None or self.zero_point is None:
                raise ValueError("ActQuant: a static quantizer needs a scale and a zero_point")
            scale = float(self.scale)
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"ActQuant: scale must be a finite positive float, got {self.scale}")
            zp = int(self.zero_point)
            if zp != self.zero_point or not 0 <= zp <= self.qmax:
                raise ValueError(f"ActQuant: zero_point must be an int in [0, {self.qmax}], got {self.zero_point}")
            # stored rounded to fp32 so that every backend divides by the very same number
            object.__setattr__(self, "scale", float(torch.tensor(scale, dtype=torch.float32)))
            object.__setattr__(self, "zero_point", zp)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1
