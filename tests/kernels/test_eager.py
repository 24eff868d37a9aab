import pytest
import torch
import torch.nn.functional as F

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops


def test_static_fake_quant_formula_and_half_to_even():
    act = ActQuant(8, 0.5, 10)
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0])  # x/scale = 0.5, 1.5, -0.5, 2.5: ties
    q = torch.clamp(torch.round(x / 0.5) + 10, 0, 255)
    assert q.tolist() == [10, 12, 10, 12, 210, 0]
    torch.testing.assert_close(ops.run_on("eager", "fake_quant_act", x, act), (q - 10) * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_dynamic_per_token(bits):
    x = torch.randn(5, 7, 33) * torch.rand(5, 7, 1) * 4
    x[0, 0] = 0.0  # an all-zero token must not divide by zero
    x[0, 1] = x[0, 1].abs()  # all-positive token: range still includes 0
    fq = ops.run_on("eager", "fake_quant_act", x, ActQuant(bits, dynamic=True))
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / ((1 << bits) - 1)
    assert torch.all((fq - x).abs() <= step * 0.5 + step * 1e-3 + 1e-12)
    assert torch.equal(fq[0, 0], torch.zeros(33))
    # each token's rows are independent: scaling one token does not change another
    x2 = x.clone()
    x2[1] *= 100
    fq2 = ops.run_on("eager", "fake_quant_act", x2, ActQuant(bits, dynamic=True))
    assert torch.equal(fq2[0], fq[0])


def test_dynamic_per_sample_for_conv():
    x = torch.randn(3, 4, 5, 5)
    x[1] *= 50
    fq = ops.run_on("eager", "fake_quant_act", x, ActQuant(8, dynamic=True), "sample")
    alone = ops.run_on("eager", "fake_quant_act", x[0:1], ActQuant(8, dynamic=True), "sample")
    assert torch.equal(fq[0:1], alone)
    assert rel_err(fq, x) < 1e-2


@pytest.mark.parametrize("act", [None, ActQuant(8, 0.05, 128), ActQuant(8, dynamic=True), ActQuant(4, 0.5, 7)])
@pytest.mark.parametrize("bits,gs", [(8, None), (4, None), (4, 16)])
def test_linear_and_conv_semantics(act, bits, gs):
    x = torch.randn(2, 9, 48)
    w = torch.randn(20, 48) * 0.1
    b = torch.randn(20)
    pw = ops.quantize_weight(w, bits, gs)
    out = ops.run_on("eager", "linear", x, pw, b, act)
    ref = F.linear(ops.fake_quant_act(x, act), ops.dequantize_weight(pw), b)
    assert rel_err(out, ref) < 1e-6
    xc = torch.randn(2, 6, 7, 7)
    pwc = ops.quantize_weight(torch.randn(12, 6, 3, 3), bits, gs)
    out = ops.run_on("eager", "conv2d", xc, pwc, b[:12], 2, 1, 1, 1, act)
    ref = F.conv2d(ops.run_on("eager", "fake_quant_act", xc, act, "sample"), ops.dequantize_weight(pwc), b[:12], 2, 1)
    assert out.shape == (2, 12, 4, 4) and rel_err(out, ref) < 1e-6


def test_quantization_error_is_plausible():
    # 8-bit W and A on Gaussian data: a few 1e-3 relative error, 4-bit ~1e-1; catches a scale off by a factor
    x = torch.randn(64, 256)
    w = torch.randn(128, 256)
    ref = F.linear(x, w)
    e8 = rel_err(ops.linear(x, ops.quantize_weight(w, 8), None, ActQuant(8, dynamic=True)), ref)
    e4 = rel_err(ops.linear(x, ops.quantize_weight(w, 4), None, None), ref)
    assert 1e-3 < e8 < 2e-2 and 5e-2 < e4 < 0.25


@pytest.mark.parametrize("act", [ActQuant(8, 0.05, 120), ActQuant(8, dynamic=True), None])
def test_empty_batch_gives_an_empty_output(act):
    """A batch of 0 (e.g. an empty conditioning half) runs: every backend refuses empty input, the reference takes
    it; per-sample dynamic ranges of no samples used to fail on ``reshape(0, -1)``."""
    pw = ops.quantize_weight(torch.randn(16, 8, 3, 3), 8)
    assert ops.conv2d(torch.randn(0, 8, 5, 5), pw, None, 1, 1, 1, 1, act).shape == (0, 16, 5, 5)
    pwl = ops.quantize_weight(torch.randn(16, 72), 8)
    assert ops.linear(torch.randn(0, 72), pwl, None, act).shape == (0, 16)
    assert ops.linear(torch.randn(2, 0, 72), pwl, None, act).shape == (2, 0, 16)
