"""Frozen, versioned configuration dataclasses, their limits, and their JSON (de)serialisation.

Limits are declared once, here: every config field carries a :class:`Spec` (kind, range or choices, default,
help text) in its ``dataclasses.field`` metadata, built by the helpers ``_int``/``_float``/``_bool``/...
below. Construction checks every field against its spec (one checker per kind, :data:`_CHECKERS`) and then
the combinations the class forbids, so a bad value raises :class:`ConfigError` before any work starts.
Hosts read the same specs to build their widgets and help text::

    field_spec(QuantConfig, "w_bits")   -> Spec(kind="int", lo=2, hi=8, default=4, help=...)
    arg_spec("calib_samples")           -> the limits of a verb / command-line argument (``ARGS``)
    check_verb_args("quantize", num_train_timesteps=0)   -> ConfigError before any work

Every config serialises to ``{"_type": name, "_version": n, "_data": {...}}`` and is rebuilt only from the
allowlist ``CONFIG_TYPES`` below: nothing read from a file is ever executed or unpickled.

This module imports nothing heavy (no torch): the command line reads it to print ``--help``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import MISSING, dataclass, field
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigError

MAX_JSON_BYTES = 4 * 1024 * 1024  # a config header larger than this is refused before parsing
MAX_JSON_DEPTH = 32  # nesting deeper than this in a config object is refused (no RecursionError)

CONFIG_TYPES: dict = {}

ACT_BITS_NONE = 16  # a_bits=16 means "activations stay in floating point" (weight-only formats)
# deploy_ / PipelineConfig.kernel_copy_mb: MiB of copies (float copies for the float path, int8 copies of int4
# weights) the kernel autotuner may keep per model; layers beyond it run their integer kernel untuned
DEFAULT_COPY_BUDGET_MB = 64.0
WEIGHT_INIT = ("minmax", "lp")
ACT_INIT = ("minmax", "lp")
LAYER_MODES = ("quant", "w8a8", "fp")
LAYER_KINDS = ("any", "conv", "linear")
# The formats tested end to end (fake-quant, kernels, save/load) and offered by the CLI and the hosts.
# ``QuantConfig.preset`` builds any W<b>A<b> the field limits allow (library use, e.g. W3A8, W2A8).
PRESETS = ("W8A8", "W4A8", "W4A4", "W4A16", "W8A16")

# The quantization methods offered to users (CLI, hosts): the one vocabulary; bench-only ablations are not here.
# The method vocabulary every host offers (grammar and meaning: ``pipeline.py``).
METHODS = ("naive", "naive+ptqd", "lp", "lp+ptqd", "recon", "recon+ptqd", "recon+ptqd+vsc", "recon+ptqd+vsc+mixed",
           "efficientdm", "efficientdm+ptqd")

SPEC_KEY = "lowbit_spec"


# --------------------------------------------------------------------------------------------------- limits

def _short(value) -> str:
    """repr for messages: never raises (huge integers), never longer than a line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        r = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        r = f"<{type(value).__name__}>"
    return r if len(r) <= 60 else r[:57] + "..."


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        x = int(x)
    return f"{x:,}".replace(",", "_") if isinstance(x, int) and abs(x) >= 100_000 else str(x)


