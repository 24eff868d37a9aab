"""Whole-UNet benchmark: SD1.5-architecture UNet2DConditionModel with random weights (no download).

    python -m lowbit.bench.bench_unet [--latent 64|32] [--repeats 3] [--threads N] [--variants fp32,W8A8,...]

Each variant runs in its own subprocess (so peak RSS is per variant): build the UNet (seed 0), quantize, one
warm-up forward, ``--repeats`` timed forwards (median). Reports time / fp32, resident weight bytes / fp32
(parameters + buffers + packed data, scales and backend caches; tensor subclasses flattened), peak RSS, and the
relative error of the output against fp32. Writes bench/results/unet.json.

Our formats are quantized through the core library (``lowbit.quant.quantize_`` + ``deploy_``); torchao's int8
configs run when ``torchao`` imports (they quantize Linear layers only).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

OURS = {  # name -> (QuantConfig preset, overrides)
    "W8A8": ("W8A8", {}),
    "W8A8-dyn": ("W8A8", {"a_dynamic": True}),
    "W4A8": ("W4A8", {}),
    "W4A16": ("W4A16", {}),
    "W4A4": ("W4A4", {}),
    "W8A16": ("W8A16", {}),
    # W4A8 keeping an int8 copy of every int4 weight (kernels/cpu.py cache_int4): int8 kernels (oneDNN) at the
    # price of int8 memory on top of the int4 weights; the weight bytes column shows the trade
    "W4A8-int8cache": ("W4A8", {}),
    # deploy_(tune=False): every layer on its registry kernel, no autotuner (the variants above take deploy_'s
    # default: each layer's kernel measured for its shape, float / int8 copies within the 64 MiB copy budget)
    "W8A8-untuned": ("W8A8", {}),
    "W4A8-untuned": ("W4A8", {}),
    # the same, with everything that is not a quantized layer (norms, attention) in bf16: model.to(bfloat16)
    # keeps LowBit's integer weights and fp32 scales (QuantLayer._apply) and casts only the float parts
    "W8A8-bf16": ("W8A8", {}),
    "W8A8-dyn-bf16": ("W8A8", {"a_dynamic": True}),
    # deployed with LOWBIT_FUSE_ACT=0: the GEGLUs after the feed-forwards' Linears stay separate ops (quant/fuse.py)
    "W8A8-unfused": ("W8A8", {}),
    "W8A8-unfused-bf16": ("W8A8", {}),
}
TORCHAO = ["torchao-int8wo-fp32", "torchao-int8wo-bf16", "torchao-int8dq-fp32", "torchao-int8dq-bf16"]
DEFAULT_VARIANTS = ["fp32", "bf16", *OURS, *TORCHAO]


def build_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(**cfg).eval()


def inputs(latent: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, latent, latent, generator=g), torch.tensor([500.0]),
            torch.randn(1, 77, 768, generator=g))


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor; tensor subclasses (torchao) are flattened into their inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _packed_of(m):
    """The PackedWeight a module is (deployed layers hold theirs as a submodule) or holds (older layers: in
    ``_packed``), else None."""
    return m if hasattr(m, "nbytes") and hasattr(m, "cache") else getattr(m, "_packed", None)


def resident_weight_bytes(model) -> int:
    """Parameters + buffers of every module, plus the backend caches of packed weights (onednn blobs, ...)."""
    total = sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())
    seen = set()
    for m in model.modules():
        pw = _packed_of(m)
        if pw is not None and hasattr(pw, "nbytes") and id(pw) not in seen:
            seen.add(id(pw))
            total += pw.nbytes(include_cache=True) - pw.nbytes(include_cache=False)
    return total


# ------------------------------------------------------------------------------------------------ quantizers
def _quantize_ours(model, fmt: str, latent: int):
    """Quantize through the core library: record one full-precision UNet call as calibration data, then
    ``lowbit.quant.quantize_`` (min/max ranges: this bench measures speed and bytes, not quality) and ``deploy_``
    (packs the integers; the deployed layers call ``lowbit.kernels.ops``)."""
    import torch

    if __package__:
        from ..quant import CallRecorder, QuantConfig, deploy_, quantize_
    else:
        from lowbit.quant import CallRecorder, QuantConfig, deploy_, quantize_
    preset, over = OURS[fmt]
    cfg = QuantConfig.preset(preset, w_init="minmax", a_init="minmax", **over)
    sample, t, text = inputs(latent)
    with CallRecorder(model, store_dtype=torch.float32) as rec, torch.no_grad():
        model(sample, t, encoder_hidden_states=text)
    quantize_(model, cfg, calib=rec.calls)
    old = os.environ.get("LOWBIT_FUSE_ACT")
    if "-unfused" in fmt:
        os.environ["LOWBIT_FUSE_ACT"] = "0"
    try:
        deploy_(model, tune=not fmt.endswith(("-untuned", "-int8cache")))
    finally:
        if "-unfused" in fmt and old is None:
            del os.environ["LOWBIT_FUSE_ACT"]
        elif "-unfused" in fmt:
            os.environ["LOWBIT_FUSE_ACT"] = old
    if fmt.endswith("-int8cache"):
        for m in model.modules():
            pw = _packed_of(m)
            if pw is not None and pw.bits <= 4:
                pw.cache["cache_int4"] = True
    return model


def _quantize_torchao(model, name: str):
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    if name.endswith("bf16"):
        model = model.to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig() if "int8wo" in name else Int8DynamicActivationInt8WeightConfig())
    return model


# ------------------------------------------------------------------------------------------------ one variant
def run_variant(name: str, latent: int, repeats: int, threads: int, out_path: str):
    import torch

    torch.set_num_threads(threads)
    model = build_unet()
    t0 = time.perf_counter()
    if name == "bf16":
        model = model.to(torch.bfloat16)
    elif name in OURS:
        model = _quantize_ours(model, name, latent)
        if name.endswith("-bf16"):
            model = model.to(torch.bfloat16)
    elif name.startswith("torchao"):
        model = _quantize_torchao(model, name)
    elif name != "fp32":
        raise SystemExit(f"unknown variant {name!r}; known: {DEFAULT_VARIANTS}")
    quant_s = time.perf_counter() - t0
    dtype = next(model.parameters()).dtype if name in ("bf16",) or name.endswith("bf16") else torch.float32
    sample, t, text = inputs(latent)
    sample, text = sample.to(dtype), text.to(dtype)
    times = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(sample, t, encoder_hidden_states=text).sample
        first = time.perf_counter() - t0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(sample, t, encoder_hidden_states=text).sample
            times.append(time.perf_counter() - t0)
    from safetensors.torch import save_file

    save_file({"out": out.float().contiguous()}, out_path)
    backends = {}
    if name in OURS:
        from collections import Counter

        if __package__:
            from ..kernels import ops
        else:
            from lowbit.kernels import ops
        del ops  # (imported so that the report can name the registered backends)
        for m in model.modules():
            pw = _packed_of(m)
            if pw is not None:
                for key in pw.cache:
                    backends[str(key[0] if isinstance(key, tuple) else key).split(".")[0]] = 1
        backends = dict(Counter(backends))
    return dict(variant=name, median_s=statistics.median(times), times_s=times, first_s=first, quantize_s=quant_s,
                weight_bytes=resident_weight_bytes(model),
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                backend_caches=sorted(backends))


# ------------------------------------------------------------------------------------------------ alternating mode
# variant -> (model it runs on, environment while it runs)
ALTERNATE = {
    "fp32": ("fp32", {}),
    "bf16": ("bf16", {}),
    "W8A8": ("W8A8", {}),  # default: fused one-pass activation quantization (kernels/cpu.py)
    "W8A8-exact": ("W8A8", {"LOWBIT_CPU_EXACT_ACT_QUANT": "1"}),  # the reference's activation codes, bit for bit
    "W8A8-bf16": ("W8A8-bf16", {}),  # float parts (norms, attention, residuals) in bf16, integer layers as W8A8
    "W8A8-unfused": ("W8A8-unfused", {}),  # LOWBIT_FUSE_ACT=0 at deployment: the GEGLUs run as separate ops
    "W8A8-unfused-bf16": ("W8A8-unfused-bf16", {}),
    "W4A8": ("W4A8", {}),
    "W4A8-int8cache": ("W4A8-int8cache", {}),
    "W8A8-untuned": ("W8A8-untuned", {}),
    "W4A8-untuned": ("W4A8-untuned", {}),
    "W4A4": ("W4A4", {}),
    "W8A16": ("W8A16", {}),
    "W4A16": ("W4A16", {}),  # default: the bf16 weights built in a per-thread scratch buffer (kernels/cpu.py)
    "W4A16-fresh": ("W4A16", {"LOWBIT_CPU_DEQUANT_SCRATCH": "0"}),  # a fresh weight-sized buffer at every call
    "torchao-int8wo-bf16": ("torchao-int8wo-bf16", {}),
    "torchao-int8dq-bf16": ("torchao-int8dq-bf16", {}),
}


def _build_for_alternate(key: str, latent: int):
    import torch

    model = build_unet()
    if key == "bf16":
        return model.to(torch.bfloat16)
    if key in OURS:
        model = _quantize_ours(model, key, latent)
        return model.to(torch.bfloat16) if key.endswith("-bf16") else model
    if key.startswith("torchao"):
        return _quantize_torchao(model, key)
    return model


def op_profile(fn, top: int = 12) -> list:
    """One call of ``fn`` under torch.profiler: the ``top`` operators by their own CPU time, as
    ``{"op", "ms", "calls", "share"}`` (share of the whole forward's own time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return [dict(op=e.key, ms=e.self_cpu_time_total / 1e3, calls=e.count, share=e.self_cpu_time_total / total)
            for e in ops[:top]]


