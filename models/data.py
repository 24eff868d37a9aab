"""Data of the embedded default model: scikit-learn ``load_digits`` (1797 8x8 images, values 0..16).

Only the training script needs scikit-learn; the loaders in ``digits.py`` read the held-out images from
``digits_heldout.safetensors`` and never import it.

Preprocessing (shared by training and the stored held-out set): values / 16 -> [0, 1], bilinear upsampling
8x8 -> 16x16 (``align_corners=False``, a convex combination, so the range stays [0, 1]), then * 2 - 1 -> [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # the extra class id used as "no label" for classifier-free guidance
HELDOUT_PER_CLASS = 40  # 10 x 40 = 400 held-out images, 1397 for training
SPLIT_SEED = 0


def preprocess(raw: torch.Tensor) -> torch.Tensor:
    """Raw digits ``[N, 8, 8]`` or ``[N, 64]`` with values 0..16 -> ``[N, 1, 16, 16]`` float32 in [-1, 1]."""
    x = torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp_(-1.0, 1.0)


def load_raw_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [1797, 8, 8] with values 0..16, labels int64 [1797])``. Needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - only the training script gets here
        raise ImportError("training the default model needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    images = torch.as_tensor(d.images).round().to(torch.uint8)
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    return images, labels


def split_indices(labels: torch.Tensor, per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED):
    """Deterministic stratified split: ``per_class`` images of every class are held out.

    Returns ``(train_idx, heldout_idx)``, both sorted int64 tensors.
    """
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(idx.numel(), generator=g)]
        held.append(perm[:per_class])
    held_idx = torch.sort(torch.cat(held)).values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    return train_idx, held_idx


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, fill: float = -1.0) -> torch.Tensor:
    """Shift every image of ``x [N, C, H, W]`` by an integer offset in [-max_shift, max_shift]^2, filling with
    ``fill`` (the background value). Used as training augmentation."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out
