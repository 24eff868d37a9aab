"""ComfyUI-native export (quant/export_comfy.py), checked against the real thing: comfy-kitchen's layout classes
(what ComfyUI's loader builds from the file) must rebuild LowBit's weights exactly and, on comfy-kitchen's eager
backend, compute LowBit's layer outputs; what the export drops is measured.

The comfy-kitchen tests skip when the package is not installed (`pip install comfy-kitchen`).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from lowbit.kernels import ops
from lowbit.kernels.registry import forced_backend
from lowbit.quant import ACT_BITS_NONE, QuantConfig, deploy_, export_comfy, quant_layers, quantize
from lowbit.quant.calib import CallRecorder
from lowbit.quant.errors import ConfigError
from lowbit.quant.export_comfy import comfy_state_dict, pack_uint4, unpack_uint4


class Toy(nn.Module):
    """Conv -> tokens -> Linear x3 -> conv reading a concatenation (split by LowBit) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3, padding=1)
        self.temb = nn.Linear(1, 32)  # K = 1: odd, cannot be awq_w4a16
        self.lin1 = nn.Linear(32, 64)
        self.lin2 = nn.Linear(64, 32)
        self.mix = nn.Conv2d(64, 32, 3, padding=1)
        self.conv_out = nn.Conv2d(32, 4, 3, padding=1)
        self.norm = nn.GroupNorm(8, 32)

    def forward(self, x, t):
        h0 = self.conv_in(x)
        b, c, hh, ww = h0.shape
        emb = self.temb(t.float().view(-1, 1) / 1000.0)
        tok = (self.norm(h0) + emb[:, :, None, None]).flatten(2).transpose(1, 2)
        tok = self.lin2(F.silu(self.lin1(tok)))
        h = tok.transpose(1, 2).reshape(b, c, hh, ww)
        h = self.mix(torch.cat([h, h0], dim=1))
        return self.conv_out(F.silu(h))


RULES = dict(w_init="minmax", a_init="minmax", rules=())


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def calls(toy):
    g = torch.Generator().manual_seed(1)
    with CallRecorder(toy) as rec, torch.no_grad():
        for t in (900, 500, 100):
            toy(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([t, t]))
    return rec.calls


def _q(toy, calls, **cfg):
    return quantize(toy, QuantConfig(**{**RULES, **cfg}), calls)


