"""Issue 14: Flux- and SDXL-architecture checkpoints through LowBit's nodes in a real ComfyUI (CPU, headless).

Skipped unless COMFYUI_DIR is set (README section 'Testing inside real hosts'):

    COMFYUI_DIR=/work/ComfyUI nice pytest -q -m comfyui tests/nodes/test_comfyui_dit.py -x

The fixtures are built by ``make_fixture.py`` (``--variant sdxl``, ``--variant flux``; their docstrings say why
they have the sizes they have) and cached like the SD1.5/SD3 ones. This module runs its own server (the fixture
``comfy`` below overrides the session one of conftest.py for this file): Flux needs conditioning without a text
encoder, so the test writes a test-only custom node file (``TEST_NODES``) into the server's private
``custom_nodes`` folder before the server starts. Nothing is written into the ComfyUI checkout.

Per architecture and setting: Quantize UNet (LowBit) -> a stock sampler -> latent (and, for SDXL, an image);
Save Quantized UNet (lowbit layout) -> Load Quantized UNet -> the same latent bit for bit; Save with
``layout=comfyui-native`` -> a file whose keys and header are ComfyUI's quantized layout for that model's own
key names; the saved PTQD tables are keyed by ``profile scale * model_sampling.timestep(sigma)`` of the sigmas
the calibration run used (Flux: 1000 * sigma; SDXL: the discrete timestep), read from the server itself;
ComfyUI's own detection reads the native file as the same model (asserted at 8 bits; an awq_w4a16 file stores
[N, K/2] bytes per 4-bit weight, and ComfyUI 0.3.64 reads SDXL's context width from attn2.to_k's second
dimension, so it finds 1024 and matches no config: printed, not asserted); at 8 bits, ComfyUI's stock Load
Diffusion Model loads the native file with LowBit's weights bit for bit and samples it close to a float file of
those weights, far closer than a copy with one scale per tensor (``check_stock_sampling``, native_check.py).
"""
from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.comfyui

# Written into <base>/custom_nodes/ before the server starts; ComfyUI imports single-file custom nodes.
TEST_NODES = r'''
"""Test-only nodes for LowBit's DiT integration tests (written by tests/nodes/test_comfyui_dit.py)."""
import sys
import types

import torch

# ComfyUI 0.3.64 has no comfy_quant loader, so the Save node refuses layout=comfyui-native there (its stock
# loader would read the integers as float weights; tests/nodes/test_comfyui_integration.py checks the refusal).
# These tests check the native file's keys and header and 0.3.64's model detection of it, so they stand in the
# format registry of a newer ComfyUI (2026's comfy/quant_ops.py: QUANT_ALGOS) when the host has none.
try:
    import comfy.quant_ops  # noqa: F401
except ImportError:
    _stand_in = types.ModuleType("comfy.quant_ops")
    _stand_in.QUANT_ALGOS = {"int8_tensorwise": {}, "awq_w4a16": {}}
    sys.modules["comfy.quant_ops"] = _stand_in


class LowBitTestConditioning:
    """CONDITIONING of the shapes a text encoder would give: context [1, tokens, context_dim] and
    pooled_output [1, pooled_dim], seeded normal values times scale (Flux: T5-XXL 4096, CLIP-L pooled 768)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "context_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "lowbit_test"

    def make(self, seed, tokens, context_dim, pooled_dim, scale):
        g = torch.Generator().manual_seed(int(seed))
        ctx = torch.randn(1, tokens, context_dim, generator=g) * scale
        pooled = torch.randn(1, pooled_dim, generator=g) * scale
        return ([[ctx, {"pooled_output": pooled}]],)


class LowBitTestScheduleReport:
    """The sigmas of a SIGMAS input and what the MODEL's diffusion model receives for each:
    model_sampling.timestep(sigma), the sampling object's class names (ComfyUI builds the class on the fly as
    ``ModelSampling(<sampling>, <prediction>)``) and the MODEL's memory estimate (ModelPatcher.model_size)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sigmas": ("SIGMAS",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"
    CATEGORY = "lowbit_test"

    def report(self, model, sigmas):
        ms = model.get_model_object("model_sampling")
        s = sigmas.detach().float().cpu()
        t = ms.timestep(s).float()
        return {"ui": {"sigmas": [float(x) for x in s], "timesteps": [float(x) for x in t],
                       "sampling": [c.__name__ for c in type(ms).__mro__],
                       "model_size": [int(model.model_size())]}}


class LowBitTestDetect:
    """What ComfyUI's "Load Diffusion Model" path detects for a safetensors file (comfy/sd.py
    load_diffusion_model_state_dict's first steps: the UNet prefix, then model_detection.model_config_from_unet),
    run on meta tensors shaped from the file's header: the config class and the detected unet_config."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "detect"
    CATEGORY = "lowbit_test"

    def detect(self, path):
        import json
        import struct
        import comfy.model_detection as md
        import comfy.utils
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                  "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}
        with open(path, "rb") as f:
            h = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        h.pop("__metadata__", None)
        sd = {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta") for k, v in h.items()}
        temp = comfy.utils.state_dict_prefix_replace(sd, {md.unet_prefix_from_state_dict(sd): ""}, filter_keys=True)
        cfg = md.model_config_from_unet(temp if temp else sd, "")
        plain = (int, float, str, list, bool)
        unet = {} if cfg is None else {k: v for k, v in cfg.unet_config.items() if isinstance(v, plain)}
        return {"ui": {"config": [None if cfg is None else type(cfg).__name__],
                       "unet_config": [json.dumps(unet, sort_keys=True)]}}


class LowBitTestQuantFormats:
    """The comfy_quant formats this ComfyUI's stock loader reads (comfy.quant_ops.QUANT_ALGOS)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "formats"
    CATEGORY = "lowbit_test"

    def formats(self):
        import importlib
        qo = importlib.import_module("comfy.quant_ops")   # (the stand-in above is in sys.modules only)
        return {"ui": {"formats": sorted(qo.QUANT_ALGOS)}}


NODE_CLASS_MAPPINGS = {"LowBitTestConditioning": LowBitTestConditioning,
                       "LowBitTestScheduleReport": LowBitTestScheduleReport,
                       "LowBitTestDetect": LowBitTestDetect,
                       "LowBitTestQuantFormats": LowBitTestQuantFormats}
'''

