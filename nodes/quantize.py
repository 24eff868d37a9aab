"""The "Quantize UNet" node: calibrate on the float model's own sampling runs, quantize, deploy, PTQD.

Steps (all on copies; the input MODEL is never changed):
1. calibration: ComfyUI's own sampler (euler, "normal" schedule) runs the float MODEL ``calibration_samples``
   times with the given conditioning while ``CallRecorder`` records every UNet call;
2. ``quant.quantize`` (weights + static activation scales from the recorded calls, per bit-width of the
   schedule) and ``quant.deploy_`` (packed integers, kernels);
3. method "ptqd": ``collect_stats`` (float vs quantized output on the same calls) + ``attach_stats`` — the
   quantized UNet then corrects its own output, and the PTQD samplers read the residual variance;
4. the result is a clone of the MODEL with ``add_object_patch("diffusion_model", quantized_unet)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from . import comfy_adapter as adapter
from .common import (BITS_PRESETS, CATEGORY, COMBO, FLOAT, INT, SCHEDULE_TYPE, SOCKET, NodeInputError, StageLog,
                     check_choice, check_float, check_int, validation_result)
from .schedule import MODE_AUTO, ScheduleSpec, check_schedule_with_bits
from ..quant.config import METHODS, QuantConfig, ReconConfig, arg_spec, field_spec
from ..quant.errors import ConfigError
from ..quant.pipeline import ALIASES, parse_method

log = logging.getLogger("lowbit.nodes")

METHOD_NAIVE, METHOD_PTQD, METHOD_RECON = "naive", "lp+ptqd", "recon+ptqd"
# the core's one set of limits (quant/config.py): the widgets and the checks below read them
CALIB_STEPS, CALIB_SAMPLES, SEED, GUIDANCE = (arg_spec(n) for n in ("calib_steps", "calib_samples", "seed", "guidance"))
TIME_BINS, RECON_ITERS = field_spec(QuantConfig, "time_bins"), field_spec(ReconConfig, "weight_iters")
PRECISION, SIZE_BUDGET = field_spec("PipelineConfig", "precision"), field_spec("PipelineConfig", "size_budget")
WEIGHT_INITS = ("lp", "minmax")


def available_methods():
    return list(METHODS)


@dataclass(frozen=True)
class QuantizeSettings:
    bits: str = "W4A8"
    method: str = METHOD_PTQD
    calibration_steps: int = 10
    calibration_samples: int = 4
    seed: int = 0
    cfg: float = 7.0
    calibration_width: int = 512
    calibration_height: int = 512
    calibration_timesteps: int = 0
    time_bins: int = 1
    recon_iters: int = 200
    weight_init: str = "lp"
    precision: str = "measured"
    size_budget: float = 0.03



def check_quantize_settings(bits=None, method=None, calibration_steps=None, calibration_samples=None, seed=None,
                            cfg=None, calibration_width=None, calibration_height=None, calibration_timesteps=None,
                            time_bins=None, recon_iters=None, weight_init=None, precision=None, size_budget=None):
    if bits is not None:
        check_choice("bits", bits, BITS_PRESETS)
    if method is not None:
        try:
            parse_method(method)  # today's vocabulary, plus the names saved workflows of earlier releases use
        except ConfigError as exc:
            raise NodeInputError(str(exc)) from None
    if calibration_steps is not None:
        check_int("calibration_steps", calibration_steps, CALIB_STEPS.lo, CALIB_STEPS.hi)
    if calibration_samples is not None:
        check_int("calibration_samples", calibration_samples, CALIB_SAMPLES.lo, CALIB_SAMPLES.hi)
    if seed is not None:
        check_int("seed", seed, SEED.lo, SEED.hi)
    if cfg is not None:
        check_float("cfg", cfg, GUIDANCE.lo, GUIDANCE.hi)
    for name, v in (("calibration_width", calibration_width), ("calibration_height", calibration_height)):
        if v is not None:
            check_int(name, v, 16, 16384)
            if v % 8:
                raise NodeInputError(f"{name}={v} must be a multiple of 8 (latents are 1/8 of the image size)")
    if calibration_timesteps is not None:
        check_int("calibration_timesteps", calibration_timesteps, 0, 1000,
                  "0 keeps every recorded timestep; N keeps N timesteps spread over the run.")
    if time_bins is not None:
        check_int("time_bins", time_bins, TIME_BINS.lo, TIME_BINS.hi)
    if recon_iters is not None:
        check_int("recon_iters", recon_iters, RECON_ITERS.lo, RECON_ITERS.hi)
    if weight_init is not None:
        check_choice("weight_init", weight_init, WEIGHT_INITS)
    if precision is not None:
        check_choice("precision", precision, PRECISION.choices)
    if size_budget is not None:
        check_float("size_budget", size_budget, SIZE_BUDGET.lo, SIZE_BUDGET.hi)


def method_for_schedule(method: str, auto: bool) -> str:
    """The pipeline method for a Quantize UNet ``method`` with an auto (SNR) Bitwidth Schedule or without: that
    schedule is the pipeline's ``+mixed`` stage, added unless the method already names it."""
    method = ALIASES.get(method.strip(), method.strip())  # an old name ("ptqd") as the pipeline reads it
    return method + ("+mixed" if auto and "mixed" not in method.split("+") else "")


