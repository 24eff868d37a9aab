"""Zoo entry ``latent_text``: the Stable Diffusion structure in miniature. A text-conditioned
``UNet2DConditionModel`` (conv_in on 4x8x8 latents, self- and cross-attention transformer blocks with linear
projections and GEGLU feed-forward, SD's scaled-linear betas, epsilon prediction) over a small
``AutoencoderKL`` (3x16x16 images <-> 4x8x8 latents) and a word-level text encoder, all trained here on
procedural captioned shapes ("red circle top left", ``shapes.py``). Classifier-free guidance with the empty
prompt, conditional and unconditional halves in one batched call.

What differs for quantization: latent inputs (no [-1, 1] range), cross-attention K/V projections fed by the
text encoder (constant over the steps), attention and GEGLU Linear layers next to the convolutions, CFG.
Metric: FID in the feature space of an attribute classifier (colour / shape / position heads) trained here,
against 480 held-out rendered images; ``acc`` = all three attributes of the prompt correct.
Files: ``latent_text.safetensors`` (UNet + text encoder), ``shapes_vae.safetensors`` (VAE, shared with
``dit_flow``), ``shapes_eval.safetensors`` (classifier + held-out images, shared with ``dit_flow``).
Retrain: ``python -m lowbit.models.zoo.train_latent_text``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import ZooModel
from .common import DIR, alphas_cumprod, build_featurenet, build_text_encoder, check_config, ddim_sample, features, \
    frechet, predictions, read_file_with_header, sub_state, unwrap
from .shapes import NUM_COMBOS, attributes, caption

WEIGHTS_PATH = DIR / "latent_text.safetensors"
VAE_PATH = DIR / "shapes_vae.safetensors"
EVAL_PATH = DIR / "shapes_eval.safetensors"
TYPE_MODEL = "lowbit.models.zoo.LatentText"
TYPE_VAE = "lowbit.models.zoo.ShapesVAE"
TYPE_EVAL = "lowbit.models.zoo.ShapesEval"
RETRAIN = "python -m lowbit.models.zoo.train_latent_text"

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 16,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
}
UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 64,
    "attention_head_dim": 4, "norm_num_groups": 16, "use_linear_projection": True,
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "prediction_type": "epsilon"}

_VAE_KEYS = {"in_channels": int, "out_channels": int, "latent_channels": int, "sample_size": int,
             "down_block_types": list, "up_block_types": list, "block_out_channels": list, "layers_per_block": int,
             "norm_num_groups": int, "scaling_factor": float}
_UNET_KEYS = {"sample_size": int, "in_channels": int, "out_channels": int, "down_block_types": list,
              "up_block_types": list, "block_out_channels": list, "layers_per_block": int,
              "cross_attention_dim": int, "attention_head_dim": int, "norm_num_groups": int,
              "use_linear_projection": bool}
_BLOCKS = {"DownEncoderBlock2D", "UpDecoderBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D",
           "CrossAttnUpBlock2D"}


def _check_blocks(cfg, what):
    if not set(cfg.get("down_block_types", [])) | set(cfg.get("up_block_types", [])) <= _BLOCKS:
        raise ValueError(f"{what}: block types must be among {sorted(_BLOCKS)}")
    return cfg


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_check_blocks(check_config(cfg, _VAE_KEYS, "shapes VAE"), "shapes VAE"))


def build_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_check_blocks(check_config(cfg, _UNET_KEYS, "latent_text UNet"), "latent_text UNet"))


class ShapesData:
    """The parts shared by ``latent_text`` and ``dit_flow``: VAE, attribute classifier, held-out images."""

    def __init__(self, directory=None):
        d = Path(directory) if directory is not None else DIR
        vs, vh = read_file_with_header(d / VAE_PATH.name, TYPE_VAE, RETRAIN)
        self.vae = build_vae(vh["vae_config"])
        self.vae.load_state_dict(vs, strict=True)
        self.vae.eval().requires_grad_(False)
        self.scaling_factor = float(vh["vae_config"]["scaling_factor"])
        ev, eh = read_file_with_header(d / EVAL_PATH.name, TYPE_EVAL, RETRAIN)
        self.classifier = build_featurenet(eh["classifier_config"], sub_state(ev, "classifier."))
        self.heldout = (ev["heldout_images"].float(), ev["heldout_labels"].long())
        self.ref = features(self.classifier, self.heldout[0])

    @torch.no_grad()
    def decode(self, latents):
        return self.vae.decode(latents.float() / self.scaling_factor).sample.clamp(-1, 1)

    def features(self, images):
        return features(self.classifier, images)

    def metrics(self, images, labels) -> dict:
        pred = predictions(self.classifier, images)
        ok = pred == attributes(labels)
        return {"fid": frechet(features(self.classifier, images), self.ref), "acc": float(ok.all(1).float().mean()),
                "acc_color": float(ok[:, 0].float().mean()), "acc_shape": float(ok[:, 1].float().mean()),
                "acc_position": float(ok[:, 2].float().mean())}


def prompts_for(labels) -> list:
    return [caption(int(c)) for c in labels]


class LatentTextModel(ZooModel):
    name = "latent_text"
    prediction = "epsilon"
    num_classes = NUM_COMBOS  # combination ids; the prompt of id c is ``shapes.caption(c)``
    default_steps = 25
    default_guidance = 3.0
    latent_shape = (4, 8, 8)

    def __init__(self, directory=None):
        d = Path(directory) if directory is not None else DIR
        state, head = read_file_with_header(d / WEIGHTS_PATH.name, TYPE_MODEL, RETRAIN)
        unet = build_unet(head["unet_config"])
        unet.load_state_dict(sub_state(state, "unet."), strict=True)
        super().__init__(unet)
        self.text_encoder = build_text_encoder(head["text_config"], sub_state(state, "text."))
        sched = head["schedule"]
        self.acp = alphas_cumprod(sched["beta_schedule"], sched["num_train_timesteps"], sched["beta_start"],
                                  sched["beta_end"])
        self.shapes = ShapesData(d)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        return self.text_encoder(self.text_encoder.tokenize(prompts))[0]

    def sample(self, denoiser, n: int, seed: int, steps: int = 25, guidance: float | None = None):
        g = self.default_guidance if guidance is None else float(guidance)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn((n,) + self.latent_shape, generator=gen)
        labels = self.labels_for(n)
        cond = self.encode_prompts(prompts_for(labels))
        uncond = self.encode_prompts([""] * n)

        def call(x, t):
            if g == 1.0:
                return unwrap(denoiser(x, torch.full((n,), t, dtype=torch.long), encoder_hidden_states=cond))
            out = unwrap(denoiser(torch.cat([x, x]), torch.full((2 * n,), t, dtype=torch.long),
                                  encoder_hidden_states=torch.cat([cond, uncond])))
            c, u = out.float().chunk(2)
            return u + g * (c - u)

        lat = ddim_sample(call, x, self.acp, steps, self.prediction, clip=None)
        return self.shapes.decode(lat), labels

    def heldout(self):
        return self.shapes.heldout

    def features(self, images):
        return self.shapes.features(images)

    def metrics(self, images, labels) -> dict:
        return self.shapes.metrics(images, labels)


def build(directory=None) -> LatentTextModel:
    return LatentTextModel(directory)
