"""Calibration data: the UNet's own inputs recorded along full-precision sampling trajectories.

The recorder hooks the model (not a sampler), so any sampler, guidance mode or host works: every call of
the UNet during sampling is one record (x_t, timestep, conditioning, ...), stored in fp16 on the CPU (a tensor
with values beyond fp16's range keeps its own dtype: storing never turns a finite value into an infinity).
``timestep_aware_subset`` then keeps records from timesteps spread uniformly over the trajectory
(Q-Diffusion's timestep-aware calibration, docs/PAPERS.md A4).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .context import timestep_of_call
from .errors import NumericalError


_RECORD_WHAT = "a UNet input recorded for calibration"
_RECORD_FIX = "the float model or the sampler produced non-finite values — fix the model/settings and retry"


def _store_tensor(v: torch.Tensor, dtype, what: str = _RECORD_WHAT, fix: str = _RECORD_FIX) -> torch.Tensor:
    """``v`` detached on the CPU in ``dtype``, or in its own dtype where ``dtype`` cannot hold a value (a finite
    7e4 would become Inf in fp16): storing never turns finite values into infinities. NaN/Inf in ``v`` raise
    ``NumericalError``."""
    v = v.detach()
    if v.is_floating_point():
        if not torch.isfinite(v).all():
            raise NumericalError(f"NaN/Inf in {what}; {fix}")
        if dtype is not None and dtype != v.dtype:
            c = v.to(dtype)
            v = c if bool(torch.isfinite(c).all()) else v  # out of range of ``dtype``: keep the wider dtype
    # contiguous: channels_last tensors from oneDNN convs crashed conv backward later (torch 2.13 CPU)
    return v.cpu().contiguous()


def map_tensors(tree, fn):
    """``tree`` (nested dicts / lists / tuples) with every tensor replaced by ``fn(tensor)``; other values kept."""
    if torch.is_tensor(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(x, fn) for k, x in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(x, fn) for x in tree)
    return tree


def _to_store(v, dtype, what: str = _RECORD_WHAT, fix: str = _RECORD_FIX):
    return map_tensors(v, lambda t: _store_tensor(t, dtype, what, fix))


def _to_model(v, device, dtype):
    return map_tensors(v, lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device))


@dataclass
class Call:
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    t: Optional[float]
    step: int = 0  # index of the sampling step within its trajectory
    profile: Optional[str] = None  # the model profile ``t`` was keyed with (None: the model's own, profile_for)

    def to(self, device, dtype):
        return _to_model(self.args, device, dtype), _to_model(self.kwargs, device, dtype)


def keyed(calls, model, profile=None) -> list:
    """``calls`` keyed for ``profile`` (a name, a ``ModelProfile``, or None: ``model``'s own): a recorder keys each
    call's timestep with the profile its model matched; a run under another profile (``profile=``) looks its
    per-timestep tables up with that profile's map, so the calls' keys must follow it, or PTQD's statistics and the
    timestep groups land on keys the model never looks up (found by audit). Calls already keyed that way are kept
    as they are; the others, and calls that do not say how they were keyed (recorded before calls did, or made by
    hand), are read again from their stored arguments (fp16 where recorded in fp16; a call whose arguments give no
    timestep keeps its own ``t``)."""
    from .profiles import resolve_profile

    want = resolve_profile(model, profile)
    out = []
    for c in calls:
        if getattr(c, "profile", None) == want.name:
            out.append(c)
            continue
        t = timestep_of_call(c.args, c.kwargs, want, model)
        out.append(dataclasses.replace(c, t=c.t if t is None else t, profile=want.name))
    return out


def require_timesteps(model, calls, profile, what: str) -> None:
    """ConfigError, before any work, when no recorded call of ``model`` carries a timestep that ``profile`` can
    read (``calls`` keyed for it): ``what`` (PTQD's statistics, EfficientDM's timestep groups, per-timestep ranges)
    would put every step under one key, or fail deep inside (found by audit: k-diffusion's ``model(x, sigma=...)``
    and Stable Cascade's ``timestep_ratio`` before their names were known)."""
    if not calls or any(c.t is not None for c in calls):
        return
    from .context import timestep_slot
    from .errors import ConfigError
    from .profiles import resolve_profile

    prof = resolve_profile(model, profile)
    i, name, by_name = timestep_slot(type(model), prof.timestep_kwargs)
    nth = {0: "1st", 1: "2nd", 2: "3rd"}.get(i, f"{i + 1}th")
    if by_name:
        where = f"its {nth} positional parameter {name!r} was not given or holds no numbers"
    elif name:
        where = (f"no parameter of its forward is named like one, and its {nth} positional parameter {name!r} is "
                 "not a timestep (more than one value per sample)")
    else:
        where = "its forward takes no named positions"
    raise ConfigError(f"{what} needs the timestep of every call, and the recorded calls of {type(model).__name__} "
                      f"carry none that the {prof.name} profile reads (keywords {', '.join(prof.timestep_kwargs)}; "
                      f"{where}): call the model with its timestep under one of those keywords, or pass profile= "
                      "naming a profile that reads it, or use lp or recon without +ptqd, time_bins=1")


class CallRecorder:
    """``with CallRecorder(unet) as rec: run_any_sampler(unet)``; then ``rec.calls``.

    ``skip_keys``: keyword arguments not to store (e.g. host objects such as ComfyUI's transformer_options
    are kept by reference only when they contain no tensors).
    """

    def __init__(self, model: torch.nn.Module, store_dtype=torch.float16, max_calls: int = 100000):
        from .profiles import profile_for

        self.model, self.store_dtype, self.max_calls = model, store_dtype, max_calls
        self._profile = profile_for(model)  # the timestep's keyword and scale (the tables' [0, T) convention)
        self.calls: List[Call] = []
        self._handle = None
        self._last_t = None
        self._step = -1

    def _hook(self, module, args, kwargs):
        if len(self.calls) >= self.max_calls:
            return None
        t = timestep_of_call(args, kwargs, self._profile, module)
        if t != self._last_t:
            self._step += 1
            self._last_t = t
        self.calls.append(Call(_to_store(args, self.store_dtype), _to_store(kwargs, self.store_dtype), t, self._step,
                               self._profile.name))
        return None

    def new_trajectory(self):
        self._last_t = None
        self._step = -1

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def timestep_aware_subset(calls: List[Call], n_timesteps: int) -> List[Call]:
    """Keep the calls of ``n_timesteps`` timesteps chosen uniformly over the recorded range of t."""
    from .config import check_verb_args

    n_timesteps = check_verb_args("timestep_aware_subset", calib_steps=n_timesteps)["calib_steps"]
    ts = sorted({c.t for c in calls if c.t is not None}, reverse=True)
    if not ts:
        return list(calls)
    if n_timesteps >= len(ts):
        keep = set(ts)
    else:
        idx = [round(i * (len(ts) - 1) / max(n_timesteps - 1, 1)) for i in range(n_timesteps)]
        keep = {ts[i] for i in idx}
    return [c for c in calls if c.t in keep]


def batch_rows(tree, idx, n: int):
    """Rows ``idx`` of every tensor in ``tree`` (nested dicts/lists/tuples) whose leading dimension is the batch
    size ``n``; other tensors and values unchanged. (A non-batch tensor whose first dimension happens to equal
    ``n``, e.g. Flux ``txt_ids`` of shape (n, 3), would be sliced too: record calls with a batch size unlike the
    models' token counts.)"""
    return map_tensors(tree, lambda t: t[idx] if t.dim() > 0 and t.shape[0] == n else t)


def probe_call(model: torch.nn.Module, call: "Call", pre_hooks: Dict[str, Callable], context=None) -> None:
    """Run ``model`` once on the recorded ``call`` (no grad, inside ``context`` if given) with a forward pre-hook
    ``fn(name, module, args)`` on each named submodule of ``pre_hooks`` (its return value is ignored: the inputs
    are never replaced); every hook is removed again, also on an error. The one structural probe pass behind
    ``split.probe_layers`` (split convolutions and called layers, one pass for ``quantize``) and
    ``recon.find_units``."""
    def wrap(name, fn):
        def hook(mod, args):
            fn(name, mod, args)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(wrap(n, fn)) for n, fn in pre_hooks.items()]
    dev, dt = model_device_dtype(model)
    try:
        a, kw = call.to(dev, dt)
        with torch.no_grad(), (context if context is not None else contextlib.nullcontext()):
            model(*a, **kw)
    finally:
        for h in handles:
            h.remove()


def model_device_dtype(model: torch.nn.Module):
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def run_calls(model, calls: List[Call], progress=None, fn=None):
    """Run ``model`` on each recorded call (no grad); ``fn(call, output)`` sees each output."""
    device, dtype = model_device_dtype(model)
    with torch.no_grad():
        for i, c in enumerate(calls):
            args, kwargs = c.to(device, dtype)
            out = model(*args, **kwargs)
            if fn is not None:
                fn(c, out)
            if progress is not None:
                progress(i + 1, len(calls))


_NEEDS_PREDICTION = ("the PTQD correction, EfficientDM and the measured precision plan need a denoiser's prediction; "
                     "quantize it with method lp or recon and precision='rules'")


def prediction_key(out: dict):
    """The key of a dict output that holds the prediction (a tensor, or per-sample tensors of one shape): ``"sample"``
    (diffusers' name), else the dict's only entry holding any tensor (a researcher model's ``{"x": pred}``); None
    where that is ambiguous (several entries hold tensors, none is ``"sample"``: a ControlNet's ``ControlNetOutput``
    holds its down residuals beside one mid residual) or there is none."""
    if torch.is_tensor(stacked(out.get("sample"))):
        return "sample"
    keys = [k for k, v in out.items() if _has_tensor(v)]
    return keys[0] if len(keys) == 1 and torch.is_tensor(stacked(out[keys[0]])) else None


def unet_output(out) -> torch.Tensor:
    """The prediction tensor of a UNet call (diffusers returns an object with ``.sample`` or a tuple; a plain dict is
    read at ``prediction_key``); a list of per-sample predictions of one shape (diffusers' Z-Image) is stacked into a
    batch."""
    if torch.is_tensor(out):
        return out
    v = None
    if hasattr(out, "sample"):
        v = stacked(out.sample)
    elif isinstance(out, (tuple, list)) and out:
        v = stacked(out[0])
    elif isinstance(out, dict) and (k := prediction_key(out)) is not None:
        v = stacked(out[k])
    if torch.is_tensor(v):
        return v
    if isinstance(v, (tuple, list)) and v and all(torch.is_tensor(t) for t in v):
        raise TypeError(f"the model returns {len(v)} tensors of different shapes, not one prediction (an output "
                        f"of another kind: a ControlNet's residuals, features, ...): {_NEEDS_PREDICTION}")
    what = type(out).__name__ + (f" with keys {list(out)[:8]}" if isinstance(out, dict) else "")
    raise TypeError(f"cannot read the prediction from a model output of type {what}: {_READABLE} (or wrap the model "
                    "so it does); without a readable prediction, quantize it with method lp or recon and "
                    "precision='rules' (PTQD, EfficientDM and the measured precision plan read the prediction)")


def prediction_outputs(out) -> List[torch.Tensor]:
    """Every prediction a call returns: :func:`unet_output`'s first, then each further floating tensor of at least 2
    dimensions with its batch size that a tuple / list output (first element a tensor) or a diffusers output object
    (beside ``.sample``) holds: LTX-2 returns its audio prediction beside the video one, which the measured precision
    plan must see (found by audit: its audio projection was quantized unmeasured, 15x the video's error)."""
    first = unet_output(out)
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        rest = list(out[1:])
    elif torch.is_tensor(getattr(out, "sample", None)) and callable(getattr(out, "items", None)):
        rest = [v for k, v in out.items() if k != "sample"]
    else:
        rest = []
    return [first] + [v for v in rest if torch.is_tensor(v) and v.is_floating_point() and v.dim() >= 2
                      and v.shape[0] == first.shape[0]]


_READABLE = ("return the prediction as a tensor, as the first element of a tuple / list, as .sample of an object, or "
             "in a dict under 'sample' or as its only tensor")


def check_prediction(out, sample) -> None:
    """``out`` (a model call's output) holds one prediction per sample of ``sample`` (the call's noisy input): a
    TypeError saying what it holds otherwise (a ControlNet's residuals, a transformer's token logits, a tuple of
    block outputs)."""
    pred = unet_output(out)
    if sample is not None and (pred.dim() != sample.dim() or pred.shape[0] != sample.shape[0]):
        raise TypeError(f"the model's output {list(pred.shape)} is not one prediction per sample of its input "
                        f"{list(sample.shape)} (an output of another kind: a ControlNet's residuals, token logits, "
                        f"features, ...): {_NEEDS_PREDICTION}")


def stacked(v):
    """``v`` itself, or a non-empty list / tuple of tensors of one shape stacked along a new batch dimension."""
    if isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v) \
            and all(t.shape == v[0].shape for t in v):
        return torch.stack(list(v))
    return v


