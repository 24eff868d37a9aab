"""Fallback for any model: no names known; the first and last convolution stay at 8 bits.

Time-embedding MLPs that diffusers' own code reads the float weight of stay float (``keep_float``): the Wan family
(Wan, its VACE / Animate variants and the models built on its embedder) reads
``next(iter(time_embedder.parameters())).dtype`` (and ``delta_embedder``), Z-Image and Bria-FIBO read
``t_embedder.mlp[0].weight.dtype``; a deployed layer has neither (the forward failed with StopIteration /
AttributeError). They are small next to the blocks.
"""
from . import ModelProfile, register_profile

KEEP_FLOAT = (r"(^|\.)(time_embedder|delta_embedder)\.", r"(^|\.)t_embedder\.mlp\.")

GENERIC = register_profile(ModelProfile(
    name="generic", matches=lambda model: True, priority=-1000, keep_float=KEEP_FLOAT,
    block_types=("ResnetBlock2D", "BasicTransformerBlock", "Attention", "ResBlock", "SpatialTransformer",
                 "AttentionBlock", "CrossAttention", "Transformer2DModel"),
    description="any torch module with Conv2d/Linear layers"))
