"""Small CNN digit classifier of the embedded default model; its feature layer defines our FID.

Input ``[N, 1, 16, 16]`` in [-1, 1]. ``features(x)`` is the ``feature_dim``-d penultimate layer (before its
activation, times the constant ``feature_scale``), ``forward(x)`` the 10 class logits.
"""
from __future__ import annotations

import torch
from torch import nn

CLASSIFIER_DEFAULTS = {"channels": [32, 64], "feature_dim": 64, "num_classes": 10, "image_size": 16,
                       "feature_scale": 1.0}


class DigitClassifier(nn.Module):
    def __init__(self, channels=(32, 64), feature_dim: int = 64, num_classes: int = 10, image_size: int = 16,
                 feature_scale: float = 1.0):
        super().__init__()
        c0, c1 = (int(c) for c in channels)
        self.config = {
            "channels": [c0, c1],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "feature_scale": float(feature_scale),
        }
        self.feature_scale = float(feature_scale)
        self.body = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c0, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
        )
        flat = c1 * (image_size // 4) ** 2
        self.embed = nn.Linear(flat, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The FID features: penultimate layer (pre-activation) times ``feature_scale`` (a constant fixed at
        training time so that the training images' features have mean per-dimension variance 1)."""
        return self.embed(self.body(x)) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.body(x)))
