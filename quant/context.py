"""The per-model quantization context: which timestep the UNet is at, which activation bits apply.

A forward pre-hook on the root module keeps the timestep argument of the UNet call (diffusers
``forward(sample, timestep, ...)``, ComfyUI/Forge ``forward(x, timesteps, ...)``) here; a quantized layer with
per-timestep activation scales or scheduled bits reads it (``QuantContext.t``, converted on the first read of
each call, so a model that needs no timestep never makes the host wait for a GPU tensor). Nothing depends on a
call counter (the fault of EfficientDM's TALSQ, docs/PAPERS.md section E), so classifier-free guidance in
one or two calls, multi-evaluation samplers, img2img and any step count all pick the same scales for the
same timestep.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import BitwidthSchedule


class QuantContext:
    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        self._t: Optional[float] = None  # the timestep on the tables' scale (``t``)
        self._t_call = None  # (raw timestep argument, profile) of the latest call, read into ``_t`` on demand
        self.a_bits_override: Optional[int] = None
        self.schedule: Optional[BitwidthSchedule] = None
        self.observing = False  # calibration: layers record activation statistics
        self.quant_enabled = True  # False: quantized layers behave like their float originals (fake mode only)
        self.float_layers: frozenset = frozenset()  # these layers behave like their float originals (fake mode;
        #                                             the sensitivity pass quantizes one layer at a time)
        self.act_enabled = True  # False: weights quantized, activations float (BRECQ's weight pass)
        self.ptqd_active = False  # the output hook applies PTQD correction (set by ptqd.attach_stats)
        # What the model was built with: the one home of per-model state (saved with the model by ``io.save``).
        self.config = None  # QuantConfig
        self.splits: dict = {}  # split convolution name -> input-channel sizes (``split.py``)
        self.ptqd = None  # PTQDStats (``ptqd.attach_stats``)
        self.finetune_info: Optional[dict] = None  # EfficientDM provenance (``efficientdm.finetune``)
        self.profile: Optional[str] = None  # name of the model profile (``profiles/``)
        self.host_state: dict = {}  # a host adapter's bookkeeping (e.g. which LoRA patches are applied)
        self.report: list = []  # per-layer precision decisions with their reasons (``pipeline``/``sensitivity``)

    @property
    def t(self) -> Optional[float]:
        """The current timestep on the [0, T) scale of the per-timestep tables, or None.

        The model's timestep hook only keeps the call's timestep argument; it is read (a host synchronisation when
        it is a GPU tensor) the first time something asks: a table with several timestep entries, a bit-width
        schedule, calibration, PTQD. A model whose layers need no timestep (one activation scale each) never
        synchronises, so CUDA graphs and ``torch.compile`` can hold its forward."""
        if self._t_call is not None:
            raw, profile = self._t_call
            self._t_call = None
            value = timestep_value(raw, profile)
            if value is not None:  # an empty timestep keeps the previous one, as before
                self._t = value
        return self._t

    @t.setter
    def t(self, value: Optional[float]):
        self._t_call = None
        self._t = value

    def note_call_timestep(self, raw) -> None:
        """Keep a call's raw timestep argument (tensor or number) for :attr:`t` to read when asked."""
        if raw is not None:  # detached: a kept graph would make the model impossible to deep-copy
            self._t_call = (raw.detach() if torch.is_tensor(raw) else raw, self.profile)

    def a_bits_for(self, default: int) -> int:
        if self.a_bits_override is not None:
            return self.a_bits_override
        if self.schedule is not None and self.t is not None and default != 16:
            return self.schedule.a_bits_at(self.t)
        return default


def _profile(profile):
    from .profiles import get_profile

    return profile if profile is not None and not isinstance(profile, str) else get_profile(profile)


_SLOTS: dict = {}  # (model class, timestep keyword names) -> (positional index, parameter name or None, by name)


def timestep_slot(model_cls, names) -> tuple:
    """Where a positional call of ``model_cls`` passes its timestep: ``(index, name, True)`` for the first positional
    parameter of its ``forward`` named like one of ``names`` (the profile's timestep keywords), else like any name a
    timestep goes by (``profiles.TIMESTEP_NAMES``), so ``forward(x, y, t)`` reads ``t``, not the class label; else the
    convention ``forward(sample, timestep, ...)``: ``(1, name, False)``, with the name the signature gives it (None
    when it cannot be read). Per class and names, computed once."""
    key = (model_cls, tuple(names))
    slot = _SLOTS.get(key)
    if slot is None:
        import inspect

        slot = (1, None, False)
        try:
            params = list(inspect.signature(model_cls.forward).parameters.values())[1:]  # (without self)
        except (TypeError, ValueError):
            params = []
        positional = []
        for prm in params:
            if prm.kind not in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
                break  # (*args or keyword-only: no further positions have names)
            positional.append(prm.name)
        from .profiles import TIMESTEP_NAMES

        hit = next((i for i, n in enumerate(positional) if n in names), None)
        if hit is None:
            hit = next((i for i, n in enumerate(positional) if n in TIMESTEP_NAMES), None)
        if hit is not None:
            slot = (hit, positional[hit], True)
        elif len(positional) > 1:
            slot = (1, positional[1], False)
        _SLOTS[key] = slot
    return slot


