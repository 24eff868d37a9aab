"""The root of LowBit's error family, in a module that imports nothing.

``lowbit.quant.errors`` re-exports :class:`LowBitError` (the same class) and adds the core's subclasses;
``lowbit.kernels`` derives ``NoBackendError`` from it without importing the core.
"""


class LowBitError(Exception):
    """Base class of every error LowBit raises on purpose (one line: the problem and the fix)."""
