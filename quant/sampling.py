"""Model-agnostic samplers for eps-prediction diffusion models, with PTQD variance calibration.

``eps_fn(x_vp, t) -> eps`` is any noise predictor at DDPM timestep t (guidance, class labels, text are the
caller's business, see ``guided_eps_fn``). ``alphas_cumprod`` is the training schedule (length T).
``var_fn(t) -> residual variance`` (``PTQDStats.residual_var_at``) turns on variance-schedule calibration;
it is a no-op for deterministic samplers (DDIM eta=0).

Samplers are looked up in the ``SAMPLERS`` registry: "ddim" (eta), "ddpm", "euler_a".
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .calib import unet_output
from .errors import ConfigError
from .progress import Stage
from .ptqd import ancestral_vsc_sigma_up, ddim_vsc_sigma, ddpm_vsc_sigma

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
def ddim(eps_fn, x, ac, ts, eta=0.0, var_fn=None, gen=None, st=None):
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
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
           seed: int = 0, var_fn=None, progress=None, device="cpu", x_T: Optional[torch.Tensor] = None):
    """Run ``sampler`` from Gaussian noise (seeded) and return x_0 (shape ``shape``)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta={eta} is out of range: allowed [0, 1]")
    T = len(alphas_cumprod)
    ts = timesteps_for(steps, T)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=gen) if x_T is None else x_T.clone()
    x = x.to(device)
    with torch.no_grad(), Stage(progress, len(ts), f"sample ({sampler})") as st:
        return SAMPLERS[sampler](eps_fn, x, alphas_cumprod, ts, eta=eta, var_fn=var_fn, gen=gen, st=st)
