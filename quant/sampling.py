"""Model-agnostic samplers for eps-prediction diffusion models, with PTQD variance calibration.

``eps_fn(x_vp, t) -> eps`` is any noise predictor at DDPM timestep t (guidance, class labels, text are the
caller's business, see ``guided_eps_fn``). ``alphas_cumprod`` is the training schedule (length T).
``var_fn(t) -> residual variance`` (``PTQDStats.residual_var_at``) turns on variance-schedule calibration;
it is a no-op for deterministic samplers (DDIM eta=0).

Samplers are looked up in the ``SAMPLERS`` registry: "ddim" (eta), "ddpm", "euler_a".

Rectified-flow (velocity-prediction) models have their own samplers, ``sample_flow`` ("euler",
"euler_ancestral" in ComfyUI's ``sample_euler_ancestral_RF`` form), with the flow form of VSC
(docs/FLOW_MATCHING.md); ``sample_sigmas_ptqd(..., flow=True)`` is the same in k-diffusion form for hosts.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .calib import unet_output
from .config import check_verb_args
from .errors import ConfigError
from .progress import Stage
from .ptqd import (ancestral_vsc_sigma_up, ddim_vsc_sigma, ddpm_vsc_sigma, flow_ancestral_vsc_renoise,
                   flow_euler_residual_var)

SAMPLERS: Dict[str, Callable] = {}


def register_sampler(name):
    def deco(fn):
        SAMPLERS[name] = fn
        return fn

    return deco


def timesteps_for(steps: int, T: int):
    if not 1 <= steps <= T:
        raise ConfigError(f"steps={steps} is out of range: allowed 1..{T}")
    return [int(round(x)) for x in torch.linspace(T - 1, 0, steps).tolist()]


def guided_eps_fn(unet, class_labels: Optional[torch.Tensor] = None, guidance: float = 1.0,
                  null_label: Optional[int] = None, split_guidance: bool = False, **kwargs):
    """eps_fn for a (class-)conditional diffusers-style UNet, with classifier-free guidance as one batched
    call (default) or two calls (``split_guidance``)."""
    guidance = check_verb_args("guided_eps_fn", guidance=guidance)["guidance"]

    def call(x, t, labels):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        extra = dict(kwargs)
        if labels is not None:
            extra["class_labels"] = labels
        return unet_output(unet(x, tt, **extra))

    def eps_fn(x, t):
        if guidance == 1.0 or class_labels is None or null_label is None:
            return call(x, t, class_labels)
        null = torch.full_like(class_labels, null_label)
        if split_guidance:
            c, u = call(x, t, class_labels), call(x, t, null)
        else:
            both = call(torch.cat([x, x]), t, torch.cat([class_labels, null]))
            c, u = both.chunk(2)
        return u + guidance * (c - u)

    return eps_fn


@register_sampler("ddim")
def ddim(eps_fn, x, ac, ts, eta=0.0, var_fn=None, gen=None, st=None, clip_x0=False):
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0:  # pixel-space models: keep the predicted image in range (diffusers' clip_sample)
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) if a_prev < 1 else 0.0
        if var_fn is not None:
            sigma = ddim_vsc_sigma(a_t, a_prev, sigma, var_fn(t))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if st is not None:
            st.step()
    return x


@register_sampler("ddpm")
def ddpm(eps_fn, x, ac, ts, eta=1.0, var_fn=None, gen=None, st=None):
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        alpha = a_t / a_prev
        eps = eps_fn(x, t)
        x = (x - (1 - alpha) / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha)
        sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - alpha)) if a_prev < 1 else 0.0
        if var_fn is not None:
            sigma = ddpm_vsc_sigma(a_t, a_prev, sigma, var_fn(t))
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if st is not None:
            st.step()
    return x


@register_sampler("euler_a")
def euler_ancestral(eps_fn, x, ac, ts, eta=1.0, var_fn=None, gen=None, st=None):
    sig = [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ts] + [0.0]
    x = x * math.sqrt(1 + sig[0] ** 2)  # VP noise -> sigma-space noise of scale sigma_max
    for i, t in enumerate(ts):
        s, s_next = sig[i], sig[i + 1]
        eps = eps_fn(x / math.sqrt(1 + s * s), t)
        s_up = min(s_next, eta * math.sqrt(max(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0)))
        s_down = math.sqrt(max(s_next ** 2 - s_up ** 2, 0.0))
        if var_fn is not None:
            s_up = ancestral_vsc_sigma_up(s, s_down, s_up, var_fn(t))
        x = x + eps * (s_down - s)
        if s_up > 0:
            x = x + s_up * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if st is not None:
            st.step()
    return x


def sample(eps_fn, shape, alphas_cumprod: torch.Tensor, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
           seed: int = 0, var_fn=None, progress=None, device="cpu", x_T: Optional[torch.Tensor] = None,
           clip_x0: bool = False):
    """Run ``sampler`` from Gaussian noise (seeded) and return x_0 (shape ``shape``). ``clip_x0`` (DDIM only):
    clamp the predicted x_0 to [-1, 1] at every step, as pixel-space models are sampled."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if clip_x0 and sampler != "ddim":
        raise ConfigError(f"clip_x0 is implemented for the ddim sampler only, not {sampler!r}")
    steps, eta, seed = check_verb_args("sample", steps=steps, eta=eta, seed=seed).values()
    T = len(alphas_cumprod)
    ts = timesteps_for(steps, T)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=gen) if x_T is None else x_T.clone()
    x = x.to(device)
    with torch.no_grad(), Stage(progress, len(ts), f"sample ({sampler})") as st:
        kw = dict(clip_x0=True) if clip_x0 else {}
        return SAMPLERS[sampler](eps_fn, x, alphas_cumprod, ts, eta=eta, var_fn=var_fn, gen=gen, st=st, **kw)


