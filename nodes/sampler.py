"""PTQD samplers for ComfyUI: "PTQD Sampler" (a SAMPLER for SamplerCustom/SamplerCustomAdvanced) and
"PTQD KSampler" (the same in KSampler's shape).

Division of labour (docs/PAPERS.md A5): the quantized UNet corrects its own output (bias and correlation
correction, a forward hook attached with the statistics), so *every* sampler already gets corrected
predictions. What only a sampler can do is variance-schedule calibration (VSC): the quantized prediction
still carries residual noise of variance v_t, which the update adds to x_t; a stochastic sampler therefore
injects correspondingly less fresh noise so the total noise level stays on schedule:

  euler_ancestral  x' = x + eps*(s_down - s) + s_up'*z,  s_up' = sqrt(max(s_up^2 - (s - s_down)^2 v_t, 0))
  ddpm (VP space)  x' = mu(x, eps) + sig'*z,           sig'^2 = max(sig^2 - (beta/(sqrt(alpha) sqrt(1-abar)))^2 v_t, 0)
  ddim(eta)        sig' solves sig'^2 + c(sig')^2 v_t = sig^2 (core ``ddim_vsc_sigma``)
  euler            deterministic: nothing to reduce (VSC is a no-op; the corrected prediction still applies)
  rectified flow   (CONST models) euler_ancestral takes ComfyUI's RF step and the flow VSC; ddpm/ddim refuse

with t = model_sampling.timestep(sigma) (the statistics' key), s = sigma, eps = (x - denoised)/sigma, and
abar = 1/(1 + sigma^2) for ComfyUI's eps-prediction (VP) models. v_t is the residual variance after the
enabled corrections (``PTQDStats.residual_var_at``). With classifier-free guidance v_t of the raw UNet output
is used for the combined prediction (the core's convention: both branches see the same x_t).

The sampler math is the core's ``quant/sampling.py``; the statistics are found through ``comfy_adapter.ptqd_view``.
"""
from __future__ import annotations



from ..quant.sampling import KDIFF_SAMPLERS, KDIFF_STOCHASTIC, ancestral_step, sample_sigmas_ptqd  # noqa: F401
from . import comfy_adapter as adapter
from .common import (BOOL, CATEGORY, COMBO, FLOAT, INT, SOCKET, NodeInputError, check_choice, check_float,
                     check_int)

PTQD_SAMPLERS, STOCHASTIC = KDIFF_SAMPLERS, KDIFF_STOCHASTIC


def sample_ptqd(model, x, sigmas, extra_args=None, callback=None, disable=None, method="euler_ancestral",
                eta=1.0, s_noise=1.0, vsc=True, report=None):
    """ComfyUI KSAMPLER function: the core's ``sample_sigmas_ptqd`` with the residual variance of the UNet
    being sampled (found through ``comfy_adapter.ptqd_view``)."""
    view = adapter.ptqd_view(model) if vsc and method in STOCHASTIC else None
    return sample_sigmas_ptqd(model, x, sigmas, extra_args, callback, method=method, eta=eta, s_noise=s_noise,
                              residual_var=None if view is None else view.residual_var, report=report,
                              flow=_is_flow(model))


def _is_flow(model_k) -> bool:
    """CONST (rectified-flow) models take the flow step, as ComfyUI's euler_ancestral does (docs/FLOW_MATCHING.md)."""
    ms = getattr(getattr(getattr(model_k, "inner_model", None), "inner_model", None), "model_sampling", None)
    try:
        import comfy.model_sampling as cms
    except ImportError:  # outside ComfyUI (contract tests)
        return False
    return isinstance(ms, cms.CONST)


def check_sampler_settings(sampler_name=None, eta=None, s_noise=None):
    if sampler_name is not None:
        check_choice("sampler_name", sampler_name, PTQD_SAMPLERS)
    if eta is not None:
        check_float("eta", eta, 0.0, 1.0, "eta scales the injected noise: 0 = deterministic, 1 = full ancestral/DDPM.")
    if s_noise is not None:
        check_float("s_noise", s_noise, 0.0, 2.0)


def make_sampler(sampler_name: str, eta: float, s_noise: float, variance_correction: bool):
    check_sampler_settings(sampler_name, eta, s_noise)
    return adapter.ksampler(sample_ptqd, {"method": sampler_name, "eta": float(eta), "s_noise": float(s_noise),
                                          "vsc": bool(variance_correction)})


_SAMPLER_TIP = ("euler_ancestral and ddpm inject noise every step, so PTQD's variance correction applies; "
                "ddim applies it when eta > 0; euler is deterministic: no noise to reduce (no-op), the "
                "quantized UNet's own bias/correlation correction still applies.")
