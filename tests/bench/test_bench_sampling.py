"""bench/bench_sampling.py runs end to end on a tiny setting (a smoke test of the bench, not a timing)."""
import json

import pytest

from lowbit.bench import bench_sampling as bs


@pytest.mark.slow  # about 20 s on an idle 2-core machine, minutes when it is shared
def test_bench_sampling_smoke(tmp_path):
    out = tmp_path / "s.json"
    bs.main(["--models", "embedded", "--bits", "W8A8", "--samples", "8", "--steps", "2", "--repeats", "1",
             "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["model"] == "embedded"
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "W8A8", "W8A8 untuned"}
    assert rows["fp32"]["x_fp32"] == 1.0
    choice = rows["W8A8"]["kernel_choice"]
    assert sum(choice["layers"].values()) > 0 and choice["untuned"] == 0  # every deployed layer was tuned
    assert choice["settled"]["mode"] in ("tuned", "float", "integer")  # the whole-model check ran
    assert "kernel_choice" not in rows["W8A8 untuned"]
