"""GGUF export (quant/export_gguf.py): the file holds LowBit's integers in GGML's Q8_0 / Q4_0 blocks, every other
tensor of the model, and the fields ComfyUI-GGUF reads; the ``gguf`` package (the reader ComfyUI-GGUF uses) reads it
back to the same values."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from lowbit.quant import QuantConfig, deploy_, export_gguf, quant_layers, quantize
from lowbit.quant.errors import ConfigError
from lowbit.quant.export_comfy import _float_weight
from lowbit.quant.export_gguf import dequantize_gguf, gguf_tensors, read_gguf
from lowbit.quant.io import SaveError, SaveExistsError

from qutil import output_error, record, tiny_unet

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf; in the [test] extra) reads the files")


@pytest.fixture(scope="module")
def fp():
    return tiny_unet()


@pytest.fixture(scope="module")
def calls(fp):
    return record(fp, ts=(900, 500, 100))


@pytest.fixture(scope="module")
def q8(fp, calls):
    return quantize(fp, QuantConfig.preset("W8A8"), calls)


def _lowbit_state(q):
    """The float state dict a GGUF loader should rebuild: LowBit's dequantized weights for quantized layers (split
    convolutions whole), the model's own tensors otherwise."""
    from lowbit.quant.layers import QuantLayer
    from lowbit.quant.split import ChannelSplitConv2d

    out = {}
    special = {n: m for n, m in q.named_modules() if isinstance(m, (QuantLayer, ChannelSplitConv2d))}
    for n, m in special.items():
        if any(n.startswith(s + ".") for s in special):
            continue
        out[f"{n}.weight"] = _float_weight(m, torch.float32)
        bias = m.parts[0].bias if isinstance(m, ChannelSplitConv2d) else m.bias
        if bias is not None:
            out[f"{n}.bias"] = bias.detach().float()
    for k, v in q.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if not any(owner == s or owner.startswith(s + ".") for s in special):
            out[k] = v.float()
    return out


@pytest.mark.parametrize("bits,types", [("W8A8", {"Q8_0"}), ("W4A8", {"Q4_0", "Q8_0"}), ("W4A16", {"Q4_0", "Q8_0"})])
def test_file_rebuilds_lowbits_weights_and_the_gguf_package_reads_the_same(fp, calls, q8, bits, types, tmp_path):
    """Every tensor of the float model is in the file under its own key; dequantized (by this module's reader and by
    the ``gguf`` package's), quantized layers give LowBit's dequantized integers up to the fp16 block scales
    (relative 2^-11), the rest their exact values. The headers ComfyUI-GGUF reads are there: the architecture, and
    each convolution's 4-d shape (its weight is stored as the [N, K] matrix)."""
    q = q8 if bits == "W8A8" else quantize(fp, QuantConfig.preset(bits), calls)
    path = str(tmp_path / "m.gguf")
    res = export_gguf(q, path, arch="sd1")
    assert {c["format"] for c in res.layers.values()} == types
    assert set(res.float_layers) == {"conv_in"}  # (K = 1 x 3 x 3: not a multiple of 32)
    ref = _lowbit_state(q)
    fields, tensors = read_gguf(path)
    assert set(tensors) == set(ref) == set(fp.state_dict())
    assert fields["general.architecture"] == "sd1"
    reader = gguf.GGUFReader(path)
    theirs = {t.name: t for t in reader.tensors}
    assert set(theirs) == set(tensors)
    for key, (typ, shape, data) in tensors.items():
        orig = fields.get(f"comfy.gguf.orig_shape.{key}")
        w = dequantize_gguf(typ, shape, data, orig)
        assert w.shape == ref[key].shape, key
        t = theirs[key]
        assert t.tensor_type.name == typ
        other = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(other.reshape(w.shape), w), key
        if typ in ("Q8_0", "Q4_0"):
            assert res.layers[key[:-len(".weight")]]["format"] == typ
            assert float((w - ref[key]).abs().max()) <= 2 ** -11 * float(ref[key].abs().max()) + 1e-12, key
        else:
            assert torch.equal(w, ref[key]), key
    # the model rebuilt from the file runs like LowBit's weights with float activations: the fp16 block scales cost
    # under 1 % of the output error quantizing the weights costs
    rebuilt = tiny_unet()
    rebuilt.load_state_dict({k: dequantize_gguf(*tensors[k], fields.get(f"comfy.gguf.orig_shape.{k}"))
                             for k in tensors})
    w_only = tiny_unet()
    w_only.load_state_dict(ref)
    assert output_error(w_only, rebuilt, calls) <= 1e-2 * output_error(fp, w_only, calls)
    assert 0 < res.scale_rounding <= 2 ** -11
    lines = "\n".join(res.dropped)
    assert ("activation quantization" in lines) == (bits != "W4A16") and "fp16" in lines
    assert json.loads(fields["lowbit.export"])["layers"] == res.layers


