"""The example workflows, checked WITHOUT ComfyUI: layout (no node drawn over another, with the height the
frontend gives a LowBit node from its inputs) and file names (nothing saved into ``models/lowbit/lowbit/``).

Running them in a real ComfyUI is ``test_comfyui_integration.py::test_example_workflow_runs*``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import lowbit.nodes as nodes_pkg

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
