"""Activation epilogues fused in the Triton GEMMs (kernels/post.py, ``triton_gpu.linear(..., post=...)``), in the
interpreter on CPU tensors (outputs poisoned with NaN before launch, so a column the epilogue does not write fails):
the fused result == ``post.apply`` of the same kernel's plain output, and == the epilogue of the eager reference."""
import importlib.util

import pytest
import torch

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops, post, registry

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

FORMATS = {  # name: (weight bits, group size, activation quantizer or None): every path of both GEMM kernels
    "W8A8-static": (8, None, lambda: ActQuant(8, 0.035, 121)),
    "W8A8-dynamic": (8, None, lambda: ActQuant(8, dynamic=True)),
    "W4A8-group32": (4, 32, lambda: ActQuant(8, 0.035, 121)),
    "W4A4-dynamic": (4, None, lambda: ActQuant(4, dynamic=True)),
    "W4A16": (4, None, None),
    "W8A16-group64": (8, 64, None),
}


def _case(fmt, n=70, m=45, k=131):
    """M, N not multiples of the tiles, N / 2 = 35 (GEGLU's halves end mid-tile), odd K (a padded nibble)."""
    bits, gs, act_f = FORMATS[fmt]
    x = torch.randn(3, m // 3, k) * 2
    pw = ops.quantize_weight(torch.randn(n, k) * 0.1, bits, gs)
    return x, pw, torch.randn(n), act_f() if act_f else None


def test_triton_declares_the_epilogues_it_fuses():
    from lowbit.kernels import triton_gpu

    entry = registry.get_backend("triton").ops["linear"]
    assert entry.posts == set(post.POSTS) == {"gelu", "gelu_tanh", "geglu"}
    for name in post.POSTS:
        fused = registry.with_post(entry, name)
        assert fused.func is triton_gpu.linear and fused.keywords == {"post": name}  # the kernel's own epilogue


@pytest.mark.parametrize("name", list(post.POSTS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fused_epilogue_matches_unfused_and_eager(triton_interpret, fmt, name):
    from lowbit.kernels import triton_gpu

    x, pw, b, act = _case(fmt)
    plain = triton_gpu.linear(x, pw, b, act)
    out = triton_gpu.linear(x, pw, b, act, post=name)
    width = 35 if name == "geglu" else 70
    assert out.shape == (3, 15, width) and out.dtype == x.dtype
    unfused = post.apply(plain, name)
    ref = post.apply(ops.run_on("eager", "linear", x, pw, b, act), name)
    assert rel_err(out, unfused) < 2e-6, rel_err(out, unfused)  # the same accumulator, only the GELU's rounding
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert not torch.equal(out, plain[..., :width])  # the epilogue ran
    # through dispatch: the public op on the triton backend takes the fused path
    with registry.forced_backend("triton"):
        assert torch.equal(ops.linear(x, pw, b, act, post=name), out)


@pytest.mark.parametrize("name", list(post.POSTS))
def test_fused_epilogue_other_launch_paths(triton_interpret, name):
    """The fused activation quantizer (FUSED_A), a tile override with BN = 16 (GEGLU: 8 columns per program) and no
    bias."""
    from lowbit.kernels import triton_gpu

    x, pw, _, act = _case("W8A8-static", n=52)
    ref = post.apply(ops.run_on("eager", "linear", x, pw, None, act), name)
    with triton_gpu.fused_act_quant():
        assert rel_err(triton_gpu.linear(x, pw, None, act, post=name), ref) < 1e-5
    with triton_gpu.tiles(32, 16, 32):
        assert rel_err(triton_gpu.linear(x, pw, None, act, post=name), ref) < 1e-5


def test_fused_epilogue_with_the_large_tiles(triton_interpret):
    """128 x 128 x 64 tiles: GEGLU's tile holds 64 columns of each half; N / 2 = 260 ends mid-tile."""
    from lowbit.kernels import triton_gpu

    x = torch.randn(1030, 256)
    pw = ops.quantize_weight(torch.randn(520, 256) * 0.05, 8, None)
    act = ActQuant(8, 0.05, 128)
    assert triton_gpu._tile_config(1030, 520, pw)[0] == (128, 128, 64)
    y = ops.run_on("eager", "linear", x, pw, None, act)
    for name in ("geglu", "gelu_tanh"):
        out = triton_gpu.linear(x, pw, None, act, post=name)
        assert rel_err(out, post.apply(y, name)) < 1e-5


def test_bf16_input_gets_the_epilogue_in_fp32(triton_interpret):
    """bf16 inputs: the epilogue runs on the fp32 value and the output is written in bf16 (the integer kernel; the
    interpreter's bf16 tl.dot is wrong, so not the weight-only one here, and its bf16 stores truncate: compared
    with the fp32 result within bf16's precision, not bit for bit)."""
    from lowbit.kernels import triton_gpu

    x, pw, b, act = _case("W8A8-dynamic")
    xb = x.bfloat16()
    for name in post.POSTS:
        out = triton_gpu.linear(xb, pw, b, act, post=name)
        assert out.dtype == torch.bfloat16 and out.shape[-1] == (35 if name == "geglu" else 70)
        assert rel_err(out, triton_gpu.linear(xb.float(), pw, b, act, post=name)) < 1e-2, name
        assert rel_err(out, post.apply(ops.run_on("eager", "linear", xb.float(), pw, b, act), name)) < 1e-2, name


def test_geglu_refuses_odd_widths_like_post_check(triton_interpret):
    """An odd N cannot be split in halves: the same ValueError as ``post.check`` from the public op and from the
    kernel's launcher itself; the GELUs take any width."""
    from lowbit.kernels import triton_gpu

    x, pw, b, act = _case("W8A8-static", n=47)
    with pytest.raises(ValueError) as want:
        post.check("geglu", 47)
    for fmt_act in (act, None):
        with pytest.raises(ValueError, match="47 features is odd") as got:
            triton_gpu.linear(x, pw, b, fmt_act, post="geglu")
        assert str(got.value) == str(want.value)
        with registry.forced_backend("triton"), pytest.raises(ValueError, match="47 features is odd"):
            ops.linear(x, pw, b, fmt_act, post="geglu")
        out = triton_gpu.linear(x, pw, b, fmt_act, post="gelu")
        assert out.shape == (3, 15, 47)
        assert rel_err(out, post.apply(ops.run_on("eager", "linear", x, pw, b, fmt_act), "gelu")) < 1e-5
    with pytest.raises(ValueError, match="unknown activation epilogue 'relu'"):
        triton_gpu.linear(x, pw, b, act, post="relu")
