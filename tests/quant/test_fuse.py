"""Activation epilogues at deployment (quant/fuse.py): which GELUs move into the Linear before them, that the
deployed model computes the same function with and without the move, that saved files and state-dict keys do not
change, and that the move survives undeploy_ / deploy_ without applying the activation twice."""
import pytest
import torch
import torch.nn as nn

from archs import ARCHS, EVAL_T, build, record
from lowbit.quant import CallRecorder, QuantConfig, deploy_, load, load_model, quantize, save, undeploy_
from lowbit.quant.calib import unet_output
from lowbit.quant.fuse import MovedActivation, ProjWithActivation, fuse_activations_
from lowbit.quant.layers import quant_layers


class _Toy(nn.Module):
    """Sequential MLPs: Linear -> GELU(tanh) -> Linear (fused), Linear -> GELU subclass (not fused: not exactly
    nn.GELU), Conv -> GELU (not fused: not a Linear), and a GELU used again outside the Sequential."""

    class _MyGELU(nn.GELU):
        def forward(self, x):
            return super().forward(x) * 1.5

    def __init__(self):
        super().__init__()
        self.act = nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 16))
        self.mlp2 = nn.Sequential(nn.Linear(16, 32), self.act, nn.Linear(32, 16))
        self.other = nn.Sequential(nn.Linear(16, 16), _Toy._MyGELU())
        self.conv = nn.Sequential(nn.Conv2d(1, 1, 1), nn.GELU())

    def forward(self, x, timestep=None):
        y = self.mlp(x) + self.mlp2(x) + self.other(x)
        return self.act(y) + self.conv(y[:, None])[:, 0]