# ---- sigma-space (k-diffusion) samplers with PTQD variance calibration, used by hosts' sampler nodes -----
KDIFF_SAMPLERS = ("euler_ancestral", "ddpm", "ddim", "euler")
KDIFF_STOCHASTIC = {"euler_ancestral", "ddpm", "ddim"}


def ancestral_step(sigma: float, sigma_next: float, eta: float):
    """(sigma_down, sigma_up) of an ancestral step (Karras et al. 2022, eq. for ancestral sampling)."""
    if eta <= 0 or sigma_next <= 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


class _Noise:
    def __init__(self, x: torch.Tensor, seed: Optional[int]):
        self.gen = None
        if seed is not None:
            self.gen = torch.Generator(device=x.device).manual_seed(int(seed))

    def __call__(self, x):
        return torch.randn(x.shape, generator=self.gen, device=x.device, dtype=x.dtype)


def sample_sigmas_ptqd(model, x, sigmas, extra_args=None, callback=None, method="euler_ancestral", eta=1.0,
                       s_noise=1.0, residual_var=None, report=None, flow=False):
    """A k-diffusion-style sampler (sigma space, ``model(x, sigma, **extra_args)`` returns the denoised x0) with
    PTQD variance calibration: the injected noise is reduced by ``residual_var(sigma)`` (the quantized model's
    residual eps variance at that sigma; None: a plain sampler). Methods: ``KDIFF_SAMPLERS``.

    x: latent at sigmas[0] (already noise-scaled), float [B, C, H, W]; sigmas: float [steps + 1].
    ``report`` (optional list) receives one dict per step with the noise levels before/after VSC.
    Update rules (eps = (x - x0)/sigma; VP quantities abar = 1/(1 + sigma^2)):
      euler_ancestral  x' = x0 + eps*s_down + s_up'*z,  s_up' = sqrt(max(s_up^2 - (s - s_down)^2 v, 0))
      ddpm (VP space)  x' = mu(x, eps) + sig'*z,  sig'^2 = max(sig^2 - (beta/(sqrt(alpha) sqrt(1-abar)))^2 v, 0)
      ddim(eta)        sig' solves sig'^2 + c(sig')^2 v = sig^2 (``ptqd.ddim_vsc_sigma``)
      euler            deterministic: nothing to reduce
    ``flow=True``: a rectified-flow model (ComfyUI's CONST, x = (1 - sigma) x0 + sigma noise): euler is the same
    formula, euler_ancestral takes ComfyUI's ``sample_euler_ancestral_RF`` form with the flow VSC
    (``flow_ancestral_step``, ``ptqd.flow_ancestral_vsc_renoise``); ddpm/ddim are VP-space rules and refuse.
    """
    if flow and method not in FLOW_SAMPLERS:
        raise ConfigError(f"sampler {method!r} is a VP-space (eps) rule; a rectified-flow model samples with "
                          f"{' or '.join(FLOW_SAMPLERS)}")
    extra_args = {} if extra_args is None else extra_args
    view = residual_var if method in KDIFF_STOCHASTIC else None
    noise = _Noise(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        var = view(sigmas[i]) if view is not None else 0.0
        eps = (x - denoised) / sigma
        if method == "euler" or (method == "euler_ancestral" and sigma_next <= 0):
            x = denoised + eps * sigma_next
            before = after = 0.0
        elif flow:  # euler_ancestral, rectified flow (eps here is the velocity (x - x0)/sigma)
            s_down, scale, before = flow_ancestral_step(sigma, sigma_next, eta)
            after = flow_ancestral_vsc_renoise(sigma, s_down, sigma_next, before, var) if var > 0 else before
            ratio = s_down / sigma
            x = scale * (ratio * x + (1.0 - ratio) * denoised)
            if before > 0:  # drawn even when VSC removed it all: the noise stream stays paired with a plain run
                x = x + noise(x) * (s_noise * after)
        elif method == "euler_ancestral":
            s_down, s_up = ancestral_step(sigma, sigma_next, eta)
            before = s_up
            after = ancestral_vsc_sigma_up(sigma, s_down, s_up, var) if var > 0 else s_up
            x = denoised + eps * s_down
            if after > 0:
                x = x + noise(x) * (s_noise * after)
        else:  # ddpm / ddim in VP space: abar = 1/(1+sigma^2), x_vp = x/sqrt(1+sigma^2)
            a_t, a_prev = 1.0 / (1.0 + sigma ** 2), 1.0 / (1.0 + sigma_next ** 2)
            x_vp = x / math.sqrt(1.0 + sigma ** 2)
            if method == "ddpm":
                alpha = a_t / a_prev
                mean = (x_vp - (1.0 - alpha) / math.sqrt(1.0 - a_t) * eps) / math.sqrt(alpha)
                sig = math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - alpha)) if sigma_next > 0 else 0.0
                before = sig
                after = ddpm_vsc_sigma(a_t, a_prev, sig, var) if var > 0 else sig
                x_vp = mean
            else:
                sig = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) if sigma_next > 0 else 0.0
                before = sig
                after = ddim_vsc_sigma(a_t, a_prev, sig, var) if var > 0 else sig
                # x0 is the same in VP and k-diffusion (sigma) space
                x_vp = math.sqrt(a_prev) * denoised + math.sqrt(max(1.0 - a_prev - after ** 2, 0.0)) * eps
            if after > 0:
                x_vp = x_vp + noise(x_vp) * (s_noise * after)
            x = x_vp * math.sqrt(1.0 + sigma_next ** 2)
        if report is not None:
            report.append({"step": i, "sigma": sigma, "var": var, "noise_before": before, "noise_after": after})
    return x


