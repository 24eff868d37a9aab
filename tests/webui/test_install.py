"""install.py under both hosts: plain python / ComfyUI-Manager (no ``launch``) and the WebUI (``launch``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL = REPO_ROOT / "install.py"


def _fake_pip(tmp: Path) -> tuple[Path, Path]:
    """A `pip` executable and a `pip` package (for ``python -m pip``) that only record their arguments."""
    log = tmp / "pip_calls.jsonl"
    bindir, pkgdir = tmp / "bin", tmp / "site"
    (pkgdir / "pip").mkdir(parents=True)
    bindir.mkdir()
    recorder = f"import json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
    (pkgdir / "pip" / "__init__.py").write_text(recorder)
    (pkgdir / "pip" / "__main__.py").write_text(recorder)
    for name in ("pip", "pip3", f"pip{sys.version_info.major}.{sys.version_info.minor}"):
        exe = bindir / name
        exe.write_text(f"#!{sys.executable}\n{recorder}")
        exe.chmod(0o755)
    return log, pkgdir


def _run(tmp: Path, pythonpath: list[Path], *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return subprocess.run([sys.executable, *flags, str(INSTALL)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=120)


def test_plain_python_installs_nothing(tmp_path):
    """ComfyUI-Manager / plain python: no `launch` module -> exit 0, no pip invocation of any kind."""
    log, pkgdir = _fake_pip(tmp_path)
    res = _run(tmp_path, [pkgdir])
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"install.py invoked pip: {log.read_text()}"
    assert "nothing to install" in res.stdout


def test_isolated_mode_installs_nothing(tmp_path):
    """The same with `python -I` (no environment, no user site): still exit 0."""
    log, _ = _fake_pip(tmp_path)
    res = _run(tmp_path, [], "-I")
    assert res.returncode == 0, res.stderr
    assert not log.exists()


def test_unrelated_launch_module_is_ignored(tmp_path):
    """A random top-level `launch` module (not the WebUI's) must not be mistaken for the WebUI."""
    log, pkgdir = _fake_pip(tmp_path)
    (pkgdir / "launch.py").write_text("print('some other launch module')\n")
    res = _run(tmp_path, [pkgdir])
    assert res.returncode == 0, res.stderr
    assert not log.exists()


def _fake_webui_launch(pkgdir: Path, missing: set, calls_log: Path):
    (pkgdir / "launch.py").write_text(textwrap.dedent(f"""
        import json
        MISSING = {sorted(missing)!r}
        def is_installed(name):
            return name not in MISSING
        def run_pip(command, desc=None, live=False):
            open({str(calls_log)!r}, "a").write(json.dumps([command, desc]) + "\\n")
    """))


def test_webui_installs_only_missing_packages(tmp_path):
    """Under the WebUI: only the missing packages go through launch.run_pip, never torch, never a pin that
    could downgrade (a lower bound only)."""
    log, pkgdir = _fake_pip(tmp_path)
    calls = tmp_path / "run_pip.jsonl"
    _fake_webui_launch(pkgdir, {"peft"}, calls)
    res = _run(tmp_path, [pkgdir])
    assert res.returncode == 0, res.stderr
    issued = [json.loads(line)[0] for line in calls.read_text().splitlines()]
    assert issued == ['install "peft>=0.12"'], issued
    assert not any("torch" in c for c in issued)
    assert not log.exists(), "pip must be called through launch.run_pip only"


def test_webui_with_everything_installed_does_nothing(tmp_path):
    log, pkgdir = _fake_pip(tmp_path)
    calls = tmp_path / "run_pip.jsonl"
    _fake_webui_launch(pkgdir, set(), calls)
    res = _run(tmp_path, [pkgdir])
    assert res.returncode == 0, res.stderr
    assert not calls.exists() and not log.exists()
