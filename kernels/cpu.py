"""CPU integer kernels: two backends.

``onednn`` (priority 30): oneDNN int8 ops with fused dequant + bias epilogue.
    conv2d : ``onednn::qconv_prepack`` + ``onednn::qconv2d_pointwise`` (uint8 activations, scalar activation scale,
             per-channel int8 weights, fp32 output). Dynamic per-sample activations run one call per sample.
    linear : ``onednn::qlinear_prepack`` + ``onednn::qlinear_pointwise``, static per-tensor activations only
             (onednn rejects per-token activation scales).
    Refuses: group-wise weights, activations wider than 8 bit, weight-only calls, and int4 weights unless
    ``LOWBIT_CPU_CACHE_INT4=1`` (the prepacked blob is an int8 copy, so caching it costs int8 memory; prepacking
    at every call costs more than the conv).

``cpu`` (priority 20): ``torch._int_mm`` (uint8 activations x int8 weights -> int32) for W8A8 / W4A8 / W4A4,
    Linear (static or per-token dynamic) and Conv2d (uint8 im2col, groups == 1). The activation zero point is
    removed by the compensation term ``zp * rowsum(W_int)`` (rowsum cached per weight):

        out[m, n] = sx[m] * sw[n] * (acc[m, n] - zp[m] * rowsum[n]) + bias[n],  acc = q_x @ W_int^T

    Weight-only (act None): int4 Linear through ``aten._weight_int4pack_mm_for_cpu`` (bf16) for small M,
    otherwise the weight is dequantized to bf16 at each call and a bf16 GEMM / conv runs (faster than the
    int4pack GEMM at M >= 64 on AVX512-BF16 CPUs, see bench/README.md).

Static activations are quantized in **one fused pass** by default: ``torch.quantize_per_tensor(x, scale, zp)``,
which computes ``round(x * (1/scale) + zp)`` with a single rounding (fbgemm's fused multiply-add on x86) where the
reference (``kernels/eager.py``) computes ``round(x / scale) + zp``. The two differ by one step on values within an
ulp of a rounding tie (~3 per million on SD1.5-like activations; ``tests/kernels/test_cpu.py`` bounds it). That is
the size of difference the library already has between its integer and float paths (float summation order), and it
moves whole sampling runs by the same amount (``python -m lowbit.bench.act_quant_codes``: 43-58 dB PSNR between
fused and exact codes, 44-59 dB between the float and integer paths with exact codes, quality against fp32 the
same), while it costs a third of the exact quantizer's passes. The float path (``kernels/dense.py``, fused split
convolutions included) uses the same fused codes, so a deployed model has the same integers whichever path the
autotuner picks. ``LOWBIT_CPU_EXACT_ACT_QUANT=1`` gives the reference's
codes bit for bit: the true fp32 division, ``round_`` (half to even), then ``torch.quantize_per_tensor(y, 1.0, zp)``
on the rounded integers for the clamp, the zero point and the uint8 cast (exact: nothing is left to round; ties
and +-inf included).

Convolutions return the input's memory format (NCHW for NCHW inputs, as ``F.conv2d``; channels-last for
channels-last inputs and channel slices of them, whose codes the quantizer writes channels-last): oneDNN and the
im2col GEMM write channels_last, and a channels_last tensor among NCHW ones slowed the model's next ops more than the
copy costs (torch's channels-last GroupNorm is 3-10x slower than its NCHW one on this CPU:
``python -m lowbit.bench.cpu_overheads``).

Under ``OMP_WAIT_POLICY=PASSIVE`` the activation quantizer (up to 1M values) and the copy back to NCHW (up to 512K)
run on the calling thread (:func:`_serial`): there each parallel region wakes a sleeping thread (~55 us here, the
same bench), which costs more than doing that work on one thread; with OpenMP's default nothing changes.

Memory: int4 weights are unpacked to int8 at every call unless ``LOWBIT_CPU_CACHE_INT4=1``; onednn blobs of 8-bit
weights are always cached (``PackedWeight.cache``) and counted by ``PackedWeight.nbytes()``.
"""
from __future__ import annotations

import os
import threading
import weakref
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .eager import dynamic_qparams, expand_scale
from .formats import ActQuant, PackedWeight, unpack_int4
from .registry import env_flag, register_backend

onednn = register_backend("onednn", priority=30, description="oneDNN int8 conv / static-activation linear (CPU)")
cpu = register_backend("cpu", priority=20, description="torch._int_mm int8 GEMM, int4pack weight-only (CPU)")

# The quantized-tensor constructors print a deprecation notice; we only use them as a fused uint8 quantizer.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")

_HAS_ONEDNN = (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")
               and torch.backends.mkldnn.is_available())
onednn.unavailable = lambda: "" if _HAS_ONEDNN else (
    "this torch build has no oneDNN int8 ops (torch.ops.onednn.qconv2d_pointwise, mkldnn)")
_HAS_QPT = hasattr(torch, "quantize_per_tensor")

# With OMP_WAIT_POLICY=PASSIVE the OpenMP threads sleep between parallel regions, and waking the second one cost
# ~55 us per region on a 2-core VM (bench/cpu_overheads.py), about what quantizing 512K activations costs.
# A quantized layer adds regions of its own (the activation quantizer, the copy back from channels-last), so under
# PASSIVE those run on the calling thread up to these sizes; with OpenMP's default (spin, then sleep) one thread
# gained little (within 20 % up to 256K) and lost above, so nothing changes there. The policy is read once: OpenMP
# reads it when torch loads.
_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
SERIAL_QUANT_MAX = (1 << 20) if _PASSIVE else 0  # elements
SERIAL_COPY_MAX = (1 << 19) if _PASSIVE else 0


