"""The model zoo (lowbit.models.zoo): every model loads from its shipped files, samples deterministically, gives
the same noise and labels to any denoiser, calls the denoiser the ordinary diffusers way, and its metric tells
real held-out data from noise. Sampling here uses few steps to stay fast; the quality thresholds of the full
runs are in models/zoo/README.md."""
import copy

import pytest
import torch

from lowbit.models import zoo
from lowbit.quant.errors import LowBitError

N = 8
STEPS = 4


@pytest.fixture(scope="module", params=zoo.ZOO_NAMES)
def model(request):
    return zoo.load(request.param)


def _first_call_recorder(module):
    calls = []

    def hook(mod, args, kwargs):
        calls.append((args, kwargs))

    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_unknown_name_is_a_lowbit_error():
    with pytest.raises(LowBitError, match="unknown zoo model 'nope'; choose one of digits"):
        zoo.load("nope")


def test_loads_as_documented(model):
    assert model.name in zoo.ZOO_NAMES
    d = model.denoiser
    assert isinstance(d, torch.nn.Module) and not d.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in d.parameters())
    assert model.prediction in ("epsilon", "v_prediction", "flow")
    n_params = sum(p.numel() for p in d.parameters())
    assert 200_000 <= n_params <= 2_000_000, n_params
    if model.name == "dit_flow":
        assert type(d).__name__ == "FluxTransformer2DModel" and model.prediction == "flow"
        assert not any(isinstance(m, torch.nn.Conv2d) for m in d.modules())
    if model.name == "latent_text":
        assert type(d).__name__ == "UNet2DConditionModel" and d.config.in_channels == 4


def test_sampling_is_deterministic_and_shared_across_denoisers(model):
    a, la = model.sample(model.denoiser, N, seed=3, steps=STEPS)
    b, lb = model.sample(model.denoiser, N, seed=3, steps=STEPS)
    assert a.ndim == 4 and a.shape[0] == N and a.shape[1] in (1, 3)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and torch.equal(la, lb) and la.shape == (N,)
    c, _ = model.sample(model.denoiser, N, seed=4, steps=STEPS)
    assert not torch.equal(a, c)

    # a second denoiser (weights perturbed): same first input and labels, a different result
    other = copy.deepcopy(model.denoiser)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    calls_fp, h1 = _first_call_recorder(model.denoiser)
    calls_q, h2 = _first_call_recorder(other)
    try:
        x_fp, l_fp = model.sample(model.denoiser, N, seed=3, steps=STEPS)
        x_q, l_q = model.sample(other, N, seed=3, steps=STEPS)
    finally:
        h1.remove()
        h2.remove()
    assert len(calls_fp) == STEPS == len(calls_q)  # one batched call per step (CFG halves together)
    (args_fp, kw_fp), (args_q, _) = calls_fp[0], calls_q[0]
    assert torch.is_tensor(args_fp[0]) and torch.equal(args_fp[0], args_q[0])
    assert torch.equal(l_fp, l_q)
    guided = (model.default_guidance or 1.0) != 1.0
    assert args_fp[0].shape[0] == (2 * N if guided else N)
    t = kw_fp.get("timestep", args_fp[1] if len(args_fp) > 1 else None)
    assert torch.is_tensor(t) and t.shape == (args_fp[0].shape[0],)
    assert not torch.equal(x_fp, x_q)


def test_metric_separates_real_from_noise(model):
    x, y = model.heldout()
    half = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: x.shape[0] // 2]
    x, y = x[half], y[half]  # a random half of the reference set
    real = model.metrics(x, y)
    g = torch.Generator().manual_seed(0)
    noise = model.metrics(torch.rand(x.shape, generator=g) * 2 - 1, y)
    assert set(real) >= {"fid", "acc"}
    assert real["fid"] < 0.1 * noise["fid"], (real, noise)
    if model.num_classes is not None:
        assert real["acc"] > 0.8 and noise["acc"] < 0.5, (real, noise)
