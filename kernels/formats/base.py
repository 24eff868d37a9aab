"""Weight formats as registered objects, the packed weight they produce, and the activation quantizer.

Notation used in the docstrings of ``kernels/``::

    N  output channels (Linear out_features, Conv2d out_channels)
    K  reduction length = prod(shape[1:])  (Linear in_features; Conv2d C/groups * kh * kw, flattened in
       (c, kh, kw) order)
    G  number of weight groups along K = ceil(K / group_size)
    M  rows of the activation matrix (tokens for Linear)

A *weight format* (:class:`WeightFormat`, one file per layout in this folder, registered with
:func:`register_format`) says how integer weights and their scales are laid out: ``pack`` / ``unpack`` /
``dequantize``, the tensors saved for it (``storage``: names, dtypes, shapes) and the value ranges a loader checks,
and which backends run it (``backends``). A :class:`PackedWeight` is one weight in one format: a small
``nn.Module`` whose buffers are the format's tensors, so device moves, ``state_dict`` and hosts' memory
accounting see them. Everything here is plain PyTorch and host-free; the backends only read the fields.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["PackedWeight", "ActQuant", "WeightFormat", "FORMATS", "register_format", "get_format", "default_format",
           "pack_int4", "unpack_int4", "int_range"]


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


# ------------------------------------------------------------------------------------------------ registry
FORMATS: Dict[str, "WeightFormat"] = {}
_CACHE_IDS = itertools.count()  # PackedWeight.cache_id: never reused in a process


def register_format(cls):
    """Class decorator: register one instance of a :class:`WeightFormat` subclass under ``cls.name``."""
    if not cls.name or cls.name in FORMATS:
        raise ValueError(f"register_format: format name {cls.name!r} is empty or already registered")
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> "WeightFormat":
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown weight format {name!r}; registered formats: {sorted(FORMATS)}")
    return fmt


def default_format(bits: int, group_size: Optional[int]) -> str:
    """The kernel layout of ``bits``-bit weights: int4_* (2..4 bits, two per byte) or int8_* (5..8 bits),
    *_channel (one scale per output channel) or *_group (one scale per ``group_size`` inputs)."""
    return f"int{4 if bits <= 4 else 8}_{'channel' if group_size is None else 'group'}"


class WeightFormat:
    """One layout of quantized weights. Subclasses set the class attributes and override what differs.

    name        registry key, stored in saved files
    bits_range  inclusive range of integer widths this layout stores
    grouped     True: needs a ``group_size``; False: refuses one
    backends    None: the integer kernels of every backend understand it (they read ``qdata``, ``scale``, ``bits``,
                ``group_size``); a tuple of backend names otherwise, ``()`` for none: quantized layers then compute
                ``op(fake_quant_act(x), dequantize(pw))`` in PyTorch.
    """

    name: str = ""
    bits_range: Tuple[int, int] = (2, 8)
    grouped: bool = False
    backends: Optional[Tuple[str, ...]] = None

    # -- what the format accepts -----------------------------------------------------------------------
    def check(self, bits: int, group_size: Optional[int], shape=None) -> None:
        """Raise ValueError (naming the field) unless this format stores ``bits``-bit weights with ``group_size``."""
        lo, hi = self.bits_range
        if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
            raise ValueError(f"weight format {self.name!r} stores {lo}..{hi}-bit weights, got bits={bits!r}")
        if self.grouped:
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
                raise ValueError(f"weight format {self.name!r} needs a positive integer group_size, got {group_size!r}")
        elif group_size is not None:
            raise ValueError(f"weight format {self.name!r} has one scale per output channel; group_size must be None, "
                             f"got {group_size!r}")

    # -- saved tensors ---------------------------------------------------------------------------------
    def storage(self, shape: Tuple[int, ...], bits: int,
                group_size: Optional[int]) -> Dict[str, Tuple[torch.dtype, tuple]]:
        """Saved tensors of one weight: {name: (dtype, shape)} (names are suffixes of the layer name in a file)."""
        raise NotImplementedError

    def to_storage(self, pw: "PackedWeight") -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_storage(self, tensors: Dict[str, torch.Tensor], shape, bits: int, group_size) -> "PackedWeight":
        raise NotImplementedError

    def check_values(self, tensors: Dict[str, torch.Tensor], bits: int, group_size) -> Optional[str]:
        """A problem with the *values* of saved tensors (range, finiteness), or None. Shapes are checked before."""
        return None

    # -- pack / unpack ---------------------------------------------------------------------------------
    def pack(self, w_int: torch.Tensor, bits: int, scale: torch.Tensor, group_size: Optional[int]) -> "PackedWeight":
        raise NotImplementedError

    def unpack(self, pw: "PackedWeight") -> torch.Tensor:
        """int8 tensor of logical shape ``pw.shape``."""
        raise NotImplementedError

    def dequantize(self, pw: "PackedWeight") -> torch.Tensor:
        """fp32 tensor of logical shape ``pw.shape``."""
        raise NotImplementedError

    # -- fake quantization (calibration, reconstruction, fine-tuning) ------------------------------------
    def constrain_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Project the quantizer's step sizes ([N] or [N, G]) onto what this format can store (identity here), so
        that the fake-quantized weight equals the deployed one."""
        return scale

    def fake_scale(self, pw: "PackedWeight") -> torch.Tensor:
        """Step sizes of ``pw`` as the fake-quant layer holds them ([N] or [N, G] fp32)."""
        return pw.scale

    def validate(self, pw: "PackedWeight") -> None:
        """Raise ValueError unless ``pw``'s tensors have the dtypes and shapes of :meth:`storage`."""
        self.check(pw.bits, pw.group_size, pw.shape)
        spec = self.storage(pw.shape, pw.bits, pw.group_size)
        for key, t in self.to_storage(pw).items():
            dt, shp = spec[key]
            if t.dtype != dt or tuple(t.shape) != tuple(shp):
                raise ValueError(f"PackedWeight ({self.name}): {key} must be {_dtname(dt)} {list(shp)}, "
                                 f"got {_dtname(t.dtype)} {list(t.shape)}")


