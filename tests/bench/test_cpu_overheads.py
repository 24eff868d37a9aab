"""bench/cpu_overheads.py on a tiny setting: it runs, measures both ways and writes what it printed."""
import json

import torch

from lowbit.bench import cpu_overheads as co


def test_cpu_overheads_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(co, "SHAPES", [(2, 32, 4, 4)])
    monkeypatch.setattr(co, "CALLS", 3)
    monkeypatch.setattr(co, "ROUNDS", 1)
    threads = torch.get_num_threads()
    out = tmp_path / "o.json"
    co.main(["--threads", "1", "--out", str(out)])
    torch.set_num_threads(threads)
    d = json.loads(out.read_text())
    (row,) = d["rows"]
    assert row["shape"] == [2, 32, 4, 4] and row["numel"] == 1024
    keys = ("quantize_parallel", "quantize_one_thread", "copy_nchw_parallel", "copy_nchw_one_thread",
            "group_norm_nchw", "group_norm_channels_last", "copy_same_layout", "codes_channels_last")
    assert all(row[k] > 0 for k in keys)
    assert d["meta"]["threads"] == 1 and isinstance(d["region_us"], float)
