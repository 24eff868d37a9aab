"""Activation epilogues at deployment (quant/fuse.py): which GELUs move into the Linear before them, that the
deployed model computes the same function with and without the move, that saved files and state-dict keys do not
change, and that the move survives undeploy_ / deploy_ without applying the activation twice."""
import pytest
import torch
import torch.nn as nn

from archs import ARCHS, EVAL_T, build, record
from lowbit.quant import CallRecorder, QuantConfig, deploy_, load, load_model, quantize, save, undeploy_
from lowbit.quant.calib import unet_output
from lowbit.quant.fuse import FusedSequential, MovedActivation, ProjWithActivation, fuse_activations_
from lowbit.quant.layers import quant_layers


class _Toy(nn.Module):
    """Sequential MLPs: Linear -> GELU(tanh) -> Linear (fused; its Linear also called alone below, which must give
    its plain output), Linear -> GELU subclass (not fused: not exactly nn.GELU), Conv -> GELU (not fused: not a
    Linear), a GELU used again outside the Sequential, a Sequential subclass with its own forward (not fused: its
    forward is not known)."""

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
        self.custom = _Toy._Custom(nn.Linear(16, 16), nn.GELU())

    class _Custom(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) + self[0](x)

    def forward(self, x, timestep=None):
        y = self.mlp(x) + self.mlp2(x) + self.other(x) + self.custom(x) + self.mlp[0](x)[..., :16]
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


def _fused_names(model):
    """Where activations moved: layers keeping one (declared pairs), ProjWithActivation's proj, FusedSequential's."""
    out = {n for n, layer in quant_layers(model) if layer.post}
    for name, m in model.named_modules():
        if isinstance(m, ProjWithActivation):
            out.add(f"{name}.proj")
        if isinstance(m, FusedSequential):
            out |= {f"{name}.{list(m._modules)[i]}" for i in m.fused}
    return sorted(out)


def test_hooked_activations_are_left_alone():
    """A hook on a GELU would not run once the GELU moved: such a GELU (or its Sequential) is not fused."""
    import copy

    fp, q, calls = _toy_q()
    seen = []
    q.mlp[1].register_forward_hook(lambda m, a, out: seen.append(1))
    d = deploy_(copy.deepcopy(q))
    assert type(d.mlp) is nn.Sequential and isinstance(d.mlp2, FusedSequential)
    _outs(d, calls)
    assert len(seen) == len(calls)  # (the copy's hook shares the list: it ran once per call)


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
    assert isinstance(d.mlp, FusedSequential) and d.mlp.fused == {0: "gelu_tanh"}
    assert isinstance(d.mlp2, FusedSequential) and d.mlp2.fused == {0: "gelu"}
    assert all(layer.post is None for layer in layers.values())  # passed per call, not stored on the layer
    assert type(d.other) is nn.Sequential and type(d.conv) is nn.Sequential and type(d.custom) is _Toy._Custom
    assert type(d.act) is nn.GELU and d.mlp2[1] is d.act  # the shared GELU stays (skipped inside the Sequential)
    assert set(d.state_dict()) == keys
    out = _outs(d, calls)
    assert _close(out, _outs(plain, calls))
    assert _close(out, fake, 2e-3)
    assert fuse_activations_(d) == []  # idempotent: nothing left to move
    undeploy_(d)  # the fused modules keep calling the layers with their activation in every mode
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
    fused = _fused_names(d)
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
        assert _fused_names(m) == fused
        with torch.no_grad():
            y2 = unet_output(m(*a, **kw))
        assert ((y2 - y).norm() / y.norm()).item() < 1e-4


