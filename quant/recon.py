"""BRECQ-style block reconstruction with AdaRound weight rounding (docs/PAPERS.md A2, A3).

Units: the top-most modules whose class is a registered block type (ResNet blocks, transformer blocks,
attention blocks of diffusers, ComfyUI/LDM and Forge UNets); quantized layers outside any block are
reconstructed alone. For each unit, in model order:
  inputs  = the unit's inputs in the *quantized* model (weights quantized up to here; PTQD's ``asym``),
  targets = the unit's outputs in the *full-precision* model on the same UNet call,
and the AdaRound variables of the unit's layers minimise ||unit_q(inputs) - targets||² plus the rounding
regulariser, with activations left in float (the weight pass). Then activation step sizes are recomputed on
the reconstructed model (the model's ``a_init``: the L_p (p=2.4) search by default) and, if
``ReconConfig.act_iters`` > 0, learned unit by unit (the activation pass, ``reconstruct_activations``).

Units whose inputs have no float targets are not fitted (``unpaired``): a unit fits its quantized-side inputs
against the float model's outputs row by row, which pairs them only where both models give the unit the same rows.
They do not where the rows a unit gets depend on the model's own values: a routed mixture-of-experts expert (top-k
routing sends other tokens, often another number of them, to an expert once the router's inputs are quantized;
HiDream, Nucleus-MoE) or any unit whose captured inputs differ in shape between the two models, or that one model
calls on a calibration call and the other does not. Such units keep their initial rounding and step sizes (lp /
min-max), and the model's report (``pipeline.describe``) says why, rather than fitting rows of different tokens
against each other (silently wrong where the counts happen to match) or crashing where they do not.

Memory stays bounded: only one unit's inputs/targets are cached at a time (fp16, CPU), recomputed by
partial forward passes that stop right after the unit (never every block's activations at once).
Transactional (``transaction.py``): a cancelled or failing call leaves ``qmodel`` bit-identical, so no layer is
left with soft AdaRound state or half-collected observations and a retry equals a clean run.
Departures from the papers' code: the rounding regulariser covers every AdaRound variable (Q-Diffusion
skipped the second split half), and every calibration sample is used (PTQD's randperm(960) dropped 64).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .calib import Call, _to_model, _to_store, batch_rows, keyed, map_tensors, model_device_dtype, probe_call
from .config import ReconConfig
from .context import get_context
from .errors import ConfigError, LowBitError
from .layers import QuantLayer, quant_layers
from .progress import Stage
from .quantizer import expand_weight_scale, w_qrange
from .transaction import check_finite, transaction

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Learned rounding: W_int = clamp(floor(W/s) + h(alpha)), h a rectified sigmoid (A2)."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        s = expand_weight_scale(layer.w_scale.detach(), layer.weight.shape, layer.group_size)
        wf = layer.weight.detach().float() / s
        floor = wf.floor()
        frac = (wf - floor).clamp(0.01, 0.99)
        self.register_buffer("floor", floor)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.soft = True

    def h(self):
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _int(self, layer, soft):
        qmin, qmax = w_qrange(layer.w_bits)
        off = self.h() if soft else (self.alpha >= 0).float()
        return torch.clamp(self.floor + off, qmin, qmax)

    def fake_weight(self, layer):
        s = expand_weight_scale(layer.w_scale, layer.weight.shape, layer.group_size)
        return self._int(layer, self.soft) * s

    def weight_int(self, layer):
        return self._int(layer, False).to(torch.int8)

    def regulariser(self, beta):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class FixedInt(nn.Module):
    """Reconstructed integer weights kept as int8 (1 byte a weight) instead of AdaRound's two fp32 tensors."""

    def __init__(self, w_int: torch.Tensor):
        super().__init__()
        self.register_buffer("w_int", w_int.to(torch.int8))

    def fake_weight(self, layer):
        return self.w_int.float() * expand_weight_scale(layer.w_scale, layer.weight.shape, layer.group_size)

    def weight_int(self, layer):
        return self.w_int


class _Stop(Exception):
    pass


