"""Contracts of the ComfyUI node classes, checked WITHOUT ComfyUI.

The node modules import ComfyUI only inside functions (nodes/comfy_adapter.py), so they load in any python
with torch. These tests check what ComfyUI and its frontend read from a V1 node class (INPUT_TYPES with a
tooltip on every input, RETURN_TYPES, FUNCTION, CATEGORY, DESCRIPTION, ...), the VALIDATE_INPUTS messages,
the pure math (PSNR/SSIM, the PTQD sampler steps, the LoRA side path) and the save-name rules.
"""
from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]

nodes_pkg = importlib.import_module("lowbit.nodes")
from lowbit.nodes import io as nio, sampler as smp, schedule as sch  # noqa: E402
from lowbit.quant import compare, side_paths as side  # noqa: E402  (host-free math lives in the core)
from lowbit.nodes.quantize import check_quantize_settings  # noqa: E402

MAPPINGS = nodes_pkg.NODE_CLASS_MAPPINGS
EXPECTED_IDS = {"LowBitQuantizeUNet", "LowBitBitwidthSchedule", "LowBitPTQDSampler", "LowBitPTQDKSampler",
                "LowBitEfficientDMFinetune", "LowBitSaveQuantizedUNet", "LowBitLoadQuantizedUNet",
                "LowBitCompareImages"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def all_inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}, f"{cls.__name__}: unknown INPUT_TYPES sections {set(spec)}"
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            yield section, name, entry


# ------------------------------------------------------------------------------------------ registration
def test_every_node_is_registered_with_a_display_name():
    assert set(MAPPINGS) == EXPECTED_IDS
    assert set(nodes_pkg.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_IDS
    for node_id, cls in MAPPINGS.items():
        assert node_id.startswith("LowBit")
        assert "LowBit" in nodes_pkg.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def test_nodes_package_does_not_import_comfyui():
    # importing the pack's node modules must not pull in ComfyUI (the adapter imports it lazily)
    src = "\n".join(p.read_text() for p in (REPO / "nodes").glob("*.py"))
    top_level = [ln for ln in src.splitlines()
                 if ln.startswith(("import comfy", "from comfy", "import folder_paths",
                                   "import nodes", "from nodes", "import latent_preview"))]
    assert not top_level, f"module-level ComfyUI imports in nodes/: {top_level}"


@pytest.mark.parametrize("node_id", sorted(EXPECTED_IDS))
def test_node_class_contract(node_id):
    cls = MAPPINGS[node_id]
    for attr in ("RETURN_TYPES", "FUNCTION", "CATEGORY", "DESCRIPTION"):
        assert hasattr(cls, attr), f"{node_id} lacks {attr}"
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert cls.CATEGORY.startswith("LowBit")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    fn = getattr(cls, cls.FUNCTION)
    assert callable(fn)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), f"{node_id} returns nothing, so it must be an OUTPUT_NODE"

    params = inspect.signature(fn).parameters
    seen = []
    for section, name, entry in all_inputs(cls):
        seen.append(name)
        assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, f"{node_id}.{name}: bad spec {entry!r}"
        opts = entry[1] if len(entry) > 1 else {}
        tip = opts.get("tooltip")
        assert isinstance(tip, str) and len(tip) >= 10, f"{node_id}.{name} has no tooltip"
        kind = entry[0]
        if isinstance(kind, list):
            if kind:  # an empty file list is legal (no saved files yet)
                assert opts.get("default", kind[0]) in kind, f"{node_id}.{name}: default not in its options"
        elif kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}: default out of range"
        assert name in params, f"{node_id}.{cls.FUNCTION}() has no parameter {name!r}"
        if section == "optional":
            assert params[name].default is not inspect.Parameter.empty, \
                f"{node_id}.{name} is optional, so {cls.FUNCTION}() needs a default for it"
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("node_id", sorted(EXPECTED_IDS))
def test_validate_inputs_accepts_the_defaults(node_id):
    cls = MAPPINGS[node_id]
    v = getattr(cls, "VALIDATE_INPUTS", None)
    if v is None:
        return
    argnames = inspect.signature(v).parameters
    defaults = {}
    for _, name, entry in all_inputs(cls):
        if name in argnames and len(entry) > 1 and "default" in entry[1]:
            defaults[name] = entry[1]["default"]
    assert v(**defaults) is True
    assert v() is True  # linked (not yet known) inputs arrive as missing arguments


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, words", [
    (dict(bits="W3A5"), ["bits", "W4A8"]),
    (dict(method="gptq"), ["method", "recon+ptqd"]),
    (dict(calibration_steps=0), ["calibration_steps", "1..1000"]),
    (dict(calibration_width=500), ["multiple of 8"]),
    (dict(cfg=-1.0), ["cfg"]),
    (dict(weight_init="mse"), ["weight_init", "lp"]),
])
def test_quantize_rejects_bad_settings(kwargs, words):
    """The node's own check (run by quantize() before any work, and by VALIDATE_INPUTS for what INPUT_TYPES cannot
    declare) names the input and the fix."""
    with pytest.raises(ValueError) as ei:
        check_quantize_settings(**kwargs)
    for w in words:
        assert w in str(ei.value), str(ei.value)


