"""Run a real ComfyUI headless (CPU) with the LowBit pack installed, and drive it over HTTP.

Used by ``tests/nodes/conftest.py`` (session fixture ``comfy``); usable by hand too::

    from comfy_harness import ComfyServer
    with ComfyServer.start("/work/ComfyUI") as client:
        print(sorted(client.object_info()))

Environment:
    COMFYUI_DIR             ComfyUI source tree (main.py). Unset -> the integration tests are skipped.
    COMFYUI_PYTHON          python that runs ComfyUI (default: $COMFYUI_DIR/../comfy-venv/bin/python if it
                            exists, else $COMFYUI_DIR/venv/bin/python or .venv/bin/python, else sys.executable).
    COMFYUI_START_TIMEOUT   seconds to wait for /object_info (default 240).
    COMFYUI_KEEP_BASE       if set, the temporary base directory (models, output, user, log) is kept.
    LOWBIT_FIXTURE_CACHE    where make_fixture.py caches the random SD1.5 checkpoint (default <tmp>/lowbit-fixtures).

The server gets a private base directory (``--base-directory``: models/, custom_nodes/, input/, output/,
temp/, user/ plus the SQLite database via ``--database-url``), so the ComfyUI checkout is never written to.
``custom_nodes/lowbit`` is a symlink to this repository; ``models/checkpoints/`` holds a symlink to the fixture.
The server runs in its own process group, its stdout+stderr go to ``<base>/comfyui.log``, and every assertion
raised here carries the tail of that log.

Only the standard library and Pillow are needed on the test side; the test python need not be ComfyUI's.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]          # the pack folder (this repository's root has the ComfyUI __init__.py)
PACK_NAME = "lowbit"

SKIP_MESSAGE = ("set COMFYUI_DIR to a ComfyUI checkout (see the README section 'Testing inside real hosts') "
                "to run the ComfyUI integration tests")

# What a broken pack import looks like in ComfyUI's log (nodes.py load_custom_node / init_external_custom_nodes)
# and in LowBit's own __init__.py.
IMPORT_FAILED_RE = re.compile(r"seconds \(IMPORT FAILED\): (?P<path>.+)$", re.M)
# Newer ComfyUI (seen in 0.33.0, app/logger.py ColoredFormatter) prefixes every logged line with its level,
# "[INFO] ", wrapped in ANSI colours; 0.3.64 wrote the bare message. log_text() removes the colours, and the
# line-anchored patterns accept the optional level tag.
LEVEL_TAG = r"(?:\[[A-Z]+\] ?)?"
IMPORT_OK_RE = re.compile(r"^" + LEVEL_TAG + r"\s*[\d.]+ seconds: (?P<path>.+)$", re.M)
ANSI_ESCAPE_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, bold, reset)."""
    return ANSI_ESCAPE_RE.sub("", text)


# ------------------------------------------------------------------------------------------------ helpers
def comfyui_dir_from_env() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d).expanduser().resolve() if d else None