def _dtname(dt: torch.dtype) -> str:
    return {torch.int8: "int8", torch.uint8: "uint8", torch.float32: "fp32"}.get(dt, str(dt))


class PackedWeight(nn.Module):
    """One quantized weight in one registered format (``format``; default: the kernel layout of ``bits``).

    Kernel layouts (``int4_channel``, ``int4_group``, ``int8_channel``, ``int8_group``):
    qdata : int8  [N, K]           when bits in 5..8 (one value per byte)
            uint8 [N, ceil(K/2)]   when bits in 2..4: two signed two's-complement nibbles per byte,
                                   low nibble = even k, high nibble = odd k; odd K padded with a zero nibble
    scale : fp32  [N]              per output channel (group_size None), or
            fp32  [N, G]           group-wise, G = ceil(K / group_size), group g covers k in [g*gs, (g+1)*gs)
    bits  : int in 2..8; integer values are symmetric signed in [-2^(b-1), 2^(b-1)-1] (zero point 0)
    shape : logical float weight shape: (N, K) for Linear, (N, C/groups, kh, kw) for Conv2d
    group_size : int | None
    cache : backend-prepacked forms of this weight (onednn blobs, int4pack tiles, column sums, reordered copies...),
            keyed by backend. Not persistent: never saved, never deep-copied, dropped on device moves and state-dict
            loads (with it the autotuner's choices and whole-model mode; ``tune`` stays, so they are measured
            again), rebuilt on first use; counted by :meth:`nbytes`.

    Dequantized weight: ``w[n, k] = q[n, k] * scale[n]`` or ``q[n, k] * scale[n, k // group_size]``.
    Other formats keep ``qdata``/``scale`` buffers with their own meaning (see their files).
    """

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bits: int, shape: Tuple[int, ...],
                 group_size: Optional[int] = None, format: Optional[str] = None):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"PackedWeight: bits must be in 2..8, got {bits}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0):
            raise ValueError(f"PackedWeight: group_size must be positive or None, got {group_size}")
        self.bits = bits
        self.shape = tuple(int(s) for s in shape)
        self.group_size = group_size
        self.format = format or default_format(bits, group_size)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.cache: dict = {}
        self.cache_id = next(_CACHE_IDS)  # new whenever ``cache`` is reset: caches built from several weights check it
        # the autotuner's arming (None: not tuned; else (whether int4 weights may keep an int8 copy, the model's
        # copy budget or None), see kernels/autotune.py); unlike ``cache`` it survives device moves and copies
        self.tune: Optional[tuple] = None
        self.fmt.validate(self)

    @property
    def fmt(self) -> WeightFormat:
        return get_format(self.format)

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

    def nbytes(self, include_cache: bool = True) -> int:
        """Resident bytes: the format's tensors (+ every tensor in ``cache``, opaque onednn blobs counted by
        numel*itemsize)."""
        total = sum(_tensor_bytes(t) for t in self._buffers.values() if t is not None)
        if include_cache:
            for v in list(self.cache.values()):  # (a snapshot: another thread may be adding a cache)
                total += _nested_bytes(v)
        return total

    def reset_cache(self):
        """Drop every backend cache (prepacked forms, copies, the autotuner's choices): a new ``cache_id``."""
        self.cache, self.cache_id = {}, next(_CACHE_IDS)

    def _apply(self, fn, *args, **kwargs):
        # prepacked forms are device-specific; integer data and scales never change dtype
        self.reset_cache()

        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)  # (no round trip through the cast)

        return super()._apply(keep_dtype, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        # new integers / scales: every prepacked form of the old ones is stale
        self.reset_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __deepcopy__(self, memo):
        new = PackedWeight(copy.deepcopy(self.qdata, memo), copy.deepcopy(self.scale, memo), self.bits, self.shape,
                           self.group_size, self.format)
        # a copied deployed model stays tuned (its caches are rebuilt on use), with a budget of its own (one per
        # copied model: ``memo`` copies a shared budget once)
        new.tune = copy.deepcopy(self.tune, memo)
        memo[id(self)] = new
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state["cache"] = {}  # backend caches (e.g. oneDNN opaque blobs) cannot be serialized
        return state

    def extra_repr(self):
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.format}, bits={self.bits}, shape={self.shape}{g}"


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


