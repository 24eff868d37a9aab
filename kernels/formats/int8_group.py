"""``int8_group``: one int8 per weight, one fp32 scale per group of group_size inputs.
A kernel layout: every backend's integer kernels read it.

Saved tensors: ``qdata`` int8 [N, K], ``w_scale`` fp32 [N, ceil(K/group_size)].
"""
from .base import IntLayout, register_format


@register_format
class Int8Group(IntLayout):
    name = "int8_group"
    bits_range = (5, 8)
    grouped = True
    nibbles = False
