"""Error types. Every message names the thing, the reason and the fix, on one line.

:class:`LowBitError` lives in ``lowbit/_errors.py`` (no imports) so that ``lowbit.kernels`` can derive
``NoBackendError`` from it without importing the core; it is the same class here.
"""
from .._errors import LowBitError

__all__ = ["LowBitError", "ConfigError", "LoadError", "NumericalError", "Interrupted"]


class ConfigError(LowBitError, ValueError):
    """A setting is out of range or inconsistent; raised before any work starts."""


class LoadError(LowBitError):
    """A saved file cannot be applied: truncated, corrupt, wrong model, unknown version."""


class NumericalError(LowBitError, FloatingPointError):
    """NaN/Inf in calibration data or a diverging fine-tune."""


class Interrupted(LowBitError):
    """The user cancelled a long run; nothing was changed."""
