"""Soak: many generations with a quantized model in one process; memory must stay flat and outputs
deterministic for a fixed seed (issue 8).

    python -m lowbit.bench.soak [--runs 50] [--bits W8A8]
"""
from __future__ import annotations

import argparse
import gc
import os

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def soak(runs=50, bits="W8A8", steps=10, n=8, model=None, setup=None):
    from lowbit.quant import timestep_aware_subset
    from lowbit.recipes import build, default_setup, generate, record_calibration

    setup = setup or default_setup()
    if model is None:
        calls = timestep_aware_subset(record_calibration(setup, n_samples=8, steps=10), 5)
        model = build(setup, "naive", bits, calls).model
    first, mem = None, []
    for i in range(runs):
        imgs, _ = generate(setup, model, n, steps=steps, seed=11, batch=n)
        if first is None:
            first = imgs
        elif not torch.equal(first, imgs):
            raise AssertionError(f"generation {i} differs from generation 0 with the same seed")
        gc.collect()
        mem.append(rss_mb())
    return mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--bits", default="W8A8")
    a = p.parse_args(argv)
    mem = soak(a.runs, a.bits)
    print(f"{a.runs} generations, {a.bits}: RSS after run 1 {mem[0]:.1f} MB, after run {a.runs} {mem[-1]:.1f} MB "
          f"(max {max(mem):.1f} MB); outputs identical for the fixed seed")


if __name__ == "__main__":
    main()