@dataclass(frozen=True)
class Spec:
    """The limits of one setting: ``kind`` (int, float, bool, choice, regex, str, items, segments, config (an
    instance of ``item``), version; ``any`` = checked by the class itself),
    ``lo``/``hi`` (closed unless ``lo_open``), ``choices``, ``extra`` (values accepted outside lo..hi, e.g.
    a_bits=16 for floating-point activations), ``optional`` (None accepted), ``multiple_of``, ``item`` (the
    class of each element of an ``items`` tuple), ``default`` and ``help``."""

    kind: str
    default: Any = None
    help: str = ""
    lo: Any = None
    hi: Any = None
    choices: Tuple = ()
    extra: Tuple = ()
    optional: bool = False
    lo_open: bool = False
    multiple_of: Optional[int] = None
    item: Any = None
    max_len: int = 1000
    label: str = ""
    name: str = ""
    owner: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def range_text(self) -> str:
        """``2..8 or 16`` (int), ``(0, 1]`` (float); "" for other kinds."""
        if self.kind == "int":
            s = f"{_num(self.lo)}..{_num(self.hi)}"
        elif self.kind == "float":
            s = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        else:
            return ""
        return s + "".join(f" or {e!r}" for e in self.extra)

    def describe(self) -> str:
        """The allowed values in words, e.g. ``an integer in 2..8 or 16``, ``one of 'lp', 'minmax'``."""
        k = self.kind
        if k == "int":
            s = f"an integer in {_num(self.lo)}..{_num(self.hi)}"
            if self.multiple_of:
                s += f", a multiple of {self.multiple_of}"
        elif k == "float":
            s = f"a number in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        elif k == "bool":
            s = "True or False"
        elif k in ("choice", "version"):
            s = "one of " + ", ".join(map(repr, self.choices))
        elif k == "regex":
            s = "a regular expression"
        elif k == "items":
            s = f"a tuple of {getattr(self.item, '__name__', self.item)}"
        elif k == "segments":
            s = "a tuple of (t_lo, t_hi, a_bits)"
        elif k == "config":
            s = f"a {getattr(self.item, '__name__', self.item)}"
        else:
            s = f"a {k}"
        if self.extra:
            s += " or " + " or ".join(map(repr, self.extra))
        if self.optional:
            s += " or None"
        return s

    def check(self, value, where: str = ""):
        """The value, normalised (numpy integers to int, ints to float for float fields, lists to tuples), or
        ConfigError naming the setting, the value and what is allowed."""
        if value is None and self.optional:
            return None
        if where and not where.endswith(" "):  # check(v, "LowBit") reads "LowBit: calib_samples=0 ..."
            where += ": "
        try:
            checker = _CHECKERS[self.kind]
        except KeyError:
            raise ConfigError(f"{self.qualname}: unknown spec kind {self.kind!r}") from None
        return checker(self, value, where)

    def fail(self, value, problem: str, where: str = ""):
        raise ConfigError(f"{where}{self.qualname}={_short(value)} {problem}")


def _chk_int(spec: Spec, v, where):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        spec.fail(v, f"is not a whole number: use {spec.describe()}", where)
    v = int(v)
    if v in spec.extra:
        return v
    if not spec.lo <= v <= spec.hi:
        spec.fail(v, f"is out of range: allowed {spec.range_text()}", where)
    if spec.multiple_of and v % spec.multiple_of:
        spec.fail(v, f"must be a multiple of {spec.multiple_of} (e.g. 32, 64, 128)", where)
    return v


def _chk_float(spec: Spec, v, where):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        spec.fail(v, f"is not a number: use {spec.describe()}", where)
    try:
        f = float(v)
    except (OverflowError, ValueError):
        f = math.inf
    if not math.isfinite(f):
        spec.fail(v, f"is not finite: use {spec.describe()}", where)
    if not (spec.lo < f if spec.lo_open else spec.lo <= f) or not f <= spec.hi:
        spec.fail(v, f"is out of range: allowed {spec.range_text()}", where)
    return f


def _chk_bool(spec: Spec, v, where):
    if not isinstance(v, bool) and type(v).__name__ != "bool_":  # numpy.bool_ is accepted as a bool
        spec.fail(v, "must be True or False (a bool, not a string or a number)", where)
    return bool(v)


def _chk_choice(spec: Spec, v, where):
    if not isinstance(v, str) or v not in spec.choices:
        spec.fail(v, f"is not supported: choose {spec.describe()}", where)
    return v


def _chk_str(spec: Spec, v, where):
    if not isinstance(v, str):
        spec.fail(v, "must be a string", where)
    if len(v) > spec.max_len:
        spec.fail(v, f"is {len(v)} characters long: at most {spec.max_len}", where)
    return v


def _chk_regex(spec: Spec, v, where):
    _chk_str(spec, v, where)
    try:
        re.compile(v)
    except (re.error, RecursionError, OverflowError) as exc:
        spec.fail(v, f"is not a valid regular expression ({exc}); fix the pattern (escape '.', '(' with '\\')",
                  where)
    return v


def _chk_items(spec: Spec, v, where):
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        spec.fail(v, f"must be {spec.describe()} (use () for none)", where)
    if len(v) > spec.max_len:
        spec.fail(v, f"has {len(v)} items: at most {spec.max_len}", where)
    for i, it in enumerate(v):
        if not isinstance(it, spec.item):
            raise ConfigError(f"{where}{spec.qualname}[{i}]={_short(it)} must be a {spec.item.__name__}")
    return tuple(v)