def _has_tensor(v, pred=None) -> bool:
    """``v`` (nested dicts / lists / tuples) holds a tensor (for which ``pred`` holds, when given)."""
    if torch.is_tensor(v):
        return pred is None or bool(pred(v))
    if isinstance(v, dict):
        return any(_has_tensor(x, pred) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x, pred) for x in v)
    return False


def sanitize_calls(calls: List[Call], key: str = "transformer_options") -> List[Call]:
    """Keep only the tensor-free entries of a host's per-call options dict (ComfyUI's and Forge's
    ``transformer_options``): the sigma tables and cond marks in there are per-run bookkeeping of the host's
    sampler, and the UNet adds its own keys at every call."""
    for c in calls:
        to = c.kwargs.get(key)
        if isinstance(to, dict):
            c.kwargs[key] = {k: v for k, v in to.items() if not _has_tensor(v)}
    return calls


# ---------------------------------------------------------------------------------------- hosts' inference mode
# Hosts load checkpoints and sample under ``torch.inference_mode()`` (ComfyUI runs every node there, Forge loads
# models and generates there). Tensors made there (the checkpoint, the recorded calls) cannot be saved for
# backward, so training stages (reconstruction, EfficientDM) and the precision plan's screen run inside
# ``training_mode`` on plain copies of the calls and plain views of the model (its weights not duplicated).

