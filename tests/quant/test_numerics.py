"""NaN/Inf never slips through (issue 15, item 4): statistics, step sizes and outputs are checked by one guard
(``quant.transaction.check_finite`` / ``check_tensor``) before a model or a table is returned, the input model
is left as it was, and the call recorder never turns a finite value into an infinity."""
import copy

import pytest
import torch

from lowbit.quant import (CallRecorder, FinetuneConfig, QuantConfig, auto_schedule, calibrate_activations,
                          collect_stats, finetune, merge_, quant_layers, quantize)
from lowbit.quant.calib import Call, _store_tensor
from lowbit.quant.errors import LowBitError, NumericalError
from lowbit.quant.transaction import check_finite

from txn_util import assert_same_deep, deep_state, micro_calls, micro_unet


@pytest.fixture(scope="module")
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    unet = micro_unet()
    calls = micro_calls(unet)
    q = quantize(unet, QuantConfig.preset("W4A8", time_bins=2), calls, a_bits_candidates=(4, 8))
    yield unet, calls, q
    torch.set_num_threads(threads)


def _nan_call(calls):
    c = calls[0]
    x = torch.full_like(c.args[0], float("nan"))
    return Call((x,) + tuple(c.args[1:]), dict(c.kwargs), c.t, c.step)


def test_collect_stats_on_a_nan_call_raises_and_leaves_models(env):
    unet, calls, q = env
    before, fp_before = deep_state(q), deep_state(unet)
    with pytest.raises(NumericalError, match="NaN/Inf"):
        collect_stats(unet, q, calls[:1] + [_nan_call(calls)])
    assert_same_deep(deep_state(q), before)
    assert_same_deep(deep_state(unet), fp_before)


def test_collect_stats_names_a_quantized_model_that_gives_nan(env):
    unet, calls, q0 = env
    q = copy.deepcopy(q0)
    name, layer = quant_layers(q)[-1]
    with torch.no_grad():
        layer.bias[0] = float("nan")  # a broken quantized model, e.g. from a bad edit
    before = deep_state(q)
    with pytest.raises(NumericalError, match="quantized model's output"):
        collect_stats(unet, q, calls)
    with pytest.raises(NumericalError, match="quantized model's output"):
        auto_schedule(unet, q, calls, torch.linspace(0.999, 0.01, 1000))
    assert_same_deep(deep_state(q), before)


def test_weight_only_quantization_of_a_nan_weight_raises(env):
    unet, calls, _ = env
    bad = copy.deepcopy(unet)
    with torch.no_grad():
        bad.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    before = deep_state(bad)
    for preset in ("W4A16", "W8A8"):
        with pytest.raises(NumericalError, match="NaN/Inf in a float weight"):
            quantize(bad, QuantConfig.preset(preset), calls)
    assert_same_deep(deep_state(bad), before)


def test_activation_scales_that_are_not_finite_raise(env, monkeypatch):
    """The guard at the end of calibrate_activations catches a NaN/Inf step size, whatever produced it."""
    import lowbit.quant.layers as L

    unet, calls, q0 = env
    q = copy.deepcopy(q0)
    before = deep_state(q)
    orig = L.act_scale_search
    seen = [0]

    def broken(sample, lo, hi, bits, method="lp"):
        seen[0] += 1
        return (float("inf"), 0.0) if seen[0] == 7 else orig(sample, lo, hi, bits, method)

    monkeypatch.setattr(L, "act_scale_search", broken)
    with pytest.raises(NumericalError, match=r"act\.scale_"):
        calibrate_activations(q, calls)
    assert_same_deep(deep_state(q), before)