_T_SPEC = Spec("float", lo=0.0, hi=1e6, name="t")
_SEG_BITS_SPEC = Spec("int", lo=2, hi=8, extra=(ACT_BITS_NONE,), name="a_bits")


def _chk_segments(spec: Spec, v, where):
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not v:
        spec.fail(v, "must be a non-empty tuple of (t_lo, t_hi, a_bits) segments", where)
    if len(v) > spec.max_len:
        spec.fail(v, f"has {len(v)} segments: at most {spec.max_len}", where)
    out = []
    for i, s in enumerate(v):
        at = f"{where}{spec.qualname}[{i}] "
        if isinstance(s, (str, bytes)) or not isinstance(s, (list, tuple)) or len(s) != 3:
            raise ConfigError(f"{at}{_short(s)} must be a triple (t_lo, t_hi, a_bits)")
        out.append((dataclasses.replace(_T_SPEC, name="t_lo").check(s[0], at),
                     dataclasses.replace(_T_SPEC, name="t_hi").check(s[1], at),
                     _SEG_BITS_SPEC.check(s[2], at)))
    return tuple(out)


def _chk_config(spec: Spec, v, where):
    if not isinstance(v, spec.item):
        spec.fail(v, f"must be a {spec.item.__name__}" + (" or None" if spec.optional else ""), where)
    return v


def _chk_version(spec: Spec, v, where):
    if isinstance(v, bool) or not isinstance(v, int) or v not in spec.choices:
        spec.fail(v, f"is not a version this LowBit knows (it builds version {', '.join(map(str, spec.choices))}); "
                     "leave version at its default (files with older versions are migrated by lowbit.quant.load)",
                  where)
    return v


def _chk_any(spec: Spec, v, where):
    return v


_CHECKERS = {"int": _chk_int, "float": _chk_float, "bool": _chk_bool, "choice": _chk_choice, "str": _chk_str,
             "regex": _chk_regex, "items": _chk_items, "segments": _chk_segments, "config": _chk_config,
             "version": _chk_version,
             "any": _chk_any}


def _field(kind: str, default=MISSING, help: str = "", **kw):
    return field(default=default, metadata={SPEC_KEY: dict(kind=kind, help=help, **kw)})


def _int(default, lo, hi, help, **kw):
    return _field("int", default, help, lo=lo, hi=hi, **kw)


def _float(default, lo, hi, help, **kw):
    return _field("float", default, help, lo=lo, hi=hi, **kw)


def _bool(default, help, **kw):
    return _field("bool", default, help, **kw)


def _choice(default, choices, help, **kw):
    return _field("choice", default, help, choices=tuple(choices), **kw)


def _version(n: int):
    return _field("version", n, "config format version (leave at the default)", choices=(n,))


def _inferred(f: dataclasses.Field) -> dict:
    """A spec for a field declared without one: the type of its default, nothing more (the tests list such
    fields: every field should declare its limits and help)."""
    d = f.default
    if isinstance(d, bool):
        return dict(kind="bool")
    if isinstance(d, int):
        return dict(kind="int", lo=-(2 ** 63), hi=2 ** 63 - 1)
    if isinstance(d, float):
        return dict(kind="float", lo=-math.inf, hi=math.inf)
    if isinstance(d, str):
        return dict(kind="str")
    return dict(kind="any")


_SPECS: Dict[type, Dict[str, Spec]] = {}


def specs(cls) -> Dict[str, Spec]:
    """name -> :class:`Spec` for every field of a config class (or instance, or registered type name)."""
    if isinstance(cls, str):
        if cls not in CONFIG_TYPES:
            raise ConfigError(f"unknown config type {cls!r}; known: {sorted(CONFIG_TYPES)}")
        cls = CONFIG_TYPES[cls]
    if not isinstance(cls, type):
        cls = type(cls)
    got = _SPECS.get(cls)
    if got is None:
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{cls.__name__} is not a LowBit config class")
        got = {}
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata.get(SPEC_KEY) or _inferred(f))
            got[f.name] = Spec(default=f.default, name=f.name, owner=cls.__name__, **meta)
        _SPECS[cls] = got
    return got


def field_spec(cls, name: str) -> Spec:
    """The limits, default and help of one config field: ``field_spec(QuantConfig, "w_bits")``."""
    s = specs(cls)
    if name not in s:
        owner = cls if isinstance(cls, str) else getattr(cls, "__name__", type(cls).__name__)
        raise ConfigError(f"{owner} has no setting {name!r}; settings: {', '.join(s)}")
    return s[name]