def find_units(qmodel: nn.Module, call: Call = None):
    """Reconstruction units in execution order (diffusers registers mid_block after up_blocks)."""
    units = _units_by_registration(qmodel)
    if call is None:
        return units
    order = {}
    probe_call(qmodel, call, dict.fromkeys([name for name, _ in units],
                                           lambda name, mod, args: order.setdefault(name, len(order))))
    return sorted(units, key=lambda u: order.get(u[0], len(order)))


def _units_by_registration(qmodel):
    from .profiles import get_profile

    block_types = set(get_profile(get_context(qmodel).profile).block_types)  # the model family's blocks
    units, covered = [], set()
    for name, m in qmodel.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        if type(m).__name__ in block_types and any(isinstance(x, QuantLayer) for x in m.modules()):
            units.append((name, m))
            covered.add(name)
        elif isinstance(m, QuantLayer):
            units.append((name, m))
            covered.add(name)
    return units


def _out_tensors(out) -> tuple:
    """Every tensor a unit returns, in order (None entries dropped): a joint transformer block (SD3, Flux, AuraFlow)
    returns (encoder_hidden_states, hidden_states), and SD3's last block returns None for the first; reconstructing
    only the first tensor would fit the text stream and leave the image stream out of the loss."""
    if torch.is_tensor(out):
        return (out,)
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict of its non-None fields
        return tuple(t for v in out.values() for t in _out_tensors(v))
    if isinstance(out, (list, tuple)):
        return tuple(t for v in out for t in _out_tensors(v))
    return ()


def _unit_loss(out, tgt, p: float) -> torch.Tensor:
    """``lp_loss`` summed over the unit's output tensors (``_out_tensors``) against the cached targets."""
    outs = _out_tensors(out)
    if len(outs) != len(tgt):
        raise LowBitError(f"a reconstruction unit returned {len(outs)} tensors, its float original {len(tgt)}")
    return sum(lp_loss(o.float(), t, p) for o, t in zip(outs, tgt))


def _relative_unit_loss(out, tgt, p: float) -> torch.Tensor:
    """``_unit_loss`` relative to the target's own size: otherwise calls near t = 0, whose block outputs and errors
    are largest but matter least for the image, would decide every activation step size."""
    size = sum(lp_loss(t, torch.zeros_like(t), p) for t in tgt).clamp_min(1e-12)
    return _unit_loss(out, tgt, p) / size


def _capture(model, unit_name, call: Call, want: str, in_shapes: list = None):
    """Run ``model`` on ``call`` until unit ``unit_name``; return its (args, kwargs) or its output (None if the call
    never reaches the unit). ``in_shapes`` (with ``want="output"``): receives ``_shapes`` of the unit's inputs."""
    unit = model.get_submodule(unit_name)
    box = {}

    which = "quantized" if get_context(model) is not None else "full-precision"
    what = f"the {want} of block {unit_name!r} in the {which} model (timestep {call.t})"
    fix = "the model diverges on the calibration data; check its weights and the calibration inputs"

    def pre(mod, args, kwargs):
        if want == "input":
            box["v"] = (_to_store(args, torch.float16, what, fix), _to_store(kwargs, torch.float16, what, fix))
            raise _Stop

    def post(mod, args, kwargs, out):
        if want == "output":
            if in_shapes is not None:
                in_shapes.append(_shapes((args, kwargs)))
            box["v"] = _to_store(_out_tensors(out), torch.float16, what, fix)
            raise _Stop

    h1 = unit.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = unit.register_forward_hook(post, with_kwargs=True)
    dev, dt = model_device_dtype(model)
    try:
        a, kw = call.to(dev, dt)
        with torch.no_grad():
            model(*a, **kw)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    return box.get("v")


def _samples(tgt) -> int:
    """Samples in one cached call's target (one tensor, or the unit's output tensors)."""
    first = tgt if torch.is_tensor(tgt) else tgt[0]
    return first.shape[0] if first.dim() > 0 else 1


def _minibatch(inp, tgt, batch_size, g):
    """A random mini-batch of ``batch_size`` samples of one cached call (all of it when it is smaller)."""
    n = _samples(tgt)
    if batch_size >= n:
        return inp, tgt
    idx = torch.randperm(n, generator=g)[:batch_size]
    return batch_rows(inp, idx, n), batch_rows(tgt, idx, n)


