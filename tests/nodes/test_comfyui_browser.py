"""The "Compare Images (LowBit)" slider in a real ComfyUI page, driven by headless Chromium with real mouse events.

For each frontend (the one installed with ComfyUI, and the newest ``comfyui-frontend-package`` if present) a real
ComfyUI is started (CPU, private base directory, this pack symlinked in), a page is opened, a graph
LoadImage x 4 -> ImageBatch x 2 -> Compare Images (LowBit) is built and queued, and then, with mouse events
dispatched by the browser (``Input.dispatchMouseEvent``, the same path as a user's mouse):

1. hover at 25 % and at 75 % of the image: the pixels left of the pointer are image A (red), right of it image B
   (blue), read from screenshots, so the split follows the pointer and image B is shown;
2. press at 30 %, drag to 80 % (and 30 px down), release: ``node.pos`` is unchanged (the node did not move) and,
   during the drag, the split is at the pointer;
3. each side is a batch of two (red, green / blue, yellow): a click on the right half of the label bar at the top
   of the image shows pair 2 (green / yellow), a click on its left half pair 1 again.

Nothing reads the extension's private state to decide a pass: only the pixels and LiteGraph's ``node.pos``.

Frontends:
    pinned   whatever COMFYUI_DIR's python has installed (1.27.10 for ComfyUI 0.3.64). Runs when COMFYUI_DIR is set.
    newest   LOWBIT_COMFY_FRONTEND_ROOT (the package's ``static`` folder), else
             ``<LOWBIT_FIXTURE_CACHE or <tmp>/lowbit-fixtures>/comfyui-frontend/comfyui_frontend_package/static``.
             Skipped with a message when absent. Fetch it (into a folder of its own, no environment touched) with:

                 pip install --no-deps --upgrade --target /tmp/lowbit-fixtures/comfyui-frontend comfyui-frontend-package

    newest-vue  the same newest frontend with "Modern Node Design (Nodes 2.0)" (Comfy.VueNodes.Enabled) on.

    COMFYUI_DIR=/work/ComfyUI pytest -m "comfyui and browser" tests/nodes/test_comfyui_browser.py -v

Screenshots go to the test's tmp folder (``*_hover25.png``, ``*_hover75.png``, ``*_drag.png``).
Needs chromium (``apt-get install -y chromium``) and ``websocket-client``.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_harness  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

A_RGB = (220, 30, 30)     # image_a, pair 1: red
B_RGB = (30, 30, 220)     # image_b, pair 1: blue
A2_RGB = (30, 200, 30)    # image_a, pair 2: green
B2_RGB = (220, 220, 30)   # image_b, pair 2: yellow
IMAGES = {"lowbit_a.png": A_RGB, "lowbit_b.png": B_RGB, "lowbit_a2.png": A2_RGB, "lowbit_b2.png": B2_RGB}
VIEW_W, VIEW_H = 1400, 1000


def _browser_helpers():
    """CDP, CHROMIUM_FLAGS, _chromium, _wait, _stop from tests/webui/test_browser.py (loaded under its own name)."""
    spec = importlib.util.spec_from_file_location("lowbit_webui_browser_helpers",
                                                  HERE.parent / "webui" / "test_browser.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def newest_frontend_root() -> Path | None:
    env = os.environ.get("LOWBIT_COMFY_FRONTEND_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cache = Path(os.environ.get("LOWBIT_FIXTURE_CACHE") or Path(tempfile.gettempdir()) / "lowbit-fixtures")
    root = cache / "comfyui-frontend" / "comfyui_frontend_package" / "static"
    return root if (root / "index.html").is_file() else None


def frontend_version(root: Path | None, python: str) -> str:
    """Version of the frontend in ``root`` (its dist-info next to the package), or of the one ``python`` has."""
    if root is not None:
        infos = sorted(root.parent.parent.glob("comfyui_frontend_package-*.dist-info"))
        return infos[-1].name.removesuffix(".dist-info").split("-")[1] if infos else f"unknown ({root})"
    code = "import importlib.metadata as m; print(m.version('comfyui-frontend-package'))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or "unknown"


def _color_is(px, rgb, tol=40) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(px[:3], rgb))


BUILD_GRAPH = """(async () => {
  const g = app.graph; g.clear();
  const mk = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; g.add(n); return n; };
  const load = (file, pos) => { const n = mk("LoadImage", pos);
    n.widgets.find(w => w.name === "image").value = file; return n; };
  const batch = (x, y, pos) => { const n = mk("ImageBatch", pos); x.connect(0, n, 0); y.connect(0, n, 1); return n; };
  const a = batch(load("lowbit_a.png", [-700, 0]), load("lowbit_a2.png", [-700, 420]), [-300, 0]);
  const b = batch(load("lowbit_b.png", [-700, 840]), load("lowbit_b2.png", [-700, 1260]), [-300, 420]);
  const c = mk("LowBitCompareImages", [400, 40]);
  a.connect(0, c, 0); b.connect(0, c, 1);
  window.__lowbitExecuted = null;
  app.api.addEventListener("executed", (e) => {
    if (String(e.detail?.node) === String(c.id) || String(e.detail?.display_node) === String(c.id))
      window.__lowbitExecuted = e.detail; });
  await app.queuePrompt(0, 1);
  return String(c.id);
})()"""

# The compare node's body on screen (CSS px): the Vue node element in Nodes 2.0, else from node.pos/size.
NODE_BOX = """((id) => {
  const n = app.graph.getNodeById(id); if (!n) return null;
  const el = document.querySelector(`[data-node-id="${id}"]`);
  if (LiteGraph.vueNodesMode && el) { const r = el.getBoundingClientRect();
    return {x: r.left, y: r.top, w: r.width, h: r.height, pos: [n.pos[0], n.pos[1]]}; }
  const cr = app.canvas.canvas.getBoundingClientRect(); const s = app.canvas.ds.scale;
  const p = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
  return {x: cr.left + p[0], y: cr.top + p[1], w: n.size[0] * s, h: n.size[1] * s, pos: [n.pos[0], n.pos[1]]};
})(%s)"""

# For failure messages only: what the extension believes.
DEBUG_STATE = """((id) => { const n = app.graph.getNodeById(id); const st = n?.lowbitCompare?.state;
  return st ? {split: st.split, hover: st.hover, dragging: st.dragging, rect: st.rect, a: st.a.length,
               b: st.b.length} : null; })(%s)"""


class Page:
    def __init__(self, cdp, tmp_path: Path, tag: str):
        self.cdp, self.tmp_path, self.tag = cdp, tmp_path, tag

    def screenshot(self, name: str):
        from PIL import Image
        data = base64.b64decode(self.cdp("Page.captureScreenshot", format="png")["data"])
        (self.tmp_path / f"{self.tag}_{name}.png").write_bytes(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    def mouse(self, kind: str, x: float, y: float, pressed: bool = False):
        self.cdp("Input.dispatchMouseEvent", type=kind, x=float(x), y=float(y), pointerType="mouse",
                 button="left" if (pressed or kind != "mouseMoved") else "none",
                 buttons=1 if pressed else 0, clickCount=1 if kind != "mouseMoved" else 0)


def _image_box(img, box):
    """Bounding box (x0, y0, x1, y1) in screen px of the red/blue pixels inside the node's box."""
    x0, y0 = max(0, int(box["x"])), max(0, int(box["y"]))
    x1, y1 = min(img.width, int(box["x"] + box["w"])), min(img.height, int(box["y"] + box["h"]))
    px = img.load()
    xs, ys = [], []
    for y in range(y0, y1, 2):
        for x in range(x0, x1, 2):
            p = px[x, y]
            if _color_is(p, A_RGB) or _color_is(p, B_RGB):
                xs.append(x)
                ys.append(y)
    if len(xs) < 400:
        return None
    return min(xs), min(ys), max(xs), max(ys)