def test_deployed_model_and_split_convolutions_export_whole(q8):
    """A deployed model (packed integers only) exports the same tensors as its fake-quant twin; a split
    convolution (the UNet's skip-concat shortcuts) is one Q8_0 tensor, its parts' integers side by side."""
    q = copy.deepcopy(q8)
    a, _, ra = gguf_tensors(q, arch="sd1")
    b, _, rb = gguf_tensors(deploy_(q), arch="sd1")
    assert ra.layers == rb.layers and set(a) == set(b)
    assert any(".conv_shortcut" in k for k in ra.layers)
    assert all(torch.equal(a[k][2], b[k][2]) for k in a)


def test_layers_gguf_cannot_hold_are_written_as_float_with_the_reason(fp, calls, q8):
    """Group sizes that are not a multiple of GGUF's 32-value block, and weight scales fp16 cannot hold, give float
    weights (LowBit's dequantized integers), each with its reason."""
    q = quantize(fp, QuantConfig.preset("W4A16", w_group_size=16), calls)
    _, _, res = gguf_tensors(q, arch="sd1")
    int4 = {n for n, m in quant_layers(q) if m.w_format == "int4_group"}
    assert int4 and {c["format"] for c in res.layers.values()} == {"Q8_0"}  # (the 8-bit edge layers)
    assert all("group size 16" in res.float_layers[n] for n in int4)
    q = copy.deepcopy(q8)
    layer = dict(quant_layers(q))["mid_block.resnets.0.conv1"]
    with torch.no_grad():
        layer.w_scale.mul_(1e-6)  # (scales of ~1e-8: below fp16's subnormals)
    tensors, _, res = gguf_tensors(q, arch="sd1")
    assert "fp16" in res.float_layers["mid_block.resnets.0.conv1"]
    assert tensors["mid_block.resnets.0.conv1.weight"][0] == "F32"


def test_refusals_are_one_line_and_nothing_is_written(q8, tmp_path):
    q = q8
    with pytest.raises(ConfigError, match="arch must be one of"):
        export_gguf(q, str(tmp_path / "a.gguf"), arch="sd15")
    with pytest.raises(SaveError, match=r"ending in \.gguf"):
        export_gguf(q, str(tmp_path / "a.safetensors"), arch="sd1")
    with pytest.raises(ConfigError, match="no LowBit quantized layers"):
        export_gguf(tiny_unet(), str(tmp_path / "a.gguf"), arch="sd1")
    assert os.listdir(tmp_path) == []
    path = tmp_path / "b.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(SaveExistsError):
        export_gguf(q, str(path), arch="sd1")
    assert path.read_bytes() == b"mine"
    export_gguf(q, str(path), arch="sd1", overwrite=True)
    assert read_gguf(str(path))[0]["general.architecture"] == "sd1"
    assert sorted(os.listdir(tmp_path)) == ["b.gguf"]  # (no temporary file left)


def test_reader_checks_what_it_reads(q8, tmp_path):
    """The reader refuses files that are not GGUF or whose tensors lie outside the file, in one line."""
    from lowbit.quant.export_gguf import GGUFError

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(str(bad))
    good = tmp_path / "g.gguf"
    export_gguf(q8, str(good), arch="sd1")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-4096])
    with pytest.raises(GGUFError, match="outside the file|truncated"):
        read_gguf(str(cut))