class _Config:
    """Base of the config dataclasses: every field is checked against its spec, then the combinations."""

    def __post_init__(self):
        for name, spec in specs(type(self)).items():
            object.__setattr__(self, name, spec.check(getattr(self, name)))
        self._check_combinations()

    def _check_combinations(self):
        pass


def register_config(cls):
    CONFIG_TYPES[cls.__name__] = cls
    return cls


# --------------------------------------------------------------------------------------------------- configs

@register_config
@dataclass(frozen=True)
class LayerRule(_Config):
    """``pattern`` (a regular expression searched in the module's qualified name) -> ``mode``.

    mode: "quant" (use the config's bits), "w8a8" (keep at 8/8 bits), "fp" (leave the float layer).
    ``kind`` restricts the rule to "conv", "linear" or "any".
    """

    pattern: str = _field("regex", help="regular expression searched in the layer's qualified name")
    mode: str = _field("choice", choices=LAYER_MODES,
                       help="quant: the config's bits; w8a8: keep at 8/8 bits; fp: leave the float layer")
    kind: str = _choice("any", LAYER_KINDS, "which layers the rule applies to")
    version: int = _version(1)


# User rules come first (first match wins); then the model profile's own edge rules (``profiles/``: conv_in,
# conv_out, embeddings, skip and downsample convolutions of each family), then the structural first/last
# convolution rule. So the default is no user rule.
DEFAULT_RULES: Tuple[LayerRule, ...] = ()


@register_config
@dataclass(frozen=True)
class QuantConfig(_Config):
    """What to quantize and to how many bits.

    w_bits: weight bits (2..8), symmetric signed integers per output channel (``w_group_size=None``) or per
        group of ``w_group_size`` input elements.
    a_bits: activation bits (2..8) on the input of each Conv2d/Linear, asymmetric unsigned, static per tensor
        (calibrated); ``a_bits=16`` keeps activations in floating point (weight-only W4A16/W8A16).
    a_dynamic: per-token dynamic activation scales instead of calibrated static ones (A8 only).
    time_bins: number of timestep bins with their own activation scales (1 = one scale for all steps).
    split_concat: split convolutions that read a channel concatenation (decoder skip connections) into one
        convolution per concatenated tensor, each with its own activation and weight scales (Q-Diffusion's
        shortcut split; found by tracing one calibration call, see ``split.py``).
    """

    w_bits: int = _int(4, 2, 8, "weight bits: symmetric signed integers per output channel (or per group)",
                       label="weight bits")
    a_bits: int = _int(8, 2, 8, "activation bits on the input of each Conv2d/Linear; 16 keeps activations in "
                                "floating point (weight-only formats)", extra=(ACT_BITS_NONE,),
                       label="activation bits")
    w_group_size: Optional[int] = _int(None, 8, 4096, "input elements per weight scale (None: one scale per "
                                                      "output channel)", optional=True, multiple_of=8,
                                       label="weight group size")
    w_init: str = _choice("lp", WEIGHT_INIT, "weight step sizes: lp = clipping that minimises the L2.4 rounding "
                                             "error (better), minmax = no clipping (fast)", label="weight init")
    a_init: str = _choice("lp", ACT_INIT, "activation ranges: lp = L_p clipping search, minmax = observed range",
                          label="activation init")
    a_dynamic: bool = _bool(False, "per-token dynamic activation scales instead of calibrated static ones (A8 "
                                   "only)", label="dynamic activations")
    time_bins: int = _int(1, 1, 1000, "timestep bins with their own activation scales (1 = one scale for all "
                                      "steps)", label="time bins")
    split_concat: bool = _bool(True, "split convolutions reading a channel concatenation into one per input "
                                     "(Q-Diffusion's shortcut split)", label="split concatenations")
    rules: Tuple[LayerRule, ...] = _field("items", DEFAULT_RULES, "which layers keep 8 bits or float, by name "
                                                                  "pattern", item=LayerRule)
    w_format: Optional[str] = _field("str", None, "registered weight format of the quantized layers (None: the "
                                                  "kernel layout of the bits, e.g. int4_channel); layers it cannot "
                                                  "store (those kept at 8 bits) use the kernel layout",
                                     optional=True, max_len=100, label="weight format")
    version: int = _version(1)

    def _check_combinations(self):
        if self.w_format is not None:
            from ..kernels.formats import get_format

            try:
                get_format(self.w_format).check(self.w_bits, self.w_group_size)
            except ValueError as exc:
                raise ConfigError(f"QuantConfig: w_format={self.w_format!r}: {exc}; pick a registered format that "
                                  "stores these bits, or w_format=None") from None
        if self.a_dynamic and self.a_bits != 8:
            raise ConfigError(f"QuantConfig: a_dynamic=True needs a_bits=8 (dynamic per-token scales are A8 only), "
                              f"got a_bits={self.a_bits}; set a_bits=8 or a_dynamic=False")

    @property
    def name(self) -> str:
        a = "16" if self.a_bits == ACT_BITS_NONE else str(self.a_bits)
        return f"W{self.w_bits}A{a}"

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantConfig":
        """``QuantConfig.preset("W4A8")``; tested formats: ``PRESETS`` (W8A8, W4A8, W4A4, W4A16, W8A16); any
        W<bits>A<bits> within the field limits is built (W3A8, W2A8 ...)."""
        m = re.fullmatch(r"[Ww](\d{1,3})[Aa](\d{1,3})", name.strip()) if isinstance(name, str) else None
        if not m:
            raise ConfigError(f"unknown bit-width preset {_short(name)}; write it as W<bits>A<bits>, e.g. "
                              f"{' or '.join(PRESETS[:2])} or W4A16")
        names = specs(cls)
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(f"QuantConfig has no setting {unknown[0]!r}; settings: {', '.join(names)}")
        w, a = int(m.group(1)), int(m.group(2))
        kw = dict(w_bits=w, a_bits=a)
        if a == ACT_BITS_NONE and w <= 4:
            kw["w_group_size"] = 64  # weight-only int4 uses group-wise scales (the CPU int4 kernel needs them)
        kw.update(overrides)
        return cls(**kw)