def _serial(limit: int, n: int, fn, *args):
    """``fn(*args)``, on the calling thread alone when ``n <= limit`` (the thread count restored after)."""
    threads = torch.get_num_threads() if n <= limit else 1
    if threads == 1:
        return fn(*args)
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def exact_act_quant() -> bool:
    """``LOWBIT_CPU_EXACT_ACT_QUANT=1``: static activations quantized with the reference's codes bit for bit (three
    passes) instead of the fused one-pass quantizer (the default, see the module docstring)."""
    return not _HAS_QPT or env_flag("LOWBIT_CPU_EXACT_ACT_QUANT", False)


_HAS_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_INT4PACK_GROUPS = (256, 128, 64, 32)
# below this many rows the int4pack GEMV (reads 4-bit weights) beats dequantize + bf16 GEMM
INT4PACK_MAX_M = 32


def cache_int4(pw: Optional[PackedWeight] = None) -> bool:
    """Keep int8 copies of int4 weights (faster, int8 memory): ``LOWBIT_CPU_CACHE_INT4=1`` for every weight, or
    per weight when ``pw.cache["cache_int4"]`` is set (the autotuner does that, see kernels/autotune.py) and tuning
    is active now: with ``LOWBIT_AUTOTUNE=0`` (or a backend forced) a tuned weight runs exactly as an untuned one,
    in registry order without its int8 copy (the copy it made stays, unused)."""
    if pw is not None and pw.cache.get("cache_int4") and _autotune().active():
        return True
    return env_flag("LOWBIT_CPU_CACHE_INT4", False)


_AUTOTUNE = []


def _autotune():
    """kernels.autotune, imported on first use (importing it with this module would register the dense backend
    before this one)."""
    if not _AUTOTUNE:
        from . import autotune

        _AUTOTUNE.append(autotune)
    return _AUTOTUNE[0]


# ----------------------------------------------------------------------------------------------- checks
def _check_x(x) -> str:
    if x.device.type != "cpu":
        return f"x is on {x.device}; this backend runs on CPU tensors"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"x dtype {x.dtype} (supported: float32, bfloat16)"
    if x.numel() == 0:
        return "empty input"
    return ""


def _check_w_int(pw: PackedWeight) -> str:
    if pw.device.type != "cpu":
        return f"weight is on {pw.device}"
    if pw.K < 2:  # (torch 2.13: _int_mm(a [M, 1], b [1, N]) returns garbage, any M, N, thread count; K >= 2 exact)
        return ("one input feature (K = 1: a Linear(1, n), a 1x1 convolution of one channel): torch._int_mm on CPU "
                "returns wrong sums for K = 1")
    if pw.group_size is not None and pw.group_size < pw.K:
        return (f"group-wise weight (group_size={pw.group_size}) with integer activations needs per-group int32 "
                "partial sums; this backend does per-channel only (use group_size=None, or the triton backend)")
    return ""


def _per_channel_scale(pw: PackedWeight) -> torch.Tensor:
    return pw.scale if pw.group_size is None else pw.scale[:, 0].contiguous()


# ----------------------------------------------------------------------------------------------- weights
def _int8_weight(pw: PackedWeight, keep: bool = True) -> torch.Tensor:
    """int8 [N, K]: qdata itself (bits > 4) or the unpacked nibbles, cached when int8 copies are kept
    (:func:`cache_int4`) and ``keep`` (False for oneDNN's prepacking: its blob is the int8 copy it runs on)."""
    if pw.bits > 4:
        return pw.qdata
    w = pw.cache.get("cpu.int8")
    if w is None:
        w = unpack_int4(pw.qdata, pw.K).contiguous()
        if keep and cache_int4(pw):
            pw.cache["cpu.int8"] = w
    return w


