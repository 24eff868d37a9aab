"""Run a real Stable-Diffusion-WebUI Forge headless (API only, CPU) for the integration tests.

    FORGE_DIR=/work/forge pytest tests/webui  # after setting it up as in the README section 'Testing inside real hosts'

`ForgeServer` links this repository into `$FORGE_DIR/extensions/lowbit`, puts the random SD1.5 fixture in
`models/Stable-diffusion/`, starts `launch.py --nowebui` on a free loopback port in its own process group,
and waits for the API; `ForgeClient` talks to it over HTTP (127.0.0.1 only). Everything it created is
removed again by `stop()`. Only the standard library and Pillow are needed on the test side: Forge runs in
its own venv (`FORGE_PYTHON`, default `$FORGE_DIR/../forge-venv/bin/python`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "lowbit"
HOST = "127.0.0.1"
SKIP_REASON = ("set FORGE_DIR to a Forge checkout (see the README section 'Testing inside real hosts') "
               "to run the Forge integration tests")

# docs/HOST_INTERNALS.md 6.2: --skip-prepare-environment/--skip-install keep launch.py offline (no git clones, no pip).
LAUNCH_ARGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu",
               "--nowebui", "--skip-version-check", "--server-name", HOST]


class ForgeError(RuntimeError):
    pass


def env_paths(var: str, venv: str) -> tuple[Path, Path] | None:
    """(host dir, its python) from ``<var>_DIR`` and ``<var>_PYTHON`` (default: ``<dir>/../<venv>/bin/python``), or
    None when ``<var>_DIR`` is unset; the callers check what they hold."""
    d = os.environ.get(f"{var}_DIR")
    if not d:
        return None
    host_dir = Path(d).resolve()
    return host_dir, Path(os.environ.get(f"{var}_PYTHON") or host_dir.parent / venv / "bin" / "python")


def forge_paths() -> tuple[Path, Path] | None:
    """(forge dir, python of its venv) from FORGE_DIR / FORGE_PYTHON, or None when FORGE_DIR is unset."""
    paths = env_paths("FORGE", "forge-venv")
    if paths is None:
        return None
    forge_dir, py = paths
    if not (forge_dir / "launch.py").is_file():
        raise ForgeError(f"FORGE_DIR={forge_dir} has no launch.py; "
                         "set it up as in the README section 'Testing inside real hosts'")
    if not py.exists():
        raise ForgeError(f"Forge's python {py} does not exist; set FORGE_PYTHON or run: "
                         f"(README section 'Testing inside real hosts')")
    return forge_dir, py


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ForgeClient:
    """Minimal client of the /sdapi/v1 API (A1111-compatible)."""

    def __init__(self, base_url: str, server: "ForgeServer | None" = None):
        assert base_url.startswith(f"http://{HOST}:"), base_url  # loopback only
        self.base_url = base_url.rstrip("/")
        self.server = server

    def request(self, method: str, path: str, payload=None, timeout: float = 60.0):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise ForgeError(f"{method} {path} -> HTTP {e.code}: {detail}{self._log_hint()}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ForgeError(f"{method} {path} failed: {e}{self._log_hint()}") from None
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 60.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload, timeout: float = 600.0):
        return self.request("POST", path, payload, timeout=timeout)

    def txt2img_raw(self, payload: dict, timeout: float = 900.0) -> dict:
        """POST /sdapi/v1/txt2img; the JSON answer ({images: [b64 png], parameters, info: json str})."""
        return self.post("/sdapi/v1/txt2img", payload, timeout=timeout)

    def txt2img(self, payload: dict, timeout: float = 900.0) -> list:
        """Generate; returns the images as PIL.Image objects (info in `self.last_info`)."""
        from PIL import Image

        res = self.txt2img_raw(payload, timeout=timeout)
        self.last_info = json.loads(res.get("info") or "{}")
        images = []
        for b64 in res.get("images") or []:
            if "," in b64[:64]:  # tolerate a data: URL prefix
                b64 = b64.split(",", 1)[1]
            im = Image.open(io.BytesIO(base64.b64decode(b64)))
            im.load()
            images.append(im)
        return images

    def scripts(self) -> dict:
        """GET /sdapi/v1/scripts: {"txt2img": [lower-cased titles], "img2img": [...]}."""
        return self.get("/sdapi/v1/scripts")

    def script_info(self) -> list:
        """GET /sdapi/v1/script-info: per script name, is_alwayson, is_img2img and its ui() args."""
        return self.get("/sdapi/v1/script-info")

    def sd_models(self) -> list:
        return self.get("/sdapi/v1/sd-models")

    def options(self) -> dict:
        return self.get("/sdapi/v1/options")

    def log_tail(self, lines: int = 80) -> str:
        return self.server.log_tail(lines) if self.server else ""

    def _log_hint(self) -> str:
        tail = self.log_tail(40)
        return f"\n--- Forge log (last 40 lines) ---\n{tail}" if tail else ""


class ForgeServer:
    """A Forge process with this repo as the `lowbit` extension. Use as a context manager."""

    def __init__(self, forge_dir: Path, python: Path, checkpoint: Path | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, log_path: Path | None = None,
                 startup_timeout: float = 600.0, link_extension: bool = True):
        self.forge_dir = Path(forge_dir)
        self.python = Path(python)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.link_extension = link_extension
        self._tmpdir = None
        if log_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="lowbit-forge-")
            log_path = Path(self._tmpdir) / "forge.log"
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._created: list[Path] = []   # links/files this object made, removed by stop()
        self.client = ForgeClient(f"http://{HOST}:{self.port}", server=self)

    # -- setup ------------------------------------------------------------------------------------------
    def _link_extension(self) -> None:
        link = self.forge_dir / "extensions" / EXTENSION_NAME
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == REPO_ROOT:
                return  # somebody else's link to this same checkout: use it, leave it
            raise ForgeError(f"{link} exists and is not a link to {REPO_ROOT}; remove it or point it here")
        link.symlink_to(REPO_ROOT, target_is_directory=True)
        self._created.append(link)

    def _place_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        dest = self.forge_dir / "models" / "Stable-diffusion" / self.checkpoint.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            if dest.resolve() == self.checkpoint.resolve() or dest.stat().st_size == self.checkpoint.stat().st_size:
                return
            raise ForgeError(f"{dest} exists and differs from {self.checkpoint}")
        dest.symlink_to(self.checkpoint.resolve())   # a 2 GB copy is not needed: Forge reads through links
        self._created.append(dest)

    launch_args = LAUNCH_ARGS  # (A1111Server: A1111's CPU flags)

    def command(self) -> list[str]:
        args = [str(self.python), "launch.py", *self.launch_args, "--port", str(self.port)]
        if self.checkpoint is not None:
            # Select the fixture even when other checkpoints sit in models/Stable-diffusion.
            args += ["--ckpt", str(self.forge_dir / "models" / "Stable-diffusion" / self.checkpoint.name)]
        return args + self.extra_args

    def environment(self) -> dict:
        env = dict(os.environ)
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "COMMANDLINE_ARGS"):
            env.pop(k, None)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1", NO_PROXY="127.0.0.1,localhost",
                   no_proxy="127.0.0.1,localhost")
        return env

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> ForgeClient:
        try:
            if self.link_extension:
                self._link_extension()
            self._place_checkpoint()
            self._log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(self.command(), cwd=self.forge_dir, env=self.environment(),
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.client

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ForgeError(f"Forge exited with code {self.proc.returncode} during startup\n"
                                 f"--- {self.log_path} (tail) ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.client.base_url}/sdapi/v1/sd-models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise ForgeError(f"Forge API did not answer within {self.startup_timeout:.0f} s\n"
                         f"--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pgid = self.proc.pid  # start_new_session: the process group id is the child's pid
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        for p in reversed(self._created):
            if p.is_symlink():
                p.unlink()
        self._created.clear()

    def cleanup_logs(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def log_tail(self, lines: int = 80) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        # tqdm redraws with \r: split on it too so a progress bar is one line per update, not one huge line
        text = data[-200_000:].decode(errors="replace").replace("\r", "\n")
        kept = [line for line in text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])

    def error_blocks(self, markers: tuple[str, ...] | None = None) -> list[str]:
        """Tracebacks in the log that pass through one of `markers` (default: this extension's folder and
        this checkout, which the editable `lowbit` install imports from), each with the line before it
        (Forge's "*** Error loading script: x.py" / "task: ExcType" headline)."""
        markers = markers or (f"extensions/{EXTENSION_NAME}/", str(REPO_ROOT) + os.sep)
        try:
            lines = self.log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
        except OSError:
            return []
        blocks, i = [], 0
        while i < len(lines):
            line = lines[i]
            if "Traceback (most recent call last)" not in line:
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines):
                cur = lines[j]
                cur_indent = len(cur) - len(cur.lstrip())
                if cur.strip() and cur_indent <= indent and not cur.lstrip().startswith(
                        ("During handling", "The above exception", "Traceback")):
                    break
                j += 1
            block = lines[max(i - 1, 0): j + 1]
            if any(m in b for b in block for m in markers):
                blocks.append("\n".join(block))
            i = j + 1
        return blocks

    def __enter__(self) -> ForgeClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
