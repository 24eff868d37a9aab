"""PTQD on rectified flow (docs/FLOW_MATCHING.md): the correction of the velocity, the Euler and Euler-ancestral
steps, and the flow form of variance-schedule calibration, checked by Monte Carlo on a flow whose exact velocity
is known (Gaussian data x0 ~ N(0, c²): x_s = (1 - s) x0 + s·noise is N(0, V_s), V_s = (1 - s)² c² + s², and
v(x, s) = E[noise - x0 | x_s] = (s - (1 - s) c²) / V_s · x)."""
import math

import pytest
import torch

from lowbit.quant import CallRecorder, QuantContext, collect_stats
from lowbit.quant.context import attach_context
from lowbit.quant.errors import ConfigError
from lowbit.quant.ptqd import (flow_ancestral_residual_coef, flow_ancestral_vsc_renoise, flow_euler_residual_var)
from lowbit.quant.sampling import flow_ancestral_step, sample_flow, sample_sigmas_ptqd

C2 = 0.5  # data variance c²
KEY = 1000.0  # the model is called with t = 1000·s, as the Flux profile keys its tables


def marginal_var(s):
    return (1 - s) ** 2 * C2 + s * s


def v_exact(x, s):
    return (s - (1 - s) * C2) / marginal_var(s) * x


def x_at(s, n, seed):
    return math.sqrt(marginal_var(s)) * torch.randn(n, generator=torch.Generator().manual_seed(seed))


class FlowV(torch.nn.Module):
    """A velocity model called with t = 1000·s: the exact Gaussian-data velocity plus a nonlinear term (a
    velocity exactly proportional to x_s would make the noise model's k (on v) and m (on x_s) one parameter)."""

    def forward(self, x, t):
        s = float(t.flatten()[0]) / KEY
        return v_exact(x, s) + 0.3 * torch.sin(3 * x)


class QuantFlowV(torch.nn.Module):
    """v_q = (1 + k) v + b_c + r: correlated error, per-channel bias, residual of std ``r``."""

    def __init__(self, k=0.15, r=0.1):
        super().__init__()
        self.fp, self.k, self.r = FlowV(), k, r
        self.b = torch.tensor([0.08, -0.05, 0.02])
        attach_context(self, QuantContext())

    def forward(self, x, t):
        g = torch.Generator().manual_seed(int(x.abs().sum() * 1000) % 100000)
        return (1 + self.k) * self.fp(x, t) + self.b.view(1, 3, 1, 1) + self.r * torch.randn(x.shape, generator=g)


def test_flow_ancestral_step_keeps_the_marginal_and_matches_the_k_diffusion_form():
    # the step itself (ComfyUI's sample_euler_ancestral_RF): from the exact marginal at s, exact velocity, small
    # steps reach the marginal variance at s' (first order: one step of 0.15 is 15 % low, 100 steps 0.2 %); a
    # wrong re-noising coefficient would miss it at any step size
    s, s_next = 0.6, 0.45
    x = x_at(s, 400_000, 0)
    out = sample_flow(lambda x, s: v_exact(x, s), x, torch.linspace(s, s_next, 101).tolist(),
                      method="euler_ancestral", gen=torch.Generator().manual_seed(1))
    assert abs(out.var().item() / marginal_var(s_next) - 1) < 0.01
    sd, scale, renoise = flow_ancestral_step(s, s_next, 1.0)
    assert sd == pytest.approx(s_next ** 2 / s) and scale == pytest.approx((1 - s_next) / (1 - sd))
    # eta = 0 and the last step are plain Euler steps
    assert flow_ancestral_step(s, s_next, 0.0) == (s_next, 1.0, 0.0)
    assert flow_ancestral_step(s, 0.0, 1.0) == (0.0, 1.0, 0.0)
    # the k-diffusion (denoised) form used by host sampler nodes is the same step with the same noise stream
    xb = x_at(1.0, 4 * 3 * 4 * 4, 2).view(4, 3, 4, 4)
    sig = [1.0, 0.8, 0.55, 0.3, 0.1, 0.0]

    def denoiser(x, sigma, **kw):
        s = float(sigma.flatten()[0])
        return x - s * v_exact(x, s)

    a = sample_sigmas_ptqd(denoiser, xb, torch.tensor(sig), extra_args={"seed": 5}, method="euler_ancestral",
                           flow=True)
    b = sample_flow(lambda x, s: v_exact(x, s), xb, sig, method="euler_ancestral",
                    gen=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-5)
    # ... and so is its VSC (the host node's path)
    a = sample_sigmas_ptqd(denoiser, xb, torch.tensor(sig), extra_args={"seed": 5}, method="euler_ancestral",
                           flow=True, residual_var=lambda sigma: 0.3)
    b = sample_flow(lambda x, s: v_exact(x, s), xb, sig, method="euler_ancestral", var_fn=lambda s: 0.3,
                    gen=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError):
        sample_sigmas_ptqd(denoiser, xb, torch.tensor(sig), method="ddim", flow=True)


def _calls(model, sigmas=(0.9, 0.6, 0.3, 0.1)):
    with CallRecorder(model) as rec:
        for i, s in enumerate(sigmas):
            for j in range(4):
                x = x_at(s, 2 * 3 * 8 * 8, 100 * i + j).view(2, 3, 8, 8)
                model(x, torch.full((2,), s * KEY))
    return rec.calls