@register_config
@dataclass(frozen=True)
class BitwidthSchedule(_Config):
    """Activation (and optionally weight) bits per range of the sampling run.

    ``segments``: tuple of (t_lo, t_hi, a_bits): DDPM timesteps t in [t_lo, t_hi] use ``a_bits``. Segments
    must cover [0, num_train_timesteps-1] without overlap, each with t_hi > t_lo. Keyed by timestep (sigma
    maps to t), never by a call counter, so any sampler and step count picks the right bits.
    """

    segments: Tuple[Tuple[float, float, int], ...] = _field(
        "segments", ((0.0, 999.0, 8),), "(t_lo, t_hi, a_bits) per timestep range, covering 0..T-1 without overlap")
    num_train_timesteps: int = _int(1000, 2, 100_000, "training timesteps T of the model's noise schedule")
    version: int = _version(1)

    def _check_combinations(self):
        T = self.num_train_timesteps
        for s in self.segments:
            if s[1] > T:
                raise ConfigError(f"BitwidthSchedule segment {s}: t_hi={s[1]} is past the last timestep {T - 1}")
            if s[1] <= s[0]:
                raise ConfigError(f"BitwidthSchedule segment {s} has zero or negative width: t_hi must be > t_lo")
        ordered = sorted(self.segments)
        if ordered[0][0] > 0 or ordered[-1][1] < T - 1:
            raise ConfigError(f"BitwidthSchedule segments must cover timesteps 0..{T - 1}; got {ordered}")
        for a, b in zip(ordered, ordered[1:]):
            if b[0] > a[1] + 1:
                raise ConfigError(f"BitwidthSchedule has a gap between segments {a} and {b}; make them meet")
            if b[0] < a[1]:
                raise ConfigError(f"BitwidthSchedule segments {a} and {b} overlap; make each start where the "
                                  "previous one ends")

    @property
    def bits_used(self) -> Tuple[int, ...]:
        return tuple(sorted({int(s[2]) for s in self.segments}))

    def a_bits_at(self, t: float) -> int:
        for lo, hi, b in sorted(self.segments):
            if t <= hi + 0.5:
                return int(b)
        return int(sorted(self.segments)[-1][2])

    @classmethod
    def from_percent(cls, switch_percent: float, early_bits: int, late_bits: int, num_train_timesteps: int = 1000):
        """Early (noisy) part of the run, ``switch_percent`` of the timestep range, at ``early_bits``; the rest at
        ``late_bits``."""
        switch_percent = ARGS["switch_percent"].check(switch_percent, "BitwidthSchedule.from_percent: ")
        T = field_spec(cls, "num_train_timesteps").check(num_train_timesteps, "BitwidthSchedule.from_percent: ") - 1
        cut = T * (1.0 - switch_percent)
        if switch_percent <= 0:
            return cls(((0.0, float(T), late_bits),), num_train_timesteps)
        if switch_percent >= 1:
            return cls(((0.0, float(T), early_bits),), num_train_timesteps)
        return cls(((0.0, float(cut), late_bits), (float(cut), float(T), early_bits)), num_train_timesteps)