@pytest.mark.parametrize("what", ["w_scale", "zero_step", "table_nan", "bias_inf", "ptqd"])
def test_check_finite_names_the_bad_tensor(env, what):
    unet, calls, q0 = env
    q = copy.deepcopy(q0)
    check_finite(q, "test")  # a sound model passes
    name, layer = [(n, l) for n, l in quant_layers(q) if l.act is not None][2]
    with torch.no_grad():
        if what == "w_scale":
            layer.w_scale[1] = float("nan")
        elif what == "zero_step":
            layer.act.table(layer.a_bits)[0][0] = 0.0
        elif what == "table_nan":
            layer.act.table(layer.a_bits)[1][-1] = float("nan")
        elif what == "bias_inf":
            layer.bias[0] = float("inf")
    if what == "ptqd":
        from lowbit.quant import attach_stats

        stats = collect_stats(unet, q, calls)
        stats.var[0] = float("nan")
        attach_stats(q, stats)
        with pytest.raises(NumericalError, match="PTQD table 'var'"):
            check_finite(q, "test")
        return
    with pytest.raises(NumericalError, match=name.replace(".", r"\.")) as ei:
        check_finite(q, "test")
    assert isinstance(ei.value, LowBitError) and "\n" not in str(ei.value)


def test_merge_refuses_nan_adapters_and_leaves_model(env):
    from lowbit.quant import efficientdm as E

    unet, calls, q = env
    s = finetune(q, unet, calls, FinetuneConfig(steps=2, rank=2, batch_size=2, time_bins=2, seed=0))
    _, layer = E.lora_layers(s)[1]
    with torch.no_grad():
        layer.modifier.lora_B[0, 0] = float("nan")
    before = deep_state(s)
    with pytest.raises(NumericalError, match="lora_B"):
        merge_(s)
    assert_same_deep(deep_state(s), before)


def test_recorder_never_turns_finite_values_into_infinities():
    unet = micro_unet()
    x = torch.randn(1, 1, 8, 8)
    big = x.clone()
    big[0, 0, 0, 0] = 7e4  # finite, beyond fp16's 65504
    with CallRecorder(unet) as rec, torch.no_grad():
        unet(x, torch.tensor([10]), class_labels=torch.tensor([1]))
        unet(big, torch.tensor([10]), class_labels=torch.tensor([1]))
    normal, kept = rec.calls[0].args[0], rec.calls[1].args[0]
    assert normal.dtype == torch.float16  # the compact store where fp16 holds the values
    assert kept.dtype == torch.float32 and torch.isfinite(kept).all() and torch.equal(kept, big)


def test_store_keeps_range_and_refuses_non_finite():
    v = torch.tensor([1.0, -1e5, 3.0])
    assert torch.equal(_store_tensor(v, torch.float16), v)
    assert _store_tensor(torch.tensor([1.0, 2.0]), torch.float16).dtype == torch.float16
    assert _store_tensor(torch.tensor([1e39], dtype=torch.float64), torch.float32).dtype == torch.float64
    with pytest.raises(NumericalError, match="NaN/Inf in the input of block"):
        _store_tensor(torch.tensor([1.0, float("-inf")]), torch.float16, "the input of block 'x'", "fix it")


def test_nan_during_calibration_names_the_first_layer_it_reaches():
    """An activation overflowing between two layers at one timestep: the error names the first quantized layer whose
    input is not finite (it said only 'NaN/Inf in an activation during calibration (timestep 0.95)')."""
    from lowbit.quant import CallRecorder

    class Overflow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x, timestep):
            h = self.a(x) * torch.where(timestep > 800, 1e30, 1.0).view(-1, 1)
            return self.c(self.b(h * h))  # inf at t = 900 only

    m = Overflow().eval().requires_grad_(False)
    with CallRecorder(m, store_dtype=None) as rec, torch.no_grad():
        for t in (500.0, 900.0):
            m(torch.randn(2, 8), torch.full((2,), t))
    with pytest.raises(NumericalError, match=r"NaN/Inf in the input of layer 'b' .* during calibration \(timestep 900"):
        quantize(m, QuantConfig.preset("W8A8"), rec.calls)
