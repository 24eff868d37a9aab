"""Speed of an EfficientDM-merged UNet against the plain quantized UNet it started from (issue 5).

    python -m lowbit.bench.bench_merged [--bits W4A4] [--ft-steps 30] [--calls 60] [--threads 1]

Both run deployed (packed integers through ``lowbit.kernels``); the merged model carries no adapter, so the
ratio should be 1.0 up to noise. Calls alternate between the two models (same inputs) so that the load of a
shared machine hits both alike; the median time per UNet call is reported, with the unmerged fine-tuned model
(LoRA recomputed in every forward, as in the official code) for comparison.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lowbit import models as M
from lowbit.quant import CallRecorder, FinetuneConfig, QuantConfig, deploy_, quantize
from lowbit.quant import efficientdm as E


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--ft-steps", type=int, default=30)
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    teacher = M.load_default_unet()
    with CallRecorder(teacher) as rec:
        M.sample(teacher, torch.arange(16) % 10, steps=10, eta=0.0, guidance=1.0, seed=0,
                 scheduler=M.default_scheduler())
    q = quantize(teacher, QuantConfig.preset(a.bits), rec.calls)
    ft = E.finetune(q, teacher, rec.calls, FinetuneConfig(steps=a.ft_steps, time_bins=10))
    merged = deploy_(E.merge_(copy.deepcopy(ft)))
    plain = deploy_(copy.deepcopy(q))
    models = {"plain quantized (deployed)": plain, "EfficientDM merged (deployed)": merged,
              "EfficientDM unmerged (fake-quant + LoRA)": ft}
    times = {k: [] for k in models}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, M.IMAGE_SIZE, M.IMAGE_SIZE, generator=g)
    lab = torch.arange(a.batch) % 10
    with torch.no_grad():
        for m in models.values():  # warm-up (kernel caches, prepacking)
            m(x, torch.full((a.batch,), 500), class_labels=lab)
        for i in range(a.calls):
            t = torch.full((a.batch,), int(torch.randint(1, 999, (1,), generator=g)))
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x, t, class_labels=lab)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["plain quantized (deployed)"])
    print(f"{a.bits}, batch {a.batch}, {a.calls} calls each, {a.threads} thread(s)")
    print("| model | median ms / UNet call | x plain quantized |")
    print("|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med * 1000:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
