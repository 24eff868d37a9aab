"""Tiny random diffusers denoisers, one per architecture a user may bring, each with the calls its pipeline makes.

``ARCHS[name]`` is an ``Arch``: ``build()`` gives the float model (a few hundred K parameters at most), ``inputs(g, t)``
one call's (args, kwargs) at timestep ``t`` on the [0, 1000) scale, made the way the class's diffusers pipeline calls
it (classifier-free guidance as one batch of 2 where the pipeline does that; sigma in [0, 1] where it passes sigma).
Used by ``test_architectures.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CALIB_TS = (950, 700, 400, 100)  # calibration timesteps on the [0, 1000) scale
EVAL_T = 550  # a timestep between the calibration ones


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator, float], tuple]  # (g, t in [0, 1000)) -> (args, kwargs)
    standalone: bool = True  # load_model(path) rebuilds it from the file alone (io.ARCH_CLASSES)


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _tt(t, b):
    return torch.full((b,), float(t))


# ----------------------------------------------------------------------------------------------- UNets
def _unet2d_uncond():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def _unet2d_uncond_in(g, t):  # DDPMPipeline: unet(image, t) with a scalar-like timestep
    return (_r(g, 2, 3, 8, 8), torch.tensor(int(t))), {}


def _ncsnpp():  # score-SDE VE (NCSN++): fourier time embedding, called with sigma
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       time_embedding_type="fourier")


def ncsnpp_sigma(t):
    """ScoreSdeVePipeline's sigma at ``t`` of [0, 1000): geometric over the score-sde-ve profile's range."""
    from lowbit.quant.profiles.score_sde import SIGMA_MAX, SIGMA_MIN

    return SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** (t / 1000)


def _ncsnpp_in(g, t):  # ScoreSdeVePipeline: unet(x0 + sigma * z, sigma) (the model divides its output by sigma)
    sigma = ncsnpp_sigma(t)
    return (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1 + sigma * _r(g, 2, 3, 8, 8), _tt(sigma, 2)), {}


def _unet2d_class():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       class_embed_type="timestep")


def _unet2d_class_in(g, t):
    return (_r(g, 2, 3, 8, 8), _tt(t, 2)), dict(class_labels=torch.tensor([3, 7]))


def _sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


def _sd15_in(g, t):  # StableDiffusionPipeline: CFG as one batch of 2 (uncond, cond)
    x = _r(g, 1, 4, 8, 8)
    return (torch.cat([x, x]), torch.tensor(float(t))), dict(encoder_hidden_states=_r(g, 2, 6, 16), return_dict=False)


def _sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)


def _sdxl_in(g, t):  # StableDiffusionXLPipeline: text_embeds (pooled) and time_ids in added_cond_kwargs
    x = _r(g, 1, 4, 8, 8)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    return (torch.cat([x, x]), torch.tensor(float(t))), dict(
        encoder_hidden_states=_r(g, 2, 6, 16), added_cond_kwargs=dict(text_embeds=_r(g, 2, 8), time_ids=ids),
        timestep_cond=None, cross_attention_kwargs=None, return_dict=False)


def _lcm():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=8)


def _guidance_embedding(w, dim):  # LatentConsistencyModelPipeline.get_guidance_scale_embedding
    w = w * 1000.0
    half = dim // 2
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def _lcm_in(g, t):  # LCM: no CFG batch; the guidance scale enters as timestep_cond
    return (_r(g, 1, 4, 8, 8), torch.tensor(int(t))), dict(
        timestep_cond=_guidance_embedding(torch.tensor([7.5 - 1]), 8), encoder_hidden_states=_r(g, 1, 6, 16),
        return_dict=False)


# ----------------------------------------------------------------------------------------------- transformers
def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)


def _sd3_in(g, t):  # StableDiffusion3Pipeline: timestep = 1000 * sigma, expanded to the CFG batch
    x = _r(g, 1, 4, 8, 8)
    return (), dict(hidden_states=torch.cat([x, x]), timestep=_tt(t, 2), encoder_hidden_states=_r(g, 2, 6, 16),
                    pooled_projections=_r(g, 2, 16), joint_attention_kwargs=None, return_dict=False)


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _flux_ids():
    img = torch.zeros(4, 4, 3)
    img[..., 1] += torch.arange(4)[:, None]
    img[..., 2] += torch.arange(4)[None, :]
    return img.reshape(16, 3), torch.zeros(6, 3)


def _flux_in(g, t):  # FluxPipeline (dev): packed 2x2 latents, sigma = t / 1000, guidance, no CFG batch
    img_ids, txt_ids = _flux_ids()
    return (), dict(hidden_states=_r(g, 1, 16, 16), timestep=_tt(t / 1000.0, 1), guidance=torch.full((1,), 3.5),
                    pooled_projections=_r(g, 1, 16), encoder_hidden_states=_r(g, 1, 6, 16), txt_ids=txt_ids,
                    img_ids=img_ids, joint_attention_kwargs=None, return_dict=False)


def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=16, sample_size=8,
                                    patch_size=2)


def _pixart_in(g, t):  # PixArtAlphaPipeline: CFG batch, resolution/aspect ratio None below 1024 px
    x = _r(g, 1, 4, 8, 8)
    return (), dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_r(g, 2, 6, 16),
                    encoder_attention_mask=torch.ones(2, 6), timestep=_tt(t, 2),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def _dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _dit_in(g, t):  # DiTPipeline: CFG batch with the null class (= num_classes)
    x = _r(g, 1, 4, 8, 8)
    return (torch.cat([x, x]),), dict(timestep=_tt(t, 2), class_labels=torch.tensor([3, 10]))


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)


def _sana_in(g, t):  # SanaPipeline: flow matching with timestep = 1000 * sigma, CFG batch, text mask
    x = _r(g, 1, 4, 8, 8)
    return (), dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_r(g, 2, 6, 16),
                    encoder_attention_mask=torch.ones(2, 6), timestep=_tt(t, 2), return_dict=False)


def _sana_sprint():  # Sana Sprint: the Sana transformer with a guidance embedding
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1,
                                  guidance_embeds=True, qk_norm="rms_norm_across_heads")


def _sana_sprint_in(g, t):  # SanaSprintPipeline: the SCM timestep in [0, 1] (1 = noise), a guidance scale, no CFG batch
    return (), dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 6, 16),
                    encoder_attention_mask=torch.ones(1, 6), guidance=torch.full((1,), 0.45), timestep=_tt(t / 1000, 1),
                    return_dict=False)


def _cascade():
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=8, patch_size=1, conditioning_dim=16,
        block_out_channels=(16, 16), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        clip_text_in_channels=16, clip_text_pooled_in_channels=16, clip_image_in_channels=16, clip_seq=2,
        effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=3, dropout=(0.0, 0.0), self_attn=True,
        timestep_conditioning_type=("sca", "crp"), switch_level=(False,))


def _cascade_in(g, t):  # StableCascade prior / decoder pipelines: timestep_ratio = t / T, CFG batch
    x = _r(g, 1, 4, 8, 8)
    return (), dict(sample=torch.cat([x, x]), timestep_ratio=_tt(t / 1000, 2), clip_text_pooled=_r(g, 2, 1, 16),
                    clip_text=_r(g, 2, 6, 16), clip_img=_r(g, 2, 1, 16), return_dict=False)


def _hunyuan():
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                             hidden_size=16, num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16,
                             pooled_projection_dim=16, text_len=6, text_len_t5=6)


def _hunyuan_in(g, t):  # HunyuanDiTPipeline: CLIP and T5 texts with masks, image meta size, style, rotary embedding
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    x = _r(g, 1, 4, 8, 8)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return (), dict(hidden_states=torch.cat([x, x]), timestep=_tt(t, 2), encoder_hidden_states=_r(g, 2, 6, 16),
                    text_embedding_mask=torch.ones(2, 6, dtype=torch.long), encoder_hidden_states_t5=_r(g, 2, 6, 16),
                    text_embedding_mask_t5=torch.ones(2, 6, dtype=torch.long),
                    image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * 2),
                    style=torch.zeros(2, dtype=torch.long),
                    image_rotary_emb=rope, return_dict=False)


def _cogview3():
    from diffusers import CogView3PlusTransformer2DModel

    return CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                          num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=16,
                                          condition_dim=4, pos_embed_max_size=8, sample_size=8)


def _cogview3_in(g, t):  # CogView3PlusPipeline: CFG batch, size/crop conditions
    x = _r(g, 1, 4, 8, 8)
    sz = torch.tensor([[64.0, 64.0]] * 2)
    return (), dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_r(g, 2, 6, 16), timestep=_tt(t, 2),
                    original_size=sz, target_size=sz, crop_coords=torch.zeros(2, 2), return_dict=False)


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                      num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                      pos_embed_max_size=16)


def _auraflow_in(g, t):  # AuraFlowPipeline: timestep = t / 1000 (sigma), CFG batch
    x = _r(g, 1, 4, 8, 8)
    return (), dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_r(g, 2, 6, 16),
                    timestep=_tt(t / 1000.0, 2), return_dict=False)


def _lumina_next():
    from diffusers import LuminaNextDiT2DModel

    m = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                             num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=16,
                             learn_sigma=True)
    with torch.no_grad():  # diffusers leaves it as torch.empty (memory garbage, NaN at times); a checkpoint sets it
        m.pad_token.normal_()
    return m


def _lumina_next_in(g, t):  # LuminaText2ImgPipeline: timestep 1 - t/1000 (reversed), CFG batch, complex rotary table
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    x = _r(g, 1, 4, 8, 8)
    rope = get_2d_rotary_pos_embed_lumina(16, 16, 16, linear_factor=1.0, ntk_factor=1.0)
    return (), dict(hidden_states=torch.cat([x, x]), timestep=_tt(1 - t / 1000.0, 2),
                    encoder_hidden_states=_r(g, 2, 6, 16), encoder_mask=torch.ones(2, 6, dtype=torch.bool),
                    image_rotary_emb=rope, cross_attention_kwargs={"base_sequence_length": 16}, return_dict=False)


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                                     num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                     axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)


def _lumina2_in(g, t):  # Lumina2Pipeline: timestep 1 - t/1000; the pipeline calls cond and uncond separately
    return (), dict(hidden_states=_r(g, 1, 4, 8, 8), timestep=_tt(1 - t / 1000.0, 1),
                    encoder_hidden_states=_r(g, 1, 6, 16), encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
                    return_dict=False)


def _chroma():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
                                    approximator_layers=1)


def _chroma_in(g, t):  # ChromaPipeline: Flux's packed tokens, sigma = t / 1000, no guidance input
    img_ids, txt_ids = _flux_ids()
    return (), dict(hidden_states=_r(g, 1, 16, 16), timestep=_tt(t / 1000.0, 1), encoder_hidden_states=_r(g, 1, 6, 16),
                    txt_ids=txt_ids, img_ids=img_ids, attention_mask=None, joint_attention_kwargs=None,
                    return_dict=False)


def _qwenimage():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4))


def _qwenimage_in(g, t):  # QwenImagePipeline: packed latents, sigma = t / 1000, cond and uncond called separately
    return (), dict(hidden_states=_r(g, 1, 16, 16), timestep=_tt(t / 1000.0, 1), guidance=None,
                    encoder_hidden_states_mask=torch.ones(1, 6), encoder_hidden_states=_r(g, 1, 6, 16),
                    img_shapes=[[(1, 4, 4)]], attention_kwargs=None, return_dict=False)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def _wan_in(g, t):  # WanPipeline: video latents [B, C, F, H, W], timestep in [0, 1000), cond and uncond separately
    return (), dict(hidden_states=_r(g, 1, 4, 2, 8, 8), timestep=_tt(t, 1), encoder_hidden_states=_r(g, 1, 6, 16),
                    return_dict=False)


def _zimage():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                                    axes_lens=[64, 32, 32])


def _zimage_in(g, t):  # ZImagePipeline: per-sample lists of [C, 1, H, W] latents and captions, t = (1000 - t) / 1000
    x = [_r(g, 4, 1, 8, 8) for _ in range(2)]
    caps = [_r(g, 6, 32) for _ in range(2)]
    return (x, _tt((1000 - t) / 1000.0, 2), caps), dict(return_dict=False)


# ----------------------------------------------------------------------------------------------- found by audit
def _kandinsky22():  # Kandinsky 2.2 decoder: image embeddings projected (diffusers casts them to the projection's
    # weight dtype: a deployed layer's weight stand-in must say float) and added to the time embedding
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=8, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, addition_embed_type="image",
                                encoder_hid_dim=12, encoder_hid_dim_type="image_proj", cross_attention_dim=16,
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=4)


def _kandinsky22_in(g, t):  # KandinskyV22Pipeline: no text states, image_embeds in added_cond_kwargs, CFG batch
    x = _r(g, 1, 4, 8, 8)
    return (), dict(sample=torch.cat([x, x]), timestep=torch.tensor(int(t)), encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": _r(g, 2, 12)}, return_dict=False)


def _animatediff():  # AnimateDiff: its motion modules call proj_in(input=...) by keyword
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = _sd15()
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8)
    assert isinstance(unet, UNet2DConditionModel)
    return UNetMotionModel.from_unet2d(unet, adapter)


def _animatediff_in(g, t):  # AnimateDiffPipeline: [B, C, F, H, W], CFG batch, prompt states repeated per frame
    x = _r(g, 1, 4, 2, 8, 8)
    return (torch.cat([x, x]), torch.tensor(float(t))), dict(
        encoder_hidden_states=_r(g, 2, 6, 16).repeat_interleave(2, dim=0), return_dict=False)


def _mochi():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                   pooled_projection_dim=16, in_channels=4, out_channels=4, text_embed_dim=16,
                                   time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)


def _mochi_in(g, t):  # MochiPipeline: the transformer gets 1000 - t (reversed), CFG batch
    x = _r(g, 1, 4, 2, 8, 8)
    return (), dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=_r(g, 2, 6, 16), timestep=_tt(1000 - t, 2),
                    encoder_attention_mask=torch.ones(2, 6), return_dict=False)


def _svd():
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, cross_attention_dim=16, num_attention_heads=(2, 4))


def _svd_in(g, t):  # StableVideoDiffusionPipeline: 0.25 * ln(sigma) (sigma log-linear in t over [0.002, 700]),
    # [B, F, C, H, W] with the image latents concatenated on C, CFG batch, added_time_ids
    import math

    sigma = 700.0 ** (t / 1000) * 0.002 ** (1 - t / 1000)
    x = _r(g, 1, 2, 8, 8, 8)
    return (torch.cat([x, x]), torch.tensor(0.25 * math.log(sigma))), dict(
        encoder_hidden_states=_r(g, 2, 1, 16), added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2),
        return_dict=False)


def _cosmos():
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24,
                                    num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8,
                                    max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
                                    concat_padding_mask=False, extra_pos_embed_type="learnable")


def _cosmos_in(g, t):  # CosmosTextToWorldPipeline: EDM timesteps 0.25 * ln(sigma), sigma log-linear over [0.002, 80]
    import math

    sigma = 80.0 ** (t / 1000) * 0.002 ** (1 - t / 1000)
    return (), dict(hidden_states=_r(g, 1, 4, 2, 8, 8), timestep=_tt(0.25 * math.log(sigma), 1),
                    encoder_hidden_states=_r(g, 1, 6, 16), fps=30, padding_mask=torch.zeros(1, 1, 8, 8),
                    return_dict=False)


ARCHS = {a.name: a for a in (
    Arch("unet2d", _unet2d_uncond, _unet2d_uncond_in),
    Arch("unet2d-class", _unet2d_class, _unet2d_class_in),
    Arch("ncsnpp", _ncsnpp, _ncsnpp_in),
    Arch("sd15", _sd15, _sd15_in),
    Arch("sdxl", _sdxl, _sdxl_in),
    Arch("lcm", _lcm, _lcm_in),
    Arch("sd3", _sd3, _sd3_in),
    Arch("flux", _flux, _flux_in),
    Arch("pixart", _pixart, _pixart_in),
    Arch("dit", _dit, _dit_in),
    Arch("sana", _sana, _sana_in),
    Arch("sana-sprint", _sana_sprint, _sana_sprint_in),
    Arch("stable-cascade", _cascade, _cascade_in, standalone=False),
    Arch("hunyuan", _hunyuan, _hunyuan_in),
    Arch("cogview3", _cogview3, _cogview3_in),
    Arch("auraflow", _auraflow, _auraflow_in),
    Arch("lumina-next", _lumina_next, _lumina_next_in),
    Arch("lumina2", _lumina2, _lumina2_in),
    Arch("chroma", _chroma, _chroma_in, standalone=False),
    Arch("qwenimage", _qwenimage, _qwenimage_in, standalone=False),
    Arch("wan", _wan, _wan_in, standalone=False),
    Arch("zimage", _zimage, _zimage_in, standalone=False),
    Arch("kandinsky22", _kandinsky22, _kandinsky22_in),
    Arch("animatediff", _animatediff, _animatediff_in, standalone=False),
    Arch("mochi", _mochi, _mochi_in, standalone=False),
    Arch("svd", _svd, _svd_in, standalone=False),
    Arch("cosmos", _cosmos, _cosmos_in, standalone=False),
)}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[name].build().eval().requires_grad_(False)


def record(model, name: str, ts=CALIB_TS, seed: int = 1):
    """Calibration calls: one model call per timestep, recorded by ``CallRecorder``."""
    from lowbit.quant import CallRecorder

    g = torch.Generator().manual_seed(seed)
    with CallRecorder(model) as rec, torch.no_grad():
        for t in ts:
            args, kwargs = ARCHS[name].inputs(g, t)
            model(*args, **kwargs)
    return rec.calls