class IntLayout(WeightFormat):
    """Shared part of the four kernel layouts: ``qdata`` (int8 or nibbles) + ``w_scale`` (fp32 [N] or [N, G])."""

    nibbles = False  # True: two 4-bit values per byte

    def storage(self, shape, bits, group_size):
        n, k = int(shape[0]), math.prod(int(d) for d in shape[1:])
        q = (torch.uint8, (n, (k + 1) // 2)) if self.nibbles else (torch.int8, (n, k))
        s = (n,) if group_size is None else (n, -(-k // group_size))
        return {"qdata": q, "w_scale": (torch.float32, s)}

    def to_storage(self, pw):
        return {"qdata": pw.qdata, "w_scale": pw.scale}

    def from_storage(self, tensors, shape, bits, group_size):
        return PackedWeight(tensors["qdata"], tensors["w_scale"], bits, shape, group_size, self.name)

    def check_values(self, tensors, bits, group_size):
        s = tensors["w_scale"]
        if s.numel() and not (torch.isfinite(s).all() and (s > 0).all()):
            return "w_scale holds a zero, negative, NaN or infinite step size (each must be finite and > 0)"
        if not self.nibbles and bits < 8:
            q = tensors["qdata"]
            lo, hi = int_range(bits)
            if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
                return f"qdata holds values outside the {bits}-bit range [{lo}, {hi}]"
        if self.nibbles and bits < 4:
            lo, hi = int_range(bits)
            q = unpack_int4(tensors["qdata"], tensors["qdata"].shape[1] * 2)
            if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
                return f"qdata holds values outside the {bits}-bit range [{lo}, {hi}]"
        return None

    def pack(self, w_int, bits, scale, group_size):
        self.check(bits, group_size)
        shape = tuple(w_int.shape)
        w2 = w_int.reshape(shape[0], -1)
        lo, hi = int_range(bits)
        if w2.numel() and (int(w2.min()) < lo or int(w2.max()) > hi):
            raise ValueError(f"pack_weight: {bits}-bit values must lie in [{lo}, {hi}], "
                             f"got [{int(w2.min())}, {int(w2.max())}]")
        qdata = pack_int4(w2) if self.nibbles else w2.to(torch.int8).contiguous()
        return PackedWeight(qdata, scale.to(torch.float32).contiguous(), bits, shape, group_size, self.name)

    def unpack(self, pw):
        q = unpack_int4(pw.qdata, pw.K) if self.nibbles else pw.qdata
        return q.reshape(pw.shape)

    def dequantize(self, pw):
        q = self.unpack(pw).reshape(pw.N, pw.K).to(torch.float32)
        if pw.group_size is None:
            s = pw.scale[:, None]
        else:
            s = pw.scale.repeat_interleave(pw.group_size, dim=1)[:, : pw.K]
        return (q * s).reshape(pw.shape)


@dataclass(frozen=True)
class ActQuant:
    """Activation quantizer, asymmetric unsigned ``bits``-bit (q in [0, 2^bits - 1]).

    static  (dynamic=False): one scalar ``scale`` (float > 0) and ``zero_point`` (int in [0, 2^bits-1]) per tensor:
            ``q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``, ``x_hat = (q - zero_point) * scale``.
    dynamic (dynamic=True): scale/zero_point are computed inside the op per token (rows of the last dim, Linear)
            or per sample (Conv2d); ``scale`` must be None (``zero_point`` None or 0, stored as None).
            With lo = min(min(x_row), 0),
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
