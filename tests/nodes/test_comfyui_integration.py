"""End-to-end tests against a real ComfyUI (CPU, headless). Skipped unless COMFYUI_DIR is set:

    bash tests/nodes/setup_comfyui.sh /work/ComfyUI          # once: checkout + venv (../comfy-venv)
    COMFYUI_DIR=/work/ComfyUI python -m pytest tests/nodes/test_comfyui_integration.py -x -q
"""
from __future__ import annotations

import re
import time

import pytest

import comfy_harness
from comfy_harness import baseline_graph

pytestmark = pytest.mark.comfyui

CORE_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage")
# LowBit's __init__ logs "LowBit: the ComfyUI nodes failed to load (...); the pack is disabled."; ComfyUI logs
# "Cannot import <path> module for custom nodes" and "(IMPORT FAILED): <path>".
PACK_FAILURE_RE = re.compile(r"^.*(LowBit\b.*(failed to (load|import)|import(ing)? failed|pack is disabled)|"
                             r"Cannot import .*custom_nodes[/\\]lowbit\b|"
                             r"IMPORT FAILED\): .*custom_nodes[/\\]lowbit\b).*$", re.I | re.M)


def _combo_options(spec) -> list:
    """Values of a COMBO input in /object_info: V1 ``[[values...], {...}]`` or V3 ``["COMBO", {"options": [...]}]``."""
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 else {}).get("options", [])


def test_server_starts_with_pack_loaded(comfy, comfyui_dir, comfyui_python, record_property):
    server = comfy.server
    record_property("comfyui_start_seconds", round(server.start_seconds, 1))
    print(f"\nComfyUI answered /object_info after {server.start_seconds:.1f}s")
    log = server.log_text()
    expected = comfy_harness.expected_pack_nodes(comfyui_dir, comfyui_python)

    failures = [m.group(0) for m in PACK_FAILURE_RE.finditer(log)]
    if expected is None:
        # Phase 1: lowbit/nodes/__init__.py does not define NODE_CLASS_MAPPINGS yet, so the pack's __init__ logs
        # "cannot import name 'NODE_CLASS_MAPPINGS'" and registers no node. Only that failure is tolerated.
        failures = [f for f in failures if "cannot import name 'NODE_CLASS_MAPPINGS'" not in f]
        print("lowbit.nodes defines no NODE_CLASS_MAPPINGS yet: checked only that the pack imported")
    assert not failures, "LowBit failed to import in ComfyUI:\n" + "\n".join(failures)
    assert server.pack_import_status() == "ok", (
        "custom_nodes/lowbit is not listed as imported in ComfyUI's 'Import times for custom nodes' block")

    info = comfy.object_info()
    missing_core = [n for n in CORE_NODES if n not in info]
    assert not missing_core, f"core nodes missing from /object_info: {missing_core}"
    ckpts = _combo_options(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"])
    assert comfy.checkpoint in ckpts, f"fixture checkpoint {comfy.checkpoint} not offered: {ckpts}"

    if expected:  # lowbit.nodes defines NODE_CLASS_MAPPINGS: every node must be registered by the server
        missing = sorted(set(expected) - set(info))
        assert not missing, f"LowBit nodes missing from /object_info: {missing} (expected {sorted(expected)})"
        wrong_module = {n: info[n].get("python_module") for n in expected
                        if info[n].get("python_module") not in (None, f"custom_nodes.{comfy_harness.PACK_NAME}")}
        assert not wrong_module, f"these names are registered by another module (core name clash?): {wrong_module}"


def test_baseline_sd15_graph_runs(comfy, record_property):
    graph = baseline_graph(comfy.checkpoint, steps=2, size=64, cfg=7.0)
    t0 = time.perf_counter()
    history = comfy.run(graph, timeout=900)
    seconds = time.perf_counter() - t0
    record_property("baseline_graph_seconds", round(seconds, 1))
    print(f"\nbaseline graph (2 steps, 64x64) ran in {seconds:.1f}s")

    assert history["status"]["status_str"] == "success"
    records = comfy.output_images(history, "7")
    assert len(records) == 1, f"SaveImage returned {records}"
    assert records[0]["type"] == "output"
    img = comfy.image(records[0]["filename"], records[0]["subfolder"], records[0]["type"])
    assert img.size == (64, 64)
    assert img.mode == "RGB"
    lo, hi = img.convert("L").getextrema()
    assert hi > lo, "decoded image is constant"
