"""Transactions and numeric guards for the long calls (issue 15, items 2 and 4).

Every call that takes ``progress=`` (``calibrate_activations``, ``reconstruct``, ``reconstruct_activations``,
``collect_stats``, ``measure_snr``/``auto_schedule``, ``finetune``) and ``merge_`` run inside
``with transaction(qmodel, readonly=(fp_model,)):``. If anything escapes the block (a progress callback that
raises to cancel, ``KeyboardInterrupt``, a ``NumericalError``, a bug), every model given is put back exactly
as it was, so the input is bit-identical and a retry equals a clean run. Nothing is done on success.

What a snapshot holds (taken generically, no per-verb bookkeeping):

* every module reached from the models (``_modules``, recursively): a shallow copy of its ``__dict__``, so
  replaced attributes, parameters, buffers, submodules (AdaRound/QALoRA modifiers), hooks, flags such as
  ``training`` and ``mode`` come back by reference;
* every ``dict``/``list``/``set`` reached from those (the hook tables, ``_obs`` observation reservoirs, ...):
  its contents, recursively; ``torch.Generator`` objects: their state;
* LowBit's own plain objects reached from there (``QuantContext`` through the timestep hook, PTQD statistics,
  hooks): their ``__dict__``, recursively. Other objects are kept by reference only;
* every tensor: its storage (``.data``), ``requires_grad`` and ``.grad``; and a copy of its values, except
  for tensors LowBit never writes in place, which are kept by reference and checked by their version counter:
  the tensors of the ``readonly`` models (the float model, the teacher), the weights of quantized layers (a
  frozen tensor held by a quantized layer, its submodules or caches, with at least half as many elements as
  its weight: the float weight shared with the float model, packed, prepacked or reconstructed integers) and any
  tensor over ``CLONE_LIMIT_BYTES``.
  So a snapshot costs the small state (step sizes, tables, biases, norms), not a second model.

``check_finite(model, what)`` is the one numeric guard applied before a model is returned: NaN/Inf in any
floating tensor of a quantized layer (weights, step sizes, activation tables, bias, modifiers), a step size
that is not positive, or NaN/Inf in its PTQD statistics raise ``NumericalError`` naming the tensor.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from .errors import NumericalError

CLONE_LIMIT_BYTES = 256 << 20
_PKG = __name__.rsplit(".", 2)[0] + "."  # "lowbit." (or the name a host imported the pack under)


def _is_ours(obj) -> bool:
    mod = getattr(type(obj), "__module__", "") or ""
    return mod.startswith(_PKG) and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type))


def _weight_numel(module) -> Optional[int]:
    """Elements of a quantized layer's weight (None for other modules)."""
    from .layers import QuantLayer

    if not isinstance(module, QuantLayer):
        return None
    shape = getattr(module, "weight_shape", None)
    return math.prod(shape) if shape else None