def _unit_layers(unit):
    return [unit] if isinstance(unit, QuantLayer) else [m for m in unit.modules() if isinstance(m, QuantLayer)]


def _shapes(tree) -> list:
    """The shapes of every tensor in ``tree`` (nested dicts / lists / tuples), in order."""
    out = []
    map_tensors(tree, lambda t: out.append(tuple(t.shape)))
    return out


def routed_expert(unit_name: str) -> bool:
    """Whether the unit is (inside) one expert of a mixture-of-experts list (a path segment ``experts`` followed by
    an index: HiDream's ``ff_i.experts.0.w1``; a shared expert, ``shared_experts.w1``, sees every token)."""
    parts = unit_name.split(".")
    return any(p == "experts" and q.isdigit() for p, q in zip(parts, parts[1:]))


def _unit_data(fp_model, qmodel, uname, calls):
    """``(inputs, targets, calls, None)``: the unit's cached inputs in the quantized model and its outputs in the float
    model, one per call that reaches the unit in both; or ``(None, None, None, why)`` for a unit whose quantized-side
    inputs do not pair with the float-side rows (``unpaired``, see the module docstring): a routed expert (by name:
    equal row counts do not make the same tokens), a unit one model calls and the other not, or whose inputs differ
    in shape between the two models (the float side's input shapes come with its output capture: no extra pass)."""
    if routed_expert(uname):
        return None, None, None, ("a routed mixture-of-experts expert: the router may send it other tokens in the "
                                  "quantized model than in the float one, so its inputs have no float targets")
    inputs, targets, kept = [], [], []
    for c in calls:
        fp_in = []
        inp, tgt = _capture(qmodel, uname, c, "input"), _capture(fp_model, uname, c, "output", fp_in)
        if inp is None and tgt is None:  # not reached on this call by either model: nothing to pair
            continue
        if inp is None or tgt is None or _shapes(inp) != fp_in[0]:
            got = "not called" if inp is None else "inputs " + ", ".join(str(list(x)) for x in _shapes(inp))
            ref = "not called" if tgt is None else "inputs " + ", ".join(str(list(x)) for x in fp_in[0])
            return None, None, None, (f"its inputs differ between the quantized and the float model (timestep {c.t}: "
                                      f"{got} vs {ref}; the rows it gets depend on the model's values, e.g. routing)")
        inputs.append(inp)
        targets.append(tgt)
        kept.append(c)
    if not kept:
        return None, None, None, "not reached on any calibration call"
    return inputs, targets, kept, None


def _note_unpaired(qmodel, unit, why: str) -> None:
    """Record in the model's report (``pipeline.describe``) that ``unit``'s layers were not reconstructed, and why."""
    ctx = get_context(qmodel)
    rows = {r["name"]: r for r in ctx.report}
    note = f"not reconstructed: {why}; initial rounding and step sizes kept"
    for l in _unit_layers(unit):
        r = rows.get(l.name)
        if r is None:
            ctx.report.append(dict(name=l.name, kind="conv" if len(l.weight_shape) == 4 else "linear", mode="quant",
                                   w_bits=l.w_bits, a_bits=l.a_bits, reason=note[:500]))
        elif "not reconstructed" not in r["reason"]:
            r["reason"] = f"{r['reason']}; {note}"[:500]


def _draw(inputs, targets, config: ReconConfig, g, dev, dt):
    """(call index, args, kwargs, target) of a random mini-batch of a random cached call."""
    i = int(torch.randint(len(inputs), (1,), generator=g))
    return (i, *_on_device(*_minibatch(inputs[i], targets[i], config.batch_size, g), dev, dt))


def _on_device(inp, tgt, dev, dt):
    """(args, kwargs, target) of a cached batch, on the model's device: inputs in its dtype, targets in fp32."""
    a, kw = _to_model(inp, dev, dt)
    return a, kw, tuple(t.to(dev, torch.float32) for t in tgt)


