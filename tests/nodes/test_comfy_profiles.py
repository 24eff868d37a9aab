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