def _toy_q():
    torch.manual_seed(0)
    fp = _Toy().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with CallRecorder(fp) as rec, torch.no_grad():
        for t in (900, 500, 100):
            fp(torch.randn(4, 8, 16, generator=g), torch.tensor([t] * 4))
    q = quantize(fp, QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax"), rec.calls)
    return fp, q, rec.calls


def _outs(m, calls):
    with torch.no_grad():
        return [unet_output(m(*a, **kw)).float() for a, kw in (c.to("cpu", torch.float32) for c in calls)]


def _close(a, b, tol=1e-5):
    return all(((x - y).norm() / y.norm()).item() < tol for x, y in zip(a, b))


def test_sequential_gelu_moves_into_the_linear_and_nothing_else(monkeypatch):
    import copy

    fp, q, calls = _toy_q()
    fake = _outs(q, calls)
    monkeypatch.setenv("LOWBIT_FUSE_ACT", "0")
    plain = deploy_(copy.deepcopy(q))
    assert not any(isinstance(m, MovedActivation) for m in plain.modules())
    keys = set(plain.state_dict())
    monkeypatch.delenv("LOWBIT_FUSE_ACT")
    d = deploy_(copy.deepcopy(q))
    layers = dict(quant_layers(d))
    assert layers["mlp.0"].post == "gelu_tanh" and layers["mlp2.0"].post == "gelu"
    assert layers["other.0"].post is None and layers["conv.0"].post is None
    assert isinstance(d.mlp[1], MovedActivation) and isinstance(d.mlp2[1], MovedActivation)
    assert type(d.other[1]) is _Toy._MyGELU and type(d.conv[1]) is nn.GELU
    assert type(d.act) is nn.GELU and d.mlp2[1] is not d.act  # the shared GELU stays where it is also used
    assert set(d.state_dict()) == keys
    out = _outs(d, calls)
    assert _close(out, _outs(plain, calls))
    assert _close(out, fake, 2e-3)
    assert fuse_activations_(d) == []  # idempotent: nothing left to move
    undeploy_(d)  # the layer keeps its activation in every mode
    assert layers["mlp.0"].mode == "fake" and _close(_outs(d, calls), fake, 1e-5)
    deploy_(d)
    assert _close(_outs(d, calls), out, 1e-5)


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart", "sd15"])
def test_transformer_feed_forwards_fused_same_function_and_files(name, tmp_path, monkeypatch):
    import copy

    fp = build(name)
    calls = record(fp, name)
    q = quantize(fp, QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax"), calls)
    monkeypatch.setenv("LOWBIT_FUSE_ACT", "0")
    plain = deploy_(copy.deepcopy(q))
    monkeypatch.delenv("LOWBIT_FUSE_ACT")
    d = deploy_(copy.deepcopy(q))
    fused = [n for n, layer in quant_layers(d) if layer.post]
    moved = [m for m in d.modules() if isinstance(m, ProjWithActivation)]  # diffusers' GELU / GEGLU(proj)
    assert moved and all(m.post == ("geglu" if name == "sd15" else "gelu_tanh") for m in moved)
    if name == "flux":  # the profile's pair: the single-stream blocks' proj_mlp -> act_mlp
        assert any(n.endswith("proj_mlp") for n in fused)
        assert all(isinstance(b.act_mlp, MovedActivation) for b in d.single_transformer_blocks)
    assert set(d.state_dict()) == set(plain.state_dict())
    a, kw = ARCHS[name].inputs(torch.Generator().manual_seed(5), EVAL_T)
    with torch.no_grad():
        y, y0 = unet_output(d(*a, **kw)), unet_output(plain(*a, **kw))
    assert ((y - y0).norm() / y0.norm()).item() < 1e-4
    path = str(tmp_path / "m.safetensors")
    save(d, path)
    for m in (load(build(name), path), load_model(path)):
        assert sorted(n for n, layer in quant_layers(m) if layer.post) == sorted(fused)
        with torch.no_grad():
            y2 = unet_output(m(*a, **kw))
        assert ((y2 - y).norm() / y.norm()).item() < 1e-4


def test_hooks_and_lora_side_paths_see_the_linear_output_before_the_activation():
    """A LoRA side path adds to the Linear's output, before the GELU; any forward hook on the layer sees the Linear's
    own output. While one watches, the layer leaves the activation to the MovedActivation in its place."""
    import copy

    from lowbit.quant import side_paths

    fp, q, calls = _toy_q()
    d = deploy_(copy.deepcopy(q))
    layer = dict(quant_layers(d))["mlp.0"]
    side_paths.ensure_hook(layer)  # no paths: the output is untouched, the activation stays fused
    assert layer.post_now() == "gelu_tanh"
    base = _outs(d, calls)
    down, up = torch.randn(2, 16) * 0.1, torch.randn(32, 2) * 0.1
    side_paths.set_side_paths(layer, [side_paths.SidePath(down=down, up=up)])
    assert layer.post_now() is None
    got = _outs(d, calls)
    # reference: the same side path on the unfused twin (the GELU after the sum)
    plain_env = copy.deepcopy(q)
    import os

    os.environ["LOWBIT_FUSE_ACT"] = "0"
    try:
        plain = deploy_(plain_env)
    finally:
        del os.environ["LOWBIT_FUSE_ACT"]
    side_paths.set_side_paths(dict(quant_layers(plain))["mlp.0"], [side_paths.SidePath(down=down, up=up)])
    assert _close(got, _outs(plain, calls)) and not _close(got, base)
    side_paths.clear_side_paths(d)
    assert layer.post_now() == "gelu_tanh" and _close(_outs(d, calls), base)
    seen = []
    h = layer.register_forward_hook(lambda m, a, out: seen.append(out))  # a user's hook: the Linear's output
    with torch.no_grad():
        x = torch.randn(2, 16)
        d.mlp(x)
    h.remove()
    assert seen[0].min() < -0.2  # not a GELU's output (those are >= -0.17)


def test_comfyuis_geglu_is_taken_by_class_and_module_name():
    """ComfyUI's SD1.x / SDXL transformer blocks use ``comfy.ldm.modules.attention.GEGLU`` (``x, gate =
    proj(x).chunk(2); x * gelu(gate)``): taken like diffusers' (a stand-in class with that name and module here; no
    host needed). A class of that name from elsewhere is not."""
    import copy

    import torch.nn.functional as F

    def geglu_class(module):
        def forward(self, x):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * F.gelu(gate)

        return type("GEGLU", (nn.Module,), {"__module__": module, "forward": forward})

    for module, taken in (("comfy.ldm.modules.attention", True), ("backend.nn.unet", True), ("somewhere.else", False)):
        cls = geglu_class(module)

        class FF(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.ModuleList([cls(), nn.Linear(16, 8)])
                self.net[0].proj = nn.Linear(8, 32)

            def forward(self, x, timestep=None):
                return self.net[1](self.net[0](x))

        torch.manual_seed(0)
        fp = FF().eval()
        with CallRecorder(fp) as rec, torch.no_grad():
            for t in (900, 100):
                fp(torch.randn(4, 6, 8), torch.tensor([t] * 4))
        q = quantize(fp, QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax"), rec.calls)
        fake = _outs(q, rec.calls)
        d = deploy_(copy.deepcopy(q))
        assert isinstance(d.net[0], ProjWithActivation) == taken
        assert _close(_outs(d, rec.calls), fake, 2e-2)