# what each node's VALIDATE_INPUTS checks: only what INPUT_TYPES cannot declare (ComfyUI attaches a VALIDATE_INPUTS
# message to every input the function names, so one bad value showed as up to 14 errors on unrelated inputs)
CUSTOM_CHECKED = {
    "LowBitQuantizeUNet": {"method", "calibration_width", "calibration_height"},  # old method names; multiples of 8
    "LowBitEfficientDMFinetune": {"width", "height"},  # multiples of 8
    "LowBitSaveQuantizedUNet": {"filename_prefix"},  # path rules
    "LowBitBitwidthSchedule": set(), "LowBitPTQDSampler": set(), "LowBitPTQDKSampler": set(),
}


@pytest.mark.parametrize("node_id", sorted(CUSTOM_CHECKED))
def test_validate_inputs_names_only_what_input_types_cannot_declare(node_id):
    v = getattr(MAPPINGS[node_id], "VALIDATE_INPUTS", None)
    assert (set(inspect.signature(v).parameters) if v is not None else set()) == CUSTOM_CHECKED[node_id]


def _node_checks():
    from lowbit.nodes import finetune as ft

    return {"LowBitQuantizeUNet": check_quantize_settings, "LowBitEfficientDMFinetune": ft.check_finetune_settings,
            "LowBitBitwidthSchedule": sch.check_schedule_settings,
            "LowBitPTQDSampler": smp.check_sampler_settings}


@pytest.mark.parametrize("node_id", ["LowBitQuantizeUNet", "LowBitEfficientDMFinetune", "LowBitBitwidthSchedule",
                                     "LowBitPTQDSampler"])
def test_declared_ranges_and_choices_are_the_checks_ones(node_id):
    """ComfyUI validates the inputs VALIDATE_INPUTS does not name from INPUT_TYPES (min / max, the combo's list);
    the node's own check, run again before any work, accepts exactly those: the bounds and every listed choice
    pass, one step outside or an unlisted value is refused."""
    check = _node_checks()[node_id]
    for _, name, entry in all_inputs(MAPPINGS[node_id]):
        if name in CUSTOM_CHECKED[node_id] or name not in inspect.signature(check).parameters:
            continue
        kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
        if isinstance(kind, list):
            for choice in kind:
                check(**{name: choice})
            with pytest.raises(ValueError, match=name):
                check(**{name: "not-a-choice"})
        elif kind in ("INT", "FLOAT"):
            step = 1 if kind == "INT" else 1e-3 * max(1.0, abs(opts["max"]))
            check(**{name: opts["min"]})
            check(**{name: opts["max"]})
            for bad in (opts["min"] - step, opts["max"] + step):
                with pytest.raises(ValueError, match=name):
                    check(**{name: bad})


def test_schedule_rejects_weight_only_bits():
    spec = sch.ScheduleSpec(sch.MODE_FIXED, 0.5, 4, 8)
    with pytest.raises(ValueError, match="W4A16"):
        sch.check_schedule_with_bits(spec, "W4A16")
    sch.check_schedule_with_bits(spec, "W4A8")