_ETA_TIP = ("Noise amount for euler_ancestral and ddim (0 = deterministic, 1 = full ancestral / DDPM-like). "
            "Ignored by ddpm and euler.")
_SNOISE_TIP = "Multiplier on the injected noise (1.0 = standard)."
_VSC_TIP = ("Reduce the injected noise by the quantization noise measured during calibration (PTQD variance "
            "schedule calibration). Off = a plain sampler. No effect on deterministic samplers or models "
            "without PTQD statistics.")


class LowBitPTQDSampler:
    DESCRIPTION = ("A SAMPLER for SamplerCustom / SamplerCustomAdvanced that applies PTQD variance-schedule "
                   "calibration using the statistics stored on the quantized MODEL being sampled (Quantize UNet "
                   "with a '+ptqd' method such as 'lp+ptqd', or a loaded file that has them). With a float model "
                   "or a model without "
                   "statistics it is an ordinary sampler. " + _SAMPLER_TIP)
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustom's or SamplerCustomAdvanced's sampler input.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": COMBO(PTQD_SAMPLERS, "euler_ancestral", _SAMPLER_TIP),
            "eta": FLOAT(1.0, 0.0, 1.0, _ETA_TIP),
            "s_noise": FLOAT(1.0, 0.0, 2.0, _SNOISE_TIP, advanced=True),
            "variance_correction": BOOL(True, _VSC_TIP),
        }}

    # (no VALIDATE_INPUTS: ComfyUI checks the declared ranges and choices itself, one error per bad input;
    # make_sampler checks them again)

    def get_sampler(self, sampler_name, eta, s_noise, variance_correction):
        return (make_sampler(sampler_name, eta, s_noise, variance_correction),)


def check_ksampler_settings(steps=None, cfg=None, denoise=None, scheduler=None, **kw):
    check_sampler_settings(**kw)
    if steps is not None:
        check_int("steps", steps, 1, 10000)
    if cfg is not None:
        check_float("cfg", cfg, 0.0, 100.0)
    if denoise is not None:
        check_float("denoise", denoise, 0.01, 1.0)  # (0 runs no step: refused by ComfyUI's range check, up front)
    if scheduler is not None:
        check_choice("scheduler", scheduler, adapter.scheduler_names())


class LowBitPTQDKSampler:
    DESCRIPTION = ("KSampler with the PTQD samplers: same inputs and output as the core KSampler, with PTQD "
                   "variance-schedule calibration from the statistics of the quantized MODEL. " + _SAMPLER_TIP)
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model to sample, normally the output of Quantize UNet (LowBit)."),
            "seed": INT(0, 0, 0xffffffffffffffff, "Seed of the initial and the per-step noise.",
                        control_after_generate=True),
            "steps": INT(20, 1, 10000, "Number of sampling steps."),
            "cfg": FLOAT(7.0, 0.0, 100.0, "Classifier-free guidance scale.", step=0.1, round=0.01),
            "sampler_name": COMBO(PTQD_SAMPLERS, "euler_ancestral", _SAMPLER_TIP),
            "scheduler": COMBO(adapter.scheduler_names(), "normal", "How the sigmas are spaced over the steps."),
            "positive": SOCKET("CONDITIONING", "What the image should show."),
            "negative": SOCKET("CONDITIONING", "What the image should not show."),
            "latent_image": SOCKET("LATENT", "The latent to denoise (Empty Latent Image for text-to-image)."),
            "denoise": FLOAT(1.0, 0.01, 1.0, "Fraction of the schedule to run (below 1 keeps part of the input "
                                            "latent, as in img2img)."),
        }, "optional": {
            "eta": FLOAT(1.0, 0.0, 1.0, _ETA_TIP, advanced=True),
            "s_noise": FLOAT(1.0, 0.0, 2.0, _SNOISE_TIP, advanced=True),
            "variance_correction": BOOL(True, _VSC_TIP, advanced=True),
        }}

    # (no VALIDATE_INPUTS: ComfyUI checks the declared ranges and choices itself, one error per bad input;
    # sample() checks them again)

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, eta=1.0, s_noise=1.0, variance_correction=True):
        if denoise <= 0:
            raise NodeInputError("denoise=0 runs no step; use a value in (0, 1]")
        check_ksampler_settings(steps=steps, cfg=cfg, denoise=denoise, scheduler=scheduler)
        sampler = make_sampler(sampler_name, eta, s_noise, variance_correction)
        return (adapter.sample_with_sampler(model, sampler, seed, steps, cfg, scheduler, positive, negative,
                                            latent_image, denoise),)
