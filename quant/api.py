"""The verbs: ``quantize`` (naive PTQ baseline), ``quantize_`` (in place), ``deploy_``, ``weight_bytes``.

PTQD reconstruction/correction (``ptqd.py``) and EfficientDM fine-tuning (``efficientdm.py``) start from a
model returned by ``quantize``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import List, Optional

import torch
import torch.nn as nn

from .calib import Call, run_calls
from .config import ACT_BITS_NONE, DEFAULT_COPY_BUDGET_MB, BitwidthSchedule, QuantConfig, check_verb_args
from .context import QuantContext, attach_context, get_context, move_context
from .errors import ConfigError
from .fuse import fuse_activations_
from .layers import QuantLayer, qlayer_class_for, quant_layers
from .policy import plan_layers
from .progress import Stage
from .split import apply_splits, probe_layers
from .transaction import check_finite, transaction


def structural_copy(model: nn.Module) -> nn.Module:
    """Deep copy that shares (does not duplicate) the weight memory of Conv2d/Linear layers, which the quantized
    layers replace anyway; everything else (norms, embeddings, buffers) is copied. The copy's weights are its own
    Parameter objects over that memory: a layer the plan keeps in float is not the user's layer, so casting or
    moving the quantized model (``.to(torch.bfloat16)``, ``.cuda()``, which swap a parameter's data) leaves the
    user's model as it was. A weight a host made under ``torch.inference_mode()`` (Forge loads checkpoints there,
    with ``requires_grad`` left on) gets its Parameter made in that mode too, as the host's was: outside it torch
    refuses ``requires_grad=True`` on an inference tensor (Forge's LowBit tab quantizes from a gradio thread)."""
    memo = {}
    for m in model.modules():
        if qlayer_class_for(m) is not None and not isinstance(m, QuantLayer):
            w = m.weight
            with torch.inference_mode(True) if w.is_inference() else contextlib.nullcontext():
                memo[id(w)] = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
    return copy.deepcopy(model, memo)


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# what a model raises when a recorded call does not fit it (another model's calls, wrong shapes or keywords)
CALL_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError)


@contextlib.contextmanager
def calls_must_fit():
    """Around the float model's first run of a recorded call: a failure there is a ConfigError saying the calls do
    not fit (before any work), running out of memory excepted (not a mismatch)."""
    try:
        yield
    except CALL_ERRORS as exc:
        if "out of memory" in str(exc).lower():  # (torch.OutOfMemoryError)
            raise
        raise ConfigError(f"the recorded calls do not fit this model: the float model fails on the first one "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); record the calls with "
                          "CallRecorder around a sampling run of this model") from exc


_SIGMA_WARNED = set()  # model classes warned about (once per process: the pipeline quantizes more than once)


