"""Deployed sampling time against full precision (issue 16, item 2: never slower than float).

    python -m lowbit.bench.bench_sampling [--models embedded,rgb,...] [--bits W8A8,W4A8] [--samples 250]
                                          [--steps 20] [--repeats 3] [--threads N] [--no-untuned]

For each model (the embedded digits model ``lowbit.models``, then every model of ``lowbit.models.zoo`` that
exists), in one process: quantize (min/max ranges from one short recorded float sampling run; this bench measures
time, not quality), deploy, and time whole sampling runs (``--samples`` images, ``--steps`` steps) with the runs
**alternating** between full precision and each deployed variant, ``--repeats`` rounds, median per variant (wall
time; also the median of the per-round ratios, ``x_fp32_paired``, and the process CPU time, ``x_fp32_cpu``, both
less sensitive to other jobs on a shared machine). Variants:

* ``<bits>``: deployed as ``deploy_`` does by default: with the kernel autotuner (``kernels/autotune.py``: per-shape
  measured choice between the integer kernels and the float path of the same quantized weights, its copies within
  the default 64 MiB budget per model). Its tuning happens in a warm-up run that
  is not timed (a cached decision costs nothing later), followed by the whole-model check
  (``autotune.settle``: whole forwards on one recorded call of the sampling run under the per-layer choice, the
  float path everywhere and the integer kernels everywhere, the fastest kept; ``--no-settle`` skips it); the
  choice summary is printed.
* ``<bits> untuned``: deployed, registry priority order (``LOWBIT_AUTOTUNE`` semantics off for these weights),
  what the kernels did before the autotuner.
* ``bf16`` (the peer, on unless ``--peers ""``): the float model cast to bf16, inputs cast to bf16 and outputs back
  to fp32 (:class:`Bf16`): what a CPU user gets from no quantization at all.
* ``<bits> unfused`` (``--unfused``): deployed and tuned like ``<bits>`` but with ``LOWBIT_FUSE_ACT=0`` (the GELUs
  after Linears stay separate ops, as before quant/fuse.py): the same run's before / after of that change.
* ``<bits>-bf16`` (``--bf16-parts``): the deployed model cast to bf16, so everything outside the quantized layers
  (norms, attention, residuals) runs in bf16 while the quantized layers keep their integer weights and fp32 scales
  (``QuantLayer._apply``); tuned and checked like ``<bits>``.

Writes ``bench/results/sampling.json``. Target: tuned deployed time / full precision <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sampling.json"


class _Subject:
    """One model to time: ``float_model``, and ``run(model, seed)`` that samples with a given denoiser."""

    def __init__(self, name, float_model, run, calib_run):
        self.name, self.float_model, self.run, self.calib_run = name, float_model, run, calib_run


def embedded_subject(samples: int, steps: int) -> _Subject:
    from .. import models as M

    fp = M.load_default_unet()
    labels = torch.arange(samples) % 10

    def run(model, seed=0):
        return M.sample(model, labels, steps=steps, eta=0.0, guidance=1.0, seed=seed, batch_size=samples)

    def calib(model):
        return M.sample(model, labels[:32], steps=4, eta=0.0, guidance=1.0, seed=123, batch_size=32)

    return _Subject("embedded", fp, run, calib)


def zoo_subjects(names, samples: int, steps: int, log=print):
    """Zoo models that exist now (the zoo is being built; missing models are skipped with a message)."""
    try:
        from ..models.zoo import ZOO_NAMES, load
    except ImportError as exc:
        log(f"lowbit.models.zoo not importable ({exc}); zoo models skipped")
        return []
    out = []
    for name in ZOO_NAMES:
        if names is not None and name not in names:
            continue
        try:
            zm = load(name)
        except Exception as exc:  # a model still being written or trained
            log(f"zoo model {name!r} skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        steps_z = steps or zm.default_steps

        def run(model, seed=0, zm=zm, steps_z=steps_z):
            return zm.sample(model, n=samples, seed=seed, steps=steps_z, guidance=zm.default_guidance)

        def calib(model, zm=zm):
            return zm.sample(model, n=min(samples, 16), seed=123, steps=4, guidance=zm.default_guidance)

        out.append(_Subject(f"zoo:{name}", zm.denoiser, run, calib))
    return out


def subjects_for(models, samples: int, steps: int) -> list:
    """The models a ``--models`` value names (comma list of ``embedded`` and zoo names; None: all there are), the
    embedded one first."""
    names = None if models is None else {s.strip() for s in models.split(",") if s.strip()}
    out = [embedded_subject(samples, steps)] if names is None or "embedded" in names else []
    return out + zoo_subjects(None if names is None else names - {"embedded"}, samples, steps)


class Bf16(torch.nn.Module):
    """``model`` (cast to bf16 here) behind fp32 inputs and an fp32 output tensor: a bf16 variant the samplers
    call like the fp32 model (floating arguments cast to bf16; integer ones, timesteps and ids, untouched)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, *args, **kwargs):
        from ..quant.calib import _to_model, model_device_dtype, unet_output  # (the recorded calls' own casts)

        dev = model_device_dtype(self.model)[0]
        out = self.model(*_to_model(args, dev, torch.bfloat16), **_to_model(kwargs, dev, torch.bfloat16))
        return unet_output(out).float()


