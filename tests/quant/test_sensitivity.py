"""Per-layer precision from measurement (quant/sensitivity.py)."""
import pytest

from lowbit.quant import LayerRule, PipelineConfig, QuantConfig, get_context, pipeline
from lowbit.quant.layers import quant_layers
from lowbit.quant.sensitivity import plan_precision

N_CALLS = 4  # measured calls per plan (the default is more): the tests check the logic, not the plan's quality


@pytest.fixture(scope="module")
def exact_plan(unet, calls):
    """The W4A8 plan with every layer measured exactly (shared: measuring is the slow part of these tests)."""
    return plan_precision(unet, calls, QuantConfig.preset("W4A8"), budget=0.05, n_calls=N_CALLS)


def test_plan_upgrades_the_most_harmful_layers_within_the_budget(unet, calls, exact_plan):
    plan = exact_plan
    names = {n.split(".parts.")[0] for n, _ in quant_layers(pipeline.run(unet, calls, PipelineConfig.for_method(
        "lp", "W4A8", precision="rules", deploy=False)).model)}
    assert {r.pattern[1:-1].replace("\\", "") for r in plan.rules} == names  # one exact-name rule per layer
    assert set(plan.errors) == names and all(e8 < et for et, e8 in plan.errors.values())  # 8 bits beat 4 bits
    kept = {r["name"]: r for r in plan.report}
    worst = max(plan.errors, key=lambda u: plan.errors[u][0])
    assert worst in kept and kept[worst]["mode"] in ("w8a8", "fp"), (worst, plan.report)
    assert "measured: output error" in kept[worst]["reason"]
    assert 0 < plan.spent_bytes <= plan.allowance_bytes
    assert plan.allowance_bytes == pytest.approx(0.05 * 2 * sum(unet.get_submodule(n).weight.numel() for n in names))
    # every upgrade removed at least a tenth of the error left at that point: a layer far below that stays
    assert all(plan.errors[u][0] > 0.1 * min(plan.errors[k][0] for k in kept) for u in kept)
    # no budget: nothing is upgraded
    plan0 = plan_precision(unet, calls, QuantConfig.preset("W4A8"), budget=0.0, n_calls=N_CALLS)
    assert plan0.report == [] and all(r.mode == "quant" for r in plan0.rules)


def test_user_rules_override_measurement_and_the_pipeline_reports_the_numbers(unet, calls):
    m = unet
    user = (LayerRule(r"conv_out$", "fp"),)
    res = pipeline.run(m, calls, PipelineConfig.for_method("lp", "W4A8", quant=QuantConfig.preset("W4A8", rules=user),
                                                           deploy=False))
    q = res.model
    assert "conv_out" not in {n for n, _ in quant_layers(q)}  # the user's rule: left in float
    report = {r["name"]: r for r in get_context(q).report}
    assert report["conv_out"]["reason"].startswith("rule")
    measured = [r for r in report.values() if r["reason"].startswith("measured: output error")]
    assert measured and res.info["precision"]
    lines = pipeline.describe(q)
    assert any(measured[0]["name"] in ln and "measured" in ln for ln in lines)
    assert "precision plan" in res.seconds


def test_screened_plan_ranks_layers_as_measurement_does_and_measures_the_shortlist(unet, calls, exact_plan):
    """Large models are screened by the linearised error (one pass + random-direction backward passes), then only
    the shortlist is measured exactly. Forced here on a small model: the estimates must rank the layers as the
    exact measurement does, and the plan must be built from exact numbers for the layers it upgrades."""
    from scipy.stats import spearmanr

    cfg = QuantConfig.preset("W4A8")
    exact = exact_plan
    screened = plan_precision(unet, calls, cfg, budget=0.05, n_calls=N_CALLS, screen_above=0, shortlist=4)
    assert exact.estimates == {} and set(screened.estimates) == set(exact.errors)
    units = list(exact.errors)
    rho = spearmanr([exact.errors[u][0] for u in units], [screened.estimates[u] for u in units]).statistic
    assert rho > 0.8, rho
    # the shortlist (at most 2 x 4 units) was measured exactly, with the same numbers as the full measurement
    assert 0 < len(screened.errors) <= 8
    for u, (et, e8) in screened.errors.items():
        assert et == pytest.approx(exact.errors[u][0], rel=1e-6) and e8 == pytest.approx(exact.errors[u][1], rel=1e-6)
    assert {r["name"] for r in screened.report} <= set(screened.errors)
    assert 0 < screened.spent_bytes <= screened.allowance_bytes
    # one exact-name rule per layer in both plans
    assert len(screened.rules) == len(exact.rules)