def _rowsum(pw: PackedWeight, w8: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """Row sums of the integer weight (int32 [N], cached), from ``w8`` whose values are the weights times
    ``2 ** shift`` (:func:`_int4_x16_halves`: 4), in any column order."""
    r = pw.cache.get("cpu.rowsum")
    if r is None:
        r = w8.sum(1, dtype=torch.int32)
        pw.cache["cpu.rowsum"] = r.bitwise_right_shift_(shift) if shift else r
    return r


def _halves_ok(pw: PackedWeight, rows: int, gather: bool = False) -> bool:
    """Take :func:`_int4_x16_halves` for a call of ``rows`` activation rows: an int4 weight with an even K whose
    int8 copies are not kept, and few rows: at most one per 2 output channels, or one per 4 where the activations'
    columns are gathered element by element (a convolution's (c, kh, kw) order, ``gather``), so that reordering
    the activations costs less than the weight's unpacking it saves. Measured on one core of a Xeon (halves /
    unpacked time): Linear 0.37-0.49 at 64 rows (SD1.5's 8x8 stage), 0.72 at 0.2 rows per channel, 0.92-1.05 at
    0.5, 1.17 at 1.6; 3x3 convolutions 0.33-0.48 at 0.05-0.1 pixels per channel, 0.74-0.91 at 0.2-0.25, 1.02 at
    0.33, 1.13 at 0.4, 2.1 at 1.6."""
    return (pw.bits <= 4 and pw.K % 2 == 0 and pw.K <= HALVES_MAX_K and rows * (4 if gather else 2) <= pw.N
            and not cache_int4(pw) and "cpu.int8" not in pw.cache and "cpu.int8_hwc" not in pw.cache)


# the halves' accumulator holds 16 x the products: |acc| <= 255 * 128 * K must stay below 2^31
HALVES_MAX_K = (2 ** 31 - 1) // (255 * 128)


def _int4_x16_halves(pw: PackedWeight) -> torch.Tensor:
    """int8 [N, K]: per row, 16 x the weights at even k, then 16 x those at odd k, straight from the packed bytes
    in two passes (no interleaving, no sign extension): byte j holds w[2j] in its low nibble and w[2j+1] in its
    high one, so ``byte << 4`` is 16 w[2j] and ``byte & 0xF0`` is 16 w[2j+1], both exact in int8. A GEMM with the
    activations' columns in the same order (:func:`_even_odd`) gives 16 x the accumulator, exactly (|acc| stays
    below 2^31 for K <= :data:`HALVES_MAX_K`, which :func:`_halves_ok` requires); the unpacked weight costs four
    passes and an interleaving copy (:func:`unpack_int4`)."""
    p = pw.qdata.view(torch.int8)
    k2 = p.shape[1]
    w = torch.empty((pw.N, 2 * k2), dtype=torch.int8, device=p.device)
    torch.bitwise_left_shift(p, 4, out=w[:, :k2])
    torch.bitwise_and(p, -16, out=w[:, k2:])
    return w


def _even_odd(q: torch.Tensor) -> torch.Tensor:
    """uint8 [M, K] (K even) -> its even columns, then its odd ones (the column order of :func:`_int4_x16_halves`)."""
    return torch.cat((q[:, 0::2], q[:, 1::2]), 1)


# ----------------------------------------------------------------------------------------------- activations
def _u8_view(q: torch.Tensor) -> torch.Tensor:
    # zero-copy uint8 view of a quint8 tensor (int_repr() copies and is ~10x slower than the quantization)
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def quant_static(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """float x (fp32 or bf16) -> uint8 q = clamp(round(x / scale) + zp, 0, qmax), same shape.

    Default: the fused one-pass quantizer (:func:`quant_static_fused`). With ``LOWBIT_CPU_EXACT_ACT_QUANT=1``: the
    division is a true fp32 division and the rounding ``torch.round`` (half to even), as in the reference; the
    clamp, the zero point and the cast to uint8 are one fused pass (``torch.quantize_per_tensor`` with scale 1 on
    the already rounded integers, which is exact: no rounding is left for it to do). Without quantized tensors:
    clamp(round(x / s) + zp, 0, qmax) == clamp(round(x / s), -zp, qmax - zp) + zp in place, then a cast."""
    if not exact_act_quant():
        return _u8_view(quant_static_fused(x, act))
    y = torch.div(x.to(torch.float32), act.scale)
    y.round_()
    if _HAS_QPT:
        # exact and fused: y holds integers, so quantize_per_tensor(y, scale=1, zp) = clamp(y + zp, 0, 255) with no
        # rounding left to do (its y * (1/1) + zp is exact); one pass writes the uint8 codes (3 passes instead of 5)
        q = _u8_view(torch.quantize_per_tensor(y, 1.0, act.zero_point, torch.quint8))
        return q.clamp_(max=act.qmax) if act.bits < 8 else q
    y.clamp_(-act.zero_point, act.qmax - act.zero_point).add_(act.zero_point)
    return y.to(torch.uint8)


_LAST_CODES: dict = {}  # thread id -> (key, weak reference to the input's base, codes)


def _forget_codes(tid: int, ref) -> None:
    """The input whose codes a thread keeps was freed: drop them too (called by the weak reference)."""
    last = _LAST_CODES.get(tid)
    if last is not None and last[1] is ref:
        _LAST_CODES.pop(tid, None)


def quant_static_fused(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """quint8 tensor (scale, zero point = act's) of x's static codes from the fused quantizer, one pass:
    ``clamp(round(x * (1/scale) + zp), 0, qmax)`` with one rounding (fbgemm's fused multiply-add on x86). Its
    ``.dequantize()`` is the fake-quantized x; ``_u8_view`` of it the uint8 codes (no copy); callers only read it.

    The last result is kept per thread and returned again for the same input with the same quantizer: layers that
    read one tensor (a transformer's q / k / v projections, and Flux's MLP next to them, calibrated on the same
    input, so with the same range) quantize it once. "The same input": the same memory, shape and strides, of the
    same tensor (its base, held by a weak reference, so freed memory reused by another tensor never matches), not
    written since (its version counter; writes that bypass it, through ``x.data`` or a numpy array sharing the
    memory, are not seen: quantize a new tensor instead). Tensors made under ``torch.inference_mode`` keep no version
    counter, so theirs are never reused. The codes are dropped with the input they came from."""
    tid = threading.get_ident()
    base = key = None
    if not x.is_inference():
        base = x if x._base is None else x._base
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x._version, act.scale, act.zero_point, act.bits)
        last = _LAST_CODES.get(tid)
        if last is not None and last[0] == key and last[1]() is base:
            return last[2]
    xf = _dense_layout(x.to(torch.float32))
    q = _serial(SERIAL_QUANT_MAX, xf.numel(), torch.quantize_per_tensor, xf, act.scale, act.zero_point, torch.quint8)
    if act.bits < 8:
        _u8_view(q).clamp_(max=act.qmax)
    if key is None:
        _LAST_CODES.pop(tid, None)
    else:
        _LAST_CODES[tid] = (key, weakref.ref(base, lambda r, tid=tid: _forget_codes(tid, r)), q)
    return q


def channels_last(x: torch.Tensor) -> bool:
    """x is a 4-d tensor laid out channels-last (channels innermost), or a view of one such as a channel slice."""
    return x.dim() == 4 and x.stride(1) == 1 and not x.is_contiguous()


# spatial size from which uint8 activations are laid out channels-last in blocks of channels (:func:`u8_channels_last`)
BLOCKED_TRANSPOSE_MIN_HW = 4096
_TRANSPOSE_BLOCK = 32  # channels per block


def u8_channels_last(q: torch.Tensor) -> torch.Tensor:
    """uint8 activations [B, C, H, W] laid out channels-last, as oneDNN's int8 convolution reads them (it converts
    an NCHW input itself). For planes of at least :data:`BLOCKED_TRANSPOSE_MIN_HW` pixels the copy runs in blocks of
    32 channels: torch's own channels-last copy of such uint8 tensors took 5.8 ms for 640 x 64 x 64 and 24 ms for
    640 x 128 x 128 on a 2-core Xeon, the blocked one 0.9 ms and 3.3 ms (smaller planes: torch's copy is as fast or
    faster and stays). Same values, same shape; a tensor already channels-last is returned as it is."""
    if q.dim() != 4 or channels_last(q) or q.shape[2] * q.shape[3] < BLOCKED_TRANSPOSE_MIN_HW or not q.is_contiguous():
        return q
    b, c, h, w = q.shape
    out = torch.empty((b, h, w, c), dtype=q.dtype, device=q.device)
    _copy_to_nhwc(out, q)
    return out.permute(0, 3, 1, 2)


def _copy_to_nhwc(dst: torch.Tensor, q: torch.Tensor) -> None:
    """``dst`` [B, H, W, C] (a view, e.g. a padded buffer's interior) <- ``q`` [B, C, H, W]: from NCHW in blocks of
    :data:`_TRANSPOSE_BLOCK` channels for planes of at least :data:`BLOCKED_TRANSPOSE_MIN_HW` pixels (torch's own
    layout copy of such uint8 tensors is an element-by-element loop), else in one torch copy."""
    if channels_last(q) or q.shape[2] * q.shape[3] < BLOCKED_TRANSPOSE_MIN_HW:
        dst.copy_(q.permute(0, 2, 3, 1))
        return
    for c0 in range(0, q.shape[1], _TRANSPOSE_BLOCK):
        dst[..., c0:c0 + _TRANSPOSE_BLOCK].copy_(q[:, c0:c0 + _TRANSPOSE_BLOCK].permute(0, 2, 3, 1))


def _dense_layout(x: torch.Tensor) -> torch.Tensor:
    """x in dense memory, keeping its layout: channels-last tensors and views of them stay channels-last (the
    quantizer writes its codes in that layout, oneDNN reads it without a reorder), everything else NCHW."""
    if channels_last(x):
        return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(
            memory_format=torch.channels_last)
    return x.contiguous()


def _quant_rows(x2: torch.Tensor, bits: int):
    """fp32 rows [R, L] -> (uint8 [R, L], scale fp32 [R], zp fp32 [R]) with the reference dynamic parameters."""
    scale, zp = dynamic_qparams(x2, bits)
    q = torch.div(x2, scale[:, None]).round_().add_(zp[:, None]).clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return q, scale, zp


# ----------------------------------------------------------------------------------------------- epilogue
def _epilogue(acc, pw, w8, sx, zp, bias, dynamic: bool, out=None, shift: int = 0):
    """int32 acc [M, N] -> fp32 [M, N] = sx * sw * (acc - zp * rowsum) + bias.

    static : sx, zp python scalars; one cast of acc to fp32, then one fused addcmul (per-column constants) written
             over the cast (no second [M, N] buffer: about 1.3-1.6x faster than one addcmul on the int32 acc for
             SD1.5-size outputs on a 2-core Xeon) or, given ``out`` (a view of acc's shape, e.g. an NCHW output
             seen as [B, H*W, N]), into ``out``: the layout change rides on the epilogue's own pass
    dynamic: sx, zp fp32 [M] per row; the compensation is an exact int32 rank-1 update
    ``w8``: the weight the GEMM used, its values times ``2 ** shift`` (only read for row sums not yet cached).
    """
    sw = _per_channel_scale(pw)
    r = _rowsum(pw, w8, shift)
    if not dynamic:
        s = sw * sx
        c = r.to(torch.float32).mul_(s).mul_(-zp)
        if bias is not None:
            c.add_(bias.to(torch.float32))
        y = acc.to(torch.float32)
        if out is None:
            return torch.addcmul(c, y, s, out=y)
        torch.addcmul(c, y.view(out.shape), s, out=out)
        return out
    acc.addr_(zp.to(torch.int32), r, alpha=-1)
    y = acc * sw
    y = torch.addcmul(bias.to(torch.float32), y, sx[:, None]) if bias is not None else y.mul_(sx[:, None])
    if out is None:
        return y
    return out.copy_(y.view(out.shape))


# ----------------------------------------------------------------------------------------------- cpu: linear
def _cpu_linear_supports(x, pw, bias, act):
    why = _check_x(x)
    if why:
        return False, why
    if pw.device.type != "cpu":
        return False, f"weight is on {pw.device}"
    if act is None:
        return True, ""
    why = _check_w_int(pw)
    return (False, why) if why else (True, "")


@cpu.op("linear", supports=_cpu_linear_supports)
def cpu_linear(x, pw, bias=None, act=None):
    if act is None:
        return _weight_only_linear(x, pw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if act.dynamic:
        q, sx, zp = _quant_rows(x2, act.bits)
    else:
        q, sx, zp = quant_static(x2, act), act.scale, act.zero_point
    if _halves_ok(pw, q.shape[0]):
        w16 = _int4_x16_halves(pw)
        acc = torch._int_mm(_even_odd(q), w16.t()).bitwise_right_shift_(4)  # (exact: a multiple of 16)
        out = _epilogue(acc, pw, w16, sx, zp, bias, act.dynamic, shift=4)
    else:
        w8 = _int8_weight(pw)
        acc = torch._int_mm(q, w8.t())
        out = _epilogue(acc, pw, w8, sx, zp, bias, act.dynamic)
    return out.reshape(*lead, pw.N).to(x.dtype)


def _int4pack_group(pw: PackedWeight):
    """Group size usable by _weight_int4pack_mm_for_cpu for this weight, or None."""
    if pw.group_size is None:
        return next((g for g in _INT4PACK_GROUPS if pw.K % g == 0), None)
    if pw.group_size in _INT4PACK_GROUPS and pw.K % pw.group_size == 0:
        return pw.group_size
    return None


def _weight_only_linear(x, pw, bias):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.K).to(torch.bfloat16).contiguous()  # (the int4pack GEMM refuses strided rows)
    g = _int4pack_group(pw) if (pw.bits <= 4 and _HAS_INT4PACK and pw.N % 16 == 0) else None
    if g is not None and x2.shape[0] <= INT4PACK_MAX_M:
        packed = pw.cache.get("cpu.int4pack")
        if packed is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(pw.qdata, pw.K).to(torch.int32) + 8, 2)
            scale = expand_scale(pw).expand(pw.N, pw.K)[:, ::g].t()  # [K/g, N]
            sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1).to(torch.bfloat16).contiguous()
            packed = (packed, sz)
            if cache_int4(pw):
                pw.cache["cpu.int4pack"] = packed
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed[0], g, packed[1])
        if bias is not None:
            out = out + bias.to(torch.bfloat16)
    else:
        w = _dequant_bf16(pw, scratch=_scratch_ok(x))
        out = F.linear(x2, w, None if bias is None else bias.to(torch.bfloat16))
    return out.reshape(*lead, pw.N).to(x.dtype)


