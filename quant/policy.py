"""Layer policy: which Conv2d/Linear layers get the target bits, which stay at W8A8, which stay float.

Rules are regular expressions on the module's qualified name (first match wins, ``QuantConfig.rules``).
Independently of names, the first and the last Conv2d of the model are kept at W8A8 (the input and output
convolutions of every diffusion UNet we know), so an unknown architecture is handled sensibly too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

import torch.nn as nn

from .config import ACT_BITS_NONE, QuantConfig
from .layers import qlayer_class_for
from .split import split_parent


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "conv" | "linear"
    mode: str  # "quant" | "w8a8" | "fp"
    w_bits: int
    a_bits: int
    group_size: object
    reason: str


def _kind(m):
    return "conv" if isinstance(m, nn.Conv2d) else "linear"


NOT_CALLED = "not called as a module on a calibration call (its weight is read directly, or it is unused)"


def plan_layers(model: nn.Module, cfg: QuantConfig, profile=None, called: Optional[set] = None) -> List[LayerPlan]:
    """One plan per Conv2d/Linear: the user's rules (``cfg.rules``) first, then the profile's edge rules, then
    (if the profile asks for it) the first and last convolution at W8A8. ``called``: the layers that run their own
    forward on a calibration call (``split.probe_layers``); the others stay float (None: not known, every layer is
    planned)."""
    from .profiles import get_profile, profile_for

    profile = profile_for(model) if profile is None else get_profile(profile) if isinstance(profile, str) else profile
    cands = [(n, m) for n, m in model.named_modules() if qlayer_class_for(m) is not None and n]
    convs = [split_parent(n) for n, m in cands if isinstance(m, nn.Conv2d)]
    edge = {convs[0], convs[-1]} if convs and profile.structural_edges else set()
    rules = [(r, "rule") for r in cfg.rules] + [(r, f"{profile.name} edge") for r in profile.edge_rules]
    plans = []
    for name, m in cands:
        kind = _kind(m)
        mode, reason = "quant", "default"
        rname = split_parent(name)  # the parts of a split convolution follow the rules of the convolution
        for r, origin in rules:
            if r.kind in ("any", kind) and re.search(r.pattern, rname):
                mode, reason = r.mode, f"{origin} {r.pattern!r}"
                break
        else:
            if rname in edge:
                mode, reason = "w8a8", "first/last convolution"
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or m.weight.dim() != 4):
            mode, reason = "fp", "unsupported padding mode"
        if any(re.search(p, rname) for p in profile.keep_float):
            mode, reason = "fp", f"the model's code reads its float weight ({profile.name} profile)"
        if called is not None and name not in called:
            mode, reason = "fp", NOT_CALLED
        if mode == "w8a8":
            # weight-only configs keep special layers weight-only too (W8A16)
            w, a, g = 8, (ACT_BITS_NONE if cfg.a_bits == ACT_BITS_NONE else 8), None
        else:
            w, a, g = cfg.w_bits, cfg.a_bits, cfg.w_group_size
        plans.append(LayerPlan(name, kind, mode, w, a, g, reason))
    return plans


# ---- the decisions travel with the saved model (``ctx.report``: one dict per layer not at the target bits) ----
_REPORT_KEYS = {"name": str, "kind": str, "mode": str, "w_bits": int, "a_bits": int, "reason": str}


def _to_state(qmodel):
    from .context import get_context

    report = get_context(qmodel).report
    return (dict(layers=[dict(r) for r in report]), {}) if report else None


def _check_meta(meta) -> list:
    """The decision records of a file's ``extras.decisions`` (checked, copied); ValueError when malformed."""
    rows = meta.get("layers") if isinstance(meta, dict) else None
    if not isinstance(rows, list) or len(rows) > 100_000:
        raise ValueError("decisions must be a list of layer records")
    clean = []
    for r in rows:
        if not isinstance(r, dict) or set(r) != set(_REPORT_KEYS) or \
                not all(isinstance(r[k], t) and not isinstance(r[k], bool) for k, t in _REPORT_KEYS.items()):
            raise ValueError(f"a decision record must have exactly {sorted(_REPORT_KEYS)} with their types")
        if r["mode"] not in ("quant", "w8a8", "fp") or len(r["reason"]) > 500 or len(r["name"]) > 1000:
            raise ValueError("a decision record holds an unknown mode or an oversized text")
        clean.append(dict(r))
    return clean


def _from_state(qmodel, meta, tensors):
    from .context import get_context

    get_context(qmodel).report = _check_meta(meta)


def _register():
    from .io import register_extra

    register_extra("decisions", _to_state, _from_state, check_meta=_check_meta)


_register()
