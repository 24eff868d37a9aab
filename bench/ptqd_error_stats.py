"""Per-timestep anatomy of the quantization error on the embedded model: PTQD's statistics for several methods.

    python -m lowbit.bench.ptqd_error_stats [--bits W4A4] [--methods naive recon] [--steps 15]

For each method, the error eps_q - eps_fp on full-precision DDIM trajectories is split into a part correlated
with eps (k_t), a per-channel mean (bias b_t, here one channel) and the uncorrelated rest (variance v_t), with
the paper's noise model (no input term). Random error (v) is partly absorbed by a stochastic sampler's own
noise (eta > 0); a bias of the same sign at every step accumulates whatever the sampler.
"""
from __future__ import annotations

import argparse

import torch

from lowbit.quant import PTQDConfig, ReconConfig, collect_stats, timestep_aware_subset
from lowbit.recipes import build, default_setup, record_calibration


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--methods", nargs="+", default=["naive", "recon"])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--recon-iters", type=int, default=100)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    setup = default_setup()
    calls = record_calibration(setup, n_samples=32, steps=a.steps)
    calib = timestep_aware_subset(calls, 10)
    rows = {}
    for m in a.methods:
        b = build(setup, m, a.bits, calib, deploy=False, recon=ReconConfig(weight_iters=a.recon_iters))
        rows[m] = collect_stats(setup.unet, b.model, calls, PTQDConfig(input_correlation=False))
    ts = next(iter(rows.values())).t
    head = " | ".join(f"{m}: k, bias, var" for m in a.methods)
    print(f"| t | {head} |")
    print("|---|" + "---|" * len(a.methods))
    for i, t in enumerate(ts):
        cells = " | ".join(f"{float(s.k[i]):+.3f}, {float(s.bias[i].mean()):+.3f}, {float(s.var[i]):.4f}"
                           for s in rows.values())
        print(f"| {float(t):.0f} | {cells} |")


if __name__ == "__main__":
    main()
