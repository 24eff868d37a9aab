"""The example workflows, checked WITHOUT ComfyUI: layout (no node drawn over another, with the height the
frontend gives a LowBit node from its inputs), file names (nothing saved into ``models/lowbit/lowbit/``), every
GPU-sized workflow shipping a CPU-sized variant of the same graph, every LowBit widget value present, and the
Quantize node's stage names on the console (``StageLog``).

Running them unmodified in a real ComfyUI, timed: ``test_comfyui_examples.py``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import lowbit.nodes as nodes_pkg
from lowbit.nodes.common import StageLog
from lowbit.quant.config import METHODS
from test_comfyui_examples import FRONTEND_ONLY, ui_to_api

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))

# LiteGraph's drawing constants (the ComfyUI frontend's defaults): title bar above ``pos``, one row per slot,
# one row per widget.
TITLE_H, SLOT_H, WIDGET_H, MARGIN = 30, 20, 24, 8
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _min_height(node_type: str, node: dict) -> float:
    """The least body height the frontend gives a LowBit node (its slots, then one row per widget)."""
    cls = nodes_pkg.NODE_CLASS_MAPPINGS.get(node_type)
    if cls is None:
        return 0.0
    spec = cls.INPUT_TYPES()
    sockets = widgets = 0
    for section in ("required", "optional"):
        for _, entry in spec.get(section, {}).items():
            if isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
                widgets += 1
            else:
                sockets += 1
    outputs = len(cls.RETURN_TYPES)
    return max(sockets, outputs) * SLOT_H + widgets * WIDGET_H + MARGIN


def _boxes(wf: dict):
    for n in wf["nodes"]:
        x, y = n["pos"]
        w, h = n.get("size", [200, 50])
        h = max(h, _min_height(n["type"], n))
        yield n["id"], n["type"], (x, y - TITLE_H, x + w, y + h)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_no_node_covers_another(path):
    boxes = list(_boxes(json.loads(path.read_text())))
    overlaps = []
    for i, (ida, ta, a) in enumerate(boxes):
        for idb, tb, b in boxes[i + 1:]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                overlaps.append(f"{ta} #{ida} and {tb} #{idb}")
    assert not overlaps, f"{path.name}: nodes drawn over each other: {overlaps}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_save_prefixes_do_not_repeat_the_models_folder(path):
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        if n["type"] == "LowBitSaveQuantizedUNet":
            prefix = (n.get("widgets_values") or [""])[0]
            assert not prefix.replace("\\", "/").startswith("lowbit/"), (
                f"{path.name}: node {n['id']} saves to models/lowbit/{prefix}_NNNNN (models/lowbit/lowbit/...); "
                "the save node already writes under models/lowbit/")


def test_the_overlap_check_can_fail():
    """The check above sees a LowBit node's real height: a node placed inside Quantize UNet's widget area
    (below the 330 px the workflow file says, above the height its 12 widgets need) is an overlap."""
    wf = {"nodes": [{"id": 1, "type": "LowBitQuantizeUNet", "pos": [0, 0], "size": [360, 330]},
                    {"id": 2, "type": "LowBitBitwidthSchedule", "pos": [0, 380], "size": [340, 140]}]}
    (_, _, a), (_, _, b) = list(_boxes(wf))
    assert a[3] > 330 and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------ CPU-sized variants (issue 14)
GPU_SIZED = [p for p in WORKFLOWS if not p.stem.endswith("_cpu")]
WIDGETS_OF = {"EmptyLatentImage": ("width", "height"), "KSampler": ("steps",), "BasicScheduler": ("steps",)}


def _graph(wf):
    nodes = {n["id"]: n["type"] for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY}
    return nodes, sorted(tuple(link[:5]) for link in wf["links"])


@pytest.mark.parametrize("path", GPU_SIZED, ids=[p.stem for p in GPU_SIZED])
def test_every_gpu_sized_workflow_ships_a_cpu_variant_of_the_same_graph(path):
    cpu = path.with_name(path.stem + "_cpu.json")
    assert cpu.is_file(), f"{path.name} is sized for a GPU (512 px) and ships no CPU-sized {cpu.name}"
    gpu_wf, cpu_wf = json.loads(path.read_text()), json.loads(cpu.read_text())
    assert _graph(gpu_wf) == _graph(cpu_wf), f"{cpu.name} is not the same graph as {path.name}"
    assert cpu_wf["id"] != gpu_wf["id"]
    for stem in (path.stem, cpu.stem):
        assert path.with_name(stem + ".jpg").is_file(), f"{stem}.json has no thumbnail {stem}.jpg"
    notes = [n["widgets_values"][0] for n in cpu_wf["nodes"] if n["type"] in FRONTEND_ONLY]
    assert any(path.name in t for t in notes), f"{cpu.name} has no note naming the full-size {path.name}"
    gpu_nodes = {n["id"]: n for n in gpu_wf["nodes"]}
    smaller = 0
    for n in cpu_wf["nodes"]:
        if n["type"] == "LowBitQuantizeUNet":  # calibration width x height x samples x steps
            g, c = gpu_nodes[n["id"]]["widgets_values"], n["widgets_values"]
            smaller += c[6] * c[7] * c[3] * c[2] < g[6] * g[7] * g[3] * g[2]
    assert smaller, f"{cpu.name} calibrates no smaller than {path.name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_lowbit_nodes_carry_every_widget_value(path):
    """The frontend fills missing trailing values with defaults, silently: a shipped file states them all, and the
    Quantize node's method is today's name (not an alias of an earlier release)."""
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        cls = nodes_pkg.NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        widgets = sum(1 + (e[0] == "INT" and e[1].get("control_after_generate", k == "seed") is True)
                      for sec in ("required", "optional") for k, e in spec.get(sec, {}).items()
                      if isinstance(e[0], list) or e[0] in WIDGET_TYPES)
        assert len(n.get("widgets_values") or []) == widgets, (path.name, n["id"], n["type"], n["widgets_values"])
        if n["type"] == "LowBitQuantizeUNet":
            assert n["widgets_values"][1] in METHODS, n["widgets_values"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_lowbit_nodes_serialize_every_output(path):
    """The frontend takes a loaded node's output slots from the file: a shipped workflow lists every output of the
    node's class, in order, with its name and type (the Quantize node's ``report`` was missing, so it did not
    appear until the node was recreated), and its links point back at the slot they leave from."""
    wf = json.loads(path.read_text())
    links = {ln[0]: ln for ln in wf["links"]}
    for n in wf["nodes"]:
        cls = nodes_pkg.NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is None:
            continue
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        got = [(o["name"], o["type"]) for o in n.get("outputs") or []]
        assert got == list(zip(names, cls.RETURN_TYPES)), (path.name, n["id"], n["type"], got)
        for slot, o in enumerate(n.get("outputs") or []):
            for lid in o.get("links") or []:
                assert links[lid][1] == n["id"] and links[lid][2] == slot, (path.name, lid)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_lowbit_settings_in_every_workflow_pass_the_nodes_own_checks(path):
    """The LowBit nodes' values, mapped exactly as the real-host test maps them, pass the ranges, choices and
    VALIDATE_INPUTS the server applies (the GPU-sized files are not run here; their values are checked)."""
    wf = json.loads(path.read_text())
    info = {k: {"input": c.INPUT_TYPES()} for k, c in nodes_pkg.NODE_CLASS_MAPPINGS.items()}
    lowbit = dict(wf, nodes=[n for n in wf["nodes"] if n["type"] in info])
    for nid, node in ui_to_api(lowbit, info).items():
        cls = nodes_pkg.NODE_CLASS_MAPPINGS[node["class_type"]]
        spec = {k: e for sec in ("required", "optional") for k, e in cls.INPUT_TYPES().get(sec, {}).items()}
        values = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        for k, v in values.items():
            kind, opts = spec[k][0], spec[k][1]
            if isinstance(kind, list):
                assert v in kind, (path.name, nid, k, v)
            elif kind in ("INT", "FLOAT"):
                assert opts["min"] <= v <= opts["max"], (path.name, nid, k, v)
        check = getattr(cls, "VALIDATE_INPUTS", None)
        if check is not None:
            args = {k: v for k, v in values.items() if k in inspect.signature(check).parameters}
            assert check(**args) is True, (path.name, nid, check(**args))


def test_ui_to_api_maps_widgets_by_input_order():
    """The conversion the real-host test uses, on a hand-written graph: values in input order, the seed's "control
    after generate" value skipped, links as [node id, output index], notes dropped, leftovers refused."""
    info = {
        "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}}},
        "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                           "steps": ["INT", {}], "name": [["euler", "ddim"], {}]},
                              "optional": {"cfg": ["FLOAT", {}]}}},
    }
    wf = {"links": [[7, 1, 0, 2, 0, "MODEL"]],
          "nodes": [{"id": 1, "type": "Loader", "widgets_values": ["a.safetensors"]},
                    {"id": 2, "type": "Sampler", "inputs": [{"name": "model", "link": 7}],
                     "widgets_values": [42, "fixed", 20, "ddim", 7.5]},
                    {"id": 3, "type": "Note", "widgets_values": ["text"]}]}
    api = ui_to_api(wf, info)
    assert api == {"1": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}},
                   "2": {"class_type": "Sampler",
                         "inputs": {"model": ["1", 0], "seed": 42, "steps": 20, "name": "ddim", "cfg": 7.5}}}
    wf["nodes"][1]["widgets_values"].append("extra")
    with pytest.raises(AssertionError, match="left over"):
        ui_to_api(wf, info)


