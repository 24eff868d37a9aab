"""Embedded default model: a tiny class-conditional DDPM on scikit-learn digits (16x16, 1 channel).

Files next to this module (written by ``python -m lowbit.models.train_digits``):

* ``digits_ddpm.safetensors``       UNet2DModel weights (fp32) + header: UNet config, scheduler config, training.
* ``digits_classifier.safetensors`` DigitClassifier weights (fp32) + header: config, training, held-out accuracy.
* ``digits_heldout.safetensors``    400 held-out real images (``images`` fp16 [400, 1, 16, 16] in [-1, 1],
                                    ``images_8x8`` uint8 raw 0..16, ``labels`` int64) never seen in training.

Every header stores JSON under the metadata key ``"lowbit"`` as ``{"_type", "_version", "_data"}``. Loaders
read it with ``safetensors`` only (no pickle, no scikit-learn), validate the config against an allowlist and
build the module from it.

Class ids 0..9 are the digits; id ``NULL_CLASS`` (10) is the "no label" class used for classifier-free guidance
(the UNet has ``num_class_embeds=11``; trained with 10% label dropout to id 10).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .classifier import DigitClassifier
from .data import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES

__all__ = [
    "DDPM_PATH",
    "CLASSIFIER_PATH",
    "HELDOUT_PATH",
    "UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "NULL_CLASS",
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "load_default_unet",
    "load_classifier",
    "load_heldout",
    "default_scheduler",
    "read_header",
]

_DIR = Path(__file__).resolve().parent
DDPM_PATH = _DIR / "digits_ddpm.safetensors"
CLASSIFIER_PATH = _DIR / "digits_classifier.safetensors"
HELDOUT_PATH = _DIR / "digits_heldout.safetensors"

HEADER_KEY = "lowbit"
FORMAT_VERSION = 1
TYPE_DDPM = "lowbit.models.DigitsDDPM"
TYPE_CLASSIFIER = "lowbit.models.DigitClassifier"
TYPE_HELDOUT = "lowbit.models.DigitsHeldout"

# The architecture of the default UNet (also what the training script builds).
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],  # 16 -> 8 -> 4 (attention at 4x4)
    "mid_block_type": "UNetMidBlock2D",  # ResNet + self-attention + ResNet
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": NUM_CLASSES + 1,  # + the null class for classifier-free guidance
}

# diffusers DDPMScheduler defaults, written out (1000 steps, linear betas, epsilon prediction).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
}

# ------------------------------------------------------------------------------------------- validation
_UNET_BLOCKS = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"}


def _is_int(v, lo=1, hi=4096):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _int_list(v, lo=1, hi=4096):
    return isinstance(v, list) and 1 <= len(v) <= 6 and all(_is_int(x, lo, hi) for x in v)


def _block_list(v):
    return isinstance(v, list) and 1 <= len(v) <= 6 and all(isinstance(x, str) and x in _UNET_BLOCKS for x in v)


_UNET_SCHEMA = {
    "sample_size": lambda v: _is_int(v, 4, 1024),
    "in_channels": lambda v: _is_int(v, 1, 16),
    "out_channels": lambda v: _is_int(v, 1, 16),
    "block_out_channels": _int_list,
    "layers_per_block": lambda v: _is_int(v, 1, 8),
    "down_block_types": _block_list,
    "up_block_types": _block_list,
    "mid_block_type": lambda v: v in ("UNetMidBlock2D", None),
    "norm_num_groups": lambda v: _is_int(v, 1, 256),
    "attention_head_dim": lambda v: _is_int(v, 1, 1024),
    "num_class_embeds": lambda v: _is_int(v, 1, 100000),
    "act_fn": lambda v: v in ("silu", "swish", "mish", "gelu"),
    "time_embedding_type": lambda v: v in ("positional", "fourier"),
    "freq_shift": lambda v: _is_int(v, 0, 10),
    "flip_sin_to_cos": lambda v: isinstance(v, bool),
    "resnet_time_scale_shift": lambda v: v in ("default", "scale_shift"),
    "add_attention": lambda v: isinstance(v, bool),
}

_SCHED_SCHEMA = {
    "num_train_timesteps": lambda v: _is_int(v, 1, 100000),
    "beta_start": lambda v: isinstance(v, float) and 0 < v < 1,
    "beta_end": lambda v: isinstance(v, float) and 0 < v < 1,
    "beta_schedule": lambda v: v in ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "variance_type": lambda v: v in ("fixed_small", "fixed_large"),
    "clip_sample": lambda v: isinstance(v, bool),
    "clip_sample_range": lambda v: isinstance(v, float) and v > 0,
    "prediction_type": lambda v: v in ("epsilon", "v_prediction", "sample"),
}

_CLASSIFIER_SCHEMA = {
    "channels": lambda v: _int_list(v) and len(v) == 2,
    "feature_dim": lambda v: _is_int(v, 1, 4096),
    "num_classes": lambda v: _is_int(v, 2, 1000),
    "image_size": lambda v: _is_int(v, 4, 256) and v % 4 == 0,
    "feature_scale": lambda v: isinstance(v, float) and 0 < v < 1e6,
}


def _validate(cfg, schema: dict, what: str, required=()) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(schema))
    if unknown:
        raise ValueError(f"{what}: unknown config keys {unknown}")
    missing = sorted(set(required) - set(cfg))
    if missing:
        raise ValueError(f"{what}: missing config keys {missing}")
    for k, v in cfg.items():
        if not schema[k](v):
            raise ValueError(f"{what}: invalid value for {k!r}: {v!r}")
    return dict(cfg)


def _validate_unet_config(cfg) -> dict:
    cfg = _validate(cfg, _UNET_SCHEMA, "UNet config",
                    required=("block_out_channels", "down_block_types", "up_block_types"))
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("UNet config: block_out_channels, down_block_types and up_block_types differ in length")
    g = cfg.get("norm_num_groups", 32)
    if any(c % g for c in cfg["block_out_channels"]):
        raise ValueError("UNet config: norm_num_groups must divide every block_out_channels entry")
    return cfg


# ------------------------------------------------------------------------------------------- header IO
def save_with_header(tensors: dict, path, type_name: str, data: dict) -> None:
    """Write ``tensors`` to ``path`` with ``{"_type", "_version", "_data"}`` JSON under metadata key ``lowbit``."""
    header = {"_type": type_name, "_version": FORMAT_VERSION, "_data": data}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    Path(path).chmod(0o644)


def read_header(path, expected_type: str) -> dict:
    """The validated ``_data`` object of a LowBit safetensors header (``_type`` / ``_version`` checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the default model ships with the package (regenerate with "
            "`python -m lowbit.models.train_digits`)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if HEADER_KEY not in meta:
        raise ValueError(f"{path}: no '{HEADER_KEY}' metadata in the safetensors header")
    header = json.loads(meta[HEADER_KEY])
    if not isinstance(header, dict) or header.get("_type") != expected_type:
        raise ValueError(f"{path}: expected _type {expected_type!r}, got {header.get('_type')!r}")
    if header.get("_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported _version {header.get('_version')!r} (expected {FORMAT_VERSION})")
    data = header.get("_data")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: _data must be a JSON object")
    return data


@lru_cache(maxsize=8)
def _cached_header(path: str, expected_type: str) -> str:
    return json.dumps(read_header(path, expected_type))


def _header(path, expected_type) -> dict:
    return json.loads(_cached_header(str(path), expected_type))


# ------------------------------------------------------------------------------------------- loaders
def build_unet(config: dict | None = None):
    """A fresh (randomly initialised) ``UNet2DModel`` from a validated config (default ``UNET_CONFIG``)."""
    import inspect

    from diffusers import UNet2DModel

    cfg = _validate_unet_config(dict(UNET_CONFIG if config is None else config))
    # Older diffusers (Forge pins 0.31) have no `mid_block_type` argument; their only mid block is the
    # same UNetMidBlock2D, so the key is dropped there.
    if "mid_block_type" not in inspect.signature(UNet2DModel.__init__).parameters and \
            cfg.get("mid_block_type") in ("UNetMidBlock2D", None):
        cfg.pop("mid_block_type", None)
    return UNet2DModel(**cfg)


def load_default_unet(path=None):
    """The embedded default ``diffusers.UNet2DModel`` (eval mode, fp32, CPU), built from its header config."""
    path = DDPM_PATH if path is None else Path(path)
    data = _header(path, TYPE_DDPM)
    unet = build_unet(data.get("unet_config"))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    unet.load_state_dict(state, strict=True)
    return unet.eval().requires_grad_(False)


def default_scheduler(path=None):
    """``diffusers.DDPMScheduler`` with the training configuration of the default model."""
    from diffusers import DDPMScheduler

    path = DDPM_PATH if path is None else Path(path)
    cfg = _validate(_header(path, TYPE_DDPM).get("scheduler_config"), _SCHED_SCHEMA, "scheduler config")
    return DDPMScheduler(**cfg)


def load_classifier(path=None) -> DigitClassifier:
    """The digit classifier used for the metrics (eval mode, fp32, CPU)."""
    path = CLASSIFIER_PATH if path is None else Path(path)
    cfg = _validate(_header(path, TYPE_CLASSIFIER).get("config"), _CLASSIFIER_SCHEMA, "classifier config")
    model = DigitClassifier(**cfg)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def load_heldout(path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float32 [400, 1, 16, 16] in [-1, 1], labels int64 [400])``: real digits never used in training."""
    path = HELDOUT_PATH if path is None else Path(path)
    data = _header(path, TYPE_HELDOUT)
    t = load_file(str(path))
    images = t["images"].float()
    labels = t["labels"].long()
    n = data.get("count")
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE) or labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: unexpected shapes images {tuple(images.shape)} labels {tuple(labels.shape)}")
    if n is not None and n != images.shape[0]:
        raise ValueError(f"{path}: header count {n} != {images.shape[0]} images")
    return images, labels