def _warn_sigma_keys(prof, calib, model, num_train_timesteps: int = 1000) -> None:
    """A model whose profile keys its timesteps as received (no scale, no offset: an unknown model, or a known class
    called another way, e.g. Sana Sprint's transformer) called with timesteps that all lie in [0, 1] (sigma, or
    t / T): its per-timestep tables (activation scales, PTQD statistics) are keyed on [0, T), so every step would
    share one entry. Or called with sigma itself (a keyword or parameter named so) over decades, keyed linearly: the
    low-noise steps share the first entries. Said once per class, with the way out; the quantization goes on (a
    model may really take such timesteps on its own scale)."""
    from .context import timestep_source
    from .profiles import SIGMA_NAMES

    cls = type(model).__name__
    keys = {round(float(c.t), 6) for c in (calib or []) if getattr(c, "t", None) is not None}
    if not keys or cls in _SIGMA_WARNED:
        return
    as_received = prof.timestep_scale == 1.0 and prof.timestep_offset == 0.0 and not prof.timestep_log
    source = timestep_source(calib[0].args, calib[0].kwargs, prof, model)[0] if calib else None
    if min(keys) < 0 or max(keys) > num_train_timesteps:
        msg = (f"LowBit: this model's recorded timesteps give table keys outside [0, {num_train_timesteps}] "
               f"({min(keys):g}..{max(keys):g}; e.g. SVD and Cosmos are called with 0.25 * log(sigma)): its "
               "per-timestep tables (activation scales, PTQD statistics) are keyed on [0, T), so their steps land in "
               "the wrong entries; quantize it with time_bins=1 and without +ptqd, or register a ModelProfile for its "
               "class that maps its timestep onto [0, T) (quant/profiles/)")
    elif as_received and len(keys) > 1 and max(keys) <= 1.0:
        whose = "no model profile knows its scale" if prof.name == "generic" else (
            f"its profile ({prof.name}) takes timesteps as received")
        msg = (f"LowBit: this model's recorded timesteps all lie in [0, 1] ({min(keys):g}..{max(keys):g}) and "
               f"{whose}, so its per-timestep tables put every step in one entry; register a ModelProfile with "
               "timestep_scale=1000 for its class (quant/profiles/) or pass profile= naming one that fits (e.g. "
               "'flux' for sigma-called packed-token transformers)")
    elif as_received and source in SIGMA_NAMES and len(keys) > 1 and max(keys) > 100 * max(min(keys), 1e-12):
        msg = (f"LowBit: this model is called with {source}={min(keys):g}..{max(keys):g} (a noise level over "
               "decades) and its per-timestep tables take it linearly, so the low-noise steps share the first "
               "entries; register a ModelProfile for its class with timestep_log=True mapping ln(sigma) onto "
               "[0, 1000] (quant/profiles/score_sde.py is one)")
    else:
        return
    import warnings

    _SIGMA_WARNED.add(cls)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _validate_model(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module (a UNet), got {type(model).__name__}")
    if get_context(model) is not None or any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ConfigError("this model is already quantized by LowBit; pass the full-precision model "
                          "(quantizing twice would compound the error)")
    layers = [(n, m) for n, m in model.named_modules() if qlayer_class_for(m) is not None]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv2d or Linear layers to quantize; "
                          "is this the UNet (diffusion model) and not a wrapper or a VAE?")
    meta = next((n for n, m in layers if getattr(m, "weight", None) is not None and m.weight.is_meta), None)
    if meta is not None:
        raise ConfigError(f"layer {meta!r} has its weight on the meta device (never loaded, or offloaded by "
                          "accelerate hooks); quantize a model whose weights are real tensors: load them "
                          "(load_state_dict(..., assign=True), from_pretrained without a meta device map) or "
                          "quantize before enabling CPU offload")