# ------------------------------------------------------------------- stage names on the console (issue 14)
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_stage_log_names_every_stage_with_counts_and_seconds(caplog):
    clock, forwarded, texts = _Clock(), [], []
    st = StageLog("LowBit Quantize UNet", forward=lambda d, t, i: forwarded.append((d, t, i["stage"])),
                  text=texts.append, every=30.0, text_every=2.5, clock=clock)
    with caplog.at_level("INFO", logger="lowbit.nodes"):
        for stage, n, dt in (("calibration sampling", 4, 10.0), ("calibrate activations", 40, 1.0),
                             ("PTQD statistics", 40, 2.0)):
            for i in range(1, n + 1):
                clock.t += dt
                st(i, n, {"stage": stage})
        clock.t += 5.0
        total = st.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "LowBit Quantize UNet: [1] calibration sampling (4 steps)"
    assert "LowBit Quantize UNet: [1] calibration sampling done: 4/4 steps in 40.0 s" in lines
    assert "LowBit Quantize UNet: [2] calibrate activations (40 steps)" in lines
    # a stage's time runs from the previous stage's last report: 40 steps of 1 s, 40 of 2 s
    assert "LowBit Quantize UNet: [2] calibrate activations done: 40/40 steps in 40.0 s" in lines
    assert "LowBit Quantize UNet: [3] PTQD statistics done: 40/40 steps in 80.0 s" in lines
    # a line every 30 s inside a long stage, with an estimate of what is left
    assert "LowBit Quantize UNet: [3] PTQD statistics 16/40 (32 s, about 48 s left)" in lines
    assert lines[-1].startswith("LowBit Quantize UNet: finished in 165.0 s (calibration sampling 40.0 s, ")
    assert total == 165.0
    assert len(forwarded) == 84 and forwarded[-1] == (40, 40, "PTQD statistics")
    assert texts[0] == "[1] calibration sampling: 1/4" and "[3] PTQD statistics: 1/40" in texts
    assert "[2] calibrate activations: 40/40" in texts and texts[-1] == "[3] PTQD statistics: 40/40"
    assert "[2] calibrate activations: 2/40" not in texts  # at most one text per 2.5 s (steps of 1 s here)


def test_stage_log_names_the_stage_a_failed_run_stopped_in(caplog):
    clock = _Clock()
    st = StageLog("LowBit Quantize UNet", clock=clock)
    with caplog.at_level("INFO", logger="lowbit.nodes"):
        st(1, 2, {"stage": "quantize weights"})
        st(2, 2, {"stage": "quantize weights"})
        st(1, 10, {"stage": "quantize weights"})  # the same stage counting again is a new stage
        clock.t = 12.0
        st.finish(failed=True)
    lines = [r.getMessage() for r in caplog.records]
    assert "LowBit Quantize UNet: [2] quantize weights (10 steps)" in lines
    assert lines[-1] == "LowBit Quantize UNet: stopped in [2] quantize weights at 1/10 after 12.0 s"