def _numeric(v) -> bool:
    """``v`` holds numbers a timestep can be: a real number (Python's or numpy's), or a float / integer tensor."""
    import numbers

    if torch.is_tensor(v):
        return v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalar_like(v, args) -> bool:
    """``v`` can be a timestep where nothing names it so (the positional convention's second argument): a number,
    or a tensor of one value per sample at most (0-d or 1-d, no more values than the batch): never the text embedding
    a model takes second. (A parameter named like a timestep is read whatever its shape: per-token [B, S] or
    per-frame timesteps, by their median, as keyword ones are.)"""
    if not _numeric(v):
        return False
    if not torch.is_tensor(v):
        return True
    batch = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() > 0 else None
    return v.dim() <= 1 and (batch is None or v.numel() <= batch)


def timestep_source(args, kwargs, profile=None, model=None) -> tuple:
    """``(name, value)`` of the timestep argument of a model call: the first of the profile's timestep keywords given,
    else the positional argument at :func:`timestep_slot` of ``model``'s class (index 1 without a model) when it is
    scalar-like; ``(None, None)`` when the call has none. ``name``: the keyword or the parameter's name (None when
    unknown)."""
    p = _profile(profile)
    for k in p.timestep_kwargs:
        if k in kwargs and kwargs[k] is not None:
            return k, kwargs[k]
    i, name, by_name = (1, None, False) if model is None else timestep_slot(type(model), p.timestep_kwargs)
    if len(args) > i and args[i] is not None and (_numeric(args[i]) if by_name else _scalar_like(args[i], args)):
        return name, args[i]
    return None, None


def raw_timestep_of_call(args, kwargs, profile=None, model=None):
    """The timestep argument of a model call as given (tensor or number; None when the call has none); ``model``:
    the called model, whose ``forward`` signature says where a positional call passes it (:func:`timestep_slot`)."""
    return timestep_source(args, kwargs, profile, model)[1]


def timestep_value(t, profile=None) -> Optional[float]:
    """A raw timestep argument on the [0, T) scale of the per-timestep tables (a host read for a GPU tensor)."""
    if t is None:
        return None
    if torch.is_tensor(t):
        if t.numel() == 0:
            return None
        # A batch shares one timestep in every sampler we know (cond and uncond are evaluated at the same
        # t); with mixed timesteps the median is used for the activation scale.
        t = float(t.detach().float().flatten().median())
    elif hasattr(t, "item") and not isinstance(t, (int, float)):  # a numpy scalar
        t = t.item()
    return _profile(profile).table_key(t)


def timestep_of_call(args, kwargs, profile=None, model=None) -> Optional[float]:
    """The timestep of a model call on the [0, T) scale of the per-timestep tables (``profile``: a
    ``ModelProfile`` or its name, giving the keyword names and the scale; None: the generic convention; ``model``:
    the called model, see :func:`raw_timestep_of_call`)."""
    return timestep_value(raw_timestep_of_call(args, kwargs, profile, model), profile)


def sample_of_call(args, kwargs, profile=None) -> Optional[torch.Tensor]:
    """The noisy input x_t of a model call: the first positional tensor, or the profile's sample keyword (a list of
    per-sample inputs of one shape, as diffusers' Z-Image takes, stacked into a batch)."""
    from .calib import stacked

    for v in ([args[0]] if args else []) + [kwargs.get(k) for k in _profile(profile).sample_kwargs]:
        v = stacked(v)
        if torch.is_tensor(v):
            return v
    return None


class TimestepHook:
    """Forward pre-hook object (deep-copies together with the model and its context)."""

    def __init__(self, ctx: QuantContext):
        self.ctx = ctx

    def __call__(self, module, args, kwargs):
        self.ctx.note_call_timestep(raw_timestep_of_call(args, kwargs, self.ctx.profile, module))
        return None


def attach_context(model: torch.nn.Module, ctx: QuantContext) -> QuantContext:
    """Install ``ctx`` on ``model`` through its timestep hook (the hook *is* the model's link to its state:
    it is copied by ``copy.deepcopy`` with the model, and no attribute is set on any module)."""
    if get_context(model) is not None:
        raise ValueError("this model already has a LowBit quantization context")
    if ctx.profile is None:
        from .profiles import profile_for

        ctx.profile = profile_for(model).name
    model.register_forward_pre_hook(TimestepHook(ctx), with_kwargs=True)
    return ctx


def _timestep_hook(model: torch.nn.Module):
    for hid, h in getattr(model, "_forward_pre_hooks", {}).items():
        if isinstance(h, TimestepHook):
            return hid, h
    return None, None


def get_context(model: torch.nn.Module) -> Optional[QuantContext]:
    """The model's ``QuantContext`` (None for a model LowBit did not quantize)."""
    _, h = _timestep_hook(model)
    return None if h is None else h.ctx


def move_context(src: torch.nn.Module, dst: torch.nn.Module) -> QuantContext:
    """Move the context of ``src`` to ``dst`` (``quantize_``): only LowBit's own hook moves, so the user's
    hooks on either model keep their registration (and their calling convention)."""
    hid, h = _timestep_hook(src)
    if h is None:
        raise ValueError("source model has no LowBit context")
    del src._forward_pre_hooks[hid]
    src._forward_pre_hooks_with_kwargs.pop(hid, None)
    return attach_context(dst, h.ctx)