def _read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _x(seed=2, shape=(2, 4, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), torch.tensor([300, 300])


# ---------------------------------------------------------------------------------------------- format, no kitchen
def test_uint4_packing_round_trip_and_nibble_order():
    u = torch.randint(0, 16, (5, 12), dtype=torch.int16)
    p = pack_uint4(u)
    assert p.dtype == torch.int8 and p.shape == (5, 6)
    assert torch.equal(unpack_uint4(p), u)
    assert int(p.view(torch.uint8)[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)  # even column = low nibble


def test_file_layout_header_and_keys(toy, calls, tmp_path):
    q = _q(toy, calls, w_bits=8, a_bits=8)
    path = str(tmp_path / "w8a8.safetensors")
    res = export_comfy(q, path, prefix="model.diffusion_model.", float_dtype=torch.float32)
    sd, meta = _read(path)
    # every float-model key is present under the prefix (LoRA and loaders find the same names) ...
    assert {k[len("model.diffusion_model."):] for k in sd if not k.endswith(("comfy_quant", "_scale", "_zeros"))} \
        == set(toy.state_dict())
    # ... the quantized Linear layers carry ComfyUI's int8_tensorwise tensors and marker, the header says the same
    qm = json.loads(meta["_quantization_metadata"])
    assert qm["format_version"] == "1.0"
    assert set(qm["layers"]) == {"model.diffusion_model.lin1", "model.diffusion_model.lin2",
                                 "model.diffusion_model.temb"}
    for layer, conf in qm["layers"].items():
        assert conf == {"format": "int8_tensorwise"}
        assert json.loads(bytes(sd[f"{layer}.comfy_quant"].tolist()).decode()) == conf
        w, s = sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    # convolutions (ComfyUI quantizes Linear only), the split one merged back into one Conv2d, are float
    assert set(res.float_layers) == {"conv_in", "mix", "conv_out"}
    assert sd["model.diffusion_model.mix.weight"].shape == toy.mix.weight.shape
    dropped = json.loads(meta["lowbit_export"])["dropped"]
    assert dropped == res.dropped and any("static activation" in d for d in dropped)
    assert any("3 convolutions" in d for d in dropped)


def test_float_layers_are_lowbits_dequantized_integers(toy, calls):
    q = _q(toy, calls, w_bits=4, a_bits=8)
    sd, _, res = comfy_state_dict(q, float_dtype=torch.float32)
    layers = dict(quant_layers(q))
    w_in = ops.dequantize_weight(layers["conv_in"].packed_weight())
    assert torch.equal(sd["conv_in.weight"], w_in)
    parts = [ops.dequantize_weight(layers[f"mix.parts.{i}"].packed_weight()) for i in range(2)]
    assert torch.equal(sd["mix.weight"], torch.cat(parts, dim=1))  # the shortcut split, merged exactly
    assert "temb" in res.float_layers and "even K" in res.float_layers["temb"]
    assert any("Linear layers written as float" in d for d in res.dropped)


def test_refusals_are_one_line_config_errors(toy, calls, tmp_path):
    with pytest.raises(ConfigError, match="no LowBit quantized layers"):
        comfy_state_dict(toy)
    q = _q(toy, calls, w_bits=8, a_bits=8)
    with pytest.raises(ConfigError, match="w4_layout"):
        comfy_state_dict(q, w4_layout="nvfp4")
    with pytest.raises(ConfigError, match="scale_dtype"):
        comfy_state_dict(q, scale_dtype="float8")
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists"):
        export_comfy(q, str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_comfy(q, str(tmp_path / "nope" / "x.safetensors"))



def test_a_file_the_reading_comfyui_would_load_as_float_is_refused_before_writing(toy, calls, tmp_path):
    """``reader_formats``: the formats the reading ComfyUI's QUANT_ALGOS lists (the Save node passes its host's).
    ComfyUI 0.33.0 lists int8_tensorwise, asym_w4a8_int8 and convrot_w4a4, no awq_w4a16: a 4-bit file is refused
    naming what to do instead (its 4-bit layouts hold rotated weights, LowBit's grid cannot be written into them),
    an 8-bit one is written; a ComfyUI without int8_tensorwise is told to update."""
    comfy_033 = {"float8_e4m3fn", "float8_e5m2", "nvfp4", "int8_tensorwise", "convrot_w4a4", "asym_w4a8_int8"}
    path = tmp_path / "w4.safetensors"
    with pytest.raises(ConfigError, match=r"does not know the comfy_quant format\(s\) awq_w4a16 .*layout=lowbit.*W8A8"):
        export_comfy(_q(toy, calls, w_bits=4, a_bits=8), str(path), reader_formats=comfy_033)
    assert not path.exists()
    export_comfy(_q(toy, calls, w_bits=8, a_bits=8), str(tmp_path / "w8.safetensors"), reader_formats=comfy_033)
    with pytest.raises(ConfigError, match="int8_tensorwise .*update ComfyUI"):
        export_comfy(_q(toy, calls, w_bits=8, a_bits=8), str(tmp_path / "old.safetensors"),
                     reader_formats={"float8_e4m3fn"})


# ---------------------------------------------------------------------------------------------- against comfy-kitchen
def _kitchen():
    return pytest.importorskip("comfy_kitchen", reason="comfy-kitchen is not installed (pip install comfy-kitchen): "
                                                       "the checks against ComfyUI's layouts are skipped")


def _comfy_weight(sd, layer, conf, shape, dtype=torch.float32):
    """The QuantizedTensor ComfyUI's loader (comfy/ops.py _load_quantized_module) builds for one layer."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreAWQW4A16Layout, TensorWiseINT8Layout

    w = sd[f"{layer}.weight"].to(torch.int8)
    if conf["format"] == "int8_tensorwise":
        params = TensorWiseINT8Layout.Params(scale=sd[f"{layer}.weight_scale"], orig_dtype=dtype, orig_shape=shape)
        return QuantizedTensor(w, "TensorWiseINT8Layout", params)
    assert conf["format"] == "awq_w4a16"
    params = TensorCoreAWQW4A16Layout.Params(scale=sd[f"{layer}.weight_scale"], zeros=sd[f"{layer}.weight_zeros"],
                                             group_size=int(conf["group_size"]), orig_dtype=dtype, orig_shape=shape)
    return QuantizedTensor(w, "TensorCoreAWQW4A16Layout", params)


def _comfy_model(toy, sd, meta):
    """The float model with the file's tensors: float keys loaded, quantized Linear weights as QuantizedTensors."""
    m = copy.deepcopy(toy)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    for name, mod in m.named_modules():
        if name in layers:
            mod.weight = nn.Parameter(_comfy_weight(sd, name, layers[name], tuple(mod.weight.shape)),
                                      requires_grad=False)
    plain = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in layers or k.endswith(".bias")}
    missing, unexpected = m.load_state_dict(plain, strict=False)
    assert not unexpected and set(missing) == {f"{n}.weight" for n in layers}
    return m, layers


def _sym_rowwise_int8(x):
    """ComfyUI's activation rule for int8_tensorwise: per row, symmetric, absmax / 127 (comfy-kitchen docs)."""
    s = (x.abs().amax(-1, keepdim=True).float() / 127.0).clamp(min=1e-30)
    return (x / s).round().clamp(-128, 127) * s


@pytest.mark.parametrize("cfg,formats", [
    (dict(w_bits=8, a_bits=8), {"int8_tensorwise"}),
    (dict(w_bits=6, a_bits=8), {"int8_tensorwise"}),
    (dict(w_bits=4, a_bits=ACT_BITS_NONE, w_group_size=16), {"awq_w4a16"}),
    (dict(w_bits=4, a_bits=8), {"awq_w4a16"}),
    (dict(w_bits=3, a_bits=4), {"awq_w4a16"}),
])
def test_kitchen_rebuilds_lowbits_weights_exactly(toy, calls, cfg, formats):
    ck = _kitchen()
    q = _q(toy, calls, **cfg)
    sd, meta, res = comfy_state_dict(q, float_dtype=torch.float32)
    layers = dict(quant_layers(q))
    seen = set()
    with ck.registry.use_backend("eager"):
        for name, conf in res.layers.items():
            pw = layers[name].packed_weight()
            qt = _comfy_weight(sd, name, conf, tuple(pw.shape))
            assert torch.equal(qt.dequantize(), ops.dequantize_weight(pw)), name  # bit-exact
            seen.add(conf["format"])
    assert formats <= seen


@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=ACT_BITS_NONE, w_group_size=16),
                                 dict(w_bits=4, a_bits=ACT_BITS_NONE)])
