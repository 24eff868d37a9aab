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


def test_save_load_and_in_place_keep_the_split(unet, calls, tmp_path, registry_kernels):
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


# ---- deployed split convolutions: the fused float path (kernels.dense.conv2d_concat) ------------------------------
class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.skip = nn.Conv2d(11, 7, 3, padding=1, stride=(1, 2))  # reads cat([a, b]): split, 3x3, strided
        self.out = nn.Conv2d(7, 3, 1)

    def forward(self, x, t):
        h = torch.cat([self.a(x), self.b(x) * 4], dim=1)
        return self.out(self.skip(h))


def _deployed_catnet(tune=True):
    from lowbit.quant import CallRecorder

    torch.manual_seed(0)
    fp = CatNet().eval()
    rules = (LayerRule(r".*", "quant"),)
    with CallRecorder(fp, store_dtype=torch.float32) as rec, torch.no_grad():
        for t in (900.0, 100.0):
            fp(torch.randn(2, 3, 8, 8) * (3 if t > 500 else 1), torch.tensor([t] * 2))
    cfg = QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax", time_bins=2, rules=rules)
    return deploy_(quantize(fp, cfg, rec.calls), tune=tune)


def _timer_picking(name):
    """A stand-in for the tuner's timer: runs every option once, says ``name`` is fastest (no timing in tests)."""
    def timer(fns, x):
        outs = {n: f() for n, f in fns.items()}
        return {n: (0.0 if n == name else 1.0) for n in fns}, outs
    return timer


@pytest.fixture
def tune_env(monkeypatch):
    from lowbit.kernels import autotune

    for v in ("LOWBIT_AUTOTUNE", "LOWBIT_AUTOTUNE_DENSE", "LOWBIT_AUTOTUNE_CACHE", "LOWBIT_BACKEND",
              "LOWBIT_DISABLE_BACKENDS"):
        monkeypatch.delenv(v, raising=False)
    autotune.clear()
    yield monkeypatch
    autotune.clear()


def test_channel_codes_are_the_reference_integers(monkeypatch):
    """With LOWBIT_CPU_EXACT_ACT_QUANT=1 the reference's integers; by default the CPU kernels' fused codes (the parts
    path's), which differ from them by one step at ties only."""
    from lowbit.kernels import ActQuant
    from lowbit.kernels import cpu as cpu_mod
    from lowbit.kernels.dense import channel_codes
    from lowbit.kernels.eager import quantize_act

    acts = (ActQuant(8, 0.037, 121), ActQuant(4, 0.3, 7), ActQuant(8, 0.0185, 0))
    sizes = (3, 2, 4)
    x = torch.randn(8, 9, 70, 50) * 4
    x[0, 0, 0, :4] = torch.tensor([0.0185, -0.0185, 0.0555, 1e-9])
    x[0, 7, 0, :3] = torch.tensor([0.0185 * 2.5, 0.0185 * 3.5, -1e9])  # ties, a clamp
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1")
    codes = channel_codes(x, acts, sizes)
    for xi, ci, a in zip(torch.split(x, sizes, 1), torch.split(codes, sizes, 1), acts):
        q, _, zp = quantize_act(xi, a, "sample")
        assert torch.equal(ci, q - zp)
    monkeypatch.delenv("LOWBIT_CPU_EXACT_ACT_QUANT")
    fused = channel_codes(x, acts, sizes)
    for xi, ci, a in zip(torch.split(x, sizes, 1), torch.split(fused, sizes, 1), acts):
        assert torch.equal(ci, cpu_mod.quant_static(xi, a).float() - a.zero_point)
    assert float((fused - codes).abs().max()) <= 1


@pytest.mark.parametrize("pick", ["fused", "parts"])
def test_fused_split_conv_is_the_parts_path(tune_env, pick):
    """Whichever path the tuner picks, a deployed split convolution computes what its parts compute (per-timestep
    activation scales included), up to float summation order."""
    from lowbit.kernels import autotune
    from lowbit.quant.split import _fused_path, _parts_path

    q, ref = _deployed_catnet(True), _deployed_catnet(False)  # ref: parts path, registry-order kernels
    sp = q.skip
    assert isinstance(sp, ChannelSplitConv2d) and all(p.mode == "deployed" for p in sp.parts)
    tune_env.setattr(autotune, "_time_alternating", _timer_picking(pick))
    x = torch.randn(2, 3, 8, 8) * 2
    with torch.no_grad():
        outs = {t: ref(x, torch.tensor([t] * 2)) for t in (900.0, 100.0)}
        assert not torch.equal(outs[900.0], outs[100.0])
        for _ in range(2):  # the first call chooses, the next ones take the choice
            for t in (900.0, 100.0):
                y = q(x, torch.tensor([t] * 2))
                assert (y - outs[t]).abs().max() <= 1e-5 * outs[t].abs().max()
        (ch,) = sp.parts[0].packed.cache["autotune.paths"].values()
        assert ch.name == pick and ch.float_name == "fused" and ch.int_name == "parts"
        assert ("fused.w" in sp.parts[0].packed.cache) == (pick == "fused")  # the loser's cache is dropped
        # the two paths directly, on the split conv's own input
        h = torch.randn(2, 11, 8, 8) * 3
        pws, acts = sp._fusable(h)
        a, b = _fused_path(sp, h, pws, acts, sp.parts[0].bias), _parts_path(sp, h, pws, acts, sp.parts[0].bias)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        s = autotune.summary(q)
        assert s["paths"] == {pick: 1}


