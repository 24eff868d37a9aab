"""Zoo entry ``dit_flow``: a diffusion transformer of the Flux family (diffusers ``FluxTransformer2DModel`` at
tiny dimensions: 2 double-stream (MM-DiT) blocks, 4 single-stream blocks, width 64, 4 heads, 3-axis RoPE),
trained with rectified flow on the 4x8x8 latents of the shapes VAE shared with ``latent_text`` (latents packed
2x2 into 16 tokens of 16 channels, as the Flux pipeline does), conditioned on prompts through a word-level
text encoder trained here (its hidden states are the ``encoder_hidden_states``, its BOS output the
``pooled_projections``). Classifier-free guidance with the empty prompt, one batched call.

Flow convention: ``x_s = (1 - s) x0 + s noise``, the model predicts the velocity ``noise - x0``; sampling is
Euler over ``sigmas = linspace(1, 0, steps + 1)``. As in the diffusers Flux pipeline the transformer receives
``timestep = s`` in [0, 1] (it multiplies by 1000 inside), so per-timestep tables of a quantizer see sigma.

What differs for quantization: Linear layers only (no convolution), adaLN modulation Linears fed by the
timestep/pooled-text embedding, joint text-image attention (text tokens pass through the quantized blocks
too), a velocity target. Metric: the shapes attribute classifier (see ``latent_text``).
Retrain: ``python -m lowbit.models.zoo.train_dit_flow`` (after ``train_latent_text``, whose VAE it uses).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import ZooModel
from .common import DIR, build_text_encoder, check_config, flow_sigmas, read_file_with_header, sub_state, unwrap
from .latent_text import ShapesData, prompts_for
from .shapes import NUM_COMBOS

WEIGHTS_PATH = DIR / "dit_flow.safetensors"
TYPE_MODEL = "lowbit.models.zoo.DiTFlow"
RETRAIN = "python -m lowbit.models.zoo.train_dit_flow"

TRANSFORMER_CONFIG = {
    "patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
    "num_attention_heads": 4, "joint_attention_dim": 64, "pooled_projection_dim": 64, "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}
_KEYS = {"patch_size": int, "in_channels": int, "out_channels": int, "num_layers": int, "num_single_layers": int,
         "attention_head_dim": int, "num_attention_heads": int, "joint_attention_dim": int,
         "pooled_projection_dim": int, "guidance_embeds": bool, "axes_dims_rope": list}
LATENT_SHAPE = (4, 8, 8)


def build_transformer(cfg: dict):
    from diffusers import FluxTransformer2DModel

    cfg = check_config(cfg, _KEYS, "dit_flow transformer")
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]`` (the Flux pipeline's 2x2 packing)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, c: int = 4, h: int = 8, w: int = 8) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int = 8, w: int = 8) -> torch.Tensor:
    """``[(H/2)(W/2), 3]`` RoPE positions (0, row, column) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class DiTFlowModel(ZooModel):
    name = "dit_flow"
    prediction = "flow"
    num_classes = NUM_COMBOS
    default_steps = 25
    default_guidance = 3.0

    def __init__(self, directory=None):
        d = Path(directory) if directory is not None else DIR
        state, head = read_file_with_header(d / WEIGHTS_PATH.name, TYPE_MODEL, RETRAIN)
        tr = build_transformer(head["transformer_config"])
        tr.load_state_dict(sub_state(state, "transformer."), strict=True)
        super().__init__(tr)
        self.text_encoder = build_text_encoder(head["text_config"], sub_state(state, "text."))
        self.shift = float(head["sampling"]["shift"])
        self.shapes = ShapesData(d)
        self.img_ids = image_ids()
        self.txt_ids = torch.zeros(self.text_encoder.config["max_len"], 3)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        return self.text_encoder(self.text_encoder.tokenize(prompts))

    def sample(self, denoiser, n: int, seed: int, steps: int = 25, guidance: float | None = None,
               sampler: str = "euler", eta: float = 1.0, var_fn=None, report=None, vsc: bool = True):
        """``sampler``: "euler" (default) or "euler_ancestral" (ComfyUI's rectified-flow form, ``eta``; its noise
        continues the seed's generator); ``var_fn(sigma)``: PTQD residual variance for VSC (``vsc``) and the
        per-step ``report`` (``quant.sampling.sample_flow``)."""
        from ...quant.sampling import sample_flow

        g = self.default_guidance if guidance is None else float(guidance)
        gen = torch.Generator().manual_seed(int(seed))
        x = pack(torch.randn((n,) + LATENT_SHAPE, generator=gen))
        labels = self.labels_for(n)
        hc, pc = self.encode_prompts(prompts_for(labels))
        hu, pu = self.encode_prompts([""] * n)
        if g != 1.0:
            hc, pc = torch.cat([hc, hu]), torch.cat([pc, pu])
        sig = flow_sigmas(steps, self.shift)

        def v_fn(x, s):
            xin = x if g == 1.0 else torch.cat([x, x])
            v = unwrap(denoiser(xin, timestep=torch.full((xin.shape[0],), s), encoder_hidden_states=hc,
                                pooled_projections=pc, img_ids=self.img_ids, txt_ids=self.txt_ids)).float()
            if g != 1.0:
                c, u = v.chunk(2)
                v = u + g * (c - u)
            return v

        with torch.no_grad():
            x = sample_flow(v_fn, x, sig, method=sampler, eta=eta, var_fn=var_fn, gen=gen, report=report,
                            vsc=vsc)
        return self.shapes.decode(unpack(x)), labels

    def heldout(self):
        return self.shapes.heldout

    def features(self, images):
        return self.shapes.features(images)

    def metrics(self, images, labels) -> dict:
        return self.shapes.metrics(images, labels)


def build(directory=None) -> DiTFlowModel:
    return DiTFlowModel(directory)