@register_config
@dataclass(frozen=True)
class ReconConfig(_Config):
    """BRECQ/AdaRound block reconstruction.

    weight_iters: Adam steps per unit (block or loose layer) of the weight pass (AdaRound). The papers use
        10 000-20 000 on 400M-parameter LDMs; the default is a tenth of that, ``ReconConfig.quick()`` a hundredth
        (the benches on the small default model use 100).
    act_iters: Adam steps per unit of BRECQ's activation pass (learned step sizes after the L_p search; the
        papers use 5 000). Off by default: on the default model it made W4A4 worse (README, "recon+act" row).
    batch_size: samples per step, drawn from one recorded call (a call holds a whole sampling batch).
    """

    weight_iters: int = _int(2000, 0, 1_000_000, "AdaRound Adam steps per block or loose layer",
                             label="reconstruction iterations")
    act_iters: int = _int(0, 0, 1_000_000, "Adam steps per unit of the activation pass (0 = off)")
    batch_size: int = _int(16, 1, 4096, "samples per step, drawn from one recorded call")
    weight_lr: float = _float(1e-3, 0, 1, "Adam learning rate of the rounding variables", lo_open=True)
    act_lr: float = _float(4e-3, 0, 1, "activation pass learning rate, relative to each layer's step size",
                           lo_open=True)
    round_weight: float = _float(0.01, 0, 1000, "weight of AdaRound's rounding regulariser")
    beta_start: float = _float(20.0, 0, 1000, "regulariser sharpness at the start of annealing", lo_open=True)
    beta_end: float = _float(2.0, 0, 1000, "regulariser sharpness at the end (smaller than beta_start)",
                             lo_open=True)
    warmup: float = _float(0.2, 0, 1, "fraction of the steps before the regulariser starts")
    p_act: float = _float(2.4, 1, 4, "p of the L_p reconstruction loss")
    version: int = _version(1)

    def _check_combinations(self):
        if self.beta_end > self.beta_start:
            raise ConfigError(f"ReconConfig: beta_start={self.beta_start} < beta_end={self.beta_end}; AdaRound "
                              "anneals beta downwards: make beta_start >= beta_end")

    @classmethod
    def quick(cls, **overrides) -> "ReconConfig":
        """A fast setting for previews: 200 AdaRound steps per unit."""
        return cls(**{**dict(weight_iters=200), **overrides})


@register_config
@dataclass(frozen=True)
class PTQDConfig(_Config):
    """PTQD noise correction. Which corrections to apply at sampling time.

    input_correlation: also fit (and remove) the part of the error that is linear in the UNet input x_t, i.e.
        eps_q = (1 + k_t)·eps + m_t·x_t + b_t + r (our extension; False gives the paper's model, m_t = 0).
        The quantization error of a low-bit UNet follows the image content (x_t carries it), not only eps.
    """

    bias_correction: bool = _bool(True, "remove the mean quantization error per timestep and channel")
    correlation_correction: bool = _bool(True, "remove the error correlated with the predicted noise")
    variance_calibration: bool = _bool(True, "reduce injected sampler noise by the residual error variance")
    input_correlation: bool = _bool(True, "also remove the error linear in the UNet input x_t (ours)")
    version: int = _version(1)


