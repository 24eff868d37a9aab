"""bench/bench_kernels.py on tiny shapes: it times static W8A8 on each CPU backend that accepts it, writes JSON."""
import json

import torch


def test_small_shapes_time_every_cpu_backend(tmp_path, monkeypatch):
    # (imported here, not at collection: lowbit.kernels imports triton, which tests/kernels/conftest.py must import
    # first, under TRITON_INTERPRET=1)
    from lowbit.bench import bench_kernels as bk
    from lowbit.kernels import vnni

    monkeypatch.setattr(bk, "SMALL_LINEAR_SHAPES", [(8, 16, 24)])
    threads = torch.get_num_threads()
    out = tmp_path / "k.json"
    bk.main(["--threads", "1", "--budget", "0.01", "--shapes", "small", "--out", str(out)])
    torch.set_num_threads(threads)
    d = json.loads(out.read_text())
    assert d["meta"]["shapes"] == "small" and {r["case"] for r in d["rows"]} == {"linear 8x16->24"}
    by = {r["variant"]: r for r in d["rows"]}
    want = {"W8A8 static (onednn)", "W8A8 static (dense)"} | (set() if vnni.unavailable() else {"W8A8 static (vnni)"})
    assert want <= set(by), sorted(by)
    for name in want:
        assert by[name]["backend"] == name[len("W8A8 static ("):-1] and by[name]["ms"] > 0
        assert by[name]["rel_err_vs_fp32"] < 0.05
