"""Run a real AUTOMATIC1111 stable-diffusion-webui headless (API only, CPU) for the integration tests.

    A1111_DIR=/path/to/stable-diffusion-webui pytest -m a1111 tests/webui   # set up as in the README

The same process handling as Forge's (``forge_harness.ForgeServer``: this repository linked as
``extensions/lowbit``, the random SD1.5 fixture in ``models/Stable-diffusion``, its own process group, loopback
only); what differs for A1111: its CPU flags (``--use-cpu all --no-half``), and the CLIP tokenizer, which A1111
loads from the Hugging Face hub by name: an offline cache entry is built from the BPE file in A1111's own venv
(``make_clip_tokenizer_cache.py``) and passed as ``HF_HOME`` with ``HF_HUB_OFFLINE=1``. A1111 runs in its own
venv (``A1111_PYTHON``, default ``$A1111_DIR/../a1111-venv/bin/python``).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from forge_harness import HOST, ForgeError, ForgeServer, env_paths
from make_sd15_fixture import default_cache_dir

SKIP_REASON = ("set A1111_DIR to an AUTOMATIC1111 stable-diffusion-webui checkout (see the README section "
               "'Testing inside real hosts') to run the A1111 integration tests")

# --skip-prepare-environment/--skip-install keep launch.py offline (no git clones of repositories/, no pip)
LAUNCH_ARGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--use-cpu", "all",
               "--no-half", "--nowebui", "--skip-version-check", "--server-name", HOST]
REPOSITORIES = ("stable-diffusion-stability-ai", "generative-models", "k-diffusion")


def a1111_paths() -> tuple[Path, Path] | None:
    """(A1111 dir, python of its venv) from A1111_DIR / A1111_PYTHON, or None when A1111_DIR is unset."""
    paths = env_paths("A1111", "a1111-venv")
    if paths is None:
        return None
    webui_dir, py = paths
    if not (webui_dir / "launch.py").is_file() or (webui_dir / "modules_forge").exists():
        raise ForgeError(f"A1111_DIR={webui_dir} is not an A1111 checkout (no launch.py, or it is Forge)")
    missing = [r for r in REPOSITORIES if not (webui_dir / "repositories" / r).is_dir()]
    if missing:
        raise ForgeError(f"{webui_dir}/repositories lacks {', '.join(missing)} (launch.py clones them online; "
                         "offline, export them at the commits modules/launch_utils.py names)")
    if not py.exists():
        raise ForgeError(f"A1111's python {py} does not exist; set A1111_PYTHON")
    return webui_dir, py


def clip_cache(python: Path) -> Path:
    """The HF_HOME holding openai/clip-vit-large-patch14's tokenizer, built once with A1111's python."""
    home = Path(os.environ.get("A1111_HF_HOME") or default_cache_dir() / "a1111-hf")
    snap = home / "hub" / "models--openai--clip-vit-large-patch14" / "refs" / "main"
    if not snap.is_file():
        script = Path(__file__).with_name("make_clip_tokenizer_cache.py")
        res = subprocess.run([str(python), str(script), str(home)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise ForgeError(f"building the CLIP tokenizer cache failed:\n{res.stderr[-2000:]}")
    return home


class A1111Server(ForgeServer):
    """An A1111 process with this repo as the `lowbit` extension. Use as a context manager."""

    def __init__(self, webui_dir: Path, python: Path, **kw):
        super().__init__(webui_dir, python, **kw)
        self.hf_home = clip_cache(self.python)

    launch_args = LAUNCH_ARGS

    def environment(self) -> dict:
        env = super().environment()
        env["HF_HOME"] = str(self.hf_home)
        env.pop("HF_HUB_CACHE", None)
        env.pop("TRANSFORMERS_CACHE", None)
        return env
