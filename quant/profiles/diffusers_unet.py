"""diffusers UNets: ``UNet2DModel`` (pixel space, class labels) and ``UNet2DConditionModel`` (SD1.x/2.x/XL), and the
UNets built from the same blocks with the same layer names (AnimateDiff's ``UNetMotionModel``, ``UNet3DConditionModel``,
SVD's ``UNetSpatioTemporalConditionModel``, ``ControlNetModel``: their edges found by the same rules; found by audit).
SVD is called with ``0.25 * log(sigma)``, not a timestep: its own profile (edm.py) maps that onto [0, T).

Called as ``unet(sample, timestep, encoder_hidden_states=..., class_labels=...)`` with the DDPM timestep in
[0, T). Edges: ``conv_in``, ``conv_out``, the time/class/added embeddings, skip and downsample convolutions.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock", "Transformer2DModel", "Attention")

DIFFUSERS_UNET = register_profile(ModelProfile(
    name="diffusers-unet", matches=class_named("UNet2DModel", "UNet2DConditionModel", "UNetMotionModel",
                                               "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
                                               "ControlNetModel"), priority=10,
    edge_rules=(
        LayerRule(r"(^|\.)conv_in$", "w8a8"),
        LayerRule(r"(^|\.)conv_out$", "w8a8"),
        LayerRule(r"(^|\.)(time_embedding|class_embedding|add_embedding)(\.|$)", "w8a8"),
        LayerRule(r"conv_shortcut$", "w8a8"),
        LayerRule(r"downsamplers\.\d+\.conv$", "w8a8"),
    ),
    block_types=BLOCKS, timestep_kwargs=("timestep",), sample_kwargs=("sample",),
    description="diffusers UNet2DModel / UNet2DConditionModel"))
