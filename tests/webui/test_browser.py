"""Headless Chromium drives `lowbit ui`: Quantize, then Compare, with the smallest settings.

Chromium is driven over the DevTools protocol (``websocket-client``); the buttons are pressed with real mouse
events at their on-screen position, the number fields are typed into. The screenshot is written to the
test's tmp folder and copied to out/ui_screenshot.png.

    apt-get install -y chromium && pip install websocket-client      # once
    pytest tests/webui/test_browser.py -v
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-allow-origins=*", "--remote-debugging-port=0", "--window-size=1400,2000"]
JOB_TIMEOUT = float(os.environ.get("LOWBIT_BROWSER_TIMEOUT", "900"))
# The server's interpreter: set LOWBIT_UI_PYTHON=/work/forge-venv/bin/python to serve the app with Forge's
# gradio 4.40 + gradio_imageslider instead of this interpreter's gradio.
UI_PYTHON = os.environ.get("LOWBIT_UI_PYTHON") or sys.executable

# `lowbit ui` needs the trained default model; until it exists the same app is served on a random-weights
# UNet of the same architecture (the UI path under test is identical).
RANDOM_MODEL_APP = """
import sys, torch
from diffusers import DDPMScheduler
from lowbit.models.digits import IMAGE_SIZE, NULL_CLASS, SCHEDULER_CONFIG, UNET_CONFIG, build_unet
from lowbit.recipes import Setup
from lowbit.ui.app import launch
from lowbit.ui.backend import DefaultModelBackend
from diffusers import UNet2DModel
import inspect
config = dict(UNET_CONFIG)
if "mid_block_type" not in inspect.signature(UNet2DModel.__init__).parameters:
    config.pop("mid_block_type", None)  # older diffusers (Forge's 0.31): the default mid block anyway
torch.manual_seed(0)
unet = build_unet(config).eval().requires_grad_(False)
setup = Setup(unet, DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.float(), NULL_CLASS, (1, IMAGE_SIZE, IMAGE_SIZE))
launch(sys.argv[1], int(sys.argv[2]), backend=DefaultModelBackend(setup=setup))
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not found: install it with `apt-get update && apt-get install -y chromium`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait(pred, timeout, what, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{_tail(log)}")
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(log)}")


def _tail(path, n=4000):
    try:
        return Path(path).read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


def _http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


def _stop(proc):
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


class CDP:
    """The smallest DevTools client: send a command, wait for its answer (events are ignored)."""

    def __init__(self, ws_url):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.n = 0

    def __call__(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr):
        r = self("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if r.get("exceptionDetails"):
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def click(self, selector):
        """A real mouse click at the element's centre (scrolled into view first)."""
        box = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2, r.width, r.height]; }})()""")
        assert box and box[2] > 0 and box[3] > 0, f"{selector} is not on the page or not visible: {box}"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector, text):
        """Focus the field, select its content and type ``text`` (key events, as a user would)."""
        self.click(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).select()")
        self("Input.insertText", text=str(text))
        self.js(f"document.querySelector({json.dumps(selector)}).dispatchEvent(new Event('change', {{bubbles: true}}))")

    def value(self, selector):
        return self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                       "return e ? e.value : null; })()")


@pytest.fixture
def ui_server(tmp_path):
    from lowbit.models.digits import DDPM_PATH

    port = _free_port()
    env = dict(os.environ, LOWBIT_MODELS_DIR=str(tmp_path / "models"), GRADIO_ANALYTICS_ENABLED="False",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    if DDPM_PATH.exists():
        cmd = [UI_PYTHON, "-m", "lowbit", "ui", "--host", HOST, "--port", str(port)]
    else:
        cmd = [UI_PYTHON, "-c", RANDOM_MODEL_APP, HOST, str(port)]
    log = tmp_path / "ui.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://{HOST}:{port}/"
        _wait(lambda: _http_ok(url), 180, "the LowBit UI server", proc, log)
        yield url, DDPM_PATH.exists(), log
    finally:
        _stop(proc)


@pytest.fixture
def browser(tmp_path):
    exe = _chromium()
    pytest.importorskip("websocket", reason="pip install websocket-client (drives Chromium over DevTools)")
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        _wait(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium's DevTools port", proc, log)
        port = int(port_file.read_text().split()[0])
        targets = _wait(lambda: [t for t in json.load(urllib.request.urlopen(f"http://{HOST}:{port}/json/list"))
                                 if t.get("type") == "page"], 30, "a Chromium page")
        cdp = CDP(targets[0]["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        _stop(proc)


@pytest.mark.browser
@pytest.mark.slow
def test_quantize_then_compare_in_the_browser(ui_server, browser, tmp_path):
    url, embedded, server_log = ui_server
    cdp = browser
    cdp("Page.enable")
    cdp("Page.navigate", url=url)
    _wait(lambda: cdp.js("!!document.querySelector('#lowbit_quantize')"), 120, "the LowBit UI in the page")

    # smallest settings: 1 calibration run of 2 steps, 2 images of 3 sampling steps
    cdp.type_into("#lowbit_calib_samples input", 1)
    cdp.type_into("#lowbit_calib_steps input", 2)
    cdp.type_into("#lowbit_steps input", 3)
    cdp.type_into("#lowbit_count input", 2)

    cdp.click("#lowbit_quantize")
    status = _wait(lambda: (lambda v: v if v and ("quantized in" in v or v.startswith("Error")) else None)(
        cdp.value("#lowbit_status textarea")), JOB_TIMEOUT, "the Quantize status", log=server_log)
    assert "quantized in" in status and "W8A8" in status, status
    assert "from 2 recorded UNet calls" in status, status  # the typed settings reached the backend

    cdp.click("#lowbit_compare")
    metrics = _wait(lambda: (lambda v: v if v and "PSNR" in v else None)(cdp.value("#lowbit_metrics textarea")),
                    JOB_TIMEOUT, "the PSNR/SSIM text", log=server_log)
    assert "SSIM" in metrics and "3 steps" in metrics, metrics

    images = _wait(lambda: cdp.js("""(() => {
        const ok = s => [...document.querySelectorAll(s + ' img')].filter(i => i.complete && i.naturalWidth > 0).length;
        const cmp = ok('#lowbit_slider') || Math.min(ok('#lowbit_fp'), ok('#lowbit_q'));
        const diff = ok('#lowbit_diff');
        return cmp && diff ? {cmp, diff} : null; })()"""), 60, "the comparison and difference images")
    assert images["cmp"] >= 1 and images["diff"] >= 1

    shot = tmp_path / "ui_screenshot.png"
    shot.write_bytes(base64.b64decode(cdp("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]))
    assert shot.stat().st_size > 10_000
    out = REPO_ROOT / "out"
    out.mkdir(exist_ok=True)
    shutil.copy(shot, out / "ui_screenshot.png")
    print(f"\nscreenshot: {shot} (copied to {out / 'ui_screenshot.png'}); server python {UI_PYTHON}; model: "
          f"{'embedded' if embedded else 'random weights (embedded model not trained yet)'}")
