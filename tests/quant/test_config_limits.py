"""Configs refuse bad values at construction, driven by the declared limits: for every field of every registered
config, values of the wrong type, non-finite, out of range or unknown raise ConfigError naming the field; the
boundaries are accepted; arbitrary JSON never raises anything but ConfigError."""
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.quant import config as C
from lowbit.quant.errors import ConfigError, LowBitError

REQUIRED = {"LayerRule": dict(pattern="conv", mode="quant")}  # fields without a default


def _build(cls, **kw):
    return cls(**{**REQUIRED.get(cls.__name__, {}), **kw})


def _bad_values(spec):
    """Values the spec must refuse, derived from its kind and limits (not a list per bug)."""
    k = spec.kind
    common = [] if spec.optional else [None]
    if k == "int":
        return common + [spec.lo - 1, spec.hi + 1, 1.5, float(spec.lo), "3", True, False, math.nan, 10 ** 5000,
                         [spec.lo]]
    if k == "float":
        low = spec.lo if spec.lo_open else spec.lo - abs(spec.lo) - 1
        return common + [math.nan, math.inf, -math.inf, "1", True, low, spec.hi * 2 + 1, 10 ** 400, [spec.lo]]
    if k == "bool":
        return common + ["no", "yes", "False", 0, 1, 2.0, [True]]
    if k == "choice":
        return common + ["bogus", 5, spec.choices[0].upper() + "!", [spec.choices[0]], True]
    if k == "regex":
        return common + [5, "(", "[a-", b"conv", "a" * (spec.max_len + 1)]
    if k == "str":
        return common + [5, b"x", ["x"], "a" * (spec.max_len + 1)]
    if k == "items":
        return common + ["abc", 5, (5,), ("x",), {}]
    if k == "segments":
        return common + [(), "abc", ((0.0, 999.0),), ((0.0, math.nan, 8),), ((0.0, 999.0, 1),),
                         ((0.0, 999.0, 8.0),), ((0.0, 999.0, "8"),), ((-1.0, 999.0, 8),)]
    if k == "config":
        return common + [5, "x", {}, 0 if spec.item is not C.QuantConfig else C.ReconConfig()]
    if k == "version":
        return [0, 2, 99, "1", True, None, 1.0]
    raise AssertionError(f"no bad values for kind {k}")


FIELDS = [(cls, name, spec) for cls in C.CONFIG_TYPES.values() for name, spec in C.specs(cls).items()]


@pytest.mark.parametrize("cls,name,spec", FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FIELDS])
def test_every_field_refuses_bad_values_with_config_error(cls, name, spec):
    if spec.kind == "any":
        pytest.skip("kind 'any': checked by the class's own combination rules")
    for bad in _bad_values(spec):
        with pytest.raises(ConfigError) as e:
            _build(cls, **{name: bad})
        msg = str(e.value)
        assert name in msg or spec.kind == "segments", (name, bad, msg)
        assert "\n" not in msg


@pytest.mark.parametrize("cls,name,spec", FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FIELDS])
def test_every_field_declares_help_and_accepts_its_limits(cls, name, spec):
    assert spec.help, f"{cls.__name__}.{name} declares no limits/help: use the _int/_float/... field helpers"
    good = []
    if spec.kind == "int":
        good = [spec.lo, spec.hi, *spec.extra]
    elif spec.kind == "float":
        good = [spec.hi] + ([] if spec.lo_open else [spec.lo])
    elif spec.kind in ("choice", "version"):
        good = list(spec.choices)
    elif spec.kind == "bool":
        good = [True, False]
    if spec.optional:
        good.append(None)
    for v in good:
        if spec.multiple_of and v is not None and v % spec.multiple_of:
            v -= v % spec.multiple_of
        try:
            cfg = _build(cls, **{name: v})
        except ConfigError as exc:  # only a combination rule of the class may refuse a single in-range value
            assert str(exc).startswith(cls.__name__) and f"{cls.__name__}.{name}=" not in str(exc), (name, v, exc)
            continue
        assert getattr(cfg, name) == v


def test_defaults_are_valid_and_round_trip_through_json():
    for cls in C.CONFIG_TYPES.values():
        cfg = _build(cls)
        assert C.loads(C.dumps(cfg)) == cfg


