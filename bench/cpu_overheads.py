"""What a parallel region, a layout and an allocation cost on this CPU: the small effects behind the deployed
model's CPU speed on small models (issue 16; bench/README.md, "OpenMP waiting").

    python -m lowbit.bench.cpu_overheads [--threads 2] [--out bench/results/cpu_overheads_<policy>.json]

Under the process's OpenMP waiting policy (``OMP_WAIT_POLICY``; the benches set PASSIVE unless told
``OMP_WAIT_POLICY=default``), at activation shapes of the zoo's 16x16 / 8x8 UNets (batch 64), medians of 5 x 200
calls:

* ``quantize``: ``torch.quantize_per_tensor`` (the CPU kernels' fused activation quantizer) on all threads and on
  the calling thread alone (``kernels.cpu._serial``, what the kernels do under PASSIVE up to 1M values);
* ``copy_nchw``: a channels-last fp32 tensor copied to NCHW (after every oneDNN int8 convolution), both ways;
  ``copy_same_layout``: the same bytes copied without a layout change (``clone``), the yardstick;
  ``codes_channels_last``: uint8 NCHW codes copied to channels-last (what oneDNN's int8 convolution does with
  NCHW input codes): torch's eager copy between layouts is an element-by-element strided loop, several times a
  plain copy, and 1-byte elements cost about what 4-byte ones do;
* ``group_norm``: ``F.group_norm`` on NCHW and on channels-last input (why the deployed model does not stay
  channels-last between layers);
* ``region_us``: the cost of one parallel region, as the time of a tiny parallel op (quantizing 64K values on all
  threads) minus the same op on one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(64, 64, 4, 4), (64, 64, 8, 8), (64, 32, 16, 16), (64, 64, 16, 16), (128, 128, 8, 8)]
CALLS, ROUNDS = 200, 5


def _one_thread(fn):
    from ..kernels.cpu import _serial  # (lazily: importing lowbit.kernels imports triton, whose tests need the
    # interpreter switched on first, tests/kernels/conftest.py)

    return _serial(1 << 62, 0, fn)  # the kernels' own helper, with every size under its limit


def median_us(fn) -> float:
    n, rounds = CALLS, ROUNDS
    for _ in range(min(20, n)):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(ts)


def measure(threads: int) -> list:
    torch.set_num_threads(threads)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape)
        xcl = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        u8 = torch.randint(0, 256, shape, dtype=torch.uint8)

        def quant(t=x):
            return torch.quantize_per_tensor(t, 0.05, 128, torch.quint8)

        row = dict(shape=list(shape), numel=x.numel(),
                   quantize_parallel=median_us(quant),
                   quantize_one_thread=median_us(lambda: _one_thread(quant)),
                   copy_nchw_parallel=median_us(xcl.contiguous),
                   copy_nchw_one_thread=median_us(lambda: _one_thread(xcl.contiguous)),
                   copy_same_layout=median_us(x.clone),
                   codes_channels_last=median_us(lambda: u8.contiguous(memory_format=torch.channels_last)),
                   group_norm_nchw=median_us(lambda: F.group_norm(x, 32, w, b)),
                   group_norm_channels_last=median_us(lambda: F.group_norm(xcl, 32, w, b)))
        rows.append(row)
        print(" | ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"OMP_WAIT_POLICY={policy}, {a.threads} threads, times in microseconds", flush=True)
    rows = measure(a.threads)
    small = torch.randn(1 << 16)

    def q():
        return torch.quantize_per_tensor(small, 0.05, 128, torch.quint8)

    region = median_us(q) - median_us(lambda: _one_thread(q))
    print(f"one parallel region costs about {region:.0f} us here (64K-value quantization, all threads - one)")
    gn = [r["group_norm_channels_last"] / r["group_norm_nchw"] for r in rows]
    print(f"channels-last GroupNorm / NCHW GroupNorm: {min(gn):.1f}-{max(gn):.1f}x")
    cp = [r["copy_nchw_parallel"] / r["copy_same_layout"] for r in rows]
    u8 = [r["codes_channels_last"] / r["copy_same_layout"] for r in rows]
    print(f"channels-last -> NCHW fp32 copy / same-layout fp32 copy: {min(cp):.1f}-{max(cp):.1f}x; "
          f"uint8 NCHW -> channels-last / same-layout fp32 copy: {min(u8):.1f}-{max(u8):.1f}x")
    out = Path(a.out) if a.out else RESULTS / f"cpu_overheads_{policy.lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(threads=a.threads, omp_wait_policy=policy, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), load_avg=os.getloadavg())
    out.write_text(json.dumps(dict(meta=meta, region_us=region, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
