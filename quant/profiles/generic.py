"""Fallback for any model: no names known; the first and last convolution stay at 8 bits."""
from . import ModelProfile, register_profile

GENERIC = register_profile(ModelProfile(
    name="generic", matches=lambda model: True, priority=-1000,
    block_types=("ResnetBlock2D", "BasicTransformerBlock", "Attention", "ResBlock", "SpatialTransformer",
                 "AttentionBlock", "CrossAttention", "Transformer2DModel"),
    description="any torch module with Conv2d/Linear layers"))
