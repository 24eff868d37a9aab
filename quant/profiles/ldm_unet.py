"""LDM-style UNets as ComfyUI and Forge run them (``UNetModel``, Forge's ``IntegratedUNet2DConditionModel``).

Called as ``unet(x, timesteps, context=..., y=..., transformer_options=...)`` with the DDPM timestep that the
host computes from sigma (``model_sampling.timestep(sigma)``), in [0, T). ``transformer_options`` is the host's
per-run bookkeeping and is not part of a recorded call.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

LDM_UNET = register_profile(ModelProfile(
    name="ldm-unet", matches=class_named("UNetModel", "IntegratedUNet2DConditionModel"), priority=10,
    edge_rules=(
        LayerRule(r"(^|\.)input_blocks\.0\.0$", "w8a8"),
        LayerRule(r"(^|\.)out\.2$", "w8a8"),
        LayerRule(r"(^|\.)(time_embed|label_emb)(\.|$)", "w8a8"),
        LayerRule(r"skip_connection$", "w8a8"),
        LayerRule(r"\.op$", "w8a8"),
        # Forge's integrated UNet uses diffusers-like names
        LayerRule(r"(^|\.)(conv_in|conv_out)$", "w8a8"),
        LayerRule(r"(^|\.)(time_embedding|add_embedding)(\.|$)", "w8a8"),
        LayerRule(r"conv_shortcut$", "w8a8"),
    ),
    block_types=("ResBlock", "SpatialTransformer", "BasicTransformerBlock", "CrossAttention",
                 "ResnetBlock2D", "Transformer2DModel", "Attention"),
    timestep_kwargs=("timesteps", "t", "timestep"), sample_kwargs=("x", "sample"),
    description="ComfyUI/LDM UNetModel and Forge's IntegratedUNet2DConditionModel"))
