"""The model zoo: small diffusion models trained here, each different in what matters for quantization.

    from lowbit.models.zoo import ZOO_NAMES, load
    m = load("rgb")
    images, labels = m.sample(m.denoiser, n=8, seed=0)        # [8, 3, 16, 16] in [-1, 1]
    m.metrics(images, labels)                                  # {"fid": ..., "acc": ...}

Every model ships its weights (safetensors with a JSON header) next to its module and is rebuilt from them
with torch + diffusers + safetensors only; ``python -m lowbit.models.zoo.train_<name>`` retrains it (needs
scikit-learn / scikit-image for the photo data). See ``README.md`` in this folder for the table.
"""
from __future__ import annotations

import importlib

import torch

from ...quant.errors import ConfigError

ZOO_NAMES = ("digits", "rgb", "latent_text", "dit_flow")

# name -> module (relative to this package) defining ``build() -> ZooModel``
_MODULES = {"digits": ".digits", "rgb": ".rgb", "latent_text": ".latent_text", "dit_flow": ".dit_flow"}


class UnknownZooModel(ConfigError, KeyError):
    """``load`` was given a name that is not in ``ZOO_NAMES``."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ZooModel:
    """One zoo model. ``denoiser`` is the network that gets quantized (eval, fp32); everything else (VAE,
    text encoder, class/label embedding outside the denoiser, metric network) stays in float.

    ``sample(denoiser, n, seed, steps, guidance)`` returns ``(images [n, C, H, W] in [-1, 1], labels [n])``;
    the same ``(seed, n)`` gives the same initial noise and labels for any denoiser passed in. It calls
    ``denoiser(x, t, **conditioning)`` batched (with CFG: conditional and unconditional halves in one call).
    ``metrics(images, labels)`` returns ``{"fid": float, "acc": float | None}`` against held-out real data.
    """

    name: str = ""
    prediction: str = "epsilon"  # "epsilon" | "v_prediction" | "flow"
    num_classes: int | None = None
    default_steps: int = 25
    default_guidance: float | None = None  # None: the model is sampled without CFG

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser.eval().float().requires_grad_(False)

    # -- to implement
    def sample(self, denoiser, n: int, seed: int, steps: int = 25, guidance: float | None = None):
        raise NotImplementedError

    def metrics(self, images, labels) -> dict:
        raise NotImplementedError

    def heldout(self) -> tuple:
        """``(images, labels)`` of real data never used to train the denoiser (the FID reference)."""
        raise NotImplementedError

    def features(self, images) -> torch.Tensor:
        """``[n, d]`` features of ``images`` in the metric network's space (the one FID is computed in)."""
        raise NotImplementedError

    # -- shared
    def labels_for(self, n: int) -> torch.Tensor:
        """Balanced labels ``arange(n) % num_classes`` (zeros for unconditional models)."""
        if self.num_classes is None:
            return torch.zeros(n, dtype=torch.long)
        return torch.arange(n) % self.num_classes

    def __repr__(self):
        params = sum(p.numel() for p in self.denoiser.parameters())
        return (f"ZooModel({self.name!r}, {type(self.denoiser).__name__}, {params:,} parameters, "
                f"prediction={self.prediction!r}, num_classes={self.num_classes})")




def load(name: str) -> ZooModel:
    """Build zoo model ``name`` from its shipped files (a fresh denoiser each call; aux parts are shared)."""
    if name not in _MODULES:
        raise UnknownZooModel(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO_NAMES)}")
    mod = importlib.import_module(_MODULES[name], __name__)
    return mod.build()


__all__ = ["ZOO_NAMES", "ZooModel", "UnknownZooModel", "load"]
