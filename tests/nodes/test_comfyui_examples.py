"""Every shipped example workflow, run UNMODIFIED in a real ComfyUI on this CPU (issue 14).

Skipped unless ``COMFYUI_DIR`` is set (see the README section "Testing inside real hosts")::

    COMFYUI_DIR=/work/ComfyUI pytest -q -m comfyui tests/nodes/test_comfyui_examples.py -s

Each CPU-sized ``example_workflows/*.json`` (``*_cpu.json``, or a workflow without a CPU variant), in the UI
format the frontend saves, is converted to the API format /prompt takes, in a general way: links from the
``links`` table, widget values mapped to the node's widget inputs in the order ``/object_info`` gives (plus the
"control after generate" value an INT seed widget carries). The only value replaced is the checkpoint name (the
random SD1.5-class fixture instead of v1-5-pruned-emaonly); sizes, steps, calibration and training settings are
the file's. Each workflow runs on a fresh server (no node output cached from another workflow), its wall time is
printed and must stay under 600 s: the issue states "within 10 minutes on this CPU" as the requirement, so the
bound is a regression guard, measured on a shared 2-core machine.

Also checked per workflow: every output node produced something; Save Quantized UNet writes
``models/lowbit/<prefix>_NNNNN.safetensors`` (never ``models/lowbit/lowbit/...``); the server's console shows the
Quantize UNet node's stage names while it runs. With ``LOWBIT_EXAMPLE_OUTPUTS=<dir>`` the output images are
written there as ``<workflow>_<node>_<i>.png`` (for the thumbnails).
"""
from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.comfyui

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
ALL_WORKFLOWS = sorted(p.stem for p in EXAMPLES.glob("*.json"))
# A workflow sized for a GPU ships a CPU-sized variant <name>_cpu.json (test_example_workflows.py checks that the
# variant is the same graph); the CPU-sized ones are what must run here. A workflow without a variant must itself
# run here.
WORKFLOWS = [w for w in ALL_WORKFLOWS if w.endswith("_cpu") or f"{w}_cpu" not in ALL_WORKFLOWS]
FRONTEND_ONLY = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server
LIMIT_S = 600.0
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
OUTPUT_KEYS = ("images", "a_images", "b_images", "lowbit_files", "text")
# what the Quantize UNet node logs at each stage (nodes/common.py StageLog): "LowBit Quantize UNet: <stage> ..."
STAGE_LINE_RE = re.compile(r"LowBit Quantize UNet: \[\d+\] (?P<stage>[^\n]+?) \(\d+ steps\)$", re.M)


def _is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow -> the API-format prompt, by each node's /object_info input order."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:  # muted / bypassed / a note
            continue
        cls = node["type"]
        assert cls in object_info, f"workflow node {node['id']} has a type the server does not know: {cls!r}"
        info = object_info[cls]
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                if name in linked:  # a widget converted to an input still has its value in widgets_values
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                    if _is_widget(spec) and values:
                        values.pop(0)
                    continue
                if _is_widget(spec) and values:
                    inputs[name] = values.pop(0)
                    opts = spec[1] if len(spec) > 1 else {}
                    if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                        values.pop(0)  # "fixed" / "randomize": the frontend's value, not an input
        assert not values, f"node {node['id']} ({cls}): widget values left over after mapping: {values}"
        api[str(node["id"])] = {"class_type": cls, "inputs": inputs}
    return api


class _NodeTexts(threading.Thread):
    """Collects the progress texts the server sends to nodes (websocket binary event TEXT = 3: node id length,
    node id, text), as the frontend shows them on the node."""

    def __init__(self, url: str, client_id: str):
        import websocket

        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url.replace("http", "ws", 1) + f"/ws?clientId={client_id}",
                                              timeout=2)
        self.texts: list = []
        self.stopped = False

    def run(self):
        import websocket

        while not self.stopped:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if isinstance(msg, bytes) and len(msg) >= 8 and struct.unpack(">I", msg[:4])[0] == 3:
                n = struct.unpack(">I", msg[4:8])[0]
                self.texts.append((msg[8:8 + n].decode(), msg[8 + n:].decode(errors="replace")))

    def close(self):
        self.stopped = True
        self.join(5)
        self.ws.close()


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


