"""GPU check, ready to run on a CUDA machine (issue 16, item 3).

    python -m lowbit.bench.gpu_check [--out bench/results/gpu_check.json] [--budget 420] [--no-unet]

On a CUDA machine, in one process and within ``--budget`` seconds (default 7 minutes):

1. **Correctness**: the Triton kernels' cases of ``tests/kernels/test_triton.py`` (bit-exact activation
   quantization, masked Linear shapes with int4/int8/int2 and group-wise weights, strided/dilated/batched/bf16
   Conv2d; the GELU / GEGLU epilogues fused in the Linear GEMMs) plus SD-sized Linear and Conv2d, run on the GPU
   (no ``TRITON_INTERPRET``) against the eager reference on the same GPU (TF32 off).
2. **Kernel timings** at SD1.5 (512x512, batch 2) and SDXL (1024x1024, batch 2) shapes: Linear and 3x3 Conv2d in
   W8A8, W4A8, W4A4 (4-bit weights unpacked in registers, int8 MMA: Triton has no int4 MMA) and W4A16
   (Linear only; the Triton backend has no weight-only conv), against torch bf16 (cuBLAS / cuDNN) and
   ``torch._int_mm`` (int8 GEMM alone; for a conv at its implicit-GEMM shape M = B*Ho*Wo, K = C*kh*kw).
   Then a **tile sweep** (``--no-tiles`` skips it): W8A8 and W4A8 at the largest SD1.5 / SDXL Linear and conv
   shapes under the tile configurations of ``TILE_CONFIGS``.
3. **Whole UNet**: an SD1.5-architecture ``UNet2DConditionModel`` (random weights, latent 64, batch 2, text
   77x768) in bf16 and deployed W8A8 / W4A8 through ``lowbit.quant`` (min/max ranges from one recorded call;
   float parts in bf16), each with the triton kernels everywhere and as ``deploy_`` deploys by default
   (``-tuned``: each layer's kernel chosen by measured speed, the float path of the same weights where the integer
   kernel loses, copies within the 64 MiB budget; runs 5-7 were measured before the budget, with no bound).
   The kernel table and the UNet rows are also timed replayed from CUDA graphs (GPU time without the host's
   launch overhead); before its UNet capture each model runs once under ``torch.cuda.set_sync_debug_mode("error")``,
   and the row names where the forward makes the host wait (``sync_point``), which a graph cannot hold.
   On an H200 the whole check took 128 s (2026-12-04; results/gpu_check.json).

Prints ratio tables (time / bf16 time: < 1 is faster) and writes JSON. Without CUDA it prints one line and
exits 0. Setup on a fresh machine (bench/README.md): ``pip install torch triton diffusers safetensors && pip
install -e . --no-deps``.

Everything that needs no GPU (shape lists, the timing driver with an injected timer, the ratio table, the JSON
file) is plain Python and tested on CPU (``tests/bench/test_gpu_check.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
SKIP_MESSAGE = ("gpu_check: skipped, no CUDA device (torch.cuda.is_available() is False); run it on a CUDA "
                "machine: python -m lowbit.bench.gpu_check")


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class LinearCase:
    model: str
    name: str
    M: int  # tokens (batch included)
    K: int
    N: int

    @property
    def kind(self):
        return "linear"

    def flops(self) -> float:
        return 2.0 * self.M * self.K * self.N


@dataclass(frozen=True)
class ConvCase:
    model: str
    name: str
    B: int
    C: int
    H: int
    W: int
    N: int
    k: int = 3

    @property
    def kind(self):
        return "conv"

    def gemm_shape(self):
        """(M, K, N) of the implicit GEMM (stride 1, same padding)."""
        return self.B * self.H * self.W, self.C * self.k * self.k, self.N

    def flops(self) -> float:
        m, k, n = self.gemm_shape()
        return 2.0 * m * k * n


def linear_cases(batch: int = 2) -> List[LinearCase]:
    """Linear layers of SD1.5 (512x512: latent 64, tokens 4096 / 1024 / 256, text 77x768) and SDXL
    (1024x1024: latent 128, attention at 64x64 and 32x32, text 77x2048), ``batch`` images (2 = CFG)."""
    b = batch
    return [
        LinearCase("sd15", "attn q/k/v/o 4096x320", b * 4096, 320, 320),
        LinearCase("sd15", "ff geglu 4096x320->2560", b * 4096, 320, 2560),
        LinearCase("sd15", "ff out 4096x1280->320", b * 4096, 1280, 320),
        LinearCase("sd15", "attn 1024x640", b * 1024, 640, 640),
        LinearCase("sd15", "attn 256x1280", b * 256, 1280, 1280),
        LinearCase("sd15", "cross k/v 77x768->320", b * 77, 768, 320),
        LinearCase("sdxl", "attn 4096x640", b * 4096, 640, 640),
        LinearCase("sdxl", "ff geglu 4096x640->5120", b * 4096, 640, 5120),
        LinearCase("sdxl", "ff out 4096x2560->640", b * 4096, 2560, 640),
        LinearCase("sdxl", "attn 1024x1280", b * 1024, 1280, 1280),
        LinearCase("sdxl", "ff geglu 1024x1280->10240", b * 1024, 1280, 10240),
        LinearCase("sdxl", "cross k/v 77x2048->1280", b * 77, 2048, 1280),
    ]


def conv_cases(batch: int = 2) -> List[ConvCase]:
    """3x3 convolutions (ResNet blocks) of SD1.5 at latent 64 and SDXL at latent 128."""
    b = batch
    return [
        ConvCase("sd15", "conv 320@64x64", b, 320, 64, 64, 320),
        ConvCase("sd15", "conv 640@32x32", b, 640, 32, 32, 640),
        ConvCase("sd15", "conv 1280@16x16", b, 1280, 16, 16, 1280),
        ConvCase("sd15", "conv 1280@8x8", b, 1280, 8, 8, 1280),
        ConvCase("sdxl", "conv 320@128x128", b, 320, 128, 128, 320),
        ConvCase("sdxl", "conv 640@64x64", b, 640, 64, 64, 640),
        ConvCase("sdxl", "conv 1280@32x32", b, 1280, 32, 32, 1280),
    ]


# Our formats: name -> (weight bits, activation bits or None, weight group size or None)
FORMATS = {
    "W8A8": (8, 8, None),
    "W4A8": (4, 8, None),
    "W4A4": (4, 4, None),
    "W4A16": (4, None, 64),
}
BASELINE = "bf16"


# ------------------------------------------------------------------------------------------------ timing driver
def median_timer_factory(sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter,
                         warmup: int = 3, min_iters: int = 5, max_iters: int = 50, min_time: float = 0.2):
    """A timer ``timer(fn) -> seconds per call`` (median of batches), synchronising with ``sync`` around each."""

    def timer(fn):
        for _ in range(warmup):
            fn()
        sync()
        times = []
        t_total = 0.0
        while len(times) < min_iters or (t_total < min_time and len(times) < max_iters):
            t0 = clock()
            fn()
            sync()
            dt = clock() - t0
            times.append(dt)
            t_total += dt
        return statistics.median(times)

    return timer


def run_timings(cases, variants: Dict[str, Callable], timer: Callable[[Callable], float],
                deadline: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                log: Callable[[str], None] = print) -> List[dict]:
    """Time every variant on every case.

    variants : name -> ``make(case) -> fn | None`` (None: the variant does not apply, e.g. weight-only conv);
               ``make`` may raise: the error is recorded in the row, the other variants still run.
    returns  : one row per (case, variant): dict(model, case, kind, variant, seconds | error | skipped, tops)
    """
    rows = []
    for case in cases:
        for vname, make in variants.items():
            row = dict(model=case.model, case=case.name, kind=case.kind, variant=vname)
            if deadline is not None and clock() > deadline:
                row["skipped"] = "time budget spent"
                rows.append(row)
                continue
            try:
                fn = make(case)
                if fn is None:
                    row["skipped"] = "not applicable"
                else:
                    s = float(timer(fn))
                    row["seconds"] = s
                    row["tops"] = case.flops() / s / 1e12 if s > 0 else None
            except Exception as exc:  # one failing variant must not hide the others
                row["error"] = _error_line(exc)
            rows.append(row)
        log("  " + case.model + " " + case.name + ": " + ", ".join(
            f"{r['variant']} {r['seconds'] * 1e3:.3f} ms" if "seconds" in r else f"{r['variant']} -"
            for r in rows if r["case"] == case.name and r["model"] == case.model))
    add_ratios(rows)
    return rows


def add_ratios(rows: List[dict], baseline: str = BASELINE, second: str = "int_mm") -> List[dict]:
    """Adds ``x_<baseline>`` and ``x_<second>`` (time / that variant's time on the same case) to every timed row."""
    by_case = {}
    for r in rows:
        if "seconds" in r:
            by_case.setdefault((r["model"], r["case"]), {})[r["variant"]] = r["seconds"]
    for r in rows:
        if "seconds" not in r:
            continue
        ref = by_case[(r["model"], r["case"])]
        for b in (baseline, second):
            if b in ref and ref[b] > 0:
                r[f"x_{b}"] = r["seconds"] / ref[b]
    return rows


def ratio_table(rows: List[dict], baseline: str = BASELINE) -> str:
    """Markdown table: one line per case, one column per variant, ``ms (x baseline)``."""
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    cases = []
    for r in rows:
        key = (r["model"], r["case"])
        if key not in cases:
            cases.append(key)
    cell = {(r["model"], r["case"], r["variant"]): r for r in rows}
    lines = ["| model | case | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for model, case in cases:
        vals = []
        for v in variants:
            r = cell.get((model, case, v))
            if r is None:
                vals.append("")
            elif "seconds" in r:
                x = r.get(f"x_{baseline}")
                vals.append(f"{r['seconds'] * 1e3:.3f} ms" + (f" ({x:.2f})" if x is not None else ""))
            elif "error" in r:
                vals.append("error")
            else:
                vals.append("-")
        lines.append(f"| {model} | {case} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _error_line(exc: BaseException) -> str:
    """``<Type>: <first line of the message>``, at most 300 characters, for a row that failed."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def write_json(path, report: dict) -> Path:
    """Writes ``report`` as indented JSON (parents created; a temporary file renamed, so no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ GPU parts
def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def correctness_checks(device="cuda", tol: float = 1e-4, large: bool = True) -> List[dict]:
    """The Triton cases of tests/kernels/test_triton.py (and, with ``large``, SD-sized ones) on ``device`` against
    eager there. (On CPU under TRITON_INTERPRET=1 with ``large=False``, this is what the test suite runs.)"""
    import torch

    from ..kernels import ActQuant, ops
    from ..kernels import triton_gpu
    from ..kernels.eager import quantize_act

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    results = []

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, _error_line(exc)
        results.append(dict(check=name, ok=bool(ok), detail=detail, seconds=time.perf_counter() - t0))

    for act in (ActQuant(8, 0.02, 131), ActQuant(8, dynamic=True), ActQuant(4, dynamic=True), ActQuant(3, 0.25, 2)):
        def aq(act=act):
            x = rnd(37, 300) * torch.rand(37, 1, generator=g).to(device) * 3
            x[0] = 0.0
            x[1, :4] = torch.tensor([0.01, 0.03, -0.01, 0.05], device=device)
            q, scale, zp = triton_gpu.quantize_rows(x.contiguous(), act)
            q_ref, s_ref, z_ref = quantize_act(x, act, "token")
            diff = int(((q.float() + 128) != q_ref).sum())
            ok = diff == 0 and (not act.dynamic or (torch.equal(scale, s_ref) and torch.equal(zp, z_ref)))
            return ok, f"{diff} of {q.numel()} codes differ"
        record(f"act_quant bit-exact {act}", aq)

    lin = [(45, 131, 70, 4, None), (45, 131, 70, 4, 64), (45, 131, 70, 8, 32), (45, 131, 70, 2, None),
           (2 * 4096, 320, 320, 8, None), (2 * 1024, 640, 640, 4, None),
           (2 * 77, 768, 320, 4, 64)][:None if large else 4]
    for m, k, n, wbits, gs in lin:
        for act in (ActQuant(8, dynamic=True), ActQuant(8, 0.05, 128), ActQuant(4, dynamic=True), None):
            def lc(m=m, k=k, n=n, wbits=wbits, gs=gs, act=act):
                x = rnd(m, k)
                pw = ops.quantize_weight(rnd(n, k) * 0.05, wbits, gs)
                bias = rnd(n)
                ref = ops.run_on("eager", "linear", x, pw, bias, act)
                out = ops.run_on("triton", "linear", x, pw, bias, act)
                e = _rel_err(out, ref)
                return e < tol and out.shape == ref.shape, f"rel err {e:.2e}"
            record(f"linear {m}x{k}x{n} W{wbits} g{gs} act={act}", lc)
        # the experimental one-launch path (static activations quantized inside the GEMM): the same codes
        for act in (ActQuant(8, 0.05, 128), ActQuant(4, 0.3, 5)):
            def lf(m=m, k=k, n=n, wbits=wbits, gs=gs, act=act):
                x = rnd(m, k)
                pw = ops.quantize_weight(rnd(n, k) * 0.05, wbits, gs)
                bias = rnd(n)
                ref = ops.run_on("eager", "linear", x, pw, bias, act)
                with triton_gpu.fused_act_quant():
                    out = ops.run_on("triton", "linear", x, pw, bias, act)
                e = _rel_err(out, ref)
                return e < tol and out.shape == ref.shape, f"rel err {e:.2e}"
            record(f"linear fused-act {m}x{k}x{n} W{wbits} g{gs} act={act}", lf)

    # activation epilogues fused in the GEMMs (kernels/post.py): gelu / gelu_tanh / geglu against eager followed by
    # the torch activation; on a GPU tl.exp is the fast approximate exponential, so gelu_tanh is checked at tol too
    from ..kernels import post as _post

    epi = [(45, 131, 70, 8, None), (45, 131, 70, 4, 64)] + ([(2 * 4096, 320, 2560, 8, None)] if large else [])
    for m, k, n, wbits, gs in epi:
        for act in (ActQuant(8, 0.05, 128), ActQuant(8, dynamic=True), None):
            for p in sorted(_post.POSTS):
                def le(m=m, k=k, n=n, wbits=wbits, gs=gs, act=act, p=p):
                    x = rnd(m, k)
                    pw = ops.quantize_weight(rnd(n, k) * 0.05, wbits, gs)
                    bias = rnd(n)
                    ref = _post.apply(ops.run_on("eager", "linear", x, pw, bias, act), p)
                    out = triton_gpu.linear(x, pw, bias, act, post=p)
                    e = _rel_err(out, ref)
                    return e < tol and out.shape == ref.shape, f"rel err {e:.2e}"
                record(f"linear {m}x{k}x{n} W{wbits} g{gs} act={act} post={p}", le)

    if large:
        # bf16 activations (a deployed layer in a bf16 model): the weight-only kernel multiplies in bf16 (tl.dot
        # bf16 x bf16), which the Triton interpreter computes wrongly, so only a GPU checks it
        for m, k, n, wbits, gs in [(45, 131, 70, 4, None), (2 * 77, 768, 320, 4, 64), (2 * 1024, 640, 640, 8, None)]:
            for act in (None, ActQuant(8, dynamic=True)):
                def lb(m=m, k=k, n=n, wbits=wbits, gs=gs, act=act):
                    x = rnd(m, k).to(torch.bfloat16)
                    pw = ops.quantize_weight(rnd(n, k) * 0.05, wbits, gs)
                    bias = rnd(n)
                    ref = ops.run_on("eager", "linear", x, pw, bias, act)
                    out = ops.run_on("triton", "linear", x, pw, bias, act)
                    e = _rel_err(out.float(), ref.float())
                    return e < 1e-2 and out.shape == ref.shape and out.dtype == torch.bfloat16, f"rel err {e:.2e}"
                record(f"linear bf16 {m}x{k}x{n} W{wbits} g{gs} act={act}", lb)

    # fake quantization in one pass (the dense path's activations on CUDA): the reference's values bit for bit.
    # (The Triton interpreter, on CPU, casts fp32 to bf16 by truncation where a GPU rounds to nearest even: there
    # bf16 values may differ by one bf16 step.)
    # A channels-last input keeps its layout, as the reference's elementwise ops keep it.
    for dt, cl in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        for act in (ActQuant(8, 0.02, 131), ActQuant(8, dynamic=True)):
            def fq(dt=dt, act=act, cl=cl):
                x = (rnd(2, 16, 5, 6) * 2).to(dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = ops.run_on("triton", "fake_quant_act", x, act, "sample")
                ref = ops.run_on("eager", "fake_quant_act", x, act, "sample")
                if cl and not out.is_contiguous(memory_format=torch.channels_last):
                    return False, "channels-last input, output not channels-last"
                diff = int((out != ref).sum())
                if device != "cuda" and dt == torch.bfloat16:
                    step = float(((out.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-30)).max())
                    return step <= 2 ** -7 and out.dtype == dt, f"{diff} values differ, at most {step:.1e} relative"
                return diff == 0 and out.dtype == dt, f"{diff} of {out.numel()} values differ"
            record(f"fake_quant_act {dt}{' channels-last' if cl else ''} act={act}", fq)

    # C = 5: the NCHW kernel; C % 16 == 0 with per-channel weights: the channels-last (NHWC) kernel
    convs = [((2, 5, 8, 7), (24, 5, 3, 3), 4, 32, (1, 2), (2, 1), (2, 1), torch.float32),
             ((2, 5, 8, 7), (24, 5, 3, 3), 4, 32, (1, 1), (1, 1), (1, 1), torch.bfloat16),
             ((2, 16, 9, 7), (24, 16, 3, 3), 8, None, (1, 2), (1, 1), (2, 1), torch.float32),
             ((1, 48, 6, 5), (40, 48, 3, 3), 4, None, (1, 1), (1, 1), (1, 1), torch.bfloat16),
             ((2, 320, 64, 64), (320, 320, 3, 3), 8, None, (1, 1), (1, 1), (1, 1), torch.float32),
             ((2, 640, 32, 32), (640, 640, 3, 3), 4, None, (1, 1), (1, 1), (1, 1), torch.float32),
             ((2, 320, 64, 64), (320, 320, 3, 3), 8, None, (2, 2), (1, 1), (1, 1),
              torch.float32)][:None if large else 4]
    for xs, ws, wbits, gs, st, pad, dil, dt in convs:
        for act in (ActQuant(8, dynamic=True), ActQuant(8, 0.05, 128)):
            def cc(xs=xs, ws=ws, wbits=wbits, gs=gs, st=st, pad=pad, dil=dil, dt=dt, act=act):
                x = rnd(*xs).to(dt)
                pw = ops.quantize_weight(rnd(*ws) * 0.05, wbits, gs)
                bias = rnd(ws[0])
                ref = ops.run_on("eager", "conv2d", x, pw, bias, st, pad, dil, 1, act)
                out = ops.run_on("triton", "conv2d", x, pw, bias, st, pad, dil, 1, act)
                e = _rel_err(out.float(), ref.float())
                # cuDNN may pick Winograd/FFT for the fp32 reference (error ~1e-5..1e-4): a looser bound than
                # Linear's; a wrong kernel is off by 1e-2 or more
                lim = 1e-2 if dt == torch.bfloat16 else 5 * tol
                return e < lim and out.shape == ref.shape and out.dtype == dt, f"rel err {e:.2e}"
            record(f"conv x{list(xs)} w{list(ws)} W{wbits} g{gs} s{st} p{pad} d{dil} {dt} act={act}", cc)

    # the two conv kernels sum the same int32 products: equal outputs, also for a channels-last input (whose output
    # is channels-last too, as torch's conv keeps the memory format; C = 5 and group-wise weights: the NCHW kernel)
    for wbits, c, gs in ((8, 32, None), (4, 32, None), (4, 5, 32)):
        def lay(wbits=wbits, c=c, gs=gs):
            x = rnd(2, c, 7, 9)
            pw = ops.quantize_weight(rnd(24, c, 3, 3) * 0.05, wbits, gs)
            args = (rnd(24), (1, 1), (1, 1), (1, 1), 1, ActQuant(8, dynamic=True))
            nhwc = ops.run_on("triton", "conv2d", x, pw, *args)
            cl = ops.run_on("triton", "conv2d", x.contiguous(memory_format=torch.channels_last), pw, *args)
            with triton_gpu.conv_layout(nhwc=False):
                nchw = ops.run_on("triton", "conv2d", x, pw, *args)
            same = (torch.equal(nhwc, nchw) and torch.equal(cl, nchw) and nhwc.is_contiguous()
                    and cl.is_contiguous(memory_format=torch.channels_last))
            return same, "equal" if same else f"max diff {float((nhwc - nchw).abs().max()):.2e}"
        record(f"conv NHWC == NCHW kernel W{wbits} C{c} g{gs}", lay)
    return results


def cuda_graphed(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream): its replay runs the same kernels
    without Python and launch overhead, so the timing shows what the GPU itself spends."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_variants(device="cuda", graphs: bool = False):
    """name -> make(case) -> fn for the kernel timing table (inputs built once per case, outside the timing)."""
    import torch
    import torch.nn.functional as F

    from ..kernels import ActQuant, ops

    def data(case):
        g = torch.Generator(device="cpu").manual_seed(0)
        if case.kind == "linear":
            x = torch.randn(case.M, case.K, generator=g).to(device)
            w = (torch.randn(case.N, case.K, generator=g) * 0.05).to(device)
        else:
            x = torch.randn(case.B, case.C, case.H, case.W, generator=g).to(device)
            w = (torch.randn(case.N, case.C, case.k, case.k, generator=g) * 0.05).to(device)
        return x, w, torch.randn(case.N, generator=g).to(device)

    def bf16(case):
        x, w, b = (t.to(torch.bfloat16) for t in data(case))
        if case.kind == "linear":
            return lambda: F.linear(x, w, b)
        return lambda: F.conv2d(x, w, b, 1, case.k // 2)

    def int_mm(case):
        m, k, n = (case.M, case.K, case.N) if case.kind == "linear" else case.gemm_shape()
        a = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=device)
        bt = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, bt.t())

    def ours(fmt, fused=False):
        wbits, abits, gs = FORMATS[fmt]

        def make(case):
            x, w, b = data(case)
            if case.kind == "conv" and abits is None:
                return None  # no weight-only conv kernel in the triton backend
            pw = ops.quantize_weight(w, wbits, gs)
            # static activation quantizer (one scale, as deployed W8A8 / W4A4 layers with calibrated ranges)
            act = None if abits is None else ActQuant(abits, float(x.abs().max()) * 2 / ((1 << abits) - 1),
                                                      (1 << (abits - 1)))
            xb = x.to(torch.bfloat16)  # deployed layers in a bf16 model receive bf16 activations
            if case.kind == "linear" and fused:
                from ..kernels import triton_gpu

                return _inside(triton_gpu.fused_act_quant, lambda: ops.run_on("triton", "linear", xb, pw, b, act))
            if case.kind == "linear":
                return lambda: ops.run_on("triton", "linear", xb, pw, b, act)
            if fused:
                return None  # Linear only
            return lambda: ops.run_on("triton", "conv2d", xb, pw, b, (1, 1), (case.k // 2,) * 2, (1, 1), 1, act)

        return make

    v = {"bf16": bf16, "int_mm": int_mm}
    for fmt in FORMATS:
        v[fmt] = ours(fmt)
    v["W8A8 fused-act"] = ours("W8A8", fused=True)  # one launch per call (experimental, off by default)
    if graphs:  # the same calls replayed from CUDA graphs: GPU time without the Python / launch overhead
        def graphed(make):
            def make_graphed(case):
                fn = make(case)
                return None if fn is None else cuda_graphed(fn)
            return make_graphed

        for name in ("bf16", "W8A8", "W4A8", "W8A8 fused-act"):
            v[name + " graph"] = graphed(v[name])
    return v


# (BM, BN, BK, num_warps, num_stages): the kernels' default for small problems, their default for large ones
# (kernels/triton_gpu.py _LARGE_TILES, chosen from this sweep: bench/README.md), the previous large default, two more
TILE_CONFIGS = [(64, 64, 64, 4, 3), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4),
                (128, 256, 64, 8, 4)]


def tile_cases() -> list:
    """The cases of the tile sweep: the largest SD1.5 / SDXL Linear and 3x3 conv shapes."""
    pick = {("sd15", "ff geglu 4096x320->2560"), ("sdxl", "ff geglu 1024x1280->10240"),
            ("sd15", "conv 320@64x64"), ("sdxl", "conv 640@64x64")}
    return [c for c in linear_cases() + conv_cases() if (c.model, c.name) in pick]


def tile_variants(device="cuda", formats=("W8A8", "W4A8"), configs=None, graphs: bool = False):
    """name -> make(case) for the tile sweep: each of ``formats`` under each tile configuration
    (``kernels.triton_gpu.tiles``), for convolutions also with the NCHW kernel instead of the channels-last one
    (``conv_layout``), plus bf16 as the baseline. Names: ``<fmt> <BM>x<BN>x<BK> w<warps> s<stages>[ nchw]``.
    ``graphs``: each call replayed from a CUDA graph (kernel time without the host's launch overhead)."""
    from ..kernels import triton_gpu

    base = kernel_variants(device)
    v = {"bf16": (lambda case: cuda_graphed(base["bf16"](case))) if graphs else base["bf16"]}
    for fmt in formats:
        for cfg in (configs or TILE_CONFIGS):
            for nhwc in (True, False):
                def make(case, fmt=fmt, cfg=cfg, nhwc=nhwc):
                    fn = base[fmt](case)
                    if fn is None or (not nhwc and case.kind != "conv"):
                        return None

                    call = _inside(lambda: triton_gpu.tiles(*cfg), _inside(lambda: triton_gpu.conv_layout(nhwc), fn))
                    return cuda_graphed(call) if graphs else call
                v[f"{fmt} {cfg[0]}x{cfg[1]}x{cfg[2]} w{cfg[3]} s{cfg[4]}" + ("" if nhwc else " nchw")] = make
    return v


def host_cost_variants(device="cuda") -> Dict[str, Callable[[], object]]:
    """name -> fn: calls whose GPU work is negligible (a 16x64 input), so that back-to-back calls without
    synchronisation measure what the host spends per call: Python, allocation, the Triton launcher. The two empty
    Triton kernels (2 and 38 arguments, like the integer GEMM's) separate the launcher's cost from ours."""
    import torch
    import torch.nn.functional as F
    import triton

    from ..kernels import ActQuant, ops, triton_gpu
    from ._empty_kernels import empty_2, empty_38

    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    pw = ops.quantize_weight(w.float(), 8)
    act = ActQuant(8, 0.05, 128)
    buf = torch.zeros(64, device=device)
    k2, k38 = triton.jit(empty_2), triton.jit(empty_38)
    ints = list(range(3, 26))
    return {
        "bf16 F.linear": lambda: F.linear(x, w),
        "torch.empty": lambda: torch.empty(16, 64, device=device),
        "empty triton kernel, 2 args": lambda: k2[(1,)](buf, 64),
        "empty triton kernel, 38 args": lambda: k38[(1,)](*([buf] * 8), 1.0, 2.0, *ints, C0=1, C1=2, C2=3, C3=4,
                                                         C4=5),
        "act quant (quantize_rows)": lambda: triton_gpu.quantize_rows(x, act),
        "W8A8 linear (triton)": lambda: ops.run_on("triton", "linear", x, pw, None, act),
        "W8A8 linear (dense: fake quant + F.linear)": lambda: ops.run_on("dense", "linear", x, pw, None, act),
        "W8A8 linear (triton, activation quantizer fused, one launch)": _inside(
            triton_gpu.fused_act_quant, lambda: ops.run_on("triton", "linear", x, pw, None, act)),
    }


def _inside(make_ctx, fn):
    """A zero-argument function calling ``fn`` inside the context ``make_ctx()`` (a kernel-launch override such as
    ``triton_gpu.tiles``), entered at every call."""
    def call():
        with make_ctx():
            return fn()
    return call


def host_costs(device="cuda", calls: int = 200, sync=None) -> Dict[str, float]:
    """Seconds per call of each :func:`host_cost_variants` entry: ``calls`` back-to-back calls, one sync at the end
    (best of three)."""
    sync = sync or (lambda: None)
    out = {}
    for name, fn in host_cost_variants(device).items():
        best = float("inf")
        for _ in range(3):
            for _ in range(5):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best = min(best, (time.perf_counter() - t0) / calls)
        out[name] = best
    return out


def host_profile(fn, calls: int = 3, top: int = 12) -> List[str]:
    """The ``top`` functions by own time over ``calls`` calls of ``fn`` (cProfile), one line each."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    lines = [line.strip() for line in text.getvalue().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("ncalls")), len(lines))
    return [line for line in lines[start:start + top + 1] if line]


def unet_timings(timer, device="cuda", latent: int = 64, batch: int = 2,
                 formats=("W8A8", "W4A8", "W8A8-tuned", "W4A8-tuned", "bf16-cl", "W8A8-tuned-cl"),
                 deadline: Optional[float] = None, log=print, build=None, text_dim: int = 768,
                 graphs: bool = False, profile: bool = False) -> List[dict]:
    """Whole SD1.5-architecture UNet forward: bf16 and our deployed formats (float parts bf16).
    A format named ``<fmt>-tuned`` is deployed as ``deploy_`` does by default (each layer's kernel chosen by measured
    speed, the float path of the same quantized weights where the integer kernel loses, its copies within the 64 MiB
    copy budget; the row reports the choice), ``<fmt>-tuned-unbounded`` with no copy budget (``copy_budget_mb=None``:
    how the tuned rows were measured before the budget existed, runs 5-7);
    the others take the registry's kernels (triton on CUDA) everywhere. A name ending ``-cl`` runs the model and its
    input in ``torch.channels_last`` memory format (cuDNN's and the channels-last conv kernel's native layout).
    ``build`` (default: bench_unet.build_unet, SD1.5) makes the float model once (copied per variant); tests
    pass a tiny one. ``graphs`` (CUDA): after all rows, each model's forward is first run once with
    ``torch.cuda.set_sync_debug_mode("error")`` (``sync_point``: where it synchronises with the host, which a graph
    cannot hold), then timed replayed from a CUDA graph (``graph_seconds``). A failed capture can leave the CUDA
    state unusable, hence last. ``profile``: the W8A8 rows also keep a host profile of eager forwards
    (``host_profile``)."""
    import copy

    import torch

    from ..kernels import autotune

    from ..quant import CallRecorder, QuantConfig, deploy_, quantize_
    from .bench_unet import build_unet

    build = build or build_unet
    cuda = torch.device(device).type == "cuda"

    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.tensor([500.0] * batch, device=device)
    text = torch.randn(batch, 77, text_dim, generator=g).to(device)
    rows = []
    ref = None
    kept = []  # (row, model, input) for the CUDA graph timings after all rows
    base_model = build()
    for name in ("bf16", *(f for f in formats if f != "bf16")):
        if deadline is not None and time.monotonic() > deadline:
            rows.append(dict(variant=name, skipped="time budget spent"))
            continue
        row = dict(variant=name)
        model = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # earlier rows' models, kept for the graph timings
            t0 = time.perf_counter()
            model = copy.deepcopy(base_model).to(device)
            fmt, *flags = name.split("-")
            tuned, cl = "tuned" in flags, "cl" in flags
            if fmt != "bf16":
                cfg = QuantConfig.preset(fmt, w_init="minmax", a_init="minmax")
                with CallRecorder(model, store_dtype=torch.float32) as rec, torch.no_grad():
                    model(sample, t, encoder_hidden_states=text)
                quantize_(model, cfg, calib=rec.calls)
                deploy_(model, tune=tuned, **(dict(copy_budget_mb=None) if "unbounded" in flags else {}))
            model = model.to(torch.bfloat16)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            row["setup_s"] = time.perf_counter() - t0
            if cuda:  # the setup (fp32 copy, calibration, quantization) peaks higher than the model runs
                row["setup_peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated() - resident)
                torch.cuda.reset_peak_memory_stats()
            xs, xt = sample.to(torch.bfloat16), text.to(torch.bfloat16)
            if cl:
                xs = xs.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                out = model(xs, t, encoder_hidden_states=xt).sample.float()  # tuned: the per-layer choice
                if cuda:  # the model on the GPU, with what its first forward cached (kernel-side weight forms)
                    row["model_gpu_bytes"] = int(torch.cuda.memory_allocated() - resident - out.numel() * 4)
                if tuned:
                    summ = autotune.summary(model)
                    row["kernels"] = dict(layers=summ["layers"], untuned=summ["untuned"],
                                          over_budget=summ["over_budget"], float_copy_bytes=summ["dense_bytes"])
                row["seconds"] = float(timer(lambda m=model: m(xs, t, encoder_hidden_states=xt)))
                if profile and name in ("W8A8", "W8A8-tuned"):  # where the host spends an eager forward
                    row["host_profile"] = host_profile(lambda m=model: m(xs, t, encoder_hidden_states=xt))
            if graphs:
                kept.append((row, model, xs))
            if cuda:  # the forwards' peak, model included
                row["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated() - resident)
            if name == "bf16":
                ref = out
            elif ref is not None:
                row["rel_err_vs_bf16"] = _rel_err(out, ref)
        except Exception as exc:
            row["error"] = _error_line(exc)
            log(traceback.format_exc(limit=3))
        finally:
            del model
        rows.append(row)
        log(f"  unet {name}: " + (f"{row['seconds'] * 1e3:.1f} ms/forward" if "seconds" in row
                                  else row.get("error", row.get("skipped", ""))))
    for row, model, xs in kept:
        if deadline is not None and time.monotonic() > deadline:
            row["graph_error"] = "time budget spent"
            continue
        fwd = (lambda m=model, xs=xs: m(xs, t, encoder_hidden_states=xt))
        with torch.no_grad():
            try:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fwd()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            except Exception as exc:
                frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                          for f in traceback.extract_tb(exc.__traceback__)[-4:]]
                row["sync_point"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]} at " + " <- ".join(
                    reversed(frames))
            try:
                row["graph_seconds"] = float(timer(cuda_graphed(fwd)))
            except Exception as exc:
                row["graph_error"] = _error_line(exc)
        log(f"  unet {row['variant']} CUDA graph: " + (f"{row['graph_seconds'] * 1e3:.1f} ms/forward"
                                                       if "graph_seconds" in row else row["graph_error"])
            + (f"; host sync: {row['sync_point']}" if "sync_point" in row else ""))
    del kept
    base = next((r["seconds"] for r in rows if r["variant"] == "bf16" and "seconds" in r), None)
    gbase = next((r["graph_seconds"] for r in rows if r["variant"] == "bf16" and "graph_seconds" in r), None)
    for r in rows:
        if base and "seconds" in r:
            r["x_bf16"] = r["seconds"] / base
        if gbase and "graph_seconds" in r:
            r["graph_x_bf16"] = r["graph_seconds"] / gbase
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--budget", type=float, default=420.0, help="seconds for everything after setup (default 420)")
    p.add_argument("--no-unet", action="store_true", help="skip the whole-UNet forward")
    p.add_argument("--no-tiles", action="store_true", help="skip the tile sweep of the integer GEMM kernels")
    p.add_argument("--only", choices=["linear", "conv"], default=None)
    a = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: skipped, torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        print("gpu_check: triton is not installed; pip install triton (it ships with CUDA torch wheels)")
        return 1
    start = time.monotonic()
    deadline = start + a.budget
    from .. import kernels  # noqa: F401  (registers the triton backend)
    from ..kernels import registry

    if "triton" not in [b.name for b in registry.backends()]:
        print("gpu_check: the triton backend did not register (see the warning above); fix the triton install")
        return 1
    dev = torch.cuda.get_device_properties(0)
    meta = dict(gpu=dev.name, capability=f"sm_{dev.major}{dev.minor}", torch=torch.__version__,
                triton=__import__("triton").__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), budget_s=a.budget)
    print(f"gpu_check on {dev.name} ({meta['capability']}), torch {meta['torch']}, triton {meta['triton']}")
    report = dict(meta=meta)

    print("1. correctness (triton on GPU vs eager on GPU)")
    checks = correctness_checks("cuda")
    report["correctness"] = checks
    bad = [c for c in checks if not c["ok"]]
    print(f"   {len(checks) - len(bad)}/{len(checks)} passed")
    for c in bad:
        print(f"   FAILED {c['check']}: {c['detail']}")
    write_json(a.out, report)

    timer = median_timer_factory(torch.cuda.synchronize)
    variants = kernel_variants("cuda", graphs=True)
    print("2. kernels (ms per call, ratio to bf16)")
    cases = ([] if a.only == "conv" else linear_cases()) + ([] if a.only == "linear" else conv_cases())
    unet_reserve = 0 if a.no_unet else 150.0
    tile_reserve = 0 if a.no_tiles else 60.0
    rows = run_timings(cases, variants, timer, deadline=deadline - unet_reserve - tile_reserve)
    report["kernels"] = rows
    print(ratio_table(rows))
    write_json(a.out, report)

    if not a.no_tiles:
        print("2b. tile sweep of the integer GEMM kernels (BMxBNxBK, warps, stages; conv: channels-last kernel, "
              "and nchw), from CUDA graphs")
        trows = run_timings(tile_cases(), tile_variants("cuda", graphs=True), timer, deadline=deadline - unet_reserve)
        report["tiles"] = trows
        print(ratio_table(trows))
        write_json(a.out, report)

    print("2c. host cost per call (tiny inputs, back-to-back calls: Python, allocation, launches)")
    try:
        report["host_costs"] = costs = host_costs("cuda", sync=torch.cuda.synchronize)
        for name, sec in costs.items():
            print(f"  {name}: {sec * 1e6:.1f} us")
    except Exception as exc:
        report["host_costs"] = dict(error=_error_line(exc))
        print(f"  {_error_line(exc)}")
    write_json(a.out, report)

    if not a.no_unet:
        print("3. SD1.5-architecture UNet forward, latent 64, batch 2 (bf16 float parts)")
        report["unet"] = unet_rows = unet_timings(timer, "cuda", deadline=deadline, graphs=True, profile=True)
        print("| variant | ms/forward | x bf16 | CUDA graph ms | x bf16 | model GB | forward peak GB | rel err vs bf16 "
              "| kernels |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in unet_rows:
            if "seconds" in r:
                gms = (f"{r['graph_seconds'] * 1e3:.1f} | {r.get('graph_x_bf16', 1.0):.2f}" if "graph_seconds" in r
                       else f"{r.get('graph_error', '-')} | ")
                print(f"| {r['variant']} | {r['seconds'] * 1e3:.1f} | {r.get('x_bf16', 1.0):.2f} | {gms} | "
                      f"{r.get('model_gpu_bytes', 0) / 1e9:.2f} | {r.get('peak_gpu_bytes', 0) / 1e9:.2f} | "
                      f"{r.get('rel_err_vs_bf16', 0.0):.1e} | "
                      f"{(r.get('kernels') or {}).get('layers', '')} |")
            else:
                print(f"| {r['variant']} | {r.get('error', r.get('skipped'))} | | | | | | | |")
        for r in unet_rows:
            if r.get("host_profile"):
                print(f"host profile, unet {r['variant']}, 3 eager forwards (top functions by own time):")
                print("\n".join("  " + line for line in r["host_profile"]))
    report["meta"]["wall_s"] = time.monotonic() - start
    path = write_json(a.out, report)
    print(f"wrote {path} ({report['meta']['wall_s']:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