CALIB = dict(calibration_steps=2, calibration_samples=1, seed=0, calibration_width=64, calibration_height=64,
             calibration_timesteps=0, time_bins=1, weight_init="minmax", recon_iters=0)
STEPS = 2


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dit_fixtures(comfyui_dir, comfyui_python):
    t0 = time.perf_counter()
    paths = {v: comfy_harness.ensure_fixture(comfyui_dir, comfyui_python, variant=v, timeout=1800)
             for v in ("sdxl", "flux")}
    print(f"\nDiT fixtures ready in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{v} {p.stat().st_size / 2 ** 20:.0f} MiB" for v, p in paths.items()))
    return paths


@pytest.fixture(scope="module")
def comfy(comfyui_dir, comfyui_python, dit_fixtures):
    """A ComfyUI server for this module: the SDXL checkpoint in models/checkpoints, the Flux diffusion model in
    models/diffusion_models, the test-only nodes in custom_nodes. (Named ``comfy`` so conftest.py attaches
    the server log to failures.)"""
    server = comfy_harness.ComfyServer(comfyui_dir, python=comfyui_python, checkpoints=[dit_fixtures["sdxl"]])
    dm = server.base_dir / "models" / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    (dm / dit_fixtures["flux"].name).symlink_to(dit_fixtures["flux"])
    (server.base_dir / "custom_nodes" / "lowbit_test_nodes.py").write_text(TEST_NODES)
    gguf_dir = os.environ.get("COMFYUI_GGUF_DIR")  # (ComfyUI-GGUF, for the GGUF test; see test_comfyui_gguf.py)
    if gguf_dir and (Path(gguf_dir) / "loader.py").is_file():
        (server.base_dir / "custom_nodes" / "ComfyUI-GGUF").symlink_to(Path(gguf_dir).resolve(),
                                                                       target_is_directory=True)
    try:
        yield server.launch()
    finally:
        server.cleanup()


# --------------------------------------------------------------------------------------------- helpers
def _combo(spec) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 else {}).get("options", [])


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _latent(comfy, hist, node_id):
    from safetensors.torch import load_file

    rec = hist["outputs"][node_id]["latents"][0]
    return load_file(str(comfy.server.base_dir / "output" / rec["subfolder"] / rec["filename"]))["latent_tensor"]


def _quantize(graph, node_id, model, positive, negative, **settings):
    graph[node_id] = {"class_type": "LowBitQuantizeUNet",
                      "inputs": dict(CALIB, model=model, positive=positive, negative=negative, **settings)}
    return [node_id, 0]


def _native_path(comfy, hist, node_id) -> Path:
    texts = hist["outputs"][node_id]["text"]
    # models/diffusion_models' first folder is models/unet (ComfyUI's legacy name) when it exists
    m = re.match(r"saved models/((?:unet|diffusion_models)/.+\.safetensors) \(ComfyUI-native\)$", texts[0])
    assert m, f"the native save reported {texts}"
    path = comfy.server.base_dir / "models" / m.group(1)
    assert path.is_file(), path
    return path