# ---- rectified-flow samplers (velocity prediction), with the flow form of VSC: docs/FLOW_MATCHING.md -----
FLOW_SAMPLERS = ("euler", "euler_ancestral")


def flow_ancestral_step(sigma: float, sigma_next: float, eta: float):
    """``(sigma_down, scale, renoise)`` of ComfyUI's ``sample_euler_ancestral_RF`` step for rectified flow:
        s_d = s'·(1 + (s'/s - 1)·eta),  x' = (a'/a_d)·(x + (s_d - s)·v) + renoise·z,
        a' = 1 - s', a_d = 1 - s_d,  renoise = sqrt(s'² - s_d²·a'²/a_d²),
    i.e. an Euler step down to s_d, then the signal rescaled to a' and fresh noise added up to s'. The last step
    (s' = 0) and eta = 0 are plain Euler steps: ``(s', 1, 0)``."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next <= 0 or eta <= 0:
        return sigma_next, 1.0, 0.0
    s_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
    a_next, a_down = 1.0 - sigma_next, 1.0 - s_down
    renoise = math.sqrt(max(sigma_next ** 2 - s_down ** 2 * a_next ** 2 / a_down ** 2, 0.0))
    return s_down, a_next / a_down, renoise


def sample_flow(v_fn, x: torch.Tensor, sigmas, method: str = "euler", eta: float = 1.0, var_fn=None, gen=None,
                s_noise: float = 1.0, report=None, st=None, vsc: bool = True) -> torch.Tensor:
    """Sample a velocity-predicting rectified-flow model from ``x`` (noise at ``sigmas[0]``) down ``sigmas``.

    ``v_fn(x, s) -> v`` (guidance is the caller's); ``var_fn(s)``: residual variance of the (PTQD-corrected)
    velocity at s (e.g. ``PTQDStats.residual_var_at`` at the table key of s), which turns on VSC for
    euler_ancestral (``ptqd.flow_ancestral_vsc_renoise``); for euler there is no noise to shrink and
    ``var_fn`` only feeds ``report`` (the residual variance each step adds to x and no shrunken noise
    offsets: ``residual_var_left``, before later steps rescale it); ``vsc=False``: the
    same report with the plain (uncalibrated) noise. ``gen``: generator
    of the injected noise, drawn in every noisy step whether or not VSC shrinks it (paired with a plain run).
      euler            x' = x + (s' - s)·v
      euler_ancestral  x' = (a'/a_d)·(x + (s_d - s)·v) + renoise'·z   (``flow_ancestral_step``)
    """
    if method not in FLOW_SAMPLERS:
        raise ConfigError(f"unknown flow sampler {method!r}; choose one of {list(FLOW_SAMPLERS)}")
    sigmas = [float(s) for s in sigmas]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = v_fn(x, s)
        var = float(var_fn(s)) if var_fn is not None else 0.0
        if method == "euler" or s_next <= 0 or eta <= 0:
            x = x + (s_next - s) * v
            before = after = 0.0
            left = flow_euler_residual_var(s, s_next, var)
        else:
            s_down, scale, before = flow_ancestral_step(s, s_next, eta)
            after = flow_ancestral_vsc_renoise(s, s_down, s_next, before, var) if var > 0 and vsc else before
            x = scale * (x + (s_down - s) * v)
            if before > 0:
                z = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                x = x + (s_noise * after) * z
            coef = scale * (s - s_down)
            left = max(coef * coef * var - (before * before - after * after), 0.0)
        if report is not None:
            report.append({"step": i, "sigma": s, "var": var, "noise_before": before, "noise_after": after,
                           "residual_var_left": left})
        if st is not None:
            st.step()
    return x
