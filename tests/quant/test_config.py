import pytest

from lowbit.quant import BitwidthSchedule, ConfigError, FinetuneConfig, QuantConfig, ReconConfig
from lowbit.quant import config as C


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(w_bits=9), dict(a_bits=1), dict(a_bits=12),
                                dict(w_group_size=30), dict(time_bins=0), dict(w_init="foo"),
                                dict(a_bits=16, a_dynamic=True), dict(w_bits=4.0)])
def test_bad_quant_config_names_the_setting(kw):
    with pytest.raises(ConfigError) as e:
        QuantConfig(**kw)
    assert list(kw)[0] in str(e.value)


def test_presets():
    assert QuantConfig.preset("w4a8").name == "W4A8"
    assert QuantConfig.preset("W4A16").w_group_size == 64
    with pytest.raises(ConfigError, match="W<bits>A<bits>"):
        QuantConfig.preset("int4")
    with pytest.raises(ConfigError, match="w_bits=9"):
        QuantConfig.preset("W9A8")


def test_json_round_trip_and_allowlist():
    for cfg in (QuantConfig.preset("W4A8", time_bins=4), BitwidthSchedule.from_percent(0.4, 4, 8), ReconConfig(),
                FinetuneConfig(rank=4)):
        assert C.loads(C.dumps(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown config type"):
        C.loads('{"_type": "os.system", "_version": 1, "_data": {}}')
    with pytest.raises(ConfigError, match="version 99"):
        C.loads('{"_type": "QuantConfig", "_version": 99, "_data": {}}')
    with pytest.raises(ConfigError, match="unknown fields"):
        C.loads('{"_type": "QuantConfig", "_version": 1, "_data": {"evil": 1}}')
    with pytest.raises(ConfigError, match="limit"):
        C.loads(" " * (C.MAX_JSON_BYTES + 1))


def test_schedule_validation_and_lookup():
    s = BitwidthSchedule.from_percent(0.3, early_bits=4, late_bits=8)
    assert s.a_bits_at(999) == 4 and s.a_bits_at(0) == 8 and s.bits_used == (4, 8)
    with pytest.raises(ConfigError, match="cover"):
        BitwidthSchedule(((100.0, 999.0, 4),))
    with pytest.raises(ConfigError, match="overlap"):
        BitwidthSchedule(((0.0, 600.0, 8), (500.0, 999.0, 4)))
    with pytest.raises(ConfigError, match="a_bits"):
        BitwidthSchedule(((0.0, 999.0, 1),))


def test_recon_quick_preset():
    from lowbit.quant import ReconConfig

    q = ReconConfig.quick()
    assert q.weight_iters < ReconConfig().weight_iters and q.act_iters == 0
    assert ReconConfig.quick(weight_iters=7).weight_iters == 7
