"""Activation epilogues: an activation applied to a Linear's output, fused into the kernel where a backend can.

A deployed Linear whose output feeds only a GELU (a transformer's feed-forward; found at deployment by
quant/fuse.py) computes ``post(linear(x))`` in one op: ``ops.linear(x, pw, bias, act, post="gelu_tanh")``. A backend
declares the epilogues it fuses (``@backend.op("linear", supports=..., posts=("gelu", "gelu_tanh"))``: oneDNN's
int8 Linear applies them in its epilogue, on the accumulator it already holds); for every other backend the torch
activation runs on its output (``registry.with_post``), so any backend computes the same function.

Names (the only ones accepted; checked by :func:`check`):
    gelu       ``F.gelu(y)`` (erf)
    gelu_tanh  ``F.gelu(y, approximate="tanh")``
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

POSTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def check(post: Optional[str]) -> Optional[str]:
    """``post`` if it names an epilogue (or is None), else ValueError naming the choices."""
    if post is not None and post not in POSTS:
        raise ValueError(f"unknown activation epilogue {post!r}; one of {sorted(POSTS)} or None")
    return post


def of_gelu(approximate: str) -> Optional[str]:
    """The epilogue of a GELU with this ``approximate`` ("none" / "tanh"), or None (another)."""
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
