"""PTQD: quantization-noise statistics, their correction, and variance-schedule calibration (docs/PAPERS.md A5).

Noise model (per timestep t, per output channel c):   eps_q = (1 + k_t) * eps_fp + m_t * x_t + b_{t,c} + r,
with r zero-mean and uncorrelated with eps_fp and x_t, variance v_t. The paper's model is m_t = 0
(``PTQDConfig.input_correlation=False``). The input term is our extension: on the default model at W4A4 the
error is content-dependent (late steps: +0.025 on digit strokes, -0.046 on the background; mean -0.022), so
removing a spatially constant bias moves error onto the strokes; x_t carries the content and is known at
sampling time, so the correction eps_c = (eps_q - m_t·x_t - b_t) / (1 + k_t) stays computable.

Statistics are collected on full-precision trajectories: both models see the same UNet input x_t (recorded
from any sampler with ``CallRecorder``). They are accumulated as streaming sufficient statistics per
timestep (bounded memory), keyed by t and interpolated, so they serve any step count, schedule or sampler.

Departures from the official code (section E), on purpose:
* k_t (and m_t) are fitted jointly with the per-channel bias (OLS with a per-channel intercept); the bias is then the
  intercept (the mean of the residual), not the mean of the total error (which also contains k*mean(eps));
* the residual variance is pooled over all elements, not an average of per-sample standard deviations;
* negative k is kept (clipped at -0.5 for safety), not silently set to 0;
* statistics are on the raw UNet output of each call (cond and uncond alike), so they do not depend on the
  guidance scale: with guidance s the combined error (1-s)·e_u + s·e_c equals e when both branches share the
  correlated error, which holds because both see the same x_t;
* the variance calibration solves for the new noise level self-consistently (the official code computed the
  coefficient with the old sigma while the update used the new one).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .calib import (_READABLE, Call, keyed, model_device_dtype, prediction_key, require_timesteps, stacked,
                    unet_output)
from .config import PTQDConfig
from .context import get_context, sample_of_call
from .profiles import get_profile
from .progress import Stage

K_MIN = -0.5


class PTQDStats:
    """Per-timestep tables: t [S], k [S], bias [S, C], var [S] (residual variance before correction) and
    m [S] (input correlation; zeros for the paper's model)."""

    def __init__(self, t: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, var: torch.Tensor,
                 config: PTQDConfig = PTQDConfig(), m: Optional[torch.Tensor] = None):
        order = torch.argsort(t)
        self.t, self.k = t[order].float(), k[order].float()
        self.bias, self.var = bias[order].float(), var[order].float()
        self.m = torch.zeros_like(self.k) if m is None else m[order].float()
        self.config = config

    # ---- interpolation over t -------------------------------------------------------------------------
    def _interp(self, table: torch.Tensor, t: float) -> torch.Tensor:
        g = self.t
        if len(g) == 1:
            return table[0]
        tt = min(max(float(t), float(g[0])), float(g[-1]))
        i = int(torch.searchsorted(g, torch.tensor(tt), right=True).clamp(1, len(g) - 1)) - 1
        w = (tt - float(g[i])) / max(float(g[i + 1] - g[i]), 1e-12)
        return table[i] * (1 - w) + table[i + 1] * w

    def k_at(self, t: float) -> float:
        return max(float(self._interp(self.k, t)), K_MIN)

    def m_at(self, t: float) -> float:
        return float(self._interp(self.m, t)) if self.config.input_correlation else 0.0

    def bias_at(self, t: float) -> torch.Tensor:
        return self._interp(self.bias, t)

    def residual_var_at(self, t: float, corrected: bool = True) -> float:
        """Variance of the uncorrelated quantization noise of the (corrected) prediction at t."""
        v = max(float(self._interp(self.var, t)), 0.0)
        if corrected and self.config.correlation_correction:
            v = v / (1.0 + self.k_at(t)) ** 2
        return v

    def correct(self, eps: torch.Tensor, t: float, x: Optional[torch.Tensor] = None,
                channel_dim: int = 1) -> torch.Tensor:
        """eps_c = (eps_q - m_t·x_t - bias_t) / (1 + k_t), per the enabled parts of the config (BC, CNC);
        ``x`` is the UNet input x_t (the input term is skipped when it is not given or its shape differs);
        ``channel_dim``: the dimension of ``eps`` holding the channels the bias is per (the model profile's)."""
        m = self.m_at(t) if self.config.bias_correction else 0.0
        if m != 0.0:
            if x is None or x.shape != eps.shape:
                raise ValueError("these PTQD statistics have an input term: pass the UNet input x_t (shaped like eps)")
            eps = eps - m * x.to(eps.dtype)
        if self.config.bias_correction:
            b = self.bias_at(t).to(eps.device, eps.dtype)
            shape = [1] * eps.dim()
            shape[channel_dim] = -1
            eps = eps - b.reshape(shape)
        if self.config.correlation_correction:
            eps = eps / (1.0 + self.k_at(t))
        return eps

    # ---- (de)serialisation into the quantized model file ---------------------------------------------
    def state(self):
        from .config import to_json_obj

        return {"config": to_json_obj(self.config)}, {"t": self.t, "k": self.k, "bias": self.bias, "var": self.var,
                                                        "m": self.m}

    @staticmethod
    def check_meta(meta) -> PTQDConfig:
        """The PTQD config a file's ``extras.ptqd`` holds, rebuilt from the allowlist and of type ``PTQDConfig``
        (another allowlisted config would load and fail at the first corrected forward); ValueError otherwise."""
        from .config import from_json_obj

        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("no config object")
        cfg = from_json_obj(meta["config"])
        if not isinstance(cfg, PTQDConfig):
            raise ValueError(f"its config is a {type(cfg).__name__}, expected a PTQDConfig")
        return cfg

    @classmethod
    def from_state(cls, meta, tensors):
        cfg = cls.check_meta(meta)
        t, k, bias, var = (tensors[n] for n in ("t", "k", "bias", "var"))
        S = t.shape[0]
        m = tensors.get("m", torch.zeros(S))
        if t.dim() != 1 or k.shape != (S,) or var.shape != (S,) or m.shape != (S,) or bias.dim() != 2 \
                or bias.shape[0] != S:
            raise ValueError("PTQD tables have inconsistent shapes")
        return cls(t, k, bias, var, cfg, m)


class _Accum:
    """Streaming sufficient statistics per timestep and output channel: eps_fp (x), UNet input x_t (u), error (y)."""

    KEYS = ("n", "x", "u", "y", "xx", "uu", "xu", "xy", "uy", "yy")

    def __init__(self):
        self.d: Dict[float, Dict[str, torch.Tensor]] = {}

    def add(self, t: float, fp: torch.Tensor, err: torch.Tensor, inp: Optional[torch.Tensor] = None):
        C = fp.shape[1]
        x = fp.transpose(0, 1).reshape(C, -1).double()
        y = err.transpose(0, 1).reshape(C, -1).double()
        u = inp.transpose(0, 1).reshape(C, -1).double() if inp is not None and inp.shape == fp.shape \
            else torch.zeros_like(x)  # no input term when the output is not shaped like the input
        s = self.d.setdefault(t, {k: torch.zeros(C, dtype=torch.float64) for k in self.KEYS})
        s["n"] += x.shape[1]
        for k, v in (("x", x), ("u", u), ("y", y)):
            s[k] += v.sum(1)
        for k, a, b in (("xx", x, x), ("uu", u, u), ("xu", x, u), ("xy", x, y), ("uy", u, y), ("yy", y, y)):
            s[k] += (a * b).sum(1)

    def finish(self, config: PTQDConfig) -> PTQDStats:
        """Pooled OLS of the error on eps (and x_t) with a per-channel intercept, per timestep."""
        ts, ks, ms, bs, vs = [], [], [], [], []
        for t in sorted(self.d):
            s = self.d[t]
            n = s["n"]

            def cs(a, b):  # centred cross-sum within each channel, pooled over channels
                return float((s[a + b] - s[a] * s[b] / n).sum())

            sxx, suu, sxu, sxy, suy, syy = cs("x", "x"), cs("u", "u"), cs("x", "u"), cs("x", "y"), cs("u", "y"), \
                cs("y", "y")
            k, m = sxy / max(sxx, 1e-30), 0.0
            det = sxx * suu - sxu * sxu
            if config.input_correlation and suu > 0 and det > 1e-9 * sxx * suu:
                k, m = (sxy * suu - suy * sxu) / det, (suy * sxx - sxy * sxu) / det
            bias = (s["y"] - k * s["x"] - m * s["u"]) / n
            ss = syy - 2 * k * sxy - 2 * m * suy + k * k * sxx + m * m * suu + 2 * k * m * sxu
            ts.append(t)
            ks.append(max(k, K_MIN))
            ms.append(m)
            bs.append(bias.float())
            vs.append(max(ss / float(n.sum()), 0.0))
        return PTQDStats(torch.tensor(ts), torch.tensor(ks), torch.stack(bs), torch.tensor(vs), config,
                         torch.tensor(ms))


def collect_stats(fp_model, qmodel, calls: List[Call], config: PTQDConfig = PTQDConfig(),
                  progress=None) -> PTQDStats:
    """Fit k_t, bias_t and residual variance from UNet calls on full-precision trajectories.

    Raises ``NumericalError`` (naming the model and the timestep) when an output or a fitted table is NaN/Inf.
    Transactional: cancelled or failing, both models are left as they were."""
    from .errors import ConfigError
    from .transaction import FIX, check_stats, check_tensor, transaction

    if not calls:
        raise ConfigError("PTQD statistics need recorded UNet calls (CallRecorder around a full-precision sampling "
                          "run)")
    if not isinstance(config, PTQDConfig):
        raise ConfigError(f"config must be a PTQDConfig, got {type(config).__name__}")
    ctx = get_context(qmodel)
    if ctx is None:
        raise ConfigError("collect_stats needs a LowBit quantized UNet (lowbit.quant.quantize) as qmodel")
    cd = get_profile(ctx.profile).channel_dim
    calls = keyed(calls, fp_model, ctx.profile)  # (keys as the quantized model looks them up)
    require_timesteps(fp_model, calls, ctx.profile, "PTQD")
    acc = _Accum()
    dev, dt = model_device_dtype(fp_model)
    qdev, qdt = model_device_dtype(qmodel)
    saved = ctx.ptqd_active
    with transaction(qmodel, readonly=(fp_model,)):
        ctx.ptqd_active = False  # measure the raw quantized output
        with torch.no_grad(), Stage(progress, len(calls), "PTQD statistics") as st:
            for c in calls:
                a, kw = c.to(dev, dt)
                check_tensor(sample_of_call(a, kw), f"collect_stats: the UNet input at timestep {c.t}",
                             "record the calibration calls again from a finite sampling run")
                fp = unet_output(fp_model(*a, **kw)).float()
                check_tensor(fp, f"collect_stats: the full-precision model's output at timestep {c.t}", FIX)
                a, kw = c.to(qdev, qdt)
                q = unet_output(qmodel(*a, **kw)).float().to(fp.device)
                check_tensor(q, f"collect_stats: the quantized model's output at timestep {c.t}", FIX)
                x_t = sample_of_call(a, kw, ctx.profile).float()
                if cd != 1:  # the accumulator wants channels in dimension 1 (e.g. Flux's packed tokens)
                    fp, q, x_t = fp.movedim(cd, 1), q.movedim(cd, 1), x_t.movedim(cd, 1)
                acc.add(float(c.t), fp.cpu(), (q - fp).cpu(), x_t.cpu())
                st.step()
        stats = acc.finish(config)
        check_stats(stats, "collect_stats")
        ctx.ptqd_active = saved
    return stats


class PTQDOutputHook:
    """Forward hook on the quantized UNet: applies bias and correlation correction to its raw output at
    the call's timestep, so every sampler (ComfyUI KSampler, diffusers pipelines) gets corrected
    predictions. The variance calibration needs the sampler (see ``sampling.py`` and the PTQD Sampler)."""

    def __call__(self, module, args, kwargs, out):
        ctx = get_context(module)
        stats = None if ctx is None else ctx.ptqd
        if stats is None or ctx is None or not getattr(ctx, "ptqd_active", False) or ctx.t is None:
            return None
        x = sample_of_call(args, kwargs, ctx.profile)
        cd = get_profile(ctx.profile).channel_dim
        if torch.is_tensor(out):
            return stats.correct(out, ctx.t, x, cd)
        if hasattr(out, "sample"):
            pred = stacked(out.sample)
            corrected = stats.correct(pred, ctx.t, x, cd)
            out.sample = corrected if torch.is_tensor(out.sample) else type(out.sample)(corrected.unbind(0))
            return out
        if isinstance(out, (tuple, list)) and out:
            first, batch = out[0], stacked(out[0])
            if torch.is_tensor(first):
                first = stats.correct(first, ctx.t, x, cd)
            elif torch.is_tensor(batch):
                # per-sample predictions (diffusers' Z-Image): corrected as a batch, returned as the list they were
                first = type(first)(stats.correct(batch, ctx.t, x, cd).unbind(0))
            else:
                first = None
            if first is not None:
                rest = (first,) + tuple(out[1:])
                return rest if isinstance(out, tuple) else list(rest)
        k = prediction_key(out) if isinstance(out, dict) else None
        if k is not None:  # a plain dict: {"x": pred}, {"sample": ...}
            pred = stacked(out[k])
            corrected = stats.correct(pred, ctx.t, x, cd)
            out[k] = corrected if torch.is_tensor(out[k]) else type(out[k])(corrected.unbind(0))
            return out
        # (calib.unet_output, which the statistics were collected through, reads the same outputs)
        raise TypeError(f"PTQD correction: cannot read the prediction from a model output of type "
                        f"{type(out).__name__}: {_READABLE}")


def attach_stats(qmodel, stats: Optional[PTQDStats], active: bool = True):
    """Store ``stats`` on the quantized model and switch the automatic correction on/off."""
    ctx = get_context(qmodel)
    ctx.ptqd = stats
    ctx.ptqd_active = active and stats is not None
    if not any(isinstance(h, PTQDOutputHook) for h in qmodel._forward_hooks.values()):
        qmodel.register_forward_hook(PTQDOutputHook(), with_kwargs=True)
    return qmodel


def get_stats(qmodel) -> Optional[PTQDStats]:
    ctx = get_context(qmodel)
    return None if ctx is None else ctx.ptqd


# ---- variance-schedule calibration ------------------------------------------------------------------------

def ddim_vsc_sigma(a_t: float, a_prev: float, sigma: float, var_q: float) -> float:
    """New DDIM noise level sigma' for residual quantization variance ``var_q`` of eps.

    DDIM step: x_prev = sqrt(a_prev)·x0(eps) + sqrt(1 - a_prev - sigma²)·eps + sigma·z, with
    x0(eps) = (x_t - sqrt(1-a_t)·eps)/sqrt(a_t). The eps coefficient is
        c(sigma) = sqrt(1 - a_prev - sigma²) - sqrt(a_prev (1 - a_t) / a_t),
    so a residual r in eps adds c(sigma)²·var_q of variance. Keeping the total stochastic variance at sigma²
    means solving sigma'² + c(sigma')²·var_q = sigma² for sigma' in [0, sigma] (bisection; f is continuous
    and f(sigma) >= 0). If even sigma' = 0 leaves more than sigma², sigma' = 0.
    With eta = 0 (sigma = 0) this is a no-op: deterministic samplers cannot absorb the noise.
    """
    if sigma <= 0 or var_q <= 0:
        return sigma
    B = math.sqrt(a_prev * (1 - a_t) / a_t)

    def f(s):
        c = math.sqrt(max(1 - a_prev - s * s, 0.0)) - B
        return s * s + c * c * var_q - sigma * sigma

    if f(0.0) >= 0:
        return 0.0
    lo, hi = 0.0, sigma
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return lo


def ddpm_vsc_sigma(a_t: float, a_prev: float, sigma: float, var_q: float) -> float:
    """DDPM (posterior-mean) step: x_prev = (x_t - beta/sqrt(1-a_t)·eps)/sqrt(alpha) + sigma·z with
    alpha = a_t/a_prev, beta = 1 - alpha. The eps coefficient beta/(sqrt(alpha)·sqrt(1-a_t)) does not depend
    on sigma, so sigma'² = max(sigma² - coef²·var_q, 0)."""
    if sigma <= 0 or var_q <= 0:
        return sigma
    alpha = a_t / a_prev
    coef = (1 - alpha) / (math.sqrt(alpha) * math.sqrt(1 - a_t))
    return math.sqrt(max(sigma * sigma - coef * coef * var_q, 0.0))


def ancestral_vsc_sigma_up(sigma: float, sigma_down: float, sigma_up: float, var_q: float) -> float:
    """Euler-ancestral step in k-diffusion (sigma) space, eps form: x' = x + eps·(sigma_down - sigma) +
    sigma_up·z. The eps residual enters with coefficient (sigma_down - sigma), so the injected noise
    becomes sqrt(max(sigma_up² - (sigma - sigma_down)²·var_q, 0)); sigma_down (the deterministic part) is
    unchanged. No-op for non-ancestral (deterministic) Euler, DPM++ 2M etc."""
    if sigma_up <= 0 or var_q <= 0:
        return sigma_up
    return math.sqrt(max(sigma_up * sigma_up - (sigma - sigma_down) ** 2 * var_q, 0.0))


# ---- rectified flow (velocity prediction): docs/FLOW_MATCHING.md -------------------------------------------
# x_s = (1 - s) x0 + s·noise, the model predicts v = noise - x0 (x0 = x_s - s·v). The noise model and its
# correction carry over unchanged with eps replaced by v: v_q = (1 + k_s) v + m_s x_s + b_s + r, corrected
# v_c = (v_q - m_s x_s - b_s)/(1 + k_s) = v + r/(1 + k_s) (``PTQDStats.correct`` on the raw output, keyed by
# the table key of s). What changes is how the remaining residual enters a step.

def flow_euler_residual_var(sigma: float, sigma_next: float, var_q: float) -> float:
    """Variance that the velocity residual (variance ``var_q``) adds to x in the rectified-flow Euler step
    x' = x + (s' - s)·v: (s - s')²·var_q. Deterministic Euler injects no fresh noise, so there is nothing for
    variance calibration to shrink: this variance stays in the sample (VSC is a no-op for Euler)."""
    return (float(sigma) - float(sigma_next)) ** 2 * max(float(var_q), 0.0)


def flow_ancestral_residual_coef(sigma: float, sigma_down: float, sigma_next: float) -> float:
    """Coefficient of the velocity residual in the rectified-flow Euler-ancestral step (ComfyUI's
    ``sample_euler_ancestral_RF``):  x' = (a'/a_d)·(x + (s_d - s)·v) + renoise·z, a' = 1 - s', a_d = 1 - s_d,
    so a residual r in v enters x' as (a'/a_d)·(s_d - s)·r. Its magnitude is returned."""
    a_next, a_down = 1.0 - float(sigma_next), 1.0 - float(sigma_down)
    if a_down <= 0:
        return 0.0
    return a_next / a_down * abs(float(sigma) - float(sigma_down))


def flow_ancestral_vsc_renoise(sigma: float, sigma_down: float, sigma_next: float, renoise: float,
                               var_q: float) -> float:
    """VSC for the rectified-flow Euler-ancestral step: the injected noise ``renoise`` (ComfyUI's
    ``renoise_coeff``) shrinks so that fresh noise plus the velocity residual keep the scheduled variance:
        renoise'² = max(renoise² - ((a'/a_d)·(s - s_d))²·var_q, 0).
    s_d (the deterministic step) is unchanged, as in the eps-form ``ancestral_vsc_sigma_up``. No-op when no
    noise is injected (eta = 0, the last step) or there is no residual."""
    if renoise <= 0 or var_q <= 0:
        return renoise
    c = flow_ancestral_residual_coef(sigma, sigma_down, sigma_next)
    return math.sqrt(max(renoise * renoise - c * c * var_q, 0.0))


def _to_state(qmodel):
    stats = get_stats(qmodel)
    return None if stats is None else stats.state()


def _from_state(qmodel, meta, tensors):
    attach_stats(qmodel, PTQDStats.from_state(meta, tensors), active=True)


def _register():
    from .io import register_extra

    register_extra("ptqd", _to_state, _from_state, check_meta=PTQDStats.check_meta)


_register()
