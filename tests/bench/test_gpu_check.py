"""bench/gpu_check.py on a machine without a GPU: it skips cleanly, and its pure-Python parts (shape lists,
timing driver with a fake timer, ratio table, JSON file) work. Never needs a GPU."""
import json
import os
import subprocess
import sys

import pytest

from lowbit.bench import gpu_check as gc


def test_skips_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "lowbit.bench.gpu_check", "--out", os.devnull], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines == [gc.SKIP_MESSAGE]


def test_shape_lists_cover_sd15_and_sdxl():
    lin, conv = gc.linear_cases(), gc.conv_cases()
    assert {c.model for c in lin} == {"sd15", "sdxl"} == {c.model for c in conv}
    # batch 2 (CFG) at 512x512: 4096 tokens per image at the first attention level
    first = [c for c in lin if c.model == "sd15" and c.K == 320 and c.N == 320][0]
    assert first.M == 2 * 4096
    assert gc.linear_cases(batch=1)[0].M == 4096
    c = [c for c in conv if c.name == "conv 640@32x32"][0]
    assert c.gemm_shape() == (2 * 32 * 32, 640 * 9, 640)
    assert c.flops() == 2.0 * 2 * 32 * 32 * 640 * 9 * 640
    assert len({(c.model, c.name) for c in lin + conv}) == len(lin + conv)


def test_timing_driver_ratios_table_and_json(tmp_path):
    cases = [gc.LinearCase("sd15", "a", 8, 4, 2), gc.ConvCase("sd15", "b", 1, 2, 4, 4, 2)]
    cost = {"bf16": 2.0, "int_mm": 1.0, "W8A8": 1.5, "W4A16": 3.0}

    def variant(name):
        def make(case):
            if name == "W4A16" and case.kind == "conv":
                return None
            if name == "broken":
                raise RuntimeError("no kernel\nsecond line")
            return lambda: cost[name] * (2 if case.kind == "conv" else 1)
        return make

    variants = {n: variant(n) for n in ("bf16", "int_mm", "W8A8", "W4A16", "broken")}
    fake_timer = lambda fn: fn()  # noqa: E731  the "time" is what the fake kernel returns
    logs = []
    rows = gc.run_timings(cases, variants, fake_timer, log=logs.append)
    assert len(rows) == 10 and len(logs) == 2
    r = {(x["case"], x["variant"]): x for x in rows}
    assert r[("a", "W8A8")]["seconds"] == 1.5 and r[("a", "W8A8")]["x_bf16"] == pytest.approx(0.75)
    assert r[("a", "W8A8")]["x_int_mm"] == pytest.approx(1.5)
    assert r[("b", "W8A8")]["seconds"] == 3.0 and r[("b", "W8A8")]["x_bf16"] == pytest.approx(0.75)
    assert r[("a", "W8A8")]["tops"] == pytest.approx(2 * 8 * 4 * 2 / 1.5 / 1e12)
    assert r[("b", "W4A16")]["skipped"] == "not applicable"
    assert r[("a", "broken")]["error"] == "RuntimeError: no kernel"

    table = gc.ratio_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| model | case | bf16 | int_mm | W8A8 | W4A16 | broken |"
    assert lines[2] == ("| sd15 | a | 2000.000 ms (1.00) | 1000.000 ms (0.50) | 1500.000 ms (0.75) | "
                        "3000.000 ms (1.50) | error |")
    assert lines[3].endswith("| 3000.000 ms (0.75) | - | error |")

    path = gc.write_json(tmp_path / "sub" / "gpu.json", dict(meta={"gpu": "fake"}, kernels=rows))
    back = json.loads(path.read_text())
    assert back["meta"] == {"gpu": "fake"} and back["kernels"] == rows
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_deadline_skips_the_rest():
    clock = iter([0.0, 10.0]).__next__  # one reading per (case, variant)
    rows = gc.run_timings([gc.LinearCase("m", "a", 1, 1, 1), gc.LinearCase("m", "b", 1, 1, 1)],
                          {"bf16": lambda c: (lambda: 1.0)}, lambda fn: fn(), deadline=5.0, clock=clock,
                          log=lambda s: None)
    assert "seconds" in rows[0] and rows[1]["skipped"] == "time budget spent"


