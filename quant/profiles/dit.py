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
from . import ModelProfile, class_named, config_value, register_profile

_EDGES = (
    LayerRule(r"(^|\.)(x_embedder|img_in|pos_embed\.proj|context_embedder|txt_in)$", "w8a8"),
    # (diffusers' DiT: proj_out_1 is the final adaLN modulation, proj_out_2 the output projection.) The model's own
    # output layers only, not a numbered block's: diffusers' Flux names each single block's output Linear
    # ``single_transformer_blocks.N.proj_out`` (ComfyUI's ``linear2``), which is a block layer at the target bits.
    LayerRule(r"(^|\.)(?<!\d\.)(proj_out(_[12])?|final_layer\.linear|norm_out\.linear|"
              r"final_layer\.adaLN_modulation\.\d+)$", "w8a8"),
    LayerRule(r"(^|\.)(time_text_embed|time_in|vector_in|guidance_in|t_embedder|y_embedder|timestep_embedder)"
              r"(\.|$)", "w8a8"),
)
_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock", "BasicTransformerBlock",
           "DoubleStreamBlock", "SingleStreamBlock", "JointBlock")

FLUX = register_profile(ModelProfile(
    name="flux", matches=class_named("FluxTransformer2DModel", "FluxControlNetModel"), priority=20,
    edge_rules=_EDGES, structural_edges=False, block_types=_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), timestep_scale=1000.0, prediction="flow", channel_dim=-1,
    act_epilogues=(("FluxSingleTransformerBlock", "proj_mlp", "act_mlp"),),
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

# Text-to-image DiTs with their own layer names (each listed class checked with a tiny random model in
# tests/quant/test_architectures.py): Sana (``patch_embed``, ``time_embed``, ``caption_projection``), HunyuanDiT
# (``text_embedder``, ``time_extra_emb``), CogView3Plus/CogView4 (``patch_embed.{proj,text_proj}``,
# ``time_condition_embed``), AuraFlow (``time_step_proj``); all unpatchify to NCHW.
_T2I_EDGES = _EDGES + (
    LayerRule(r"(^|\.)patch_embed\.(proj|text_proj)$", "w8a8"),
    LayerRule(r"(^|\.)(time_embed|caption_projection|text_embedder|time_extra_emb|time_condition_embed|"
              r"time_step_proj)(\.|$)", "w8a8"),
)
_T2I_BLOCKS = ("SanaTransformerBlock", "HunyuanDiTBlock", "CogView3PlusTransformerBlock", "CogView4TransformerBlock",
               "AuraFlowJointTransformerBlock", "AuraFlowSingleTransformerBlock")

T2I_DIT = register_profile(ModelProfile(
    name="t2i-dit", priority=20,
    matches=class_named("SanaTransformer2DModel", "HunyuanDiT2DModel", "CogView3PlusTransformer2DModel",
                        "CogView4Transformer2DModel"),
    edge_rules=_T2I_EDGES, structural_edges=False, block_types=_T2I_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",),
    description="Sana, HunyuanDiT, CogView3Plus/4 transformers: called with a timestep in [0, T) (Sana: 1000*sigma)"))

def _sana_sprint(model) -> bool:
    """Sana Sprint: the Sana transformer with a guidance embedding, called by SanaSprintPipeline with its SCM timestep
    in [0, 1] (1 = noise); plain Sana pipelines pass 1000 * sigma (``t2i-dit``)."""
    return class_named("SanaTransformer2DModel")(model) and bool(config_value(model, "guidance_embeds"))


SANA_SPRINT = register_profile(ModelProfile(
    name="sana-sprint", priority=25, matches=_sana_sprint,
    edge_rules=_T2I_EDGES, structural_edges=False, block_types=_T2I_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), timestep_scale=1000.0, replaces="t2i-dit",
    description="Sana Sprint transformer (guidance_embeds): called with a timestep in [0, 1] (found by audit: every "
                "step in one table entry under t2i-dit)"))

AURAFLOW = register_profile(ModelProfile(
    name="auraflow", matches=class_named("AuraFlowTransformer2DModel"), priority=20,
    edge_rules=_T2I_EDGES, structural_edges=False, block_types=_T2I_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), timestep_scale=1000.0, prediction="flow",
    description="AuraFlow transformer: NCHW, called with sigma = t / 1000 in [0, 1]"))