@pytest.fixture
def fresh_comfy(comfyui_dir, comfyui_python, sd15_fixture):
    """A server of its own per workflow: nothing cached from another workflow's run."""
    server = comfy_harness.ComfyServer(comfyui_dir, python=comfyui_python, checkpoints=[sd15_fixture])
    try:
        yield server.launch()
    finally:
        server.cleanup()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_runs_unmodified_within_10_minutes(fresh_comfy, name):
    comfy = fresh_comfy
    wf = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = ui_to_api(wf, comfy.object_info())
    changed = []
    for nid, node in api.items():  # the checkpoint is the only value replaced
        if "ckpt_name" in node["inputs"]:
            node["inputs"]["ckpt_name"] = comfy.checkpoint
            changed.append(nid)
    assert changed, f"{name} loads no checkpoint"

    base = comfy.server.base_dir
    try:
        texts = _NodeTexts(comfy.url, comfy.client_id)
        texts.start()
    except ImportError:
        texts = None
        print("websocket-client is not installed (pip install -e '.[test]'): the node's progress text is not checked")
    log_start = len(comfy.server.log_text())
    load_before = _load_average()
    t0 = time.perf_counter()
    hist = comfy.run(api, timeout=LIMIT_S + 300)  # finish (and report the time) even a little over the bound
    seconds = time.perf_counter() - t0
    load_after = _load_average()
    if texts is not None:
        texts.close()
    print(f"\n{name}: {seconds:.1f} s (load average before {load_before}, after {load_after})")

    assert hist["status"]["status_str"] == "success"
    output_nodes = [nid for nid, n in api.items()
                    if n["class_type"] in ("SaveImage", "PreviewImage", "LowBitCompareImages",
                                           "LowBitSaveQuantizedUNet")]
    empty = [nid for nid in output_nodes
             if not any(hist["outputs"].get(nid, {}).get(k) for k in OUTPUT_KEYS)]
    assert not empty, f"{name}: output nodes {empty} produced nothing: {hist['outputs']}"

    out_dir = os.environ.get("LOWBIT_EXAMPLE_OUTPUTS")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for nid in output_nodes:
            for key in ("images", "a_images", "b_images"):
                for i, im in enumerate(hist["outputs"].get(nid, {}).get(key) or []):
                    img = comfy.image(im["filename"], im.get("subfolder", ""), im.get("type", "output"))
                    img.save(Path(out_dir) / f"{name}_{nid}_{key}_{i}.png")

    for nid, node in api.items():
        if node["class_type"] != "LowBitSaveQuantizedUNet":
            continue
        prefix = node["inputs"]["filename_prefix"]
        rel = hist["outputs"][nid]["lowbit_files"][0]
        assert re.fullmatch(re.escape(prefix) + r"_\d{5}\.safetensors", rel), (rel, prefix)
        assert (base / "models" / "lowbit" / rel).is_file(), f"{rel} is not in models/lowbit/"
        assert not (base / "models" / "lowbit" / "lowbit").exists(), "saved into models/lowbit/lowbit/"

    log = comfy.server.log_text()[log_start:]
    if any(n["class_type"] == "LowBitQuantizeUNet" for n in api.values()):
        stages = [m.group("stage").strip() for m in STAGE_LINE_RE.finditer(log)]
        print(f"{name}: Quantize UNet stages in the console: {stages}")
        assert "calibration sampling" in stages, f"{name}: no stage names in the console:\n{log[-3000:]}"
        assert len(set(stages)) >= 3, stages
        if texts is not None:  # the same names on the node in the UI (the server's progress text)
            qids = {nid for nid, n in api.items() if n["class_type"] == "LowBitQuantizeUNet"}
            shown = [t for nid, t in texts.texts if nid in qids]
            print(f"{name}: progress texts on Quantize UNet: {len(shown)}, first {shown[:1]}, last {shown[-1:]}")
            assert any(re.fullmatch(r"\[1\] calibration sampling: \d+/\d+", t) for t in shown), shown[:10]

    assert seconds < LIMIT_S, (f"{name} took {seconds:.0f} s on this machine (load average {load_after}); "
                               f"the examples must run within {LIMIT_S:.0f} s on a CPU")


def _options(spec) -> list | None:
    """A COMBO input's values: V1 ``[[values...], {...}]`` or V3 ``["COMBO", {"options": [...]}]``."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options")
    return None


def _input_problems(api: dict, info: dict) -> list:
    """What /prompt would refuse in an API prompt: a required input not set, an unknown input, a value outside
    its choices or range (links and the checkpoint name, which is the user's, are not values checked here)."""
    problems = []
    for nid, node in api.items():
        spec = info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        missing = [k for k in spec.get("required", {}) if k not in node["inputs"]]
        problems += [f"node {nid} ({node['class_type']}): required input {k} not set" for k in missing]
        for k, v in node["inputs"].items():
            if k not in known:
                problems.append(f"node {nid}: unknown input {k}")
                continue
            if isinstance(v, list) or k == "ckpt_name":
                continue
            opts = known[k][1] if len(known[k]) > 1 else {}
            choices = _options(known[k])
            if choices is not None and v not in choices:
                problems.append(f"node {nid} ({node['class_type']}): {k}={v!r} not in {choices}")
            if known[k][0] in ("INT", "FLOAT") and not opts.get("min", v) <= v <= opts.get("max", v):
                problems.append(f"node {nid} ({node['class_type']}): {k}={v} out of [{opts.get('min')}, "
                                f"{opts.get('max')}]")
    return problems


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_every_workflow_fits_the_servers_inputs(comfy, name):
    """Every shipped workflow, GPU-sized ones included (those are not run here): converted with /object_info,
    every required input is set, every value is in its choices or range (what /prompt validates), no unknown
    input. A broken copy shows the check finds such faults."""
    info = comfy.object_info()
    api = ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()), info)
    problems = _input_problems(api, info)
    assert not problems, f"{name}:\n" + "\n".join(problems)
    broken = json.loads(json.dumps(api))
    sampler = next(n for n in broken.values() if "sampler_name" in n["inputs"] or "sampler" in n["inputs"])
    loader = next(n for n in broken.values() if n["class_type"] == "CheckpointLoaderSimple")
    sampler["inputs"].pop(next(k for k in ("sampler_name", "sampler") if k in sampler["inputs"]))
    loader["inputs"]["nonsense"] = 1
    latent = next(n for n in broken.values() if n["class_type"] == "EmptyLatentImage")
    latent["inputs"]["width"] = -8
    assert len(_input_problems(broken, info)) == 3, _input_problems(broken, info)


