import math

import pytest
import torch

from lowbit.quant import (CallRecorder, PTQDConfig, QuantConfig, QuantContext, attach_stats, collect_stats, deploy_,
                          get_stats, guided_eps_fn, load, quantize, sample, save)
from lowbit.quant.context import attach_context, get_context
from lowbit.quant.ptqd import ancestral_vsc_sigma_up, ddim_vsc_sigma, ddpm_vsc_sigma
from lowbit.quant.sampling import timesteps_for


class Eps(torch.nn.Module):
    def forward(self, x, t):
        t = t.float().view(-1, 1, 1, 1) if torch.is_tensor(t) else t
        return torch.sin(3 * x) + 0.001 * t


class Noisy(torch.nn.Module):
    """eps_q = (1 + k) eps + b_c + r with known k, per-channel b, residual std 0.05."""

    def __init__(self, k=0.1):
        super().__init__()
        self.fp, self.k = Eps(), k
        self.b = torch.tensor([0.2, -0.1, 0.05])
        attach_context(self, QuantContext())

    def forward(self, x, t):
        g = torch.Generator().manual_seed(int(x.abs().sum() * 1000) % 10000)
        return (1 + self.k) * self.fp(x, t) + self.b.view(1, 3, 1, 1) + 0.05 * torch.randn(x.shape, generator=g)


def _calls(model, ts=(900, 500, 100)):
    with CallRecorder(model) as rec:
        for t in ts:
            for s in range(3):
                model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s + t)), torch.tensor([t, t]))
    return rec.calls


def test_stats_recover_the_noise_model_and_correct():
    q = Noisy(k=0.1)
    stats = collect_stats(q.fp, q, _calls(q.fp))
    assert torch.allclose(stats.k, torch.full((3,), 0.1), atol=0.01)
    assert torch.allclose(stats.bias, q.b.expand(3, 3), atol=0.01)
    assert torch.allclose(stats.var, torch.full((3,), 0.0025), rtol=0.1)
    # interpolation between the collected timesteps
    assert abs(stats.k_at(300) - 0.1) < 0.01
    x = torch.randn(2, 3, 8, 8)
    eps_q = q(x, torch.tensor([300, 300]))
    fp = q.fp(x, torch.tensor([300, 300]))
    assert stats.m.abs().max() < 0.01  # no input term in this noise model
    assert (stats.correct(eps_q, 300, x) - fp).pow(2).mean() < 0.5 * (eps_q - fp).pow(2).mean()
    assert abs(stats.residual_var_at(300) - 0.0025 / 1.1 ** 2) < 3e-4


class ContentNoisy(Noisy):
    """eps_q = (1 + k) eps + m x + b_c + r: the error follows the input (content), as low-bit UNets do."""

    def __init__(self, k=0.05, m=0.2):
        super().__init__(k)
        self.m = m

    def forward(self, x, t):
        return super().forward(x, t) + self.m * x


def test_input_correlation_is_recovered_and_removed():
    q = ContentNoisy(k=0.05, m=0.2)
    calls = _calls(q.fp)
    stats = collect_stats(q.fp, q, calls)
    assert torch.allclose(stats.k, torch.full((3,), 0.05), atol=0.01)
    assert torch.allclose(stats.m, torch.full((3,), 0.2), atol=0.01)
    assert torch.allclose(stats.var, torch.full((3,), 0.0025), rtol=0.1)
    paper = collect_stats(q.fp, q, calls, PTQDConfig(input_correlation=False))
    assert paper.m.abs().max() == 0 and paper.var.min() > 10 * stats.var.max()  # the x term left in the residual
    x = torch.randn(4, 3, 8, 8)
    tt = torch.tensor([300] * 4)
    eps_q, fp = q(x, tt), q.fp(x, tt)
    err_ours = (stats.correct(eps_q, 300, x) - fp).pow(2).mean()
    err_paper = (paper.correct(eps_q, 300, x) - fp).pow(2).mean()
    assert err_ours < 0.2 * err_paper
    # through the output hook: the UNet input is read from the call
    attach_stats(q, stats)
    get_context(q).t = 300.0
    with torch.no_grad():
        hooked = q(x, tt)
    assert torch.allclose(hooked, stats.correct(eps_q, 300, x), atol=1e-5)