def test_sampler_checks_name_the_bad_input():
    for kwargs, word in ((dict(eta=2.0), "eta"), (dict(sampler_name="dpmpp_2m"), "sampler_name")):
        with pytest.raises(ValueError, match=word):
            smp.check_sampler_settings(**kwargs)
    with pytest.raises(ValueError, match="denoise"):
        smp.check_ksampler_settings(denoise=1.5)
    # denoise=0 runs no step: the widget's own range refuses it before the graph runs (it failed only in sample())
    assert smp.LowBitPTQDKSampler.INPUT_TYPES()["required"]["denoise"][1]["min"] > 0
    with pytest.raises(ValueError, match="denoise"):
        smp.check_ksampler_settings(denoise=0.0)


def test_finetune_rejects_bad_settings():
    v = MAPPINGS["LowBitEfficientDMFinetune"].VALIDATE_INPUTS
    assert "multiple of 8" in v(width=100)
    from lowbit.nodes import finetune as ft

    for kwargs, word in ((dict(rank=0), "rank"), (dict(lr_scale=0.0), "lr_scale")):
        with pytest.raises(ValueError, match=word):
            ft.check_finetune_settings(**kwargs)


def test_save_prefix_rules(tmp_path):
    v = MAPPINGS["LowBitSaveQuantizedUNet"].VALIDATE_INPUTS
    assert "'..'" in v(filename_prefix="../evil")
    assert "absolute" in v(filename_prefix="/etc/unet")
    assert "empty" in v(filename_prefix="  ")
    assert v(filename_prefix="sd15/w4a8") is True
    assert nio.split_prefix("a/b/c.safetensors") == ("a/b", "c")
    p1 = nio.next_free_path(str(tmp_path), "sd/unet")
    assert p1.endswith(os.path.join("sd", "unet_00001.safetensors"))
    Path(p1).write_bytes(b"x")
    (tmp_path / "sd" / "unet_00007.safetensors").write_bytes(b"x")
    assert nio.next_free_path(str(tmp_path), "sd/unet").endswith("unet_00008.safetensors")  # never overwrites


def _save_node_on_w4a16(tmp_path, monkeypatch, group_size):
    """The Save node's host calls patched: its MODEL is a small W4A16 model (two Linears, ``group_size``), its
    diffusion_models folder ``tmp_path/diffusion_models`` (made here, returned)."""
    from lowbit.quant import QuantConfig, quantize

    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16)).eval()
    q = quantize(fp, QuantConfig(w_bits=4, a_bits=16, w_group_size=group_size, w_init="minmax", rules=()))
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    monkeypatch.setattr(nio.adapter, "require_quantized_unet", lambda model, what="model": q)
    monkeypatch.setattr(nio.adapter, "diffusion_models_folder", lambda: str(folder), raising=False)
    return folder