@register_config
@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """EfficientDM fine-tuning (QALoRA + TALSQ distillation)."""

    steps: int = _int(200, 1, 1_000_000, "distillation steps", label="fine-tune steps")
    rank: int = _int(8, 1, 1024, "LoRA rank", label="LoRA rank")
    # LoRA lr per layer = mean weight step size x lr_scale_factor. None (default): chosen per layer so that
    # B·A can reach about one weight step within ``steps`` (see efficientdm.lora_lr); the paper's 1/2500 is
    # tuned for 16 000 steps and leaves the integers unchanged in a few hundred.
    lr_scale_factor: Optional[float] = _float(None, 0, 10, "LoRA lr = mean weight step size x this (None: "
                                                           "automatic, from steps, rank and fan-in)",
                                              lo_open=True, optional=True)
    lr_multiplier: float = _float(1.0, 0, 100, "scales the LoRA learning rates (either rule)", lo_open=True)
    act_lr: float = _float(5e-4, 0, 1, "learning rate of the per-timestep activation scales (TALSQ); each layer's "
                                       "capped at 1 % of its mean step size per step")
    weight_decay: float = _float(0.0, 0, 1, "AdamW weight decay on LoRA and scales")
    batch_size: int = _int(8, 1, 4096, "samples per step", label="fine-tune batch size")
    sampling_steps: int = _int(25, 1, 1000, "sampling steps of the teacher trajectories")
    guidance: float = _float(1.0, 0, 100, "classifier-free guidance of the teacher trajectories")
    eta: float = _float(0.0, 0, 1, "DDIM eta of the teacher trajectories (0 = deterministic)")
    time_bins: int = _int(25, 1, 1000, "timestep bins of the TALSQ activation scales")
    grad_checkpointing: bool = _bool(False, "recompute block activations in the backward pass (less memory)")
    seed: int = _int(0, 0, 2 ** 64 - 1, "seed of LoRA initialisation and batch order")
    targets: str = _field("regex", "", "regular expression on layer names for QALoRA/TALSQ; empty = every "
                                       "quantized layer not kept at W8A8")
    version: int = _version(1)


# ----------------------------------------------------------------------------- verb and command-line arguments

ARGS: Dict[str, Spec] = {n: Spec(name=n, **kw) for n, kw in dict(
    bits=dict(kind="choice", default="W4A8", choices=PRESETS, label="bits",
              help="weight and activation bits: W8A8 near-lossless, W4A8 the usual trade-off, W4A4 aggressive, "
                   "W4A16/W8A16 weight-only"),
    method=dict(kind="choice", default="recon+ptqd+vsc", choices=METHODS, label="method",
                help="naive: min/max post-training quantization; recon: BRECQ/AdaRound block reconstruction "
                     "(slow); +ptqd: PTQD noise statistics (bias and correlated-noise correction); +vsc: PTQD "
                     "variance calibration in the sampler; +mixed: step-aware activation bits from measured SNR"),
    num_train_timesteps=dict(kind="int", default=1000, lo=2, hi=100_000,
                             help="training timesteps T of the model's noise schedule"),
    calib_samples=dict(kind="int", default=32, lo=1, hi=1024, label="calibration samples",
                       help="calibration images, each a full-precision sampling run"),
    calib_steps=dict(kind="int", default=10, lo=1, hi=1000, label="calibration steps",
                     help="timesteps kept from the calibration runs (timestep-aware subset)"),
    steps=dict(kind="int", default=25, lo=1, hi=1000, label="sampling steps", help="sampling steps"),
    samples=dict(kind="int", default=200, lo=2, hi=100_000, label="samples",
                 help="samples per model for FID and accuracy (FID's covariance needs at least 2)"),
    seed=dict(kind="int", default=0, lo=0, hi=2 ** 64 - 1, label="seed", help="random seed"),
    guidance=dict(kind="float", default=1.0, lo=0.0, hi=100.0, label="guidance", help="classifier-free guidance"),
    eta=dict(kind="float", default=0.0, lo=0.0, hi=1.0, label="eta", help="DDIM eta (0 = deterministic)"),
    switch_percent=dict(kind="float", default=0.3, lo=0.0, hi=1.0, label="switch percent",
                        help="fraction of the timestep range (the noisy end) at the early bits"),
    port=dict(kind="int", default=7870, lo=1, hi=65535, label="port", help="TCP port of the web app"),
    # PipelineConfig's precision plan fields take these specs (one definition for the config and the CLI)
    precision=dict(kind="choice", default="measured", choices=("measured", "rules"), label="precision",
                   help="per-layer precision: measured (each layer's output error on the calibration calls decides "
                        "which layers stay at 8 bits or float, within size_budget) or rules (the model profile's "
                        "name rules)"),
    size_budget=dict(kind="float", default=0.03, lo=0.0, hi=1.0, label="size budget",
                     help="bytes the measured plan may add over the uniform target, as a fraction of the quantized "
                          "layers' fp16 bytes"),
).items()}


