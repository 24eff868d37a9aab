"""Activation epilogues at deployment: a deployed Linear whose output feeds only a GELU takes the GELU in.

A transformer's feed-forward is Linear -> GELU -> Linear. Run as the model's code runs it, the GELU is a separate
pass over the hidden activations (on a 2-core CPU, torch's tanh GELU costs more than the int8 Linear before it);
oneDNN's int8 Linear applies it in its epilogue, on the accumulator it already holds (kernels/post.py). So at
deployment (``deploy_``, ``load``) the module that runs the pair is replaced by one that calls the Linear with the
activation (``layer(x, post=...)``), the same children under the same names (state-dict keys do not change). While a
forward hook watches the layer (a LoRA side path adds to the Linear's output, before the activation), the layer
returns its plain output and the caller applies the activation (``QuantLayer.post_now``): the model computes the same
function either way. Only patterns whose data flow is certain are taken, and none whose activation module has hooks:

* an ``nn.Sequential`` (exactly that class: its forward is known) with a quantized Linear followed by an ``nn.GELU``
  (ComfyUI's Flux / MM-DiT MLPs, LDM feed-forwards): replaced by a ``FusedSequential`` of the same children, which
  calls the Linear with the GELU and skips the GELU module. A Linear called from elsewhere too gets its plain output
  there (the activation is passed per call, not stored on the layer);
* diffusers' ``GELU`` module (``activations.GELU``: ``gelu(self.proj(x))``, the "gelu" / "gelu-approximate"
  feed-forwards of SD3, Flux, PixArt, DiT, HunyuanDiT, ...) and the ``GEGLU`` modules of diffusers, ComfyUI, Forge
  and A1111 (``a * gelu(g)`` of ``proj(x)``'s halves: SD1.x / SDXL transformer blocks), replaced by a
  ``ProjWithActivation`` with the same ``proj`` child;
* the pairs a model profile declares (``ModelProfile.act_epilogues``: block class, Linear child, activation child;
  diffusers' Flux single-stream block's ``proj_mlp`` -> ``act_mlp``), whose block code calls the two itself: there the
  layer keeps the activation (``QuantLayer.set_post``) and a ``MovedActivation`` stands in the activation's place.

Fusing is idempotent (a fused pattern no longer matches) and survives ``undeploy_`` (the fake layers apply the same
activations). ``LOWBIT_FUSE_ACT=0`` turns it off (read at deployment).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch.nn as nn

from .layers import QuantLinear


def _call(layer: QuantLinear, x, post: str):
    """``post(layer(x))``: in the layer's kernel call unless a hook watches it (then applied here)."""
    watched = layer.post_now(post) is None
    y = layer(x, post=None if watched else post)
    return _post().apply(y, post) if watched else y


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose Linear -> GELU pairs run as one call. The pairs are held by identity (``pairs``:
    Linear -> (the GELU module after it, activation)), out of the module tree; the GELU stays a child (same children,
    same keys). Each call checks that the GELU still follows its Linear and has no hooks (global ones included):
    a Sequential edited after deployment (a child replaced, deleted, inserted; a hook added) runs as a plain one
    where it changed. A slice is a plain computation over the same modules (no pairs)."""

    def __init__(self, *args, pairs=None):
        super().__init__(*args)
        self._pairs = [dict(pairs or {})]  # id(Linear) -> (Linear, GELU module, activation); a list: no state

    def forward(self, input):
        x, skip = input, False
        mods = list(self._modules.values())
        pairs = self._pairs[0]
        for i, m in enumerate(mods):
            if skip:
                skip = False
                continue
            pair = pairs.get(id(m))
            if (pair is not None and pair[0] is m and i + 1 < len(mods) and mods[i + 1] is pair[1]
                    and not _hooked(pair[1]) and not _global_hooks()):
                x, skip = _call(m, x, pair[2]), True
            else:
                x = m(x)
        return x

    @property
    def fused(self) -> dict:
        """{position: activation} of the pairs that run as one call now."""
        mods = list(self._modules.values())
        out = {}
        for i, m in enumerate(mods[:-1]):
            pair = self._pairs[0].get(id(m))
            if pair is not None and pair[0] is m and mods[i + 1] is pair[1]:
                out[i] = pair[2]
        return out

    def extra_repr(self):
        return f"Linear -> GELU run as one call at {self.fused}"


class MovedActivation(nn.Module):
    """Stands where an activation module was, after the activation moved into the Linear ``layer`` before it:
    returns its input, or the activation of it when the layer did not apply it to this call (``post_now``: a hook
    watches the layer). ``into``: the layer's qualified name; ``post``: the activation (kernels/post.py)."""

    def __init__(self, layer: QuantLinear, into: str, post: str):
        super().__init__()
        self._layer = [layer]  # (a list: the layer stays out of this module's tree; it lives in its own place)
        self.into, self.post = into, post

    def forward(self, x):
        return x if self._layer[0].post_now() is not None else _post().apply(x, self.post)

    def extra_repr(self):
        return f"moved into {self.into!r} as {self.post}"