def test_save_layout_input_and_comfyui_native_export(tmp_path, monkeypatch):
    """The Save node's optional `layout`: lowbit (default, old workflows unchanged) or comfyui-native, which writes
    ComfyUI's quantized layout under models/diffusion_models/ and lists what it drops."""
    import json

    from safetensors import safe_open

    cls = MAPPINGS["LowBitSaveQuantizedUNet"]
    choices, opts = cls.INPUT_TYPES()["optional"]["layout"]
    assert choices == ["lowbit", "comfyui-native", "gguf"] and opts["default"] == "lowbit" and opts["tooltip"]
    assert inspect.signature(cls().save).parameters["layout"].default == "lowbit"

    _save_node_on_w4a16(tmp_path, monkeypatch, group_size=16)
    # a ComfyUI whose loader knows the layouts (2026's comfy.quant_ops.QUANT_ALGOS)
    monkeypatch.setattr(nio.adapter, "native_quant_formats", lambda: frozenset({"int8_tensorwise", "awq_w4a16"}))
    out = cls().save(object(), "sd/unet", layout="comfyui-native")
    assert out["ui"]["text"][0] == "saved models/diffusion_models/sd/unet_00001.safetensors (ComfyUI-native)"
    with safe_open(str(tmp_path / "diffusion_models" / "sd" / "unet_00001.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert "lowbit" not in f.metadata()  # not a LowBit file: Load Quantized UNet does not list it
    assert layers == {"0": {"format": "awq_w4a16", "group_size": 16}, "2": {"format": "awq_w4a16", "group_size": 16}}
    out2 = cls().save(object(), "sd/unet", layout="comfyui-native")  # never overwrites
    assert out2["ui"]["text"][0].endswith("unet_00002.safetensors (ComfyUI-native)")
    from lowbit.nodes.common import NodeInputError

    with pytest.raises(NodeInputError, match="layout"):
        cls().save(object(), "sd/unet", layout="ggml")


def test_gguf_layout_writes_a_gguf_file_for_comfyui_gguf(tmp_path, monkeypatch):
    """layout=gguf: a .gguf file under models/diffusion_models/ (never overwriting), whose general.architecture is
    the one ComfyUI-GGUF's loader expects for the MODEL's family (found through the config's base classes); a
    family that loader does not read is refused in one line before anything is written."""
    import types

    from lowbit.nodes.common import NodeInputError
    from lowbit.quant.export_gguf import read_gguf

    cls = MAPPINGS["LowBitSaveQuantizedUNet"]
    folder = _save_node_on_w4a16(tmp_path, monkeypatch, group_size=32)
    Flux = type("Flux", (), {})
    FluxSchnell = type("FluxSchnell", (Flux,), {})  # (ComfyUI's Flux variants subclass Flux)
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=FluxSchnell()))
    out = cls().save(model, "flux/q", layout="gguf")
    assert out["ui"]["text"][0] == "saved models/diffusion_models/flux/q_00001.gguf (GGUF)"
    fields, tensors = read_gguf(str(folder / "flux" / "q_00001.gguf"))
    assert fields["general.architecture"] == "flux"
    assert {k: t[0] for k, t in tensors.items()} == {"0.weight": "Q4_0", "0.bias": "F32", "2.weight": "Q4_0",
                                                    "2.bias": "F32"}
    assert cls().save(model, "flux/q", layout="gguf")["ui"]["text"][0].endswith("q_00002.gguf (GGUF)")
    odd = types.SimpleNamespace(model=types.SimpleNamespace(model_config=type("SD20", (), {})()))
    with pytest.raises(NodeInputError, match="no architecture for SD20 models"):
        cls().save(odd, "sd2/q", layout="gguf")
    assert sorted(p.name for p in folder.rglob("*.gguf")) == ["q_00001.gguf", "q_00002.gguf"]


def test_comfyui_native_save_refuses_a_comfyui_that_cannot_load_it(tmp_path, monkeypatch):
    """A ComfyUI without the comfy_quant loader (0.3.64) would read the file's integers as float weights: the
    node refuses before writing, naming the fix; one that lacks a format the file needs (awq_w4a16 for 4-bit
    weights) is refused by export_comfy before writing too."""
    from lowbit.nodes.common import NodeInputError
    from lowbit.quant import ConfigError

    cls = MAPPINGS["LowBitSaveQuantizedUNet"]
    folder = _save_node_on_w4a16(tmp_path, monkeypatch, group_size=16)
    monkeypatch.setattr(nio.adapter, "comfyui_version", lambda: "0.3.64")
    monkeypatch.setattr(nio.adapter, "native_quant_formats", lambda: None)
    with pytest.raises(NodeInputError, match=r"ComfyUI \(0\.3\.64\) has no comfy_quant loader.*layout=lowbit"):
        cls().save(object(), "sd/unet", layout="comfyui-native")
    monkeypatch.setattr(nio.adapter, "native_quant_formats", lambda: frozenset({"int8_tensorwise"}))
    with pytest.raises(ConfigError, match="awq_w4a16.*keep LowBit's own file for 4 bits .*layout=lowbit"):
        cls().save(object(), "sd/unet", layout="comfyui-native")
    assert not any(folder.rglob("*.safetensors")), "nothing may be written when the reader cannot load it"


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_percent_maps_through_the_model_timesteps():
    spec = sch.ScheduleSpec(sch.MODE_FIXED, 0.25, 4, 8)
    s = spec.to_schedule(lambda p: (1.0 - p) * 999.0)  # a linear percent -> t map, as ComfyUI's discrete models
    assert s.a_bits_at(999) == 4 and s.a_bits_at(800) == 4  # first quarter of the run: early bits
    assert s.a_bits_at(700) == 8 and s.a_bits_at(0) == 8
    assert sch.ScheduleSpec(sch.MODE_FIXED, 0.0, 4, 8).to_schedule(lambda p: 0).bits_used == (8,)
    assert sch.ScheduleSpec(sch.MODE_FIXED, 1.0, 4, 8).to_schedule(lambda p: 0).bits_used == (4,)


