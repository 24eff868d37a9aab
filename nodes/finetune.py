"""The "EfficientDM LoRA Fine-tune" node: distil the full-precision UNet into the quantized one.

Data: the float MODEL samples ``samples`` images with ComfyUI's own sampler on the given conditioning while
its UNet calls are recorded (as in Quantize UNet). Training: ``quant.efficientdm.finetune`` (QALoRA adapters
on the quantized layers, TALSQ activation tables, scale-aware learning rates, MSE to the teacher's noise
prediction). Then ``merge_`` folds the adapters into the integer weights (exact), ``deploy_`` packs them, and
PTQD statistics are measured again if the input had them. Output: a clone of the quantized MODEL running the
fine-tuned UNet, and the loss curve as an IMAGE.
"""
from __future__ import annotations

import logging
import math
from typing import List

import torch

from . import comfy_adapter as adapter
from ..quant import side_paths as lora_side
from .common import CATEGORY, FLOAT, INT, SOCKET, NodeInputError, StageLog, check_float, check_int, validation_result

log = logging.getLogger("lowbit.nodes")



def check_finetune_settings(steps=None, rank=None, lr_scale=None, seed=None, samples=None, sampling_steps=None,
                            cfg=None, width=None, height=None, batch_size=None, act_lr=None):
    if steps is not None:
        check_int("steps", steps, 1, 1_000_000)
    if rank is not None:
        check_int("rank", rank, 1, 1024, "Typical ranks are 4..64.")
    if lr_scale is not None:
        check_float("lr_scale", lr_scale, 1e-6, 100.0, "1.0 is the automatic scale-aware learning rate; lower it "
                                                       "if the loss diverges.")
    if seed is not None:
        check_int("seed", seed, 0, 0xffffffffffffffff)
    if samples is not None:
        check_int("samples", samples, 1, 1024)
    if sampling_steps is not None:
        check_int("sampling_steps", sampling_steps, 1, 1000)
    if cfg is not None:
        check_float("cfg", cfg, 0.0, 100.0)
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            check_int(name, v, 16, 16384)
            if v % 8:
                raise NodeInputError(f"{name}={v} must be a multiple of 8")
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, 4096)
    if act_lr is not None:
        check_float("act_lr", act_lr, 0.0, 1.0)


class LossTracker:
    """Progress callback that keeps the loss of every step and forwards to the node's progress bar."""

    def __init__(self, progress):
        self.progress, self.losses = progress, []

    def __call__(self, done, total, info=None):
        info = info or {}
        if info.get("stage") == "fine-tune" and "loss" in info:
            self.losses.append(float(info["loss"]))
        self.progress(done, total, info)