def _fixture_unet_keys(fixture: Path, prefix: str) -> dict:
    """key (without prefix) -> shape of every diffusion-model tensor of the fixture file."""
    h = _header(fixture)
    return {k[len(prefix):]: v["shape"] for k, v in h.items() if k != "__metadata__" and k.startswith(prefix)}


def _norm_key(key: str) -> str:
    return key[:-len("scale")] + "weight" if key.endswith("_norm.scale") else key


def check_native_file(path: Path, fixture_keys: dict, bits: str) -> dict:
    """The comfyui-native file has ComfyUI's quantized layout for this model's own keys: every float key of the
    fixture is there (same shape for float tensors), each quantized layer has its storage tensors, a
    ``comfy_quant`` JSON tensor equal to its ``_quantization_metadata`` entry, and nothing else."""
    from safetensors import safe_open

    h = _header(path)
    meta = h.pop("__metadata__")
    # Flux's q/k RMSNorm gains are "<...>_norm.scale" in Flux files (and in 0.3.64's module); newer ComfyUI's module
    # names them "<...>_norm.weight" and renames a file's ".scale" on load (supported_models.Flux), so a native file
    # written there carries ".weight": the same tensor.
    fixture_keys = {_norm_key(k): v for k, v in fixture_keys.items()}
    h = {_norm_key(k): v for k, v in h.items()}
    qmeta = json.loads(meta["_quantization_metadata"])
    assert qmeta["format_version"] == "1.0"
    layers = qmeta["layers"]
    assert layers, "no layer was written in a ComfyUI quantized format"
    formats = {c["format"] for c in layers.values()}
    want = {"int8_tensorwise"} if bits == "W8A8" else {"awq_w4a16"}
    assert want <= formats <= {"int8_tensorwise", "awq_w4a16"}, formats
    exported = json.loads(meta["lowbit_export"])
    assert isinstance(exported["dropped"], list) and exported["dropped"]
    expected = set(fixture_keys)
    with safe_open(str(path), "pt") as f:
        for layer, conf in layers.items():
            assert layer + ".weight" in fixture_keys, f"{layer} is not a layer of the model"
            n, k = fixture_keys[layer + ".weight"]
            got = json.loads(bytes(f.get_tensor(layer + ".comfy_quant").tolist()).decode())
            assert got == conf, (layer, got, conf)
            w = h[layer + ".weight"]
            if conf["format"] == "int8_tensorwise":
                assert w["dtype"] == "I8" and w["shape"] == [n, k], (layer, w)
                assert h[layer + ".weight_scale"]["shape"] == [n, 1]
                expected |= {layer + ".weight_scale"}
            else:
                g = conf["group_size"]
                assert w["dtype"] == "I8" and w["shape"] == [n, k // 2] and k % g == 0, (layer, w, g)
                assert h[layer + ".weight_scale"]["shape"] == [k // g, n]
                assert h[layer + ".weight_zeros"]["shape"] == [k // g, n]
                expected |= {layer + ".weight_scale", layer + ".weight_zeros"}
            expected.add(layer + ".comfy_quant")
    assert set(h) == expected, (f"missing {sorted(expected - set(h))[:10]}, "
                                f"unexpected {sorted(set(h) - expected)[:10]}")
    quantized_weights = {layer + ".weight" for layer in layers}
    for key, shape in fixture_keys.items():
        if key not in quantized_weights:
            assert h[key]["shape"] == shape, (key, h[key]["shape"], shape)
    return layers


def detect(comfy, path: Path) -> tuple:
    """(config class name, unet_config) ComfyUI's model detection gives for a file (LowBitTestDetect)."""
    out = comfy.run({"1": {"class_type": "LowBitTestDetect", "inputs": {"path": str(path)}}})["outputs"]["1"]
    return out["config"][0], json.loads(out["unet_config"][0])


def native_4bit_readable(comfy) -> bool:
    """Whether this ComfyUI's stock loader reads awq_w4a16 (LowBit's 4-bit comfyui-native format). ComfyUI 0.33.0's
    QUANT_ALGOS has no such entry (its 4-bit formats, asym_w4a8_int8 and convrot_w4a4, hold Hadamard-rotated
    weights), so the Save node must refuse a 4-bit native file there rather than write one read as float."""
    out = comfy.run({"1": {"class_type": "LowBitTestQuantFormats", "inputs": {}}})["outputs"]["1"]
    return "awq_w4a16" in out["formats"]


def check_native_refused(comfy, lowbit_rel: str, loader: dict, name: str):
    """On a ComfyUI without awq_w4a16, saving the 4-bit model (reloaded from its lowbit file) in the native
    layout fails with the error naming the unknown format, and writes no file."""
    g = {"1": loader, "21": {"class_type": "LowBitLoadQuantizedUNet",
                               "inputs": {"model": ["1", 0], "unet_name": lowbit_rel}},
         "14": {"class_type": "LowBitSaveQuantizedUNet",
                "inputs": {"model": ["21", 0], "filename_prefix": f"native/{name}", "layout": "comfyui-native"}}}
    with pytest.raises(AssertionError, match=r"does not know the comfy_quant format\(s\) awq_w4a16"):
        comfy.run(g, timeout=1800)
    for sub in ("unet", "diffusion_models"):
        assert not list((comfy.server.base_dir / "models" / sub / "native").glob(f"{name}_*.safetensors"))
    print(f"{name}: this ComfyUI has no awq_w4a16 loader; the 4-bit comfyui-native save was refused")


def check_native_detected(comfy, native: Path, fixture: Path, bits: str, expected_config: str):
    """ComfyUI's detection reads the exported file as the same model as the float fixture. int8_tensorwise keeps
    every weight's shape; awq_w4a16 stores [N, K/2] bytes, which detection reads as a K half as wide where it
    takes a width from a weight (printed; asserted for 8 bits)."""
    fixture_cfg = detect(comfy, fixture)
    assert fixture_cfg[0] == expected_config, fixture_cfg
    native_cfg = detect(comfy, native)
    print(f"ComfyUI's detection of the {bits} comfyui-native file: {native_cfg[0]} "
          f"({'same config as the float model' if native_cfg == fixture_cfg else 'differs: ' + str(native_cfg)})")
    if bits == "W8A8":
        assert native_cfg == fixture_cfg, (native_cfg, fixture_cfg)
    return native_cfg == fixture_cfg


def check_stock_sampling(comfy, comfyui_dir, comfyui_python, native: Path, lowbit_file: Path, graph, sample,
                         stem: str, lat: dict, config: str, record_property) -> dict:
    """ComfyUI's stock Load Diffusion Model (UNETLoader) on the 8-bit native file (tests/nodes/native_check.py):
    every int8_tensorwise layer ComfyUI builds dequantizes to LowBit's own weights bit for bit (decoded from the
    layout=lowbit file), with no missing or unexpected key, and a per-tensor-scale copy does not; then the native
    file, a float file of LowBit's weights (``dequant``) and the per-tensor copy are sampled with stock nodes only
    (``graph()``'s conditioning; no node of the pack) and compared with ``lat`` (LowBit's quantized sample and the
    float model's, same seed). Returns the relative L2 distances."""
    import native_check as nc

    root = next(comfy.server.base_dir / "models" / sub for sub in ("unet", "diffusion_models")
                if native.is_relative_to(comfy.server.base_dir / "models" / sub))
    files = nc.write_variants(native, lowbit_file, root / "stock_check", stem)
    names = {"native": native.relative_to(root).as_posix(),
             **{v: files[v].relative_to(root).as_posix() for v in nc.VARIANTS}}
    listed = _combo(comfy.object_info("UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"])
    assert all(n in listed for n in names.values()), (names, listed)
    rep = nc.comfy_weights(comfyui_dir, comfyui_python, files["dequant"],
                           {"native": native, "per_tensor": files["per_tensor"]})
    print(f"{stem}: ComfyUI's load of the native file: {rep['native']}; per-tensor control: {rep['per_tensor']}")
    n_layers, r = len(files["layers"]), rep["native"]
    assert r["config"] == config and r["formats"] == ["int8_tensorwise"], r
    assert r["quantized_layers"] == r["identical"] == n_layers and r["max_weight_diff"] == 0.0, r
    assert not r["warnings"], r
    assert rep["per_tensor"]["identical"] < n_layers, rep["per_tensor"]

    g = graph()
    for i, (v, name) in enumerate(names.items()):
        g[f"7{i}"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
        g[f"8{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": sample(g, f"9{i}", [f"7{i}", 0]),
                                                            "filename_prefix": f"latents/{stem}_stock_{v}"}}
    # (LowBitTest*: this file's test-only conditioning for Flux, not the pack's)
    assert not [n for n in g.values() if n["class_type"].startswith("LowBit")
                and not n["class_type"].startswith("LowBitTest")], "a LowBit node in the stock-loader graph"
    t0 = time.perf_counter()
    log_start = len(comfy.server.log_text())
    hist = comfy.run(g, timeout=1800)
    log = comfy.server.log_text()[log_start:]
    lat = dict(lat, **{v: _latent(comfy, hist, f"8{i}") for i, v in enumerate(names)})
    assert "Using mixed precision operations" in log, "ComfyUI did not load the native file as a quantized model"
    assert not re.search(r"unet (missing|unexpected)|left over keys", log), log[-3000:]
    q = next(k for k in lat if k.startswith("lowbit"))
    d = {f"{a} vs {b}": nc.rel(lat[a], lat[b]) for a, b in (
        ("native", "dequant"), ("native", q), ("per_tensor", "dequant"), (q, "dequant"),
        ("native", "float"), (q, "float"), ("dequant", "float"))}
    report = ", ".join(f"{k} {v:.3g}" for k, v in d.items())
    print(f"{stem}: stock-loader sampling ({time.perf_counter() - t0:.0f}s), {n_layers} int8_tensorwise layers, "
          f"relative L2 distance of the latents: {report}")
    record_property(f"{stem}_native_stock_distances", report)
    assert d["per_tensor vs dequant"] >= 4 * d["native vs dequant"], report
    assert d["dequant vs float"] > 0, "the weights were not quantized"
    comfy.free()
    return d


def check_ptqd_keys(lowbit_file: Path, report: dict, scale: float, T: int = 1000):
    """The saved PTQD tables are keyed by scale * model_sampling.timestep(sigma) for the sigmas of the
    calibration schedule (every step's call; the last sigma, 0, is not a model call)."""
    from safetensors import safe_open

    with safe_open(str(lowbit_file), "pt") as f:
        t = f.get_tensor("__extra__.ptqd.t").double()
    header = json.loads(_header(lowbit_file)["__metadata__"]["lowbit"])
    assert header["num_train_timesteps"] == T
    expected = sorted(scale * x for x in report["timesteps"][:-1])
    got = sorted(float(x) for x in t)
    assert len(got) == len(expected) and all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(got, expected)), (
        f"PTQD keys {got} != {scale} * timestep(sigma) {expected} (sigmas {report['sigmas']})")
    assert all(0 <= x <= T for x in got)
    return got


# ----------------------------------------------------------------------------------------------- tests
def test_dit_fixtures_detected(comfy, dit_fixtures):
    info = comfy.object_info()
    assert dit_fixtures["sdxl"].name in _combo(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"])
    assert dit_fixtures["flux"].name in _combo(info["UNETLoader"]["input"]["required"]["unet_name"])
    assert "LowBitTestConditioning" in info and "LowBitQuantizeUNet" in info


# W8A8 with the default precision plan (measured per layer) and PTQD; a 4-bit setting with the name rules
# (precision=rules skips the per-layer error measurement, minutes on a CPU)
FLUX_SETTINGS = [("W8A8", "lp+ptqd", "measured"), ("W4A8", "lp", "rules")]


def _flux_graph(flux_name):
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": flux_name, "weight_dtype": "default"}},
        "2": {"class_type": "LowBitTestConditioning",
              "inputs": {"seed": 1, "tokens": 8, "context_dim": 4096, "pooled_dim": 768, "scale": 1.0}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    return g


def _flux_sample(g, node_id, model):
    g[node_id] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
        "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return [node_id, 0]


@pytest.mark.parametrize("bits,method,precision", FLUX_SETTINGS)
def test_flux_architecture_quantize_sample_save_reload(comfy, comfyui_dir, comfyui_python, dit_fixtures, bits, method,
                                                       precision, record_property):
    """A diffusion model ComfyUI detects as Flux (dev, guidance embedding) through Quantize UNet, euler +
    FluxGuidance, Save (both layouts) and Load; PTQD keys are 1000 * sigma (comfy-flux profile)."""
    flux = dit_fixtures["flux"]
    t0 = time.perf_counter()
    g = _flux_graph(flux.name)
    q = _quantize(g, "10", ["1", 0], ["3", 0], ["3", 0], bits=bits, method=method, cfg=1.0, precision=precision)
    _flux_sample(g, "11", q)
    g["12"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"latents/flux_{bits}"}}
    g["13"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": q, "filename_prefix": f"it/flux_{bits}"}}
    native_ok = bits == "W8A8" or native_4bit_readable(comfy)
    if native_ok:
        g["14"] = {"class_type": "LowBitSaveQuantizedUNet",
                   "inputs": {"model": q, "filename_prefix": f"native/flux_{bits}", "layout": "comfyui-native"}}
    g["15"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                          "steps": CALIB["calibration_steps"], "denoise": 1.0}}
    g["16"] = {"class_type": "LowBitTestScheduleReport", "inputs": {"model": ["1", 0], "sigmas": ["15", 0]}}
    g["19"] = {"class_type": "LowBitTestScheduleReport", "inputs": {"model": q, "sigmas": ["15", 0]}}
    _flux_sample(g, "17", ["1", 0])  # the float model, same seed
    g["18"] = {"class_type": "SaveLatent",
               "inputs": {"samples": ["17", 0], "filename_prefix": f"latents/flux_fp_{bits}"}}
    hist = comfy.run(g, timeout=3000)
    t_quant = time.perf_counter() - t0
    fresh, fp = _latent(comfy, hist, "12"), _latent(comfy, hist, "18")
    assert fresh.shape == (1, 16, 8, 8) and fresh.dtype.is_floating_point
    assert bool(fresh.isfinite().all())
    assert not bool((fresh == fp).all()), "the quantized model sampled exactly the float model's latent"
    rel_err = float((fresh - fp).norm() / fp.norm())
    print(f"\nFlux {bits} {method}: quantize+sample+save {t_quant:.0f}s, latent rel. error vs float {rel_err:.3f}")
    record_property(f"flux_{bits}_seconds", round(t_quant, 1))

    report = hist["outputs"]["16"]
    assert "ModelSamplingFlux" in report["sampling"] and "CONST" in report["sampling"], report
    # ComfyUI's Flux receives sigma itself
    assert all(abs(a - b) < 1e-6 for a, b in zip(report["sigmas"], report["timesteps"])), report
    rel = hist["outputs"]["13"]["lowbit_files"][0]
    lowbit_file = comfy.server.base_dir / "models" / "lowbit" / rel
    header = json.loads(_header(lowbit_file)["__metadata__"]["lowbit"])
    assert header["model"]["cls"] == "Flux" and header["num_train_timesteps"] == 1000, header["model"]
    if "ptqd" in method:
        keys = check_ptqd_keys(lowbit_file, report, scale=1000.0)
        assert max(keys) > 1.0, "keys are on the [0, 1000) scale, not sigma"
    q_size, fp_size = hist["outputs"]["19"]["model_size"][0], report["model_size"][0]
    if not native_ok:
        print(f"Flux {bits}: ComfyUI model_size float {fp_size / 2 ** 20:.0f} MiB, quantized "
              f"{q_size / 2 ** 20:.0f} MiB")
        assert q_size < fp_size, (q_size, fp_size)
        check_native_refused(comfy, rel, _flux_graph(flux.name)["1"], f"flux_{bits}")
    else:
        native = _native_path(comfy, hist, "14")
        layers = check_native_file(native, _fixture_unet_keys(flux, ""), bits)
        # ComfyUI's memory estimate of the quantized MODEL counts the packed weights (the native file holds the
        # same integers, scales and float-kept layers) and is below the float model's
        print(f"Flux {bits}: ComfyUI model_size float {fp_size / 2 ** 20:.0f} MiB, quantized "
              f"{q_size / 2 ** 20:.0f} MiB, native file {native.stat().st_size / 2 ** 20:.0f} MiB")
        assert 0.8 * native.stat().st_size <= q_size < fp_size, (q_size, native.stat().st_size, fp_size)
        check_native_detected(comfy, native, flux, bits, "Flux")
        assert any(k.startswith("double_blocks.0.") for k in layers) and any(k.startswith("single_blocks.0.")
                                                                               for k in layers), sorted(layers)
        check_stock_sampling(comfy, comfyui_dir, comfyui_python, native, lowbit_file, lambda: _flux_graph(flux.name),
                             _flux_sample, f"flux_{bits}", {"float": fp, f"lowbit_{bits}_{method}": fresh}, "Flux",
                             record_property)

    t1 = time.perf_counter()
    g2 = _flux_graph(flux.name)
    g2["21"] = {"class_type": "LowBitLoadQuantizedUNet", "inputs": {"model": ["1", 0], "unet_name": rel}}
    _flux_sample(g2, "22", ["21", 0])
    g2["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0],
                                                       "filename_prefix": f"latents/flux_reload_{bits}"}}
    reloaded = _latent(comfy, comfy.run(g2, timeout=1800), "23")
    print(f"Flux {bits}: load+sample {time.perf_counter() - t1:.0f}s")
    assert torch_equal(fresh, reloaded), "the reloaded Flux model samples differently from the one saved"
    comfy.free()


def test_flux_gguf_file_runs_in_comfyui_gguf(comfy, dit_fixtures, record_property):
    """Flux W4A8 (lp, name rules) saved with layout=gguf: ComfyUI-GGUF's Unet Loader (GGUF) loads it as Flux and,
    with stock nodes only, samples within fp16-scale rounding of a float file of LowBit's own weights (decoded from
    the layout=lowbit file); every other block scale 5 % off lands at least 4x farther. Needs COMFYUI_GGUF_DIR
    (test_comfyui_gguf.py)."""
    if "UnetLoaderGGUF" not in comfy.object_info():
        pytest.skip("ComfyUI-GGUF is not loaded: set COMFYUI_GGUF_DIR to a ComfyUI-GGUF checkout "
                    f"(COMFYUI_GGUF_DIR={os.environ.get('COMFYUI_GGUF_DIR')!r})")
    from test_comfyui_gguf import _reference_files

    flux = dit_fixtures["flux"]
    g = _flux_graph(flux.name)
    q = _quantize(g, "10", ["1", 0], ["3", 0], ["3", 0], bits="W4A8", method="lp", cfg=1.0, precision="rules")
    g["13"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": q, "filename_prefix": "it/flux_gg"}}
    g["14"] = {"class_type": "LowBitSaveQuantizedUNet",
               "inputs": {"model": q, "filename_prefix": "gg/flux", "layout": "gguf"}}
    hist = comfy.run(g, timeout=3000)
    m = re.match(r"saved models/((?:unet|diffusion_models))/(.+\.gguf) \(GGUF\)$", hist["outputs"]["14"]["text"][0])
    assert m, hist["outputs"]["14"]["text"]
    root = comfy.server.base_dir / "models" / m.group(1)
    lowbit_file = comfy.server.base_dir / "models" / "lowbit" / hist["outputs"]["13"]["lowbit_files"][0]
    _reference_files(root / m.group(2), lowbit_file, root / "gguf_check")
    from lowbit.quant.export_gguf import read_gguf

    fields, tensors = read_gguf(str(root / m.group(2)))
    assert fields["general.architecture"] == "flux"
    types = {}
    for t in tensors.values():
        types[t[0]] = types.get(t[0], 0) + 1
    assert types.get("Q4_0", 0) > 10, types
    g2 = _flux_graph(flux.name)
    del g2["1"]
    for i, (cls, name) in enumerate((("UnetLoaderGGUF", m.group(2)), ("UnetLoaderGGUF", "gguf_check/gguf_control.gguf"),
                                     ("UNETLoader", "gguf_check/gguf_ref.safetensors"))):
        g2[f"7{i}"] = {"class_type": cls, "inputs": {"unet_name": name, **({"weight_dtype": "default"}
                                                                           if cls == "UNETLoader" else {})}}
        _flux_sample(g2, f"9{i}", [f"7{i}", 0])
        g2[f"8{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"9{i}", 0],
                                                             "filename_prefix": f"latents/flux_gguf_{i}"}}
    assert not any(n["class_type"].startswith("LowBit") and n["class_type"] != "LowBitTestConditioning"
                   for n in g2.values())
    hist2 = comfy.run(g2, timeout=3000)
    gg, control, ref = (_latent(comfy, hist2, f"8{i}") for i in range(3))
    near, far = float((gg - ref).norm() / ref.norm()), float((control - ref).norm() / ref.norm())
    print(f"\nFlux GGUF ({types}): sample vs LowBit's weights (float file) {near:.4g}; control {far:.4g}")
    record_property("flux_gguf_vs_lowbit_weights", near)
    assert near < 0.02 and far > 4 * near
    comfy.free()


SDXL_SETTINGS = [("W8A8", "lp+ptqd", "measured", "euler", "normal"), ("W4A8", "lp", "rules", "ddim", "ddim_uniform")]


def _sdxl_graph(ckpt):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def _sdxl_sample(g, node_id, model, sampler, scheduler):
    g[node_id] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
        "steps": STEPS, "cfg": 4.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
    return [node_id, 0]


@pytest.mark.parametrize("bits,method,precision,sampler,scheduler", SDXL_SETTINGS)
def test_sdxl_architecture_quantize_sample_save_reload(comfy, comfyui_dir, comfyui_python, dit_fixtures, bits, method,
                                                       precision, sampler, scheduler, record_property):
    """A checkpoint ComfyUI detects as an SDXL-family model (Segmind Vega's block depths) through Quantize UNet,
    a stock sampler and VAE decode, Save (both layouts) and Load; PTQD keys are the discrete timesteps."""
    ckpt = dit_fixtures["sdxl"]
    t0 = time.perf_counter()
    g = _sdxl_graph(ckpt.name)
    q = _quantize(g, "10", ["1", 0], ["2", 0], ["3", 0], bits=bits, method=method, cfg=4.0, precision=precision)
    lat = _sdxl_sample(g, "11", q, sampler, scheduler)
    g["12"] = {"class_type": "SaveLatent", "inputs": {"samples": lat, "filename_prefix": f"latents/sdxl_{bits}"}}
    g["13"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": q, "filename_prefix": f"it/sdxl_{bits}"}}
    native_ok = bits == "W8A8" or native_4bit_readable(comfy)
    if native_ok:
        g["14"] = {"class_type": "LowBitSaveQuantizedUNet",
                   "inputs": {"model": q, "filename_prefix": f"native/sdxl_{bits}", "layout": "comfyui-native"}}
    g["15"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal",
                                                          "steps": CALIB["calibration_steps"], "denoise": 1.0}}
    g["16"] = {"class_type": "LowBitTestScheduleReport", "inputs": {"model": ["1", 0], "sigmas": ["15", 0]}}
    g["17"] = {"class_type": "VAEDecode", "inputs": {"samples": lat, "vae": ["1", 2]}}
    g["18"] = {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}}
    fp_lat = _sdxl_sample(g, "19", ["1", 0], sampler, scheduler)
    g["20"] = {"class_type": "SaveLatent", "inputs": {"samples": fp_lat, "filename_prefix": f"latents/sdxl_fp_{bits}"}}
    hist = comfy.run(g, timeout=3000)
    t_quant = time.perf_counter() - t0
    fresh, fp = _latent(comfy, hist, "12"), _latent(comfy, hist, "20")
    assert fresh.shape == (1, 4, 8, 8) and bool(fresh.isfinite().all())
    assert not bool((fresh == fp).all()), "the quantized model sampled exactly the float model's latent"
    rel_err = float((fresh - fp).norm() / fp.norm())
    print(f"\nSDXL {bits} {method} ({sampler}): quantize+sample+save {t_quant:.0f}s, "
          f"latent rel. error vs float {rel_err:.3f}")
    record_property(f"sdxl_{bits}_seconds", round(t_quant, 1))
    imgs = comfy.images(hist, "18")
    assert len(imgs) == 1 and imgs[0].size == (64, 64)

    report = hist["outputs"]["16"]
    assert "ModelSamplingDiscrete" in report["sampling"] and "EPS" in report["sampling"], report
    rel = hist["outputs"]["13"]["lowbit_files"][0]
    lowbit_file = comfy.server.base_dir / "models" / "lowbit" / rel
    header = json.loads(_header(lowbit_file)["__metadata__"]["lowbit"])
    assert header["model"]["cls"] == "UNetModel" and header["num_train_timesteps"] == 1000, header["model"]
    if "ptqd" in method:
        keys = check_ptqd_keys(lowbit_file, report, scale=1.0)
        assert max(keys) > 500, keys  # the first step's discrete timestep (~999), not a sigma
    if not native_ok:
        check_native_refused(comfy, rel, _sdxl_graph(ckpt.name)["1"], f"sdxl_{bits}")
    else:
        native = _native_path(comfy, hist, "14")
        layers = check_native_file(native, _fixture_unet_keys(ckpt, "model.diffusion_model."), bits)
        check_native_detected(comfy, native, ckpt, bits, "Segmind_Vega")
        assert any(".attn2.to_k" in k for k in layers), sorted(layers)[:20]  # cross-attention over the 2048-d context
        check_stock_sampling(comfy, comfyui_dir, comfyui_python, native, lowbit_file, lambda: _sdxl_graph(ckpt.name),
                             lambda g, i, m: _sdxl_sample(g, i, m, sampler, scheduler), f"sdxl_{bits}",
                             {"float": fp, f"lowbit_{bits}_{method}": fresh}, "Segmind_Vega", record_property)

    t1 = time.perf_counter()
    g2 = _sdxl_graph(ckpt.name)
    g2["21"] = {"class_type": "LowBitLoadQuantizedUNet", "inputs": {"model": ["1", 0], "unet_name": rel}}
    _sdxl_sample(g2, "22", ["21", 0], sampler, scheduler)
    g2["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0],
                                                       "filename_prefix": f"latents/sdxl_reload_{bits}"}}
    reloaded = _latent(comfy, comfy.run(g2, timeout=1800), "23")
    print(f"SDXL {bits}: load+sample {time.perf_counter() - t1:.0f}s")
    assert torch_equal(fresh, reloaded), "the reloaded SDXL model samples differently from the one saved"
    comfy.free()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))

