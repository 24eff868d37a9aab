"""LoRA on a quantized UNet as a low-rank side path (no requantization, exact unpatch).

A deployed quantized layer has no float ``weight`` to merge a LoRA into, and merging + requantizing would
both add rounding error and make "unpatch" inexact. Instead each patched layer computes

    y = Q(x) + sum_i  side_i(x)         side_i(x) = scale_i * up_i(down_i(x))      (plain LoRA, low rank)
                                        side_i(x) = op(x, dW_i) + db_i             (anything else: dense delta)

through one permanent forward hook per quantized layer; the hook object holds the layer's list of paths (no
attribute on the module; copies of the model copy their hooks and paths). An empty list makes the hook
return ``None`` (PyTorch then keeps the layer's own output object), so clearing
the list restores the layer's output bit for bit. Host-free: ``comfy_adapter.py`` turns ComfyUI's patch
objects into ``SidePath`` objects (``nodes/comfy_adapter.py``).

Tensors (N = out features/channels, K = in features, C = in channels, r = rank):
  Linear: down fp32 [r, K], up fp32 [N, r];  dense dW fp32 [N, K]
  Conv2d: down fp32 [r, C/groups, kh, kw] (same stride/padding/dilation as the layer), up fp32 [N, r, 1, 1];
          dense dW fp32 [N, C/groups, kh, kw]
  db fp32 [N] (bias delta) or None
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

class SidePath:
    def __init__(self, *, down: Optional[torch.Tensor] = None, up: Optional[torch.Tensor] = None,
                 scale: float = 1.0, delta_w: Optional[torch.Tensor] = None, delta_b: Optional[torch.Tensor] = None):
        if delta_w is None and (down is None or up is None) and delta_b is None:
            raise ValueError("a side path needs (down, up) factors, a dense weight delta or a bias delta")
        self.down, self.up, self.scale, self.delta_w, self.delta_b = down, up, float(scale), delta_w, delta_b

    @property
    def low_rank(self) -> bool:
        return self.down is not None

    def to(self, device):
        for k in ("down", "up", "delta_w", "delta_b"):
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device))
        return self

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        conv = isinstance(layer.weight_shape, tuple) and len(layer.weight_shape) == 4
        dt = x.dtype
        y = None
        if self.low_rank:
            down, up = self.down.to(x.device, dt), self.up.to(x.device, dt)
            if conv:
                h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, 1)
                y = F.conv2d(h, up) * self.scale
            else:
                y = F.linear(F.linear(x, down), up) * self.scale
        elif self.delta_w is not None:
            w = self.delta_w.to(x.device, dt)
            if conv:
                y = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                y = F.linear(x, w)
        if self.delta_b is not None:
            b = self.delta_b.to(x.device, dt)
            b = b.reshape((1, -1, 1, 1)) if conv else b
            y = b if y is None else y + b
        return y


class SidePathHook:
    """The forward hook (one per layer, installed once) and the home of that layer's side paths.
    No paths -> returns None -> the layer's output is untouched."""

    def __init__(self):
        self.paths: List[SidePath] = []

    def __call__(self, module, args, *rest):
        # (module, args, kwargs, output) as registered now (with_kwargs); (module, args, output) for a hook that an
        # older version registered and a whole-model pickle kept
        if not self.paths:
            return None
        output, kwargs = rest[-1], (rest[0] if len(rest) == 2 else {})
        x = args[0] if args else kwargs["input"]  # (AnimateDiff calls ``proj_in(input=...)``)
        out = output
        for p in self.paths:
            out = out + p(module, x).to(out.dtype)
        return out


def _hook(layer) -> Optional[SidePathHook]:
    return next((h for h in layer._forward_hooks.values() if isinstance(h, SidePathHook)), None)


def ensure_hook(layer) -> SidePathHook:
    h = _hook(layer)
    if h is None:
        h = SidePathHook()
        layer.register_forward_hook(h, with_kwargs=True)
    return h


def set_side_paths(layer, paths: List[SidePath]) -> None:
    ensure_hook(layer).paths = list(paths)


def clear_side_paths(model) -> int:
    """Remove every side path under ``model``; returns how many layers had some."""
    n = 0
    for m in model.modules():
        h = _hook(m)
        if h is not None and h.paths:
            h.paths = []
            n += 1
    return n


def side_path_count(model) -> int:
    return sum(len(h.paths) for h in map(_hook, model.modules()) if h is not None)


def check_conv_low_rank(layer, down: torch.Tensor, up: torch.Tensor):
    """(down, up) reshaped for ``layer`` if a factored side path computes exactly the LoRA delta, else None."""
    shape = tuple(layer.weight_shape)
    r = down.shape[0]
    if up.shape[0] != shape[0] or up.flatten(1).shape[1] != r:
        return None
    if len(shape) == 4:
        if getattr(layer, "groups", 1) != 1:
            return None  # a grouped conv's delta is not a single low-rank conv pair
        if down.numel() != r * shape[1] * shape[2] * shape[3]:
            return None
        return down.reshape(r, shape[1], shape[2], shape[3]), up.reshape(shape[0], r, 1, 1)
    if down.flatten(1).shape[1] != shape[1]:
        return None
    return down.flatten(1), up.flatten(1)
