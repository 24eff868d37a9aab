"""The comfy_kitchen backend (kernels/comfy_kitchen.py) against the eager reference, on comfy-kitchen's eager path
(CPU). Skips when comfy-kitchen is not installed (`pip install comfy-kitchen`)."""
from __future__ import annotations

import sys

import pytest
import torch

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen is not installed (pip install comfy-kitchen): its "
                                                 "backend is not registered")

from lowbit.kernels import ActQuant, ops  # noqa: E402
from lowbit.kernels.registry import NoBackendError, get_backend  # noqa: E402


def _pw(n, k, bits=4, group=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ops.quantize_weight(torch.randn(n, k, generator=g), bits, group)


def test_registered_with_declared_constraints():
    b = get_backend("comfy_kitchen")
    assert "linear" in b.ops and "conv2d" not in b.ops and "pack_weight" not in b.ops
    assert "comfy_kitchen" in ops.available_backends()


@pytest.mark.parametrize("n,k,bits,group", [(48, 64, 4, 16), (40, 96, 4, 32), (24, 64, 4, None), (16, 32, 3, 8),
                                            (8, 128, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_int4_linear_matches_eager(n, k, bits, group, dtype):
    pw = _pw(n, k, bits, group)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n)
    with ck.registry.use_backend("eager"):
        y = ops.run_on("comfy_kitchen", "linear", x, pw, bias, None)
    ref = ops.run_on("eager", "linear", x, pw, bias, None)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # both compute in fp32; bf16 only rounds the output
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol
    assert "comfy_kitchen" in pw.cache  # kitchen-layout tensors cached on the weight ...
    assert "comfy_kitchen" not in __import__("copy").deepcopy(pw).cache  # ... and never copied


@pytest.mark.parametrize("case,match", [
    ("act", "asymmetric"),
    ("int8", "only int4_group/int4_channel"),
    ("odd_group", "multiple of the group size"),
    ("int_x", "fp32, fp16 or bf16"),
])
def test_refuses_what_it_cannot_compute_exactly(case, match):
    pw, x, act = _pw(16, 64, 4, 16), torch.randn(2, 64), None
    if case == "act":
        act = ActQuant(bits=8, scale=0.1, zero_point=128)
    elif case == "int8":
        pw = _pw(16, 64, 8, None)
    elif case == "odd_group":
        pw = _pw(16, 60, 4, 16)  # K = 60: the last group is partial
        x = torch.randn(2, 60)
    elif case == "int_x":
        x = torch.ones(2, 64, dtype=torch.int32)
    with pytest.raises(NoBackendError, match=match):
        ops.run_on("comfy_kitchen", "linear", x, pw, None, act)


def test_not_imported_means_not_used(monkeypatch):
    """The package costs seconds to import: the backend only runs once someone (ComfyUI) imported it."""
    monkeypatch.delitem(sys.modules, "comfy_kitchen")
    with pytest.raises(NoBackendError, match="not imported"):
        ops.run_on("comfy_kitchen", "linear", torch.randn(2, 64), _pw(16, 64, 4, 16), None, None)


def test_plain_dispatch_keeps_lowbits_kernels():
    """Priority 5: below the cpu backend (20), so dispatch keeps LowBit's CPU kernels; the autotuner or
    LOWBIT_BACKEND=comfy_kitchen choose it."""
    pw = _pw(16, 64, 4, 16)
    assert ops.backend_for("linear", torch.randn(40, 64), pw, None, None) != "comfy_kitchen"
    assert get_backend("comfy_kitchen").priority < get_backend("cpu").priority
