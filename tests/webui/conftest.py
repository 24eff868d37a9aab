"""Fixtures for the WebUI integration tests (Forge: forge_harness.py; A1111: a1111_harness.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forge_harness import SKIP_REASON, ForgeServer, forge_paths  # noqa: E402
from make_sd15_fixture import ensure_fixture  # noqa: E402


@pytest.fixture(scope="session")
def forge_server(tmp_path_factory):
    """A running headless Forge with this repo as its `lowbit` extension (skips without FORGE_DIR)."""
    paths = forge_paths()
    if paths is None:
        pytest.skip(SKIP_REASON)
    forge_dir, python = paths
    checkpoint = ensure_fixture()
    log_path = Path(os.environ.get("FORGE_LOG") or tmp_path_factory.mktemp("forge") / "forge.log")
    server = ForgeServer(forge_dir, python, checkpoint=checkpoint, log_path=log_path,
                         startup_timeout=float(os.environ.get("FORGE_STARTUP_TIMEOUT", "600")))
    yield from _serving(server)


def _serving(server):
    """The started ``server`` for a fixture's lifetime, stopped (its process group killed) at the end."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def forge(forge_server):
    """ForgeClient of the session's Forge: txt2img(payload) -> list[PIL.Image], scripts(), get(), post()."""
    return forge_server.client


@pytest.fixture(scope="session")
def a1111_server(tmp_path_factory):
    """A running headless A1111 with this repo as its `lowbit` extension (skips without A1111_DIR)."""
    from a1111_harness import SKIP_REASON as A1111_SKIP, A1111Server, a1111_paths

    paths = a1111_paths()
    if paths is None:
        pytest.skip(A1111_SKIP)
    log_path = Path(os.environ.get("A1111_LOG") or tmp_path_factory.mktemp("a1111") / "a1111.log")
    server = A1111Server(*paths, checkpoint=ensure_fixture(), log_path=log_path,
                         startup_timeout=float(os.environ.get("A1111_STARTUP_TIMEOUT", "600")))
    yield from _serving(server)


@pytest.fixture(scope="session")
def a1111(a1111_server):
    """The client of the session's A1111 (the same /sdapi/v1 client as Forge's)."""
    return a1111_server.client


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    for name in ("forge_server", "a1111_server"):
        if rep.failed and name in getattr(item, "fixturenames", ()):
            server = item.funcargs.get(name)
            if server is not None:
                rep.sections.append((f"{name} log tail ({server.log_path})", server.log_tail(120)))
