"""Fixtures for the ComfyUI node tests.

``comfy`` (session scope): a real ComfyUI server started headless on CPU with this repository symlinked as
``custom_nodes/lowbit`` and the random SD1.5 fixture checkpoint in ``models/checkpoints`` (see comfy_harness.py
for the environment variables). Skipped unless ``COMFYUI_DIR`` is set.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_harness  # noqa: E402


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    d = comfy_harness.comfyui_dir_from_env()
    if d is None:
        pytest.skip(comfy_harness.SKIP_MESSAGE)
    if not (d / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={d} is not a ComfyUI checkout (no main.py); "
                    "see the README section 'Testing inside real hosts'")
    return d


@pytest.fixture(scope="session")
def comfyui_python(comfyui_dir) -> str:
    return comfy_harness.comfyui_python(comfyui_dir)


@pytest.fixture(scope="session")
def sd15_fixture(comfyui_dir, comfyui_python) -> Path:
    """Path of the cached random SD1.5-class checkpoint (built with ComfyUI's python on first use)."""
    return comfy_harness.ensure_fixture(comfyui_dir, comfyui_python,
                                        variant=os.environ.get("LOWBIT_FIXTURE_VARIANT") or None)


@pytest.fixture(scope="session")
def comfy(comfyui_dir, comfyui_python, sd15_fixture):
    """A :class:`comfy_harness.ComfyClient` for a running ComfyUI; the server is stopped (process group killed)
    and its temporary base directory removed at the end of the session (kept if a test failed)."""
    server = comfy_harness.ComfyServer(comfyui_dir, python=comfyui_python, checkpoints=[sd15_fixture])
    try:
        client = server.launch()
        yield client
    finally:
        server.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the ComfyUI log tail to every failing test that used the server."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        client = getattr(item, "funcargs", {}).get("comfy")
        server = getattr(client, "server", None)
        if server is not None:
            rep.sections.append((f"ComfyUI log tail ({server.log_path})", server.log_tail(80)))
            server.keep_base = True  # keep the base dir (log, outputs) of a failing session for inspection