def test_vsc_formulas():
    a_t, a_prev, v = 0.5, 0.6, 0.01
    assert ddim_vsc_sigma(a_t, a_prev, 0.0, v) == 0.0  # deterministic DDIM: no-op
    sigma = 0.3 * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    s2 = ddim_vsc_sigma(a_t, a_prev, sigma, v)
    c = math.sqrt(1 - a_prev - s2 ** 2) - math.sqrt(a_prev * (1 - a_t) / a_t)
    assert s2 < sigma and abs(s2 ** 2 + c ** 2 * v - sigma ** 2) < 1e-9  # total variance preserved
    s3 = ddpm_vsc_sigma(a_t, a_prev, sigma, v)
    coef = (1 - a_t / a_prev) / (math.sqrt(a_t / a_prev) * math.sqrt(1 - a_t))
    assert abs(s3 ** 2 - (sigma ** 2 - coef ** 2 * v)) < 1e-12
    assert ancestral_vsc_sigma_up(2.0, 1.0, 0.0, v) == 0.0  # non-ancestral Euler: no-op
    assert abs(ancestral_vsc_sigma_up(2.0, 1.0, 0.8, v) ** 2 - (0.64 - 1.0 * v)) < 1e-12
    assert ddim_vsc_sigma(a_t, a_prev, sigma, 1e6) == 0.0


def test_samplers_run_and_vsc_changes_only_stochastic_samplers(unet):
    ac = torch.linspace(0.9999, 0.005, 1000).cumprod(0).clamp_min(1e-5)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    eps_fn = guided_eps_fn(unet, torch.tensor([1, 2]), 2.0, 10)
    for name, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0), ("euler_a", 1.0)):
        a = sample(eps_fn, (2, 1, 16, 16), ac, steps=4, sampler=name, eta=eta, seed=3)
        b = sample(eps_fn, (2, 1, 16, 16), ac, steps=4, sampler=name, eta=eta, seed=3, var_fn=lambda t: 0.05)
        assert torch.isfinite(a).all()
        assert torch.equal(a, b) == (name == "ddim" and eta == 0.0), name


def test_stats_travel_in_the_saved_file(unet, calls, tmp_path):
    q = deploy_(quantize(unet, QuantConfig.preset("W4A4"), calls))
    attach_stats(q, collect_stats(unet, q, calls, PTQDConfig(variance_calibration=False)))
    p = save(q, str(tmp_path / "q.safetensors"))
    q2 = load(unet, p)
    s1, s2 = get_stats(q), get_stats(q2)
    assert torch.equal(s1.k, s2.k) and torch.equal(s1.bias, s2.bias) and s2.config == s1.config
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y1 = q(x, torch.tensor([500, 500]), class_labels=torch.tensor([1, 10])).sample
        y2 = q2(x, torch.tensor([500, 500]), class_labels=torch.tensor([1, 10])).sample
    assert torch.equal(y1, y2)


def test_stats_from_50_steps_help_at_20_steps():
    """Statistics collected along 50-step trajectories correct a 20-step run at least as well as no correction."""
    from lowbit.recipes import default_setup, generate

    setup = default_setup()
    def rec(steps, seed):
        with CallRecorder(setup.unet) as r:
            generate(setup, setup.unet, 10, steps=steps, seed=seed, batch=10)
        return r.calls

    calib = rec(50, 1)[::3]
    q = deploy_(quantize(setup.unet, QuantConfig.preset("W4A4"), calib[::4]))
    stats = collect_stats(setup.unet, q, calib)
    test_calls = rec(20, 2)
    err_raw = err_cor = 0.0
    with torch.no_grad():
        for c in test_calls:
            a, kw = c.to("cpu", torch.float32)
            fp = setup.unet(*a, **kw).sample
            eq = q(*a, **kw).sample
            err_raw += float((eq - fp).pow(2).sum())
            err_cor += float((stats.correct(eq, c.t, a[0]) - fp).pow(2).sum())
    assert timesteps_for(20, 1000)[1] not in {c.t for c in calib}  # really other timesteps
    assert err_cor <= err_raw, (err_cor, err_raw)


