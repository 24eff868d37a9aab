"""Activation epilogues: an activation applied to a Linear's output, fused into the kernel where a backend can.

A deployed Linear whose output feeds only a GELU (a transformer's feed-forward; found at deployment by
quant/fuse.py) computes ``post(linear(x))`` in one op: ``ops.linear(x, pw, bias, act, post="gelu_tanh")``. A backend
declares the epilogues it fuses (``@backend.op("linear", supports=..., posts=("gelu", "gelu_tanh"))``: oneDNN's
int8 Linear applies them in its epilogue, on the accumulator it already holds); for every other backend the torch
activation runs on its output (``registry.with_post``), so any backend computes the same function.

Names (the only ones accepted; checked by :func:`check`):
    gelu       ``F.gelu(y)`` (erf)
    gelu_tanh  ``F.gelu(y, approximate="tanh")``
    geglu      ``a * F.gelu(g)`` with ``a, g = y.chunk(2, -1)`` (the gated GELU of SD-style transformer blocks): the
               output has half the Linear's features; oneDNN runs the two halves as two int8 Linears on the same
               input codes, the GELU in the second one's epilogue
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

def _geglu(y):
    a, gate = y.chunk(2, dim=-1)
    return a * F.gelu(gate)


POSTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "geglu": _geglu,
}
# epilogues that halve the last dimension (the output has N / 2 features)
HALVING = frozenset({"geglu"})


def fits(post: Optional[str], features: int) -> bool:
    """A Linear with ``features`` outputs can take ``post`` (a halving one needs an even width)."""
    return post not in HALVING or features % 2 == 0


def check(post: Optional[str], features: Optional[int] = None) -> Optional[str]:
    """``post`` if it names an epilogue (or is None) that a Linear with ``features`` outputs (if given) can take, else
    ValueError naming the problem."""
    if post is not None and post not in POSTS:
        raise ValueError(f"unknown activation epilogue {post!r}; one of {sorted(POSTS)} or None")
    if features is not None and not fits(post, features):
        raise ValueError(f"post={post!r} splits the output in two halves; {features} features is odd")
    return post


def apply(y, post: Optional[str]):
    """``y`` with the epilogue ``post`` applied (None: ``y`` itself)."""
    return y if post is None else POSTS[post](y)


def of_gelu(approximate: str) -> Optional[str]:
    """The epilogue of a GELU with this ``approximate`` ("none" / "tanh"), or None (another)."""
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