# elements per fp32 temporary of the weight dequantization (8 MB): temporaries this size come back from the heap,
# while a weight-sized one (59 MB for SD1.5's 1280-channel 3x3 convolutions) is freshly mapped memory at every call
_DEQUANT_CHUNK = 1 << 21


_SCRATCH = threading.local()


def _scratch_ok(x: torch.Tensor) -> bool:
    """The dequantized weight may live in the thread's scratch buffer: nothing keeps it after the op (autograd
    would save it for a backward pass when ``x`` needs a gradient). ``LOWBIT_CPU_DEQUANT_SCRATCH=0``: never (a
    fresh buffer per call, as before; for comparison, ``bench_unet --alternate --variants W4A16,W4A16-fresh``)."""
    return (not (torch.is_grad_enabled() and x.requires_grad)
            and env_flag("LOWBIT_CPU_DEQUANT_SCRATCH", True))


def _bf16_buffer(pw: PackedWeight, scratch: bool) -> torch.Tensor:
    """[N, K] bf16 output of :func:`_dequant_bf16`. ``scratch``: a view of one buffer per thread, grown to the
    largest weight seen (29 MB for SD1.5) and kept: a fresh weight-sized allocation at every call is mapped memory
    that the kernel faults in page by page (thousands of page faults per SD1.5 convolution, about as long as the
    dequantization itself, when it alternates with the convolution's own buffers)."""
    n = pw.N * pw.K
    if not scratch:
        return torch.empty(pw.N, pw.K, dtype=torch.bfloat16, device=pw.device)
    buf = getattr(_SCRATCH, "bf16", None)
    if buf is None or buf.numel() < n or buf.device != pw.device:
        # a plain tensor even when first made under torch.inference_mode (hosts sample there): it is written again
        # at later calls, and an inference tensor may not be written outside that mode
        with torch.inference_mode(False):
            buf = _SCRATCH.bf16 = torch.empty(n, dtype=torch.bfloat16, device=pw.device)
    return buf[:n].view(pw.N, pw.K)