def comfyui_python(comfyui_dir: Path) -> str:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for cand in (comfyui_dir.parent / "comfy-venv" / "bin" / "python",
                 comfyui_dir / "venv" / "bin" / "python",
                 comfyui_dir / ".venv" / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def ensure_fixture(comfyui_dir: Path, python: str, variant: str | None = None, seed: int = 0,
                   timeout: float = 900) -> Path:
    """Path of the random SD1.5 checkpoint, building it with ComfyUI's python if it is not cached."""
    sys.path.insert(0, str(HERE))
    try:
        import make_fixture
    finally:
        sys.path.remove(str(HERE))
    variant = variant or make_fixture.DEFAULT_VARIANT
    path = make_fixture.fixture_path(variant, seed)
    if path.is_file():
        return path
    cmd = [python, str(HERE / "make_fixture.py"), "--comfyui-dir", str(comfyui_dir),
           "--variant", variant, "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(comfyui_dir))
    if proc.returncode != 0:
        raise AssertionError(f"make_fixture.py failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{tail(proc.stdout, 20)}\n{tail(proc.stderr, 40)}")
    built = Path(proc.stdout.strip().splitlines()[-1])
    assert built.is_file(), f"make_fixture.py printed {built}, which does not exist"
    return built


def expected_pack_nodes(comfyui_dir: Path, python: str, timeout: float = 300) -> dict | None:
    """``lowbit.nodes.NODE_CLASS_MAPPINGS`` keys -> class names, imported with ComfyUI's python and ComfyUI on
    sys.path (the nodes import comfy, so the test python may not be able to import them). None if
    ``lowbit.nodes`` does not define NODE_CLASS_MAPPINGS (yet). An import error raises AssertionError."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(comfyui_dir)!r})\n"
        "import comfy.cli_args; comfy.cli_args.args.cpu = True\n"   # before comfy.model_management (no GPU)
        "import importlib.util\n"
        # import the pack folder under its own name, exactly as a package (relative imports inside)
        f"spec = importlib.util.spec_from_file_location('lowbit_probe', {str(REPO_ROOT / '__init__.py')!r},\n"
        f"        submodule_search_locations=[{str(REPO_ROOT)!r}])\n"
        "pkg = importlib.util.module_from_spec(spec); sys.modules['lowbit_probe'] = pkg\n"
        "spec.loader.exec_module(pkg)\n"
        "import importlib; nodes = importlib.import_module('lowbit_probe.nodes')\n"
        "m = getattr(nodes, 'NODE_CLASS_MAPPINGS', None)\n"
        "print('@@NODES@@' + json.dumps(None if m is None else "
        "{k: getattr(v, '__name__', str(v)) for k, v in m.items()}))\n"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=str(comfyui_dir))
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@NODES@@")]
    if proc.returncode != 0 or not marker:
        raise AssertionError(f"importing the pack's nodes with ComfyUI's python failed ({proc.returncode}):\n"
                             f"{tail(proc.stdout, 20)}\n{tail(proc.stderr, 60)}")
    return json.loads(marker[-1][len("@@NODES@@"):])


# ------------------------------------------------------------------------------------------------- server
class ComfyServer:
    """One ComfyUI process with a private base directory. Use ``ComfyServer.start(...)`` (a context manager
    that yields a :class:`ComfyClient`) or ``server = ComfyServer(...); server.launch(); ...; server.stop()``."""

    def __init__(self, comfyui_dir: str | os.PathLike, python: str | None = None,
                 base_dir: str | os.PathLike | None = None,
                 port: int | None = None, checkpoints: list[str | os.PathLike] = (), extra_args: list[str] = (),
                 pack_dir: str | os.PathLike | None = REPO_ROOT, keep_base: bool | None = None):
        self.comfyui_dir = Path(comfyui_dir).resolve()
        if not (self.comfyui_dir / "main.py").is_file():
            raise AssertionError(f"COMFYUI_DIR={self.comfyui_dir} has no main.py")
        self.python = python or comfyui_python(self.comfyui_dir)
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="lowbit_comfy_"))
        self.keep_base = bool(os.environ.get("COMFYUI_KEEP_BASE")) if keep_base is None else keep_base
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.extra_args = list(extra_args)
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else None
        self.checkpoint_names: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self.start_seconds: float | None = None
        self._prepare(checkpoints)

    # -- layout
    def _prepare(self, checkpoints) -> None:
        b = self.base_dir
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None:
            link = b / "custom_nodes" / PACK_NAME
            if not link.exists():
                link.symlink_to(self.pack_dir, target_is_directory=True)
        for ck in checkpoints:
            ck = Path(ck).resolve()
            link = b / "models" / "checkpoints" / ck.name
            if not link.exists():
                link.symlink_to(ck)
            self.checkpoint_names.append(ck.name)

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir),
                # the default database path is <ComfyUI>/user/comfyui.db whatever --base-directory says
                "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
                *self.extra_args]

    # -- lifecycle
    def launch(self, timeout: float | None = None) -> "ComfyClient":
        if timeout is None:
            timeout = float(os.environ.get("COMFYUI_START_TIMEOUT", "240"))
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1", CUDA_VISIBLE_DEVICES="")
        env.pop("PYTHONPATH", None)  # the test runner's path must not leak into ComfyUI's python
        self._log_fh = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_dir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        client = ComfyClient(self.url, server=self)
        deadline = t0 + timeout
        last_err = None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n"
                                     f"command: {' '.join(self.command())}\n--- log tail ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        json.load(r)
                        break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError) as exc:
                last_err = exc
            if time.perf_counter() > deadline:
                self.stop()
                raise AssertionError(f"ComfyUI did not answer /object_info within {timeout:.0f}s ({last_err})\n"
                                     f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - t0
        return client

    def stop(self, grace: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)   # the group we created (start_new_session), nothing else
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base and not self.keep_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @classmethod
    def start(cls, comfyui_dir, **kwargs) -> "_Running":
        return _Running(cls(comfyui_dir, **kwargs))

    # -- log
    def log_text(self) -> str:
        """The server's console log so far, without ANSI colour codes."""
        try:
            return strip_ansi(self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_text(), lines)

    def pack_import_status(self, name: str = PACK_NAME) -> str | None:
        """'ok', 'failed' or None (not listed) for custom_nodes/<name> in ComfyUI's "Import times" list."""
        log = self.log_text()
        suffix = f"custom_nodes{os.sep}{name}"
        if any(m.group("path").strip().endswith(suffix) for m in IMPORT_FAILED_RE.finditer(log)):
            return "failed"
        if any(m.group("path").strip().endswith(suffix) for m in IMPORT_OK_RE.finditer(log)):
            return "ok"
        return None


class _Running:
    def __init__(self, server: ComfyServer):
        self.server = server

    def __enter__(self) -> "ComfyClient":
        try:
            return self.server.launch()
        except BaseException:
            self.server.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.server.cleanup()


# ------------------------------------------------------------------------------------------------- client
class ComfyClient:
    """Small HTTP client for one ComfyUI server. Every failure is an AssertionError with the server log tail."""

    def __init__(self, url: str, server: ComfyServer | None = None):
        self.url = url.rstrip("/")
        self.server = server
        self.client_id = uuid.uuid4().hex

    @property
    def checkpoint(self) -> str | None:
        """File name (as CheckpointLoaderSimple's ckpt_name expects) of the first fixture checkpoint."""
        return self.server.checkpoint_names[0] if self.server and self.server.checkpoint_names else None

    def _fail(self, msg: str) -> AssertionError:
        if self.server is not None:
            msg += f"\n--- ComfyUI log tail ({self.server.log_path}) ---\n{self.server.log_tail()}"
        return AssertionError(msg)

    def _request(self, method: str, path: str, payload=None, timeout: float = 60, raw: bool = False):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                detail = json.dumps(json.loads(body), indent=1)
            except ValueError:
                detail = body[:2000].decode(errors="replace")
            raise self._fail(f"{method} {path} -> HTTP {exc.code}\n{detail}") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            raise self._fail(f"{method} {path} failed: {exc}") from None
        if raw:
            return body
        return json.loads(body) if body else None

    def get(self, path: str, **kw):
        return self._request("GET", path, **kw)

    def post(self, path: str, payload=None, **kw):
        return self._request("POST", path, payload if payload is not None else {}, **kw)

    # -- API
    def object_info(self, node: str | None = None) -> dict:
        """All node definitions, or ``{node: definition}`` ({} if unknown) for one node."""
        return self.get("/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def queue_prompt(self, graph: dict) -> str:
        """POST /prompt; returns prompt_id. An invalid graph (HTTP 400) raises with error and node_errors."""
        res = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900, poll: float = 0.25) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry (raises on error)."""
        deadline = time.perf_counter() + timeout
        while True:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success":
                    return entry
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise self._fail(f"prompt {prompt_id} failed:\n{format_execution_error(status)}")
            if self.server is not None and self.server.proc is not None and self.server.proc.poll() is not None:
                raise self._fail(f"ComfyUI died (exit code {self.server.proc.returncode}) while running {prompt_id}")
            if time.perf_counter() > deadline:
                try:
                    self.interrupt(prompt_id)
                except AssertionError:
                    pass
                raise self._fail(f"prompt {prompt_id} did not finish within {timeout:.0f}s (interrupted)")
            time.sleep(poll)

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Queue an API-format graph and wait for it: returns the history entry
        (``{"prompt": ..., "outputs": {node_id: {"images": [...]}}, "status": {...}, "meta": ...}``)."""
        return self.wait(self.queue_prompt(graph), timeout=timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def image(self, filename: str, subfolder: str = "", type: str = "output"):
        """GET /view -> PIL.Image (loaded)."""
        from PIL import Image
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        img = Image.open(io.BytesIO(self.get(f"/view?{q}", raw=True)))
        img.load()
        return img

    @staticmethod
    def output_images(history: dict, node_id: str | None = None) -> list[dict]:
        """The ``{"filename", "subfolder", "type"}`` records of a history entry (one node or all)."""
        outs = history.get("outputs", {})
        ids = [node_id] if node_id is not None else list(outs)
        return [im for nid in ids for im in outs.get(nid, {}).get("images", [])]

    def images(self, history: dict, node_id: str | None = None) -> list:
        """PIL images of a history entry's outputs (one node or all)."""
        return [self.image(im["filename"], im.get("subfolder", ""), im.get("type", "output"))
                for im in self.output_images(history, node_id)]


def format_execution_error(status: dict) -> str:
    lines = [f"status: {status.get('status_str')} completed={status.get('completed')}"]
    for msg in status.get("messages", []):
        kind, data = (msg + [None])[:2] if isinstance(msg, list) else (str(msg), None)
        if kind in ("execution_error", "execution_interrupted") and isinstance(data, dict):
            lines.append(f"{kind}: node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
            tb = data.get("traceback")
            if tb:
                lines.append("".join(tb) if isinstance(tb, list) else str(tb))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- graph helpers
def baseline_graph(ckpt_name: str, steps: int = 2, size: int = 64, cfg: float = 7.0, seed: int = 1,
                   positive: str = "a photo of a cat", negative: str = "blurry",
                   sampler: str = "euler", scheduler: str = "normal", prefix: str = "lowbit_baseline") -> dict:
    """API-format CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> SaveImage.
    Node ids: "1" loader, "2"/"3" positive/negative, "4" empty latent, "5" KSampler, "6" VAEDecode, "7" SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