def quantize_model(model, positive, negative, settings: QuantizeSettings, schedule: Optional[ScheduleSpec] = None,
                   progress=None, text=None):
    """The node's work; returns the quantized MODEL (a clone) and the text report of the core's decisions.
    Every stage is named on the console and through ``text`` (see ``StageLog``)."""
    stages = StageLog("LowBit Quantize UNet", forward=progress, text=text, logger=log)
    try:
        quantized, report, summary = _quantize_model(model, positive, negative, settings, schedule, stages)
    except BaseException:
        stages.finish(failed=True)
        raise
    stages.finish()
    log.info("%s\n%s", summary, report)
    return quantized, report


def _quantize_model(model, positive, negative, settings, schedule, progress):
    from ..quant import PipelineConfig, QuantConfig, ReconConfig, pipeline, timestep_aware_subset

    check_schedule_with_bits(schedule, settings.bits)
    fp_unet = adapter.require_fp_unet(model)
    if progress.forward is None:
        progress.forward = adapter.NodeProgress()
    T = adapter.num_train_timesteps(model)
    auto = schedule is not None and schedule.mode == MODE_AUTO
    method = method_for_schedule(settings.method, auto)
    config = PipelineConfig(
        method=method, quant=QuantConfig.preset(settings.bits, time_bins=settings.time_bins,
                                                w_init=settings.weight_init),
        recon=ReconConfig(weight_iters=settings.recon_iters), precision=settings.precision,
        size_budget=settings.size_budget,
        schedule=schedule.to_schedule(adapter.percent_to_timestep_fn(model), T) if schedule and not auto else None,
        mixed_candidates=schedule.bits_used if auto else ())  # every setting checked here, before any work
    pipeline.check(fp_unet, None, config, alphas_cumprod=adapter.alphas_cumprod(model))

    calls = []
    if pipeline.needs_calls(config):
        log.info("LowBit Quantize UNet: %s %s, calibration: %d samples x %d steps at %dx%d (precision %s)",
                 settings.bits, config.method, settings.calibration_samples, settings.calibration_steps,
                 settings.calibration_width, settings.calibration_height, settings.precision)
        calls = adapter.record_unet_calls(
            model, positive, negative, steps=settings.calibration_steps, samples=settings.calibration_samples,
            seed=settings.seed, cfg=settings.cfg, width=settings.calibration_width,
            height=settings.calibration_height, progress=progress)
        if settings.calibration_timesteps:
            calls = timestep_aware_subset(calls, settings.calibration_timesteps)
    adapter.load_model(model)  # quantize the weights the float model runs with (LoRA patches merged)
    # ComfyUI runs nodes under inference mode: the checkpoint's tensors and the recorded calls are inference tensors.
    # The pipeline takes them as they are (no copy of the float UNet: for SDXL or a DiT that copy was the model's
    # size again); training stages (bases recon / efficientdm), which need autograd, get plain copies from
    # pipeline.run itself (quant.calib.for_training).
    res = pipeline.run(fp_unet, calls, config, alphas_cumprod=adapter.alphas_cumprod(model), num_train_timesteps=T,
                       progress=progress)
    report = "\n".join(pipeline.describe(res.model))
    summary = (f"LowBit: quantized the UNet to {settings.bits} ({config.method}) with {len(calls)} calibration calls "
               f"in {res.total_seconds:.1f} s")
    return adapter.attach_quantized_unet(model, res.model, merged=True), report, summary


