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

Large models (more than ``SCREEN_ABOVE`` units: an SD1.5 UNet has about 300, SDXL and Flux more) would need a
whole-model run per layer and call. There step 2 first *screens*: one pass per call with every layer in float
gives, for every layer at once, its quantization error delta_l (the quantized layer on the float input minus the
float output) and, by ``SCREEN_PROBES`` backward passes of random output directions v, the gradient g_l = J_l^T v;
E[(g_l . delta_l)^2] = ||J_l delta_l||^2, the linearised output error of quantizing that layer alone. The
``SHORTLIST`` units with the largest estimated error and the ``SHORTLIST`` with the largest error per byte are then
measured exactly as above (at the target and at 8 bits); the rest keep their estimate and the target bits. Cost:
about (3 + 2 x probes) runs per call plus 2 x 2 x shortlist runs per call, whatever the number of layers. The
screen saves the activations autograd needs as copies, so a model that adds residuals in place (Forge's UNet) is
screened too; a model or calls a host made under ``torch.inference_mode()`` are screened on plain copies
(``_screen_plain``: plain views of the weights, no second float model). If the model still cannot be differentiated,
every unit is measured exactly.

The result is a tuple of exact-name ``LayerRule`` s (one per layer, so a saved file records every decision) and a
report with the measured numbers. The user's own rules still come first (they override measurement).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .calib import Call, model_device_dtype, prediction_outputs, run_calls, timestep_aware_subset
from .config import ACT_BITS_NONE, LayerRule, QuantConfig
from .progress import Stage

DEFAULT_BUDGET = 0.03  # extra bytes allowed over the uniform target, as a fraction of the layers' fp16 bytes
DEFAULT_CALLS = 6
SCREEN_ABOVE = 96  # more units than this: screen by the linearised estimate, measure the shortlist exactly
SCREEN_PROBES = 8
SHORTLIST = 16


def _energies(fp_outs: List[List[torch.Tensor]]) -> List[float]:
    """Per prediction of the calls (``prediction_outputs``), its squared norm summed over the calls."""
    return [sum(float(refs[i].pow(2).sum()) for refs in fp_outs) for i in range(len(fp_outs[0]))]


def _rel_error(fp_outs: List[List[torch.Tensor]], model, calls: Sequence[Call]) -> float:
    """Squared relative error of ``model``'s predictions against the float ones, summed over the predictions a call
    returns (each relative to its own energy, so a small second output such as LTX-2's audio counts as much as the
    first; one prediction: the plain relative error)."""
    den = _energies(fp_outs)
    num = [0.0] * len(den)
    with torch.no_grad():
        for c, refs in zip(calls, fp_outs):
            dev, dt = model_device_dtype(model)
            a, kw = c.to(dev, dt)
            for i, (out, ref) in enumerate(zip(prediction_outputs(model(*a, **kw)), refs)):
                num[i] += float((out.float() - ref).pow(2).sum())
    return sum(n / max(d, 1e-30) for n, d in zip(num, den))


def _units(q) -> Dict[str, List[str]]:
    """unit name (a layer, or the convolution a shortcut split came from) -> its quantized layer names."""
    from .layers import quant_layers
    from .split import split_parent

    units: Dict[str, List[str]] = {}
    for name, _ in quant_layers(q):
        units.setdefault(split_parent(name), []).append(name)
    return units


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """Saved-tensor pack hook of the screen: a tensor on the gradient path is saved as a copy, so an in-place op of
    the model on it later (a residual ``x += n``) changes neither what backward reads nor its version check. Weights
    and inputs (no gradient) are saved as they are."""
    return t.clone() if t.requires_grad else t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _screen(q, calls, fp_outs, probes: int, progress, what, seed: int = 0) -> Dict[str, float]:
    """Linearised output error of quantizing each unit alone (module docstring): one forward with every layer in
    float, the quantized layer recomputed on each float input, ``probes`` backward passes of random directions."""
    from .context import get_context
    from .layers import quant_layers
    from .split import split_parent

    ctx = get_context(q)
    layers = quant_layers(q)
    every = frozenset(n for n, _ in layers)
    unit_of = {n: split_parent(n) for n, _ in layers}
    est = {u: 0.0 for u in unit_of.values()}
    den = _energies(fp_outs)  # (each prediction's probe scaled by 1 / sqrt of its energy: _rel_error's weighting)
    g = torch.Generator().manual_seed(seed)
    with Stage(progress, len(calls), what) as st:
        for c in calls:
            deltas, zs, inner = {}, {}, [False]

            def hook(mod, inp, kw, out, name=None):
                if inner[0] or not isinstance(out, torch.Tensor):
                    return None
                inner[0] = True
                try:
                    ctx.float_layers = every - {name}
                    with torch.no_grad():
                        yq = mod(inp.detach(), **kw)
                finally:
                    ctx.float_layers, inner[0] = every, False
                deltas[name] = (yq.float() - out.detach().float())
                z = torch.zeros_like(out, requires_grad=True)
                zs[name] = z
                return out + z

            handles = [m.register_forward_hook(  # (the input by position, or by torch's keyword: AnimateDiff)
                lambda mod, i, kw, o, n=n: hook(mod, i[0] if i else kw["input"], {k: v for k, v in kw.items()
                                                                                   if k != "input"}, o, n),
                with_kwargs=True) for n, m in layers]
            ctx.float_layers = every
            try:
                dev, dt = model_device_dtype(q)
                a, kw = c.to(dev, dt)
                # (saved activations are kept as copies: hosts' UNets add residuals in place, Forge's transformer
                # block `x += n` after norm1 saved x, which autograd refuses at backward)
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_own_copy, _same):
                    outs = [o.float() for o in prediction_outputs(q(*a, **kw))][:len(den)]
                names = list(zs)
                for k in range(probes):
                    vs = [torch.randn(o.shape, generator=g).to(o.device) / max(d, 1e-30) ** 0.5
                          for o, d in zip(outs, den)]
                    grads = torch.autograd.grad(outs, [zs[n] for n in names], grad_outputs=vs,
                                                retain_graph=k < probes - 1, allow_unused=True)
                    per_unit: Dict[str, float] = {}
                    for n, gr in zip(names, grads):
                        if gr is not None:
                            u = unit_of[n]
                            per_unit[u] = per_unit.get(u, 0.0) + float((gr.float() * deltas[n]).sum())
                    for u, sv in per_unit.items():
                        est[u] += sv * sv / probes
            finally:
                for h in handles:
                    h.remove()
                ctx.float_layers = frozenset()
            del outs
            zs, deltas = {}, {}
            st.step()
    return est


