"""Robustness sweep over the diffusers denoisers a user may bring (``archs.py``: tiny random models of each class,
called the way their pipelines call them). Per architecture: ``pipeline.run`` gives a finite deployed model near the
float one, with its per-timestep tables keyed on the [0, T) scale; the saved file reloads onto the float model and
standalone (``load_model(path)``) into models whose outputs are bit-identical to the one that was saved.

The quick suite runs lp+ptqd W8A8 with the profile's name rules on every architecture; the measured precision plan
(the default) and the 4-bit methods (recon+ptqd W4A8, efficientdm W4A4) are ``slow``.
"""
from functools import lru_cache

import pytest
import torch

from archs import ARCHS, EVAL_T, build, record
from lowbit.quant import (FinetuneConfig, LoadError, PipelineConfig, QuantConfig, ReconConfig, deploy_, get_context,
                          load, load_model, pipeline, quantize, save)
from lowbit.quant.calib import unet_output
from lowbit.quant.layers import quant_layers

NAMES = list(ARCHS)


@lru_cache(maxsize=None)
def _model_and_calls(name):
    fp = build(name)
    return fp, record(fp, name)


def _eval_inputs(name):
    return ARCHS[name].inputs(torch.Generator().manual_seed(5), EVAL_T)


def _out(model, name):
    a, kw = _eval_inputs(name)
    with torch.no_grad():
        return unet_output(model(*a, **kw)).float()


def _check(name, cfg, bound, tmp_path):
    fp, calls = _model_and_calls(name)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    q = pipeline.run(fp, calls, cfg).model
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items()), "the float model changed"
    assert quant_layers(q) and all(m.mode == "deployed" for _, m in quant_layers(q))
    y, yq = _out(fp, name), _out(q, name)
    assert torch.isfinite(yq).all()
    rel = float((yq - y).norm() / y.norm())
    assert rel < bound, f"{name} {cfg.method} {cfg.quant.name}: relative error {rel:.3f}"
    # the tables are keyed by the timestep on the [0, T) scale, whatever the model receives (t or sigma)
    assert get_context(q).t == pytest.approx(EVAL_T, abs=0.01)
    p = save(q, str(tmp_path / f"{name}.safetensors"))
    # the same integers and scales: bit-equal outputs on the same kernels (registry order; the kernel autotuner's
    # choices, measured again by each model, may differ by float summation order)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_AUTOTUNE", "0")
        yq = _out(q, name)
        assert torch.equal(_out(load(fp, p), name), yq)
    if ARCHS[name].standalone:
        alone = load_model(p)
        assert type(alone) is type(fp) and get_context(alone).profile == get_context(q).profile
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOWBIT_AUTOTUNE", "0")
            assert torch.equal(_out(alone, name), yq)
    else:
        with pytest.raises(LoadError) as ei:
            load_model(p)
        assert "\n" not in str(ei.value) and "load(model, path)" in str(ei.value)
    return q, rel