@pytest.mark.parametrize("wrap", ["tuple_of_list", "tuple_of_tuple", "list", "plain_list_of_list"])
def test_ptqd_corrects_predictions_in_any_container_the_statistics_were_read_from(wrap):
    """The statistics are collected through calib.unet_output, which reads a tuple's or a list's first element and
    stacks per-sample predictions of one shape: the correction hook handles the same containers and hands back the
    container it got (a tuple of per-sample tensors was read, then silently left uncorrected; found by audit)."""
    import torch.nn as nn

    from lowbit.quant import PipelineConfig, pipeline

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, sample, timestep):
            y = self.b(torch.relu(self.a(sample))) * (timestep.view(-1, 1, 1, 1) / 1000)
            per = list(y.unbind(0))
            return {"tuple_of_list": (per,), "tuple_of_tuple": (tuple(per),), "list": [y],
                    "plain_list_of_list": [per]}[wrap]

    torch.manual_seed(0)
    m = Toy().eval()
    g = torch.Generator().manual_seed(1)
    with CallRecorder(m) as rec, torch.no_grad():
        for _ in range(3):
            rec.new_trajectory()
            for t in (900.0, 500.0, 100.0):
                m(torch.randn(2, 4, 6, 6, generator=g), torch.full((2,), t))
    q = pipeline.run(m, rec.calls, PipelineConfig.for_method("naive+ptqd", "W8A8")).model
    x, t = torch.randn(2, 4, 6, 6, generator=g), torch.full((2,), 500.0)
    with torch.no_grad():
        on = q(x, t)
        attach_stats(q, get_stats(q), active=False)
        off = q(x, t)
    assert type(on) is type(off) and type(on[0]) is type(off[0])
    from lowbit.quant.calib import unet_output

    assert not torch.equal(unet_output(on), unet_output(off))


class _DictNet(torch.nn.Module):
    """A researcher's denoiser returning a plain dict: ``{"x": prediction}`` (``extra``: another tensor beside it)."""

    def __init__(self, extra=None):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3, padding=1)
        self.temb, self.extra = torch.nn.Linear(1, 16), extra
        self.eval().requires_grad_(False)

    def forward(self, x, *, t):
        h = torch.nn.functional.silu(self.inp(x) + self.temb(t.float().view(-1, 1) / 1000)[:, :, None, None])
        y = self.out(h)
        return {"x": y} if self.extra is None else {self.extra: y, "features": h}


def _dict_calls(m):
    g = torch.Generator().manual_seed(1)
    with CallRecorder(m) as rec, torch.no_grad():
        for t in (900.0, 500.0, 100.0):
            m(torch.randn(2, 4, 6, 6, generator=g), t=torch.full((2,), t))
    return rec.calls


@pytest.mark.parametrize("extra", [None, "sample"])
def test_a_dict_output_is_read_corrected_and_deployed(extra):
    """A plain dict output is read at its only tensor or at "sample" (the default method refused it: 'cannot read
    the prediction from a UNet output of type dict'): quantized with the measured plan and PTQD, the correction
    changes the dict's prediction in place of the dict, and the deployed model stays close to the float one."""
    from lowbit.quant import PipelineConfig, pipeline

    key = extra or "x"
    m = _DictNet(extra)
    q = pipeline.run(m, _dict_calls(m), PipelineConfig.for_method("lp+ptqd", "W8A8")).model
    assert get_stats(q) is not None
    x, t = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5)), torch.full((2,), 450.0)
    with torch.no_grad():
        ref, on = m(x, t=t)[key], q(x, t=t)
        attach_stats(q, get_stats(q), active=False)
        off = q(x, t=t)
        attach_stats(q, get_stats(q), active=True)
        dep = deploy_(q)(x, t=t)
    assert type(on) is dict and set(on) == set(m(x, t=t)) and not torch.equal(on[key], off[key])
    assert float((dep[key] - ref).norm() / ref.norm()) < 0.1
