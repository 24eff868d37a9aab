"""A LowBit model saved with ``layout=gguf`` runs in a real ComfyUI through city96's ComfyUI-GGUF (its "Unet Loader
(GGUF)"), in a graph with no LowBit node, as LowBit's quantized weights.

Needs ``COMFYUI_DIR`` (as every ComfyUI test) and ``COMFYUI_GGUF_DIR``: a ComfyUI-GGUF checkout, linked into the
server's custom_nodes next to this pack (its ``gguf`` requirement installed in ComfyUI's python); skips with a
message otherwise. Marker ``comfyui``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import comfy_harness

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def gguf_comfy(comfyui_dir, comfyui_python, sd15_fixture):
    d = os.environ.get("COMFYUI_GGUF_DIR")
    if not d or not (Path(d) / "loader.py").is_file():
        pytest.skip("set COMFYUI_GGUF_DIR to a ComfyUI-GGUF checkout (github.com/city96/ComfyUI-GGUF) whose 'gguf' "
                    "requirement is installed in ComfyUI's python")
    server = comfy_harness.ComfyServer(comfyui_dir, python=comfyui_python, checkpoints=[sd15_fixture])
    (server.base_dir / "custom_nodes" / "ComfyUI-GGUF").symlink_to(Path(d).resolve(), target_is_directory=True)
    try:
        yield server.launch()
    finally:
        server.cleanup()


def _reference_files(gguf_path: Path, lowbit_path: Path, out_dir: Path) -> dict:
    """``ref``: a plain float file holding LowBit's own weights for every quantized layer, decoded from the
    ``layout=lowbit`` file by LowBit's weight formats (split convolutions' parts side by side), every other tensor
    as the ``gguf`` package reads it from the GGUF file; ``control``: the GGUF file with each block scale of every
    other block scaled by 1.05 (a wrong scale, to show the comparison can fail)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from lowbit.quant.export_gguf import GGML_TYPES, read_gguf, write_gguf
    from native_check import lowbit_weights

    lowbit = {}
    for name, (_, w) in lowbit_weights(lowbit_path).items():
        lowbit.setdefault(name.split(".parts.")[0], []).append((name, w))
    reader = gguf.GGUFReader(str(gguf_path))
    ref = {}
    for t in reader.tensors:
        owner = t.name[:-len(".weight")] if t.name.endswith(".weight") else None
        if owner in lowbit:
            ref[t.name] = torch.cat([w for _, w in sorted(lowbit[owner])], dim=1).contiguous()
        else:
            ref[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                                    dtype=np.float32)).reshape(tuple(reversed(
                                                        [int(x) for x in t.shape]))).contiguous()
    assert set(ref) == {t.name for t in reader.tensors}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(ref, str(out_dir / "gguf_ref.safetensors"))
    fields, tensors = read_gguf(str(gguf_path))
    bad = {}
    for key, (typ, shape, data) in tensors.items():
        data = data.clone()
        if typ in ("Q8_0", "Q4_0"):
            size = 34 if typ == "Q8_0" else 18
            blocks = data.reshape(-1, size)
            d = blocks[::2, :2].contiguous().view(torch.float16) * 1.05
            blocks[::2, :2] = d.view(torch.uint8)
        bad[key] = (typ, shape, data, None)
    orig = {k[len("comfy.gguf.orig_shape."):]: v for k, v in fields.items() if k.startswith("comfy.gguf.orig_shape.")}
    out_fields = [("general.architecture", 8, fields["general.architecture"])]
    out_fields += [(f"comfy.gguf.orig_shape.{k}", 9, list(v)) for k, v in orig.items()]
    assert all(GGML_TYPES[t[0]] is not None for t in bad.values())
    write_gguf(str(out_dir / "gguf_control.gguf"), bad, out_fields)
    return {"ref": out_dir / "gguf_ref.safetensors", "control": out_dir / "gguf_control.gguf", "ref_tensors": ref}


