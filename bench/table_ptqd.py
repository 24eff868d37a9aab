"""PTQD quality table on the embedded default model (issue 4).

    python -m lowbit.bench.table_ptqd [--samples 1000] [--steps 25] [--bits W8A8 W4A8 W4A4]

For each format and each DDIM eta (0 and 1): full precision; naive PTQ; + reconstruction; + PTQD correction
(bias + correlated noise); + variance calibration; + step-aware mixed precision. FID is measured in the
digit classifier's feature space against 400 held-out real digits ("FID" on this model, not Inception FID);
class accuracy is the fraction of samples the classifier assigns to their intended class.
Writes bench/results/ptqd.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from lowbit.quant import ReconConfig, timestep_aware_subset
from lowbit.recipes import build, default_setup, evaluate, record_calibration

LADDER = ["naive", "recon", "recon+act", "recon+ptqd(paper)", "recon+ptqd", "recon+ptqd+vsc", "recon+ptqd+vsc+mixed"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4"])
    p.add_argument("--methods", nargs="+", default=LADDER,
                   help="method names of lowbit.quant.pipeline (e.g. recon+ptqd+vsc; ablations recon+act, "
                        "recon+minmax-acts, recon+ptqd(paper))")
    p.add_argument("--etas", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--recon-iters", type=int, default=300, help="AdaRound steps per unit")
    p.add_argument("--act-iters", type=int, default=100,
                   help="steps per unit of BRECQ's activation pass (method recon+act only)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--deployed", action="store_true",
                   help="sample with the packed integer kernels (default: fake-quant mode, the same function "
                        "up to float summation order, much faster for this tiny model on CPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ptqd.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    setup = default_setup()
    calls_all = record_calibration(setup, n_samples=a.calib_samples, steps=a.steps)
    calib = timestep_aware_subset(calls_all, 10)  # timestep-aware calibration set
    recon = ReconConfig(weight_iters=a.recon_iters)
    rows = []
    for eta in a.etas:
        fp = evaluate(setup, setup.unet, n=a.samples, steps=a.steps, eta=eta)
        rows.append(dict(bits="fp32", method="full precision", eta=eta, fid=fp["fid"], acc=fp["acc"], build_s=0.0))
        print(f"eta={eta} fp32: FID {fp['fid']:.3f} acc {fp['acc']:.3f}", flush=True)
    for bits in a.bits:
        for m in a.methods:
            rc = dataclasses.replace(recon, act_iters=a.act_iters) if "+act" in m else recon
            b = build(setup, m, bits, calib, deploy=a.deployed, recon=rc, stat_calls=calls_all)
            for eta in a.etas:
                ev = evaluate(setup, b.model, n=a.samples, steps=a.steps, eta=eta, var_fn=b.var_fn)
                rows.append(dict(bits=bits, method=m, eta=eta, fid=ev["fid"], acc=ev["acc"], build_s=b.seconds,
                                 **({"schedule": [list(s) for s in b.info["schedule"]]}
                                    if "schedule" in b.info else {})))
                print(f"eta={eta} {bits} {m}: FID {ev['fid']:.3f} acc {ev['acc']:.3f} (built in {b.seconds:.0f}s)",
                      flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(samples=a.samples, steps=a.steps, deployed=a.deployed, argv=argv or __import__("sys").argv[1:],
                       rows=rows), f, indent=1)
    print()
    print(format_rows(rows))


def format_rows(rows):
    fp = {r["eta"]: r["fid"] for r in rows if r["bits"] == "fp32"}
    out = ["| bits | method | eta | FID (x FP) | class acc |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['bits']} | {r['method']} | {r['eta']:g} | {r['fid']:.3f} ({r['fid'] / fp[r['eta']]:.2f}) | "
                   f"{r['acc']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