def plain_calls(calls):
    """Copies of recorded calls made outside inference mode (see ``training_mode``)."""
    import dataclasses

    return [dataclasses.replace(c, args=map_tensors(c.args, torch.Tensor.clone),
                                kwargs=map_tensors(c.kwargs, torch.Tensor.clone)) for c in calls]


class training_mode:
    """Inference mode off and gradients on for the block (a host may run its callbacks under
    ``torch.inference_mode()``); copies made inside it (:func:`plain_copy`, :func:`plain_calls`) are plain tensors."""

    def __enter__(self):
        self._stack = [torch.inference_mode(False), torch.enable_grad()]
        for c in self._stack:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self._stack):
            c.__exit__(*exc)
        return False


def plain_view(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over ``t``'s memory (no copy; call outside inference mode): an inference tensor seen as one
    autograd may save for backward. Writing it writes ``t``: only for tensors the caller reads."""
    v = torch.empty(0, dtype=t.dtype, device=t.device)
    return v.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _viewable(t: torch.Tensor) -> bool:
    return t.is_inference() and t.layout == torch.strided and type(t) in (torch.Tensor, nn.Parameter)


def plain_copy(unet):
    """A copy of a float UNet whose tensors are plain (call inside ``training_mode``). Parameters and buffers a host
    made under ``torch.inference_mode()`` are not duplicated: the copy's are plain tensors over the same memory
    (:func:`plain_view`; the copy of an SDXL UNet or a DiT was the model's size again, on the host's device). The
    stages that take such a copy read its float weights and never write them (training writes the quantized
    model's own tensors: rounding variables, LoRA factors, scales; the transactions check that the rest is
    unchanged); other tensors are copied as before."""
    import copy

    memo = {}
    with torch.inference_mode(False):
        for m in unet.modules():
            for t in itertools.chain(m._parameters.values(), m._buffers.values()):
                if t is not None and id(t) not in memo and _viewable(t):
                    v = plain_view(t.detach())
                    memo[id(t)] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else v
    return copy.deepcopy(unet, memo)


def plain_module(module):
    """``module``, or a plain copy of it (:func:`plain_copy`: its inference weights seen, not copied) if it holds
    inference tensors (call inside ``training_mode``; the module itself where none is needed)."""
    if any(t.is_inference() for t in itertools.chain(module.parameters(), module.buffers())):
        return plain_copy(module)
    return module


def for_training(unet, calls):
    """``(unet, calls)`` that training stages can use (call inside ``training_mode``): plain copies of whichever
    holds inference tensors (the model's weights as plain views of the same memory), the objects themselves
    otherwise."""
    if any(_has_tensor((c.args, c.kwargs), torch.Tensor.is_inference) for c in calls):
        calls = plain_calls(calls)
    return plain_module(unet), calls
