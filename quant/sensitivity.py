"""Per-layer precision from measurement: which layers stay at 8 bits or in float, under a size budget.

Name rules ("keep conv_in at 8 bits") encode one family's experience; they fail on models nobody wrote rules
for, and they cannot tell that on one model the input convolution is fine at 4 bits while on another it needs
float. Here every layer is measured on the model's own calibration calls:

1. the model is quantized with every layer at the target bits (and, for a 4-bit target, once more with every
   layer at 8 bits), activation ranges calibrated as usual;
2. for each layer alone, the relative output error of the model with only that layer quantized,
   e_b(layer) = sum ||q(x) - f(x)||^2 / sum ||f(x)||^2 over a timestep-spread subset of the calls;
3. greedy allocation: starting from every layer at the target bits, repeatedly take the upgrade (target -> 8
   bits -> float) with the largest error reduction per added byte while the added bytes stay within the budget
   (a fraction of the quantizable layers' fp16 bytes) and the upgrade removes at least a tenth of the error
   still left in the layers measured (errors of single layers roughly add up).

The result is a tuple of exact-name ``LayerRule`` s (one per layer, so a saved file records every decision) and a
report with the measured numbers. The user's own rules still come first (they override measurement).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .calib import Call, model_device_dtype, timestep_aware_subset, unet_output
from .config import ACT_BITS_NONE, LayerRule, QuantConfig
from .progress import Stage

DEFAULT_BUDGET = 0.03  # extra bytes allowed over the uniform target, as a fraction of the layers' fp16 bytes
DEFAULT_CALLS = 6


def _rel_error(fp_outs: List[torch.Tensor], model, calls: Sequence[Call]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for c, ref in zip(calls, fp_outs):
            dev, dt = model_device_dtype(model)
            a, kw = c.to(dev, dt)
            out = unet_output(model(*a, **kw)).float()
            num += float((out - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def _units(q) -> Dict[str, List[str]]:
    """unit name (a layer, or the convolution a shortcut split came from) -> its quantized layer names."""
    from .layers import quant_layers
    from .split import split_parent

    units: Dict[str, List[str]] = {}
    for name, _ in quant_layers(q):
        units.setdefault(split_parent(name), []).append(name)
    return units


def _measure(fp_model, q, calls, fp_outs, progress, what) -> Dict[str, float]:
    from .context import get_context

    ctx = get_context(q)
    units = _units(q)
    every = frozenset(n for names in units.values() for n in names)
    errs = {}
    with Stage(progress, len(units), what) as st:
        try:
            for unit, names in units.items():
                ctx.float_layers = every - frozenset(names)
                errs[unit] = _rel_error(fp_outs, q, calls)
                st.step()
        finally:
            ctx.float_layers = frozenset()
    return errs


def _unit_numel(fp_model, units) -> Dict[str, int]:
    return {u: fp_model.get_submodule(u).weight.numel() for u in units}


@dataclasses.dataclass
class PrecisionPlan:
    """``rules``: the user's ``config.rules`` followed by one exact-name rule per measured layer ("quant", "w8a8"
    or "fp"). ``report``: one dict per layer kept above the target, with the measured errors and bytes.
    ``errors``: every measured unit -> (error at the target, error at 8 bits or None). Bytes: the allowance and
    what the plan spent of it."""

    rules: Tuple[LayerRule, ...]
    report: List[dict]
    errors: Dict[str, Tuple[float, Optional[float]]]
    allowance_bytes: float = 0.0
    spent_bytes: float = 0.0


def plan_precision(fp_model: nn.Module, calls: Sequence[Call], config: QuantConfig, *,
                   budget: float = DEFAULT_BUDGET, n_calls: int = DEFAULT_CALLS, num_train_timesteps: int = 1000,
                   profile: Optional[str] = None, progress=None) -> PrecisionPlan:
    """Measure every layer and allocate precision under ``budget`` (see the module docstring)."""
    from .api import quantize

    if not calls:
        return PrecisionPlan(tuple(config.rules), [], {})
    sub = timestep_aware_subset(list(calls), n_calls) if len(calls) > n_calls else list(calls)
    dev, dt = model_device_dtype(fp_model)
    with torch.no_grad():
        fp_outs = []
        for c in sub:
            a, kw = c.to(dev, dt)
            fp_outs.append(unet_output(fp_model(*a, **kw)).float())
    everything = (LayerRule(".*", "quant"),)
    user = tuple(config.rules)
    target = dataclasses.replace(config, rules=user + everything)
    q = quantize(fp_model, target, list(calls), num_train_timesteps=num_train_timesteps, profile=profile,
                 progress=progress)
    units = _units(q)
    decided_by_user = {u for u in units if any(re.search(r.pattern, u) for r in user)}
    measured = [u for u in units if u not in decided_by_user]
    err_t = _measure(fp_model, q, sub, fp_outs, progress, f"sensitivity at {config.name}")
    del q
    eight_bits = config.w_bits < 8 or (config.a_bits < 8 and config.a_bits != ACT_BITS_NONE)
    err_8 = {}
    if eight_bits:
        a8 = ACT_BITS_NONE if config.a_bits == ACT_BITS_NONE else 8
        c8 = dataclasses.replace(config, w_bits=8, a_bits=a8, w_group_size=None, w_format=None,
                                 rules=user + everything)
        q8 = quantize(fp_model, c8, list(calls), num_train_timesteps=num_train_timesteps, profile=profile,
                      progress=progress)
        err_8 = _measure(fp_model, q8, sub, fp_outs, progress, f"sensitivity at {c8.name}")
        del q8
    numel = _unit_numel(fp_model, measured)
    total_fp16 = 2 * sum(numel.values())
    allowance = budget * total_fp16
    wb = config.w_bits / 8
    # options per unit, in upgrade order: (name, bytes per weight, error)
    options = {u: [("target", wb, err_t[u])] + ([("w8a8", 1.0, err_8[u])] if eight_bits else []) + [("fp", 2.0, 0.0)]
               for u in measured}
    level = {u: 0 for u in measured}
    spent = 0.0
    while True:
        remaining = sum(options[u][level[u]][2] for u in measured)
        best, best_ratio = None, 0.0
        for u in measured:
            cur = options[u][level[u]]
            for nxt_i in range(level[u] + 1, len(options[u])):
                nxt = options[u][nxt_i]
                extra = (nxt[1] - cur[1]) * numel[u]
                gain = cur[2] - nxt[2]
                if extra <= 0 or spent + extra > allowance or gain <= 0.1 * remaining:
                    continue
                if gain / extra > best_ratio:
                    best, best_ratio = (u, nxt_i, extra), gain / extra
        if best is None:
            break
        u, i, extra = best
        level[u], spent = i, spent + extra
    rules, report = list(user), []
    for u in units:
        if u in decided_by_user:
            continue
        mode = {"target": "quant", "w8a8": "w8a8", "fp": "fp"}[options[u][level[u]][0]]
        rules.append(LayerRule(f"^{re.escape(u)}$", mode))
        if mode != "quant":
            e8 = f", {err_8[u]:.2e} at 8 bits" if u in err_8 else ""
            report.append(dict(name=u, mode=mode, error_target=err_t[u], error_8=err_8.get(u),
                               extra_bytes=int((options[u][level[u]][1] - wb) * numel[u]),
                               reason=f"measured: output error {err_t[u]:.2e} at {config.name}{e8}"))
    errors = {u: (err_t[u], err_8.get(u)) for u in measured}
    return PrecisionPlan(tuple(rules), report, errors, allowance, spent)
