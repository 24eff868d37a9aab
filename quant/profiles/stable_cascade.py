"""Stable Cascade / Würstchen UNets (diffusers' ``StableCascadeUNet``, prior and decoder), called as
``unet(sample, timestep_ratio, clip_text_pooled, ...)`` with ``timestep_ratio`` = t / T in [0, 1] (1 = pure noise).

Under the generic profile the call's timestep was not found at all (no keyword named so; found by audit: every step
under one key, and PTQD failed inside its statistics); read as ``timestep_ratio`` and scaled by 1000 it keys the
tables on [0, 1000] like a DDPM timestep. Edges: the input embedding, the output head (``clf``) and the conditioning
mappers (CLIP text / image, EfficientNet, pixels) stay at W8A8.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

STABLE_CASCADE = register_profile(ModelProfile(
    name="stable-cascade", matches=class_named("StableCascadeUNet"), priority=20,
    edge_rules=(
        LayerRule(r"^embedding\.", "w8a8"),
        LayerRule(r"^clf\.", "w8a8"),
        LayerRule(r"^(clip_txt_pooled_mapper|clip_txt_mapper|clip_img_mapper|effnet_mapper|pixels_mapper)(\.|$)",
                  "w8a8"),
    ),
    block_types=("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    timestep_kwargs=("timestep_ratio",), sample_kwargs=("sample",), timestep_scale=1000.0, replaces="generic",
    description="Stable Cascade UNet: called with timestep_ratio = t / T in [0, 1]"))
