"""Weight formats (one file per layout, registered with ``@register_format``), ``PackedWeight`` and ``ActQuant``.

Adding a format is one file: subclass :class:`WeightFormat` (or :class:`IntLayout`), set ``name``, ``bits_range``,
``grouped``, ``backends`` and implement ``storage`` / ``to_storage`` / ``from_storage`` / ``pack`` / ``unpack`` /
``dequantize``; decorate it with ``@register_format`` and import it once. ``QuantConfig(w_format=name)`` uses it.
"""
from .base import (FORMATS, ActQuant, IntLayout, PackedWeight, WeightFormat, default_format, get_format, int_range,
                   pack_int4, register_format, unpack_int4)
from . import int4_channel, int4_group, int8_channel, int8_group  # noqa: F401  (register the kernel layouts)

__all__ = ["FORMATS", "ActQuant", "IntLayout", "PackedWeight", "WeightFormat", "default_format", "get_format",
           "int_range", "pack_int4", "register_format", "unpack_int4"]
