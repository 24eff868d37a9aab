"""Shared helpers for the kernels tests. Random data is fresh each run (no fixed seed); failures print the seed."""
import importlib.util
import os
import sys

import pytest

# The Triton interpreter must be on when triton is *imported*: triton.language's own helpers (tl.sum, tl.max...)
# are @jit functions wrapped at import time. We import it here with TRITON_INTERPRET=1 and restore the variable at
# once, so that only tests asking for the `triton_interpret` fixture see the backend accept CPU tensors.
TRITON_INTERPRETABLE = False
TRITON_SKIP_REASON = "triton is not installed"
if importlib.util.find_spec("triton") is not None:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        TRITON_SKIP_REASON = ("triton was imported before tests/kernels/conftest.py without TRITON_INTERPRET=1; run "
                              "`TRITON_INTERPRET=1 pytest tests/kernels` or the kernels tests on their own")
    else:
        _prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        import triton.language  # noqa: F401,E402
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev
        TRITON_INTERPRETABLE = True

import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with the captured output of a failing test
    yield


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("LOWBIT_BACKEND", "LOWBIT_DISABLE_BACKENDS", "LOWBIT_CPU_CACHE_INT4", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    # kernel arithmetic is compared with the reference on the reference's activation codes; the default fused CPU
    # quantizer (one step off at ties) has its own tests, which delenv this
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1")
    return monkeypatch


@pytest.fixture
def triton_interpret(clean_env):
    """Run the triton backend in the interpreter on CPU tensors (skips, saying why, when that is impossible)."""
    if not TRITON_INTERPRETABLE:
        pytest.skip(TRITON_SKIP_REASON)
    clean_env.setenv("TRITON_INTERPRET", "1")
    return clean_env
