"""The one pipeline verb: ``run(fp_model, calls, PipelineConfig)`` -> a quantized (deployed) model.

Every host (ComfyUI nodes, the WebUI, the gradio app, the CLI, the recipes and the benches) calls this; none
composes its own sequence. A method is named once, in one vocabulary (``METHODS``):

    <base>[+ptqd[(paper)]][+vsc][+mixed]
    base:  naive         min/max weight and activation ranges (the baseline of the papers)
           lp            L_p-searched ranges (clipping that minimises the rounding error)
           recon         lp + BRECQ/AdaRound block reconstruction (PTQD's starting point)
           efficientdm   lp + EfficientDM (QALoRA + TALSQ distillation), merged into the integers
    +ptqd  PTQD bias and correlated-noise correction (``(paper)``: the paper's eps-only noise model)
    +vsc   PTQD variance-schedule calibration in the sampler (``Result.var_fn``)
    +mixed step-aware mixed precision: activation bits per timestep from measured SNR

Stages run in this order, each with one stage name and one progress bar: quantize (weights, activation
calibration: one pass of the quantized model over the calls), reconstruct, fine-tune (+ merge), schedule,
PTQD statistics, deploy. The full-precision model is never changed; ``calls`` are read, never modified.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .config import (DEFAULT_COPY_BUDGET_MB, METHODS, BitwidthSchedule, FinetuneConfig, PTQDConfig, QuantConfig,
                     ReconConfig, _Config, _field, _version, arg_field, check_schedule_fits, register_config)
from .errors import ConfigError

BASES = ("naive", "lp", "recon", "efficientdm")
MODIFIERS = ("ptqd", "ptqd(paper)", "vsc", "mixed", "act", "minmax-acts")
# What the hosts offer: ``config.METHODS`` (declared there with the other limits; the rest of the grammar is
# accepted by ``run`` and used by the benches' ablations).
DEFAULT_METHOD = "recon+ptqd+vsc"
# Names used by earlier releases (saved ComfyUI workflows, WebUI settings) -> today's names.
ALIASES = {"ptqd": "lp+ptqd", "ptqd+recon": "recon+ptqd"}


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    base: str
    ptqd: bool = False
    paper: bool = False
    vsc: bool = False
    mixed: bool = False
    act: bool = False  # BRECQ's activation pass after reconstruction (ablation)
    minmax_acts: bool = False  # min/max activation ranges with reconstruction (ablation)

    @property
    def name(self) -> str:
        mods = [("ptqd(paper)" if self.paper else "ptqd") if self.ptqd else None, "vsc" if self.vsc else None,
                "mixed" if self.mixed else None, "act" if self.act else None,
                "minmax-acts" if self.minmax_acts else None]
        return "+".join([self.base] + [m for m in mods if m])


def parse_method(name: str) -> Method:
    """``"recon+ptqd+vsc"`` -> ``Method``; raises ``ConfigError`` listing the vocabulary."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"method must be a name such as {DEFAULT_METHOD!r}; choose one of {', '.join(METHODS)}")
    name = ALIASES.get(name.strip(), name.strip())
    base, *mods = name.split("+")
    if base not in BASES:
        raise ConfigError(f"unknown method {name!r}: it must start with one of {', '.join(BASES)}; "
                          f"choose one of {', '.join(METHODS)}")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ConfigError(f"unknown part {bad[0]!r} in method {name!r}; parts after the base "
                          f"are {', '.join(MODIFIERS)}; e.g. {DEFAULT_METHOD!r}")
    twice = [m for i, m in enumerate(mods) if m in mods[:i]]
    if twice:
        raise ConfigError(f"part {twice[0]!r} appears twice in method {name!r}; give each part once, "
                          f"e.g. {DEFAULT_METHOD!r}")
    m = Method(base, ptqd=any(x.startswith("ptqd") for x in mods), paper="ptqd(paper)" in mods, vsc="vsc" in mods,
               mixed="mixed" in mods, act="act" in mods, minmax_acts="minmax-acts" in mods)
    if m.vsc and not m.ptqd:
        raise ConfigError(f"method {name!r}: +vsc needs +ptqd (the variance calibration uses PTQD's residual "
                          "variance); write e.g. 'recon+ptqd+vsc'")
    if (m.act or m.minmax_acts) and m.base != "recon":
        raise ConfigError(f"method {name!r}: +act and +minmax-acts modify reconstruction; use base 'recon'")
    return m