def test_w4a16_export_is_exact_end_to_end_on_kitchen_eager(toy, calls, cfg, tmp_path):
    """Weight-only 4 bits: nothing is dropped, so the model ComfyUI builds equals LowBit's deployed model."""
    ck = _kitchen()
    q = deploy_(_q(toy, calls, **cfg))
    path = str(tmp_path / "w4a16.safetensors")
    res = export_comfy(q, path, float_dtype=torch.float32)
    assert not any("activation" in d for d in res.dropped)
    sd, meta = _read(path)
    m, layers = _comfy_model(toy, sd, meta)
    assert {c["format"] for c in layers.values()} == {"awq_w4a16"}
    x, t = _x()
    with torch.no_grad(), ck.registry.use_backend("eager"), forced_backend("eager"):  # both references, fp32
        y_c = m(x, t)
        y_l = q(x, t)
    rel = float((y_c - y_l).norm() / y_l.norm())
    assert rel < 1e-5, rel  # fp32 summation order only


def test_int8_tensorwise_layer_outputs_on_kitchen_eager_and_the_dropped_activation_scales(toy, calls):
    """W8A8: comfy-kitchen's int8 GEMM == LowBit's weights with ComfyUI's activation rule (dynamic, symmetric,
    per row); against LowBit's static asymmetric A8 scales (dropped by the export) the difference is measured."""
    ck = _kitchen()
    q = deploy_(_q(toy, calls, w_bits=8, a_bits=8))
    sd, meta, res = comfy_state_dict(q, float_dtype=torch.float32)
    layers = dict(quant_layers(q))
    seen = []  # the real input of lin2 on a held-out call (static scales hold for inputs like the calibration's)
    hook = toy.lin2.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    with torch.no_grad():
        toy(*_x(seed=3))
    hook.remove()
    x = seen[0]
    pw = layers["lin2"].packed_weight()
    qt = _comfy_weight(sd, "lin2", res.layers["lin2"], tuple(pw.shape))
    bias = sd["lin2.bias"]
    with ck.registry.use_backend("eager"):
        y_ck = F.linear(x, qt, bias)
    w = ops.dequantize_weight(pw)
    y_ref = F.linear(_sym_rowwise_int8(x), w, bias)
    assert float((y_ck - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    # LowBit's own output (static per-tensor asymmetric A8 at the calibrated scale) differs by the dropped part
    with forced_backend("eager"):
        y_lowbit = layers["lin2"](x)
    y_float_w = F.linear(x, w, bias)
    drop = float((y_ck - y_lowbit).norm() / y_lowbit.norm())
    own = float((y_lowbit - y_float_w).norm() / y_float_w.norm())
    print(f"lin2 W8A8: relative L2 ComfyUI(int8 dynamic) vs LowBit(static A8) {drop:.4f}; "
          f"LowBit's own activation error {own:.4f}")
    assert 0 < drop < 0.05


def test_w8a8_model_output_difference_from_dropped_features_is_measured(toy, calls, tmp_path):
    ck = _kitchen()
    q = deploy_(_q(toy, calls, w_bits=8, a_bits=8))
    path = str(tmp_path / "w8a8.safetensors")
    res = export_comfy(q, path, float_dtype=torch.float32)
    sd, meta = _read(path)
    m, _ = _comfy_model(toy, sd, meta)
    x, t = _x()
    with torch.no_grad(), ck.registry.use_backend("eager"), forced_backend("eager"):
        y_c, y_l, y_fp = m(x, t), q(x, t), toy(x, t)
    drop = float((y_c - y_l).norm() / y_l.norm())
    q_err = float((y_l - y_fp).norm() / y_fp.norm())
    c_err = float((y_c - y_fp).norm() / y_fp.norm())
    print(f"W8A8 toy model: relative L2 ComfyUI-native vs LowBit {drop:.4f} (dropped: {len(res.dropped)} items); "
          f"vs float: LowBit {q_err:.4f}, ComfyUI-native {c_err:.4f}")
    assert 0 < drop < 0.1


def _float_act_line(res) -> list:
    return [d for d in res.dropped if d.startswith("float activations")]


@pytest.mark.parametrize("cfg,kw", [(dict(w_bits=8, a_bits=ACT_BITS_NONE), {}),
                                    (dict(w_bits=4, a_bits=ACT_BITS_NONE), dict(w4_layout="int8_tensorwise"))])
def test_int8_layers_with_float_activations_say_comfyui_quantizes_their_inputs(toy, calls, cfg, kw):
    """W8A16 (or per-channel W4A16 written as int8): LowBit runs these layers with float activations, but ComfyUI
    runs every int8_tensorwise layer through its int8 matmul, quantizing the input per row (measured in ComfyUI
    0.33.0: tests/nodes/test_comfyui_integration.py), so the export lists the float activations as not kept."""
    _, _, res = comfy_state_dict(_q(toy, calls, **cfg), **kw)
    n = sum(c["format"] == "int8_tensorwise" for c in res.layers.values())
    assert n == 3
    line = _float_act_line(res)
    assert len(line) == 1 and f"of {n} int8_tensorwise layers" in line[0] and "per row" in line[0], res.dropped
    _, _, res8 = comfy_state_dict(_q(toy, calls, w_bits=8, a_bits=8))
    assert not _float_act_line(res8), res8.dropped  # (W8A8: the static scales' line says it)


def test_w8a16_model_output_on_kitchen_eager_differs_by_comfyuis_activation_quantization(toy, calls, tmp_path):
    """What that line costs on the toy model: ComfyUI's model (comfy-kitchen eager) against LowBit's W8A16."""
    ck = _kitchen()
    q = deploy_(_q(toy, calls, w_bits=8, a_bits=ACT_BITS_NONE))
    path = str(tmp_path / "w8a16.safetensors")
    res = export_comfy(q, path, float_dtype=torch.float32)
    assert _float_act_line(res)
    sd, meta = _read(path)
    m, _ = _comfy_model(toy, sd, meta)
    x, t = _x()
    with torch.no_grad(), ck.registry.use_backend("eager"), forced_backend("eager"):
        y_c, y_l = m(x, t), q(x, t)
    drop = float((y_c - y_l).norm() / y_l.norm())
    print(f"W8A16 toy model: relative L2 ComfyUI-native vs LowBit {drop:.4f}")
    assert 0 < drop < 0.05


def test_export_is_written_like_a_save(toy, calls, tmp_path):
    """An export gets the umask's mode as any new file (safetensors alone writes 0600: a ComfyUI running as
    another user could not read it), and the temporary file of an interrupted export is cleaned up by the next one."""
    import os

    q = _q(toy, calls, w_bits=8, a_bits=8)
    stale = tmp_path / ".old.safetensors.lowbit-999999999-0123abcd.tmp"  # a pid that does not exist
    stale.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        export_comfy(q, str(tmp_path / "e.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "e.safetensors").stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]
