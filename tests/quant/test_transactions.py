"""Long calls are transactional (issue 15, item 2): cancelled at the first, a middle and the last progress step
(callback raising ``Interrupted``, ``KeyboardInterrupt`` or ``NumericalError``) or failing inside (a
``NumericalError`` raised by a quantized layer's forward half-way through), every verb leaves its input models
bit-identical -- parameters, buffers, flags, hooks, modifiers, observation reservoirs and the LowBit context --
and a retry on the same model equals a clean run on an untouched copy, bit for bit."""
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from lowbit.quant import (FinetuneConfig, QuantConfig, ReconConfig, auto_schedule, calibrate_activations,
                          collect_stats, finetune, merge_, quantize, reconstruct)
from lowbit.quant.errors import Interrupted, NumericalError
from lowbit.quant.layers import QuantLayer
from lowbit.quant.recon import reconstruct_activations

from txn_util import (assert_same_bits, assert_same_deep, deep_state, micro_calls, micro_unet, outputs,
                      tensor_bits)


@pytest.fixture(scope="module")
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared by many processes: one thread is ~30x faster here
    unet = micro_unet()
    calls = micro_calls(unet)
    q = quantize(unet, QuantConfig.preset("W4A8", time_bins=2), calls, a_bits_candidates=(4, 8))
    yield unet, calls, q
    torch.set_num_threads(threads)


def _acp():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()


RECON = ReconConfig(weight_iters=3, act_iters=2, batch_size=2)
ACT = ReconConfig(weight_iters=0, act_iters=3, batch_size=2)
FT = FinetuneConfig(steps=4, rank=2, batch_size=2, time_bins=2, seed=0)


def _verbs():
    """name -> fn(fp, q, calls, progress) returning something to compare between a retry and a clean run."""
    return {
        "calibrate_activations": lambda fp, q, calls, p: calibrate_activations(q, calls, progress=p),
        "reconstruct": lambda fp, q, calls, p: reconstruct(fp, q, calls, RECON, progress=p),
        "reconstruct_activations": lambda fp, q, calls, p: reconstruct_activations(fp, q, calls, ACT, progress=p),
        "collect_stats": lambda fp, q, calls, p: collect_stats(fp, q, calls, progress=p),
        "auto_schedule": lambda fp, q, calls, p: auto_schedule(fp, q, calls, _acp(), progress=p),
        "finetune": lambda fp, q, calls, p: finetune(q, fp, calls, FT, progress=p),
    }


def _result_picture(name, res, q, calls):
    """What a run produced, as tensors/values to compare bit for bit."""
    if name == "collect_stats":
        return [res.t, res.k, res.m, res.bias, res.var]
    if name == "auto_schedule":
        sched, info = res
        return [repr(sched), repr(info["picks"]), repr(sorted((t, sorted(d.items())) for t, d in info["snr"].items()))]
    model = res if name == "finetune" else q
    return outputs(model, calls) + [tensor_bits(model)]


def _same_picture(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        elif isinstance(x, dict):
            assert_same_bits(x, y)
        else:
            assert x == y


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, done, total, info):
        self.n += 1


def _cancel_at(k, exc):
    seen = [0]

    def progress(done, total, info):
        seen[0] += 1
        if seen[0] == k:
            raise exc("cancelled by the test")

    return progress