def _check_method(spec, v, where):
    parse_method(v)
    return ALIASES.get(v.strip(), v.strip())


@register_config
@dataclass(frozen=True)
class PipelineConfig(_Config):
    """What ``run`` does: the method (one vocabulary, see the module docstring) and the settings of its stages.

    quant: bits and ranges (``QuantConfig.preset("W4A8")``); the base ``naive`` forces min/max ranges.
    recon / finetune / ptqd: settings of those stages (used when the method has them).
    schedule: a fixed step-aware activation schedule (``BitwidthSchedule``); ``+mixed`` measures one instead.
    deploy: pack to integers and run on the kernels at the end.
    """

    method: str = _field("any", DEFAULT_METHOD, "the method: " + ", ".join(METHODS))
    quant: QuantConfig = _field("config", QuantConfig(), "bits and ranges (QuantConfig)", item=QuantConfig)
    recon: ReconConfig = _field("config", ReconConfig(), "block reconstruction settings (ReconConfig)",
                                item=ReconConfig)
    finetune: FinetuneConfig = _field("config", FinetuneConfig(), "EfficientDM settings (FinetuneConfig)",
                                      item=FinetuneConfig)
    ptqd: PTQDConfig = _field("config", PTQDConfig(), "PTQD settings (PTQDConfig); +vsc / (paper) set its switches",
                              item=PTQDConfig)
    schedule: Optional[BitwidthSchedule] = _field("config", None, "fixed step-aware activation bits, or None",
                                                  item=BitwidthSchedule, optional=True)
    mixed_candidates: tuple = _field("any", (), "activation bit-widths +mixed chooses from per timestep "
                                                "(() = the config's a_bits and 8)")
    precision: str = arg_field("precision")
    size_budget: float = arg_field("size_budget")
    deploy: bool = _field("bool", True, "pack to integers and run on the kernels at the end")
    tune_kernels: bool = _field("bool", True, "at deploy, choose each layer's kernel by measured speed (float copies "
                                "where faster, int8 copies of int4 weights, within kernel_copy_mb), then check the "
                                "choice with whole forwards on a calibration call (kernels.autotune.settle)")
    kernel_copy_mb: float = _field("float", DEFAULT_COPY_BUDGET_MB, "MiB of copies the kernel choice may keep per "
                                   "model (a layer whose copies do not fit runs its integer kernel untuned)",
                                   lo=0.0, hi=1e7)
    version: int = _version(1)

    def _check_combinations(self):
        m = parse_method(self.method)
        object.__setattr__(self, "method", m.name)
        check_schedule_fits(self.quant, m.mixed or self.schedule is not None)
        cands = self.mixed_candidates
        if not isinstance(cands, tuple) or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8
                                               for b in cands):
            raise ConfigError(f"PipelineConfig.mixed_candidates must be a tuple of activation bit-widths in 2..8, "
                              f"got {cands!r}")
        if m.mixed and self.schedule is not None:
            raise ConfigError("+mixed measures its own schedule; remove the fixed schedule or the +mixed part")

    @property
    def parsed(self) -> Method:
        return parse_method(self.method)

    @classmethod
    def for_method(cls, method: str, bits: str = "W4A8", **overrides) -> "PipelineConfig":
        """``PipelineConfig.for_method("recon+ptqd", "W4A8", recon=ReconConfig.quick())``."""
        quant = overrides.pop("quant", None) or QuantConfig.preset(bits)
        return cls(method=method, quant=quant, **overrides)


@dataclass
class Result:
    """What ``run`` returns: the quantized model, the sampler's variance hook (``+vsc``), what was done."""

    model: nn.Module
    var_fn: Optional[Callable[[float], float]] = None  # PTQD residual variance at timestep t (+vsc), else None
    seconds: Dict[str, float] = field(default_factory=dict)  # per stage
    info: dict = field(default_factory=dict)  # e.g. the measured schedule, the fine-tune losses

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _effective_quant(cfg: PipelineConfig, m: Method) -> QuantConfig:
    q = cfg.quant
    if m.base == "naive":
        return dataclasses.replace(q, w_init="minmax", a_init="minmax")
    if m.minmax_acts:
        return dataclasses.replace(q, a_init="minmax")
    return q


