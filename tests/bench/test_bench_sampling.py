"""bench/bench_sampling.py runs end to end on a tiny setting (a smoke test of the bench, not a timing)."""
import json

import pytest

from lowbit.bench import bench_sampling as bs


@pytest.mark.slow  # about 20 s on an idle 2-core machine, minutes when it is shared
def test_bench_sampling_smoke(tmp_path, capsys):
    out = tmp_path / "s.json"
    bs.main(["--models", "embedded", "--bits", "W8A8", "--samples", "8", "--steps", "2", "--repeats", "1",
             "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["model"] == "embedded"
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "bf16", "W8A8", "W8A8 untuned"}  # bf16: the float peer, on by default
    assert rows["fp32"]["x_fp32"] == 1.0
    # weight bytes with the backends' caches, after the runs: bf16 halves them, untuned W8A8 keeps int8 integers
    # (+ oneDNN's prepacked copy) and fp32 float parts
    assert rows["fp32"]["x_fp32_bytes"] == 1.0 and abs(rows["bf16"]["x_fp32_bytes"] - 0.5) < 0.01
    assert 0.2 < rows["W8A8 untuned"]["x_fp32_bytes"] < 0.8 and rows["W8A8"]["weight_bytes"] > 0
    choice = rows["W8A8"]["kernel_choice"]
    assert sum(choice["layers"].values()) > 0 and choice["untuned"] == 0  # every deployed layer was tuned
    assert choice["settled"]["mode"] in ("tuned", "float", "integer")  # the whole-model check ran
    assert "kernel_choice" not in rows["W8A8 untuned"]
    # the progress line names what is timed, in the order of the rows
    assert "timing fp32, bf16, W8A8, W8A8 untuned (1 alternating rounds)" in capsys.readouterr().out
    assert [r["variant"] for r in res["rows"]] == ["fp32", "bf16", "W8A8", "W8A8 untuned"]


def test_variant_plan_order_and_kinds():
    plan = bs.variant_plan(["W8A8", "W4A8"], untuned=True, peers=["bf16"], bf16_parts=True)
    assert [n for n, _, _ in plan] == ["fp32", "bf16", "W8A8", "W8A8-bf16", "W8A8 untuned",
                                       "W4A8", "W4A8-bf16", "W4A8 untuned"]
    assert [k for _, b, k in plan if b == "W4A8"] == ["tuned", "bf16-parts", "untuned"]
    assert bs.variant_plan(["W8A8"], untuned=False, peers=[]) == [("fp32", None, "fp32"), ("W8A8", "W8A8", "tuned")]
    assert bs.variant_plan(["W8A8"], untuned=False, peers=[], unfused=True)[1:] == [
        ("W8A8", "W8A8", "tuned"), ("W8A8 unfused", "W8A8", "unfused")]


def test_unfused_variant_keeps_the_gelus_and_restores_the_switch(monkeypatch):
    """``deployed(..., fuse=False)``: the same deployment with LOWBIT_FUSE_ACT=0 for that call only."""
    import os

    import torch.nn as nn

    from lowbit.quant.fuse import FusedSequential

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x, t=None):
            return self.mlp(x)

    import torch

    torch.manual_seed(0)
    m = M().eval()
    subj = bs._Subject("toy", m, run=None, calib_run=lambda model: model(torch.randn(4, 8), torch.tensor([1] * 4)))
    monkeypatch.delenv("LOWBIT_FUSE_ACT", raising=False)
    unfused = bs.deployed(subj, "W8A8", tune=False, fuse=False)
    assert "LOWBIT_FUSE_ACT" not in os.environ
    fused = bs.deployed(subj, "W8A8", tune=False)
    assert type(unfused.mlp) is nn.Sequential and isinstance(fused.mlp, FusedSequential)


def test_bf16_peer_casts_floats_only_and_returns_fp32():
    """The bf16 peer runs its model in bf16 behind the fp32 interface the samplers use: floating arguments cast,
    integer ones (timesteps, labels) untouched, a ``.sample`` output unwrapped and returned in fp32."""
    import torch

    class Out:
        def __init__(self, sample):
            self.sample = sample

    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t, cond=None):
            seen.update(x=x.dtype, t=t.dtype, cond=cond.dtype, w=self.lin.weight.dtype)
            return Out(self.lin(x) + cond)

    net = Net()
    ref = net(torch.ones(2, 4), torch.tensor([1, 2]), cond=torch.zeros(2, 4)).sample
    y = bs.Bf16(net)(torch.ones(2, 4), torch.tensor([1, 2]), cond=torch.zeros(2, 4))  # net cast in place
    assert seen == dict(x=torch.bfloat16, t=torch.int64, cond=torch.bfloat16, w=torch.bfloat16)
    assert y.dtype == torch.float32 and y.shape == (2, 4)
    assert torch.allclose(y, ref, atol=0.05) and not torch.equal(y, ref)  # bf16 arithmetic, not fp32


def test_unknown_peer_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bs.main(["--peers", "fp16", "--models", "embedded"])
    assert "unknown peer" in capsys.readouterr().err
