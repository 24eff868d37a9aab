"""Host-free helpers shared by the node modules: input specs with tooltips, setting checks, categories.

Nothing here imports ComfyUI, so the node classes (INPUT_TYPES, VALIDATE_INPUTS, the pure math) load and
can be tested without it. Everything that touches ComfyUI objects lives in ``comfy_adapter.py``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..quant.errors import ConfigError

CATEGORY = "LowBit"
BITS_PRESETS = ("W8A8", "W4A8", "W4A4", "W4A16")
SCHEDULE_TYPE = "BITWIDTH_SCHEDULE"  # our own socket type (a nodes.schedule.ScheduleSpec travels on it)

# ---- input specs ------------------------------------------------------------------------------------------
def INT(default: int, lo: int, hi: int, tooltip: str, step: int = 1, advanced: bool = False, **extra):
    return ("INT", dict(default=default, min=lo, max=hi, step=step, tooltip=tooltip, **_adv(advanced), **extra))


def FLOAT(default: float, lo: float, hi: float, tooltip: str, step: float = 0.01, advanced: bool = False,
          round: Optional[float] = None, **extra):
    opts = dict(default=default, min=lo, max=hi, step=step, tooltip=tooltip, **_adv(advanced), **extra)
    if round is not None:
        opts["round"] = round
    return ("FLOAT", opts)


def BOOL(default: bool, tooltip: str, advanced: bool = False):
    return ("BOOLEAN", dict(default=default, tooltip=tooltip, **_adv(advanced)))


def COMBO(options, default, tooltip: str, advanced: bool = False):
    options = list(options)
    if default not in options:
        raise ValueError(f"default {default!r} is not one of {options}")
    return (options, dict(default=default, tooltip=tooltip, **_adv(advanced)))


def SOCKET(type_name: str, tooltip: str, advanced: bool = False):
    return (type_name, dict(tooltip=tooltip, **_adv(advanced)))


def _adv(advanced: bool) -> Dict[str, Any]:
    return {"advanced": True} if advanced else {}


# ---- checks (raised before any work starts; the message names the input, the problem and the fix) ---------
class NodeInputError(ConfigError):
    """A node setting is invalid (a ``ConfigError``, so one error family). ComfyUI shows the message on the node."""


def check_int(name: str, value, lo: int, hi: int, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeInputError(f"{name} must be a whole number in {lo}..{hi}, got {value!r}. {fix}".strip())
    if not lo <= value <= hi:
        raise NodeInputError(f"{name}={value} is out of range {lo}..{hi}. {fix}".strip())
    return value


def check_float(name: str, value, lo: float, hi: float, fix: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise NodeInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}. {fix}".strip())
    if not lo <= value <= hi:
        raise NodeInputError(f"{name}={value} is out of range [{lo}, {hi}]. {fix}".strip())
    return float(value)


def check_choice(name: str, value, choices, fix: str = "") -> str:
    if value not in choices:
        raise NodeInputError(f"{name}={value!r} is not supported; choose one of {list(choices)}. {fix}".strip())
    return value


def validation_result(fn, **kwargs):
    """Run a check function for VALIDATE_INPUTS: True when fine, else the message (ComfyUI shows it)."""
    try:
        fn(**kwargs)
    except (NodeInputError, ValueError) as exc:
        return str(exc)
    return True