def needs_calls(cfg: PipelineConfig) -> bool:
    """Whether ``cfg`` needs recorded calibration calls (static activation ranges or a data-driven stage)."""
    m, q = cfg.parsed, cfg.quant
    static = q.a_bits != 16 and not q.a_dynamic
    return static or m.base in ("recon", "efficientdm") or m.ptqd or m.mixed


def _per_sample_lists(model, call) -> bool:
    """The call passes its noisy input as a list of per-sample tensors (diffusers' Z-Image), positionally or by one
    of the profile's sample keywords."""
    from .profiles import profile_for

    cands = ([call.args[0]] if call.args else []) + [call.kwargs.get(k) for k in profile_for(model).sample_kwargs]
    return any(isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v) for v in cands)


def check(fp_model, calls, config: PipelineConfig, alphas_cumprod=None, profile=None):
    """Every cheap check ``run`` makes, before any work (hosts call it to refuse early; ``calls=None``: the
    calls are recorded later, not checked now; ``profile``: the ``profile=`` argument, a known name or None)."""
    if not isinstance(config, PipelineConfig):
        raise ConfigError(f"config must be a PipelineConfig, got {type(config).__name__}")
    if not isinstance(fp_model, nn.Module):
        raise ConfigError(f"expected the full-precision model (a torch.nn.Module), got {type(fp_model).__name__}")
    from .profiles import resolve_profile

    resolve_profile(fp_model, profile)
    m = config.parsed
    if calls and (m.ptqd or m.mixed or m.base == "efficientdm" or config.quant.time_bins > 1
                  or config.schedule is not None):
        from .calib import keyed, require_timesteps

        what = ("PTQD" if m.ptqd else "+mixed" if m.mixed else "EfficientDM" if m.base == "efficientdm"
                else "a bit-width schedule" if config.schedule is not None else "time_bins > 1")
        require_timesteps(fp_model, keyed(calls, fp_model, profile), profile, what)
    if calls is not None and needs_calls(config) and not calls:
        raise ConfigError(f"method {m.name} at {config.quant.name} needs calibration calls: record them with "
                          "lowbit.quant.CallRecorder around a full-precision sampling run")
    if m.mixed and alphas_cumprod is None:
        raise ConfigError("+mixed needs the model's noise schedule: pass alphas_cumprod= (the scheduler's "
                          "alphas_cumprod, length T)")
    if m.base == "efficientdm" and calls and _per_sample_lists(fp_model, calls[0]):
        raise ConfigError("efficientdm fine-tunes on batches of rows of the recorded calls; this model takes its input "
                          "as a list of per-sample tensors (diffusers' Z-Image), which it cannot batch: use recon or "
                          "lp (with +ptqd)")
    return m


def _check_calls_fit(fp_model: nn.Module, calls, needs_prediction: bool = False) -> None:
    """The float model runs the first recorded call (one forward, before any work): calls recorded from another
    model fail here with a ConfigError saying so, not later inside a stage with the model's own error; with
    ``needs_prediction`` (PTQD, EfficientDM, the measured plan, +mixed), so does a model whose output is not one
    prediction per sample (a ControlNet's residuals)."""
    if not calls:
        return
    from .api import calls_must_fit
    from .calib import check_prediction, run_calls
    from .context import sample_of_call
    from .profiles import profile_for

    outs = []
    with calls_must_fit():
        run_calls(fp_model, calls[:1], fn=lambda c, out: outs.append((c, out)))
    if needs_prediction and outs:
        c, out = outs[0]
        try:
            check_prediction(out, sample_of_call(c.args, c.kwargs, profile_for(fp_model)))
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