def _dequant_bf16(pw: PackedWeight, scratch: bool = False) -> torch.Tensor:
    """bf16 weight of logical shape, rebuilt at every call (never cached: that would be a 16-bit copy): the values of
    ``(q.float() * scale).bfloat16()``, computed in row chunks: 84 -> ~11 ms for a 1280x1280x3x3 int4 weight
    (bench/README.md). int4 weights of even K (and, group-wise, even groups dividing K) skip the unpacked int8 copy
    and the expanded scale: each nibble half is multiplied by its row's (group's) scale and written, as bf16, straight
    into its interleaved place in the output (``torch.mul(..., out=)`` rounds the same fp32 product once)."""
    out = _bf16_buffer(pw, scratch)
    rows = max(1, _DEQUANT_CHUNK // max(pw.K, 1))
    g = pw.group_size if pw.group_size is not None and pw.group_size < pw.K else None
    if pw.bits <= 4 and pw.K % 2 == 0 and (g is None or (g % 2 == 0 and pw.K % g == 0)):
        for r0 in range(0, pw.N, rows):
            n = min(pw.N, r0 + rows) - r0
            p = pw.qdata[r0:r0 + n].view(torch.int8)
            if g is None:
                s, o = pw.scale[r0:r0 + n].reshape(n, 1), out[r0:r0 + n].view(n, pw.K // 2, 2)
            else:  # a nibble pair never straddles two groups
                s, o = pw.scale[r0:r0 + n].reshape(n, -1, 1), out[r0:r0 + n].view(n, pw.K // g, g // 2, 2)
                p = p.view(n, pw.K // g, g // 2)
            torch.mul((p << 4) >> 4, s, out=o[..., 0])  # low nibble, sign-extended
            torch.mul(p >> 4, s, out=o[..., 1])
        return out.reshape(pw.shape)
    scale = expand_scale(pw)
    for r0 in range(0, pw.N, rows):
        q = unpack_int4(pw.qdata[r0:r0 + rows], pw.K) if pw.bits <= 4 else pw.qdata[r0:r0 + rows]
        out[r0:r0 + rows].copy_(torch.mul(q, scale[r0:r0 + rows]))
    return out.reshape(pw.shape)


# ----------------------------------------------------------------------------------------------- cpu: conv2d
def _conv_common_supports(x, pw, padding) -> str:
    why = _check_x(x)
    if why:
        return why
    if pw.device.type != "cpu":
        return f"weight is on {pw.device}"
    if isinstance(padding, str):
        return f"string padding {padding!r} (pass explicit integers)"
    return ""


def _conv_too_small(x, pw, padding, dilation) -> str:
    """Why the padded input is smaller than the dilated kernel ("" if it is not): F.conv2d (the reference) refuses
    such a call, the integer paths would return an empty output."""
    if isinstance(padding, str):
        return ""
    for size, pad, k, dil in zip(x.shape[2:], padding, pw.shape[2:], dilation):
        if size + 2 * pad < dil * (k - 1) + 1:
            return (f"input {list(x.shape)} padded by {list(padding)} is smaller than the kernel "
                    f"{list(pw.shape[2:])} (dilation {list(dilation)})")
    return ""


def _cpu_conv_supports(x, pw, bias, stride, padding, dilation, groups, act):
    why = _conv_common_supports(x, pw, padding) or _conv_too_small(x, pw, padding, dilation)
    if why:
        return False, why
    if act is None:
        return True, ""
    if groups != 1:
        return False, f"groups={groups}: the im2col + _int_mm path does groups == 1 only"
    why = _check_w_int(pw)
    return (False, why) if why else (True, "")


def _u8_nhwc_padded(q: torch.Tensor, padding, zp) -> torch.Tensor:
    """uint8 codes [B, C, H, W] (NCHW or channels-last) -> the same codes zero-padded by ``padding`` = (ph, pw) in
    code space (the zero point ``zp``: an int, or one per sample for dynamic ranges) and laid out channels-last:
    a [B, C, H + 2ph, W + 2pw] view of a dense NHWC buffer, what :func:`_im2col_u8` reads without a copy.

    One pass over the codes (the float input is no longer padded before quantizing: 4 bytes per value copied
    again), :func:`_copy_to_nhwc` into the buffer's interior (torch's own layout copy of 2 x 960 x 64 x 64 uint8
    took 25 ms on a 2-core Xeon, the blocked one 2.3 ms)."""
    b, c, h, w = q.shape
    ph, pw = padding
    if not ph and not pw and channels_last(q) and q.is_contiguous(memory_format=torch.channels_last):
        return q
    buf = torch.empty((b, h + 2 * ph, w + 2 * pw, c), dtype=torch.uint8, device=q.device)
    if ph or pw:
        fills = ([(slice(None), zp)] if isinstance(zp, int)
                 else [(slice(i, i + 1), z) for i, z in enumerate(zp.tolist())])
        for batch, z in fills:
            rows = buf[batch]
            for border in (rows[:, :ph], rows[:, h + ph:], rows[:, ph:h + ph, :pw], rows[:, ph:h + ph, w + pw:]):
                border.fill_(int(z))
    _copy_to_nhwc(buf[:, ph:h + ph, pw:w + pw], q)
    return buf.permute(0, 3, 1, 2)


def _out_hw(hp, wp, kh, kw, stride, dilation):
    """(Ho, Wo) of a convolution over an already padded [.., Hp, Wp] input."""
    return (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1, (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1


def _im2col_u8(q, kh, kw, stride, dilation):
    """uint8 [B, C, Hp, Wp] (already padded, any memory format) -> uint8 [B*Ho*Wo, kh*kw*C] in (kh, kw, c) order.

    The input is made channels-last first, so every gathered piece is a contiguous run of C (or, for stride-1
    undilated width, kw*C) bytes: 5-30x faster than gathering from NCHW (bench on SD1.5 shapes: 158 -> 7 ms)."""
    b, c, hp, wp = q.shape
    q = q.permute(0, 2, 3, 1).contiguous()  # NHWC
    ho, wo = _out_hw(hp, wp, kh, kw, stride, dilation)
    sb, sh, sw, _ = q.stride()
    if stride[1] == 1 and dilation[1] == 1:
        cols = q.as_strided((b, ho, wo, kh, kw * c), (sb, sh * stride[0], sw, sh * dilation[0], 1))
    else:
        cols = q.as_strided((b, ho, wo, kh, kw, c),
                            (sb, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], 1))
    return _rows(cols.reshape(b * ho * wo, kh * kw * c))


def _rows(cols: torch.Tensor) -> torch.Tensor:
    """im2col rows as ``torch._int_mm`` reads them correctly: ``reshape`` returns a view where the dimensions merge,
    and for a one-column (or one-row) output that view's rows overlap (row stride below the row length); torch's CPU
    ``_int_mm`` returns wrong sums for such an operand (e.g. a 3x3 convolution with padding 1 on a [1, C, H, 1]
    input: relative error 1e4). Those rows are copied."""
    return cols.contiguous() if cols.shape[0] > 1 and cols.stride(0) < cols.shape[1] else cols


def _im2col_u8_ckk(q, kh, kw, stride, dilation):
    """:func:`_im2col_u8` with the columns in (c, kh, kw) order, the weight's own (for few output pixels: one
    gather of [B*Ho*Wo, C*kh*kw] bytes)."""
    b, c, hp, wp = q.shape
    ho, wo = _out_hw(hp, wp, kh, kw, stride, dilation)
    sb, sc, sh, sw = q.stride()
    cols = q.as_strided((b, ho, wo, c, kh, kw), (sb, sh * stride[0], sw * stride[1], sc, sh * dilation[0],
                                                 sw * dilation[1]))
    return _rows(cols.reshape(b * ho * wo, c * kh * kw))


def _int8_weight_hwc(pw: PackedWeight) -> torch.Tensor:
    """int8 [N, kh*kw*C] (the conv weight in (kh, kw, c) order, matching :func:`_im2col_u8`). Cached when int8
    copies are cached (``cache_int4(pw)``); otherwise rebuilt per call (a weight-sized copy, small next to the
    im2col of the activations)."""
    w = pw.cache.get("cpu.int8_hwc")
    if w is not None:
        return w
    # (the [N, K] copy it is built from is not kept: a conv weight's calls read this layout only)
    w = _int8_weight(pw, keep=False).reshape(pw.shape).permute(0, 2, 3, 1).reshape(pw.N, pw.K).contiguous()
    if (pw.bits <= 4 and cache_int4(pw)) or pw.cache.get("autotune"):  # tuned weights: +1 byte per weight if cpu wins
        pw.cache["cpu.int8_hwc"] = w
    return w


@cpu.op("conv2d", supports=_cpu_conv_supports)
def cpu_conv2d(x, pw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None):
    if act is None:
        out = F.conv2d(x.to(torch.bfloat16), _dequant_bf16(pw, scratch=_scratch_ok(x)),
                       None if bias is None else bias.to(torch.bfloat16),
                       stride, padding, dilation, groups)
        return out.to(x.dtype)
    xf = x.to(torch.float32)
    b = xf.shape[0]
    if act.dynamic:  # (the codes are padded with the zero point: padding zeros never change a range, which holds 0)
        q, sx, zp = _quant_rows(xf.reshape(b, -1), act.bits)
        q = q.reshape(xf.shape)
    else:
        q, sx, zp = quant_static(xf, act), act.scale, act.zero_point
    kh, kw = pw.shape[2], pw.shape[3]
    qp = _u8_nhwc_padded(q, padding, zp)
    ho, wo = _out_hw(qp.shape[2], qp.shape[3], kh, kw, stride, dilation)
    shift = 4 if _halves_ok(pw, b * ho * wo, gather=kh * kw > 1) else 0
    if shift:  # few output pixels: the packed bytes' own (c, kh, kw) order, even k then odd k
        w8 = _int4_x16_halves(pw)
        acc = torch._int_mm(_even_odd(_im2col_u8_ckk(qp, kh, kw, stride, dilation)), w8.t())
        acc.bitwise_right_shift_(4)  # (exact: a multiple of 16)
    else:
        cols = _im2col_u8(qp, kh, kw, stride, dilation)
        w8 = _int8_weight_hwc(pw)
        acc = torch._int_mm(cols, w8.t())
    if act.dynamic:
        sx = sx.repeat_interleave(ho * wo)
        zp = zp.repeat_interleave(ho * wo)
    if channels_last(x) or x.dtype != torch.float32:
        # [B*Ho*Wo, N] is channels_last memory already: a permuted view (made NCHW for an NCHW input)
        out = _epilogue(acc, pw, w8, sx, zp, bias, act.dynamic, shift=shift)
        return _like_input(out.reshape(b, ho, wo, pw.N).permute(0, 3, 1, 2).to(x.dtype), x)
    # fp32 NCHW: the epilogue writes the NCHW output itself (its [B, Ho*Wo, N] view), no copy after it
    out = torch.empty((b, pw.N, ho, wo), dtype=torch.float32, device=x.device)
    _epilogue(acc, pw, w8, sx, zp, bias, act.dynamic, out=out.view(b, pw.N, ho * wo).transpose(1, 2), shift=shift)
    return out


# ----------------------------------------------------------------------------------------------- onednn
def _onednn_common(x, pw, act) -> str:
    if not _HAS_ONEDNN:
        return "this torch build has no onednn int8 ops (torch.ops.onednn.qconv2d_pointwise)"
    if act is None:
        return "weight-only call (onednn int8 ops need quantized activations)"
    why = _check_w_int(pw)
    if why:
        return why
    if pw.bits <= 4 and not cache_int4(pw):
        return ("int4 weight: onednn needs an int8 prepacked copy; prepacking at every call costs more than the op. "
                "Set LOWBIT_CPU_CACHE_INT4=1 to cache it (int8 memory)")
    return ""


def _onednn_linear_supports(x, pw, bias, act):
    why = _check_x(x) or _onednn_common(x, pw, act)
    if not why and act.dynamic:
        why = "per-token dynamic activations: onednn qlinear takes one scalar activation scale"
    return (False, why) if why else (True, "")


def _out_dtype(x) -> torch.dtype:
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _onednn_wscale(pw):
    wzp = pw.cache.get("onednn.wzp")
    if wzp is None:  # (not setdefault: its default would be a new tensor at every call)
        wzp = pw.cache["onednn.wzp"] = torch.zeros(pw.N, dtype=torch.int64)
    return _per_channel_scale(pw), wzp


# oneDNN's (post-op, algorithm) for the activation epilogues (kernels/post.py) it applies to the accumulator
_ONEDNN_POSTS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _onednn_geglu(x, pw, bias, act):
    """``a * gelu(g)`` of the Linear's output halves ``a, g`` (kernels/post.py "geglu"): the input quantized once, two
    int8 Linears over the halves' rows (prepacked once each), the GELU in the second one's epilogue, one multiply."""
    n = pw.N // 2
    halves = pw.cache.get("onednn.geglu")
    if halves is None:
        w8 = _int8_weight(pw, keep=False)
        sw, _ = _onednn_wscale(pw)
        halves = pw.cache["onednn.geglu"] = tuple(
            (torch.ops.onednn.qlinear_prepack(w8[i * n:(i + 1) * n].contiguous(), None),
             sw[i * n:(i + 1) * n].contiguous(), torch.zeros(n, dtype=torch.int64)) for i in (0, 1))
    lead = x.shape[:-1]
    q = quant_static(x.reshape(-1, pw.K), act)
    b = None if bias is None else bias.to(torch.float32)
    # (fp32 halves and product, one rounding to a bf16 input's dtype at the end, as the unfused path computes it)
    outs = [torch.ops.onednn.qlinear_pointwise(q, act.scale, act.zero_point, packed, sw, wzp,
                                               None if b is None else b[i * n:(i + 1) * n], 1.0, 0, torch.float32,
                                               op, [], "none")
            for i, ((packed, sw, wzp), op) in enumerate(zip(halves, ("none", "gelu")))]
    return outs[0].mul_(outs[1]).reshape(*lead, n).to(x.dtype)


@onednn.op("linear", supports=_onednn_linear_supports, posts=("gelu", "gelu_tanh", "geglu"))
def onednn_linear(x, pw, bias=None, act=None, post=None):
    if post == "geglu":
        return _onednn_geglu(x, pw, bias, act)
    packed = pw.cache.get("onednn.linear")
    if packed is None:
        packed = pw.cache["onednn.linear"] = torch.ops.onednn.qlinear_prepack(_int8_weight(pw, keep=False), None)
    sw, wzp = _onednn_wscale(pw)
    lead = x.shape[:-1]
    q = quant_static(x.reshape(-1, pw.K), act)
    b = None if bias is None else bias.to(torch.float32)
    # bf16 inputs get bf16 outputs written by oneDNN's epilogue itself (no conversion pass); a GELU after the
    # Linear runs in the same epilogue (on the fp32 value before any bf16 rounding)
    op, algo = _ONEDNN_POSTS[post]
    out = torch.ops.onednn.qlinear_pointwise(q, act.scale, act.zero_point, packed, sw, wzp, b, 1.0, 0,
                                             _out_dtype(x), op, [], algo)
    return out.reshape(*lead, pw.N).to(x.dtype)


def _onednn_conv_supports(x, pw, bias, stride, padding, dilation, groups, act):
    why = (_conv_common_supports(x, pw, padding) or _conv_too_small(x, pw, padding, dilation)
           or _onednn_common(x, pw, act) or _onednn_conv_wrong(x, pw, stride, padding, dilation, groups))
    return (False, why) if why else (True, "")


def _onednn_conv_wrong(x, pw, stride, padding, dilation, groups) -> str:
    """Why torch's oneDNN int8 convolution (torch 2.13) may compute this call wrong ("" if not): found by fuzzing
    it against the reference; torch's own ``torch.ao`` quantized Conv2d on the x86 / onednn engines gives the same
    wrong outputs (relative errors 0.8-2.4, garbage or a crash), so these are oneDNN's, declined here and computed by
    another backend. The rules are wider than the failing cases seen (speed is all they cost):

    * grouped convolutions other than depthwise (wrong groups after the first when a group has more than 32
      outputs, input channels not a multiple of 4 and a kernel larger than 1x1);
    * strided calls whose output is one pixel wide or high (the SD downsampler, 3x3 stride 2, on a width-2 input),
      and unequal strides;
    * a kernel of unequal sides padded along one axis only (a (3, 1) kernel with padding (1, 0));
    * dilation (taps falling wholly in the padding crashed the process or read uninitialised memory)."""
    n, cin_g, kh, kw = pw.shape
    if groups > 1 and not (cin_g == 1 and n // groups <= 2):
        return (f"groups={groups} ({cin_g} input, {n // groups} output channels per group): oneDNN is exact for "
                "depthwise convolutions only")
    if tuple(dilation) != (1, 1):
        return f"dilation {list(dilation)} (oneDNN's int8 convolution can crash or read padding wrongly)"
    if stride[0] != stride[1]:
        return f"unequal strides {list(stride)}"
    if stride[0] > 1:
        ho, wo = _out_hw(x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1], kh, kw, stride, dilation)
        if ho == 1 or wo == 1:
            return f"stride {stride[0]} with a one-pixel output side ({ho} x {wo})"
    if kh != kw and padding[0] != padding[1]:
        return f"kernel {kh}x{kw} with padding {list(padding)}"
    return ""


@onednn.op("conv2d", supports=_onednn_conv_supports)
def onednn_conv2d(x, pw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None):
    key = ("onednn.conv", stride, padding, dilation, groups)
    packed = pw.cache.get(key)
    if packed is None:
        # the blob does not depend on the activation scale / zero point passed here (verified: any later pair works)
        packed = pw.cache[key] = torch.ops.onednn.qconv_prepack(
            _int8_weight(pw, keep=False).reshape(pw.shape), _per_channel_scale(pw), 1.0, 0, list(stride), list(padding),
            list(dilation), groups, None)
    sw, wzp = _onednn_wscale(pw)
    b = None if bias is None else bias.to(torch.float32)
    xf = x.to(torch.float32)

    def run(q, sx, zp):
        return torch.ops.onednn.qconv2d_pointwise(u8_channels_last(q), sx, zp, packed, sw, wzp, b, list(stride),
                                                  list(padding), list(dilation), groups, 1.0, 0, _out_dtype(x),
                                                  "none", [], "")

    if not act.dynamic:
        out = run(quant_static(xf, act), act.scale, act.zero_point)
    else:
        q, sx, zp = _quant_rows(xf.reshape(xf.shape[0], -1), act.bits)
        q = q.reshape(xf.shape)
        outs = [run(q[i:i + 1], float(sx[i]), int(zp[i])) for i in range(xf.shape[0])]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return _like_input(out.to(x.dtype), x)


def _like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The convolution's output in the input's memory format (NCHW unless x is channels_last, e.g. for the channel
    slices a split convolution reads), as ``F.conv2d`` gives it: oneDNN's int8 convolutions and
    the im2col GEMM write channels_last, and a channels_last tensor among a model's NCHW ones made the ops after it
    slower (measured on the zoo's latent_text UNet: a residual add 5x, GroupNorm 1.6x; the whole non-quantized part
    of a forward about 10 %), more than this one copy costs. The autotuner times the copy with the kernel."""
    if out.dim() == 4 and not out.is_contiguous() and not channels_last(x):
        return _serial(SERIAL_COPY_MAX, out.numel(), out.contiguous)
    return out
