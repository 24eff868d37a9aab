"""``int4_group``: two signed nibbles per byte, one fp32 scale per group of group_size inputs.
A kernel layout: every backend's integer kernels read it.

Saved tensors: ``qdata`` uint8 [N, ceil(K/2)], ``w_scale`` fp32 [N, ceil(K/group_size)].
"""
from .base import IntLayout, register_format


@register_format
class Int4Group(IntLayout):
    name = "int4_group"
    bits_range = (2, 4)
    grouped = True
    nibbles = True