@pytest.mark.parametrize("name", list(_verbs()))
def test_cancel_or_failure_leaves_inputs_bit_identical_and_retry_equals_clean_run(env, name, monkeypatch):
    unet, calls, q0 = env
    verb = _verbs()[name]
    q = copy.deepcopy(q0)
    clean = copy.deepcopy(q0)

    # the clean run: how many progress steps and quantized-layer forwards it takes, and what it produces
    counter, forwards = _Counter(), [0]
    orig_forward = QuantLayer.forward

    def counting_forward(self, x):
        forwards[0] += 1
        return orig_forward(self, x)

    monkeypatch.setattr(QuantLayer, "forward", counting_forward)
    expected = _result_picture(name, verb(unet, clean, calls, counter), clean, calls)
    monkeypatch.setattr(QuantLayer, "forward", orig_forward)
    assert counter.n >= 3 and forwards[0] >= 3

    fp_before, q_before = deep_state(unet), deep_state(q)
    cancels = [(1, Interrupted), (counter.n // 2, KeyboardInterrupt), (counter.n, NumericalError)]
    for k, exc in cancels:
        with pytest.raises(exc):
            verb(unet, q, calls, _cancel_at(k, exc))
        assert_same_deep(deep_state(q), q_before)
        assert_same_deep(deep_state(unet), fp_before)

    # a NumericalError from inside the model, half-way through the call
    seen = [0]

    def failing_forward(self, x):
        seen[0] += 1
        if seen[0] == forwards[0] // 2:
            raise NumericalError("injected by the test")
        return orig_forward(self, x)

    monkeypatch.setattr(QuantLayer, "forward", failing_forward)
    with pytest.raises(NumericalError, match="injected"):
        verb(unet, q, calls, None)
    monkeypatch.setattr(QuantLayer, "forward", orig_forward)
    assert_same_deep(deep_state(q), q_before)
    assert_same_deep(deep_state(unet), fp_before)

    # a retry on the restored model equals the clean run on an untouched copy, bit for bit
    got = _result_picture(name, verb(unet, q, calls, None), q, calls)
    _same_picture(got, expected)


def test_merge_failure_leaves_model_unchanged_and_retry_equals_clean(env, monkeypatch):
    from lowbit.quant import efficientdm as E

    unet, calls, q0 = env
    s = finetune(q0, unet, calls, FT)
    clean = copy.deepcopy(s)
    expected = outputs(merge_(clean), calls)
    before = deep_state(s)
    n, orig = [0], E.QALoRA.weight_int

    def failing(self, layer):
        n[0] += 1
        if n[0] == 3:  # two layers are merged already
            raise NumericalError("injected by the test")
        return orig(self, layer)

    monkeypatch.setattr(E.QALoRA, "weight_int", failing)
    with pytest.raises(NumericalError):
        merge_(s)
    monkeypatch.setattr(E.QALoRA, "weight_int", orig)
    assert_same_deep(deep_state(s), before)
    for a, b in zip(outputs(merge_(s), calls), expected):
        assert torch.equal(a, b)


def test_cancelled_reconstruct_leaves_no_soft_layer_and_retry_rounds_all(env):
    """The reported fault: a cancelled reconstruct kept AdaRound modifiers, and a retry skipped those layers."""
    from lowbit.quant import quant_layers
    from lowbit.quant.recon import FixedInt

    unet, calls, q0 = env
    q = copy.deepcopy(q0)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(unet, q, calls, RECON, progress=_cancel_at(5, KeyboardInterrupt))
    assert all(l.modifier is None for _, l in quant_layers(q))
    assert all(l.act is None or l.act._obs is None for _, l in quant_layers(q))
    reconstruct(unet, q, calls, RECON)
    assert all(isinstance(l.modifier, FixedInt) for _, l in quant_layers(q))


def test_snapshot_restores_replaced_and_inplace_state(env):
    """The transaction itself: attribute replacement, in-place writes through .data, container contents,
    generator states, requires_grad and hooks all come back; weights written in place are reported."""
    from lowbit.quant import quant_layers
    from lowbit.quant.context import get_context
    from lowbit.quant.transaction import transaction

    unet, calls, q0 = env
    q = copy.deepcopy(q0)
    before = deep_state(q)
    name, layer = [(n, l) for n, l in quant_layers(q) if l.act is not None and l.act.bits_set == (4, 8)][0]
    with pytest.raises(RuntimeError, match="boom"):
        with transaction(q):
            layer.act.table(8)[0].data[0] = 123.0
            layer.act.table(8)[1].data = torch.full_like(layer.act.table(8)[1], 7.0)
            layer.act.table(4)[0].requires_grad_(True)
            layer.act._obs = {0: [1.0, 2.0, torch.ones(3), 3]}
            layer.modifier = torch.nn.Identity()
            layer.w_scale = torch.nn.Parameter(torch.zeros(3))
            layer.bias.add_(1.0)
            ctx = get_context(q)
            ctx.observing, ctx.t = True, 12.0
            ctx.splits["x"] = (1, 2)
            q.register_forward_hook(lambda *a: None)
            q.train()
            raise RuntimeError("boom")
    assert_same_deep(deep_state(q), before)
    with pytest.raises(RuntimeError, match="written in place"):
        with transaction(q):
            with torch.no_grad():
                layer.weight.mul_(2.0)  # a weight (kept by reference, not copied): detected, not silently kept
            raise KeyboardInterrupt


def test_deployed_model_cancel_leaves_packed_state(env):
    """A deployed (packed, possibly backend-prepacked) model: cancelled statistics and fine-tune leave it as it was."""
    from lowbit.quant import deploy_

    unet, calls, q0 = env
    q = deploy_(copy.deepcopy(q0))
    outputs(q, calls)  # builds the kernels' caches
    before = deep_state(q)
    with pytest.raises(Interrupted):
        collect_stats(unet, q, calls, progress=_cancel_at(2, Interrupted))
    assert_same_deep(deep_state(q), before)
    with pytest.raises(KeyboardInterrupt):
        finetune(q, unet, calls, FT, progress=_cancel_at(2, KeyboardInterrupt))
    assert_same_deep(deep_state(q), before)
