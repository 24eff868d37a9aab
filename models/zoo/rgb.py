"""Zoo entry ``rgb``: class-conditional pixel-space ``UNet2DModel`` on 3x16x16 crops of six photos shipped with
scikit-learn / scikit-image (class = source photo, null class 6 for classifier-free guidance).

What differs from ``digits`` for quantization: three colour channels with photo statistics (no flat -1
background), no attention anywhere, scale-shift (FiLM) time conditioning, cosine betas and
**v-prediction**. Metric: FID in the feature space of a source-photo classifier trained here, against 600
held-out crops, and the accuracy of that classifier on the samples' intended photo.
Retrain: ``python -m lowbit.models.zoo.train_rgb``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import ZooModel
from .common import DIR, alphas_cumprod, build_featurenet, check_config, class_conditional_sample, features, frechet, \
    predictions, read_file_with_header, sub_state

CLASS_NAMES = ("china", "flower", "astronaut", "coffee", "chelsea", "rocket")
WEIGHTS_PATH = DIR / "rgb.safetensors"
EVAL_PATH = DIR / "rgb_eval.safetensors"
TYPE_MODEL = "lowbit.models.zoo.RGB"
TYPE_EVAL = "lowbit.models.zoo.RGBEval"
RETRAIN = "python -m lowbit.models.zoo.train_rgb"

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "add_attention": False,
    "norm_num_groups": 8,
    "resnet_time_scale_shift": "scale_shift",
    "num_class_embeds": len(CLASS_NAMES) + 1,
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
            "clip_sample": True}

_UNET_KEYS = {"sample_size": int, "in_channels": int, "out_channels": int, "block_out_channels": list,
              "layers_per_block": int, "down_block_types": list, "up_block_types": list, "add_attention": bool,
              "norm_num_groups": int, "resnet_time_scale_shift": str, "num_class_embeds": int}
_BLOCKS = {"DownBlock2D", "UpBlock2D", "AttnDownBlock2D", "AttnUpBlock2D"}


def build_unet(cfg: dict):
    from diffusers import UNet2DModel

    cfg = check_config(cfg, _UNET_KEYS, "rgb UNet")
    if not set(cfg.get("down_block_types", [])) | set(cfg.get("up_block_types", [])) <= _BLOCKS:
        raise ValueError(f"rgb UNet: block types must be among {sorted(_BLOCKS)}")
    return UNet2DModel(**cfg)


class RGBModel(ZooModel):
    name = "rgb"
    prediction = "v_prediction"
    num_classes = len(CLASS_NAMES)
    default_steps = 25
    default_guidance = 1.0
    image_shape = (3, 16, 16)

    def __init__(self, directory=None):
        d = Path(directory) if directory is not None else DIR
        state, head = read_file_with_header(d / WEIGHTS_PATH.name, TYPE_MODEL, RETRAIN)
        unet = build_unet(head["unet_config"])
        unet.load_state_dict(state, strict=True)
        super().__init__(unet)
        sched = head["schedule"]
        self.acp = alphas_cumprod(sched["beta_schedule"], sched["num_train_timesteps"])
        self.null_class = int(head["null_class"])
        ev, ev_head = read_file_with_header(d / EVAL_PATH.name, TYPE_EVAL, RETRAIN)
        self.classifier = build_featurenet(ev_head["classifier_config"], sub_state(ev, "classifier."))
        self._heldout = (ev["heldout_images"].float(), ev["heldout_labels"].long())
        self._ref = features(self.classifier, self._heldout[0])

    def sample(self, denoiser, n: int, seed: int, steps: int = 25, guidance: float | None = None):
        return class_conditional_sample(self, denoiser, n, seed, steps, guidance, clip=1.0)

    def heldout(self):
        return self._heldout

    def features(self, images):
        return features(self.classifier, images)

    def metrics(self, images, labels) -> dict:
        fid = frechet(features(self.classifier, images), self._ref)
        acc = float((predictions(self.classifier, images)[:, 0] == torch.as_tensor(labels).long()).float().mean())
        return {"fid": fid, "acc": acc}


def build(directory=None) -> RGBModel:
    return RGBModel(directory)
