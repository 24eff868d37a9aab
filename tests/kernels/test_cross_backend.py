"""Every backend against the eager reference, for every format x layer type.

Each backend must accept exactly the cases it declares (a silent refusal would let the test pass without running
anything), and its output must match eager: integer paths to 1e-5 relative (same integers, only the fp32 epilogue
order differs), bf16 weight-only paths to 2e-2. The triton backend runs in the interpreter (TRITON_INTERPRET=1
imported by conftest.py; the backend accepts CPU tensors only in tests using the ``triton_interpret`` fixture).
"""
import importlib.util

import pytest
import torch

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops
from lowbit.kernels.registry import get_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None

# name: (weight bits, activation quantizer factory or None, group_size)
FORMATS = {
    "W8A8-static": (8, lambda: ActQuant(8, 0.035, 121), None),
    "W8A8-dynamic": (8, lambda: ActQuant(8, dynamic=True), None),
    "W4A8-static": (4, lambda: ActQuant(8, 0.035, 121), None),
    "W4A8-dynamic": (4, lambda: ActQuant(8, dynamic=True), None),
    "W4A8-g32-dynamic": (4, lambda: ActQuant(8, dynamic=True), 32),
    "W4A4-static": (4, lambda: ActQuant(4, 0.5, 7), None),
    "W4A4-dynamic": (4, lambda: ActQuant(4, dynamic=True), None),
    "W4A16": (4, None, None),
    "W4A16-g32": (4, None, 32),
    "W8A16": (8, None, None),
}
# name: (kind, kernel, stride, padding)
LAYERS = {
    "linear": ("linear", None, None, None),
    "conv3x3-s1": ("conv", 3, 1, 1),
    "conv3x3-s2": ("conv", 3, 2, 1),
    "conv1x1": ("conv", 1, 1, 0),
}


def expected_to_accept(backend, fmt, layer, pw):
    wbits, act_f, _ = FORMATS[fmt]
    kind = LAYERS[layer][0]
    act = act_f() if act_f else None
    gs = pw.group_size
    if backend == "cpu":
        return act is None or gs is None
    if backend == "onednn":
        return act is not None and gs is None and wbits == 8 and not (kind == "linear" and act.dynamic)
    if backend == "triton":
        return not (kind == "conv" and act is None)
    raise AssertionError(backend)


def _case(fmt, layer):
    wbits, act_f, gs = FORMATS[fmt]
    kind, k, stride, pad = LAYERS[layer]
    bias = torch.randn(40)
    if kind == "linear":
        x = torch.randn(2, 19, 72)
        pw = ops.quantize_weight(torch.randn(40, 72) * 0.05, wbits, gs)
        return (x, pw, bias, act_f() if act_f else None)
    x = torch.randn(1, 8, 9, 10)  # K = 72 (3x3) or 8 (1x1); M <= 90: a few interpreter programs
    pw = ops.quantize_weight(torch.randn(40, 8, k, k) * 0.05, wbits, gs if k == 3 else None)
    return (x, pw, bias, (stride, stride), (pad, pad), (1, 1), 1, act_f() if act_f else None)


BACKENDS = ["cpu", "onednn"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_eager(request, clean_env, backend, fmt, layer):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    args = _case(fmt, layer)
    op = "linear" if LAYERS[layer][0] == "linear" else "conv2d"
    ok, why = get_backend(backend).check(op, *args)
    assert ok == expected_to_accept(backend, fmt, layer, args[1]), why
    if not ok:
        return
    ref = ops.run_on("eager", op, *args)
    out = ops.run_on(backend, op, *args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    weight_only_bf16 = args[-1] is None and backend == "cpu"
    tol = 2e-2 if weight_only_bf16 else 1e-5
    err = rel_err(out, ref)
    assert err < tol, f"{backend} {fmt} {layer}: rel err {err:.2e} >= {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_dispatch_matches_eager_bf16(request, clean_env, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    x = torch.randn(33, 64).bfloat16()
    pw = ops.quantize_weight(torch.randn(48, 64), 8)
    act = ActQuant(8, 0.03, 128)
    ref = ops.run_on("eager", "linear", x, pw, None, act)
    out = ops.run_on(backend, "linear", x, pw, None, act)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