def test_a_fused_sequential_does_not_hide_the_profiles_block_pairs():
    """A Sequential(Linear, GELU) met before Flux's single-stream blocks (modules are visited children first, from
    the last registered) used to overwrite the profile's block pairs with its own, so those blocks' proj_mlp ->
    act_mlp stayed unfused (the same function, just slower)."""
    fp = build("flux")
    d_ = fp.proj_out.in_features
    fp.norm_out.extra = nn.Sequential(nn.Linear(d_, d_), nn.GELU())  # (registered after the blocks)
    fp.norm_out.register_forward_hook(lambda m, a, out: out + 0 * m.extra(out))
    calls = record(fp, "flux")
    d = deploy_(quantize(fp, QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax"), calls))
    assert isinstance(d.norm_out.extra, FusedSequential)
    assert all(isinstance(b.act_mlp, MovedActivation) for b in d.single_transformer_blocks)


def test_hooks_and_lora_side_paths_see_the_linear_output_before_the_activation():
    """A LoRA side path adds to the Linear's output, before the GELU; any forward hook on the layer sees the Linear's
    own output. While one watches, the layer leaves the activation to the MovedActivation in its place."""
    import copy

    from lowbit.quant import side_paths

    fp, q, calls = _toy_q()
    d = deploy_(copy.deepcopy(q))
    layer = dict(quant_layers(d))["mlp.0"]
    side_paths.ensure_hook(layer)  # no paths: the output is untouched, the activation stays fused
    assert layer.post_now("gelu_tanh") == "gelu_tanh"
    base = _outs(d, calls)
    down, up = torch.randn(2, 16) * 0.1, torch.randn(32, 2) * 0.1
    side_paths.set_side_paths(layer, [side_paths.SidePath(down=down, up=up)])
    assert layer.post_now("gelu_tanh") is None
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
    assert layer.post_now("gelu_tanh") == "gelu_tanh" and _close(_outs(d, calls), base)
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


def test_a_bf16_file_loads_with_bf16_weight_stand_ins_and_runs(tmp_path):
    """Kandinsky 2.2 casts the image embeddings to its projection's ``weight.dtype``: a bf16 model saved and rebuilt
    by ``load_model`` (built in fp32, filled with bf16 float parts) must answer bf16 there (it answered fp32 and the
    bf16 call failed on mixed dtypes; found by the diff audit)."""
    fp = build("kandinsky22")
    q = deploy_(quantize(fp, QuantConfig.preset("W8A8"), record(fp, "kandinsky22")))
    q.to(torch.bfloat16)
    path = str(tmp_path / "k.safetensors")
    save(q, path)
    m = load_model(path)
    assert all(layer.weight.dtype == torch.bfloat16 for _, layer in quant_layers(m))
    a, kw = ARCHS["kandinsky22"].inputs(torch.Generator().manual_seed(5), EVAL_T)
    kw = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    kw["added_cond_kwargs"] = {k: v.bfloat16() for k, v in kw["added_cond_kwargs"].items()}
    with torch.no_grad():
        y = unet_output(m(*a, **kw))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_forcing_the_dense_backend_runs_a_deployed_model(monkeypatch):
    """``LOWBIT_BACKEND=dense`` forces the float path for the calls it implements; the ops it does not implement
    (unpacking, dequantization) go to the others (it failed with NoBackendError on every deployed model)."""
    import copy

    fp, q, calls = _toy_q()
    d = deploy_(copy.deepcopy(q))
    ref = _outs(d, calls)
    monkeypatch.setenv("LOWBIT_BACKEND", "dense")
    assert _close(_outs(d, calls), ref, 1e-4)


def test_a_fused_sequential_edited_after_deployment_computes_what_it_holds():
    """A FusedSequential holds its pairs by identity and checks them at each call (found by audit: a GELU replaced
    after deployment was still applied, hooks added later never ran, slicing / deleting / inserting crashed, a nested
    Sequential was reported fused but was not)."""
    import copy

    fp, q, calls = _toy_q()
    d = deploy_(copy.deepcopy(q))
    x = torch.randn(2, 16)
    with torch.no_grad():
        lin0, gelu, lin2 = d.mlp[0], d.mlp[1], d.mlp[2]
        assert torch.allclose(d.mlp[0:2](x), gelu(lin0(x)), atol=1e-6)  # a slice: a plain computation
        seen = []
        h = gelu.register_forward_hook(lambda m, a, out: seen.append(1))  # a hook added after deployment runs
        d.mlp(x)
        assert seen == [1] and d.mlp.fused == {0: "gelu_tanh"}
        h.remove()
        d.mlp[1] = nn.Identity()  # replaced after deployment: the Identity is used
        assert d.mlp.fused == {} and torch.allclose(d.mlp(x), lin2(lin0(x)), atol=1e-6)
        d.mlp[1] = gelu
        del d.mlp[0]  # deleted: the rest runs as it is
        assert torch.allclose(d.mlp(x[:, :1].expand(2, 32)), lin2(gelu(x[:, :1].expand(2, 32))), atol=1e-6)
        with pytest.raises(TypeError):  # post is keyword-only: a stray positional argument is an error, as before
            lin0(x, 1.0)

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.GELU()), nn.Linear(16, 16), nn.GELU(),
                                     nn.Linear(16, 8))

        def forward(self, x, timestep=None):
            return self.net(x)

    torch.manual_seed(0)
    m = Nested().eval()
    with CallRecorder(m) as rec, torch.no_grad():
        m(torch.randn(4, 8), torch.tensor([500] * 4))
    qn = quantize(m, QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax"), rec.calls)
    fake = _outs(qn, rec.calls)
    dn = deploy_(qn)
    assert isinstance(dn.net, FusedSequential) and isinstance(dn.net[0], FusedSequential)
    assert _fused_names(dn) == ["net.0.0", "net.1"] and _close(_outs(dn, rec.calls), fake, 2e-2)


def test_side_path_hooks_registered_by_an_older_version_still_run():
    """A whole-model pickle keeps the side-path hook as an older version registered it (without keywords): torch
    calls it with (module, args, output), which the hook takes as well as the new (module, args, kwargs, output)."""
    import copy

    from lowbit.quant import side_paths

    fp, q, calls = _toy_q()
    d = deploy_(copy.deepcopy(q))
    layer = dict(quant_layers(d))["mlp.2"]
    hook = side_paths.SidePathHook()
    layer.register_forward_hook(hook)  # (as ensure_hook did before)
    x = torch.randn(2, 32)
    with torch.no_grad():
        plain = layer(x)
        down, up = torch.randn(2, 32) * 0.1, torch.randn(16, 2) * 0.1
        hook.paths = [side_paths.SidePath(down=down, up=up)]
        assert torch.allclose(layer(x), plain + (x @ down.t()) @ up.t(), atol=1e-6)