# ------------------------------------------------------------------------------------------ compare
def _img(h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


def test_psnr_known_values():
    a = torch.full((1, 16, 16, 3), 0.5)
    assert compare.psnr(a, a) == [float("inf")]
    assert compare.psnr(a, a + 0.1)[0] == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert compare.psnr(a, a + 0.01)[0] == pytest.approx(40.0, abs=1e-3)


def _ssim_reference(x, y, size=11, sigma=1.5):
    """Direct per-window SSIM (loops; independent of the conv-based implementation)."""
    g = compare.gaussian_window(size, sigma)
    H, W = x.shape
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (g * px).sum(), (g * py).sum()
            vx = (g * (px - mx) ** 2).sum()
            vy = (g * (py - my) ** 2).sum()
            cxy = (g * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_matches_a_direct_reference_and_known_limits():
    a = _img(24, 20, 0)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert compare.ssim(a, a)[0] == pytest.approx(1.0, abs=1e-9)
    ya, yb = compare.luminance(a)[0, 0], compare.luminance(b)[0, 0]
    assert compare.ssim(a, b)[0] == pytest.approx(_ssim_reference(ya, yb), abs=1e-9)
    assert compare.ssim(a, b)[0] < 0.99
    # a constant image vs itself shifted: luminance term only, (2*m1*m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = 0.01 ** 2
    s = compare.ssim(torch.full((1, 16, 16, 3), 0.2), torch.full((1, 16, 16, 3), 0.6))[0]
    assert s == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), abs=1e-6)


def test_compare_checks_shapes_and_heatmap():
    with pytest.raises(ValueError, match="same size"):
        compare.psnr(_img(16, 16), _img(32, 32))
    with pytest.raises(ValueError, match="equal batches"):
        compare.psnr(torch.rand(2, 8, 8, 3), torch.rand(3, 8, 8, 3))
    a = torch.zeros(1, 8, 8, 3)
    b = a.clone()
    b[0, 2, 3] = 0.5
    heat, peak = compare.difference_map(a, b)
    assert heat.shape == (1, 8, 8, 3) and peak == pytest.approx(0.5)
    assert torch.equal(heat[0, 2, 3], torch.ones(3)) and heat[0, 0, 0].sum() == 0
    assert "SSIM" in compare.report([20.0], [0.9], peak)
    assert len(compare.psnr(torch.rand(3, 8, 8, 3), torch.rand(1, 8, 8, 3))) == 3  # broadcast one side


def test_compare_report_over_a_batch_uses_the_mean_squared_error_and_says_when_one_image_is_reused():
    """An identical pair and a bad one: the batch line is the PSNR of the mean squared error (13.0 dB here, not the
    61.6 dB a mean of 111 and 12 dB gives), and a single image_a compared with each of two is said."""
    text = compare.report([float("inf"), 10.0], [1.0, 0.2], 0.5, sizes=(1, 2))
    assert text.splitlines()[0] == "image_a has 1 image: compared with each of the 2 images of image_b"
    assert "all 2: PSNR 13.01 dB (of the mean squared error), mean SSIM 0.6000" in text
    assert "compared with each" not in compare.report([30.0, 30.0], [0.9, 0.9], 0.1, sizes=(2, 2))
    assert "all 2: PSNR 30.00 dB" in compare.report([30.0, 30.0], [0.9, 0.9], 0.1, sizes=(2, 2))


# ------------------------------------------------------------------------------------- PTQD sampler
class _Denoiser:
    """A fake ComfyUI model_k: denoised = x * c (no ``inner_model``, so no PTQD statistics are found)."""

    def __init__(self, c=0.5):
        self.c = c

    def __call__(self, x, sigma, **kw):
        return x * self.c


