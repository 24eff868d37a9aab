import torch

from lowbit.quant import QuantConfig, auto_schedule, get_context, quant_layers, quantize
from lowbit.quant.schedule import choose_bits, schedule_from_picks


def test_picks_merge_into_segments():
    s = schedule_from_picks([(50.0, 8), (300.0, 8), (600.0, 4), (900.0, 4)], 1000)
    assert s.segments == ((0.0, 450.0, 8), (450.0, 999.0, 4))


def test_choose_bits_uses_snr_threshold():
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    snr = {900.0: {4: 2.0, 8: 50.0}, 10.0: {4: 2.0, 8: 5000.0}}
    picks = dict(choose_bits(snr, ac))
    assert picks[900.0] == 4  # noisy step: the signal SNR is tiny, 4 bits suffice
    assert picks[10.0] == 8


def test_auto_schedule_switches_bits_by_timestep(unet, calls):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    q = quantize(unet, QuantConfig.preset("W4A4"), calls, a_bits_candidates=(4, 8))
    sched, info = auto_schedule(unet, q, calls, ac, candidates=(4, 8))
    assert set(info["snr"]) == {c.t for c in calls}
    # the layers follow the schedule at the timestep of each call
    layer = dict(quant_layers(q))["down_blocks.0.resnets.0.conv1"]
    ctx = get_context(q)
    for t in (900.0, 50.0):
        ctx.t = t
        assert layer.current_a_bits() == sched.a_bits_at(t)
    assert dict(quant_layers(q))["conv_in"].current_a_bits() == 8  # W8A8 edge layers do not follow it


def test_describe_states_the_schedule_over_the_preset_bits(unet, calls):
    """A schedule overrides the A bits of the scheduled layers: the report says so (it read 'W4A4' alone)."""
    from lowbit.quant import pipeline
    from lowbit.quant.config import BitwidthSchedule

    q = quantize(unet, QuantConfig.preset("W4A4"), calls, a_bits_candidates=(4, 8))
    assert not any("bit-width schedule" in ln for ln in pipeline.describe(q))
    get_context(q).schedule = BitwidthSchedule.from_percent(0.3, 4, 8)
    lines = pipeline.describe(q)
    n = sum(1 for _, l in quant_layers(q) if l.scheduled and l.a_bits != 16)
    assert n > 0
    (line,) = [ln for ln in lines if "bit-width schedule" in ln]
    assert f"used by {n} layers" in line and "A4" in line and "A8" in line
    assert line.index("A4") < line.index("A8")  # the noisy end (high t) first, as the run goes