class ProjWithActivation(nn.Module):
    """diffusers' ``GELU`` (``gelu(proj(x))``) or a ``GEGLU`` (``a * gelu(g)`` of ``proj(x)``'s halves; diffusers' and
    ComfyUI's) whose activation moved into ``proj``: returns ``proj(x)``. (Extra arguments, which diffusers' GEGLU
    accepts and ignores, are ignored.)"""

    def __init__(self, proj: QuantLinear, post: str):
        super().__init__()
        self.proj, self.post = proj, post

    def forward(self, hidden_states, *args, **kwargs):
        return _call(self.proj, hidden_states, self.post)

    def extra_repr(self):
        return f"activation moved into proj as {self.post}"


def _post():
    from ..kernels import post

    return post


def _post_of(module: nn.Module):
    """The epilogue of a plain ``nn.GELU`` (exactly that class), else None."""
    from ..kernels import post

    return post.of_gelu(module.approximate) if type(module) is nn.GELU else None


def _deployed_linear(module) -> bool:
    return isinstance(module, QuantLinear) and module.mode == "deployed" and module.post is None


def _hooked(module: nn.Module) -> bool:
    """Hooks on an activation module (they would not run once the activation moves)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


# the modules whose ``GEGLU`` is ``x, gate = self.proj(x).chunk(2, dim=-1); return x * F.gelu(gate)`` (read in each):
# diffusers, ComfyUI, Forge's integrated UNet, A1111's LDM / SGM UNets
_GEGLU_MODULES = ("diffusers.models.activations", "comfy.ldm.modules.attention", "backend.nn.unet",
                  "ldm.modules.attention", "sgm.modules.attention")


def _proj_activation(module: nn.Module):
    """The epilogue of a known ``act(proj(x))`` module: diffusers' ``GELU`` (its ``approximate``), the ``GEGLU`` of
    the modules above (exactly those classes, by name and module), else None."""
    from ..kernels import post

    t = type(module)
    if not isinstance(getattr(module, "proj", None), nn.Module):
        return None
    if t.__name__ == "GELU" and t.__module__ == "diffusers.models.activations":
        return post.of_gelu(getattr(module, "approximate", None))
    if t.__name__ == "GEGLU" and t.__module__ in _GEGLU_MODULES:
        return "geglu"
    return None


def fuse_activations_(model: nn.Module) -> List[str]:
    """Move every GELU that follows a deployed Linear in one of the patterns above into that Linear; -> the Linears'
    qualified names. Nothing changes with ``LOWBIT_FUSE_ACT=0``."""
    from ..kernels import post
    from ..kernels.registry import env_flag
    from .profiles import profile_for

    if not env_flag("LOWBIT_FUSE_ACT", True):
        return []
    pairs = {}
    for cls, lin, act in profile_for(model).act_epilogues:
        pairs.setdefault(cls, []).append((lin, act))
    fused = []
    for pname, parent in reversed(list(model.named_modules())):  # (children first: a nested Sequential is
        # replaced inside its live parent before that parent is, in turn, copied into its replacement)
        prefix = f"{pname}." if pname else ""
        for lin_name, act_name in pairs.get(type(parent).__name__, ()):
            lin, act = getattr(parent, lin_name, None), getattr(parent, act_name, None)
            p = None if act is None or _hooked(act) else _post_of(act)
            if p is not None and _deployed_linear(lin):
                lin.set_post(p)
                setattr(parent, act_name, MovedActivation(lin, prefix + lin_name, p))
                fused.append(prefix + lin_name)
        for cname, child in list(parent.named_children()):
            if type(child) is nn.Sequential:
                mods = list(child._modules.values())
                at = {i: _post_of(b) for i, (a, b) in enumerate(zip(mods, mods[1:]))
                      if _deployed_linear(a) and b is not None and not _hooked(b) and _post_of(b) is not None}
                at = {i: p for i, p in sorted(at.items()) if i - 1 not in at}  # (a Linear, not a GELU, at i + 1)
                if at and not _hooked(child):
                    seq_pairs = {id(mods[i]): (mods[i], mods[i + 1], p) for i, p in at.items()}
                    setattr(parent, cname, FusedSequential(OrderedDict(child._modules), pairs=seq_pairs))
                    names = list(child._modules)
                    fused += [f"{prefix}{cname}.{names[i]}" for i in at]
                continue
            p = _proj_activation(child)
            if p is not None and not _hooked(child) and _deployed_linear(child.proj) and post.fits(
                    p, child.proj.weight_shape[0]):
                setattr(parent, cname, ProjWithActivation(child.proj, p))
                fused.append(f"{prefix}{cname}.proj")
    return fused