def check_schedule_fits(quant: "QuantConfig", scheduled: bool) -> None:
    """A bit-width schedule (fixed, or measured by a method's +mixed part) switches activation bits: refused for
    weight-only formats. One rule for PipelineConfig and the CLI's checks (this module needs no torch)."""
    if scheduled and quant.a_bits == 16:
        raise ConfigError(f"{quant.name} is weight-only: a bit-width schedule (+mixed) switches activation "
                          "bits; pick W4A8/W4A4 or drop the schedule")


def arg_field(name: str):
    """A config field declared by ``ARGS[name]`` (same default, limits and help as the verb/CLI argument)."""
    a = ARGS[name]
    kw = {k: getattr(a, k) for k in ("lo", "hi", "choices") if getattr(a, k) not in (None, ())}
    return _field(a.kind, a.default, a.help, **kw)


def arg_spec(name: str) -> Spec:
    """The limits of a verb or command-line argument that is not a config field (``ARGS``)."""
    if name not in ARGS:
        raise ConfigError(f"no limits are declared for argument {name!r}; known: {', '.join(ARGS)}")
    return ARGS[name]


def check_verb_args(verb: str, **kwargs) -> dict:
    """Check keyword arguments of a public verb against ``ARGS`` before any work; returns them normalised.

    ``check_verb_args("quantize", num_train_timesteps=0)`` -> ConfigError naming the verb and the limit.
    """
    return {k: arg_spec(k).check(v, f"{verb}: ") for k, v in kwargs.items()}


# ------------------------------------------------------------------------------------------------------ JSON

def _encode(value: Any):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_obj(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def to_json_obj(cfg) -> dict:
    name = type(cfg).__name__
    if name not in CONFIG_TYPES:
        raise ConfigError(f"{name} is not a registered config type")
    data = {f.name: _encode(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "version"}
    return {"_type": name, "_version": cfg.version, "_data": data}


def _decode(value: Any, depth: int):
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(f"config is nested more than {MAX_JSON_DEPTH} levels deep; the file is corrupt")
    if isinstance(value, dict) and "_type" in value:
        return from_json_obj(value, depth + 1)
    if isinstance(value, list):
        return tuple(_decode(v, depth + 1) for v in value)
    return value


def from_json_obj(obj: dict, _depth: int = 0):
    if not isinstance(obj, dict) or set(obj) != {"_type", "_version", "_data"}:
        raise ConfigError("a config must be an object with exactly the keys _type, _version, _data")
    if not isinstance(obj["_type"], str) or obj["_type"] not in CONFIG_TYPES:
        raise ConfigError(f"unknown config type {_short(obj['_type'])}; known: {sorted(CONFIG_TYPES)}")
    cls = CONFIG_TYPES[obj["_type"]]
    known = field_spec(cls, "version").choices
    if isinstance(obj["_version"], bool) or obj["_version"] not in known:
        raise ConfigError(
            f"{obj['_type']} version {_short(obj['_version'])} is not supported by this LowBit (it reads version "
            f"{', '.join(map(str, known))}); upgrade LowBit or re-save the file with this version")
    data = obj["_data"]
    if not isinstance(data, dict):
        raise ConfigError(f"{obj['_type']}._data must be an object")
    names = {f.name for f in dataclasses.fields(cls)} - {"version"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{obj['_type']} has unknown fields {sorted(map(str, unknown))}")
    missing = sorted(n for n in names if specs(cls)[n].required and n not in data)
    if missing:
        raise ConfigError(f"{obj['_type']} is missing the fields {missing}; the file is corrupt")
    return cls(**{k: _decode(v, _depth + 1) for k, v in data.items()})


def dumps(cfg) -> str:
    return json.dumps(to_json_obj(cfg), sort_keys=True)


def loads(text: str):
    if not isinstance(text, (str, bytes)):
        raise ConfigError(f"config JSON must be text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise ConfigError(f"config JSON is {len(text)} bytes, above the {MAX_JSON_BYTES}-byte limit")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from None
    except (RecursionError, ValueError) as exc:  # nesting too deep, integers of thousands of digits
        raise ConfigError(f"config JSON is not acceptable ({type(exc).__name__}: {str(exc)[:80]}); the file is "
                          "corrupt") from None
    return from_json_obj(obj)
