"""Where a call's timestep comes from, and on which key it lands (found by the session-16 audit of unseen models):
positional timesteps read at the parameter named so (not the class label in second place), tensors that cannot be a
timestep refused as one, sigma keywords read, calls keyed for a ``profile=`` override, unknown profile names and
methods that need timesteps refused before any work."""
import warnings

import pytest
import torch
import torch.nn as nn

from lowbit.quant import CallRecorder, ConfigError, PipelineConfig, QuantConfig, pipeline, quantize
from lowbit.quant.calib import keyed
from lowbit.quant.context import get_context
from lowbit.quant.layers import quant_layers


class LabelFirst(nn.Module):
    """Research-code convention: ``forward(x, y, t)``, class label before the timestep, called positionally."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 8)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, y, t):
        return self.b(torch.relu(self.a(x * (1 + t.view(-1, 1) / 100) + self.emb(y))))


class ContextSecond(nn.Module):
    """``forward(x, context, noise)``: no parameter named like a timestep; the second is a text embedding."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, context, noise):
        return self.b(torch.relu(self.a(x + context.mean(1) * noise.view(-1, 1))))


class SigmaNet(nn.Module):
    """A k-diffusion style wrapper: ``model(x, sigma=...)`` with sigma over decades."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x, sigma):
        return self.b(torch.relu(self.a(x / (1 + sigma.view(-1, 1)))))


def _record(model, calls):
    with CallRecorder(model) as rec, torch.no_grad():
        for a, kw in calls:
            model(*a, **kw)
    return rec.calls


def test_a_positional_timestep_after_the_class_label_is_read_as_the_timestep():
    torch.manual_seed(0)
    m = LabelFirst().eval()
    label = torch.tensor([207, 207])
    calls = _record(m, [((torch.randn(2, 8), label, torch.full((2,), float(t))), {}) for t in (950, 700, 400, 100)])
    assert [c.t for c in calls] == [950.0, 700.0, 400.0, 100.0]  # (was the label: 207 each time)
    q = quantize(m, QuantConfig.preset("W8A8", time_bins=4), calls)
    scales = [layer.act.table(8)[0] for _, layer in quant_layers(q) if layer.act is not None]
    assert all(len(set(s.tolist())) > 1 for s in scales)  # each bin its own range (was one range in every bin)
    with torch.no_grad():
        q(torch.randn(2, 8), torch.tensor([980, 980]), torch.full((2,), 50.0))
    assert get_context(q).t == pytest.approx(50.0)  # the deployed lookup too, not the label 980


def test_a_text_embedding_in_second_place_is_no_timestep_and_ptqd_refuses_before_any_work():
    m = ContextSecond().eval()
    calls = _record(m, [((torch.randn(2, 8), torch.randn(2, 6, 8), torch.full((2,), s)), {}) for s in (0.9, 0.5)])
    assert [c.t for c in calls] == [None, None]  # (was the median of the text embedding)
    with pytest.raises(ConfigError) as ei:
        pipeline.run(m, calls, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules"))
    msg = str(ei.value)
    assert "\n" not in msg and "PTQD needs the timestep" in msg and "'context'" in msg and "profile=" in msg
    with pytest.raises(ConfigError, match="time_bins > 1 needs the timestep"):
        quantize(m, QuantConfig.preset("W8A8", time_bins=4), calls)
    pipeline.run(m, calls, PipelineConfig.for_method("lp", "W8A8", precision="rules"))  # (what the error offers)


def test_a_sigma_keyword_is_read_and_a_linear_key_over_decades_is_warned():
    from lowbit.quant import api

    api._SIGMA_WARNED.discard("SigmaNet")
    m = SigmaNet().eval()
    sigmas = (47.0, 3.3, 0.14, 0.006)
    calls = _record(m, [((torch.randn(2, 8),), dict(sigma=torch.full((2,), s))) for s in sigmas])
    assert [round(c.t, 2) for c in calls] == [round(s, 2) for s in sigmas]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quantize(m, QuantConfig.preset("W8A8"), calls)
    assert any("called with sigma=" in str(x.message) and "timestep_log=True" in str(x.message) for x in w)


def test_a_profile_override_keys_the_calls_its_way():
    """Recorded under the generic profile (sigma in [0, 1] taken as received), quantized with profile="auraflow"
    (x1000): PTQD's statistics must sit at the keys the deployed model looks up, 1000 * sigma."""
    torch.manual_seed(0)
    m = LabelFirst().eval()
    sig = (0.95, 0.7, 0.4, 0.1)
    calls = _record(m, [((torch.randn(2, 8), torch.tensor([3, 4]), torch.full((2,), s)), {}) for s in sig])
    assert [c.t for c in keyed(calls, m, "auraflow")] == pytest.approx([1000 * s for s in sig], abs=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the [0, 1] warning of the recording's generic keys)
        q = pipeline.run(m, calls, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules"),
                         profile="auraflow").model
    stats = get_context(q).ptqd
    assert stats.t.tolist() == pytest.approx(sorted(1000 * s for s in sig), abs=0.5)  # (was 0.1 .. 0.95)


def test_an_unknown_profile_name_is_refused_before_any_work():
    m = LabelFirst().eval()
    calls = _record(m, [((torch.randn(2, 8), torch.tensor([3, 4]), torch.full((2,), 500.0)), {})])
    for run in (lambda: quantize(m, QuantConfig.preset("W8A8"), calls, profile="auraflowz"),
                lambda: pipeline.run(m, calls, PipelineConfig.for_method("lp", "W8A8"), profile="auraflowz")):
        with pytest.raises(ConfigError, match="unknown model profile 'auraflowz'; one of .*'auraflow'"):
            run()


def test_a_known_profile_that_takes_timesteps_as_received_warns_about_unit_interval_keys():
    from lowbit.quant import api

    api._SIGMA_WARNED.discard("LabelFirst")
    m = LabelFirst().eval()
    calls = _record(m, [((torch.randn(2, 8), torch.tensor([3, 4]), torch.full((2,), s)), {}) for s in (0.9, 0.2)])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quantize(m, QuantConfig.preset("W8A8"), calls, profile="t2i-dit")
    assert any("its profile (t2i-dit) takes timesteps as received" in str(x.message) for x in w)


def test_files_record_their_profile_and_older_files_keep_the_one_they_were_keyed_with(tmp_path):
    """Format 4 records the profile; a file without one (format 3 and older) is read with the profile its class
    matched when it was written: an NCSN++ file from before ``score-sde-ve`` holds tables keyed on sigma itself,
    and read under the log map it gave other outputs (found by audit: 0.28 relative). A ``profile=`` override is
    kept through save and load; an unknown recorded profile is refused."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from archs import build, record
    from lowbit.quant import LoadError, load, save
    from lowbit.quant.sthdr import header_digest

    fp = build("ncsnpp")
    calls = record(fp, "ncsnpp")
    q = pipeline.run(fp, calls, PipelineConfig.for_method("lp", "W8A8", precision="rules")).model
    p = save(q, str(tmp_path / "v4.safetensors"))
    with safe_open(p, "pt") as f:
        header, tensors = json.loads(f.metadata()["lowbit"]), {k: f.get_tensor(k) for k in f.keys()}
    assert header["profile"] == "score-sde-ve" and get_context(load(fp, p)).profile == "score-sde-ve"

    def rewrite(name, **fields):
        h = dict(header, **fields)
        h = {k: v for k, v in h.items() if v is not ... and k != "header_sha256"}
        if h["format_version"] >= 5:  # (a checksum of the header from format 5 on: the crafter recomputes it)
            h["header_sha256"] = header_digest(h)
        out = str(tmp_path / name)
        save_file(tensors, out, metadata={"lowbit": json.dumps(h)})
        return out

    old = rewrite("v3.safetensors", format_version=3, profile=...)  # (what format 3 wrote: no profile field)
    assert get_context(load(fp, old)).profile == "diffusers-unet"
    with pytest.raises(LoadError, match="keyed with the model profile 'warp-drive', which this LowBit does not know"):
        load(fp, rewrite("unknown.safetensors", profile="warp-drive"))

    m = LabelFirst().eval()
    lf_calls = _record(m, [((torch.randn(2, 8), torch.tensor([3, 4]), torch.full((2,), s)), {}) for s in (0.9, 0.2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qa = quantize(m, QuantConfig.preset("W8A8"), lf_calls, profile="auraflow")
    pa = save(qa, str(tmp_path / "override.safetensors"))
    assert get_context(load(m, pa)).profile == "auraflow"


class PerToken(nn.Module):
    """ComfyUI's convention ``forward(x, timesteps, context)``, with per-token timesteps [B, S] (Wan 2.2 TI2V, LTXV
    with a denoise mask) or a numpy scalar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, timesteps, context=None):
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)[:1]
        return self.a(x) * (1 + t / 1000)