def run_alternating(variants, latent: int, repeats: int, threads: int, log=print, profile: bool = False) -> list:
    """All variants in one process; each round runs one forward of every variant in turn (so a shared machine's
    load hits all alike); median per variant. Weight bytes as in the subprocess mode; no per-variant peak RSS.
    ``profile``: after the rounds, one more forward of each variant under torch.profiler (:func:`op_profile`)."""
    import torch

    torch.set_num_threads(threads)
    models = {}
    for v in variants:
        key = ALTERNATE[v][0]
        if key not in models:
            t0 = time.perf_counter()
            models[key] = _build_for_alternate(key, latent)
            log(f"[{key}] built in {time.perf_counter() - t0:.0f} s")
    sample, t, text = inputs(latent)

    def call(v):
        key, env = ALTERNATE[v]
        m = models[key]
        dt = torch.bfloat16 if "bf16" in key else torch.float32
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return m(sample.to(dt), t, encoder_hidden_states=text.to(dt)).sample.float()
        finally:
            for k, val in old.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val

    outs, times, warm = {}, {v: [] for v in variants}, {}
    with torch.no_grad():
        for v in variants:  # warm-up (prepacking, first-call allocations; the kernel autotuner's measurements)
            t0 = time.perf_counter()
            outs[v] = call(v)
            warm[v] = time.perf_counter() - t0
        for r in range(repeats):
            for v in variants:
                t0 = time.perf_counter()
                call(v)
                times[v].append(time.perf_counter() - t0)
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants))
        profiles = {v: op_profile(lambda v=v: call(v)) for v in variants} if profile else {}
    ref = outs.get("fp32")
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    fp_bytes = resident_weight_bytes(models["fp32"]) if "fp32" in models else None
    rows = []
    for v in variants:
        med = statistics.median(times[v])
        wb = resident_weight_bytes(models[ALTERNATE[v][0]])
        row = dict(variant=v, median_s=med, times_s=times[v], warmup_s=warm[v], weight_bytes=wb)
        kc = _kernel_choice(models[ALTERNATE[v][0]])
        if kc:
            row["kernel_choice"] = kc
        if base:
            row["time_ratio"] = med / base
        if fp_bytes:
            row["weight_ratio"] = wb / fp_bytes
        if ref is not None:
            row["rel_err_vs_fp32"] = ((outs[v] - ref).norm() / ref.norm()).item()
        if v in profiles:
            row["profile"] = profiles[v]
        rows.append(row)
    return rows


