"""``int4_channel``: two signed nibbles per byte, one fp32 scale per output channel.
A kernel layout: every backend's integer kernels read it.

Saved tensors: ``qdata`` uint8 [N, ceil(K/2)], ``w_scale`` fp32 [N].
"""
from .base import IntLayout, register_format


@register_format
class Int4Channel(IntLayout):
    name = "int4_channel"
    bits_range = (2, 4)
    grouped = False
    nibbles = True