def test_fused_split_conv_follows_a_part_given_new_integers(tune_env):
    """The fused path's concatenated weight lives in part 0's cache; loading new integers into another part alone
    (its own ``load_state_dict``) made the fused path keep computing with the old ones."""
    from lowbit.kernels import autotune

    q, other = _deployed_catnet(True), _deployed_catnet(True)
    with torch.no_grad():  # another model's part 1: different integers
        for b in other.skip.parts[1].packed.buffers():
            b.copy_(b.flip(0))
    tune_env.setattr(autotune, "_time_alternating", _timer_picking("fused"))
    x, t = torch.randn(2, 3, 8, 8) * 2, torch.tensor([500.0] * 2)
    sp = q.skip
    with torch.no_grad():
        q(x, t)  # the first call chooses (and tunes the parts' kernels), the next one takes the fused path
        y0 = q(x, t)
        (ch,) = sp.parts[0].packed.cache["autotune.paths"].values()
        assert ch.name == "fused" and "fused.w" in sp.parts[0].packed.cache
        sp.parts[1].load_state_dict(other.skip.parts[1].state_dict())
        y1 = q(x, t)
        autotune.set_mode(q, "integer")  # the parts path, each part with its own (new) integers
        ref = q(x, t)
    assert not torch.equal(y0, y1) and (y1 - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_split_conv_float_path_honours_dense_switches(tune_env):
    """The fused float path is the dense backend's: with LOWBIT_AUTOTUNE_DENSE=0 it is not offered, and a choice
    of it made before the switch (or before ``LOWBIT_DISABLE_BACKENDS=dense``) is made again without it."""
    from lowbit.kernels import autotune

    q = _deployed_catnet(True)
    sp = q.skip
    tune_env.setattr(autotune, "_time_alternating", _timer_picking("fused"))
    x, t = torch.randn(2, 3, 8, 8) * 2, torch.tensor([500.0] * 2)
    with torch.no_grad():
        y = q(x, t)
        (ch,) = sp.parts[0].packed.cache["autotune.paths"].values()
        assert ch.name == "fused"
        for var, val in (("LOWBIT_AUTOTUNE_DENSE", "0"), ("LOWBIT_DISABLE_BACKENDS", "dense")):
            tune_env.setenv(var, val)
            y2 = q(x, t)
            (ch,) = sp.parts[0].packed.cache["autotune.paths"].values()
            assert ch.name == "parts" and "fused" not in ch.options
            assert (y2 - y).abs().max() <= 1e-5 * y.abs().max()
            tune_env.delenv(var)
            sp.parts[0].packed.cache.pop("autotune.paths")
            q(x, t)  # chosen again with the float path allowed


def test_split_conv_falls_back_to_the_parts_path(tune_env):
    from lowbit.kernels import ActQuant  # noqa: F401

    q = _deployed_catnet(True)
    sp = q.skip
    h = torch.randn(2, 11, 8, 8)
    with torch.no_grad():
        q(torch.randn(2, 3, 8, 8), torch.tensor([900.0] * 2))  # sets the timestep
        assert sp._fusable(h) is not None
        assert sp._fusable(h.bfloat16()) is None  # bf16: the parts keep their kernels
        tune_env.setenv("LOWBIT_AUTOTUNE", "0")
        assert sp._fusable(h) is None  # tuning off: registry order, parts path
        tune_env.delenv("LOWBIT_AUTOTUNE")
        h_ = sp.parts[1].register_forward_hook(lambda m, i, o: o * 2)  # a side path (LoRA) on a part
        assert sp._fusable(h) is None
        assert torch.allclose(sp(h), sp._parts_forward(h))
        h_.remove()
        tune_env.setattr(sp.parts[1], "a_dynamic", True)  # a part quantizing per sample
        assert sp._fusable(h) is None
        tune_env.setattr(sp.parts[1], "a_dynamic", False)
        ctx = get_context(q)
        ctx.a_bits_override = 16  # float activations at this step
        assert sp._fusable(h) is None
        ctx.a_bits_override = None
        from lowbit.kernels import ops

        p1 = sp.parts[1]
        fl = nn.Conv2d(6, 7, 3, padding=1, stride=(1, 2), bias=False)  # a part kept in float
        fl.weight.data = ops.dequantize_weight(p1.packed)
        sp.parts[1] = fl
        assert sp._fusable(h) is None
        y = sp(h)
        assert torch.isfinite(y).all() and y.shape == (2, 7, 8, 4)


def test_whole_model_modes_take_fused_or_parts(tune_env):
    """settle's modes: "float" runs split convolutions fused, "integer" runs their parts; same function."""
    from lowbit.kernels import autotune

    q, ref = _deployed_catnet(True), _deployed_catnet(False)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([900.0] * 2)
    with torch.no_grad():
        want = ref(x, t)
        q(x, t)
        for mode, path in (("float", "fused"), ("integer", "parts"), ("float", "fused")):
            autotune.set_mode(q, mode)
            y = q(x, t)
            (ch,) = q.skip.parts[0].packed.cache["autotune.paths"].values()
            assert ch.name == path
            assert (y - want).abs().max() <= 1e-5 * want.abs().max()


class ReadsWeight(nn.Module):
    """``head``'s weight is read by its parent (like diffusers' AttentionPooling), its forward never runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, 1)
        self.skip = nn.Conv2d(7, 2, 1)
        self.head = nn.Linear(2, 2)

    def forward(self, x, t):
        h = self.skip(torch.cat([self.a(x), self.b(x)], dim=1))
        return torch.nn.functional.linear(h.permute(0, 2, 3, 1), self.head.weight).permute(0, 3, 1, 2)


def test_one_probe_pass_finds_splits_and_layers_whose_forward_never_runs(monkeypatch):
    """quantize runs one structural probe forward: it finds the convolution reading a concatenation (split) and the
    layer whose parent reads its weight directly (kept float, reported), and quantizes the split's parts."""
    from lowbit.quant import CallRecorder, calib
    from lowbit.quant.policy import NOT_CALLED

    m = ReadsWeight()
    x, t = torch.randn(1, 2, 4, 4), torch.tensor([10])
    with CallRecorder(m) as rec:
        m(x, t)
    probes = []
    real = calib.probe_call
    monkeypatch.setattr(calib, "probe_call", lambda *a, **k: probes.append(1) or real(*a, **k))
    q = quantize(m, QuantConfig.preset("W8A8"), rec.calls)
    assert len(probes) == 1
    ctx = get_context(q)
    assert ctx.splits == {"skip": (3, 4)}
    assert type(q.head) is nn.Linear  # float: deployed layers have no float weight for the parent to read
    assert [r["name"] for r in ctx.report if r["reason"] == NOT_CALLED] == ["head"]
    assert {n for n, _ in quant_layers(q)} == {"a", "b", "skip.parts.0", "skip.parts.1"}
    with torch.no_grad():  # on the calibration input: quantized (W8A8, its ranges), not broken
        y, yq = m(x, t), q(x, t)
    assert float((yq - y).norm() / y.norm()) < 0.05


def test_split_path_choice_is_not_measured_again_after_a_device_move(unet, calls, monkeypatch):
    """A deployed split convolution's choice between its parts and the fused float path is kept in the process's
    decisions, as kernel choices are: after a device move (which drops every cache) the next forward measures
    nothing again, and the choices are the same."""
    from lowbit.kernels import autotune

    q = deploy_(quantize(unet, QuantConfig.preset("W4A8"), calls))
    a, kw = calls[0].to("cpu", torch.float32)
    with torch.no_grad():
        q(*a, **kw)
    splits = [m for m in q.modules() if isinstance(m, ChannelSplitConv2d)]
    assert splits
    before = [sorted(ch.name for ch in m.parts[0].packed.cache.get("autotune.paths", {}).values()) for m in splits]
    assert any(before)
    timed = []
    real = autotune._time_alternating
    monkeypatch.setattr(autotune, "_time_alternating", lambda fns, x: timed.append(sorted(fns)) or real(fns, x))
    q.to("cpu")  # (a no-op move: every packed weight drops its caches, as on any move)
    with torch.no_grad():
        q(*a, **kw)
    assert timed == []
    assert [sorted(ch.name for ch in m.parts[0].packed.cache.get("autotune.paths", {}).values())
            for m in splits] == before
