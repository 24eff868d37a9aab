"""Loading without the float weights (issue 14 item 1): ``load_model(path)`` / ``load(path)`` build the recorded
architecture on the meta device and fill it from the file alone; the result must be the same model the float path
``load(float_model, path)`` gives: every tensor equal and bit-identical outputs. Files that do not record what is
needed are refused with a one-line LoadError naming the fix. (Peak memory: bench/bench_load_memory.py.)"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.kernels.registry import forced_backend
from lowbit.quant import (CallRecorder, ConfigError, LoadError, QuantConfig, attach_stats, collect_stats, deploy_,
                          get_stats, load, load_model, quant_layers, quantize, save)
from lowbit.quant.io import FLOAT_PREFIX, tensor_digest
from lowbit.quant.sthdr import header_digest

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def _state(m):
    return {k: v for k, v in m.state_dict().items() if v is not None}


def _assert_same_model(a, b):
    sa, sb = _state(a), _state(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not any(t.is_meta for t in list(b.parameters()) + list(b.buffers()))
    assert [n for n, _ in quant_layers(a)] == [n for n, _ in quant_layers(b)]
    assert all(m.mode == "deployed" for _, m in quant_layers(b))


@pytest.fixture(scope="module")
def digits():
    from lowbit.models import load_default_unet

    unet = load_default_unet().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    lab = torch.tensor([1, 5, 10])
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in (900, 500, 100, 20):
            unet(torch.randn(3, 1, 16, 16, generator=g), torch.tensor([t] * 3), class_labels=lab)
    return unet, rec.calls


@pytest.fixture(scope="module")
def digits_files(digits, tmp_path_factory):
    unet, calls = digits
    d = tmp_path_factory.mktemp("standalone")
    out = {}
    for name, cfg in (("w8a8", QuantConfig.preset("W8A8")), ("w4a8_ptqd", QuantConfig.preset("W4A8", time_bins=2))):
        q = quantize(unet, cfg, calls)
        if name.endswith("ptqd"):
            attach_stats(q, collect_stats(unet, q, calls))
        deploy_(q)
        out[name] = save(q, str(d / f"{name}.safetensors"))
    return out


@pytest.mark.parametrize("name", ["w8a8", "w4a8_ptqd"])
def test_embedded_model_without_float_weights_is_the_float_path_model(digits, digits_files, name):
    unet, _ = digits
    p = digits_files[name]
    a = load(unet, p)
    for b in (load_model(p), load(p)):
        assert type(b) is type(a)
        assert {k: v for k, v in b.config.items() if not k.startswith("_")} == \
            {k: v for k, v in a.config.items() if not k.startswith("_")}
        _assert_same_model(a, b)
        if name.endswith("ptqd"):
            sa, sb = get_stats(a), get_stats(b)
            assert sb is not None and torch.equal(sa.bias, sb.bias) and torch.equal(sa.t, sb.t)
        g = torch.Generator().manual_seed(7)
        x, t, lab = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([800.0, 300.0, 30.0]), torch.tensor([7, 2, 10])
        for backend in ("eager", None):  # the reference kernels, then whatever the registry picks
            with torch.no_grad(), (forced_backend(backend) if backend else torch.enable_grad()):
                oa, ob = a(x, t, class_labels=lab).sample, b(x, t, class_labels=lab).sample
            assert torch.equal(oa, ob), backend


def test_zoo_text_model_without_float_weights_is_the_float_path_model(tmp_path):
    """latent_text: a UNet2DConditionModel (cross-attention, GEGLU, linear projections) from the zoo."""
    from lowbit.models.zoo import load as zoo_load

    unet = zoo_load("latent_text").denoiser
    g = torch.Generator().manual_seed(0)
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in (900, 400, 50):
            unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([t, t]),
                 encoder_hidden_states=torch.randn(2, 5, 64, generator=g))
    q = quantize(unet, QuantConfig.preset("W4A8"), rec.calls)
    deploy_(q)
    p = save(q, str(tmp_path / "lt.safetensors"))
    a, b = load(unet, p), load_model(p)
    _assert_same_model(a, b)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 60.0]), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(a(x, t, encoder_hidden_states=ctx).sample, b(x, t, encoder_hidden_states=ctx).sample)


def test_zoo_flux_transformer_without_float_weights_samples_the_same(tmp_path):
    """dit_flow: a FluxTransformer2DModel (joint and single transformer blocks, RoPE, no convolutions)."""
    from lowbit.models.zoo import load as zoo_load

    zm = zoo_load("dit_flow")
    with CallRecorder(zm.denoiser) as rec, torch.no_grad():
        zm.sample(zm.denoiser, n=2, seed=0, steps=2)
    q = quantize(zm.denoiser, QuantConfig.preset("W8A8"), rec.calls)
    deploy_(q)
    p = save(q, str(tmp_path / "flux.safetensors"))
    a, b = load(zm.denoiser, p), load_model(p)
    _assert_same_model(a, b)
    with torch.no_grad():
        ia, ib = zm.sample(a, n=2, seed=1, steps=2)[0], zm.sample(b, n=2, seed=1, steps=2)[0]
    assert torch.equal(ia, ib)


def test_the_float_model_is_not_needed_to_be_built(digits_files, monkeypatch):
    """load_model never runs a real-device constructor: every parameter it builds is on the meta device until the
    file fills it (a float copy would need the weights' memory)."""
    from lowbit.quant import io as qio

    real, built = qio.build_arch, []

    def spy(path, arch):
        m = real(path, arch)
        built.append(all(t.is_meta for t in list(m.parameters()) + list(m.buffers())))
        return m

    monkeypatch.setattr(qio, "build_arch", spy)
    load_model(digits_files["w8a8"])
    assert built == [True]


def _one_line_refusal(p, *words):
    with pytest.raises(LoadError) as ei:
        load_model(p)
    msg = str(ei.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


@pytest.mark.parametrize("name", ["w8a8", "w4a8_ptqd"])
def test_release_files_without_arch_are_refused_with_the_fix(name):
    _one_line_refusal(os.path.join(FIX, f"fmt1_{name}.safetensors"), "file format 1", "load(model, path)",
                      "save the result again")


def test_file_saved_without_arch_is_refused_and_still_loads_on_the_float_model(digits, tmp_path):
    unet, calls = digits
    q = quantize(unet, QuantConfig.preset("W8A8"), calls)
    deploy_(q)
    p = save(q, str(tmp_path / "noarch.safetensors"), arch=False)
    _one_line_refusal(p, "architecture", "load(model, path)")
    load(unet, p)


def test_comfyui_file_is_sent_to_the_node(digits_files, tmp_path):
    p = digits_files["w8a8"]
    with safe_open(p, "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
        h = json.loads(f.metadata()["lowbit"])
    h["arch"] = {"library": "comfyui", "class": "SD15", "config": {"unet_config.model_channels": 320}}
    h["tensor_sha256"] = {k: tensor_digest(v) for k, v in ts.items()}
    h["header_sha256"] = header_digest(h)
    q = str(tmp_path / "comfy.safetensors")
    save_file(ts, q, metadata={"lowbit": json.dumps(h)})
    _one_line_refusal(q, "comfyui", "Load Quantized UNet")


def test_load_without_a_path_needs_a_path(digits):
    with pytest.raises(ConfigError, match="load"):
        load(digits[0])


def test_save_checks_an_arch_it_is_given(digits, tmp_path):
    unet, calls = digits
    q = quantize(unet, QuantConfig.preset("W8A8"), calls)
    deploy_(q)
    with pytest.raises(ConfigError, match="arch"):
        save(q, str(tmp_path / "x.safetensors"), arch={"library": "diffusers", "class": "os.system", "config": {}})
    assert not (tmp_path / "x.safetensors").exists()


def test_float_parts_in_mixed_dtypes_load_in_the_dtypes_the_model_builds(digits, digits_files, tmp_path,
                                                                         registry_kernels):
    """A model cast piecewise (its output norm in fp16, the rest fp32) saves fp16 and fp32 float tensors side by side:
    built from the file alone, each takes the dtype the architecture builds it in (fp32 here), as load(model, path)
    casts them to the float model's, so the model runs (kept as stored, the fp16 norm after fp32 layers failed at the
    first forward whatever the input dtype)."""
    unet, _ = digits
    q = load(unet, digits_files["w8a8"])
    q.conv_norm_out.half()
    p = save(q, str(tmp_path / "mixed.safetensors"))
    with safe_open(p, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith(FLOAT_PREFIX)} == {"F16", "F32"}
    a, b = load(unet, p), load_model(p)
    _assert_same_model(a, b)
    assert {t.dtype for t in b.parameters()} == {torch.float32}
    x, t, lab = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([800.0] * 3), \
        torch.tensor([7, 2, 10])
    with torch.no_grad():
        assert torch.equal(a(x, t, class_labels=lab).sample, b(x, t, class_labels=lab).sample)


def test_file_holds_exactly_the_state_outside_the_quantized_layers(digits, digits_files):
    unet, _ = digits
    with safe_open(digits_files["w8a8"], "pt") as f:
        keys = [k[len(FLOAT_PREFIX):] for k in f.keys() if k.startswith(FLOAT_PREFIX)]
        h = json.loads(f.metadata()["lowbit"])
        for k in keys:
            assert torch.equal(f.get_tensor(FLOAT_PREFIX + k), unet.state_dict()[k])
    assert sorted(keys) == h["float_tensors"] and keys
    qnames = list(h["layers"]) + list(h["splits"])  # a split convolution's float weight became its parts
    assert not any(k.startswith(n + ".") for k in keys for n in qnames)
    assert set(keys) | {k for k in unet.state_dict() if any(k.startswith(n + ".") for n in qnames)} \
        == set(unet.state_dict())
    assert h["format_version"] == 5 and h["arch"]["class"] == "UNet2DModel" and h["profile"] == "diffusers-unet"


def test_inspect_says_whether_a_file_loads_alone(digits_files):
    from lowbit.cli import inspect_text

    assert "standalone yes: diffusers UNet2DModel" in inspect_text(digits_files["w8a8"])
    assert "standalone no" in inspect_text(os.path.join(FIX, "fmt1_w8a8.safetensors"))


COMFY_CHILD = '''
import sys, os, tempfile, json
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.sd, comfy.model_management as mm
from lowbit.quant import QuantConfig, quantize, deploy_, CallRecorder, attach_stats, collect_stats, load, read_header
from lowbit.nodes import io as nio, comfy_adapter as adapter
model = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=False, output_clip=False)[0]
unet = model.model.diffusion_model
g = torch.Generator().manual_seed(0)
dt = next(unet.parameters()).dtype
with CallRecorder(unet) as rec, torch.no_grad():
    for t in (900, 500, 100):
        unet(torch.randn(1, 4, 8, 8, generator=g).to(dt), torch.tensor([float(t)]),
             context=torch.randn(1, 77, 768, generator=g).to(dt))
q = quantize(unet, QuantConfig.preset("W4A8"), rec.calls)
attach_stats(q, collect_stats(unet, q, rec.calls))
deploy_(q)
p = nio.save_unet(adapter.attach_quantized_unet(model, q), "t/unet", tempfile.mkdtemp())
arch = read_header(p)[0]["arch"]
fa = adapter.attach_quantized_unet(model, load(unet, p))          # what the node does with a MODEL connected
sb = nio.load_standalone(p)                                       # ... and with none
x, ctx, sig = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([5.0, 0.5])
outs = []
for m in (fa, sb):
    mm.load_models_gpu([m])
    with torch.no_grad():
        outs.append(m.model.apply_model(x, sig, c_crossattn=ctx).float())
print(json.dumps(dict(arch_class=arch["class"], model_type=arch["config"]["model_type"],
                      same=bool(torch.equal(outs[0], outs[1])), mean=float(outs[0].abs().mean()),
                      quantized=adapter.is_quantized(adapter.unet_of(sb)),
                      meta_left=[n for n, t in sb.model.state_dict().items() if t.is_meta and t.numel()],
                      sampling=type(sb.model.model_sampling).__name__ == type(model.model.model_sampling).__name__)))
'''


def test_comfyui_model_built_without_float_weights_runs_like_the_float_path():
    """ComfyUI's SD1.5 model (random fixture checkpoint): saved by the node code with its architecture record,
    then loaded with no MODEL (ComfyUI's BaseModel built on the meta device, filled from the file): bit-identical
    ``apply_model`` to the float path. Needs COMFYUI_DIR (like tests/nodes); runs in ComfyUI's python."""
    import subprocess
    from pathlib import Path

    comfy_harness, d = _comfy_harness()
    py = comfy_harness.comfyui_python(d)
    ckpt = comfy_harness.ensure_fixture(d, py)
    r = subprocess.run([py, "-c", COMFY_CHILD, str(d), str(ckpt)], capture_output=True, text=True, timeout=1800,
                       cwd=str(Path(ckpt).parent))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["arch_class"] == "SD15" and res["model_type"] == "EPS" and res["quantized"] and res["sampling"]
    assert res["same"] and res["mean"] > 0 and res["meta_left"] == []


def _comfy_harness():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
    try:
        import comfy_harness
    finally:
        sys.path.pop(0)
    d = comfy_harness.comfyui_dir_from_env()
    if d is None:
        pytest.skip(comfy_harness.SKIP_MESSAGE)
    return comfy_harness, d


def test_comfyui_server_load_node_with_no_model_gives_the_same_images():
    """Through a real ComfyUI server: Quantize -> Save; then "Load Quantized UNet" with the MODEL connected and with
    none, each sampled with the same seed: identical images (the node builds the model from the file alone)."""
    import numpy as np

    comfy_harness, d = _comfy_harness()
    py = comfy_harness.comfyui_python(d)
    ckpt = comfy_harness.ensure_fixture(d, py)
    with comfy_harness.ComfyServer.start(d, python=py, checkpoints=[ckpt]) as comfy:
        def graph():
            return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy.checkpoint}},
                    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
                    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
                    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}

        g = graph()
        g["10"] = {"class_type": "LowBitQuantizeUNet", "inputs": dict(
            bits="W4A8", method="ptqd", calibration_steps=2, calibration_samples=1, seed=0, cfg=7.0,
            calibration_width=64, calibration_height=64, calibration_timesteps=0, time_bins=1, weight_init="minmax",
            recon_iters=0, model=["1", 0], positive=["2", 0], negative=["3", 0])}
        g["11"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": ["10", 0], "filename_prefix": "sa/u"}}
        rel = comfy.run(g, timeout=1800)["outputs"]["11"]["lowbit_files"][0]
        images = []
        for inputs in ({"model": ["1", 0], "unet_name": rel}, {"unet_name": rel}):
            g = graph()
            g["20"] = {"class_type": "LowBitLoadQuantizedUNet", "inputs": inputs}
            g["21"] = {"class_type": "KSampler", "inputs": {
                "model": ["20", 0], "seed": 3, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
            g["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["1", 2]}}
            g["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}
            (im,) = comfy.images(comfy.run(g, timeout=1800), "23")
            images.append(np.asarray(im))
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])


def test_a_class_load_model_cannot_build_is_sent_to_load_onto_its_float_model(tmp_path):
    """A file of a model class load_model does not build: the advice is to load it onto its float model (it said
    to save it again, which cannot make that class buildable); found by audit."""
    import torch.nn as nn

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x)

    q = deploy_(quantize(Custom(), QuantConfig.preset("W8A16")))
    p = str(tmp_path / "c.safetensors")
    save(q, p)
    with pytest.raises(LoadError, match=r"Custom is not one load_model builds.*load\(model, path\) with the model "
                                        r"built from its checkpoint"):
        load_model(p)
