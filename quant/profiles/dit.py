"""Diffusion transformers (SD3/Flux class): Linear layers only, flow matching, sigma-keyed.

diffusers' ``FluxTransformer2DModel`` receives ``timestep`` = sigma in [0, 1] (the Flux pipeline divides the
scheduler's timestep by 1000), so its tables are keyed by 1000·sigma; ``SD3Transformer2DModel`` receives the
scheduler's timestep 1000·sigma itself; ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` get DDPM
timesteps in [0, T). ComfyUI's ``Flux`` receives ``model_sampling.timestep(sigma)`` = sigma (scale 1000 here);
ComfyUI's SD3 is ``comfy_sd3.py``.
Edges: the input and output projections and the timestep/text/guidance embedders. Flux works on packed
tokens ([B, tokens, channels]: channels are the last dimension); SD3, DiT and PixArt unpatchify to NCHW.
"""
from ..config import LayerRule
from . import ModelProfile, class_named, register_profile

_EDGES = (
    LayerRule(r"(^|\.)(x_embedder|img_in|pos_embed\.proj|context_embedder|txt_in)$", "w8a8"),
    LayerRule(r"(^|\.)(proj_out|final_layer\.linear|norm_out\.linear|final_layer\.adaLN_modulation\.\d+)$",
              "w8a8"),
    LayerRule(r"(^|\.)(time_text_embed|time_in|vector_in|guidance_in|t_embedder|y_embedder|timestep_embedder)"
              r"(\.|$)", "w8a8"),
)
_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock", "BasicTransformerBlock",
           "DoubleStreamBlock", "SingleStreamBlock", "JointBlock")

FLUX = register_profile(ModelProfile(
    name="flux", matches=class_named("FluxTransformer2DModel"), priority=20,
    edge_rules=_EDGES, structural_edges=False, block_types=_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), timestep_scale=1000.0, prediction="flow", channel_dim=-1,
    description="diffusers Flux transformer: packed tokens, called with sigma in [0, 1]"))

SD3 = register_profile(ModelProfile(
    name="sd3", matches=class_named("SD3Transformer2DModel"), priority=20,
    edge_rules=_EDGES, structural_edges=False, block_types=_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), prediction="flow",
    description="diffusers SD3 transformer: NCHW in and out, called with the timestep 1000*sigma"))

def _comfy_flux_out_channels(model):
    """ComfyUI's Flux keeps ``out_channels = params.out_channels * patch_size ** 2`` (its packed tokens) and
    returns the unpatchified NCHW latent with ``params.out_channels`` channels (16)."""
    oc = getattr(getattr(model, "params", None), "out_channels", None)
    return oc if isinstance(oc, int) and not isinstance(oc, bool) else None


COMFY_FLUX = register_profile(ModelProfile(
    name="comfy-flux", matches=class_named("Flux"), priority=20,
    edge_rules=_EDGES, structural_edges=False, block_types=_BLOCKS, timestep_kwargs=("timesteps", "timestep"),
    sample_kwargs=("x",), timestep_scale=1000.0, prediction="flow", out_channels=_comfy_flux_out_channels,
    description="ComfyUI's Flux (NCHW latents; model_sampling.timestep(sigma) = sigma in [0, 1])"))

TIMESTEP_DIT = register_profile(ModelProfile(
    name="dit", matches=class_named("DiTTransformer2DModel", "PixArtTransformer2DModel"), priority=20,
    edge_rules=_EDGES, structural_edges=False, block_types=_BLOCKS, timestep_kwargs=("timestep", "timesteps"),
    sample_kwargs=("hidden_states", "x"),
    description="transformers called with a timestep in [0, T) (DiT, PixArt)"))