def test_screening_works_on_a_hosts_inference_tensors(unet, calls):
    """Forge and ComfyUI load checkpoints and sample under ``torch.inference_mode()``. There the screen recorded no
    graph ("element 0 of tensors does not require grad") and every layer of an SD1.5 UNet was measured exactly
    instead: a W8A8 generation with LowBit on in a real Forge (2 cores) did not finish within the test's 15 minutes.
    Now it screens on plain copies: the same estimates and rules as a plain model, no warning, and the model and
    calls given stay the host's inference tensors."""
    import warnings

    import torch

    from qutil import record, tiny_unet

    cfg = QuantConfig.preset("W4A8")
    ref = plan_precision(unet, calls, cfg, budget=0.05, n_calls=N_CALLS, screen_above=0, shortlist=4)
    with torch.inference_mode():
        fp = tiny_unet().requires_grad_(True)  # (as Forge's: made under inference mode, requires_grad left on)
        host_calls = record(fp)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            plan = plan_precision(fp, host_calls, cfg, budget=0.05, n_calls=N_CALLS, screen_above=0, shortlist=4)
    assert not [w for w in seen if "screening not possible" in str(w.message)], [str(w.message) for w in seen]
    assert ref.estimates and set(plan.estimates) == set(ref.estimates)
    assert plan.estimates == pytest.approx(ref.estimates, rel=1e-4)
    assert plan.rules == ref.rules
    assert all(p.is_inference() and p.requires_grad for p in fp.parameters()) and host_calls[0].args[0].is_inference()


def test_screening_works_through_in_place_residuals():
    """Forge's transformer block adds its residuals in place (``x += n`` after ``norm1`` saved ``x``, as ComfyUI's did):
    autograd refused the screen's backward ("modified by an inplace operation") and every layer was measured
    exactly. The screen saves activations as copies: the same estimates as the model written out of place."""
    import warnings

    import torch
    import torch.nn as nn

    from lowbit.quant import CallRecorder

    class Block(nn.Module):
        def __init__(self, in_place):
            super().__init__()
            torch.manual_seed(0)
            self.in_place = in_place
            self.proj_in, self.temb = nn.Linear(16, 32), nn.Linear(1, 32)
            self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
            self.ff1, self.ff2, self.proj_out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16)

        def forward(self, x, timestep):
            x = self.proj_in(x) + self.temb(timestep.view(-1, 1, 1).float() / 1000)
            for norm, ff in ((self.norm1, self.ff1), (self.norm2, self.ff2)):
                n = ff(torch.relu(norm(x)))
                if self.in_place:
                    x += n
                else:
                    x = x + n
            return self.proj_out(x)

    plans = []
    for in_place in (False, True):
        m = Block(in_place).eval().requires_grad_(False)
        with CallRecorder(m) as rec, torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for t in (900, 600, 300, 100):
                m(torch.randn(2, 6, 16, generator=g), torch.full((2,), float(t)))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            plans.append(plan_precision(m, rec.calls, QuantConfig.preset("W4A8"), budget=0.2, n_calls=4,
                                        screen_above=0, shortlist=2))
        assert not [w for w in seen if "screening not possible" in str(w.message)], [str(w.message) for w in seen]
    out_of_place, in_place = plans
    assert out_of_place.estimates and in_place.estimates == pytest.approx(out_of_place.estimates, rel=1e-5)
    assert in_place.rules == out_of_place.rules


def test_a_second_prediction_is_measured_too():
    """A model that returns two predictions (LTX-2: video, then audio) has the second's layers measured against the
    second output, each relative to its own energy: a small audio head was quantized unmeasured before (found by
    audit), its error invisible in the first output. Exact and screened plans both keep it above the target."""
    import torch
    import torch.nn as nn

    from lowbit.quant import CallRecorder

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(16, 64)
            self.video = nn.Linear(64, 16)
            self.audio = nn.Linear(64, 8)

        def forward(self, x, timestep):
            h = torch.relu(self.body(x * (1 + timestep.view(-1, 1, 1) / 1000)))
            return self.video(h), 1e-3 * self.audio(h)  # (the audio output is tiny beside the video one)

    torch.manual_seed(0)
    m = TwoHeads().eval()
    with torch.no_grad():
        m.audio.weight[:, :4] *= 30  # a few outlier inputs: the audio head suffers most from 4-bit weights
    with CallRecorder(m) as rec, torch.no_grad():
        for t in (900, 600, 300, 100):
            m(torch.randn(2, 6, 16), torch.full((2,), float(t)))
    for screen_above in (1000, 0):  # exact, then screened (shortlist of 1: the estimate must find it)
        plan = plan_precision(m, rec.calls, QuantConfig.preset("W4A8"), budget=0.2, n_calls=4,
                              screen_above=screen_above, shortlist=1)
        kept = {r["name"]: r["mode"] for r in plan.report}
        assert kept.get("audio") in ("w8a8", "fp"), (screen_above, plan.report, plan.errors)