def test_corrected_euler_step_recovers_the_full_precision_step_in_expectation():
    q = QuantFlowV(k=0.15, r=0.1)
    stats = collect_stats(q.fp, q, _calls(q.fp))
    assert stats.k_at(450.0) == pytest.approx(0.15, abs=0.01)
    s, s_next = 0.45, 0.35  # between the collected keys: the tables are interpolated
    tt = torch.full((64,), s * KEY)
    x = x_at(s, 64 * 3 * 16 * 16, 7).view(64, 3, 16, 16)
    v_fp, v_q = q.fp(x, tt), q(x, tt)
    step_fp = x + (s_next - s) * v_fp
    err_c = x + (s_next - s) * stats.correct(v_q, s * KEY, x) - step_fp
    err_q = x + (s_next - s) * v_q - step_fp

    def bias_and_slope(err):  # per-channel mean and the part along v: what the correction must remove
        per_channel = err.mean(dim=(0, 2, 3)).abs().max().item()
        slope = ((err * v_fp).sum() / (v_fp * v_fp).sum()).item() / (s_next - s)
        return per_channel, slope

    bq, kq = bias_and_slope(err_q)
    bc, kc = bias_and_slope(err_c)
    assert bq > 0.007 and abs(kq) > 0.1  # uncorrected: the step carries (s' - s)(k v + b)
    assert bc < 0.001 and abs(kc) < 0.01  # corrected: unbiased, uncorrelated with v
    # what remains is the residual r/(1 + k) scaled by the step: (s - s')² var_q, as flow_euler_residual_var says
    assert err_c.var().item() == pytest.approx(flow_euler_residual_var(s, s_next, stats.residual_var_at(s * KEY)),
                                               rel=0.05)
    assert stats.residual_var_at(s * KEY) == pytest.approx(0.01 / 1.15 ** 2, rel=0.05)


def test_vsc_ancestral_step_keeps_the_total_variance():
    s, s_next, var_q = 0.6, 0.45, 1.0
    n = 400_000
    x = x_at(s, n, 11)
    r = math.sqrt(var_q) * torch.randn(n, generator=torch.Generator().manual_seed(12))

    def step(v_fn, var_fn):
        return sample_flow(v_fn, x, [s, s_next], method="euler_ancestral", var_fn=var_fn,
                           gen=torch.Generator().manual_seed(13))

    target = step(lambda x, s: v_exact(x, s), None).var().item()
    noisy = lambda x, s: v_exact(x, s) + r  # noqa: E731  (the corrected prediction: residual only)
    plain = step(noisy, None).var().item()
    vsc = step(noisy, lambda s: var_q).var().item()
    sd, scale, renoise = flow_ancestral_step(s, s_next, 1.0)
    added = flow_ancestral_residual_coef(s, sd, s_next) ** 2 * var_q
    assert added > 0.05 * target and added < renoise ** 2  # the residual is visible and absorbable here
    assert abs(plain / target - 1) > 0.05  # without VSC the step is too noisy by the residual's share
    assert abs(vsc / target - 1) < 0.01  # with VSC the total variance is on schedule
    assert flow_ancestral_vsc_renoise(s, sd, s_next, renoise, var_q) == pytest.approx(
        math.sqrt(renoise ** 2 - added))
    assert flow_ancestral_vsc_renoise(s, sd, s_next, renoise, 1e6) == 0.0  # more than the noise: clipped at 0


def test_vsc_ancestral_chain_keeps_the_schedule_and_euler_has_nothing_to_absorb():
    # a whole Euler-ancestral trajectory with a residual-noisy velocity: with VSC its variance is that of the
    # full-precision trajectory of the same sampler (which itself is off the true marginal by its discretisation
    # error at 6 steps); stopping at s = 0.2, before the last, noise-free step
    sig = [1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2]
    var_q, n = 0.3, 200_000
    x = x_at(1.0, n, 21)

    def run(method, var_fn, residual, report=None):
        g = torch.Generator().manual_seed(22)
        vf = (lambda x, s: v_exact(x, s) + math.sqrt(var_q) * torch.randn(x.shape, generator=g)) if residual \
            else (lambda x, s: v_exact(x, s))
        return sample_flow(vf, x, sig, method=method, var_fn=var_fn, gen=torch.Generator().manual_seed(23),
                           report=report)

    fp = run("euler_ancestral", None, False).var().item()
    plain = run("euler_ancestral", None, True).var().item()
    vsc = run("euler_ancestral", lambda s: var_q, True).var().item()
    assert plain / fp - 1 > 0.05
    assert abs(vsc / fp - 1) < 0.01
    # deterministic Euler: VSC has no noise to shrink, so var_fn changes nothing; the report says what the
    # residual leaves in the sample instead: sum over steps of (s - s')² var_q
    rep = []
    e_plain = run("euler", None, True)
    e_vsc = run("euler", lambda s: var_q, True, rep)
    assert torch.equal(e_plain, e_vsc)
    assert all(r["noise_before"] == r["noise_after"] == 0.0 for r in rep)
    left = sum(r["residual_var_left"] for r in rep)
    assert left == pytest.approx(var_q * sum((a - b) ** 2 for a, b in zip(sig[:-1], sig[1:])))


def test_flow_sampler_names_are_checked():
    with pytest.raises(ConfigError):
        sample_flow(lambda x, s: x, torch.zeros(2), [1.0, 0.0], method="ddim")