def test_named_cases_from_the_issue():
    cases = [
        (lambda: C.QuantConfig(a_dynamic="no"), "a_dynamic"),
        (lambda: C.QuantConfig(version=2), "version"),
        (lambda: C.ReconConfig(round_weight=math.nan), "round_weight"),
        (lambda: C.ReconConfig(beta_start=math.inf), "beta_start"),
        (lambda: C.ReconConfig(beta_end=-math.inf), "beta_end"),
        (lambda: C.FinetuneConfig(guidance=math.nan), "guidance"),
        (lambda: C.FinetuneConfig(seed="abc"), "seed"),
        (lambda: C.QuantConfig(a_dynamic=True, a_bits=4), "a_dynamic=True needs a_bits=8"),
        (lambda: C.BitwidthSchedule(((0.0, 500.0, 8), (500.0, 500.0, 4), (500.0, 999.0, 4))), "zero"),
        (lambda: C.BitwidthSchedule(((0.0, 999.0, 8), (0.0, 999.0, 4))), "overlap"),
        (lambda: C.QuantConfig(rules=None), "rules"),
        (lambda: C.LayerRule(pattern=5, mode="quant"), "pattern"),
        (lambda: C.QuantConfig.preset(None), "preset"),
        (lambda: C.QuantConfig.preset("W4A8", bogus=1), "bogus"),
        (lambda: C.ReconConfig(beta_start=2.0, beta_end=20.0), "beta_start >= beta_end"),
        (lambda: C.BitwidthSchedule.from_percent(math.nan, 4, 8), "switch_percent"),
        (lambda: C.check_verb_args("quantize", num_train_timesteps=0), "quantize: num_train_timesteps=0"),
        (lambda: C.check_verb_args("quantize", calib_samples=-5), "calib_samples"),
        (lambda: C.check_verb_args("quantize", no_such_arg=1), "no_such_arg"),
        (lambda: C.field_spec(C.QuantConfig, "nope"), "nope"),
        (lambda: C.specs("NoSuchConfig"), "NoSuchConfig"),
    ]
    for make, words in cases:
        with pytest.raises(ConfigError, match=None) as e:
            make()
        assert words in str(e.value), (words, str(e.value))


def test_field_spec_is_the_one_source_of_limits():
    s = C.field_spec(C.QuantConfig, "w_bits")
    assert (s.kind, s.lo, s.hi, s.default) == ("int", 2, 8, 4) and s.help
    assert C.field_spec("QuantConfig", "a_bits").extra == (C.ACT_BITS_NONE,)
    assert C.field_spec(C.QuantConfig(), "w_init").choices == C.WEIGHT_INIT
    # the default a config is built with is the spec's default
    for cls in C.CONFIG_TYPES.values():
        cfg = _build(cls)
        for f in dataclasses.fields(cls):
            spec = C.field_spec(cls, f.name)
            if not spec.required:
                assert getattr(cfg, f.name) == spec.default
    assert C.arg_spec("calib_samples").range_text() == "1..1024"
    assert C.arg_spec("bits").choices == C.PRESETS
    assert C.check_verb_args("quantize", num_train_timesteps=1000, eta=0) == dict(num_train_timesteps=1000, eta=0.0)


def test_config_error_is_a_lowbit_error_and_kernels_share_the_family():
    from lowbit._errors import LowBitError as Root
    from lowbit.kernels import NoBackendError

    assert LowBitError is Root and issubclass(ConfigError, LowBitError) and issubclass(NoBackendError, LowBitError)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                     max_leaves=12)


@st.composite
def _config_objects(draw):
    cls = draw(st.sampled_from(sorted(C.CONFIG_TYPES)))
    names = list(C.specs(cls))
    data = draw(st.dictionaries(st.sampled_from(names + ["evil"]), _json, max_size=4))
    version = draw(st.sampled_from([1, 1, 1, 2, "1", None]))
    return {"_type": draw(st.sampled_from([cls, cls, "os.system", 5, None])), "_version": version, "_data": data}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_config_objects())
def test_arbitrary_json_gives_a_config_or_config_error(obj):
    try:
        cfg = C.from_json_obj(obj)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert type(cfg).__name__ == obj["_type"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_any_preset_text_gives_a_config_or_config_error(text):
    try:
        cfg = C.QuantConfig.preset(text)
    except ConfigError:
        return
    assert cfg.name.upper() == text.strip().upper().replace("A16", "A16")


def test_deep_or_huge_json_is_config_error():
    for text in ("[" * 100000 + "]" * 100000, '{"_type": "QuantConfig", "_version": 1, "_data": {"w_bits": ' +
                 "9" * 5000 + "}}", '{"_type": [1], "_version": 1, "_data": {}}'):
        with pytest.raises(ConfigError):
            C.loads(text)
    nested = {"_type": "QuantConfig", "_version": 1, "_data": {"rules": []}}
    cur = nested["_data"]["rules"]
    for _ in range(200):
        cur.append([])
        cur = cur[0]
    with pytest.raises(ConfigError):
        C.from_json_obj(nested)