# ------------------------------------------------------------------ layout in the real frontend (issue 14)
LOAD_AND_MEASURE = """(async (wf) => {
  await app.loadGraphData(wf);
  await new Promise((r) => setTimeout(r, 1000));
  app.canvas.setDirty(true, true); app.canvas.draw(true, true);
  await new Promise((r) => setTimeout(r, 500));
  const th = LiteGraph.NODE_TITLE_HEIGHT;
  return app.graph._nodes.map((n) => {
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    let box;
    if (LiteGraph.vueNodesMode && el) {  // Nodes 2.0: the element on screen, back in graph units
      const r = el.getBoundingClientRect(), s = app.canvas.ds.scale;
      const p = app.canvas.ds.convertCanvasToOffset([r.left, r.top]);
      box = [p[0], p[1], r.width / s, r.height / s];
    } else {  // LiteGraph: the title bar above pos, the body of size (as computed by the frontend after load)
      box = [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th];
    }
    return {id: n.id, type: n.type, box: box};
  });
})(%s)"""


@pytest.mark.browser
@pytest.mark.parametrize("frontend", ["pinned", "newest"])
def test_no_node_covers_another_in_the_real_frontend(frontend, comfyui_dir, tmp_path):
    """Each shipped workflow loaded into ComfyUI's page (headless Chromium): with the sizes the frontend itself
    gives the nodes after loading (a node grows to fit its widgets), no node's box (title bar included) overlaps
    another's. The reported case: Bitwidth Schedule's title hidden under Quantize UNet."""
    browser = pytest.importorskip("test_comfyui_browser", reason="tests/nodes/test_comfyui_browser.py is absent")
    helpers = browser._browser_helpers()
    helpers._chromium()  # skips without chromium
    pytest.importorskip("websocket", reason="pip install websocket-client (drives Chromium over DevTools)")
    extra = []
    if frontend == "newest":
        root = browser.newest_frontend_root()
        if root is None:
            pytest.skip("the newest ComfyUI frontend is not here (see tests/nodes/test_comfyui_browser.py)")
        extra = ["--front-end-root", str(root)]
    server = comfy_harness.ComfyServer(comfyui_dir, extra_args=extra)
    chromium = None
    try:
        client = server.launch()
        client.post("/settings", {"Comfy.TutorialCompleted": True})
        chromium, cdp = browser._start_chromium(helpers, tmp_path)
        cdp("Page.enable")
        cdp("Page.navigate", url=client.url)
        helpers._wait(lambda: cdp.js("!!(window.app && app.graph && window.LiteGraph && "
                                     "LiteGraph.registered_node_types.LowBitQuantizeUNet)"),
                      120, "the ComfyUI page with the LowBit nodes", log=server.log_path)
        time.sleep(3)  # the frontend loads its default workflow after setup
        def overlaps(name, wf):
            nodes = cdp.js(LOAD_AND_MEASURE % json.dumps(wf))
            assert len(nodes) == len(wf["nodes"]), f"{name}: the page shows {len(nodes)} of {len(wf['nodes'])} nodes"
            found = []
            for i, a in enumerate(nodes):
                for b in nodes[i + 1:]:
                    (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
                    if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                        found.append((a["type"], b["type"], f"{name}: {a['type']} #{a['id']} {a['box']} and "
                                      f"{b['type']} #{b['id']} {b['box']}"))
            return found

        # the check sees the reported case: the schedule where an earlier release put it, under Quantize UNet
        # (clear of its 330 px in the file, inside the height the frontend gives it)
        control = json.loads((EXAMPLES / "lowbit_ptqd_sampling.json").read_text())
        for n in control["nodes"]:
            if n["type"] == "LowBitBitwidthSchedule":
                n["pos"] = [820, 420]
        seen = {frozenset(f[:2]) for f in overlaps("control", control)}
        assert frozenset({"LowBitBitwidthSchedule", "LowBitQuantizeUNet"}) in seen, seen
        problems = [f[2] for name in ALL_WORKFLOWS
                    for f in overlaps(name, json.loads((EXAMPLES / f"{name}.json").read_text()))]
        print(f"\nfrontend {frontend}: {len(ALL_WORKFLOWS)} workflows measured, {len(problems)} overlaps")
        assert not problems, "nodes drawn over each other in the real frontend:\n" + "\n".join(problems)
    finally:
        if chromium is not None:
            helpers._stop(chromium)
        server.cleanup()
