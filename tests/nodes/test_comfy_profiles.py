"""Profiles of ComfyUI's diffusion transformers (quant/profiles/comfy_sd3.py, dit.py's comfy-flux), WITHOUT
ComfyUI: classes named like ComfyUI's are matched, the timestep scale puts both on the [0, 1000) table scale
(ComfyUI's SD3 receives 1000 * sigma, its Flux sigma; checked against a real ComfyUI in
test_comfyui_integration.py), and the edge rules name ComfyUI's layer names.
"""
from __future__ import annotations

import re

import torch.nn as nn

import lowbit.nodes.comfy_adapter  # noqa: F401  (registers comfy-sd3 while quant/profiles does not import it)
from lowbit.quant.profiles import profile_for


class MMDiT(nn.Module):  # same class names as ComfyUI's
    pass


class OpenAISignatureMMDITWrapper(MMDiT):
    pass


class Flux(nn.Module):
    pass


def _edge(profile, name):
    return any(re.search(r.pattern, name) for r in profile.edge_rules)


def test_comfy_sd3_profile_is_picked_for_comfyui_mmdit_with_scale_1():
    p = profile_for(OpenAISignatureMMDITWrapper())
    assert p.name == "comfy-sd3"
    assert p.timestep_scale == 1.0 and p.prediction == "flow" and p.timestep_kwargs == ("timesteps",)
    for name in ("x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "y_embedder.mlp.2",
                 "final_layer.linear", "final_layer.adaLN_modulation.1"):
        assert _edge(p, name), name
    for name in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.mlp.fc1"):
        assert not _edge(p, name), name


def test_comfy_flux_profile_scales_sigma_by_1000():
    p = profile_for(Flux())
    assert p.name == "comfy-flux" and p.timestep_scale == 1000.0 and p.prediction == "flow"


class NextDiT(nn.Module):  # ComfyUI's Lumina 2 / Z-Image transformer, by name: forward(x, timesteps, context, ...)
    def __init__(self, c=4, width=16):
        super().__init__()
        self.x_embedder = nn.Linear(c, width)
        self.t_embedder = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                    for _ in range(2))
        self.final_layer = nn.Linear(width, c)

    def forward(self, x, timesteps, context=None, num_tokens=None, attention_mask=None, **kwargs):
        import torch

        b, c, h, w = x.shape
        z = self.x_embedder(x.flatten(2).transpose(1, 2)) + self.t_embedder((1 - timesteps).view(-1, 1, 1))
        for blk in self.layers:
            z = z + blk(z * (1 + torch.cos(3 * timesteps.view(-1, 1, 1))))  # activations that move with sigma
        return -self.final_layer(z).transpose(1, 2).reshape(b, c, h, w)


def test_comfy_lumina2_profile_keys_sigma_calls_on_the_table_scale():
    """ComfyUI's Z-Image / Lumina 2 (NextDiT) receives sigma in [0, 1]: under the generic profile every step fell into
    one activation table. Its profile keys the tables by 1000 * sigma: one scale per timestep bin."""
    import torch

    from lowbit.quant import CallRecorder, QuantConfig, get_context, quant_layers, quantize

    torch.manual_seed(0)
    m = NextDiT().eval()
    p = profile_for(m)
    assert p.name == "comfy-lumina2" and p.timestep_scale == 1000.0 and p.timestep_kwargs == ("timesteps",)
    assert _edge(p, "t_embedder.0") and _edge(p, "final_layer.linear") and not _edge(p, "layers.0.0")
    g = torch.Generator().manual_seed(1)
    with CallRecorder(m) as rec, torch.no_grad():
        for s in (0.95, 0.7, 0.4, 0.1):
            m(torch.randn(2, 4, 4, 4, generator=g), torch.full((2,), s), context=torch.zeros(2, 3, 8), num_tokens=3)
    assert [round(c.t) for c in rec.calls] == [950, 700, 400, 100]
    q = quantize(m, QuantConfig.preset("W8A8", time_bins=4), rec.calls)
    with torch.no_grad():
        q(torch.randn(2, 4, 4, 4, generator=g), torch.full((2,), 0.55), context=torch.zeros(2, 3, 8), num_tokens=3)
    assert abs(get_context(q).t - 550) < 1e-3
    blk = dict(quant_layers(q))["layers.0.0"]
    assert len(set(blk.act.table(8)[0].tolist())) == 4


def test_ptqd_sampler_view_keys_flow_models_by_the_profile_scaled_timestep(monkeypatch):
    """The PTQD Sampler's variance calibration on ComfyUI's rectified-flow models (CONST): the statistics are read
    at the table key 1000 * sigma (Flux receives sigma: profile scale 1000); v-prediction models are skipped."""
    import sys
    import types

    import torch

    import lowbit.nodes.comfy_adapter as ad
    import lowbit.quant.ptqd as ptqd

    ms_mod = types.ModuleType("comfy.model_sampling")

    class EPS:
        def timestep(self, s):
            return s

    class V_PREDICTION(EPS):
        pass

    class X0(EPS):
        pass

    class CONST(EPS):
        pass

    ms_mod.EPS, ms_mod.V_PREDICTION, ms_mod.X0, ms_mod.CONST = EPS, V_PREDICTION, X0, CONST
    comfy_pkg = sys.modules.get("comfy") or types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_sampling", ms_mod)
    seen = []

    class Stats:
        def residual_var_at(self, t, corrected):
            seen.append(t)
            return 0.25

    monkeypatch.setattr(ptqd, "get_stats", lambda unet: Stats())
    monkeypatch.setattr(ad, "get_context", lambda unet: types.SimpleNamespace(ptqd_active=True))

    def model_k(ms):
        base = types.SimpleNamespace(diffusion_model=Flux(), model_sampling=ms)
        return types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=base))

    view = ad.ptqd_view(model_k(CONST()))
    assert view is not None and view.residual_var(torch.tensor(0.5)) == 0.25
    assert seen == [500.0]
    assert ad.ptqd_view(model_k(V_PREDICTION())) is None