def _kernel_choice(model) -> Optional[dict]:
    """The autotuner's summary of a deployed model (layers per kernel, layers refused by the copy budget, bytes),
    None for a model without tuned layers."""
    if __package__:
        from ..kernels import autotune
    else:
        from lowbit.kernels import autotune
    s = autotune.summary(model)
    if not s["layers"] and not s["over_budget"]:
        return None
    return {k: s[k] for k in ("layers", "untuned", "over_budget", "cache_bytes", "dense_bytes", "packed_bytes",
                              "budget_bytes")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=64, choices=[32, 64], help="latent side (64 = 512x512 images)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "unet.json"))
    p.add_argument("--alternate", action="store_true",
                   help="all variants in one process, forwards alternating (ratios robust to a shared machine's "
                        f"load; no peak RSS); variants: {list(ALTERNATE)}")
    p.add_argument("--profile", action="store_true",
                   help="with --alternate: after the rounds, one profiled forward per variant (the top operators by "
                        "own CPU time, printed and in the JSON)")
    p.add_argument("--_child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.alternate:
        import importlib.util

        names = [v for v in (a.variants.split(",") if a.variants != ",".join(DEFAULT_VARIANTS) else ALTERNATE) if v]
        unknown = [v for v in names if v not in ALTERNATE]
        if unknown:
            raise SystemExit(f"--alternate: unknown variants {unknown}; known: {list(ALTERNATE)}")
        if importlib.util.find_spec("torchao") is None:
            names = [v for v in names if not v.startswith("torchao")]
        if "fp32" not in names:
            names.insert(0, "fp32")
        rows = run_alternating(names, a.latent, a.repeats, a.threads, profile=a.profile)
        print(f"\nSD1.5 UNet, latent 1x4x{a.latent}x{a.latent}, threads={a.threads}, median of {a.repeats} "
              "alternating rounds (one process)")
        print("| variant | s/forward | x fp32 | first forward s (tuning) | weight MB | x fp32 | rel. error vs fp32 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['median_s']:.2f} | {r.get('time_ratio', float('nan')):.2f} | "
                  f"{r['warmup_s']:.1f} | {r['weight_bytes'] / 1e6:.0f} | {r.get('weight_ratio', float('nan')):.3f} | "
                  f"{r.get('rel_err_vs_fp32', float('nan')):.1e} |")
        for r in rows:
            if r.get("profile"):
                print(f"\nprofile of one {r['variant']} forward (own CPU time): "
                      + ", ".join(f"{e['op']} {e['ms']:.0f} ms ({e['share']:.0%}, {e['calls']} calls)"
                                  for e in r["profile"]))
        import torch

        meta = dict(mode="alternate", latent=a.latent, repeats=a.repeats, threads=a.threads, torch=torch.__version__,
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), load_avg=os.getloadavg(),
                    date=time.strftime("%Y-%m-%d %H:%M"))
        out = a.out if a.out != str(Path(__file__).resolve().parent / "results" / "unet.json") else \
            str(Path(__file__).resolve().parent / "results" / "unet_alternate.json")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {out}")
        return
    if a._child:
        res = run_variant(a._child[0], a.latent, a.repeats, a.threads, a._child[1])
        print("RESULT " + json.dumps(res))
        return
    variants = [v for v in a.variants.split(",") if v]
    if "fp32" not in variants:
        variants.insert(0, "fp32")
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        dropped = [v for v in variants if v.startswith("torchao")]
        variants = [v for v in variants if not v.startswith("torchao")]
        if dropped:
            print(f"torchao is not installed: skipping {dropped} (pip install torchao --no-deps)")
    rows, outs = [], {}
    tmp = tempfile.mkdtemp(prefix="lowbit_unet_")
    for v in variants:
        path = os.path.join(tmp, f"{v}.safetensors")
        cmd = [sys.executable, "-m", "lowbit.bench.bench_unet", "--latent", str(a.latent), "--repeats", str(a.repeats),
               "--threads", str(a.threads), "--_child", v, path]
        print(f"[{v}] running ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"[{v}] FAILED: {err}")
            rows.append(dict(variant=v, error=err))
            continue
        r = json.loads(line[0][7:])
        outs[v] = path
        rows.append(r)
        print(f"[{v}] {r['median_s']:.2f} s/forward, weights {r['weight_bytes'] / 1e6:.0f} MB, "
              f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    from safetensors.torch import load_file

    ref = load_file(outs["fp32"])["out"] if "fp32" in outs else None
    base = next((r for r in rows if r["variant"] == "fp32" and "error" not in r), None)
    for r in rows:
        if "error" in r or base is None:
            continue
        r["time_ratio"] = r["median_s"] / base["median_s"]
        r["weight_ratio"] = r["weight_bytes"] / base["weight_bytes"]
        o = load_file(outs[r["variant"]])["out"]
        r["rel_err_vs_fp32"] = ((o - ref).norm() / ref.norm()).item()
    print(f"\nSD1.5 UNet, latent 1x4x{a.latent}x{a.latent}, text 1x77x768, threads={a.threads}, "
          f"median of {a.repeats}")
    print(f"{'variant':22s} {'s/fwd':>7s} {'x fp32':>7s} {'weights MB':>11s} {'x fp32':>7s} "
          f"{'peak RSS GB':>11s} {'rel err':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:22s} FAILED: {r['error']}")
            continue
        print(f"{r['variant']:22s} {r['median_s']:7.2f} {r.get('time_ratio', float('nan')):7.2f} "
              f"{r['weight_bytes'] / 1e6:11.0f} {r.get('weight_ratio', float('nan')):7.3f} "
              f"{r['peak_rss_bytes'] / 1e9:11.2f} {r.get('rel_err_vs_fp32', float('nan')):8.1e}")
    import torch

    meta = dict(latent=a.latent, repeats=a.repeats, threads=a.threads, torch=torch.__version__,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