class LowBitQuantizeUNet:
    DESCRIPTION = ("Quantize the MODEL's UNet to low-bit integers (W8A8, W4A8, W4A4, or weight-only W4A16). "
                   "Calibration runs this model with ComfyUI's own sampler on your conditioning and records the "
                   "UNet's inputs; activation ranges (and PTQD noise statistics with a '+ptqd' method such as "
                   "'lp+ptqd') come from "
                   "them. Outputs a quantized copy; the input MODEL stays usable for comparison. Use the PTQD "
                   "Sampler to also apply PTQD's variance correction.")
    CATEGORY = f"{CATEGORY}/quantize"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The quantized model (a clone; the input MODEL is unchanged).",
                       "Which layers run at which precision and why: with precision 'measured' (the default) the "
                       "layers whose quantization costs the most output error, kept at 8 bits or in float within "
                       "size_budget, with the measured numbers; with 'rules', the model's edge layers at 8 bits.")
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        methods = available_methods()
        return {"required": {
            "model": SOCKET("MODEL", "The full-precision model to quantize (e.g. from Load Checkpoint)."),
            "positive": SOCKET("CONDITIONING", "Calibration prompt: use prompts like the ones you will generate "
                                               "with; activation ranges are measured on them."),
            "negative": SOCKET("CONDITIONING", "Negative calibration prompt (used with cfg, as in KSampler)."),
            "bits": COMBO(BITS_PRESETS, "W4A8", "Weight and activation bits. W8A8: near-lossless. W4A8: 4-bit "
                                               "weights, the usual trade-off. W4A4: aggressive. W4A16: weight-only "
                                               "int4 (activations stay float, no activation calibration)."),
            "method": COMBO(methods, METHOD_PTQD,
                            "naive: min/max ranges, no correction. lp: clipped ranges (L_p search). recon: lp + "
                            "BRECQ/AdaRound block reconstruction (slow). efficientdm: lp + EfficientDM LoRA "
                            "distillation merged into the integers (slow). +ptqd: PTQD noise statistics, the "
                            "quantized UNet corrects its own output (bias and correlated noise). +vsc: the PTQD "
                            "Sampler also reduces injected noise by the residual variance. +mixed: activation bits "
                            "per timestep from measured SNR."),
            "calibration_steps": INT(10, CALIB_STEPS.lo, CALIB_STEPS.hi,
                                     "Sampling steps per calibration image. Every step is one "
                                     "recorded UNet call (timestep)."),
            "calibration_samples": INT(4, CALIB_SAMPLES.lo, CALIB_SAMPLES.hi,
                                       "Number of calibration images (each a full sampling run with "
                                       "seed, seed+1, ...). More = more robust ranges, slower."),
            "seed": INT(0, SEED.lo, SEED.hi, "Seed of the calibration runs (fixed: the result is reproducible).",
                        control_after_generate=False),
            "cfg": FLOAT(7.0, GUIDANCE.lo, GUIDANCE.hi,
                         "Guidance scale of the calibration runs; match what you sample with.",
                         step=0.1, round=0.01),
        }, "optional": {
            "bitwidth_schedule": SOCKET(SCHEDULE_TYPE, "Optional step-aware activation bits from Bitwidth Schedule "
                                                       "(LowBit); scales are calibrated for every bit-width it uses. "
                                                       "Not for W4A16."),
            "calibration_width": INT(512, 16, 16384, "Width of the calibration images in pixels (multiple of 8). "
                                                     "Use your generation size.", step=8, advanced=True),
            "calibration_height": INT(512, 16, 16384, "Height of the calibration images in pixels (multiple of 8).",
                                      step=8, advanced=True),
            "calibration_timesteps": INT(0, 0, 1000, "Keep only this many timesteps spread over the run "
                                                     "(timestep-aware subset); 0 keeps all.", advanced=True),
            "time_bins": INT(1, TIME_BINS.lo, TIME_BINS.hi,
                             "Activation scale tables per timestep range (1 = one scale per layer). "
                             "More bins follow the timestep-dependent activation ranges.",
                             advanced=True),
            "weight_init": COMBO(WEIGHT_INITS, "lp", "How weight step sizes are chosen. lp: per channel, the clipping "
                                 "that minimises the L2.4 rounding error (better; the slowest part of quantizing "
                                 "on a CPU). minmax: no clipping (fast, a bit worse at 4 bits).", advanced=True),
            "recon_iters": INT(200, RECON_ITERS.lo, RECON_ITERS.hi,
                               "Only for methods recon...: AdaRound iterations per block "
                               "(BRECQ uses 20000; slow on CPU).", advanced=True),
            "precision": COMBO(PRECISION.choices, "measured",
                               "Which layers stay at 8 bits or float. measured: each layer's output error is "
                               "measured on the calibration runs and the layers that hurt most are kept higher, "
                               "within size_budget (the report output lists them with the numbers). rules: the "
                               "model family's name rules (input/output layers, embeddings at 8 bits).",
                               advanced=True),
            "size_budget": FLOAT(0.03, SIZE_BUDGET.lo, SIZE_BUDGET.hi,
                                 "For precision=measured: bytes the plan may add over the uniform bit-width, as a "
                                 "fraction of the layers' fp16 size (0.03 = 3 %).", step=0.01, advanced=True),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    # Only what INPUT_TYPES cannot say: ComfyUI checks every other input against its declared range or choices
    # itself, one error on that input, while a VALIDATE_INPUTS message is attached to every input it names (one
    # bad seed showed as ten errors). method: also the names of earlier releases (not in the list);
    # width / height: multiples of 8. quantize() checks everything again before any work.
    @classmethod
    def VALIDATE_INPUTS(cls, method=None, calibration_width=None, calibration_height=None):
        return validation_result(check_quantize_settings, method=method, calibration_width=calibration_width,
                                 calibration_height=calibration_height)

    def quantize(self, model, positive, negative, bits, method, calibration_steps, calibration_samples, seed, cfg,
                 bitwidth_schedule=None, calibration_width=512, calibration_height=512, calibration_timesteps=0,
                 time_bins=1, recon_iters=200, weight_init="lp", precision="measured", size_budget=0.03,
                 unique_id=None):
        settings = QuantizeSettings(bits, method, calibration_steps, calibration_samples, seed, cfg,
                                    calibration_width, calibration_height, calibration_timesteps, time_bins,
                                    recon_iters, weight_init, precision, size_budget)
        check_quantize_settings(**settings.__dict__)
        return quantize_model(model, positive, negative, settings, bitwidth_schedule,
                              text=adapter.node_text_sink(unique_id))
