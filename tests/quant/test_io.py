import json
import os
import struct

import pytest
import torch

from lowbit.quant import LoadError, QuantConfig, deploy_, load, quantize, save

from qutil import assert_same_state, state_copy

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def out(m):
    with torch.no_grad():
        return m(X, torch.tensor([400] * 2), class_labels=torch.tensor([4, 10])).sample


@pytest.fixture(scope="module")
def saved(unet, calls, tmp_path_factory):
    q = deploy_(quantize(unet, QuantConfig.preset("W4A8", time_bins=3), calls))
    p = str(tmp_path_factory.mktemp("io") / "q.safetensors")
    save(q, p)
    return q, p


def test_round_trip_identical(unet, saved, registry_kernels):
    q, p = saved
    before = state_copy(unet)
    q2 = load(unet, p)
    assert torch.equal(out(q), out(q2))
    assert_same_state(unet, before)


def test_packed_w4_bytes_from_the_file(unet, saved):
    """Packed W4 weights of the 4-bit layers take at most 0.15x the bytes of the same layers in fp32."""
    from safetensors import safe_open

    _, p = saved
    with safe_open(p, "pt") as f:
        meta = json.loads(f.metadata()["lowbit"])
        packed = fp32 = 0
        for name, lm in meta["layers"].items():
            if lm["w_bits"] != 4:
                continue
            packed += sum(f.get_tensor(f"{name}.{k}").numel() * f.get_tensor(f"{name}.{k}").element_size()
                          for k in ("qdata", "w_scale"))
            n = 1
            for d in lm["shape"]:
                n *= d
            fp32 += 4 * n
    assert fp32 > 0 and packed / fp32 <= 0.15, packed / fp32


def test_truncated_file(unet, saved, tmp_path):
    _, p = saved
    bad = tmp_path / "trunc.safetensors"
    data = open(p, "rb").read()
    bad.write_bytes(data[: len(data) - 100])
    before = state_copy(unet)
    with pytest.raises(LoadError, match="trunc"):
        load(unet, str(bad))
    assert_same_state(unet, before)


def test_file_for_another_model(saved):
    _, p = saved
    from diffusers import UNet2DModel

    other = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8)
    before = state_copy(other)
    with pytest.raises(LoadError, match="does not match this model|shape"):
        load(other, p)
    assert_same_state(other, before)


def test_unknown_version_and_not_lowbit(unet, saved, tmp_path):
    _, p = saved
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    lb = json.loads(header["__metadata__"]["lowbit"])
    lb["format_version"] = 99
    header["__metadata__"]["lowbit"] = json.dumps(lb)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    bad = tmp_path / "v99.safetensors"
    bad.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    with pytest.raises(LoadError, match="version 99"):
        load(unet, str(bad))
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(LoadError, match="no LowBit metadata"):
        load(unet, str(plain))
    with pytest.raises(LoadError, match="no such file"):
        load(unet, str(tmp_path / "missing.safetensors"))


def test_save_never_overwrites(saved):
    q, p = saved
    mtime = os.path.getmtime(p)
    with pytest.raises(FileExistsError):
        save(q, p)
    assert os.path.getmtime(p) == mtime
    assert not [f for f in os.listdir(os.path.dirname(p)) if f.endswith(".tmp")]


def test_load_with_a_path_in_place_of_the_model_says_what_to_pass(tmp_path):
    from lowbit.quant import ConfigError, load

    with pytest.raises(ConfigError, match=r"model must be the full-precision torch module.*got str.*load\(path\)"):
        load(str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"))


def test_loading_onto_another_checkpoint_gives_the_saved_model_and_says_so(unet, saved, registry_kernels):
    """A finetune of the same architecture (different float tensors: norms, embeddings) used to give a hybrid, the
    file's integers with the other model's float parts, silently. The file holds the float tensors it was saved
    with: they are used (the result is the saved model) and a warning names the difference; the given model is not
    changed."""
    import copy
    import warnings

    q, p = saved
    other = copy.deepcopy(unet)
    with torch.no_grad():
        for name, t in other.named_parameters():
            if "norm" in name:
                t.mul_(1.5)
    before = state_copy(other)
    with pytest.warns(UserWarning, match=r"float tensors of the given model differ.*another checkpoint"):
        q2 = load(other, p)
    assert torch.equal(out(q2), out(q))
    assert_same_state(other, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint it was made from: no warning
        assert torch.equal(out(load(unet, p)), out(q))


def test_extra_tensors_the_header_does_not_declare_are_refused(saved, unet, tmp_path):
    """``__extra__.<name>.*`` tensors belong to an extra the header declares (a declared extra this LowBit does not
    know is ignored, for files of later versions); undeclared ones were accepted and never read (a hidden payload)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.quant import LoadError, load

    _, p = saved
    with safe_open(p, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = str(tmp_path / "hidden.safetensors")
    save_file(dict(tensors, **{"__extra__.payload.blob": torch.zeros(1024, dtype=torch.uint8)}), bad, metadata=meta)
    with pytest.raises(LoadError, match="does not declare"):
        load(unet, bad)


def test_model_tensors_in_any_dtype_round_trip(tmp_path, registry_kernels):
    """A model's own tensors may be float64 (CogVideoX's position table), complex (rotary tables), bool, int16,
    unsigned or fp8: save wrote them, the loader refused its own file as corrupt ("unsupported entry"). Now they
    load, values and dtypes unchanged; found by audit."""
    import torch.nn as nn

    from lowbit.quant import CallRecorder

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
            self.register_buffer("pos", torch.randn(8, dtype=torch.float64), persistent=False)
            self.register_buffer("mask", torch.rand(8) > 0.5)
            self.register_buffer("ids", torch.arange(8, dtype=torch.int16))
            self.register_buffer("f8", torch.randn(4).to(torch.float8_e4m3fn))
            self.register_buffer("u16", torch.arange(4, dtype=torch.int32).to(torch.uint16))
            self.register_buffer("u32", torch.arange(4, dtype=torch.int64).to(torch.uint32))
            self.register_buffer("rope", torch.polar(torch.ones(6), torch.arange(6.0)))  # complex64

        def forward(self, x):
            return self.b(torch.relu(self.a(x + self.pos.to(x.dtype) * self.mask)))

    torch.manual_seed(0)
    m = M().eval()
    with CallRecorder(m) as rec, torch.no_grad():
        m(torch.randn(2, 8))
    q = deploy_(quantize(m, QuantConfig.preset("W8A8"), rec.calls))
    p = str(tmp_path / "q.safetensors")
    save(q, p)
    m2 = M().eval()
    names = ("pos", "mask", "ids", "f8", "u16", "u32", "rope")
    for name in names:  # different values, so the file's are the ones checked
        buf = getattr(m2, name)
        buf.view(torch.uint8).copy_(~buf.view(torch.uint8))
    r = load(m2, p)
    for name in names:
        a, b = getattr(q, name), getattr(r, name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