def _screen_plain(q, calls, fp_outs, probes: int, progress, what) -> Dict[str, float]:
    """``_screen`` where autograd works. Hosts load checkpoints and sample under ``torch.inference_mode()`` (Forge,
    ComfyUI): inside that mode no graph is recorded even with grad enabled, and outside it autograd may not save
    the inference tensors made there (``q``'s float weights are the host model's, the calls the host's). So the
    screen runs with inference mode off, on a plain copy of ``q`` whose inference weights are plain views of the
    same memory (``calib.plain_copy``: no second float model; the screen only reads them) and plain copies of the
    calls where they hold inference tensors (made only then, freed on return; the host's model and calls are not
    changed). Gradients are taken for
    the layer outputs only: parameters that require them (Forge's do) are switched off meanwhile, so autograd saves
    neither a copy of every weight nor every layer's input for weight gradients."""
    from .calib import for_training, training_mode

    with training_mode():
        q_plain, calls_plain = for_training(q, calls)
        params = [p for p in q_plain.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return _screen(q_plain, calls_plain, fp_outs, probes, progress, what)
        finally:
            for p in params:
                p.requires_grad_(True)


def _measure(fp_model, q, calls, fp_outs, progress, what, only=None) -> Dict[str, float]:
    from .context import get_context

    ctx = get_context(q)
    units = _units(q)
    every = frozenset(n for names in units.values() for n in names)
    if only is not None:
        units = {u: names for u, names in units.items() if u in only}
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
    estimates: Dict[str, float] = dataclasses.field(default_factory=dict)  # screened models: unit -> linearised error


def plan_precision(fp_model: nn.Module, calls: Sequence[Call], config: QuantConfig, *,
                   budget: float = DEFAULT_BUDGET, n_calls: int = DEFAULT_CALLS, num_train_timesteps: int = 1000,
                   profile: Optional[str] = None, progress=None, screen_above: int = SCREEN_ABOVE,
                   probes: int = SCREEN_PROBES, shortlist: int = SHORTLIST) -> PrecisionPlan:
    """Measure every layer and allocate precision under ``budget`` (see the module docstring)."""
    from .api import quantize

    if not calls:
        return PrecisionPlan(tuple(config.rules), [], {})
    sub = timestep_aware_subset(list(calls), n_calls) if len(calls) > n_calls else list(calls)
    everything = (LayerRule(".*", "quant"),)
    user = tuple(config.rules)
    target = dataclasses.replace(config, rules=user + everything)
    q = quantize(fp_model, target, list(calls), num_train_timesteps=num_train_timesteps, profile=profile,
                 progress=progress)
    units = _units(q)
    decided_by_user = {u for u in units if any(re.search(r.pattern, u) for r in user)}
    measured = [u for u in units if u not in decided_by_user]
    numel = _unit_numel(fp_model, measured)
    if budget <= 0:  # nothing can be upgraded: every layer keeps the target bits, no need to measure
        rules = list(user) + [LayerRule(f"^{re.escape(u)}$", "quant") for u in units if u not in decided_by_user]
        return PrecisionPlan(tuple(rules), [], {}, 0.0, 0.0)
    fp_outs = []
    run_calls(fp_model, sub, fn=lambda c, out: fp_outs.append([o.float() for o in prediction_outputs(out)]))
    only, screened = None, {}
    if len(measured) > screen_above:
        try:
            screened = _screen_plain(q, sub, fp_outs, probes, progress, f"screen layers at {config.name}")
        except RuntimeError as exc:  # the model cannot be differentiated: measure every unit instead
            warnings.warn(f"LowBit: sensitivity screening not possible ({str(exc).splitlines()[0][:120]}); "
                          f"measuring each of {len(measured)} layers", RuntimeWarning, stacklevel=2)
            screened = {}
        if screened:
            by_err = sorted(measured, key=lambda u: -screened[u])[:shortlist]
            by_density = sorted(measured, key=lambda u: -screened[u] / max(numel[u], 1))[:shortlist]
            only = set(by_err) | set(by_density)
    err_t = _measure(fp_model, q, sub, fp_outs, progress, f"sensitivity at {config.name}", only=only)
    del q
    eight_bits = config.w_bits < 8 or (config.a_bits < 8 and config.a_bits != ACT_BITS_NONE)
    err_8 = {}
    if eight_bits:
        a8 = ACT_BITS_NONE if config.a_bits == ACT_BITS_NONE else 8
        c8 = dataclasses.replace(config, w_bits=8, a_bits=a8, w_group_size=None, w_format=None,
                                 rules=user + everything)
        q8 = quantize(fp_model, c8, list(calls), num_train_timesteps=num_train_timesteps, profile=profile,
                      progress=progress)
        err_8 = _measure(fp_model, q8, sub, fp_outs, progress, f"sensitivity at {c8.name}", only=only)
        del q8
    if only is not None:  # screened: the shortlist was measured; the rest keep their estimate and the target bits
        measured_all = measured
        measured = [u for u in measured if u in only]
        rest = sum(screened[u] for u in measured_all if u not in only)
    else:
        rest = 0.0
    total_fp16 = 2 * sum(numel.values())
    allowance = budget * total_fp16
    wb = config.w_bits / 8
    # options per unit, in upgrade order: (name, bytes per weight, error)
    options = {u: [("target", wb, err_t[u])] + ([("w8a8", 1.0, err_8[u])] if eight_bits else []) + [("fp", 2.0, 0.0)]
               for u in measured}
    level = {u: 0 for u in measured}
    spent = 0.0
    while True:
        remaining = rest + sum(options[u][level[u]][2] for u in measured)
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
        if u not in options:  # screened out: estimated error too small to be worth bytes
            rules.append(LayerRule(f"^{re.escape(u)}$", "quant"))
            continue
        mode = {"target": "quant", "w8a8": "w8a8", "fp": "fp"}[options[u][level[u]][0]]
        rules.append(LayerRule(f"^{re.escape(u)}$", mode))
        if mode != "quant":
            e8 = f", {err_8[u]:.2e} at 8 bits" if u in err_8 else ""
            report.append(dict(name=u, mode=mode, error_target=err_t[u], error_8=err_8.get(u),
                               extra_bytes=int((options[u][level[u]][1] - wb) * numel[u]),
                               reason=f"measured: output error {err_t[u]:.2e} at {config.name}{e8}"))
    errors = {u: (err_t[u], err_8.get(u)) for u in measured}
    return PrecisionPlan(tuple(rules), report, errors, allowance, spent, estimates=screened)
