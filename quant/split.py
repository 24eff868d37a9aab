"""Shortcut splitting (Q-Diffusion, docs/PAPERS.md A4): convolutions that read a channel concatenation.

In a UNet decoder each ResNet block reads ``cat([h_deep, h_skip], dim=1)``; its skip (shortcut) convolution
sees the raw concatenation, whose two halves have very different ranges. One activation scale for both wastes
most of the levels on one half. The fix: split the convolution along its input channels,

    conv(cat([a, b]), W) == conv(a, W[:, :Ca]) + conv(b, W[:, Ca:])      (exact, any kernel, groups=1)

so each half gets its own activation quantizer and its own per-output-channel weight scales.

Which convolutions read a concatenation is found by running one calibration call under a ``TorchFunctionMode``
that notes every ``torch.cat`` along the channel dimension and a pre-hook on each candidate convolution that
checks whether its input *is* such a tensor. No model-specific names: it works for diffusers, ComfyUI/LDM and
Forge UNets alike. The split is a float-exact structural change applied before quantization; the saved file
lists the splits so ``load`` rebuilds the same structure.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

_CATS = {torch.cat, torch.concat, torch.concatenate}


class ChannelSplitConv2d(nn.Module):
    """A Conv2d computed as the sum of convolutions over consecutive input-channel groups (``parts``).

    ``parts.i`` are ordinary ``nn.Conv2d`` (replaced by quantized convolutions by ``quantize``); only part 0
    carries the bias. Attributes of the original convolution are kept for code that reads them.
    """

    def __init__(self, conv: nn.Conv2d, sizes: Sequence[int]):
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if sum(sizes) != conv.in_channels or conv.groups != 1 or min(sizes) < 1:
            raise ValueError(f"cannot split a conv with {conv.in_channels} input channels (groups={conv.groups}) "
                             f"into {sizes}")
        self.sizes = sizes
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        parts, off = [], 0
        for i, s in enumerate(sizes):
            p = nn.Conv2d(s, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=(i == 0 and conv.bias is not None), device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                p.weight.copy_(conv.weight[:, off:off + s])
                if p.bias is not None:
                    p.bias.copy_(conv.bias)
            p.requires_grad_(conv.weight.requires_grad)
            parts.append(p)
            off += s
        self.parts = nn.ModuleList(parts)

    def forward(self, input):
        x = input  # (torch's name for a convolution's input, which callers may pass by keyword)
        fused = self._fusable(x)
        if fused is not None:
            return self._deployed_forward(x, *fused)
        return self._parts_forward(x)

    def _parts_forward(self, x):
        xs = torch.split(x, self.sizes, dim=1)
        y = self.parts[0](xs[0])
        for p, xi in zip(self.parts[1:], xs[1:]):
            y = y + p(xi)
        return y

    # ---- deployed: the parts path, or one fused float convolution -------------------------------------------
    def _fusable(self, x):
        """(packed weights, activation quantizers) of the parts when this call can run as one float convolution
        over the concatenation: fp32 input, every part a deployed quantized convolution with a static activation
        quantizer at this timestep and no hooks (side paths, observers), tuning on. Otherwise None (parts path)."""
        if x.dtype != torch.float32:
            return None
        pws, acts = [], []
        for p in self.parts:
            pw = p._modules.get("packed")
            if pw is None or p.a_dynamic or p._forward_hooks or p._forward_pre_hooks:
                return None
            ctx = p._ctx[0]
            if ctx is not None and ctx.observing:
                return None
            aq = p.deployed_act()
            if aq is None or aq.dynamic:
                return None
            pws.append(pw)
            acts.append(aq)
        at = _kernels().autotune
        if not (at.active() and all(at.is_attached(pw) for pw in pws)):
            return None
        return pws, tuple(acts)

    def _deployed_forward(self, x, pws, acts):
        """The measured choice (kernels/autotune.py ``choose_path``, kept in part 0's weight cache per input shape)
        between the parts path (each part quantizes its slice and runs its own tuned kernel, then the adds) and the
        fused float path (``kernels.dense.conv2d_concat``: the slices fake-quantized with their own quantizers into
        one buffer, one convolution over the concatenated dequantized weights). The same function up to float
        summation order."""
        at = _kernels().autotune
        key = ("split", x.shape, torch.get_num_threads())
        bias = self.parts[0].bias
        ch = at.path_choice(pws[0], key)
        if ch is not None:
            return ch.impl(self, x, pws, acts, bias)
        shared = ("split", tuple(x.shape), tuple(tuple(pw.shape) for pw in pws), tuple(pw.format for pw in pws),
                  x.dtype, x.device.type, torch.get_num_threads())
        _, out = at.choose_path(pws[0], key, {"fused": _fused_path, "parts": _parts_path}, (self, x, pws, acts, bias),
                                default="parts", float_name="fused", shared_key=shared)
        return out

    def extra_repr(self):
        return f"split={self.sizes}"


def _kernels():
    from .layers import _kernels as k

    return k()


def _fused_path(mod, x, pws, acts, bias):
    return _kernels().dense.conv2d_concat(x, pws, bias, mod.stride, mod.padding, mod.dilation, acts)


def _parts_path(mod, x, pws, acts, bias):
    return mod._parts_forward(x)


class _CatProbe(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.cats: Dict[int, Tuple[torch.Tensor, Tuple[int, ...]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CATS and isinstance(out, torch.Tensor) and out.dim() >= 2:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim < 0:
                dim += out.dim()
            if dim == 1 and isinstance(tensors, (list, tuple)) and len(tensors) >= 2:
                self.cats[id(out)] = (out, tuple(int(t.shape[1]) for t in tensors))
        return out


def find_concat_convs(model: nn.Module, call, names: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """{conv name: channel sizes} for the convolutions among ``names`` whose input, on ``call`` (a recorded UNet
    call), is a channel concatenation of two or more tensors."""
    return probe_layers(model, call, (), names)[1]


def probe_layers(model: nn.Module, call, layers: Sequence[str], convs: Sequence[str]):
    """One probe pass of ``model`` on ``call``: (the names among ``layers`` whose own forward runs; a layer whose
    parent reads its ``weight`` directly, e.g. diffusers' ``AttentionPooling`` of HunyuanDiT, never runs it, and a
    quantized copy of it would compute in float while the deployed model has no float weight for it;
    :func:`find_concat_convs` of ``convs``). ``quantize`` needs both before it plans."""
    from .calib import probe_call

    convs = [n for n in convs if isinstance(model.get_submodule(n), nn.Conv2d)]
    probe = _CatProbe() if convs else None
    seen, found = set(), {}

    def cat_hook(name, mod, args):
        seen.add(name)
        x = args[0] if args else None
        hit = probe.cats.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[0] is x and mod.groups == 1:
            found[name] = hit[1]

    hooks = {n: (lambda name, mod, args: seen.add(name)) for n in layers}
    hooks.update(dict.fromkeys(convs, cat_hook))
    try:
        probe_call(model, call, hooks, context=probe)
    finally:
        if probe is not None:
            probe.cats.clear()
    return seen & set(layers), found


def apply_splits(model: nn.Module, splits: Dict[str, Sequence[int]]):
    """Replace each named Conv2d of ``model`` by its ``ChannelSplitConv2d`` (in place; float-exact)."""
    from .api import _set_module

    for name, sizes in splits.items():
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name!r} is a {type(conv).__name__}, not a Conv2d")
        _set_module(model, name, ChannelSplitConv2d(conv, sizes))
    return model


def split_parent(name: str) -> str:
    """``a.b.parts.1`` -> ``a.b`` (the name of the split convolution a part belongs to); other names unchanged."""
    head, sep, tail = name.rpartition(".parts.")
    return head if sep and tail.isdigit() else name
