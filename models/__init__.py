"""Embedded default model: a tiny class-conditional DDPM on scikit-learn digits, its classifier and metrics.

Works offline with no download: the weights ship in this folder (``*.safetensors``). Needs no scikit-learn
except to retrain (``python -m lowbit.models.train_digits``).

    from lowbit.models import load_default_unet, default_scheduler, sample, fid, class_accuracy, load_heldout
"""
from .digits import (
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    default_scheduler,
    load_classifier,
    load_default_unet,
    load_heldout,
)
from .metrics import (class_accuracy, classifier_features, fid, frechet_distance, laplacian_energy, noisy_fraction,
                      noisy_mask)
from .sample import ddim_timesteps, sample

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "load_default_unet",
    "load_classifier",
    "load_heldout",
    "default_scheduler",
    "sample",
    "ddim_timesteps",
    "classifier_features",
    "frechet_distance",
    "fid",
    "class_accuracy",
    "laplacian_energy",
    "noisy_mask",
    "noisy_fraction",
]
