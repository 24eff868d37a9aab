"""bench/attention_int8.py: its int8 attention computes attention (close to SDPA, and wrong if a scale is dropped),
and the bench runs end to end on a tiny shape and writes what it printed."""
import json

import torch
import torch.nn.functional as F

from lowbit.bench import attention_int8 as ai


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * s for s in (1.7, 1.7, 1.0)]


def test_int8_attention_matches_sdpa():
    q, k, v = _inputs((2, 3, 96, 40))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = ai.int8_attention(q, k, v, chunk=32)  # several query blocks, padded head dim (40 -> 48)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ai._rel(out, ref) < 0.06
    # the probabilities' per-row scale matters: without it most codes round to 0
    bad = ai._rel(F.scaled_dot_product_attention(q, k, v * 0.5), ref)
    assert ai._rel(out, ref) < bad / 5


def test_attention_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(ai, "SHAPES", [("tiny", 2, 64, 24)])
    threads = torch.get_num_threads()
    out = tmp_path / "a.json"
    ai.main(["--threads", "1", "--repeats", "1", "--chunk", "32", "--out", str(out)])
    torch.set_num_threads(threads)
    d = json.loads(out.read_text())
    (row,) = d["rows"]
    assert row["tokens"] == 64 and row["head_dim"] == 24
    assert all(row[k] > 0 for k in ("sdpa_fp32_ms", "sdpa_bf16_ms", "int8_ms"))
    assert row["rel_err_int8"] < 0.1 and row["int8_x_bf16"] == row["int8_ms"] / row["sdpa_bf16_ms"]
