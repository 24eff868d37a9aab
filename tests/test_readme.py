"""The README's library example runs as written (issue: users copy it). The default run shortens its
settings (the numbers of steps) and checks the result; the `slow` run executes the block unchanged."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its library example (marker <!-- readme-example -->)"
    return m.group(1)


SHORT = [("steps=20)", "steps=6)"), ("torch.arange(20)", "torch.arange(8)"),
         ("ReconConfig.quick()", "ReconConfig.quick(weight_iters=5)"),
         ("steps=300", "steps=8")]


def _run(code: str, cwd: Path):
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_readme_example_runs_with_short_settings(tmp_path):
    code = example()
    for a, b in SHORT:
        assert a in code, f"the README example changed: {a!r} not found; update SHORT"
        code = code.replace(a, b)
    out = _run(code, tmp_path)
    assert (tmp_path / "unet-w4a8.safetensors").is_file()
    assert re.search(r"W4A8 \(diffusers-unet profile\): \d+ layers W4A8.*\n  \S+: (W8A8|float) "
                     r"\(measured: output error ", out), out


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    out = _run(example(), tmp_path)
    assert "W4A8" in out