LUMINA = register_profile(ModelProfile(
    name="lumina", matches=class_named("LuminaNextDiT2DModel", "Lumina2Transformer2DModel"), priority=20,
    edge_rules=_T2I_EDGES + (
        LayerRule(r"(^|\.)patch_embedder\.proj$", "w8a8"),
        LayerRule(r"(^|\.)norm_out\.linear_\d+$", "w8a8"),
        LayerRule(r"(^|\.)time_caption_embed(\.|$)", "w8a8"),
    ), structural_edges=False, block_types=("LuminaNextDiTBlock", "Lumina2TransformerBlock"),
    timestep_kwargs=("timestep",), sample_kwargs=("hidden_states",), timestep_scale=-1000.0, timestep_offset=1000.0,
    description="Lumina-Next / Lumina 2 transformers: NCHW, called with 1 - t/1000 in [0, 1] (reversed)"))

# Packed-token transformers of the Flux lineage whose diffusers pipelines pass sigma = t / 1000 in [0, 1] (each
# pipeline's ``timestep / 1000``): under the generic profile their per-timestep tables were all keyed within [0, 1],
# one bin for every step (found by audit). Chroma, Flux.2 and LongCat/Ovis-Image keep Flux's layer names; Qwen-Image
# uses img_in / txt_in / time_text_embed. The classes are matched by name (no import).
_SIGMA_EDGES = _EDGES + (
    LayerRule(r"(^|\.)(distilled_guidance_layer|time_guidance_embed|guidance_embedder)(\.|$)", "w8a8"),
)
_SIGMA_BLOCKS = _BLOCKS + ("ChromaTransformerBlock", "ChromaSingleTransformerBlock", "Flux2TransformerBlock",
                           "Flux2SingleTransformerBlock", "QwenImageTransformerBlock",
                           "LongCatImageTransformerBlock", "LongCatImageSingleTransformerBlock",
                           "OvisImageTransformerBlock", "OvisImageSingleTransformerBlock")

def _token_channels(model):
    """Channels of the packed output tokens: the output projection's width (patch_size**2 * out_channels; Qwen-Image
    patches 2x2, so its config's out_channels is a quarter of it)."""
    n = getattr(getattr(model, "proj_out", None), "out_features", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


SIGMA_PACKED = register_profile(ModelProfile(
    name="sigma-packed", priority=20,
    matches=class_named("ChromaTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
                        "QwenImage21Transformer2DModel", "LongCatImageTransformer2DModel",
                        "OvisImageTransformer2DModel", "QwenImageControlNetModel"),
    edge_rules=_SIGMA_EDGES, structural_edges=False, block_types=_SIGMA_BLOCKS, timestep_kwargs=("timestep",),
    sample_kwargs=("hidden_states",), timestep_scale=1000.0, prediction="flow", channel_dim=-1,
    out_channels=_token_channels,
    description="Chroma, Flux.2, Qwen-Image, LongCat-Image, Ovis-Image transformers: packed tokens, called with "
                "sigma in [0, 1]"))

# diffusers' Z-Image (``ZImageTransformer2DModel``): called as ``transformer(x, t, cap_feats)`` with per-sample lists
# of latents [C, F, H, W] and captions, and t = (1000 - timestep) / 1000 (reversed, as Lumina's pipelines); its output
# is a list of per-sample predictions (stacked into a batch by calib.unet_output). Its TimestepEmbedder reads
# ``t_embedder.mlp[0].weight.dtype``: those layers stay float (keep_float).
Z_IMAGE = register_profile(ModelProfile(
    name="z-image", matches=class_named("ZImageTransformer2DModel"), priority=20,
    edge_rules=(LayerRule(r"(^|\.)(all_x_embedder|all_final_layer|cap_embedder|t_embedder)(\.|$)", "w8a8"),),
    structural_edges=False, block_types=("ZImageTransformerBlock",), timestep_kwargs=("t", "timestep"),
    sample_kwargs=("x", "hidden_states"), timestep_scale=-1000.0, timestep_offset=1000.0, prediction="flow",
    keep_float=(r"(^|\.)t_embedder\.mlp\.",),
    description="Z-Image transformer: per-sample lists, called with 1 - t/1000 in [0, 1] (reversed)"))

# diffusers' Mochi (``MochiTransformer3DModel``): its pipeline passes ``1000 - t`` (reversed; found by audit: under the
# generic profile the tables of step t were keyed at 1000 - t, so a BitwidthSchedule or +mixed keyed by timestep hit
# the wrong part of the run). Video latents [B, C, F, H, W]: channels in dim 1.
MOCHI = register_profile(ModelProfile(
    name="mochi", matches=class_named("MochiTransformer3DModel"), priority=20,
    edge_rules=_T2I_EDGES, structural_edges=False, block_types=("MochiTransformerBlock",),
    timestep_kwargs=("timestep",), sample_kwargs=("hidden_states",), timestep_scale=-1.0, timestep_offset=1000.0,
    prediction="flow",
    description="Mochi transformer: video latents, called with 1000 - t (reversed)"))