def reconstruct(fp_model: nn.Module, qmodel: nn.Module, calls: List[Call], config: ReconConfig = ReconConfig(),
                progress=None, seed: int = 0) -> nn.Module:
    """AdaRound/BRECQ weight reconstruction of ``qmodel`` in place (it must be a fresh ``quantize`` result in
    fake mode), then activation re-calibration. Returns ``qmodel``.

    Transactional: cancelled (``progress`` raising, ``KeyboardInterrupt``) or failing (``NumericalError``: NaN/Inf
    in a block's data or in the result), ``qmodel`` is left bit-identical to what it was (no AdaRound state, no
    half-collected observations), so a retry equals a clean run."""
    _check_args(fp_model, qmodel, calls, config, "reconstruct")
    calls = keyed(calls, fp_model, get_context(qmodel).profile)
    with transaction(qmodel, readonly=(fp_model,)):
        _reconstruct(fp_model, qmodel, calls, config, progress, seed)
        check_finite(qmodel, "reconstruct")
    return qmodel


def _check_args(fp_model, qmodel, calls, config, verb):
    if not isinstance(config, ReconConfig):
        raise ConfigError(f"{verb}: config must be a ReconConfig, got {type(config).__name__}")
    if get_context(qmodel) is None:
        raise ConfigError(f"{verb} needs a LowBit quantized UNet (lowbit.quant.quantize) as qmodel")
    if not isinstance(fp_model, nn.Module) or get_context(fp_model) is not None:
        raise ConfigError(f"{verb} needs the full-precision UNet as fp_model (the one qmodel was quantized from)")
    if not calls:
        raise ConfigError(f"{verb} needs recorded UNet calls (CallRecorder around a full-precision sampling run)")


def _reconstruct(fp_model, qmodel, calls, config, progress, seed):
    from .api import calibrate_activations

    ctx = get_context(qmodel)
    units = find_units(qmodel, calls[0])
    g = torch.Generator().manual_seed(seed)
    dev, dt = model_device_dtype(qmodel)
    with Stage(progress, len(units) * max(config.weight_iters, 1), "reconstruct (AdaRound)") as st:
        for uname, unit in units:
            layers = [l for l in _unit_layers(unit) if l.mode == "fake" and l.modifier is None]
            if not layers or config.weight_iters == 0:
                st.step(max(config.weight_iters, 1))
                continue
            ctx.act_enabled = False
            try:
                inputs, targets, _, why = _unit_data(fp_model, qmodel, uname, calls)
                if why is not None:
                    _note_unpaired(qmodel, unit, why)
                    st.step(config.weight_iters)
                    continue
                for l in layers:
                    l.modifier = AdaRound(l).to(l.weight.device)
                params = [l.modifier.alpha for l in layers]
                opt = torch.optim.Adam(params, lr=config.weight_lr)
                warm = int(config.warmup * config.weight_iters)
                for it in range(config.weight_iters):
                    _, a, kw, tgt = _draw(inputs, targets, config, g, dev, dt)
                    rec = _unit_loss(unit(*a, **kw), tgt, 2.0)
                    if it < warm:
                        loss = rec
                    else:
                        frac = (it - warm) / max(config.weight_iters - warm, 1)
                        beta = config.beta_start + (config.beta_end - config.beta_start) * frac
                        loss = rec + config.round_weight * sum(l.modifier.regulariser(beta) for l in layers)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    st.step(loss=float(rec.detach()))
                for l in layers:  # hard rounding, stored compactly (bounded memory on large UNets)
                    l.modifier = FixedInt(l.modifier.weight_int(l))
                del inputs, targets, opt
            finally:
                ctx.act_enabled = True
    if any(l.act is not None for _, l in quant_layers(qmodel)):
        cfg = get_context(qmodel).config
        calibrate_activations(qmodel, calls, method=cfg.a_init if cfg is not None else "lp", progress=progress)
        if config.act_iters > 0:
            _reconstruct_activations(fp_model, qmodel, calls, config, units, progress, seed)


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float) -> torch.Tensor:
    """Sum over channels (dim 1) of |pred - tgt|^p, mean over everything else (A2)."""
    d = (pred - tgt).abs().pow(p)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def reconstruct_activations(fp_model: nn.Module, qmodel: nn.Module, calls: List[Call], config: ReconConfig,
                            units=None, progress=None, seed: int = 0) -> nn.Module:
    """BRECQ's activation pass (A3): per unit, in model order, learn the activation step sizes of its layers
    (zero points fixed; weights fixed at their reconstructed integers) by Adam on the L_p (p = ``p_act``) distance
    between the unit's output and the full-precision one, with cosine annealing to 0. The learning rate of a layer
    is ``act_lr`` times its mean step size (a relative rate; the papers' absolute 4e-4 assumes LDM-size ranges).

    Inputs come from the *quantized* model (activations on, as at deployment), targets from the float model.
    Each step size is the entry of the layer's per-timestep table at the call's timestep (linear interpolation,
    so neighbouring entries share the gradient); only the tables of the layer's own bit-width are learned.
    Transactional like ``reconstruct``.
    """
    _check_args(fp_model, qmodel, calls, config, "reconstruct_activations")
    calls = keyed(calls, fp_model, get_context(qmodel).profile)
    with transaction(qmodel, readonly=(fp_model,)):
        _reconstruct_activations(fp_model, qmodel, calls, config, units, progress, seed)
        check_finite(qmodel, "reconstruct_activations")
    return qmodel