class Snapshot:
    """The restorable state of ``models`` (see the module docstring); ``restore()`` puts it back."""

    def __init__(self, models: Iterable[nn.Module], readonly: Iterable[nn.Module] = ()):
        models = [m for m in models if m is not None]
        readonly = [m for m in readonly if m is not None]
        self._seen = {}  # id -> object (keeps every recorded object alive, so ids stay unique)
        self._objs: List[tuple] = []  # (object, copy of __dict__)
        self._dicts: List[tuple] = []
        self._lists: List[tuple] = []
        self._sets: List[tuple] = []
        self._gens: List[tuple] = []
        self._tensors: List[tuple] = []  # (tensor, data, values or None, version, requires_grad, grad)
        self._by_ref = set()
        for m in readonly:
            for t in list(m.parameters()) + list(m.buffers()):
                self._by_ref.add(id(t))
        for m in readonly + models:
            self._visit(m, None)

    # ---- taking ----------------------------------------------------------------------------------
    def _visit(self, v, wsize):
        """Record ``v`` and what it holds; ``wsize``: weight elements of the quantized layer ``v`` belongs to."""
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)) or id(v) in self._seen:
            return
        self._seen[id(v)] = v
        if isinstance(v, torch.Tensor):
            self._tensor(v, wsize)
        elif isinstance(v, nn.Module) or _is_ours(v):
            wsize = _weight_numel(v) or wsize
            d = dict(v.__dict__)
            self._objs.append((v, d))
            for x in d.values():
                self._visit(x, wsize)
        elif type(v) in (dict, OrderedDict):
            items = list(v.items())
            self._dicts.append((v, items))
            for _, x in items:
                self._visit(x, wsize)
        elif type(v) is list:
            self._lists.append((v, list(v)))
            for x in v:
                self._visit(x, wsize)
        elif type(v) is tuple:
            for x in v:
                self._visit(x, wsize)
        elif type(v) is set:
            self._sets.append((v, set(v)))
        elif isinstance(v, torch.Generator):
            self._gens.append((v, v.get_state()))

    def _tensor(self, t: torch.Tensor, wsize):
        if t.layout != torch.strided:  # opaque backend blobs (oneDNN prepacked weights): caches, by reference
            return
        data = t.data
        weight = wsize is not None and t.numel() * 2 >= wsize and not t.requires_grad
        keep = weight or id(t) in self._by_ref or t.numel() * t.element_size() > CLONE_LIMIT_BYTES
        values = None if keep else data.clone()
        # inference tensors (ComfyUI runs nodes under inference mode) have no version counter; they cannot be
        # written in place outside inference mode anyway
        version = None if t.is_inference() else t._version
        self._tensors.append((t, data, values, version, t.requires_grad, t.grad))

    # ---- restoring -------------------------------------------------------------------------------
    def restore(self):
        for obj, d in self._objs:
            obj.__dict__.clear()
            obj.__dict__.update(d)
        for dct, items in self._dicts:
            dct.clear()
            dct.update(items)
        for lst, items in self._lists:
            lst[:] = items
        for st, items in self._sets:
            st.clear()
            st.update(items)
        for g, state in self._gens:
            g.set_state(state)
        written = []
        with torch.no_grad():
            for t, data, values, version, req, grad in self._tensors:
                if not _same_view(t.data, data):
                    t.data = data
                if values is not None:
                    if not torch.equal(t.data, values):
                        t.data.copy_(values)
                elif version is not None and t._version != version:
                    written.append(tuple(t.shape))
                if t.is_leaf and t.requires_grad != req:
                    t.requires_grad_(req)
                if t.grad is not grad:
                    t.grad = grad
        if written:
            raise RuntimeError(f"LowBit internal error: {len(written)} weight tensor(s) (shapes {written[:3]}) were "
                               "written in place by a call that then failed, so its input could not be restored; "
                               "please report this")


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


class transaction:
    """``with transaction(qmodel, readonly=(fp_model,)):`` restores ``qmodel`` (and the readonly models' flags,
    hooks and references) when the block raises anything, ``KeyboardInterrupt`` included."""

    def __init__(self, *models: nn.Module, readonly: Iterable[nn.Module] = ()):
        self.models, self.readonly = models, tuple(readonly)
        self.snapshot: Optional[Snapshot] = None

    def __enter__(self):
        self.snapshot = Snapshot(self.models, self.readonly)
        return self.snapshot

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.snapshot.restore()
        self.snapshot = None
        return False


# ------------------------------------------------------------------------------------------- numerics
def _bad(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t).all())


def check_tensor(t: torch.Tensor, what: str, fix: str):
    """Raise ``NumericalError('<what> holds NaN/Inf; <fix>')`` when the floating tensor ``t`` is not finite."""
    if torch.is_tensor(t) and _bad(t.detach()):
        raise NumericalError(f"{what} holds NaN/Inf; {fix}")


FIX = ("check the float model's weights, the calibration data and the learning rates, and retry "
       "(the input model was left unchanged)")


def check_stats(stats, what: str):
    """NaN/Inf in PTQD statistics (``PTQDStats``: t, k, m, bias, var) raise ``NumericalError``."""
    if stats is None:
        return
    for name in ("t", "k", "m", "bias", "var"):
        check_tensor(getattr(stats, name, None), f"{what}: the PTQD table {name!r}", FIX)


def check_finite(model: nn.Module, what: str):
    """The guard before a quantized model is returned: every floating tensor of every quantized layer
    (weights, step sizes, activation tables, bias, AdaRound/QALoRA state) is finite, every step size is
    positive, and the PTQD statistics are finite; else ``NumericalError`` naming the first bad tensor."""
    from .context import get_context
    from .layers import QuantLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLayer):
            continue
        for tname, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            check_tensor(t, f"{what}: {name}.{tname}", FIX)
        for tname in ("w_scale", "w_scale_buf"):
            t = getattr(layer, tname, None)
            if torch.is_tensor(t) and t.numel() and not bool((t.detach() > 0).all()):
                raise NumericalError(f"{what}: {name}.{tname} holds a weight step size <= 0; {FIX}")
        act = getattr(layer, "act", None)
        if act is not None:
            for b in act.bits_set:
                s = act.table(b)[0]
                if s.numel() and not bool((s.detach() > 0).all()):
                    raise NumericalError(f"{what}: {name}.act.scale_{b} holds an activation step size <= 0; {FIX}")
    ctx = get_context(model)
    if ctx is not None:
        check_stats(getattr(ctx, "ptqd", None), what)