@pytest.mark.parametrize("name", NAMES)
def test_w8a8_ptqd_deploys_near_the_float_model_and_reloads(name, tmp_path):
    _check(name, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules"), 0.1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_w8a8_ptqd_with_the_measured_plan(name, tmp_path):
    _check(name, PipelineConfig.for_method("lp+ptqd", "W8A8"), 0.1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_w4a8_recon_ptqd(name, tmp_path):
    cfg = PipelineConfig.for_method("recon+ptqd", "W4A8", recon=ReconConfig.quick(weight_iters=5, batch_size=2),
                                    precision="rules")
    _check(name, cfg, 0.35, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_w4a4_efficientdm(name, tmp_path):
    cfg = PipelineConfig.for_method("efficientdm", "W4A4", finetune=FinetuneConfig(steps=3, batch_size=2, rank=2),
                                    precision="rules")
    if name == "zimage":  # per-sample list inputs: refused before any work, in one line naming the way out
        from lowbit.quant import ConfigError

        with pytest.raises(ConfigError, match="list of per-sample tensors.*use recon or lp"):
            pipeline.run(*_model_and_calls(name), cfg)
        return
    _check(name, cfg, 0.5, tmp_path)


def test_layers_whose_weight_is_read_directly_stay_float():
    """HunyuanDiT's attention pooling passes its projections' weights to F.multi_head_attention_forward instead of
    calling them: they stay float (a deployed layer has no float weight to read), everything else is quantized."""
    fp, calls = _model_and_calls("hunyuan")
    q = quantize(fp, QuantConfig.preset("W8A8"), calls[:1])
    names = {n for n, _ in quant_layers(q)}
    pool = {f"time_extra_emb.pooler.{p}_proj" for p in "qkvc"}
    assert not names & pool and "time_extra_emb.extra_embedder.linear_1" in names
    why = {r["name"]: r["reason"] for r in get_context(q).report}
    assert all("not called" in why[n] for n in pool)
    deploy_(q)
    assert torch.isfinite(_out(q, "hunyuan")).all()


def test_dit_output_layers_are_edges():
    """diffusers' DiT ends in proj_out_1 (the final adaLN modulation) and proj_out_2 (the output projection), the
    counterparts of the other transformers' norm_out.linear and proj_out: the name rules keep them at W8A8 (found by
    audit: the rule named proj_out only, so at W4A8 DiT's output layers had 4-bit weights)."""
    fp, calls = _model_and_calls("dit")
    q = quantize(fp, QuantConfig.preset("W4A8"), calls[:1])
    bits = {n: (m.w_bits, m.a_bits) for n, m in quant_layers(q)}
    assert bits["proj_out_1"] == bits["proj_out_2"] == (8, 8)
    assert bits["transformer_blocks.0.attn1.to_q"] == (4, 8)


def test_flux_single_blocks_output_layers_are_not_edges():
    """diffusers' Flux names each single block's output Linear ``single_transformer_blocks.N.proj_out``: a block
    layer (ComfyUI's ``linear2``), at the target bits under the name rules; the model's own ``proj_out`` stays an
    edge, also under a wrapper's prefix (found by audit: every single block's proj_out was kept at W8A8)."""
    import re

    from lowbit.quant.profiles import get_profile

    fp, calls = _model_and_calls("flux")
    q = quantize(fp, QuantConfig.preset("W4A8"), calls[:1])
    bits = {n: (m.w_bits, m.a_bits) for n, m in quant_layers(q)}
    singles = [n for n in bits if n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")]
    assert singles and all(bits[n] == (4, 8) for n in singles)
    assert bits["proj_out"] == bits["norm_out.linear"] == (8, 8)
    edge = [r.pattern for r in get_profile("flux").edge_rules]
    hit = lambda name: any(re.search(p, name) for p in edge)  # noqa: E731
    assert hit("diffusion_model.proj_out") and hit("proj_out_2") and not hit("diffusion_model.single_blocks.3.proj_out")


def test_layers_whose_parameters_the_model_reads_stay_float_whatever_the_plan():
    """diffusers' Wan reads ``next(iter(time_embedder.parameters())).dtype``: a deployed layer has no parameters,
    so a quantized time embedder made the deployed model's first forward raise StopIteration (found by audit). The
    profile's keep_float layers stay float even when every layer is asked for, and the deployed model runs."""
    from lowbit.quant import LayerRule

    fp, calls = _model_and_calls("wan")
    q = quantize(fp, QuantConfig.preset("W8A8", rules=(LayerRule(".*", "quant"),)), calls)
    names = {n for n, _ in quant_layers(q)}
    kept = {"condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2"}
    assert not names & kept and "condition_embedder.time_proj" in names
    why = {r["name"]: r["reason"] for r in get_context(q).report}
    assert all("reads its float weight" in why[n] for n in kept)
    deploy_(q)
    assert torch.isfinite(_out(q, "wan")).all()


@pytest.mark.parametrize("name", ["chroma", "qwenimage"])
def test_sigma_called_transformers_get_one_table_per_timestep_bin(name):
    """Chroma and Qwen-Image are called with sigma in [0, 1]; under the generic profile every step fell into one
    table (keys within [0, 1]; found by audit). Their profile keys them on [0, 1000): each bin has its own scales."""
    fp, calls = _model_and_calls(name)
    q = quantize(fp, QuantConfig.preset("W8A8", time_bins=4), calls)
    assert get_context(q).profile == "sigma-packed"
    scales = [m.act.table(8)[0] for _, m in quant_layers(q) if m.act is not None]
    assert all(len(s) == 4 for s in scales)
    assert sum(len(set(s.tolist())) > 1 for s in scales) >= 0.5 * len(scales)


def test_score_sde_unet_keys_its_tables_on_ln_sigma():
    """NCSN++ (UNet2DModel with the fourier embedding) is called with sigma over decades; keyed on sigma itself every
    step fell into the tables' first entries and PTQD's statistics of one noise level corrected another (W8A8
    relative errors up to 500 at high sigma; found by audit), and one activation range for all steps crushed the
    low-noise half (errors about 1). Keyed on ln(sigma), with at least 25 bins of activation ranges whatever the config
    asks: every step near the float model."""
    from archs import ncsnpp_sigma

    fp = build("ncsnpp")
    calls = record(fp, "ncsnpp", ts=range(980, 0, -60))  # a sampling run's steps: 17 noise levels over 5 decades
    q = pipeline.run(fp, calls, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules")).model
    assert get_context(q).profile == "score-sde-ve"
    assert "activation ranges per timestep: 25 bins (at least 25" in "\n".join(pipeline.describe(q))
    g = torch.Generator().manual_seed(9)
    for t in (950, 820, 700, 550, 300, 110, 30):  # between the calibrated steps
        a, kw = ARCHS["ncsnpp"].inputs(g, t)
        with torch.no_grad():
            y, yq = unet_output(fp(*a, **kw)), unet_output(q(*a, **kw))
        # (0.06-0.12 here; keyed on sigma itself, 2-80000 at every step below the highest)
        assert float((yq - y).norm() / y.norm()) < 0.15, f"sigma {ncsnpp_sigma(t):.3g}"
        assert get_context(q).t == pytest.approx(t, abs=0.01)
    scales = [m.act.table(8)[0] for _, m in quant_layers(q) if m.act is not None]
    assert all(len(s) == 25 for s in scales) and sum(len(set(s.tolist())) > 1 for s in scales) >= 0.5 * len(scales)


def test_joint_block_reconstruction_fits_both_streams():
    """A joint transformer block returns (encoder_hidden_states, hidden_states) and SD3's last one None for the
    first: the reconstruction loss covers every tensor the block returns."""
    from lowbit.quant.recon import _out_tensors, _unit_loss

    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    assert [t.shape for t in _out_tensors((None, b))] == [b.shape]
    assert float(_unit_loss((a, b), (a, b), 2.0)) == 0.0
    assert float(_unit_loss((a, b + 1), (a, b), 2.0)) > 0  # an error in the second stream counts


def test_a_class_load_model_does_not_build_is_named_in_a_one_line_error(tmp_path):
    """A user's subclass (or any class outside io.ARCH_CLASSES) saves and loads onto its float model; load_model
    refuses it in one line naming the class and the fix."""
    from diffusers import UNet2DModel

    class MyUNet(UNet2DModel):
        pass

    torch.manual_seed(0)
    fp = MyUNet(**{k: v for k, v in build("unet2d").config.items() if not k.startswith("_")}).eval()
    fp.requires_grad_(False)
    q = deploy_(quantize(fp, QuantConfig.preset("W8A8"), record(fp, "unet2d", ts=(900, 100))))
    p = save(q, str(tmp_path / "mine.safetensors"))
    with pytest.raises(LoadError) as ei:
        load_model(p)
    msg = str(ei.value)
    assert "\n" not in msg and "MyUNet" in msg and "load(model, path)" in msg, msg
    assert torch.equal(_out(load(fp, p), "unet2d"), _out(q, "unet2d"))


def test_standalone_build_keeps_constructor_tensors_real():
    """load_model builds the model with its parameters and buffers on meta, but a tensor a constructor keeps as a
    plain attribute (Lumina 2's rotary table) is computed for real: no file holds it. One left on meta is named."""
    from lowbit.quant.io import _EmptyTensors, _meta_attributes

    fp = build("lumina2")
    with _EmptyTensors():
        empty = type(fp)(**{k: v for k, v in fp.config.items() if not k.startswith("_")})
    assert all(t.is_meta for t in list(empty.parameters()) + list(empty.buffers()))
    assert _meta_attributes(empty) == []
    empty.rope_embedder.freqs_cis = [t.to("meta") for t in empty.rope_embedder.freqs_cis]
    assert _meta_attributes(empty) == ["rope_embedder.freqs_cis"]


def test_ptqd_corrects_a_list_of_per_sample_predictions():
    """diffusers' Z-Image returns its predictions as a list of per-sample tensors: the PTQD correction is applied to
    them as a batch and handed back as a list (with the correction off, the raw quantized prediction)."""
    from lowbit.quant import attach_stats, get_stats

    fp, calls = _model_and_calls("zimage")
    q = pipeline.run(fp, calls, PipelineConfig.for_method("lp+ptqd", "W8A8", precision="rules")).model
    a, kw = _eval_inputs("zimage")
    with torch.no_grad():
        on = q(*a, **kw)[0]
        attach_stats(q, get_stats(q), active=False)
        off = q(*a, **kw)[0]
    assert isinstance(on, list) and len(on) == 2 and on[0].shape == off[0].shape
    assert not torch.equal(torch.stack(on), torch.stack(off))


def test_fuse_qkv_projections_on_a_deployed_unet_uses_the_dequantized_weights():
    """diffusers' ``fuse_qkv_projections`` concatenates ``to_q / to_k / to_v.weight.data`` into a new float Linear; on
    a deployed model those were all-zero stand-ins, so the fused model computed garbage, silently (relative error
    0.16 here against the quantized model's 0.04; found by audit). The stand-in now turns into the dequantized
    weight when used: the fused projections compute the quantized weights in float."""
    fp, calls = _model_and_calls("sd15")
    q = pipeline.run(fp, calls, PipelineConfig.for_method("lp", "W8A8", precision="rules")).model
    y, yq = _out(fp, "sd15"), _out(q, "sd15")
    q.fuse_qkv_projections()
    yf = _out(q, "sd15")
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(yf, y) < 1.2 * rel(yq, y) and rel(yf, yq) < 0.05