def _unit_eval_loss(unit, inputs, targets, calls, config, ctx, dev, dt) -> float:
    """The unit's relative reconstruction loss over every cached calibration call (in chunks of ``batch_size``
    samples, as the training steps, so peak memory stays theirs; no gradient)."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(inputs)):
            n = _samples(targets[i])
            ctx.t = calls[i].t
            for start in range(0, n, max(1, config.batch_size)):
                idx = torch.arange(start, min(n, start + max(1, config.batch_size)))
                inp, tgt = (inputs[i], targets[i]) if len(idx) == n else \
                    (batch_rows(inputs[i], idx, n), batch_rows(targets[i], idx, n))
                a, kw, tgt = _on_device(inp, tgt, dev, dt)
                total += float(_relative_unit_loss(unit(*a, **kw), tgt, config.p_act)) * len(idx) / n
    return total


def _reconstruct_activations(fp_model, qmodel, calls, config, units, progress, seed):
    ctx = get_context(qmodel)
    units = units or find_units(qmodel, calls[0])
    g = torch.Generator().manual_seed(seed + 1)
    dev, dt = model_device_dtype(qmodel)
    with Stage(progress, len(units) * config.act_iters, "reconstruct (activation steps)") as st:
        for uname, unit in units:
            scales, groups = [], []
            for l in _unit_layers(unit):
                if l.mode == "fake" and l.act is not None and l.a_bits in l.act.bits_set:
                    sc = l.act.table(l.a_bits)[0]
                    sc.requires_grad_(True)
                    scales.append(sc)
                    # lr relative to the layer's step size: activation ranges differ by orders of magnitude
                    # across layers, and Adam moves every parameter by about lr per step whatever its size
                    groups.append(dict(params=[sc], lr=config.act_lr * float(sc.detach().mean())))
            if not scales:
                st.step(config.act_iters)
                continue
            inputs, targets, ucalls, why = _unit_data(fp_model, qmodel, uname, calls)
            if why is not None:
                _note_unpaired(qmodel, unit, why)
                for sc in scales:
                    sc.requires_grad_(False)
                st.step(config.act_iters)
                continue
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.act_iters, eta_min=0.0)
            saved_t = ctx.t
            kept = [sc.detach().clone() for sc in scales]
            try:
                loss0 = _unit_eval_loss(unit, inputs, targets, ucalls, config, ctx, dev, dt)
                for _ in range(config.act_iters):
                    i, a, kw, tgt = _draw(inputs, targets, config, g, dev, dt)
                    ctx.t = ucalls[i].t  # the step size at this call's timestep
                    loss = _relative_unit_loss(unit(*a, **kw), tgt, config.p_act)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        for sc in scales:
                            sc.clamp_(min=1e-8)
                    st.step(loss=float(loss.detach()))
                # the learned step sizes stay only where they lower the unit's loss on all the calibration data
                # (a mini-batch trajectory can end worse than the L_p search it started from)
                if not _unit_eval_loss(unit, inputs, targets, ucalls, config, ctx, dev, dt) < loss0:  # NaN too
                    with torch.no_grad():
                        for sc, k in zip(scales, kept):
                            sc.copy_(k)
            finally:
                ctx.t = saved_t
                for sc in scales:
                    sc.requires_grad_(False)
                    sc.grad = None
            del inputs, targets, opt
    return qmodel
