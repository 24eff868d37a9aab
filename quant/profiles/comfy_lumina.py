"""ComfyUI's Lumina 2 / Z-Image transformer (``comfy.ldm.lumina.model.NextDiT``): rectified flow, called with
``timesteps = model_sampling.timestep(sigma)``.

ComfyUI's ``Lumina2`` and ``ZImage`` models sample with ``multiplier = 1.0``, so the call receives sigma itself in
[0, 1] (``NextDiT.forward`` turns it into ``t = 1 - timesteps``): the tables are keyed by 1000 * sigma (scale 1000,
as ComfyUI's Flux in ``dit.py``). Under the generic profile every step of such a model fell into one table (keys
within [0, 1]). Keyword names are ``forward(x, timesteps, context, num_tokens, attention_mask, ...)``; the output
is NCHW (unpatchified). Layer names (ComfyUI's): ``x_embedder``, ``t_embedder.mlp.*``, ``cap_embedder.*``,
``noise_refiner.N`` / ``context_refiner.N`` / ``layers.N`` (``JointTransformerBlock``), ``final_layer.{linear,
adaLN_modulation.1}``.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

_EDGES = (
    LayerRule(r"(^|\.)x_embedder$", "w8a8"),
    LayerRule(r"(^|\.)final_layer\.(linear|adaLN_modulation\.\d+)$", "w8a8"),
    LayerRule(r"(^|\.)(t_embedder|cap_embedder)(\.|$)", "w8a8"),
)

COMFY_LUMINA2 = register_profile(ModelProfile(
    name="comfy-lumina2", matches=class_named("NextDiT"), priority=30,
    edge_rules=_EDGES, structural_edges=False, block_types=("JointTransformerBlock",),
    timestep_kwargs=("timesteps",), sample_kwargs=("x",), timestep_scale=1000.0, prediction="flow", channel_dim=1,
    description="ComfyUI's Lumina 2 / Z-Image NextDiT (NCHW latents; model_sampling.timestep(sigma) = sigma)"))
