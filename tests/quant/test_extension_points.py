"""A new weight format (``toy_format.py``) and a new architecture (``toy_profile.py``), each added in one file,
run the whole pipeline together: quantize, reconstruct, PTQD, deploy, save, load."""
import dataclasses

import pytest
import torch

import toy_format  # noqa: F401  (registers the "toy" weight format)
from lowbit.quant import CallRecorder, PipelineConfig, QuantConfig, ReconConfig, get_context, load, pipeline, save
from lowbit.quant.layers import quant_layers
from toy_profile import ToyDenoiser


def _calls(model, n=6):
    g = torch.Generator().manual_seed(0)
    with CallRecorder(model) as rec, torch.no_grad():
        for i in range(n):
            s = torch.full((4,), (i + 0.5) / n)
            model(torch.randn(4, 8, 16, generator=g), noise_level=s)
    return rec.calls


def test_toy_format_and_toy_architecture_run_the_whole_pipeline(tmp_path):
    torch.manual_seed(0)
    fp = ToyDenoiser().eval().requires_grad_(False)
    calls = _calls(fp)
    assert sorted({round(c.t) for c in calls}) == [83, 250, 417, 583, 750, 917]  # sigma keyed on [0, 1000)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    cfg = PipelineConfig.for_method("recon+ptqd", quant=QuantConfig.preset("W4A8", w_format="toy"),
                                    recon=ReconConfig.quick(weight_iters=20), precision="rules")
    res = pipeline.run(fp, calls, cfg)
    q = res.model
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in before.items())  # the float model is untouched
    ctx = get_context(q)
    assert ctx.profile == "toy-arch"
    bits = {n: (layer.w_bits, layer.a_bits, layer.w_format) for n, layer in quant_layers(q)}
    assert bits["inp"][:2] == bits["outp"][:2] == bits["t_mlp.0"][:2] == (8, 8)  # the profile's edges
    assert bits["blocks.0.fc1"] == (4, 8, "toy") and all(f == "toy" for *_, f in bits.values())
    assert any("toy-arch edge" in r["reason"] for r in ctx.report)
    assert {"reconstruct", "PTQD statistics", "deploy"} <= set(res.seconds)
    x, s = torch.randn(2, 8, 16), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        y = q(x, noise_level=s)
        assert ctx.t == pytest.approx(300.0, abs=1e-3)  # the profile's keyword and scale reached the context
        err = float((y - fp(x, noise_level=s)).norm() / fp(x, noise_level=s).norm())
    assert 0 < err < 0.3
    path = save(q, str(tmp_path / "toy.safetensors"))
    q2 = load(fp, path)
    assert get_context(q2).profile == "toy-arch"
    with torch.no_grad():
        assert torch.allclose(q2(x, noise_level=s), y, atol=1e-5)


def test_pipeline_tune_kernels_checks_the_choice_with_whole_forwards():
    """tune_kernels: per-layer measured kernels, then kernels.autotune.settle on a calibration call (the result
    says which whole-model mode was kept; what it picks depends on this machine, so only its form is checked)."""
    from lowbit.kernels import autotune

    torch.manual_seed(0)
    fp = ToyDenoiser().eval().requires_grad_(False)
    calls = _calls(fp)
    cfg = PipelineConfig.for_method("naive", quant=QuantConfig.preset("W8A8"), precision="rules", tune_kernels=True)
    res = pipeline.run(fp, calls, cfg)
    rep = res.info["kernel_choice"]
    assert rep["mode"] in ("tuned", "float", "integer") and set(rep["cpu_ms"]) == {"tuned", "float", "integer"}
    assert autotune.summary(res.model)["settled"] == rep


def test_kernel_tuning_is_the_default_within_the_copy_budget(tmp_path):
    """deploy_, the pipeline and load all arm the kernel autotuner by default, with the 64 MiB copy budget
    (PipelineConfig.kernel_copy_mb sets it; tune_kernels=False / deploy_(tune=False) leave the registry order)."""
    from lowbit.kernels import autotune
    from lowbit.quant import DEFAULT_COPY_BUDGET_MB, deploy_, quantize
    from lowbit.quant.layers import quant_layers

    def budgets(model):
        arms = [autotune._arming(layer.packed_weight()) for _, layer in quant_layers(model)]
        return {None if a is None else ("unbounded" if a[1].limit is None else a[1].limit) for a in arms}

    assert DEFAULT_COPY_BUDGET_MB == 64.0 and PipelineConfig().tune_kernels
    torch.manual_seed(0)
    fp = ToyDenoiser().eval().requires_grad_(False)
    calls = _calls(fp)
    q = quantize(fp, QuantConfig.preset("W8A8"), calls)
    assert budgets(deploy_(q)) == {64 << 20}
    assert budgets(deploy_(quantize(fp, QuantConfig.preset("W8A8"), calls), tune=False)) == {None}
    assert budgets(deploy_(quantize(fp, QuantConfig.preset("W8A8"), calls), copy_budget_mb=None)) == {"unbounded"}
    cfg = PipelineConfig.for_method("naive", quant=QuantConfig.preset("W8A8"), precision="rules", kernel_copy_mb=2.0)
    res = pipeline.run(fp, calls, cfg)
    assert budgets(res.model) == {2 << 20} and res.info["kernel_choice"] is not None
    off = pipeline.run(fp, calls, dataclasses.replace(cfg, tune_kernels=False))
    assert budgets(off.model) == {None} and "kernel_choice" not in off.info
    path = save(res.model, str(tmp_path / "toy.safetensors"))
    assert budgets(load(fp, path)) == {64 << 20}


def test_loaders_take_the_tuning_arguments_and_weight_bytes_are_the_packed_size(tmp_path):
    """load(tune=False) leaves the registry order; bad tuning arguments are refused before the file is read;
    weight_bytes is what the model holds whether or not it ran (the kernels' copies: kernel_copy_bytes)."""
    from lowbit.kernels import autotune
    from lowbit.quant import ConfigError, deploy_, kernel_copy_bytes, quantize, weight_bytes

    torch.manual_seed(0)
    fp = ToyDenoiser().eval().requires_grad_(False)
    calls = _calls(fp)
    q = deploy_(quantize(fp, QuantConfig.preset("W8A8"), calls))
    before = weight_bytes(q)
    a, kw = calls[0].to("cpu", torch.float32)
    with torch.no_grad():
        q(*a, **kw)
    assert weight_bytes(q) == before and kernel_copy_bytes(q) > 0
    path = save(q, str(tmp_path / "toy.safetensors"))
    plain = load(fp, path, tune=False)
    assert all(autotune._arming(layer.packed_weight()) is None for _, layer in quant_layers(plain))
    with pytest.raises(ConfigError, match="load: copy_budget_mb"):
        load(fp, str(tmp_path / "missing.safetensors"), copy_budget_mb=-1)
