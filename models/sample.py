"""Minimal reference DDIM sampler (eta 0..1) with classifier-free guidance for the default digits model.

A plain function: it only calls ``unet(x, t, class_labels=...)`` (``t`` is a 1-D int64 tensor of DDPM training
timesteps in [0, T)), so it also drives quantized UNets that keep this call signature. The noise is drawn for
all samples at once from ``seed``, so the result does not depend on ``batch_size``.
"""
from __future__ import annotations

import torch

from .data import IMAGE_SIZE, NULL_CLASS


def _eps(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, spacing: str = "leading") -> list[int]:
    """DDIM timesteps, descending. ``"leading"``: evenly spaced from 0, e.g. 50 of 1000 -> [980, 960, ..., 0];
    ``"linspace"``: ``round(linspace(T - 1, 0, steps))`` (what ``lowbit.quant.sample`` and the demo use)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if spacing == "linspace":
        return [int(round(v)) for v in torch.linspace(num_train_timesteps - 1, 0, steps).tolist()]
    if spacing != "leading":
        raise ValueError(f"spacing must be 'leading' or 'linspace', got {spacing!r}")
    stride = num_train_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


@torch.no_grad()
def sample(
    unet,
    labels,
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    scheduler=None,
    clip_x0: bool = True,
    null_class: int = NULL_CLASS,
    image_size: int = IMAGE_SIZE,
    channels: int = 1,
    spacing: str = "leading",
) -> torch.Tensor:
    """DDIM samples ``[N, channels, image_size, image_size]`` float32 in [-1, 1] for class ids ``labels [N]``.

    ``guidance`` is the classifier-free guidance scale ``g``: ``eps = eps_null + g * (eps_cond - eps_null)``;
    ``g == 1`` makes one (conditional) UNet call per step, otherwise two (batched together). Labels equal to
    ``null_class`` give unconditional samples. ``eta`` = 0 is deterministic DDIM, 1 is DDPM-like.
    ``spacing`` picks the timesteps (``ddim_timesteps``); ``clip_x0=False, spacing="linspace"`` is the demo's
    sampler (``lowbit.quant.sample``, DDIM eta 0). ``scheduler`` supplies ``alphas_cumprod`` (default:
    ``default_scheduler()`` of the default model).
    """
    if scheduler is None:
        from .digits import default_scheduler

        scheduler = default_scheduler()
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    n = labels.numel()
    try:
        param = next(unet.parameters())
        device = param.device
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    except (AttributeError, StopIteration):
        device, dtype = torch.device("cpu"), torch.float32
    acp = scheduler.alphas_cumprod.to(torch.float64)
    T = int(scheduler.config.num_train_timesteps)
    ts = ddim_timesteps(steps, T, spacing)

    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, channels, image_size, image_size, generator=g, dtype=torch.float64)
    guided = float(guidance) != 1.0
    for i, t in enumerate(ts):
        a_t = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = torch.empty_like(x)
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size].to(device=device, dtype=dtype)
            cb = labels[s : s + batch_size].to(device)
            b = xb.shape[0]
            if guided:
                xin = torch.cat([xb, xb])
                cin = torch.cat([cb, torch.full_like(cb, null_class)])
                tt = torch.full((2 * b,), t, dtype=torch.long, device=device)
                e = _eps(unet(xin, tt, class_labels=cin)).double().cpu()
                e_c, e_u = e[:b], e[b:]
                e = e_u + guidance * (e_c - e_u)
            else:
                tt = torch.full((b,), t, dtype=torch.long, device=device)
                e = _eps(unet(xb, tt, class_labels=cb)).double().cpu()
            eps[s : s + b] = e
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        dir_xt = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = a_prev.sqrt() * x0 + dir_xt
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.float().clamp(-1.0, 1.0)