def run(fp_model: nn.Module, calls, config: PipelineConfig = PipelineConfig(), *, alphas_cumprod=None,
        num_train_timesteps: Optional[int] = None, profile: Optional[str] = None, stat_calls=None,
        start: Optional[nn.Module] = None, progress=None) -> Result:
    """Quantize ``fp_model`` with ``config`` on the recorded ``calls``; returns a ``Result`` whose model is a
    new module (``fp_model`` is untouched). ``stat_calls``: other calls for the PTQD statistics (default:
    ``calls``). ``start``: continue from this LowBit quantized model instead of quantizing ``fp_model`` (e.g.
    fine-tune or re-measure PTQD on a loaded file; the base's quantization is taken as done; ``start`` is not
    changed either). ``progress(done, total, info)`` sees ``info["stage"]`` and may raise
    to cancel; a cancelled run leaves its inputs unchanged and returns nothing.

    Training stages (bases ``recon`` and ``efficientdm``) run with autograd on, on plain copies of a float model or
    calls a host made under ``torch.inference_mode()`` (Forge and ComfyUI load checkpoints and sample there; autograd
    may not save such tensors; the model's weights become plain views of the same memory, not duplicated); the other
    bases use them as they are (no copy)."""
    m = check(fp_model, list(calls or []), config, alphas_cumprod, profile)
    from .calib import keyed

    calls = keyed(list(calls or []), fp_model, profile)  # (keyed the way the run's profile maps timesteps)
    if stat_calls is not None:
        stat_calls = keyed(list(stat_calls), fp_model, profile)
    args = dict(alphas_cumprod=alphas_cumprod, num_train_timesteps=num_train_timesteps, profile=profile,
                stat_calls=stat_calls, start=start, progress=progress)
    if m.base not in ("recon", "efficientdm"):
        return _stages(m, fp_model, calls, config, **args)
    from .calib import for_training, plain_module, training_mode

    with training_mode():
        fp_model, calls = for_training(fp_model, calls)
        if start is not None:  # (a model quantized from the host's inference tensors holds some of them)
            args["start"] = plain_module(start)
        return _stages(m, fp_model, calls, config, **args)