def loss_curve_image(losses: List[float], width: int = 640, height: int = 360, title: str = "EfficientDM loss"):
    """Loss per step drawn with PIL: IMAGE tensor float [1, H, W, 3]. Log scale when the range is > 10x."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    d.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    d.text((left, 8), title, fill=(230, 230, 230))
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        d.text((left + 10, (top + bottom) // 2), "no loss values", fill=(230, 120, 120))
    else:
        lo, hi = min(finite), max(finite)
        log_scale = lo > 0 and hi / lo > 10
        f = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
        flo, fhi = f(lo), f(hi)
        span = (fhi - flo) or 1.0
        n = len(losses)

        def xy(i, v):
            x = left + (right - left) * (i / max(n - 1, 1))
            y = bottom - (bottom - top) * ((f(v) - flo) / span)
            return x, y

        for k in range(5):  # horizontal grid + labels
            y = top + (bottom - top) * k / 4
            d.line([left, y, right, y], fill=(50, 50, 58))
            val = fhi - span * k / 4
            val = 10 ** val if log_scale else val
            d.text((4, y - 6), f"{val:.3g}", fill=(170, 170, 180))
        pts = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        smooth = n >= 10  # the loss depends strongly on the batch's timestep: show a moving average too
        if len(pts) == 1:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(255, 170, 60))
        else:
            d.line(pts, fill=(120, 90, 50) if smooth else (255, 170, 60), width=1 if smooth else 2)
        if smooth:
            ema, avg, k = [], None, 2.0 / (min(max(n // 10, 5), 100) + 1)
            for i, v in enumerate(losses):
                if math.isfinite(v):
                    avg = v if avg is None else avg + k * (v - avg)
                    ema.append(xy(i, avg))
            if len(ema) > 1:
                d.line(ema, fill=(255, 190, 80), width=2)
        d.text((left, bottom + 8), "step 1", fill=(170, 170, 180))
        d.text((right - 90, bottom + 8), f"step {n}", fill=(170, 170, 180))
        d.text((left + 150, 8), f"first {losses[0]:.4g}  last {losses[-1]:.4g}" + ("  (log y)" if log_scale else ""),
               fill=(200, 200, 200))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (t.float() / 255.0).unsqueeze(0)


def finetune_model(fp_model, quantized_model, positive, negative, *, steps, rank, lr_scale, seed, samples=4,
                   sampling_steps=10, cfg=7.0, width=512, height=512, batch_size=8, act_lr=5e-4, progress=None,
                   text=None):
    from ..quant import FinetuneConfig, PipelineConfig, get_stats
    from ..quant.io import model_fingerprint

    teacher = adapter.require_fp_unet(fp_model, "fp_model (the teacher)")
    q = adapter.require_quantized_unet(quantized_model, "quantized_model")
    if model_fingerprint(teacher) != model_fingerprint(q):
        raise NodeInputError("quantized_model was not made from fp_model's architecture (their layers differ); "
                             "connect the same checkpoint's MODEL to fp_model and to Quantize UNet")
    # PTQD statistics describe the error before fine-tuning: measured again when the input had them
    config = PipelineConfig(method="efficientdm+ptqd" if get_stats(q) is not None else "efficientdm",
                            finetune=FinetuneConfig(steps=steps, rank=rank, lr_multiplier=lr_scale, act_lr=act_lr,
                                                    batch_size=batch_size, sampling_steps=sampling_steps,
                                                    guidance=cfg, seed=seed))
    # every stage (calibration sampling, fine-tune, merge, PTQD statistics) named on the console and, through
    # ``text``, on the node (StageLog)
    stages = StageLog("LowBit EfficientDM Fine-tune", forward=progress or adapter.NodeProgress(), text=text, logger=log)
    try:
        out = _finetune(fp_model, quantized_model, positive, negative, teacher, q, config, stages, steps=steps,
                        samples=samples, sampling_steps=sampling_steps, seed=seed, cfg=cfg, width=width,
                        height=height)
    except BaseException:
        stages.finish(failed=True)
        raise
    stages.finish()
    return out


def _finetune(fp_model, quantized_model, positive, negative, teacher, q, config, progress, *, steps, samples,
              sampling_steps, seed, cfg, width, height):
    from ..quant import pipeline

    tracker = LossTracker(progress)
    calls = adapter.record_unet_calls(fp_model, positive, negative, steps=sampling_steps, samples=samples, seed=seed,
                                      cfg=cfg, width=width, height=height, progress=progress)
    adapter.load_model(fp_model)
    # ComfyUI runs nodes under torch.inference_mode(), so the checkpoint's tensors and the recorded calls are
    # inference tensors, which autograd may not save for backward. Train on a plain copy of the (small,
    # deployed) quantized UNet and of the calls; the shared input UNet is not touched. The teacher is copied
    # too (its weights as plain views of the host's memory, not duplicated: calib.plain_copy): the core's
    # transactions record the version counter of every tensor they may restore or read, which inference
    # tensors do not have.
    with adapter.training_mode():
        q_train = adapter.copy_quantized(q)
        lora_side.clear_side_paths(q_train)  # a user LoRA side path must not be trained into the student
        res = pipeline.run(adapter.plain_copy(teacher), adapter.plain_calls(calls), config, start=q_train,
                           progress=tracker)
    student = res.model
    lora_side.clear_side_paths(student)
    # each step trains at one timestep, whose loss scale differs by orders of magnitude: compare the means of the
    # first and last quarter of the run (first -> last step alone compared two different timesteps)
    ls = tracker.losses
    k = max(1, len(ls) // 4)
    log.info("LowBit: EfficientDM fine-tune done (%d steps, mean loss of the first %d -> last %d steps: %.4g -> %.4g)",
             steps, k, k, sum(ls[:k]) / k if ls else float("nan"), sum(ls[-k:]) / k if ls else float("nan"))
    return adapter.attach_quantized_unet(quantized_model, student), loss_curve_image(tracker.losses)


class LowBitEfficientDMFinetune:
    DESCRIPTION = ("EfficientDM: fine-tune a quantized UNet by distilling the full-precision one, with "
                   "quantization-aware LoRA adapters (QALoRA) and per-timestep activation step sizes (TALSQ). "
                   "Training data are the float model's own sampling runs on your conditioning (no dataset). "
                   "The adapters are merged into the integer weights, so the result runs as fast as any "
                   "quantized model. Outputs the fine-tuned MODEL and the loss curve. Cancel stops it and leaves "
                   "the inputs unchanged.")
    CATEGORY = f"{CATEGORY}/quantize"
    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("model", "loss_curve")
    OUTPUT_TOOLTIPS = ("The fine-tuned quantized model (a clone of quantized_model).",
                       "Training loss per step (MSE to the teacher's noise prediction).")
    FUNCTION = "fine_tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fp_model": SOCKET("MODEL", "The full-precision model (teacher), the one Quantize UNet started from."),
            "quantized_model": SOCKET("MODEL", "The quantized model to fine-tune (output of Quantize UNet or "
                                               "Load Quantized UNet)."),
            "positive": SOCKET("CONDITIONING", "Prompt(s) for the teacher's sampling runs that provide the training "
                                               "inputs; use prompts like the ones you will generate with."),
            "negative": SOCKET("CONDITIONING", "Negative prompt for those runs."),
            "steps": INT(100, 1, 1_000_000, "Training steps (each one batch of recorded UNet inputs at one "
                                            "timestep). EfficientDM uses thousands; a few hundred already help."),
            "rank": INT(8, 1, 1024, "LoRA rank of the adapters (merged into the integers afterwards, so it only "
                                    "costs training memory)."),
            "lr_scale": FLOAT(1.0, 1e-6, 100.0, "Multiplier on the scale-aware LoRA learning rate (each layer: "
                                                "its mean weight step size x a factor chosen from the steps, rank "
                                                "and layer size so the adapters can move the integer weights). "
                                                "Lower it if the loss curve rises.", step=0.05),
            "seed": INT(0, 0, 0xffffffffffffffff, "Seed of the teacher's runs, adapter init and batch order.",
                        control_after_generate=False),
        }, "optional": {
            "samples": INT(4, 1, 1024, "Teacher sampling runs that provide training inputs.", advanced=True),
            "sampling_steps": INT(10, 1, 1000, "Steps of each teacher run (each step = one recorded timestep).",
                                  advanced=True),
            "cfg": FLOAT(7.0, 0.0, 100.0, "Guidance scale of the teacher runs.", step=0.1, advanced=True),
            "width": INT(512, 16, 16384, "Width of the teacher runs in pixels.", step=8, advanced=True),
            "height": INT(512, 16, 16384, "Height of the teacher runs in pixels.", step=8, advanced=True),
            "batch_size": INT(8, 1, 4096, "Rows (latents) per training step, all at one timestep.", advanced=True),
            "act_lr": FLOAT(5e-4, 0.0, 1.0, "Learning rate of the per-timestep activation step sizes (TALSQ); 0 "
                                            "keeps them fixed.", step=0.0001, round=1e-6, advanced=True),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    # Only what INPUT_TYPES cannot say (multiples of 8); ComfyUI checks the other inputs' declared ranges itself,
    # one error per bad input (a VALIDATE_INPUTS message is attached to every input it names). fine_tune() checks
    # everything again before any work.
    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        return validation_result(check_finetune_settings, width=width, height=height)

    def fine_tune(self, fp_model, quantized_model, positive, negative, steps, rank, lr_scale, seed, samples=4,
                 sampling_steps=10, cfg=7.0, width=512, height=512, batch_size=8, act_lr=5e-4, unique_id=None):
        check_finetune_settings(steps, rank, lr_scale, seed, samples, sampling_steps, cfg, width, height, batch_size,
                                act_lr)
        return finetune_model(fp_model, quantized_model, positive, negative, steps=steps, rank=rank,
                              lr_scale=lr_scale, seed=seed, samples=samples, sampling_steps=sampling_steps, cfg=cfg,
                              width=width, height=height, batch_size=batch_size, act_lr=act_lr,
                              text=adapter.node_text_sink(unique_id))