def _start_chromium(helpers, tmp_path: Path):
    exe = helpers._chromium()
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    flags = [f for f in helpers.CHROMIUM_FLAGS if not f.startswith("--window-size")]
    with open(log, "wb") as f:
        proc = subprocess.Popen([exe, *flags, f"--window-size={VIEW_W},{VIEW_H}", f"--user-data-dir={profile}",
                                 "about:blank"], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    helpers._wait(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium's DevTools port",
                  proc, log)
    port = int(port_file.read_text().split()[0])
    targets = helpers._wait(lambda: [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                                     if t.get("type") == "page"], 30, "a Chromium page")
    return proc, helpers.CDP(targets[0]["webSocketDebuggerUrl"])


@pytest.fixture(scope="module")
def browser_helpers():
    if comfy_harness.comfyui_dir_from_env() is None:
        pytest.skip(comfy_harness.SKIP_MESSAGE)
    helpers = _browser_helpers()
    helpers._chromium()  # skips without chromium
    pytest.importorskip("websocket", reason="pip install websocket-client (drives Chromium over DevTools)")
    pytest.importorskip("PIL", reason="pip install pillow (reads the screenshots)")
    return helpers


@pytest.mark.parametrize("frontend", ["pinned", "newest", "newest-vue"])
def test_compare_slider_follows_the_mouse(frontend, browser_helpers, tmp_path):
    from PIL import Image

    helpers = browser_helpers
    comfyui_dir = comfy_harness.comfyui_dir_from_env()
    extra, root = [], None
    if frontend.startswith("newest"):
        root = newest_frontend_root()
        if root is None or not (root / "index.html").is_file():
            pytest.skip("the newest ComfyUI frontend is not here: set LOWBIT_COMFY_FRONTEND_ROOT to its static/ "
                        "folder or fetch it with `pip install --no-deps --upgrade --target "
                        "/tmp/lowbit-fixtures/comfyui-frontend comfyui-frontend-package` (see this file's docstring)")
        extra = ["--front-end-root", str(root)]
    server = comfy_harness.ComfyServer(comfyui_dir, extra_args=extra)
    for name, rgb in IMAGES.items():
        Image.new("RGB", (256, 256), rgb).save(server.base_dir / "input" / name)
    chromium = None
    try:
        client = server.launch()
        # no first-run template browser / tour over the canvas; Nodes 2.0 only for the -vue case
        client.post("/settings", {"Comfy.TutorialCompleted": True,
                                  "Comfy.VueNodes.Enabled": frontend.endswith("-vue")})
        chromium, cdp = _start_chromium(helpers, tmp_path)
        page = Page(cdp, tmp_path, frontend)
        cdp("Page.enable")
        cdp("Page.navigate", url=client.url)
        helpers._wait(lambda: cdp.js("!!(window.app && app.graph && window.LiteGraph && "
                                     "LiteGraph.registered_node_types.LowBitCompareImages && "
                                     "(app.extensions ?? []).some(e => e.name === 'lowbit.CompareImages'))"),
                      120, "the ComfyUI page with the LowBit extension", log=server.log_path)
        time.sleep(3)  # the frontend loads its default workflow after setup; build ours after that
        version = frontend_version(root, server.python)
        vue = bool(cdp.js("!!LiteGraph.vueNodesMode"))
        assert vue == frontend.endswith("-vue"), f"Nodes 2.0 is {'on' if vue else 'off'} in frontend {version}"
        node_id = cdp.js(BUILD_GRAPH)
        helpers._wait(lambda: cdp.js("!!window.__lowbitExecuted"), 240, "the compare node to run",
                      log=server.log_path)
        # show the node at scale 1, away from the minimap and the toolbars
        cdp.js(f"""(() => {{ const n = app.graph.getNodeById({node_id}); const ds = app.canvas.ds; ds.scale = 1;
            ds.offset[0] = 380 - n.pos[0]; ds.offset[1] = 150 - n.pos[1]; app.canvas.setDirty(true, true); }})()""")
        time.sleep(1.5)

        def where():
            box = cdp.js(NODE_BOX % node_id)
            assert box, "the compare node is not in the graph"
            return box

        box = where()
        page.mouse("mouseMoved", 5, VIEW_H - 5)       # pointer away from the node
        time.sleep(0.5)
        img_box = helpers._wait(lambda: _image_box(page.screenshot("executed"), box), 30,
                                f"images A/B drawn on the compare node (frontend {version})")
        x0, y0, x1, y1 = img_box
        w, ymid = x1 - x0, (y0 + y1) / 2 + 10   # below the "A (fp)" / "B (q)" labels
        assert w > 100 and y1 - y0 > 100, f"the image on the node is too small: {img_box}"
        state = lambda: cdp.js(DEBUG_STATE % node_id)  # noqa: E731

        def split_at(shot, x, what, a_rgb=A_RGB, b_rgb=B_RGB):
            left, right = shot.getpixel((int(x - 0.08 * w), int(ymid))), shot.getpixel((int(x + 0.08 * w), int(ymid)))
            assert _color_is(left, a_rgb) and _color_is(right, b_rgb), (
                f"{what}, frontend {version}{' (Nodes 2.0)' if vue else ''}: expected image A {a_rgb} left of "
                f"x={x:.0f} and image B {b_rgb} right of it, got {left} / {right}; image box {img_box}; extension "
                f"state {state()}; screenshots in {tmp_path}")

        # 1. hover: the split follows the pointer (no button pressed)
        middle = []
        for frac in (0.25, 0.75):
            x = x0 + frac * w
            page.mouse("mouseMoved", x - 20, ymid)
            page.mouse("mouseMoved", x, ymid)
            time.sleep(0.5)
            shot = page.screenshot(f"hover{int(frac * 100)}")
            split_at(shot, x, f"hovering at {int(frac * 100)} % of the image")
            middle.append(shot.getpixel((int(x0 + 0.5 * w), int(ymid))))
        # the split moved: the middle of the image is B (blue) with the pointer at 25 %, A (red) at 75 %
        assert _color_is(middle[0], B_RGB) and _color_is(middle[1], A_RGB), middle

        # 2. drag on the image: the split follows, the node stays where it is
        pos_before = where()["pos"]
        xs, xe = x0 + 0.3 * w, x0 + 0.8 * w
        page.mouse("mouseMoved", xs, ymid)
        page.mouse("mousePressed", xs, ymid, pressed=True)
        steps = 10
        for i in range(1, steps + 1):
            page.mouse("mouseMoved", xs + (xe - xs) * i / steps, ymid + 30 * i / steps, pressed=True)
            time.sleep(0.05)
        time.sleep(0.5)
        shot = page.screenshot("drag")
        during = where()["pos"]
        page.mouse("mouseReleased", xe, ymid + 30)
        time.sleep(0.3)
        pos_after = where()["pos"]
        assert pos_after == pos_before and during == pos_before, (
            f"dragging on the compare image moved the node (frontend {version}): {pos_before} -> {during} "
            f"(during) -> {pos_after} (after release); screenshots in {tmp_path}")
        split_at(shot, xe, "while dragging from 30 % to 80 % of the image")
        # after the release the split stays where the drag ended
        page.mouse("mouseMoved", 5, VIEW_H - 5)
        time.sleep(0.5)
        split_at(page.screenshot("released"), xe, "after the drag, pointer away from the node")

        # 3. a batch of 2 per side: a click on the right half of the label bar shows pair 2, on the left half pair 1
        label_y = y0 + 6
        for frac, a_rgb, b_rgb, name in ((0.65, A2_RGB, B2_RGB, "pair2"), (0.35, A_RGB, B_RGB, "pair1")):
            x = x0 + frac * w
            page.mouse("mouseMoved", x, label_y)
            page.mouse("mousePressed", x, label_y, pressed=True)
            page.mouse("mouseReleased", x, label_y)
            time.sleep(0.5)
            split_at(page.screenshot(name), x, f"after a click at {int(frac * 100)} % of the label bar", a_rgb, b_rgb)
        assert where()["pos"] == pos_before, "clicking the label bar moved the node"
        print(f"\nfrontend {frontend} {version}{' (Nodes 2.0)' if vue else ''}: hover and drag OK; "
              f"screenshots in {tmp_path}")
    except BaseException:
        server.keep_base = True
        raise
    finally:
        if chromium is not None:
            helpers._stop(chromium)
        server.cleanup()
