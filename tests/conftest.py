import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines (docs/CPU_KERNELS.md)
# One intra-op thread unless told otherwise (OMP_NUM_THREADS=2 pytest ...): the suite is many small ops, and on the
# 2-core machine every parallel region pays for waking the second thread (PASSIVE) or fights other jobs for it (spin
# waiting): the quick suite took 6 min 06 s with one thread against 8 min 25 s with two (2026-12-03, idle machine).
# Tests of multi-threaded behaviour set their thread count themselves (tests/kernels/test_cpu.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # a plugin imported torch first: it read the environment already
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _drop_checkout_from_path():
    if _ROOT in sys.path:
        while _ROOT in sys.path:
            sys.path.remove(_ROOT)
        mod = sys.modules.get("kernels")
        if mod is not None and str(getattr(mod, "__file__", "") or "").startswith(_ROOT + os.sep):
            del sys.modules["kernels"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """pytest sets up the checkout as a package (it has an ``__init__.py``: it is the lowbit package) and, when the
    folder's name is not a Python identifier (``lowbit-main``, ``ci-clone``), puts the folder itself on sys.path; then
    ``import kernels`` (transformers does it when Hugging Face's ``kernels`` package is installed) found LowBit's
    ``kernels/`` folder, and every diffusers model failed to import. Undone after each setup (a fixture that imports
    diffusers during the setup asks for ``checkout_off_path``)."""
    yield
    _drop_checkout_from_path()


@pytest.fixture(scope="module")
def checkout_off_path():
    """For a fixture that imports diffusers or transformers while it is set up (the setup puts the checkout on
    sys.path again, see ``pytest_runtest_setup``): the checkout off sys.path from here on."""
    _drop_checkout_from_path()


@pytest.fixture
def registry_kernels(monkeypatch):
    """Kernels in registry order for this test (LOWBIT_AUTOTUNE=0): two models with the same integers and scales
    then compute bit for bit the same (the autotuner's per-model measured choices may differ by float summation
    order, and a code next to a rounding tie can flip)."""
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")
