"""Would int8 attention products make a quantized UNet faster on CPU? (issue 16: "int8 attention products (QK^T,
AV) as an option with its quality measured").

    python -m lowbit.bench.attention_int8 [--threads 2] [--repeats 5] [--out bench/results/attention_int8.json]

Attention is not a quantized layer in LowBit; on the 2-core AMX Xeon it is 27-45 % of a deployed W8A8 SD1.5
UNet forward (README, "Speed and memory"). This bench times, at the self-attention shapes of SD1.5 and SDXL UNets
(batch 1), torch's fused ``scaled_dot_product_attention`` in fp32 and bf16 against an int8 attention built from
torch's integer matrix product (``torch._int_mm``, the op behind LowBit's CPU Linear kernels):

* q and k quantized per token (symmetric int8, head dim zero-padded to a multiple of 16), ``S = q k^T`` in int32,
  scaled back to fp32, softmax in fp32 (in blocks of ``--chunk`` query rows, so the scores stay small);
* the probabilities quantized per row (``p / max(p) * 127``), V per channel, ``P V`` in int32, scaled back.

Quality: relative error against fp32 SDPA on random inputs whose logits have a standard deviation of about 3
(peaked attention, as trained models have; uniform attention would hide the probability quantization's error).
Prints the times and their ratios to fp32 / bf16 SDPA and writes JSON."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
# (name, heads, tokens, head dim): self-attention of the largest transformer level of each UNet, batch 1
SHAPES = [("SD1.5 512px, 64x64 latent level", 8, 4096, 40), ("SD1.5 512px, 32x32 level", 8, 1024, 80),
          ("SDXL 1024px, 64x64 latent level", 10, 4096, 64)]


def _sym_int8(x: torch.Tensor, dim: int):
    """Symmetric int8 codes of x and their fp32 scales along ``dim`` (reduced dimension kept)."""
    s = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / s).to(torch.int8), s


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Softmax attention of fp32 [B, H, L, D] q, k, v with both matrix products in int8 (``torch._int_mm``):
    see the module docstring. Same shape and dtype as ``F.scaled_dot_product_attention(q, k, v)``."""
    b, h, n, d = q.shape
    dp = -(-d // 16) * 16
    qi, sq = _sym_int8(F.pad(q, (0, dp - d)), -1)  # [B, H, L, dp], scale [B, H, L, 1]
    ki, sk = _sym_int8(F.pad(k, (0, dp - d)), -1)
    vi, sv = _sym_int8(v, -2)  # per channel: scale [B, H, 1, D]
    out = torch.empty_like(q)
    scale = d ** -0.5
    for bi in range(b):
        for hi in range(h):
            kt = ki[bi, hi].t().contiguous()
            skr = sk[bi, hi].t() * scale  # [1, L]
            for r in range(0, n, chunk):
                s = torch._int_mm(qi[bi, hi, r:r + chunk].contiguous(), kt).float()
                s.mul_(sq[bi, hi, r:r + chunk]).mul_(skr)
                p = torch.softmax(s, dim=-1)
                pmax = p.amax(dim=-1, keepdim=True)
                pi = torch.round(p.mul_(127.0 / pmax)).to(torch.int8)
                o = torch._int_mm(pi, vi[bi, hi]).float()
                out[bi, hi, r:r + chunk] = o.mul_(pmax / 127.0).mul_(sv[bi, hi])
    return out


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


def run(shapes=None, repeats: int = 5, chunk: int = 256, log=print) -> list:
    rows = []
    for name, h, n, d in SHAPES if shapes is None else shapes:
        g = torch.Generator().manual_seed(0)
        # logits q.k / sqrt(d) with std ~3: q, k entries with std sqrt(3)
        q, k, v = (torch.randn(1, h, n, d, generator=g) * (3.0 ** 0.5 if i < 2 else 1.0) for i in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        row = dict(shape=name, heads=h, tokens=n, head_dim=d,
                   sdpa_fp32_ms=_median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats),
                   sdpa_bf16_ms=_median_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), repeats),
                   int8_ms=_median_ms(lambda: int8_attention(q, k, v, chunk), repeats),
                   rel_err_bf16=_rel(F.scaled_dot_product_attention(qb, kb, vb), ref),
                   rel_err_int8=_rel(int8_attention(q, k, v, chunk), ref))
        row["int8_x_fp32"] = row["int8_ms"] / row["sdpa_fp32_ms"]
        row["int8_x_bf16"] = row["int8_ms"] / row["sdpa_bf16_ms"]
        rows.append(row)
        log(f"{name} ({h} heads x {n} tokens x {d}): SDPA fp32 {row['sdpa_fp32_ms']:.1f} ms, bf16 "
            f"{row['sdpa_bf16_ms']:.1f} ms, int8 products {row['int8_ms']:.1f} ms = {row['int8_x_fp32']:.2f}x fp32, "
            f"{row['int8_x_bf16']:.2f}x bf16; relative error bf16 {row['rel_err_bf16']:.4f}, "
            f"int8 {row['rel_err_int8']:.4f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256, help="query rows per block of scores")
    p.add_argument("--out", default=str(RESULTS / "attention_int8.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(repeats=a.repeats, chunk=a.chunk)
    meta = dict(threads=a.threads, repeats=a.repeats, chunk=a.chunk, torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