def test_comfyui_gguf_loads_and_samples_the_gguf_file_as_lowbits_weights(gguf_comfy, record_property):
    """W4A8 (naive): 4-bit layers as Q4_0, the 8-bit edge layers as Q8_0, convolutions included. ComfyUI-GGUF
    loads the file as an SD1.5 model and samples (stock KSampler, no LowBit node) within fp16-scale rounding of a
    float file of LowBit's own weights; a copy with every other block scale off by 5 % lands at least 4x farther."""
    from test_comfyui_integration import _ksampler, _latent, _quantize, _text_graph

    comfy = gguf_comfy
    assert "UnetLoaderGGUF" in comfy.object_info("UnetLoaderGGUF"), "ComfyUI-GGUF did not load"
    g = _text_graph(comfy.checkpoint)
    q = _quantize(g, bits="W4A8", method="naive")
    g["62"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": q, "filename_prefix": "it/gg",
                                                                    "layout": "gguf"}}
    g["63"] = {"class_type": "LowBitSaveQuantizedUNet", "inputs": {"model": q, "filename_prefix": "it/gg_lowbit"}}
    hist = comfy.run(g, timeout=1800)
    text = hist["outputs"]["62"]["text"][0]
    m = re.match(r"saved models/(unet|diffusion_models)/(.+\.gguf) \(GGUF\)$", text)
    assert m, text
    root = comfy.server.base_dir / "models" / m.group(1)
    lowbit_file = comfy.server.base_dir / "models" / "lowbit" / hist["outputs"]["63"]["lowbit_files"][0]
    files = _reference_files(root / m.group(2), lowbit_file, root / "gguf_check")
    names = {"gguf": m.group(2), "control": "gguf_check/gguf_control.gguf"}
    # the file's blocks, as the gguf package dequantizes them, are LowBit's weights within the fp16 scales
    import gguf
    import numpy as np
    import torch

    n_q = 0
    for t in gguf.GGUFReader(str(root / m.group(2))).tensors:
        if t.tensor_type.name in ("Q8_0", "Q4_0"):
            ref = files["ref_tensors"][t.name]
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            assert float((w.reshape(ref.shape) - ref).abs().max()) <= 2 ** -11 * float(ref.abs().max()), t.name
            n_q += 1
    assert n_q > 50

    g2 = _text_graph(comfy.checkpoint)
    for i, (v, name) in enumerate(names.items()):
        g2[f"7{i}"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}
        g2[f"8{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": _ksampler(g2, f"9{i}", [f"7{i}", 0]),
                                                             "filename_prefix": f"latents/gguf_{v}"}}
    g2["77"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "gguf_check/gguf_ref.safetensors",
                                                       "weight_dtype": "default"}}
    g2["87"] = {"class_type": "SaveLatent", "inputs": {"samples": _ksampler(g2, "97", ["77", 0]),
                                                      "filename_prefix": "latents/gguf_ref"}}
    assert not any(n["class_type"].startswith("LowBit") for n in g2.values())
    log_start = len(comfy.server.log_text())
    hist2 = comfy.run(g2, timeout=1800)
    log = comfy.server.log_text()[log_start:]
    assert re.search(r"gguf qtypes: .*Q4_0", log) and "Q8_0" in log, log[-2000:]
    lat = {v: _latent(comfy, hist2, f"8{i}") for i, v in enumerate(names)}
    lat["ref"] = _latent(comfy, hist2, "87")

    def dist(a, b):
        return float((lat[a] - lat[b]).norm() / lat[b].norm())

    near, far = dist("gguf", "ref"), dist("control", "ref")
    print(f"\nComfyUI-GGUF sample vs LowBit's weights (float file): {near:.4g}; control: {far:.4g}")
    record_property("gguf_vs_lowbit_weights", near)
    record_property("control_vs_lowbit_weights", far)
    assert near < 0.02 and far > 4 * near
