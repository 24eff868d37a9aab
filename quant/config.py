"""Frozen, versioned configuration dataclasses and their JSON (de)serialisation.

Every config serialises to ``{"_type": name, "_version": n, "_data": {...}}`` and is rebuilt only from the
allowlist ``CONFIG_TYPES`` below: nothing read from a file is ever executed or unpickled.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .errors import ConfigError

MAX_JSON_BYTES = 4 * 1024 * 1024  # a config header larger than this is refused before parsing

CONFIG_TYPES: dict = {}


def register_config(cls):
    CONFIG_TYPES[cls.__name__] = cls
    return cls


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range: allowed {lo}..{hi}")


def _check_float(name, value, lo, hi, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value != value or not (lo < value if lo_open else lo <= value) or not value <= hi:
        raise ConfigError(f"{name}={value} is out of range: allowed {'(' if lo_open else '['}{lo}, {hi}]")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {sorted(choices)}")


ACT_BITS_NONE = 16  # a_bits=16 means "activations stay in floating point" (weight-only formats)
WEIGHT_INIT = ("minmax", "lp")
ACT_INIT = ("minmax", "lp")
LAYER_MODES = ("quant", "w8a8", "fp")


@register_config
@dataclass(frozen=True)
class LayerRule:
    """``pattern`` (a regular expression searched in the module's qualified name) -> ``mode``.

    mode: "quant" (use the config's bits), "w8a8" (keep at 8/8 bits), "fp" (leave the float layer).
    ``kind`` restricts the rule to "conv", "linear" or "any".
    """

    pattern: str
    mode: str
    kind: str = "any"
    version: int = 1

    def __post_init__(self):
        import re

        _check_choice("LayerRule.mode", self.mode, LAYER_MODES)
        _check_choice("LayerRule.kind", self.kind, ("any", "conv", "linear"))
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"LayerRule.pattern {self.pattern!r} is not a valid regular expression: {exc}") from None


# Which layers stay at W8A8 by default (ALGORITHMS.md section B). Names cover diffusers (UNet2DModel,
# UNet2DConditionModel), ComfyUI/LDM (`input_blocks.0.0`, `out.2`, `time_embed`, `skip_connection`, `.op`)
# and Forge's IntegratedUNet2DConditionModel. The first and last conv of any model are also caught
# structurally (see policy.py), so unknown architectures keep their input/output convs at 8 bits too.
DEFAULT_RULES: Tuple[LayerRule, ...] = (
    LayerRule(r"(^|\.)(conv_in|input_blocks\.0\.0)$", "w8a8"),
    LayerRule(r"(^|\.)(conv_out|out\.2)$", "w8a8"),
    LayerRule(r"(^|\.)(time_embedding|time_embed|class_embedding|label_emb|add_embedding)(\.|$)", "w8a8"),
    LayerRule(r"(conv_shortcut|skip_connection)$", "w8a8"),
    LayerRule(r"(downsamplers\.\d+\.conv|\.op)$", "w8a8"),
)


@register_config
@dataclass(frozen=True)
class QuantConfig:
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

    w_bits: int = 4
    a_bits: int = 8
    w_group_size: Optional[int] = None
    w_init: str = "lp"
    a_init: str = "lp"
    a_dynamic: bool = False
    time_bins: int = 1
    split_concat: bool = True
    rules: Tuple[LayerRule, ...] = DEFAULT_RULES
    version: int = 1

    def __post_init__(self):
        _check_int("w_bits", self.w_bits, 2, 8)
        if self.a_bits != ACT_BITS_NONE:
            _check_int("a_bits", self.a_bits, 2, 8)
        if self.w_group_size is not None:
            _check_int("w_group_size", self.w_group_size, 8, 4096)
            if self.w_group_size % 8:
                raise ConfigError(f"w_group_size={self.w_group_size} must be a multiple of 8 (e.g. 32, 64, 128)")
        _check_choice("w_init", self.w_init, WEIGHT_INIT)
        _check_choice("a_init", self.a_init, ACT_INIT)
        _check_int("time_bins", self.time_bins, 1, 1000)
        if self.a_dynamic and self.a_bits == ACT_BITS_NONE:
            raise ConfigError("a_dynamic=True needs quantized activations (a_bits 2..8), got a_bits=16")
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, LayerRule):
                raise ConfigError(f"rules must be LayerRule objects, got {r!r}")

    @property
    def name(self) -> str:
        a = "16" if self.a_bits == ACT_BITS_NONE else str(self.a_bits)
        return f"W{self.w_bits}A{a}"

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantConfig":
        """``QuantConfig.preset("W4A8")``; presets: W8A8, W4A8, W4A4, W4A16, W8A16, W2A8 ..."""
        import re

        m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", name.strip())
        if not m:
            raise ConfigError(f"unknown bit-width preset {name!r}; write it as W<bits>A<bits>, e.g. W4A8 or W4A16")
        w, a = int(m.group(1)), int(m.group(2))
        kw = dict(w_bits=w, a_bits=a)
        if a == ACT_BITS_NONE and w <= 4:
            kw["w_group_size"] = 64  # weight-only int4 uses group-wise scales (the CPU int4 kernel needs them)
        kw.update(overrides)
        return cls(**kw)


@register_config
@dataclass(frozen=True)
class BitwidthSchedule:
    """Activation (and optionally weight) bits per range of the sampling run.

    ``segments``: tuple of (t_lo, t_hi, a_bits): DDPM timesteps t in [t_lo, t_hi] use ``a_bits``. Segments
    must cover [0, num_train_timesteps-1] without overlap. Keyed by timestep (sigma maps to t), never by
    a call counter, so any sampler and step count picks the right bits.
    """

    segments: Tuple[Tuple[float, float, int], ...] = ((0.0, 999.0, 8),)
    num_train_timesteps: int = 1000
    version: int = 1

    def __post_init__(self):
        segs = tuple(tuple(s) for s in self.segments)
        object.__setattr__(self, "segments", segs)
        if not segs:
            raise ConfigError("BitwidthSchedule needs at least one segment (t_lo, t_hi, a_bits)")
        for s in segs:
            if len(s) != 3:
                raise ConfigError(f"BitwidthSchedule segment {s!r} must be (t_lo, t_hi, a_bits)")
            _check_float("segment t_lo", s[0], 0, self.num_train_timesteps)
            _check_float("segment t_hi", s[1], 0, self.num_train_timesteps)
            if s[1] < s[0]:
                raise ConfigError(f"BitwidthSchedule segment {s!r}: t_hi must be >= t_lo")
            if s[2] != ACT_BITS_NONE:
                _check_int("segment a_bits", s[2], 2, 8)
        ordered = sorted(segs)
        if ordered[0][0] > 0 or ordered[-1][1] < self.num_train_timesteps - 1:
            raise ConfigError(
                f"BitwidthSchedule segments must cover timesteps 0..{self.num_train_timesteps - 1}; got {ordered}")
        for a, b in zip(ordered, ordered[1:]):
            if b[0] > a[1] + 1:
                raise ConfigError(f"BitwidthSchedule has a gap between segments {a} and {b}")
            if b[0] < a[1]:
                raise ConfigError(f"BitwidthSchedule segments {a} and {b} overlap")

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
        """Early (noisy) part of the run, ``switch_percent`` of the timestep range, at ``early_bits``; the rest at ``late_bits``."""
        _check_float("switch_percent", switch_percent, 0.0, 1.0)
        T = num_train_timesteps - 1
        cut = T * (1.0 - switch_percent)
        if switch_percent <= 0:
            return cls(((0.0, float(T), late_bits),), num_train_timesteps)
        if switch_percent >= 1:
            return cls(((0.0, float(T), early_bits),), num_train_timesteps)
        return cls(((0.0, float(cut), late_bits), (float(cut), float(T), early_bits)), num_train_timesteps)


@register_config
@dataclass(frozen=True)
class ReconConfig:
    """BRECQ/AdaRound block reconstruction (ALGORITHMS.md A2, A3).

    weight_iters: Adam steps per unit (block or loose layer) of the weight pass (AdaRound). The papers use
        10 000-20 000 on 400M-parameter LDMs; the default is a tenth of that, ``ReconConfig.quick()`` a hundredth
        (the benches on the small default model use 100).
    act_iters: Adam steps per unit of BRECQ's activation pass (learned step sizes after the L_p search; the
        papers use 5 000). Off by default: on the default model it made W4A4 worse (README, "recon+act" row).
    batch_size: samples per step, drawn from one recorded call (a call holds a whole sampling batch).
    """

    weight_iters: int = 2000
    act_iters: int = 0
    batch_size: int = 16
    weight_lr: float = 1e-3
    act_lr: float = 4e-3  # relative to each layer's activation step size (see recon.reconstruct_activations)
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p_act: float = 2.4
    version: int = 1

    @classmethod
    def quick(cls, **overrides) -> "ReconConfig":
        """A fast setting for previews: 200 AdaRound steps per unit."""
        return cls(**{**dict(weight_iters=200), **overrides})

    def __post_init__(self):
        _check_int("weight_iters", self.weight_iters, 0, 1_000_000)
        _check_int("act_iters", self.act_iters, 0, 1_000_000)
        _check_int("batch_size", self.batch_size, 1, 4096)
        _check_float("weight_lr", self.weight_lr, 0, 1, lo_open=True)
        _check_float("act_lr", self.act_lr, 0, 1, lo_open=True)
        _check_float("warmup", self.warmup, 0, 1)
        _check_float("p_act", self.p_act, 1, 4)


@register_config
@dataclass(frozen=True)
class PTQDConfig:
    """PTQD noise correction (ALGORITHMS.md A5). Which corrections to apply at sampling time.

    input_correlation: also fit (and remove) the part of the error that is linear in the UNet input x_t, i.e.
        eps_q = (1 + k_t)·eps + m_t·x_t + b_t + r (our extension; False gives the paper's model, m_t = 0).
        The quantization error of a low-bit UNet follows the image content (x_t carries it), not only eps.
    """

    bias_correction: bool = True
    correlation_correction: bool = True
    variance_calibration: bool = True
    input_correlation: bool = True
    version: int = 1


@register_config
@dataclass(frozen=True)
class FinetuneConfig:
    """EfficientDM fine-tuning (ALGORITHMS.md A8-A11)."""

    steps: int = 200
    rank: int = 8
    # LoRA lr per layer = mean weight step size x lr_scale_factor (A10). None (default): chosen per layer so that
    # B·A can reach about one weight step within ``steps`` (see efficientdm.lora_lr); the paper's 1/2500 is
    # tuned for 16 000 steps and leaves the integers unchanged in a few hundred.
    lr_scale_factor: Optional[float] = None
    lr_multiplier: float = 1.0  # scales the LoRA learning rates (either rule)
    act_lr: float = 5e-4
    weight_decay: float = 0.0  # the official code's AdamW 0.01 on LoRA/scales is a quirk (section E)
    batch_size: int = 8
    sampling_steps: int = 25
    guidance: float = 1.0
    eta: float = 0.0
    time_bins: int = 25
    grad_checkpointing: bool = False
    seed: int = 0
    targets: str = ""  # regex on layer names for QALoRA/TALSQ; "" = every quantized layer not kept at W8A8
    version: int = 1

    def __post_init__(self):
        import re

        try:
            re.compile(self.targets)
        except re.error as exc:
            raise ConfigError(f"targets {self.targets!r} is not a valid regular expression: {exc}") from None
        _check_int("steps", self.steps, 1, 1_000_000)
        _check_int("rank", self.rank, 1, 1024)
        if self.lr_scale_factor is not None:
            _check_float("lr_scale_factor", self.lr_scale_factor, 0, 10, lo_open=True)
        _check_float("lr_multiplier", self.lr_multiplier, 0, 100, lo_open=True)
        _check_float("act_lr", self.act_lr, 0, 1)
        _check_float("weight_decay", self.weight_decay, 0, 1)
        _check_int("batch_size", self.batch_size, 1, 4096)
        _check_int("sampling_steps", self.sampling_steps, 1, 1000)
        _check_float("eta", self.eta, 0, 1)
        _check_int("time_bins", self.time_bins, 1, 1000)


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


def _decode(value: Any):
    if isinstance(value, dict) and "_type" in value:
        return from_json_obj(value)
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def from_json_obj(obj: dict):
    if not isinstance(obj, dict) or set(obj) != {"_type", "_version", "_data"}:
        raise ConfigError("a config must be an object with exactly the keys _type, _version, _data")
    cls = CONFIG_TYPES.get(obj["_type"])
    if cls is None:
        raise ConfigError(f"unknown config type {obj['_type']!r}; known: {sorted(CONFIG_TYPES)}")
    known_version = {f.name: f.default for f in dataclasses.fields(cls)}["version"]
    if obj["_version"] != known_version:
        raise ConfigError(
            f"{obj['_type']} version {obj['_version']!r} is not supported by this LowBit (it reads version "
            f"{known_version}); upgrade LowBit or re-save the file with this version")
    data = obj["_data"]
    if not isinstance(data, dict):
        raise ConfigError(f"{obj['_type']}._data must be an object")
    names = {f.name for f in dataclasses.fields(cls)} - {"version"}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{obj['_type']} has unknown fields {sorted(unknown)}")
    return cls(**{k: _decode(v) for k, v in data.items()})


def dumps(cfg) -> str:
    return json.dumps(to_json_obj(cfg), sort_keys=True)


def loads(text: str):
    if len(text) > MAX_JSON_BYTES:
        raise ConfigError(f"config JSON is {len(text)} bytes, above the {MAX_JSON_BYTES}-byte limit")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from None
    return from_json_obj(obj)
