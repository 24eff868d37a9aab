"""bench/act_quant_codes.py end to end on a tiny setting (a smoke test of the bench and of what it reports)."""
import json
import os

import pytest

from lowbit.bench import act_quant_codes as aq


def test_psnr():
    import torch

    a = torch.zeros(10)
    assert aq.psnr(a, a, 1.0) == float("inf")
    assert abs(aq.psnr(a, a + 0.1, 1.0) - 20.0) < 1e-4


@pytest.mark.slow  # about 20 s on an idle 2-core machine
def test_act_quant_codes_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1")  # the bench must restore what it found
    out = tmp_path / "a.json"
    aq.main(["--models", "embedded", "--samples", "8", "--steps", "2", "--threads", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert os.environ["LOWBIT_CPU_EXACT_ACT_QUANT"] == "1"
    assert row["model"] == "embedded" and row["codes"] > 10_000
    assert row["codes_differing"] / row["codes"] < 1e-3  # one step off at rare ties, not a different quantizer
    assert set(row["psnr_vs_fp"]) == {"integer fused", "float fused", "integer exact", "float exact"}
    assert all(20 < v < 200 for v in row["psnr_vs_fp"].values())  # quantized, not broken, not the float model
