"""What the fused CPU activation quantizer changes in whole sampling runs (kernels/cpu.py, issue 16).

    python -m lowbit.bench.act_quant_codes [--models embedded,rgb,...] [--samples 64] [--steps 10] [--bits W8A8]

The CPU kernels quantize static activations in one fused pass, ``round(x * (1/scale) + zp)`` rounded once, where
the reference computes ``round(x / scale) + zp``: a code one step off at a rare rounding tie.
``LOWBIT_CPU_EXACT_ACT_QUANT=1`` restores the reference's codes. For each model (the embedded one and every zoo
model there is): quantize (min/max ranges from a short recorded float run, as ``bench_sampling``), deploy, then one
sampling run (same noise) per combination of

* activation codes: fused (default) / exact, and
* path: integer kernels everywhere / the float path of the same integers everywhere (``autotune.set_mode``),

and report the PSNR (dB, peak = the float samples' range) of every run against full precision and between runs:
``fused vs exact`` (what the default changes) next to ``float vs integer path`` with exact codes (float summation
order only: what the library already accepted). Also the fraction of activation codes that differ on one recorded
call. Writes ``bench/results/act_quant_codes.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "act_quant_codes.json"
_ENV = "LOWBIT_CPU_EXACT_ACT_QUANT"


def _first(o):
    return (o[0] if isinstance(o, (tuple, list)) else o).float()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def _code_mismatch(q, call) -> tuple:
    """(differing codes, codes) over the static quantized inputs of every deployed layer on one recorded call."""
    from ..kernels import cpu
    from ..quant import quant_layers
    from ..quant.calib import run_calls

    seen = []  # (input, the ActQuant the layer applies to it at this call)
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append((a[0].detach().float(), mod.deployed_act())))
             for _, m in quant_layers(q)]
    try:
        run_calls(q, [call])
    finally:
        for h in hooks:
            h.remove()
    diff = total = 0
    for x, aq in seen:
        if aq is None or aq.dynamic:
            continue
        os.environ[_ENV] = "1"
        exact = cpu.quant_static(x, aq)
        os.environ[_ENV] = "0"
        fused = cpu.quant_static(x, aq)
        diff += int((exact != fused).sum())
        total += x.numel()
    return diff, total


def measure(subject, bits: str, log=print) -> dict:
    from ..kernels import autotune
    from ..quant import CallRecorder
    from .bench_sampling import deployed

    old = os.environ.get(_ENV)
    try:
        with torch.no_grad():
            with CallRecorder(subject.float_model, store_dtype=torch.float32) as rec:
                ref = _first(subject.run(subject.float_model, seed=1))
            call = rec.calls[len(rec.calls) // 2]
            q = deployed(subject, bits, tune=True)
            subject.run(q, seed=0)  # per-layer caches
            outs = {}
            for codes, flag in (("fused", "0"), ("exact", "1")):
                os.environ[_ENV] = flag
                for path in ("integer", "float"):
                    autotune.set_mode(q, path)
                    outs[f"{path} {codes}"] = _first(subject.run(q, seed=1))
            autotune.set_mode(q, "integer")
            diff, total = _code_mismatch(q, call)
    finally:
        if old is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = old
    peak = float(ref.max() - ref.min())
    row = dict(model=subject.name, bits=bits,
               psnr_vs_fp={k: psnr(v, ref, peak) for k, v in outs.items()},
               fused_vs_exact={p: psnr(outs[f"{p} fused"], outs[f"{p} exact"], peak) for p in ("integer", "float")},
               float_vs_integer={c: psnr(outs[f"float {c}"], outs[f"integer {c}"], peak) for c in ("exact", "fused")},
               codes_differing=diff, codes=total, codes_differing_per_million=1e6 * diff / max(total, 1))
    log(f"[{subject.name} {bits}] PSNR vs fp: " + ", ".join(f"{k} {v:.1f}" for k, v in row["psnr_vs_fp"].items())
        + f" | fused vs exact: integer {row['fused_vs_exact']['integer']:.1f}, float "
        f"{row['fused_vs_exact']['float']:.1f} | float vs integer path: exact codes "
        f"{row['float_vs_integer']['exact']:.1f}, fused {row['float_vs_integer']['fused']:.1f} dB | codes differing "
        f"{diff} of {total} ({row['codes_differing_per_million']:.1f} per million)")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list: embedded and/or zoo names (default: all there are)")
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    from .bench_sampling import subjects_for

    torch.set_num_threads(a.threads)
    subjects = subjects_for(a.models, a.samples, a.steps)
    rows = [measure(s, b.strip(), log=print) for s in subjects for b in a.bits.split(",") if b.strip()]
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, threads=a.threads,
                samples=a.samples, steps=a.steps)
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