def deployed(subject: _Subject, bits: str, tune: bool, fuse: bool = True):
    """The subject quantized (min/max ranges) and deployed as ``deploy_`` does by default (``tune``: the kernel
    autotuner within the default copy budget) or with ``tune=False`` (registry order); ``fuse=False``: with
    ``LOWBIT_FUSE_ACT=0`` (activations not moved into the Linears' kernels)."""
    from ..quant import CallRecorder, QuantConfig, deploy_, quantize

    with CallRecorder(subject.float_model) as rec, torch.no_grad():
        subject.calib_run(subject.float_model)
    q = quantize(subject.float_model, QuantConfig.preset(bits, w_init="minmax", a_init="minmax"), rec.calls)
    old = os.environ.get("LOWBIT_FUSE_ACT")
    if not fuse:
        os.environ["LOWBIT_FUSE_ACT"] = "0"
    try:
        return deploy_(q) if tune else deploy_(q, tune=False)
    finally:
        if not fuse and old is None:
            del os.environ["LOWBIT_FUSE_ACT"]
        elif not fuse:
            os.environ["LOWBIT_FUSE_ACT"] = old


def variant_plan(bits_list, untuned: bool, peers=("bf16",), bf16_parts: bool = False, unfused: bool = False) -> list:
    """(name, bits, kind) of every variant :func:`time_subject` times, in its order: ``fp32``, the float peers,
    then per format the tuned deployed model, its unfused twin, its float-parts-in-bf16 copy and the untuned one."""
    plan = [("fp32", None, "fp32")] + [(p, None, "peer") for p in peers]
    for bits in bits_list:
        plan.append((bits, bits, "tuned"))
        if unfused:
            plan.append((f"{bits} unfused", bits, "unfused"))
        if bf16_parts:
            plan.append((f"{bits}-bf16", bits, "bf16-parts"))
        if untuned:
            plan.append((f"{bits} untuned", bits, "untuned"))
    return plan