def test_a_timestep_parameter_is_read_whatever_its_shape_and_old_calls_are_keyed_again():
    """A parameter named like a timestep is read as one whatever its shape ([B, S] per-token timesteps, numpy
    scalars: their median, as before); calls that do not say how they were keyed (recorded by an older LowBit, made
    by hand) are keyed again from their arguments; the refusal names the right parameter and position."""
    import dataclasses

    import numpy as np

    m = PerToken().eval()
    calls = _record(m, [((torch.randn(2, 8), torch.full((2, 5), t)), {}) for t in (900.0, 300.0)])
    assert [c.t for c in calls] == [900.0, 300.0]
    calls = _record(m, [((torch.randn(2, 8), np.float32(600.0)), {})])
    assert calls[0].t == 600.0
    label = LabelFirst().eval()
    lf = _record(label, [((torch.randn(2, 8), torch.tensor([207, 207]), torch.full((2,), 700.0)), {})])
    legacy = [dataclasses.replace(lf[0], t=207.0, profile=None)]  # (an older recorder read the label)
    assert [c.t for c in keyed(legacy, label)] == [700.0]
    with pytest.raises(ConfigError, match=r"its 3rd positional parameter 't' was not given"):
        from lowbit.quant.calib import require_timesteps

        require_timesteps(label, [dataclasses.replace(lf[0], t=None, args=lf[0].args[:2])], None, "PTQD")


def test_an_unregistered_profile_object_is_refused():
    import dataclasses

    from lowbit.quant.profiles import get_profile

    mine = dataclasses.replace(get_profile("auraflow"), name="mine")
    m = LabelFirst().eval()
    calls = _record(m, [((torch.randn(2, 8), torch.tensor([3, 4]), torch.full((2,), 0.5)), {})])
    with pytest.raises(ConfigError, match="model profile 'mine' is not registered; register it"):
        pipeline.run(m, calls, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules"), profile=mine)


def test_efficientdm_keeps_the_families_floor_of_time_bins():
    from archs import build, record
    from lowbit.quant import FinetuneConfig

    fp = build("ncsnpp")
    q = pipeline.run(fp, record(fp, "ncsnpp"), PipelineConfig.for_method(
        "efficientdm", "W8A8", precision="rules", finetune=FinetuneConfig(steps=2, batch_size=2, rank=2, time_bins=4),
        deploy=False)).model
    assert {len(layer.act.tgrid) for _, layer in quant_layers(q) if layer.act is not None} == {25}