def test_median_timer_with_fake_clock():
    t = [0.0]
    calls = []

    def clock():
        return t[0]

    def fn():
        calls.append(1)
        t[0] += [0.1, 0.3, 0.2][len(calls) % 3]

    timer = gc.median_timer_factory(lambda: None, clock=clock, warmup=2, min_iters=5, max_iters=7, min_time=1.0)
    s = timer(fn)
    assert len(calls) == 2 + 5  # 5 timed calls already take >= 1.0 s of fake time
    assert s == pytest.approx(0.2)


def _tiny_unet():
    """A two-level cross-attention UNet small enough for CPU (the whole-UNet code path, not its speed)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8).eval()


def test_unet_part_runs_on_cpu_with_a_tiny_unet():
    """The whole-UNet code path (build, record one call, quantize_, deploy_, bf16 float parts, time) on CPU."""
    rows = gc.unet_timings(lambda fn: (fn(), 0.5)[1], device="cpu", latent=8, batch=2,
                           formats=("W8A8", "W8A8-tuned", "bf16-cl", "W8A8-tuned-cl"), build=_tiny_unet,
                           text_dim=32, log=lambda s: None, profile=True)
    assert [r["variant"] for r in rows] == ["bf16", "W8A8", "W8A8-tuned", "bf16-cl", "W8A8-tuned-cl"]
    assert all("error" not in r for r in rows), rows
    assert rows[1]["x_bf16"] == pytest.approx(1.0)
    assert 0 < rows[1]["rel_err_vs_bf16"] < 0.5 and 0 < rows[2]["rel_err_vs_bf16"] < 0.5
    # the host profile of the two W8A8 rows names our layers' forward among the functions it lists
    assert [bool(r.get("host_profile")) for r in rows] == [False, True, True, False, False]
    assert rows[1]["host_profile"][0].startswith("ncalls") and any("layers.py" in ln for ln in rows[1]["host_profile"])
    # channels-last: the same function (bf16 float rounding apart)
    assert rows[3]["rel_err_vs_bf16"] < 2e-2 and 0 < rows[4]["rel_err_vs_bf16"] < 0.5
    # the tuned row reports what the per-layer measurement chose; the untuned one does not tune
    assert "kernels" not in rows[1]
    chosen = rows[2]["kernels"]["layers"]
    from lowbit.kernels import registry
    assert sum(chosen.values()) > 0 and set(chosen) <= {b.name for b in registry.backends()} - {"eager"}



def test_unet_graph_section_records_errors_instead_of_failing():
    """The CUDA-graph part of the UNet timings (sync check, capture) runs after all rows and records what went wrong
    per row instead of raising; without CUDA every row says so and keeps its eager timing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the no-CUDA path; on a CUDA machine the graphs really run")

    logs = []
    rows = gc.unet_timings(lambda fn: (fn(), 0.5)[1], device="cpu", latent=8, batch=2, formats=("W8A8",),
                           build=_tiny_unet, text_dim=32, log=logs.append, graphs=True)
    assert [r["variant"] for r in rows] == ["bf16", "W8A8"]
    assert all(r["seconds"] == 0.5 and "graph_error" in r and "sync_point" in r for r in rows), rows
    assert sum("CUDA graph" in line for line in logs) == 2



def test_importing_the_check_does_not_import_triton(tmp_path):
    """The test suite imports gpu_check while collecting; were triton imported then, without TRITON_INTERPRET=1, every
    Triton interpreter test would skip (tests/kernels/conftest.py)."""
    import subprocess
    import sys

    code = "import sys, lowbit.bench.gpu_check; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