def time_subject(subject: _Subject, bits_list, repeats: int, untuned: bool, log=print, settle: bool = True,
                 peers=("bf16",), bf16_parts: bool = False, unfused: bool = False) -> dict:
    import copy

    from ..kernels import autotune

    variants = {}
    tuned = []  # the deployed, tuned variants: whole-model check, kernel-choice summary
    for name, bits, kind in variant_plan(bits_list, untuned, peers, bf16_parts, unfused):
        if kind == "fp32":
            variants[name] = subject.float_model
        elif kind == "peer":  # (only bf16 is known, see main)
            variants[name] = Bf16(copy.deepcopy(subject.float_model))
        elif kind == "untuned":
            variants[name] = deployed(subject, bits, tune=False)
        elif kind == "unfused":
            variants[name] = deployed(subject, bits, tune=True, fuse=False)
            tuned.append(name)
        else:
            m = deployed(subject, bits, tune=True)
            variants[name] = Bf16(m) if kind == "bf16-parts" else m
            tuned.append(name)
    from ..quant import CallRecorder

    warm, settled = {}, {}
    with torch.no_grad():
        for name, m in variants.items():  # warm-up run: tuning, prepacking, allocator
            t0 = time.perf_counter()
            if name == "fp32":  # one call of the sampling run: the shapes the whole-model check times
                with CallRecorder(m, store_dtype=torch.float32) as rec:
                    subject.run(m, seed=0)
                call = rec.calls[len(rec.calls) // 2]
            else:
                subject.run(m, seed=0)
            if name in tuned and settle:  # per-layer choices made: check them with whole forwards
                settled[name] = autotune.settle(m, call)
                log(f"[{subject.name} {name}] whole-model check: {settled[name]}")
            warm[name] = time.perf_counter() - t0
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}  # process CPU time: less sensitive to other jobs than wall time
        for r in range(repeats):
            for name, m in variants.items():
                c0, t0 = time.process_time(), time.perf_counter()
                subject.run(m, seed=r + 1)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base = statistics.median(times["fp32"])
    base_cpu = statistics.median(cpu["fp32"])
    from .bench_unet import resident_weight_bytes  # parameters + buffers + packed weights' backend caches

    bytes_now = {name: resident_weight_bytes(m) for name, m in variants.items()}  # after the runs (caches built)
    rows = []
    for name, ts in times.items():
        row = dict(variant=name, median_s=statistics.median(ts), times_s=ts, warmup_s=warm[name],
                   x_fp32=statistics.median(ts) / base, cpu_s=cpu[name],
                   x_fp32_cpu=statistics.median(cpu[name]) / base_cpu,
                   weight_bytes=bytes_now[name], x_fp32_bytes=bytes_now[name] / bytes_now["fp32"],
                   x_fp32_per_round=[t / b for t, b in zip(ts, times["fp32"])],
                   # the median of the rounds' own ratios: each round's runs are back to back, so this pairs them
                   x_fp32_paired=statistics.median(t / b for t, b in zip(ts, times["fp32"])))
        if name in tuned:
            s = autotune.summary(variants[name])
            row["kernel_choice"] = {k: v for k, v in s.items() if k != "rows"}
            row["kernel_choice_rows"] = s["rows"]
            log(f"[{subject.name} {name}] " + autotune.format_summary(s))
        rows.append(row)
    return dict(model=subject.name, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list: embedded and/or zoo names (default: all there are)")
    p.add_argument("--bits", default="W8A8,W4A8")
    p.add_argument("--samples", type=int, default=250)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-untuned", action="store_true", help="skip the registry-order (untuned) variants")
    p.add_argument("--no-settle", action="store_true", help="keep the per-layer choices (no whole-model check)")
    p.add_argument("--peers", default="bf16", help='comma list of float peers timed in the same rounds: bf16 (the '
                   'float model in bf16); "" for none')
    p.add_argument("--bf16-parts", action="store_true",
                   help="also time each <bits> deployed model cast to bf16 (<bits>-bf16: float parts in bf16)")
    p.add_argument("--unfused", action="store_true",
                   help="also time each <bits> deployed with LOWBIT_FUSE_ACT=0 (<bits> unfused: GELUs not moved "
                        "into the Linears' kernels)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    unknown = sorted(set(peers) - {"bf16"})
    if unknown:
        p.error(f"--peers {','.join(unknown)}: unknown peer (known: bf16)")
    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    bits_list = [b for b in a.bits.split(",") if b]
    subjects = subjects_for(a.models, a.samples, a.steps)
    results = []
    for s in subjects:
        names = [n for n, _, _ in variant_plan(bits_list, not a.no_untuned, peers, a.bf16_parts, a.unfused)]
        print(f"[{s.name}] timing {', '.join(names)} ({a.repeats} alternating rounds) ...", flush=True)
        try:
            results.append(time_subject(s, bits_list, a.repeats, not a.no_untuned, settle=not a.no_settle,
                                        peers=peers, bf16_parts=a.bf16_parts, unfused=a.unfused))
        except Exception as exc:
            print(f"[{s.name}] FAILED: {type(exc).__name__}: {exc}")
            results.append(dict(model=s.name, error=f"{type(exc).__name__}: {exc}"))
    print(f"\nsampling time, {a.samples} samples x {a.steps} steps, threads={a.threads}, median of {a.repeats} "
          "alternating rounds")
    print("| model | variant | s / sampling run | x fp32 (medians) | x fp32 (median per round) | per round "
          "| x fp32, CPU time | x fp32 weight bytes (with caches) |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res.get("rows", []):
            rounds = " / ".join(f"{v:.2f}" for v in r["x_fp32_per_round"])
            print(f"| {res['model']} | {r['variant']} | {r['median_s']:.2f} | {r['x_fp32']:.2f} "
                  f"| {r['x_fp32_paired']:.2f} | {rounds} | {r['x_fp32_cpu']:.2f} | {r['x_fp32_bytes']:.2f} |")
        if "error" in res:
            print(f"| {res['model']} | FAILED | {res['error']} | |")
    meta = dict(samples=a.samples, steps=a.steps, repeats=a.repeats, threads=a.threads, torch=torch.__version__,
                peers=peers, bf16_parts=a.bf16_parts, unfused=a.unfused,
                date=time.strftime("%Y-%m-%d %H:%M"), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                load_avg=os.getloadavg(), load_avg_start=load_start)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
