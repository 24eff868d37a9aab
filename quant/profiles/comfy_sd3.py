"""ComfyUI's SD3 transformer (``comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper``, a
subclass of ComfyUI's ``MMDiT``): rectified flow, called with ``timesteps = model_sampling.timestep(sigma)``.

ComfyUI's SD3 sampling object is ``ModelSamplingDiscreteFlow`` with ``multiplier = 1000``, so
``timestep(sigma) = 1000 * sigma`` (checked in ComfyUI v0.3.64: sigma 1.0, 0.5, 0.1 -> 1000, 500, 100): the
call already arrives on the [0, 1000) scale of the per-timestep tables, so the scale is 1 (ComfyUI's ``Flux``
receives sigma itself and is scaled by 1000 in ``dit.py``'s ``comfy-flux``). Keyword names are the wrapper's
``forward(x, timesteps, context, y, control, transformer_options)``; the output is NCHW (unpatchified).
Layer names (ComfyUI's): ``x_embedder.proj``, ``context_embedder``, ``t_embedder.mlp.*``, ``y_embedder.mlp.*``,
``joint_blocks.N.{context_block,x_block}.*``, ``final_layer.{linear,adaLN_modulation.1}``.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

_EDGES = (
    LayerRule(r"(^|\.)(x_embedder\.proj|context_embedder)$", "w8a8"),
    LayerRule(r"(^|\.)final_layer\.(linear|adaLN_modulation\.\d+)$", "w8a8"),
    LayerRule(r"(^|\.)(t_embedder|y_embedder)(\.|$)", "w8a8"),
)

COMFY_SD3 = register_profile(ModelProfile(
    name="comfy-sd3", matches=class_named("MMDiT"), priority=30,  # before dit.py's generic timestep DiT
    edge_rules=_EDGES, structural_edges=False, block_types=("JointBlock",), timestep_kwargs=("timesteps",),
    sample_kwargs=("x",), timestep_scale=1.0, prediction="flow", channel_dim=1,
    description="ComfyUI's SD3 MMDiT (NCHW latents; model_sampling.timestep(sigma) = 1000 * sigma)"))
