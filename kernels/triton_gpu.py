"""Triton backend (CUDA GPUs; CPU tensors only under ``TRITON_INTERPRET=1``, for tests).

Kernels (tensors by shape / dtype, notation in :mod:`.formats`):

``_act_quant_kernel``  x fp32/bf16/fp16 [R, L] -> q int8 [R, L] holding (q_u8 - 128), and for dynamic quantizers
    scale fp32 [R], zp fp32 [R] (static ones have one scale and zero point: the GEMM takes them as constants).
    Rows are tokens (Linear) or samples (Conv2d); one program per [BR, BL] tile (a 2-D grid: a conv row is a whole
    sample). Dynamic: from the row minima / maxima, which ``torch.aminmax`` computes first. ``DEQUANT``: writes the
    fake-quantized values ``(q - zp) * scale`` in x's dtype instead (one pass; the dense path's activations on CUDA).
    Unsigned activations are stored shifted by -128 because ``tl.dot`` multiplies int8 x int8; the GEMM adds
    ``(128 - zp) * colsum(W)`` back, which also removes the zero point.
``_int_gemm_kernel``   W8A8 / W4A8 / W4A4 Linear and implicit-GEMM Conv2d (groups == 1, any stride/padding/dilation).
    A: the int8 activations above: [M, K] for Linear; for Conv2d either channels-last ([B, H, W, C], ``NHWC``:
    per-channel weights with C % 16 == 0; a K-block is BK contiguous channels of one input pixel) or NCHW, gathered
    per (c, kh, kw) (the rest, e.g. a UNet's 4-channel first conv, and group-wise weights).
    W: int8 [N, K] (bits > 4) or uint8 [N, ceil(K/2)] nibbles unpacked in registers with arithmetic shifts; for the
    channels-last conv the same packing of the weight reordered to [N, KH, KW, C] (once, ``pw.cache``).
    int32 ``tl.dot`` over K-blocks of BK >= 32 (int8 MMA needs K >= 32). Per-channel weights accumulate in int32 over
    all of K; group-wise weights (group_size % BK == 0) flush each block into fp32 scaled by its group's scale.
    ``FUSED_A`` (off by default, :func:`fused_act_quant`): a Linear's static activations are quantized in the K loop
    from the float input, with the act-quant kernel's arithmetic (one launch instead of two).
    Epilogue: ``out = sx[m] * (sum_g sw[n, g] * (acc_g + (128 - zp[m]) * colsum_g[n])) + bias[n]`` with the weight's
    column sums computed once per weight (``pw.cache``), written in x's dtype: [M, N] (Linear), NCHW, or channels-last
    when the conv's input is.
    ``POST`` (Linear; kernels/post.py): "gelu" / "gelu_tanh" applied to ``out`` before the store; "geglu": the tile's
    BN weight rows are BN / 2 output columns' rows of the first half, then the same columns' rows of the second
    (gate) half, so that ``a * gelu(gate)`` is formed in registers and written to an [M, N / 2] output.
``_wo_gemm_kernel``    W4A16 / W8A16 Linear: x float [M, K] times the weight dequantized in registers, fp32
    accumulation, written in x's dtype; the same ``POST`` epilogues.

Rounding is half-to-even (``(y + 1.5*2^23) - 1.5*2^23`` after clamping |y| <= 512) and the division is ``div_rn``,
so the activation quantization matches ``torch.round(x / scale)`` of the eager reference bit for bit.

The kernels are written as plain functions and jitted on first use (:func:`kernel`), so that a test can set
``TRITON_INTERPRET=1`` after this module was imported; :func:`jit_function` gives the compilable form for AOT tests.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from . import post as _post
from .formats import PackedWeight, pack_int4
from .registry import register_backend

backend = register_backend("triton", priority=40,
                           description="Triton int8-MMA kernels (CUDA; CPU under TRITON_INTERPRET=1)",
                           unavailable=lambda: "" if torch.cuda.is_available() or _interpret() else
                           "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU, for tests)")

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds an fp32 |y| < 2**22 half to even


# ----------------------------------------------------------------------------------------------- kernels
def _act_quant_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, lo_ptr, hi_ptr, R, L, s_static, zp_static,
                      QMAX: tl.constexpr, DYNAMIC: tl.constexpr, DEQUANT: tl.constexpr,
                      BR: tl.constexpr, BL: tl.constexpr):
    # one [BR, BL] tile per program: a 2-D grid, so that a few long rows (Conv2d: one row per sample, C*H*W
    # values) spread over the whole GPU. Dynamic: the row minima / maxima come from torch (lo, hi).
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    if DYNAMIC:
        lo = tl.minimum(tl.load(lo_ptr + rows, mask=rmask, other=0.0).to(tl.float32), 0.0)
        hi = tl.maximum(tl.load(hi_ptr + rows, mask=rmask, other=0.0).to(tl.float32), 0.0)
        scale = tl.math.div_rn(hi - lo, tl.full((BR,), QMAX, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        z = tl.math.div_rn(-lo, scale)
        z = tl.minimum(tl.maximum((z + _RNE) - _RNE, 0.0), QMAX)
    else:
        scale = tl.full((BR,), 1.0, tl.float32) * s_static
        z = tl.full((BR,), 1.0, tl.float32) * zp_static
    if DYNAMIC:  # the row scales are written by the first column block (static ones are the GEMM's constants)
        first = rmask & ((rows * 0 + tl.program_id(1)) == 0)
        tl.store(scale_ptr + rows, scale, mask=first)
        tl.store(zp_ptr + rows, z, mask=first)
    # a grid's second dimension holds at most 65535 blocks: longer rows are walked in strides of the grid
    for c0 in range(tl.program_id(1) * BL, L, tl.num_programs(1) * BL):
        cols = c0 + tl.arange(0, BL)
        m = rmask[:, None] & (cols < L)[None, :]
        offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, scale[:, None])
        y = tl.minimum(tl.maximum(y, -512.0), 512.0)
        q = tl.minimum(tl.maximum((y + _RNE) - _RNE + z[:, None], 0.0), QMAX)
        if DEQUANT:  # fake quantization: the dequantized value, in q's (float) dtype
            tl.store(q_ptr + offs, ((q - z[:, None]) * scale[:, None]).to(q_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(q_ptr + offs, (q - 128.0).to(tl.int8), mask=m)


def _int_gemm_kernel(a_ptr, w_ptr, ws_ptr, cs_ptr, bias_ptr, out_ptr, xs_ptr, xzp_ptr, s_static, zp_static,
                     M, N, K, K_W, G, GROUP_SIZE, ROWS_PER_SCALE,
                     C, H, W, HO, WO, KH, KW, SH, SW, PH, PW, DH, DW, CB,
                     W4: tl.constexpr, GROUPED: tl.constexpr, IS_CONV: tl.constexpr, NHWC: tl.constexpr,
                     STATIC_ACT: tl.constexpr, OUT_NHWC: tl.constexpr, HAS_BIAS: tl.constexpr,
                     FUSED_A: tl.constexpr, QMAX: tl.constexpr, POST: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    if POST == "geglu":  # BN weight rows: BN / 2 output columns' `a` rows, then their gate rows (N / 2 further on)
        jn = tl.arange(0, BN)
        col = pid_n * (BN // 2) + jn % (BN // 2)
        rn = col + (jn // (BN // 2)) * (N // 2)
        nmask = col < N // 2
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
    if STATIC_ACT:  # one scale and zero point for every row
        sx = tl.full((BM,), 1.0, tl.float32) * s_static
        zpx = tl.full((BM,), 1.0, tl.float32) * zp_static
    else:
        sidx = rm // ROWS_PER_SCALE
        sx = tl.load(xs_ptr + sidx, mask=mmask, other=1.0)
        zpx = tl.load(xzp_ptr + sidx, mask=mmask, other=128.0)
    comp = 128 - zpx.to(tl.int32)  # q_u8 = a + 128, minus the zero point
    if IS_CONV:
        bidx = rm // (HO * WO)
        pix = rm % (HO * WO)
        oh = pix // WO
        ow = pix % WO
        pad_val = (zpx - 128.0).to(tl.int8)  # float 0 == zero point, shifted
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    accf = tl.zeros((BM, BN), dtype=tl.float32)
    # K-blocks: NHWC convolutions walk (kh, kw) and, inside, CB blocks of BK channels (contiguous in memory, as are
    # the weights reordered to [N, KH, KW, C]); everything else walks K in blocks of BK
    n_blocks = KH * KW * CB if NHWC else tl.cdiv(K, BK)
    for i in range(0, n_blocks):
        if NHWC:
            r = i // CB
            rc = (i % CB) * BK + tl.arange(0, BK)
            k0 = r * C + (i % CB) * BK
            kmask = rc < C
            rk = r * C + rc
            ih_r = oh * SH - PH + (r // KW) * DH  # one input pixel per output row in this block
            iw_r = ow * SW - PW + (r % KW) * DW
            inb_r = (ih_r >= 0) & (ih_r < H) & (iw_r >= 0) & (iw_r < W)
            pixel = (bidx.to(tl.int64) * H + ih_r) * W + iw_r
            a = tl.load(a_ptr + pixel[:, None] * C + rc[None, :], mask=(mmask & inb_r)[:, None] & kmask[None, :],
                        other=0)
            # outside the image: the zero point; channels past C: 0 (W4 weights there belong to the next (kh, kw))
            a = tl.where(inb_r[:, None] | (rc >= C)[None, :], a, pad_val[:, None])
        else:
            k0 = i * BK
            rk = k0 + tl.arange(0, BK)
            kmask = rk < K
            if IS_CONV:
                c = rk // (KH * KW)
                rs = rk % (KH * KW)
                ih = oh[:, None] * SH - PH + (rs // KW)[None, :] * DH
                iw = ow[:, None] * SW - PW + (rs % KW)[None, :] * DW
                inb = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                addr = bidx.to(tl.int64)[:, None] * (C * H * W) + c[None, :] * (H * W) + ih * W + iw
                a = tl.load(a_ptr + addr, mask=mmask[:, None] & kmask[None, :] & inb, other=0)
                a = tl.where(inb, a, pad_val[:, None])
            elif FUSED_A:  # Linear, static activations quantized here from the float input (no act-quant launch):
                # the act-quant kernel's arithmetic, so the same codes; masked k: b is 0 there
                xa = tl.load(a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                             other=0.0).to(tl.float32)
                y = tl.math.div_rn(xa, sx[:, None] + tl.zeros((BM, BK), tl.float32))
                y = tl.minimum(tl.maximum(y, -512.0), 512.0)
                a = (tl.minimum(tl.maximum((y + _RNE) - _RNE + zpx[:, None], 0.0), QMAX) - 128.0).to(tl.int8)
            else:
                a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                            other=0)
        if W4:
            rkk = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(w_ptr + rn[None, :] * K_W + rkk[:, None], mask=(rkk < K_W)[:, None] & nmask[None, :], other=0)
            p8 = p.to(tl.int8, bitcast=True)
            lo = (p8 << 4) >> 4  # arithmetic shifts sign-extend each nibble
            hi = p8 >> 4
            b = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, BN))  # row 2*kk + j  <-  k = k0 + 2*kk + j
        else:
            b = tl.load(w_ptr + rn[None, :] * K_W + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        if GROUPED:
            g = k0 // GROUP_SIZE
            cs = tl.load(cs_ptr + rn * G + g, mask=nmask, other=0)
            part = tl.dot(a, b, out_dtype=tl.int32) + comp[:, None] * cs[None, :]
            wsg = tl.load(ws_ptr + rn * G + g, mask=nmask, other=0.0)
            accf += part.to(tl.float32) * wsg[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if GROUPED:
        out = accf * sx[:, None]
    else:
        # the weight's column sums (precomputed, :func:`_prepared`) turn the shifted codes back into q_u8 - zp
        csum = tl.load(cs_ptr + rn, mask=nmask, other=0)
        sw = tl.load(ws_ptr + rn, mask=nmask, other=0.0)
        out = (acc + comp[:, None] * csum[None, :]).to(tl.float32) * sw[None, :] * sx[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # activation epilogue (kernels/post.py) on the fp32 value, before the one store; the same lines in
    # _wo_gemm_kernel (a shared device function would have to be jitted like the kernels, per interpreter mode)
    NO = N  # output features
    if POST == "geglu":  # a * gelu(gate): the tile's halves side by side, BN / 2 columns of an [M, N / 2] output
        y, h = tl.split(tl.permute(tl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1)))
        NO = N // 2
        rn = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        nmask = rn < NO
    else:
        h = out
    if POST == "gelu_tanh":  # 0.5 * (1 + tanh(u)) == sigmoid(2u) (no tanh in tl.math); exp's argument kept finite
        h = h / (1.0 + tl.exp(tl.minimum(-1.5957691216057308 * (h + 0.044715 * h * h * h), 80.0)))
    elif POST == "gelu" or POST == "geglu":  # F.gelu's erf form
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    out = y * h if POST == "geglu" else h
    omask = mmask[:, None] & nmask[None, :]
    if IS_CONV and not OUT_NHWC:
        optr = out_ptr + bidx[:, None].to(tl.int64) * (N * HO * WO) + rn[None, :] * (HO * WO) + pix[:, None]
    else:  # Linear [M, NO], or a channels-last conv output: row m = (b, oh, ow), N channels each
        optr = out_ptr + rm[:, None].to(tl.int64) * NO + rn[None, :]
    tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=omask)


def _wo_gemm_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, K_W, G, GROUP_SIZE,
                    W4: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    POST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    if POST == "geglu":  # the tile's weight rows as in _int_gemm_kernel: `a` rows, then the matching gate rows
        jn = tl.arange(0, BN)
        col = pid_n * (BN // 2) + jn % (BN // 2)
        rn = col + (jn // (BN // 2)) * (N // 2)
        nmask = col < N // 2
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        if W4:
            rkk = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(w_ptr + rn[None, :] * K_W + rkk[:, None], mask=(rkk < K_W)[:, None] & nmask[None, :], other=0)
            p8 = p.to(tl.int8, bitcast=True)
            b = tl.reshape(tl.permute(tl.join((p8 << 4) >> 4, p8 >> 4), (0, 2, 1)), (BK, BN))
        else:
            b = tl.load(w_ptr + rn[None, :] * K_W + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        bf = b.to(tl.float32)
        if GROUPED:
            bf = bf * tl.load(ws_ptr + rn * G + k0 // GROUP_SIZE, mask=nmask, other=0.0)[None, :]
        if IEEE:  # fp32 inputs: fp32 products, as torch's F.linear (tl.dot would round them to TF32)
            acc = tl.dot(a, bf.to(a.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bf.to(a.dtype), acc)
    if not GROUPED:
        acc = acc * tl.load(ws_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    NO = N  # the activation epilogue of _int_gemm_kernel
    if POST == "geglu":
        y, h = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        NO = N // 2
        rn = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        nmask = rn < NO
    else:
        h = acc
    if POST == "gelu_tanh":
        h = h / (1.0 + tl.exp(tl.minimum(-1.5957691216057308 * (h + 0.044715 * h * h * h), 80.0)))
    elif POST == "gelu" or POST == "geglu":
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    acc = y * h if POST == "geglu" else h
    tl.store(out_ptr + rm[:, None].to(tl.int64) * NO + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


KERNELS = {"act_quant": _act_quant_kernel, "int_gemm": _int_gemm_kernel, "wo_gemm": _wo_gemm_kernel}
_jitted = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(name: str):
    """The launchable kernel, jitted (or wrapped for the interpreter when TRITON_INTERPRET=1) on first use."""
    key = (name, _interpret())
    if key not in _jitted:
        _jitted[key] = triton.jit(KERNELS[name])
    return _jitted[key]


def jit_function(name: str):
    """A compilable ``JITFunction`` of a kernel, whatever TRITON_INTERPRET says (for ``triton.compile``)."""
    return triton.runtime.jit.JITFunction(KERNELS[name])


# ----------------------------------------------------------------------------------------------- checks
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_device(x, pw) -> str:
    if x.device.type == "cuda":
        if pw.device != x.device:
            return f"weight on {pw.device}, x on {x.device}"
        return ""
    if x.device.type == "cpu" and _interpret():
        return "" if pw.device.type == "cpu" else f"weight on {pw.device}"
    return f"x is on {x.device}; triton runs on CUDA (CPU only under TRITON_INTERPRET=1)"


def _block_k(pw: PackedWeight) -> int:
    if pw.group_size is not None and pw.group_size < pw.K:
        return 64 if pw.group_size % 64 == 0 else 32
    return 64 if pw.K > 32 else 32


def _check_common(x, pw, act) -> str:
    why = _check_device(x, pw)
    if why:
        return why
    if x.dtype not in _FLOATS:
        return f"x dtype {x.dtype} (supported: fp32, bf16, fp16)"
    if x.numel() == 0:
        return "empty input"
    if pw.group_size is not None and pw.group_size < pw.K and pw.group_size % 32:
        return f"group_size={pw.group_size}: the kernels need group_size % 32 == 0 (int8 MMA K-blocks are >= 32)"
    return ""


def _linear_supports(x, pw, bias, act):
    why = _check_common(x, pw, act)
    return (False, why) if why else (True, "")


def _conv_supports(x, pw, bias, stride, padding, dilation, groups, act):
    why = _check_common(x, pw, act)
    if not why and act is None:
        why = "weight-only conv has no triton kernel (eager dequantizes)"
    if not why and groups != 1:
        why = f"groups={groups}: the implicit-GEMM conv does groups == 1 only"
    if not why and isinstance(padding, str):
        why = f"string padding {padding!r}"
    return (False, why) if why else (True, "")


def _fq_supports(x, act, granularity="token"):
    if act is None:
        return False, "no activation quantizer"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret()):
        return False, f"x is on {x.device}; triton runs on CUDA (CPU only under TRITON_INTERPRET=1)"
    if x.dtype not in _FLOATS:
        return False, f"x dtype {x.dtype}"
    return True, ""


# ----------------------------------------------------------------------------------------------- launchers
def _out(shape, device, dtype=torch.float32):
    # under the interpreter (tests) outputs are poisoned with NaN so that an unwritten element cannot pass
    if _interpret():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a jitted function: microseconds per host call)


def quantize_rows(x2: torch.Tensor, act, dequant: bool = False):
    """x2 float [R, L] contiguous -> (int8 [R, L] = q - 128, scale fp32 [R], zero point fp32 [R]); with
    ``dequant`` the first is instead the fake-quantized x2 (``(q - zp) * scale``, x2's dtype), from the same pass.
    Static quantizers have one scale and zero point (``act.scale``, ``act.zero_point``): scale and zp are None."""
    r, l = x2.shape
    if dequant:
        q = _out((r, l), x2.device, x2.dtype)
    elif _interpret():
        q = torch.full((r, l), 127, dtype=torch.int8, device=x2.device)
    else:
        q = torch.empty((r, l), dtype=torch.int8, device=x2.device)
    bl = min(1024, 1 << max(0, l - 1).bit_length())
    br = max(1, min(64, 4096 // bl))
    if act.dynamic:
        scale, zp = _out((r,), x2.device), _out((r,), x2.device)
        lo, hi = torch.aminmax(x2, dim=1)  # in x2's dtype: the kernel reads them as fp32 (exact)
    else:
        scale = zp = lo = hi = q  # not read, not written
    kernel("act_quant")[(_cdiv(r, br), min(_cdiv(l, bl), _MAX_GRID_Y))](
        x2, q, scale, zp, lo, hi, r, l, *_static_qparams(act), QMAX=act.qmax, DYNAMIC=act.dynamic, DEQUANT=dequant,
        BR=br, BL=bl)
    return (q, scale, zp) if act.dynamic else (q, None, None)


def _static_qparams(act):
    """(scale, zero point) a kernel takes as constants: a static quantizer's; placeholders, not read, for a dynamic
    one (its per-row values come in tensors)."""
    return (1.0, 0.0) if act.dynamic else (act.scale, float(act.zero_point))


def _channels_last(x) -> bool:
    """A 4-D tensor stored channels-last (and not also plain contiguous, as when C == 1 or H == W == 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@backend.op("fake_quant_act", supports=_fq_supports)
def fake_quant_act(x, act, granularity="token"):
    if _channels_last(x) and (granularity == "sample" or not act.dynamic):
        # a sample's values in any order have the same range: quantize the channels-last storage as it lies and
        # give back a channels-last tensor, as the reference's elementwise ops do
        xr = x.permute(0, 2, 3, 1)
        return quantize_rows(xr.reshape(x.shape[0], -1), act, dequant=True)[0].reshape(xr.shape).permute(0, 3, 1, 2)
    x2 = (x.reshape(-1, x.shape[-1]) if granularity == "token" else x.reshape(x.shape[0], -1)).contiguous()
    return quantize_rows(x2, act, dequant=True)[0].reshape(x.shape)


# launch choices the GPU check overrides inside a ``with`` block (:func:`tiles`, :func:`conv_layout`,
# :func:`fused_act_quant`)
_TILE_OVERRIDE = None  # (BM, BN, BK, num_warps, num_stages)
_CONV_NHWC = True  # the channels-last implicit GEMM for convolutions that allow it
_FUSED_ACT = False  # static Linear activations quantized inside the GEMM


@contextmanager
def _setting(name: str, value):
    old = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = old


def tiles(bm: int, bn: int, bk: int, num_warps: int = 4, num_stages: int = 3):
    """Launch the GEMM kernels with these tiles inside the block (the GPU check's tile sweep); per-channel weights
    only (group-wise ones keep BK from their group size). BK must be a multiple of 32 (int8 MMA)."""
    for name, v in (("bm", bm), ("bn", bn), ("bk", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v}: tiles must be powers of two >= 16")
    if bk % 32:
        raise ValueError(f"bk={bk}: int8 MMA needs K-blocks that are multiples of 32")
    return _setting("_TILE_OVERRIDE", (bm, bn, bk, num_warps, num_stages))


def fused_act_quant(enabled: bool = True):
    """Inside the block, Linear layers with static activation quantizers quantize their float input inside the
    integer GEMM (one launch per call instead of two; each input block is quantized once per output-column block).
    Off by default: an experiment for the GPU check, which times it against the two-launch path (same codes)."""
    return _setting("_FUSED_ACT", bool(enabled))


def conv_layout(nhwc: bool):
    """Inside the block, convolutions take the channels-last kernel (``nhwc``) where allowed, else the NCHW one
    (the GPU check times both)."""
    return _setting("_CONV_NHWC", bool(nhwc))


# large per-channel GEMMs: 128x128x64 tiles, 4 warps, 4 stages. The GPU check's tile sweep on an H200 (2026-12-04,
# runs 5-7, timed from CUDA graphs, bench/README.md "GPU, second session"): at the SD1.5 / SDXL Linear shapes within
# 4 % of the fastest of five configurations (W8A8 and W4A8) and up to 1.3x faster than the previous default
# 128x128x128 / 8 warps; on the channels-last 3x3 convs level with or faster than that (up to 1.2x), within 20 % of
# the fastest. The NCHW conv kernel (a gather per element) keeps 64x64x64: the large tiles made it 3-7x slower.
_LARGE_TILES = (128, 128, 64, 4, 4)


def _grouped(pw) -> bool:
    return pw.group_size is not None and pw.group_size < pw.K


@functools.lru_cache(maxsize=None)
def _large_tiles_fit(device_type: str, index) -> bool:
    """The large tiles' int8 operands take 64 KB of shared memory per block in 4 stages, plus the epilogue's: GPUs
    that give a block at least 160 KB (A100, H100, H200) take them; smaller ones (consumer cards: 99 KB, T4: 64 KB),
    where they were never timed, keep the small tiles; the interpreter (CPU) has no such limit."""
    if device_type != "cuda":
        return True
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024


def _large(m, n, pw, integer: bool, gather: bool) -> bool:
    # integer kernels only: the sweep timed W8A8 / W4A8; the weight-only kernel's fp32 / bf16 operands are 2-4x
    # larger per tile. Not the NCHW conv kernel (``gather``): 3-7x slower with them
    return (integer and not gather and not _grouped(pw) and m >= 1024 and n >= 256 and pw.K >= 256
            and _large_tiles_fit(pw.device.type, pw.device.index))


def _tile_config(m, n, pw, integer: bool = True, gather: bool = False):
    """((BM, BN, BK), launch options) of a GEMM: the :func:`tiles` override, the large tiles, or the default
    (small tiles, Triton's default warps and stages). ``gather``: the NCHW conv kernel."""
    cfg = _TILE_OVERRIDE if _TILE_OVERRIDE is not None and not _grouped(pw) else \
        _LARGE_TILES if _large(m, n, pw, integer, gather) else None
    if cfg is None:
        return ((32 if m <= 32 else 64), (32 if n <= 32 else 64), _block_k(pw)), {}
    return cfg[:3], dict(num_warps=cfg[3], num_stages=cfg[4])


def _nhwc(pw, groups: int = 1) -> bool:
    """The channels-last conv kernel: per-channel weights, channels a multiple of 16 (whole int4 pairs per block; the
    first conv of a UNet, 4 channels, keeps the NCHW kernel)."""
    return _CONV_NHWC and groups == 1 and not _grouped(pw) and len(pw.shape) == 4 and pw.shape[1] % 16 == 0


def _cached(pw, key: str, build):
    """``build()``, kept in ``pw.cache[key]`` with the weight's device (``pw.cache`` is dropped on device moves,
    copies and state-dict loads, and counted by ``pw.nbytes()``; the device is checked all the same)."""
    hit = pw.cache.get(key)
    if hit is None or hit[0] != pw.device:
        hit = pw.cache[key] = (pw.device, build())
    return hit[1]


def _colsum(pw) -> torch.Tensor:
    """Column sums of the integer weights, int32 [N] per channel or [N, G] per group: the epilogue's correction for
    the activations' shift by 128 and their zero point."""
    def build():
        from . import ops

        q = ops.unpack_weight(pw).to(pw.device).reshape(pw.N, pw.K).to(torch.int32)
        if not _grouped(pw):
            return q.sum(1).contiguous()
        gs, g = pw.group_size, pw.num_groups
        return torch.nn.functional.pad(q, (0, g * gs - pw.K)).reshape(pw.N, g, gs).sum(2).contiguous()
    return _cached(pw, "triton.colsum", build)


def _nhwc_weight(pw):
    """(weights reordered to [N, KH, KW, C] and packed like the original, their row length in bytes) for the
    channels-last conv kernel: one more copy of the packed weight, the same size."""
    def build():
        from . import ops

        w = ops.unpack_weight(pw).to(pw.device).permute(0, 2, 3, 1).reshape(pw.N, pw.K).contiguous()
        if pw.bits <= 4:
            w = pack_int4(w)  # K = KH * KW * C is even (C % 16 == 0)
        return w, w.shape[1]
    return _cached(pw, "triton.nhwc", build)


def _weight_args(pw, nhwc: bool = False, integer: bool = True):
    """(qdata or its channels-last copy, scales, column sums (None for the weight-only kernel), row bytes, groups,
    group size, grouped)."""
    w, k_w = _nhwc_weight(pw) if nhwc else (pw.qdata, pw.qdata.shape[1])
    return (w, pw.scale.contiguous(), _colsum(pw) if integer else None, k_w, pw.num_groups, (pw.group_size or pw.K),
            _grouped(pw))


def _act_args(q, scale, zp, act):
    """The GEMM's activation-quantizer arguments (xs_ptr, xzp_ptr, s_static, zp_static): the per-row tensors of a
    dynamic quantizer (the constants unused), or a static one's constants (the pointers unused: ``q``)."""
    return (scale, zp, *_static_qparams(act)) if act.dynamic else (q, q, *_static_qparams(act))


@backend.op("linear", supports=_linear_supports, posts=("gelu", "gelu_tanh", "geglu"))
def linear(x, pw, bias=None, act=None, post=None):
    """``post`` (kernels/post.py) runs in the GEMM's epilogue, on the fp32 value before the one store (no second
    pass over the output); "geglu": each program's tile holds BN / 2 columns of the `a` half and the same columns of
    the gate half, so one dot of the usual width, and the output is written N / 2 wide."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.K).contiguous()
    m, n, k = x2.shape[0], pw.N, pw.K
    geglu = _post.check(post, n) == "geglu"
    n_out = n // 2 if geglu else n
    out = _out((m, n_out), x.device, x.dtype)
    b = bias.contiguous() if bias is not None else out
    (bm, bn, bk), opts = _tile_config(m, n, pw, integer=act is not None)
    grid = (_cdiv(m, bm), _cdiv(n_out, bn // 2 if geglu else bn))
    if act is None:
        w, ws, _, k_w, g, gs, grouped = _weight_args(pw, integer=False)
        kernel("wo_gemm")[grid](x2, w, ws, b, out, m, n, k, k_w, g, gs, W4=pw.bits <= 4, GROUPED=grouped,
                                HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32, POST=post or "",
                                BM=bm, BN=bn, BK=bk, **opts)
    else:
        w, ws, cs, k_w, g, gs, grouped = _weight_args(pw)
        fused = _FUSED_ACT and not act.dynamic
        q, sx, zp = (x2, None, None) if fused else quantize_rows(x2, act)
        kernel("int_gemm")[grid](q, w, ws, cs, b, out, *_act_args(q, sx, zp, act), m, n, k, k_w, g, gs, 1,
                                 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1,
                                 W4=pw.bits <= 4, GROUPED=grouped, IS_CONV=False, NHWC=False,
                                 STATIC_ACT=not act.dynamic, OUT_NHWC=False, HAS_BIAS=bias is not None,
                                 FUSED_A=fused, QMAX=act.qmax if fused else 0, POST=post or "", BM=bm, BN=bn,
                                 BK=bk, **opts)
    return out.reshape(*lead, n_out)


@backend.op("conv2d", supports=_conv_supports)
def conv2d(x, pw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, act=None):
    bsz, c, h, wd = x.shape
    kh, kw = pw.shape[2], pw.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    nhwc = _nhwc(pw, groups)
    # a channels-last input gives a channels-last output (as torch's conv keeps the memory format); the channels-last
    # kernel reads such an input as it lies (else from one transposing copy), the NCHW kernel from an NCHW copy
    out_nhwc = _channels_last(x)
    xr = x.permute(0, 2, 3, 1).contiguous() if nhwc else x.contiguous()
    q, sx, zp = quantize_rows(xr.reshape(bsz, -1), act)
    m, n, k = bsz * ho * wo, pw.N, pw.K
    w, ws, cs, k_w, g, gs, grouped = _weight_args(pw, nhwc)
    if out_nhwc:
        out = _out((bsz, ho, wo, n), x.device, x.dtype).permute(0, 3, 1, 2)
    else:
        out = _out((bsz, n, ho, wo), x.device, x.dtype)
    b = bias.contiguous() if bias is not None else out
    (bm, bn, bk), opts = _tile_config(m, n, pw, gather=not nhwc)
    grid = (_cdiv(m, bm), _cdiv(n, bn))
    kernel("int_gemm")[grid](q, w, ws, cs, b, out, *_act_args(q, sx, zp, act), m, n, k, k_w, g, gs, ho * wo,
                             c, h, wd, ho, wo, kh, kw, stride[0], stride[1], padding[0], padding[1],
                             dilation[0], dilation[1], _cdiv(c, bk),
                             W4=pw.bits <= 4, GROUPED=grouped, IS_CONV=True, NHWC=nhwc, STATIC_ACT=not act.dynamic,
                             OUT_NHWC=out_nhwc, HAS_BIAS=bias is not None, FUSED_A=False, QMAX=0, POST="",
                             BM=bm, BN=bn, BK=bk, **opts)
    return out
