"""Activation epilogues at deployment: a deployed Linear whose output feeds only a GELU takes the GELU in.

A transformer's feed-forward is Linear -> GELU -> Linear. Run as the model's code runs it, the GELU is a separate
pass over the hidden activations (on a 2-core CPU, torch's tanh GELU costs more than the int8 Linear before it);
oneDNN's int8 Linear applies it in its epilogue, on the accumulator it already holds (kernels/post.py). So at
deployment (``deploy_``, ``load``) the layer is told its activation (``QuantLayer.set_post``: every mode of the
layer then returns ``gelu(output)``) and the activation module is replaced by a ``MovedActivation`` that passes the
layer's output on. While a forward hook watches the layer (a LoRA side path adds to the Linear's output, before the
activation), the layer returns its plain output and the ``MovedActivation`` applies the activation
(``QuantLayer.post_now``): the model computes the same function either way. Only patterns whose data flow is certain
are taken:

* an ``nn.Sequential`` whose quantized Linear is followed by an ``nn.GELU`` (ComfyUI's Flux / MM-DiT MLPs);
* diffusers' ``GELU`` module (``activations.GELU``: ``gelu(self.proj(x))``, the "gelu" / "gelu-approximate"
  feed-forwards of SD3, Flux, PixArt, DiT, HunyuanDiT, ...) and the ``GEGLU`` modules of diffusers, ComfyUI, Forge
  and A1111 (``a * gelu(g)`` of ``proj(x)``'s halves: SD1.x / SDXL transformer blocks), replaced by a module with the
  same ``proj`` child;
* the pairs a model profile declares (``ModelProfile.act_epilogues``: block class, Linear child, activation child;
  diffusers' Flux single-stream block's ``proj_mlp`` -> ``act_mlp``).

State-dict keys do not change (the replacements hold no tensors; ``proj`` keeps its name). Fusing is idempotent (a
fused pattern no longer matches) and is not undone by ``undeploy_``: the layer keeps applying its activation in
every mode, so the model computes the same function. ``LOWBIT_FUSE_ACT=0`` turns it off (read at deployment).
"""
from __future__ import annotations

from typing import List

import torch.nn as nn

from .layers import QuantLinear


class MovedActivation(nn.Module):
    """Stands where an activation module was, after the activation moved into the Linear ``layer`` before it:
    returns its input, or the activation of it when the layer did not apply it to this call (``post_now``: a hook
    watches the layer). ``into``: the layer's qualified name; ``post``: the activation (kernels/post.py)."""

    def __init__(self, layer: QuantLinear, into: str, post: str):
        super().__init__()
        self._layer = [layer]  # (a list: the layer stays out of this module's tree; it lives in its own place)
        self.into, self.post = into, post

    def forward(self, x):
        return x if self._layer[0].post_now() is not None else _apply(self.post, x)

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
        y = self.proj(hidden_states)
        return y if self.proj.post_now() is not None else _apply(self.post, y)

    def extra_repr(self):
        return f"activation moved into proj as {self.post}"


def _apply(post: str, x):
    from ..kernels.post import POSTS

    return POSTS[post](x)


def _post_of(module: nn.Module):
    """The epilogue of a plain ``nn.GELU`` (exactly that class), else None."""
    from ..kernels import post

    return post.of_gelu(module.approximate) if type(module) is nn.GELU else None


def _deployed_linear(module) -> bool:
    return isinstance(module, QuantLinear) and module.mode == "deployed" and module.post is None


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
    for pname, parent in list(model.named_modules()):
        prefix = f"{pname}." if pname else ""
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                lin, act = parent._modules[a], parent._modules[b]
                p = None if act is None else _post_of(act)
                if p is not None and _deployed_linear(lin):
                    lin.set_post(p)
                    parent._modules[b] = MovedActivation(lin, prefix + a, p)
                    fused.append(prefix + a)
        for lin_name, act_name in pairs.get(type(parent).__name__, ()):
            lin, act = getattr(parent, lin_name, None), getattr(parent, act_name, None)
            p = None if act is None else _post_of(act)
            if p is not None and _deployed_linear(lin):
                lin.set_post(p)
                setattr(parent, act_name, MovedActivation(lin, prefix + lin_name, p))
                fused.append(prefix + lin_name)
        for cname, child in list(parent.named_children()):
            p = _proj_activation(child)
            if p is not None and _deployed_linear(child.proj) and not (p in post.HALVING
                                                                       and child.proj.weight_shape[0] % 2):
                child.proj.set_post(p)
                setattr(parent, cname, ProjWithActivation(child.proj, p))
                fused.append(f"{prefix}{cname}.proj")
    return fused
