"""Image comparison (host-free): PSNR, SSIM and a difference heat map of image batches.

Images are float [B, H, W, C] in [0, 1] (ComfyUI's IMAGE layout; C = 1, 3 or 4, alpha ignored).

* PSNR on RGB: 10*log10(1 / MSE) (inf for identical images).
* SSIM (Wang et al. 2004) on luminance Y = 0.299 R + 0.587 G + 0.114 B, an 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, computed on the valid region (no padding) and averaged.
  Images smaller than 11 pixels use the largest odd window that fits.
* Heat map: per-pixel mean absolute RGB difference, scaled so the largest difference in the batch is
  white, coloured black -> red -> yellow -> white.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import ConfigError

LUMA = (0.299, 0.587, 0.114)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("image_a", a), ("image_b", b)):
        if not torch.is_tensor(t) or t.dim() != 4 or t.shape[-1] not in (1, 3, 4):
            raise ConfigError(f"{name} must be an IMAGE batch [B, H, W, C], got "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if a.shape[1:3] != b.shape[1:3]:
        raise ConfigError(f"image_a is {a.shape[2]}x{a.shape[1]} but image_b is {b.shape[2]}x{b.shape[1]}; "
                             "compare images of the same size (same latent size for both samplers)")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ConfigError(f"image_a has {a.shape[0]} images but image_b has {b.shape[0]}; use equal batches "
                             "(or a single image on one side)")
    a, b = a[..., :3].float(), b[..., :3].float()
    if a.shape[-1] == 1:
        a = a.expand(*a.shape[:-1], 3)
    if b.shape[-1] == 1:
        b = b.expand(*b.shape[:-1], 3)
    n = max(a.shape[0], b.shape[0])
    return a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])


def psnr(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """PSNR in dB per image pair (data range 1)."""
    a, b = _check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    return [float("inf") if m == 0 else float(10.0 * math.log10(1.0 / float(m))) for m in mse]


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian, fp64 [size, size]."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def luminance(img: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] -> [B, 1, H, W] fp64."""
    w = torch.tensor(LUMA, dtype=torch.float64)
    return (img.double() * w).sum(-1).unsqueeze(1)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> List[float]:
    """Mean SSIM on luminance per image pair (see module docstring)."""
    a, b = _check_pair(a, b)
    x, y = luminance(a), luminance(b)
    size = min(window, x.shape[-1], x.shape[-2])
    size = size if size % 2 else size - 1
    size = max(size, 1)
    w = gaussian_window(size, sigma)[None, None]
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2

    def filt(t):
        return F.conv2d(t, w)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return [float(v) for v in s.flatten(1).mean(1)]


def heat_colour(v: torch.Tensor) -> torch.Tensor:
    """[...] in [0, 1] -> [..., 3]: black -> red -> yellow -> white."""
    v = v.clamp(0, 1)
    r = (v * 3).clamp(0, 1)
    g = (v * 3 - 1).clamp(0, 1)
    bl = (v * 3 - 2).clamp(0, 1)
    return torch.stack([r, g, bl], dim=-1)


def difference_map(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(heat map IMAGE [B, H, W, 3], max mean-abs difference used for the scale)."""
    a, b = _check_pair(a, b)
    d = (a - b).abs().mean(-1)
    peak = float(d.max()) if d.numel() else 0.0
    return heat_colour(d / peak if peak > 0 else d).float(), peak


def report(p: List[float], s: List[float], peak: float, sizes: Optional[Tuple[int, int]] = None) -> str:
    """Text for PSNRs ``p`` and SSIMs ``s`` per pair. Over several pairs the PSNR line is that of the mean squared
    error (a mean of dB values reads near-lossless when one pair is identical); ``sizes`` (images in a, in b) says
    when one single image was compared with each image of the other batch."""
    def fmt(v):
        return "inf (identical)" if math.isinf(v) else f"{v:.2f} dB"

    lines = []
    if sizes is not None and sizes[0] != sizes[1]:
        one, many = ("image_a", "image_b") if sizes[0] == 1 else ("image_b", "image_a")
        lines.append(f"{one} has 1 image: compared with each of the {max(sizes)} images of {many}")
    lines += [f"image {i}: PSNR {fmt(pi)}, SSIM {si:.4f}" for i, (pi, si) in enumerate(zip(p, s))]
    if len(p) > 1:
        mse = sum(0.0 if math.isinf(v) else 10.0 ** (-v / 10.0) for v in p) / len(p)
        mp = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
        lines.append(f"all {len(p)}: PSNR {fmt(mp)} (of the mean squared error), mean SSIM {sum(s) / len(s):.4f}")
    lines.append(f"heat map: white = mean |difference| {peak:.4f} (of 1.0)")
    return "\n".join(lines)


def compare(a: torch.Tensor, b: torch.Tensor) -> Tuple[List[float], List[float], torch.Tensor, str]:
    """Everything a comparison shows, for the Compare node and the web UI alike: (PSNR per pair, SSIM per pair,
    heat map IMAGE, the text of :func:`report`)."""
    p, s = psnr(a, b), ssim(a, b)
    heat, peak = difference_map(a, b)
    return p, s, heat, report(p, s, peak, sizes=(a.shape[0], b.shape[0]))