def quantize(model: nn.Module, config: QuantConfig, calib: Optional[List[Call]] = None, *,
             schedule: Optional[BitwidthSchedule] = None, a_bits_candidates=(), num_train_timesteps: int = 1000,
             profile: Optional[str] = None, progress=None) -> nn.Module:
    """Return a quantized copy of ``model`` (fake-quant mode; ``deploy_`` packs it). ``model`` is not changed.

    Naive post-training quantization: weight step sizes by ``config.w_init`` (min/max or the L_p search),
    static activation ranges from ``calib`` (UNet calls recorded along full-precision trajectories, see
    ``calib.CallRecorder``), one set per timestep bin when ``config.time_bins > 1``, one per bit-width of
    ``schedule``.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    num_train_timesteps = check_verb_args("quantize", num_train_timesteps=num_train_timesteps)["num_train_timesteps"]
    _validate_model(model)
    static_act = config.a_bits != ACT_BITS_NONE and not config.a_dynamic
    if static_act and not calib:
        raise ConfigError(f"{config.name} with static activation scales needs calibration data: record UNet calls "
                          "with lowbit.quant.CallRecorder during a full-precision sampling run (or use a_dynamic=True "
                          "or a weight-only format such as W4A16)")
    bits_set = tuple(sorted({config.a_bits} | {int(b) for b in a_bits_candidates}))
    if a_bits_candidates and config.a_bits == ACT_BITS_NONE:
        raise ConfigError(f"a_bits_candidates need quantized activations; {config.name} is weight-only")
    if schedule is not None:
        if config.a_bits == ACT_BITS_NONE:
            raise ConfigError("a BitwidthSchedule switches activation bits; it cannot be used with weight-only "
                              f"{config.name}")
        bits_set = tuple(sorted(set(schedule.bits_used) | set(bits_set)))

    from .calib import keyed
    from .profiles import resolve_profile

    prof = resolve_profile(model, profile)
    if calib:
        calib = keyed(calib, model, prof)
        if config.time_bins > 1 or schedule is not None:
            from .calib import require_timesteps

            require_timesteps(model, calib, prof, "time_bins > 1" if config.time_bins > 1 else "a bit-width schedule")
    _warn_sigma_keys(prof, calib, model, num_train_timesteps)
    time_bins = max(config.time_bins, prof.min_time_bins)  # (a family's floor: ModelProfile.min_time_bins)
    qmodel = structural_copy(model)
    splits, called = {}, None
    if calib:  # one probe pass: the convolutions that read a channel concatenation (split for their own
        # activation scales) and the layers that run their own forward (the others, whose parent reads their
        # weight directly, stay float: deployed layers have no float weight)
        convs = ([p.name for p in plan_layers(qmodel, config, prof) if p.mode != "fp" and p.kind == "conv"]
                 if static_act and config.split_concat else [])
        with calls_must_fit():
            called, splits = probe_layers(qmodel, calib[0], [n for n, m in qmodel.named_modules()
                                                             if n and qlayer_class_for(m) is not None], convs)
        apply_splits(qmodel, splits)
        called |= {f"{n}.parts.{i}" for n, sizes in splits.items() for i in range(len(sizes))}
    all_plans = plan_layers(qmodel, config, prof, called=called)
    plans = [p for p in all_plans if p.mode != "fp"]
    ctx = QuantContext(num_train_timesteps)
    ctx.profile = prof.name
    ctx = attach_context(qmodel, ctx)
    ctx.schedule = schedule
    ctx.config = config  # (layers read the weight format it names)
    with Stage(progress, len(plans), "quantize weights") as st:
        for p in plans:
            src = qmodel.get_submodule(p.name)
            cls = qlayer_class_for(src)
            special = p.mode == "w8a8"
            layer = cls(src, w_bits=p.w_bits, a_bits=p.a_bits, group_size=p.group_size,
                        a_dynamic=config.a_dynamic and p.a_bits != ACT_BITS_NONE, ctx=ctx,
                        a_bits_set=(p.a_bits,) if special else bits_set, time_bins=time_bins,
                        w_init=config.w_init, name=p.name, scheduled=not special)
            _set_module(qmodel, p.name, layer)
            st.step()
    ctx.splits = dict(splits)
    ctx.report = [dict(name=p.name, kind=p.kind, mode=p.mode, w_bits=p.w_bits, a_bits=p.a_bits, reason=p.reason)
                  for p in all_plans if p.mode != "quant"]
    if static_act:
        calibrate_activations(qmodel, calib, method=config.a_init, progress=progress)
    qmodel.eval()
    check_finite(qmodel, "quantize")
    return qmodel


def calibrate_activations(qmodel: nn.Module, calib: List[Call], method: str = "lp", progress=None):
    """(Re)compute the static activation step sizes of every quantized layer from ``calib``.

    Weights are fake-quantized while observing, so each layer sees the inputs the quantized model gives it.
    Transactional: cancelled (``progress`` raising, ``KeyboardInterrupt``) or failing (``NumericalError`` for
    NaN/Inf in an activation or a resulting scale), ``qmodel`` is left bit-identical (no stale observations), so
    a retry equals a clean run. Observations left by anything else are discarded first.
    """
    from .transaction import check_finite, transaction

    ctx = get_context(qmodel)
    if ctx is None:
        raise ConfigError("calibrate_activations needs a LowBit quantized UNet (lowbit.quant.quantize) as qmodel")
    if not calib:
        raise ConfigError("calibrate_activations needs recorded UNet calls (CallRecorder around a full-precision "
                          "sampling run)")
    acts = [layer.act for _, layer in quant_layers(qmodel) if layer.act is not None]
    with transaction(qmodel):
        for act in acts:  # every observation comes from this call
            act._obs, act._gen = None, None
        ctx.observing = True
        try:
            with Stage(progress, len(calib), "calibrate activations") as st:
                run_calls(qmodel, calib, progress=lambda i, n: st.step())
        finally:
            ctx.observing = False
        for act in acts:
            act.finish_observation(method)
        check_finite(qmodel, "calibrate_activations")


def quantize_(model: nn.Module, config: QuantConfig, calib=None, **kw) -> nn.Module:
    """In-place variant: the quantized layers are swapped into ``model`` only after everything succeeded,
    so an error or a cancellation leaves ``model`` untouched."""
    q = quantize(model, config, calib, **kw)
    ctx = get_context(q)
    for name in ctx.splits:  # split convolutions first: their parts are set with them
        _set_module(model, name, q.get_submodule(name))
    for name, layer in quant_layers(q):
        _set_module(model, name, layer)
    move_context(q, model)  # only LowBit's timestep hook moves; the user's hooks stay as they were registered
    return model


def deploy_(qmodel: nn.Module, tune: bool = True,
            copy_budget_mb: Optional[float] = DEFAULT_COPY_BUDGET_MB) -> nn.Module:
    """Pack every quantized layer into integers (drops the float weights); computes through kernels.
    A failure part-way (e.g. no kernel for a layer) leaves the model as it was, not half deployed.

    ``tune`` (default on): choose each layer's kernel by measured speed for its shape at its first call
    (kernels/autotune.py), falling back to the float path of the same integers where integer kernels lose (small
    layers, where a float GEMM beats an integer one plus the activation quantizer). The copies this keeps (a float
    copy for the float path, an int8 copy of an int4 weight) are bounded per model by ``copy_budget_mb`` (None: no
    bound): a layer is tuned only if its copies fit in what is left, else it runs its registry kernel on the packed
    integers, as with ``tune=False``. A small model is tuned whole (its copies are a few MB); a large one keeps its
    packed size but for the budget. ``kernels.autotune.summary(model)`` reports the choice and the bytes."""
    check_tune_args("deploy_", tune, copy_budget_mb)
    with transaction(qmodel):
        for _, layer in quant_layers(qmodel):
            layer.deploy()
    fuse_activations_(qmodel)  # a GELU after a Linear runs in its kernel's epilogue (quant/fuse.py)
    if tune:
        tune_kernels_(qmodel, copy_budget_mb)
    return qmodel


def check_tune_args(verb: str, tune, copy_budget_mb) -> None:
    """The kernel-tuning arguments of ``deploy_`` and the loaders, checked before any work."""
    if not isinstance(tune, bool):
        raise ConfigError(f"{verb}: tune must be True or False, got {tune!r}")
    if copy_budget_mb is not None and (isinstance(copy_budget_mb, bool) or not isinstance(copy_budget_mb, (int, float))
                                       or not 0 <= copy_budget_mb < float("inf")):
        raise ConfigError(f"{verb}: copy_budget_mb must be a number of MiB >= 0 or None (no bound), got "
                          f"{copy_budget_mb!r}")


def tune_kernels_(qmodel: nn.Module, copy_budget_mb: Optional[float] = DEFAULT_COPY_BUDGET_MB) -> nn.Module:
    """Arm the kernel autotuner on every deployed layer of ``qmodel``, its copies within ``copy_budget_mb`` (what
    ``deploy_`` does by default, and ``load`` / ``load_model`` for the models they build)."""
    from ..kernels import autotune

    return autotune.attach_model(qmodel, budget_bytes=None if copy_budget_mb is None else int(copy_budget_mb * 2**20))


def undeploy_(qmodel: nn.Module) -> nn.Module:
    for _, layer in quant_layers(qmodel):
        layer.undeploy()
    return qmodel


def kernel_copy_bytes(model: nn.Module) -> int:
    """Bytes the kernels keep now next to a deployed model's packed weights (oneDNN's prepacked blobs, int8 copies of
    int4 weights, the autotuner's float copies; at most the copy budget for the tuned layers, see ``deploy_``)."""
    pws = [layer.packed_weight() for _, layer in quant_layers(model) if layer.mode == "deployed"]
    return sum(pw.nbytes(include_cache=True) - pw.nbytes(include_cache=False) for pw in pws)


def weight_bytes(model: nn.Module, only_quantized_layers: bool = False) -> int:
    """Bytes of weights: packed integers + scales for quantized layers, storage bytes for the rest (what the model
    holds whether or not it has run; the kernels' copies built at its calls: ``kernel_copy_bytes``)."""
    total = 0
    qnames = set()
    for name, layer in quant_layers(model):
        total += layer.weight_bytes()
        qnames.add(name)
    if only_quantized_layers:
        return total
    for name, m in model.named_modules():
        if name in qnames or isinstance(m, QuantLayer) or any(name.startswith(q + ".") for q in qnames):
            continue  # a quantized layer's own submodules (packed weight, activation tables) are counted above
        for p in m.parameters(recurse=False):
            total += p.numel() * p.element_size()
        for b in m.buffers(recurse=False):
            total += b.numel() * b.element_size()
    # the quantized layers' own non-weight tensors (bias, activation tables)
    for _, layer in quant_layers(model):
        if layer.bias is not None:
            total += layer.bias.numel() * 4
    return total
