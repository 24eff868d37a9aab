"""Calibration on a diffusers pipeline: which module is its denoiser, how it is called for one prompt, and the
denoiser's calls recorded while it generates. Works with any ``DiffusionPipeline`` whose denoiser is ``pipe.unet``
or ``pipe.transformer`` (the pipeline is duck-typed: nothing here imports diffusers). The command line's
``lowbit quantize --pipeline`` / ``lowbit generate`` are these calls::

    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    calls = record_pipeline_calls(pipe, ["a red fox in snow", "a city street at night"], steps=20)
    cfg = PipelineConfig.for_method("lp+ptqd", "W8A8")
    q = pipeline.run(denoiser_of(pipe), calls, cfg, **noise_schedule(pipe)).model
    with swapped_denoiser(pipe, q):
        image = pipe(**pipeline_call_kwargs(pipe, "a red fox in snow", steps=20, seed=0)).images[0]

A prompt is the pipeline's ``prompt`` (text-conditioned pipelines) or, for a class-conditional one (``DiTPipeline``:
``class_labels``), a class: a name of its ``id2label`` table or a number.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, List, Optional, Sequence

import torch

from .calib import Call, CallRecorder
from .errors import ConfigError

DENOISERS = ("transformer", "unet")  # the attribute names of a pipeline's denoiser, in the order looked up


def denoiser_name(pipe) -> str:
    """``"transformer"`` or ``"unet"``: the attribute of ``pipe`` that holds its denoiser; ConfigError if none."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ConfigError(f"{type(pipe).__name__} has no denoiser LowBit knows (a torch module at pipe.transformer or "
                      "pipe.unet); record its denoiser's calls yourself with CallRecorder(model)")


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser module (``pipe.transformer`` or ``pipe.unet``)."""
    return getattr(pipe, denoiser_name(pipe))


def _params(pipe) -> dict:
    """The parameters of ``pipe(...)`` (``pipe``: a pipeline or its class)."""
    return dict(inspect.signature((pipe if isinstance(pipe, type) else type(pipe)).__call__).parameters)


def conditioning(pipe) -> Optional[str]:
    """How the pipeline (or its class) takes what to generate: ``"prompt"`` (text), ``"class_labels"`` (a
    class-conditional pipeline such as ``DiTPipeline``), or None (an unconditional one)."""
    params = _params(pipe)
    for name in ("prompt", "class_labels"):
        if name in params:
            return name
    return None


def class_label(pipe, prompt) -> int:
    """The class id of ``prompt`` for a class-conditional pipeline: a number, or a name of its ``id2label`` table
    (``pipe.labels``); ConfigError naming the choices otherwise."""
    den = denoiser_of(pipe)
    n = getattr(getattr(den, "config", None), "num_embeds_ada_norm", None)
    labels = getattr(pipe, "labels", None) or {}
    text = str(prompt).strip()
    if text.isdigit():
        v = int(text)
        if n is not None and not 0 <= v < n:
            raise ConfigError(f"class {v} is out of range: {type(pipe).__name__} has classes 0..{n - 1}")
        return v
    if text in labels:
        return int(labels[text])
    some = ", ".join(repr(k) for k in list(labels)[:5])
    raise ConfigError(f"{text[:80]!r} is not a class of this {type(pipe).__name__}: give a class number"
                      + (f" in 0..{n - 1}" if n is not None else "")
                      + (f" or one of its label names, e.g. {some}" if some else " (it has no label names)"))


def pipeline_call_kwargs(pipe, prompt, *, steps: int, seed: int = 0, height: Optional[int] = None,
                         width: Optional[int] = None, guidance: Optional[float] = None,
                         output_type: Optional[str] = None) -> dict:
    """Keyword arguments of ``pipe(...)`` for one image of ``prompt`` with ``steps`` sampling steps and a CPU
    generator seeded with ``seed``; ``height`` / ``width`` / ``guidance`` (``guidance_scale``) / ``output_type``
    where given (None: the pipeline's own default). Refuses (ConfigError) what the pipeline does not take: a prompt
    for an unconditional pipeline, a size for one whose size is fixed by its model (DiT)."""
    params = _params(pipe)
    kw = {}
    how = conditioning(pipe)
    if how == "prompt":
        if prompt is None:
            raise ConfigError(f"{type(pipe).__name__} is text-conditioned: give a prompt")
        kw["prompt"] = prompt
    elif how == "class_labels":
        if prompt is None:
            raise ConfigError(f"{type(pipe).__name__} is class-conditional: give a class (a number or a label name)")
        kw["class_labels"] = [class_label(pipe, prompt)]
    elif prompt is not None:
        raise ConfigError(f"{type(pipe).__name__} takes no prompt or class (it is unconditional); calibrate it with "
                          "CallRecorder around pipe(...) yourself")
    if (height is not None or width is not None) and not {"height", "width"} <= set(params):
        raise ConfigError(f"{type(pipe).__name__} takes no height/width (its image size is fixed by its model); "
                          "leave the size at the pipeline's own")
    if height is not None:
        kw["height"] = height
    if width is not None:
        kw["width"] = width
    if guidance is not None:
        if "guidance_scale" not in params:
            raise ConfigError(f"{type(pipe).__name__} takes no guidance_scale; leave guidance at the pipeline's own")
        kw["guidance_scale"] = guidance
    if output_type is not None and "output_type" in params:
        kw["output_type"] = output_type
    kw["num_inference_steps"] = steps
    kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    return kw


def record_pipeline_calls(pipe, prompts: Sequence, *, steps: int = 25, seed: int = 0, height: Optional[int] = None,
                          width: Optional[int] = None, guidance: Optional[float] = None,
                          progress: Optional[Callable] = None, store_dtype=torch.float16) -> List[Call]:
    """The denoiser's calls (``CallRecorder``, one trajectory per prompt) while ``pipe`` generates one image per
    prompt with ``steps`` steps, prompt ``i`` with seed ``seed + i``; the VAE decode is skipped where the pipeline
    allows (``output_type="latent"``). ``progress(done, total, {"stage": "record calibration"})`` counts sampling
    steps (per prompt where the pipeline has no ``callback_on_step_end``) and may raise to cancel. Give prompts like
    the ones you will generate with: the activation ranges (and PTQD's statistics) are measured on these calls."""
    from .config import check_verb_args

    steps = check_verb_args("record_pipeline_calls", steps=steps)["steps"]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("record_pipeline_calls needs at least one prompt (or class, for a class-conditional "
                          "pipeline)")
    den = denoiser_of(pipe)
    total, done = len(prompts) * steps, [0]
    info = {"stage": "record calibration"}

    def on_step(_pipe, _i, _t, kwargs):
        done[0] = min(done[0] + 1, total)
        if progress is not None:
            progress(done[0], total, info)
        return kwargs

    with CallRecorder(den, store_dtype=store_dtype) as rec:
        for i, prompt in enumerate(prompts):
            kw = pipeline_call_kwargs(pipe, prompt, steps=steps, seed=seed + i, height=height, width=width,
                                      guidance=guidance, output_type="latent")
            if progress is not None and takes(pipe, "callback_on_step_end"):
                kw["callback_on_step_end"] = on_step
            rec.new_trajectory()
            pipe(**kw)
            if done[0] != (i + 1) * steps:  # (no step callback, or another count of steps than asked)
                done[0] = (i + 1) * steps
                if progress is not None:
                    progress(done[0], total, info)
    if not rec.calls:
        raise ConfigError(f"{type(pipe).__name__} never called its {denoiser_name(pipe)} while generating; "
                          "record the calls of the module that denoises with CallRecorder yourself")
    return rec.calls


def takes(pipe, *names) -> bool:
    """Whether ``pipe(...)`` (``pipe``: a pipeline or its class) takes every keyword of ``names``."""
    return set(names) <= set(_params(pipe))


def generate(pipe, prompt, *, steps: int = 25, seed: int = 0, height: Optional[int] = None,
             width: Optional[int] = None, guidance: Optional[float] = None, progress: Optional[Callable] = None,
             stage: str = "generate"):
    """One image (PIL) of ``prompt`` from ``pipe`` (``pipeline_call_kwargs``: ``steps``, ``seed``, size and
    guidance); ``progress(done, total, {"stage": stage})`` per sampling step where the pipeline has
    ``callback_on_step_end`` (else once at the end). The same seed gives the same starting noise with any
    denoiser (``swapped_denoiser``), so a full-precision and a quantized image can be compared."""
    kw = pipeline_call_kwargs(pipe, prompt, steps=steps, seed=seed, height=height, width=width, guidance=guidance,
                              output_type="pil")
    info, done = {"stage": stage}, [0]
    if progress is not None and takes(pipe, "callback_on_step_end"):
        def on_step(_pipe, _i, _t, kwargs):
            done[0] = min(done[0] + 1, steps)
            progress(done[0], steps, info)
            return kwargs

        kw["callback_on_step_end"] = on_step
    out = pipe(**kw)
    if progress is not None and done[0] != steps:
        progress(steps, steps, info)
    images = getattr(out, "images", None)
    if images is None and isinstance(out, (tuple, list)):
        images = out[0]
    if not images:
        raise ConfigError(f"{type(pipe).__name__} returned no images")
    return images[0]


def noise_schedule(pipe) -> dict:
    """``pipeline.run``'s ``alphas_cumprod`` (the scheduler's, None for a flow-matching scheduler, which has none)
    and ``num_train_timesteps`` (the scheduler config's; None: the library's 1000)."""
    sched = getattr(pipe, "scheduler", None)
    ac = getattr(sched, "alphas_cumprod", None)
    T = getattr(getattr(sched, "config", None), "num_train_timesteps", None)
    ac = ac.float() if torch.is_tensor(ac) and ac.dim() == 1 and len(ac) > 1 else None
    return dict(alphas_cumprod=ac, num_train_timesteps=int(T) if isinstance(T, int) and T > 1 else
                (len(ac) if ac is not None else None))


@contextlib.contextmanager
def swapped_denoiser(pipe, model: torch.nn.Module):
    """``pipe`` generates with ``model`` (e.g. the quantized denoiser) inside the block; its own denoiser is put
    back afterwards, also on an error."""
    name = denoiser_name(pipe)
    own = getattr(pipe, name)
    setattr(pipe, name, model)
    try:
        yield pipe
    finally:
        setattr(pipe, name, own)
