"""How large a FID difference is real? The zoo table's rows over several independent sample sets.

    python -m lowbit.bench.zoo_seeds [--models rgb latent_text] [--bits W4A4]
                                     [--methods recon+ptqd efficientdm] [--samples 1000] [--sets 3]

``bench/zoo.py`` draws one set of samples per row (seed 0), so two methods whose FIDs differ by a few percent may
differ only by which noise was drawn. Here every method (built once, with ``PipelineConfig.for_method``'s defaults,
from the same calibration calls as ``bench/zoo.py``) samples ``--sets`` independent sets (seeds 0, 1, ...), and
full precision samples the same sets. Per method and set:

* ``fid``: FID against the held-out real data (the zoo table's number);
* ``fd_fp``: Frechet distance, in the same feature space, between the method's samples and the full-precision
  samples *of the same noise* (how far the quantized distribution moved, without the data's floor);
* ``psnr``: paired PSNR against the full-precision sample from the same noise.

The summary gives each method's mean and standard deviation over the sets, the full-precision FID's spread
over sets (the noise floor of the zoo table's FID column), and for each pair of methods the per-set difference
(mean, std, and on how many sets the first is better). Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from .zoo import build, calibration, paired_psnr


def _stats(xs):
    xs = [float(x) for x in xs]
    return dict(mean=statistics.fmean(xs), std=statistics.stdev(xs) if len(xs) > 1 else 0.0, values=xs)


def run_model(name: str, a, log=print) -> dict:
    from ..models.zoo import load
    from ..models.zoo.common import frechet

    m = load(name)
    steps = a.steps or m.default_steps
    seeds = [a.seed + i for i in range(a.sets)]
    fp = {}
    for s in seeds:
        t0 = time.perf_counter()
        img, labels = m.sample(m.denoiser, a.samples, s, steps=steps)
        fp[s] = (img, m.features(img), m.metrics(img, labels)["fid"])
        log(f"[{name}] full precision, set {s}: FID {fp[s][2]:.3f} ({time.perf_counter() - t0:.0f} s)")
    out = dict(model=name, steps=steps, seeds=seeds, fp=dict(fid=_stats([fp[s][2] for s in seeds])), methods={})
    if len(seeds) > 1:  # how far two full-precision sets are from each other: the floor of fd_fp
        out["fp"]["fd_between_sets"] = frechet(fp[seeds[0]][1], fp[seeds[1]][1])
    calib = calibration(m, a, steps)
    for bits in a.bits:
        for method in a.methods:
            t0 = time.perf_counter()
            res = build(m, calib, method, bits, a)
            qs = time.perf_counter() - t0
            per = dict(fid=[], fd_fp=[], psnr=[])
            for s in seeds:
                img, labels = m.sample(res.model, a.samples, s, steps=steps)
                per["fid"].append(m.metrics(img, labels)["fid"])
                per["fd_fp"].append(frechet(m.features(img), fp[s][1]))
                per["psnr"].append(paired_psnr(img, fp[s][0]))
                log(f"[{name}] {bits} {method}, set {s}: FID {per['fid'][-1]:.3f} FD to FP {per['fd_fp'][-1]:.3f} "
                    f"PSNR {per['psnr'][-1]:.1f} dB")
            out["methods"][f"{bits} {method}"] = dict(quant_s=qs, **{k: _stats(v) for k, v in per.items()})
            del res
    keys = list(out["methods"])
    out["pairs"] = {}
    for i, ka in enumerate(keys):
        for kb in keys[i + 1:]:
            pair = {}
            for metric, lower_better in (("fid", True), ("fd_fp", True), ("psnr", False)):
                d = [x - y for x, y in zip(out["methods"][ka][metric]["values"], out["methods"][kb][metric]["values"])]
                wins = sum((x < 0) if lower_better else (x > 0) for x in d)
                pair[metric] = dict(_stats(d), first_better_in=wins, sets=len(d))
            out["pairs"][f"{ka} - {kb}"] = pair
    return out


def format_summary(res: list) -> str:
    lines = ["| model | rows | FID mean ± std over sets | FD to FP samples | paired PSNR dB |", "|---|---|---|---|---|"]
    for r in res:
        f = r["fp"]["fid"]
        extra = f" (FD between two FP sets {r['fp']['fd_between_sets']:.3f})" if "fd_between_sets" in r["fp"] else ""
        lines.append(f"| {r['model']} | full precision | {f['mean']:.3f} ± {f['std']:.3f} | 0{extra} | - |")
        for k, v in r["methods"].items():
            lines.append(f"| {r['model']} | {k} | {v['fid']['mean']:.3f} ± {v['fid']['std']:.3f} | "
                         f"{v['fd_fp']['mean']:.3f} ± {v['fd_fp']['std']:.3f} | "
                         f"{v['psnr']['mean']:.1f} ± {v['psnr']['std']:.1f} |")
        for k, p in r["pairs"].items():
            lines.append(f"| {r['model']} | {k} | diff {p['fid']['mean']:+.3f} ± {p['fid']['std']:.3f} "
                         f"(first lower in {p['fid']['first_better_in']}/{p['fid']['sets']}) | "
                         f"diff {p['fd_fp']['mean']:+.3f} ± {p['fd_fp']['std']:.3f} "
                         f"({p['fd_fp']['first_better_in']}/{p['fd_fp']['sets']}) | "
                         f"diff {p['psnr']['mean']:+.2f} ({p['psnr']['first_better_in']}/{p['psnr']['sets']}) |")
    return "\n".join(lines)


def main(argv=None):
    from ..models.zoo import ZOO_NAMES
    from .zoo import LADDER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(ZOO_NAMES), choices=list(ZOO_NAMES))
    p.add_argument("--bits", nargs="+", default=["W4A4"], choices=list(LADDER))
    p.add_argument("--methods", nargs="+", default=["recon+ptqd", "efficientdm"])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sets", type=int, default=3, help="independent sample sets (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon-iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zoo_seeds.json"))
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print earlier runs' summary and exit")
    a = p.parse_args(argv)
    if a.table:
        res = []
        for path in a.table:
            with open(path) as f:
                res += json.load(f)["models"]
        print(format_summary(res))
        return res
    if a.samples < 2 or a.sets < 1:
        p.error("--samples must be at least 2 and --sets at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    res = []
    for name in a.models:
        res.append(run_model(name, a, log=lambda s: print(s, flush=True)))
        with open(a.out, "w") as f:
            json.dump(dict(argv=argv if argv is not None else __import__("sys").argv[1:], samples=a.samples,
                           sets=a.sets, torch=torch.__version__, machine=platform.machine(),
                           date=time.strftime("%Y-%m-%d"), models=res), f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    print()
    print(format_summary(res))
    return res


if __name__ == "__main__":
    main()