def test_ptqd_sampler_without_stats_is_the_plain_sampler():
    sig = torch.tensor([10.0, 3.0, 1.0, 0.0])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    # euler without stats: x' = denoised + eps * sigma_next with eps = (x - denoised)/sigma
    out = smp.sample_ptqd(_Denoiser(), x.clone(), sig, method="euler")
    ref = x.clone()
    for i in range(3):
        d = ref * 0.5
        ref = d + (ref - d) / sig[i] * sig[i + 1]
    assert torch.allclose(out, ref)
    rep = []
    smp.sample_ptqd(_Denoiser(), x.clone(), sig, {"seed": 3}, method="euler_ancestral", report=rep)
    assert all(r["noise_before"] == r["noise_after"] for r in rep)  # no stats: VSC is a no-op
    a = smp.sample_ptqd(_Denoiser(), x.clone(), sig, {"seed": 3}, method="ddpm")
    b = smp.sample_ptqd(_Denoiser(), x.clone(), sig, {"seed": 3}, method="ddpm")
    assert torch.equal(a, b)  # seeded


def test_ancestral_step_keeps_total_noise():
    for s, sn in ((14.6, 7.0), (2.0, 1.0), (1.0, 0.1)):
        down, up = smp.ancestral_step(s, sn, 1.0)
        assert down ** 2 + up ** 2 == pytest.approx(sn ** 2)
    assert smp.ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)


def test_ptqd_sampler_reduces_injected_noise_with_stats(monkeypatch):
    class View:
        def residual_var(self, sigma):
            return 0.01

    monkeypatch.setattr(smp.adapter, "ptqd_view", lambda model: View())
    sig = torch.tensor([10.0, 3.0, 1.0, 0.0])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for method in ("euler_ancestral", "ddpm", "ddim"):
        rep = []
        smp.sample_ptqd(_Denoiser(), x.clone(), sig, {"seed": 0}, method=method, eta=1.0, report=rep)
        stochastic = [r for r in rep if r["noise_before"] > 0]
        assert stochastic and all(r["noise_after"] < r["noise_before"] for r in stochastic), (method, rep)
    rep = []
    smp.sample_ptqd(_Denoiser(), x.clone(), sig, method="euler", report=rep)
    assert all(r["noise_before"] == r["noise_after"] == 0 for r in rep)  # deterministic: no-op


# --------------------------------------------------------------------------------------- LoRA side path
class _FakeLinear:
    weight_shape = (6, 5)


class _FakeConv:
    weight_shape = (6, 3, 3, 3)
    stride, padding, dilation, groups = (1, 1), (1, 1), (1, 1), 1


def test_low_rank_side_path_equals_the_merged_delta():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    x = torch.randn(4, 5, generator=g)
    lin = side.SidePath(down=down, up=up, scale=0.7)
    assert torch.allclose(lin(_FakeLinear(), x), F.linear(x, 0.7 * up @ down), atol=1e-5)
    dconv, uconv = torch.randn(2, 3, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g)
    xc = torch.randn(1, 3, 9, 9, generator=g)
    f = side.check_conv_low_rank(_FakeConv(), dconv, uconv)
    conv = side.SidePath(down=f[0], up=f[1], scale=0.5)
    delta = 0.5 * (uconv.flatten(1) @ dconv.flatten(1)).reshape(6, 3, 3, 3)  # ComfyUI's LoRA merge formula
    assert torch.allclose(conv(_FakeConv(), xc), F.conv2d(xc, delta, None, 1, 1), atol=1e-4)
    dense = side.SidePath(delta_w=delta, delta_b=torch.ones(6))
    assert torch.allclose(dense(_FakeConv(), xc), F.conv2d(xc, delta, torch.ones(6), 1, 1), atol=1e-5)


def test_side_path_hook_is_exactly_removable():
    layer = torch.nn.Linear(5, 6)
    layer.weight_shape = (6, 5)
    x = torch.randn(3, 5)
    before = layer(x)
    side.set_side_paths(layer, [side.SidePath(down=torch.randn(2, 5), up=torch.randn(6, 2))])
    assert not torch.equal(layer(x), before)
    assert side.side_path_count(layer) == 1
    assert side.clear_side_paths(layer) == 1
    assert torch.equal(layer(x), before)


