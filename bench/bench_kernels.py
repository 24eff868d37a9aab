"""Single-layer benchmark at SD1.5 shapes: fp32, bf16 and our W8A8 / W4A8 / W4A16 kernels.

    python -m lowbit.bench.bench_kernels [--threads N] [--budget 1.5] [--shapes sd15|small] [--out ...]

``--shapes small``: the Linear shapes of the zoo's small-layer models (K = 32-64, and one SD1.5 shape for contrast),
Linear only. Static W8A8 is also timed on every CPU backend that accepts it (``W8A8 static (<backend>)``: onednn,
vnni, the ``_int_mm`` path, the float path ``dense``), so the table shows what the autotuner chooses between.
Quantized calls alternate between two copies of the input, as a model's calls get new inputs (the CPU paths keep the
last input's activation codes for layers that read one tensor).

Prints time ratios to fp32 (median over repeats; < 1 is faster) and writes JSON. Each quantized row names the
backend that ran it. Weight bytes are resident bytes (qdata + scales + backend caches, after the first call).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__:
    from ..kernels import ActQuant, ops, registry
else:  # python bench/bench_kernels.py
    from lowbit.kernels import ActQuant, ops, registry

LINEAR_SHAPES = [(4096, 320, 320), (1024, 640, 640), (256, 1280, 1280), (4096, 320, 1280)]  # M, K, N
SMALL_LINEAR_SHAPES = [(512, 64, 64), (2048, 64, 64), (8192, 32, 256), (4096, 64, 320), (4096, 320, 320)]
CONV_SHAPES = [(320, 64), (640, 32)]  # channels, spatial; 3x3, stride 1, pad 1, batch 1


def timeit(fn, budget: float, min_reps: int = 5, max_reps: int = 100):
    fn()  # warm-up (prepacks caches)
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3, len(times)


def _calib_static(x, bits=8):
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / ((1 << bits) - 1)
    return ActQuant(bits, scale, int(round(-lo / scale)))


def _quant_variants(x, w, conv: bool):
    """name -> (PackedWeight, ActQuant|None, env overrides, forced backend or None)."""
    static = _calib_static(x)
    dyn = ActQuant(8, dynamic=True)
    pw8 = ops.quantize_weight(w, 8)
    v = {
        "W8A8 static": (pw8, static, {}, None),
        "W8A8 dynamic": (pw8, dyn, {}, None),
        "W4A8 dynamic": (ops.quantize_weight(w, 4), dyn, {}, None),
        "W4A8 dynamic (int8 cache)": (ops.quantize_weight(w, 4), dyn, {"LOWBIT_CPU_CACHE_INT4": "1"}, None),
        "W4A16": (ops.quantize_weight(w, 4, None if conv else 64), None, {}, None),
    }
    if conv:
        v["W8A8 static (im2col+_int_mm)"] = (ops.quantize_weight(w, 8), static, {}, "cpu")
    else:
        v["W8A8 static (_int_mm)"] = (ops.quantize_weight(w, 8), static, {}, "cpu")
        for be in ("onednn", "vnni", "dense"):
            pw = ops.quantize_weight(w, 8)
            if be in ops.available_backends() and registry.get_backend(be).check("linear", x, pw, None, static)[0]:
                v[f"W8A8 static ({be})"] = (pw, static, {}, be)
    return v


def _run_case(name, x, w, bias, conv, budget):
    rows = []
    fp32 = (lambda: F.conv2d(x, w, bias, 1, 1)) if conv else (lambda: F.linear(x, w, bias))
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    if conv:
        xb_cl = xb.contiguous(memory_format=torch.channels_last)
        wb_cl = wb.contiguous(memory_format=torch.channels_last)
        bf16 = lambda: F.conv2d(xb_cl, wb_cl, bb, 1, 1)  # noqa: E731  channels_last is the fast bf16 conv layout
    else:
        bf16 = lambda: F.linear(xb, wb, bb)  # noqa: E731
    t32 = timeit(fp32, budget)
    rows.append(dict(variant="fp32", ms=t32[0], min_ms=t32[1], reps=t32[2], ratio=1.0, weight_bytes=w.numel() * 4,
                     backend="torch"))
    tb = timeit(bf16, budget)
    rows.append(dict(variant="bf16", ms=tb[0], min_ms=tb[1], reps=tb[2], ratio=tb[0] / t32[0],
                     weight_bytes=w.numel() * 2, backend="torch"))
    ref = fp32()
    for vname, (pw, act, env, forced) in _quant_variants(x, w, conv).items():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            if conv:
                args = (x, pw, bias, (1, 1), (1, 1), (1, 1), 1, act)
                op = "conv2d"
            else:
                args = (x, pw, bias, act)
                op = "linear"
            backend = forced or ops.backend_for(op, *args)
            # two copies of the input, alternating: the CPU paths keep the last input's activation codes
            # (cpu.quant_static_fused) for layers reading one tensor, which a layer called on the same tensor again
            # and again would otherwise never pay for (a model's next call has a new input)
            nxt = itertools.cycle([args, (x.clone(),) + args[1:]]).__next__
            fn = lambda: ops.run_on(backend, op, *nxt())  # noqa: E731
            out = fn()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t = timeit(fn, budget)
            rows.append(dict(variant=vname, ms=t[0], min_ms=t[1], reps=t[2], ratio=t[0] / t32[0],
                             weight_bytes=pw.nbytes(), backend=backend, rel_err_vs_fp32=err))
        finally:
            for k, val in old.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val
    for r in rows:
        r["case"] = name
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of repeats per variant (min 5 repeats)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels.json"))
    p.add_argument("--only", choices=["linear", "conv"], default=None)
    p.add_argument("--shapes", choices=["sd15", "small"], default="sd15",
                   help="sd15: SD1.5 Linear and conv shapes; small: the zoo's small Linear shapes (Linear only)")
    a = p.parse_args(argv)
    if a.shapes == "small":
        a.only = "linear"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    if a.only != "conv":
        for m, k, n in (SMALL_LINEAR_SHAPES if a.shapes == "small" else LINEAR_SHAPES):
            x = torch.randn(m, k)
            w = torch.randn(n, k) * k ** -0.5
            rows += _run_case(f"linear {m}x{k}->{n}", x, w, torch.randn(n) * 0.1, False, a.budget)
            _print(rows, f"linear {m}x{k}->{n}")
    if a.only != "linear":
        for c, s in CONV_SHAPES:
            x = torch.randn(1, c, s, s)
            w = torch.randn(c, c, 3, 3) * (9 * c) ** -0.5
            rows += _run_case(f"conv3x3 {c}ch@{s}x{s}", x, w, torch.randn(c) * 0.1, True, a.budget)
            _print(rows, f"conv3x3 {c}ch@{s}x{s}")
    meta = dict(threads=a.threads, shapes=a.shapes, torch=torch.__version__,
                cpu=platform.processor() or platform.machine(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), budget_s=a.budget)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nwrote {a.out}")


def _print(rows, case):
    print(f"\n{case}")
    print(f"  {'variant':32s} {'backend':8s} {'median ms':>10s} {'x fp32':>7s} {'weight MB':>10s} {'rel err':>8s}")
    for r in rows:
        if r["case"] == case:
            err = f"{r['rel_err_vs_fp32']:.1e}" if "rel_err_vs_fp32" in r else "-"
            print(f"  {r['variant']:32s} {r['backend']:8s} {r['ms']:10.2f} {r['ratio']:7.2f} "
                  f"{r['weight_bytes'] / 1e6:10.2f} {err:>8s}")


if __name__ == "__main__":
    main()