def _stages(m: Method, fp_model: nn.Module, calls, config: PipelineConfig, *, alphas_cumprod, num_train_timesteps,
            profile, stat_calls, start, progress) -> Result:
    """:func:`run`'s stages, after its checks (``m``: the parsed method)."""
    from .api import deploy_, quantize
    from .ptqd import attach_stats, collect_stats

    _check_calls_fit(fp_model, calls, needs_prediction=(m.ptqd or m.mixed or m.base == "efficientdm"
                                                         or config.precision == "measured"))
    if num_train_timesteps is None:
        num_train_timesteps = len(alphas_cumprod) if alphas_cumprod is not None else 1000
    qcfg = _effective_quant(config, m)
    res = Result(model=None)
    t0 = time.perf_counter()

    def lap(stage):
        nonlocal t0
        now = time.perf_counter()
        res.seconds[stage] = res.seconds.get(stage, 0.0) + now - t0
        t0 = now

    candidates = (tuple(sorted(set(config.mixed_candidates) or {qcfg.a_bits, 8})) if m.mixed else ())
    if start is not None:
        import copy

        from .context import get_context

        if get_context(start) is None or m.base == "recon" or m.mixed:
            raise ConfigError("start= continues from a LowBit quantized model with base 'lp', 'naive' or "
                              f"'efficientdm' (no +mixed); got method {m.name} and a "
                              f"{'quantized' if get_context(start) else 'float'} model")
        q = start if m.base == "efficientdm" else copy.deepcopy(start)  # (finetune works on its own copy)
    else:
        measured = []
        if config.precision == "measured" and calls:
            from .sensitivity import plan_precision

            plan = plan_precision(fp_model, calls, qcfg, budget=config.size_budget,
                                  num_train_timesteps=num_train_timesteps, profile=profile, progress=progress)
            qcfg, measured = dataclasses.replace(qcfg, rules=plan.rules), plan.report
            lap("precision plan")
        q = quantize(fp_model, qcfg, calls or None, schedule=config.schedule, a_bits_candidates=candidates,
                     num_train_timesteps=num_train_timesteps, profile=profile, progress=progress)
        if measured:
            from .context import get_context

            why = {r["name"]: r["reason"] for r in measured}
            for r in get_context(q).report:
                r["reason"] = why.get(r["name"], r["reason"])
            res.info["precision"] = measured
        lap("quantize")
    if m.base == "recon":
        from .recon import reconstruct

        rcfg = dataclasses.replace(config.recon, act_iters=config.recon.act_iters or 100) if m.act else config.recon
        reconstruct(fp_model, q, calls, rcfg, progress=progress)
        lap("reconstruct")
    if m.base == "efficientdm":
        from .efficientdm import finetune, merge_
        from .context import get_context

        q = merge_(finetune(q, fp_model, calls, config.finetune, progress=progress))
        res.info["finetune"] = dict(get_context(q).finetune_info or {})
        lap("fine-tune")
    if m.mixed:
        from .schedule import auto_schedule

        sched, meas = auto_schedule(fp_model, q, calls, alphas_cumprod, candidates=candidates, progress=progress)
        res.info["schedule"] = sched.segments
        lap("schedule")
    if m.ptqd:
        pcfg = dataclasses.replace(config.ptqd, input_correlation=False) if m.paper else config.ptqd
        pcfg = dataclasses.replace(pcfg, variance_calibration=m.vsc)
        attach_stats(q, collect_stats(fp_model, q, list(stat_calls or calls), pcfg, progress=progress),
                     active=pcfg.bias_correction or pcfg.correlation_correction)
        if m.vsc:
            res.var_fn = get_stats_var(q)
        lap("PTQD statistics")
    if config.deploy:
        deploy_(q, tune=config.tune_kernels, copy_budget_mb=config.kernel_copy_mb)
        if config.tune_kernels and calls:  # per-layer choices, then the whole-model check on a calibration call
            from ..kernels import autotune

            res.info["kernel_choice"] = autotune.settle(q, calls[len(calls) // 2], rounds=3, progress=progress)
        lap("deploy")
    res.model = q
    return res


def get_stats_var(q) -> Optional[Callable[[float], float]]:
    """The PTQD residual-variance function of a quantized model (what samplers use for +vsc), or None."""
    from .ptqd import get_stats

    st = get_stats(q)
    return None if st is None else st.residual_var_at


def describe(q: nn.Module) -> List[str]:
    """Lines for a CLI / node text output: which layers are not at the target bits, and why."""
    from .context import get_context
    from .layers import quant_layers

    ctx = get_context(q)
    if ctx is None:
        return ["not a LowBit quantized model"]
    layers = list(quant_layers(q))
    counts: Dict[str, int] = {}
    for _, l in layers:
        key = f"W{l.w_bits}A{l.a_bits}"
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{ctx.config.name if ctx.config else '?'} ({ctx.profile} profile): " +
             ", ".join(f"{n} layers {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))]
    reasons = {r["name"]: r for r in ctx.report}
    target = (ctx.config.w_bits, ctx.config.a_bits) if ctx.config else None
    for name, l in layers:  # every layer not at the target precision, with the reason it was decided
        r = reasons.get(name) or reasons.get(name.split(".parts.")[0])
        if (l.w_bits, l.a_bits) != target or r is not None:
            why = r["reason"] if r is not None else "as saved in the file"
            lines.append(f"  {name}: W{l.w_bits}A{l.a_bits} ({why})")
    for r in ctx.report:
        if r.get("mode") == "fp":
            lines.append(f"  {r['name']}: float ({r['reason']})")
    bins = max((len(l.act.tgrid) for _, l in layers if l.act is not None), default=1)
    if bins > 1:
        from .profiles import get_profile

        floor = get_profile(ctx.profile).min_time_bins
        lines.append(f"activation ranges per timestep: {bins} bins" + (
            f" (at least {floor} for the {ctx.profile} profile: its inputs change scale along a run)" if floor > 1
            else ""))
    if ctx.schedule is not None:  # step-aware precision: what the A<bits> above become along the run
        segs = ", ".join(f"t {lo:g}..{hi:g}: A{b}" for lo, hi, b in sorted(ctx.schedule.segments, reverse=True))
        n = sum(1 for _, l in layers if getattr(l, "scheduled", False) and l.a_bits != 16)
        lines.append(f"activation bits by timestep (bit-width schedule, used by {n} layers in place of their "
                     f"A bits above): {segs}")
    return lines


def method_choices(include_ablations: bool = False) -> Sequence[str]:
    return METHODS + (("recon+act", "recon+minmax-acts", "recon+ptqd(paper)") if include_ablations else ())

