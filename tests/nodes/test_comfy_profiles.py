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