# ------------------------------------------------------------------------------------- misc pure parts
def test_loss_curve_image():
    from lowbit.nodes.finetune import loss_curve_image

    img = loss_curve_image([1.0, 0.5, 0.2, 0.1, 0.05, 0.04])
    assert img.shape == (1, 360, 640, 3) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert loss_curve_image([]).shape == (1, 360, 640, 3)


def test_web_extension_and_help_pages_exist():
    js = (REPO / "web" / "js" / "lowbit_compare.js").read_text()
    assert "registerExtension" in js and "LowBitCompareImages" in js and "a_images" in js
    for node_id in EXPECTED_IDS:
        page = REPO / "web" / "docs" / f"{node_id}.md"
        assert page.is_file(), f"missing help page {page}"
        assert len(page.read_text()) > 200


def test_example_workflows_have_thumbnails():
    wf = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(wf) >= 3
    for p in wf:
        assert p.with_suffix(".jpg").is_file(), f"{p.name} has no same-name .jpg thumbnail"


def test_auto_schedule_adds_mixed_once():
    """The auto (SNR) schedule is the pipeline's +mixed stage; a method that already has it is left as is (it was
    appended again, and the pipeline refused 'recon+ptqd+vsc+mixed+mixed')."""
    from lowbit.nodes.quantize import method_for_schedule
    from lowbit.quant.pipeline import parse_method

    assert method_for_schedule("lp+ptqd", auto=True) == "lp+ptqd+mixed"
    assert method_for_schedule("recon+ptqd+vsc+mixed", auto=True) == "recon+ptqd+vsc+mixed"
    assert method_for_schedule("lp+ptqd", auto=False) == "lp+ptqd"
    parse_method(method_for_schedule("recon+ptqd+vsc+mixed", auto=True))
    # an old method name the node accepts, with the auto schedule: resolved before +mixed ('ptqd+mixed' was refused)
    assert method_for_schedule("ptqd", auto=True) == "lp+ptqd+mixed"
    parse_method(method_for_schedule("ptqd+recon", auto=True))
    with pytest.raises(ValueError, match="part 'mixed' appears twice"):
        parse_method("recon+ptqd+vsc+mixed+mixed")


def test_save_node_warns_when_the_file_cannot_load_without_a_model(tmp_path, monkeypatch):
    """Save Quantized UNet said "saved ..." even when the architecture record failed (the file then needs the float
    MODEL to load): the node's text now says so."""
    import torch

    from lowbit.nodes import io as nio
    from lowbit.quant import QuantConfig, quantize, save

    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    q = quantize(m, QuantConfig.preset("W8A8", a_dynamic=True))
    monkeypatch.setattr(nio.adapter, "lowbit_folder", lambda: str(tmp_path))
    for arch, warned in ((False, True), ({"library": "torch", "class": "Sequential"}, False)):
        path = str(tmp_path / f"u{int(warned)}.safetensors")
        monkeypatch.setattr(nio, "comfy_arch", lambda model, arch=arch: arch)  # what ComfyUI's model gave

        def fake_save(model, prefix, folder, arch=None, path=path):
            save(q, path)  # (a torch Sequential: the file itself records no architecture)
            return path

        monkeypatch.setattr(nio, "save_unet", fake_save)
        text = nio.LowBitSaveQuantizedUNet().save(None, "u")["ui"]["text"]
        assert text[0].startswith("saved models/lowbit/")
        assert any(nio.UNRECORDED in t for t in text) == warned, text


def test_stale_texts_say_what_the_code_does():
    """The schedule mode's refusal named a missing auto_schedule (it exists); the report tooltip said edge layers
    are kept at 8 bits (the measured default keeps layers in float too); the fine-tune page gave a fixed
    "step size / 2500" rate (lora_lr derives it) and said the node logs no stages (it does)."""
    with pytest.raises(ValueError) as ei:
        sch.check_schedule_settings(mode="bogus")
    assert "does not have" not in str(ei.value) and sch.MODE_AUTO in str(ei.value)
    tip = MAPPINGS["LowBitQuantizeUNet"].OUTPUT_TOOLTIPS[1]
    assert "measured" in tip and "float" in tip
    doc = (REPO / "web" / "docs" / "LowBitEfficientDMFinetune.md").read_text()
    assert "2500" not in doc and "no per-step lines" not in doc and "lora_lr" in doc
