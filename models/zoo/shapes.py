"""Procedural captioned images shared by ``latent_text`` and ``dit_flow``: one coloured shape on a dark
background, 3x16x16 in [-1, 1], captioned "<colour> <shape> <top|bottom> <left|right>".

Combination id ``c`` in [0, 48): colour ``c % 4``, shape ``(c // 4) % 3``, position ``c // 12`` (so consecutive
ids vary colour and shape first). Rendering is antialiased (4x supersampling) with jittered size, position,
colour and background, all drawn from a ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COLOR_NAMES = tuple(COLORS)
VOCAB = [*COLOR_NAMES, *SHAPES, "top", "bottom", "left", "right"]
NUM_COMBOS = len(COLORS) * len(SHAPES) * len(POSITIONS)  # 48
HEADS = (len(COLORS), len(SHAPES), len(POSITIONS))
SIZE = 16


def attributes(combo: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` (colour, shape, position) indices of combination ids ``[N]``."""
    combo = torch.as_tensor(combo).long()
    return torch.stack([combo % 4, (combo // 4) % 3, combo // 12], 1)


def caption(combo: int) -> str:
    c, s, p = attributes(torch.tensor([combo]))[0].tolist()
    return f"{COLOR_NAMES[c]} {SHAPES[s]} {POSITIONS[p]}"


def render(combo: torch.Tensor, g: torch.Generator, ss: int = 4) -> torch.Tensor:
    """Images ``[N, 3, 16, 16]`` in [-1, 1] for combination ids ``combo [N]``."""
    attr = attributes(combo)
    n = attr.shape[0]
    S = SIZE * ss
    r = (2.6 + 1.0 * torch.rand(n, generator=g)) * ss  # radius in supersampled pixels
    q = SIZE / 4
    cx = (torch.where(attr[:, 2] % 2 == 1, 3 * q, q) + (torch.rand(n, generator=g) - 0.5) * 1.5) * ss
    cy = (torch.where(attr[:, 2] >= 2, 3 * q, q) + (torch.rand(n, generator=g) - 0.5) * 1.5) * ss
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    dx = xx[None] - cx.view(-1, 1, 1)
    dy = yy[None] - cy.view(-1, 1, 1)
    rr = r.view(-1, 1, 1)
    circle = dx ** 2 + dy ** 2 <= rr ** 2
    square = (dx.abs() <= 0.85 * rr) & (dy.abs() <= 0.85 * rr)
    tri = (dy <= 0.8 * rr) & (dx.abs() <= (dy + rr) / 1.8)
    shape = attr[:, 1].view(-1, 1, 1)
    mask = torch.where(shape == 0, circle, torch.where(shape == 1, square, tri)).float()
    mask = F.avg_pool2d(mask[:, None], ss)  # [N, 1, 16, 16] coverage
    base = torch.tensor(list(COLORS.values()))[attr[:, 0]]
    color = (base + 0.08 * (torch.rand(n, 3, generator=g) - 0.5)).clamp(0, 1).view(n, 3, 1, 1)
    bg = (0.05 + 0.2 * torch.rand(n, 1, generator=g) + 0.04 * (torch.rand(n, 3, generator=g) - 0.5)).view(n, 3, 1, 1)
    img = bg * (1 - mask) + color * mask
    return (img * 2 - 1).clamp(-1, 1)
