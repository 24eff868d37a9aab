"""``int8_channel``: one int8 per weight, one fp32 scale per output channel.
A kernel layout: every backend's integer kernels read it.

Saved tensors: ``qdata`` int8 [N, K], ``w_scale`` fp32 [N].
"""
from .base import IntLayout, register_format


@register_format
class Int8Channel(IntLayout):
    name = "int8_channel"
    bits_range = (5, 8)
    grouped = False
    nibbles = False
