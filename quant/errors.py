"""Error types. Every message names the thing, the reason and the fix (STYLE lesson 8)."""


class LowBitError(Exception):
    """Base class of every error LowBit raises on purpose."""


class ConfigError(LowBitError, ValueError):
    """A setting is out of range or inconsistent; raised before any work starts."""


class LoadError(LowBitError):
    """A saved file cannot be applied: truncated, corrupt, wrong model, unknown version."""


class NumericalError(LowBitError, FloatingPointError):
    """NaN/Inf in calibration data or a diverging fine-tune."""


class Interrupted(LowBitError):
    """The user cancelled a long run; nothing was changed."""
