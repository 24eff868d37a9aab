"""Shortcut split (quant/split.py): convolutions reading a channel concatenation get one quantizer per part."""
import pytest
import torch
import torch.nn as nn

from lowbit.quant import LayerRule, LoadError, QuantConfig, deploy_, load, quant_layers, quantize, quantize_, save
from lowbit.quant.calib import unet_output
from lowbit.quant.context import get_context
from lowbit.quant.split import ChannelSplitConv2d, find_concat_convs

from qutil import assert_same_state, output_error, state_copy, tiny_unet


def test_split_conv_is_float_exact():
    conv = nn.Conv2d(12, 5, 3, padding=1)
    sp = ChannelSplitConv2d(conv, (7, 5))
    x = torch.randn(2, 12, 6, 6)
    assert torch.allclose(sp(x), conv(x), atol=1e-5)
    with pytest.raises(ValueError):
        ChannelSplitConv2d(conv, (7, 4))


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, 1)
        self.skip = nn.Conv2d(7, 2, 1)  # reads cat([a, b])
        self.post = nn.Conv2d(7, 2, 1)  # reads a function of the concatenation, not the concatenation

    def forward(self, x, t):
        h = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.skip(h) + self.post(h * 2)


def test_found_by_tracing_not_by_name():
    from lowbit.quant import CallRecorder

    m = Cat()
    with CallRecorder(m) as rec:
        m(torch.randn(1, 2, 4, 4), torch.tensor([10]))
    assert find_concat_convs(m, rec.calls[0], ["a", "b", "skip", "post"]) == {"skip": (3, 4)}


def test_decoder_skip_convs_are_split(unet, calls):
    q = quantize(unet, QuantConfig.preset("W4A4"), calls)
    splits = get_context(q).splits
    assert splits and all(n.startswith("up_blocks.") and n.endswith("conv_shortcut") for n in splits)
    name, sizes = next(iter(splits.items()))
    parts = [q.get_submodule(f"{name}.parts.{i}") for i in range(len(sizes))]
    # each part: its own activation quantizer and weight scales; the rule for the skip conv (W8A8) still applies
    assert all(p.w_bits == 8 and p.a_bits == 8 for p in parts)
    s0, s1 = (p.act.table(8)[0] for p in parts)
    assert not torch.equal(s0, s1)
    assert parts[0].bias is not None and parts[1].bias is None
    assert unet.get_submodule(name).__class__ is nn.Conv2d  # the float model is untouched
    from lowbit.quant.io import model_fingerprint

    assert model_fingerprint(q) == model_fingerprint(unet)  # hosts check "made from this model" with it


def test_split_lowers_the_error_of_a_4bit_skip_conv(unet, calls):
    """Quantizing the skip convolutions to W4A4 as Q-Diffusion does: with the split their error is lower."""
    rules = (LayerRule(r"conv_shortcut$", "quant"),)  # a user rule overrides the profile's edge rule
    errs = {}
    for split in (True, False):
        q = quantize(unet, QuantConfig.preset("W4A4", rules=rules, split_concat=split), calls)
        errs[split] = output_error(unet, q, calls, mean=True)
    assert errs[True] < errs[False], errs


def test_save_load_and_in_place_keep_the_split(unet, calls, tmp_path):
    q = deploy_(quantize(unet, QuantConfig.preset("W4A8"), calls))
    p = save(q, str(tmp_path / "q.safetensors"))
    before = state_copy(unet)
    q2 = load(unet, p)
    assert_same_state(unet, before)
    assert get_context(q2).splits == get_context(q).splits
    a, kw = calls[0].to("cpu", torch.float32)
    with torch.no_grad():
        assert torch.equal(unet_output(q(*a, **kw)), unet_output(q2(*a, **kw)))
    # a model without that concatenation (other architecture) is refused before anything is built
    other = tiny_unet(seed=0)
    name = next(iter(get_context(q).splits))
    parent, _, attr = name.rpartition(".")
    setattr(other.get_submodule(parent), attr, nn.Conv2d(5, 5, 1))
    with pytest.raises(LoadError, match="split convolution"):
        load(other, p)
    # in place
    m = tiny_unet(seed=0)
    quantize_(m, QuantConfig.preset("W4A8"), calls)
    assert isinstance(m.get_submodule(name), ChannelSplitConv2d)
    assert sum(1 for n, _ in quant_layers(m) if ".parts." in n) == 2 * len(get_context(q).splits)
