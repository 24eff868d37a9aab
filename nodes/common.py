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


# ---- stage names for long node work ------------------------------------------------------------------------
class StageLog:
    """A core progress callback ``(done, total, info)`` that names every stage of a long node run.

    The core reports each stage with its own count (``info["stage"]``: "calibration sampling", "quantize weights",
    "calibrate activations", "PTQD statistics", ...), so a host progress bar alone restarts at every stage with
    no name. This writes to the console (``logger``): one line when a stage starts (its number and step count), a
    line every ``every`` seconds while it runs (done/total, seconds, an estimate of what is left) and one when it
    ends (steps and seconds; a stage's time runs from the previous stage's last report); ``finish()`` logs the
    total and every stage's seconds. ``text(line)`` gets the current stage as one short line (e.g. the node's
    progress text in the UI; at most one per ``text_every`` seconds, and a stage's first and last step). Every call is
    forwarded to ``forward`` (the host's bar and its cancel check, which may raise)."""

    def __init__(self, title: str, forward=None, text=None, logger=None, every: float = 30.0,
                 text_every: float = 1.0, clock=None):
        import logging
        import time

        self.title, self.forward, self.text = title, forward, text
        self.log = logger or logging.getLogger("lowbit.nodes")
        self.every, self.text_every = every, text_every
        self.clock = clock or time.monotonic
        self.stage: Optional[str] = None
        self.index = self.done = self.total = 0
        self.start = self.t0 = self.last_log = self.last_event = self.clock()
        self.last_text = float("-inf")
        self.stages = []  # finished stages: (number, name, steps done, seconds)

    def _emit(self, msg: str) -> None:
        self.log.info("%s: %s", self.title, msg)

    def _send(self, now: float, force: bool = False) -> None:
        if self.text is None or not (force or now - self.last_text >= self.text_every):
            return
        self.last_text = now
        try:
            self.text(f"[{self.index}] {self.stage}: {self.done}/{self.total}")
        except Exception as exc:  # the UI text is a courtesy; it never stops the work
            self.log.debug("%s: progress text failed: %s", self.title, exc)

    def __call__(self, done, total, info=None):
        info = info or {}
        stage = str(info.get("stage") or "working")
        now = self.clock()
        # a new stage: another name, or the same name counting again (the core runs some stages more than once)
        new = self.stage is None or stage != self.stage or done < self.done or self.done >= self.total
        if new:
            self._end()
            self.index += 1
            self.stage, self.t0, self.last_log = stage, self.last_event, now
            self._emit(f"[{self.index}] {stage} ({int(total)} steps)")
        self.done, self.total, self.last_event = int(done), int(total), now
        if not new and now - self.last_log >= self.every and done < total:
            spent = now - self.t0
            left = spent / max(self.done, 1) * (self.total - self.done)
            self._emit(f"[{self.index}] {stage} {self.done}/{self.total} ({spent:.0f} s, about {left:.0f} s left)")
            self.last_log = now
        self._send(now, force=new or self.done >= self.total)  # a stage's first and last step always
        if self.forward is not None:
            self.forward(done, total, info)

    def _end(self) -> None:
        if self.stage is None:
            return
        secs = self.last_event - self.t0
        self.stages.append((self.index, self.stage, self.done, secs))
        self._emit(f"[{self.index}] {self.stage} done: {self.done}/{self.total} steps in {secs:.1f} s")
        self.stage = None

    def finish(self, failed: bool = False) -> float:
        """Close the last stage and log the total (``failed``: the stage the run stopped in). Returns seconds."""
        now = self.clock()
        if failed and self.stage is not None:
            self._emit(f"stopped in [{self.index}] {self.stage} at {self.done}/{self.total} after "
                       f"{now - self.start:.1f} s")
            self.stage = None
        self._end()
        total = now - self.start
        if not failed:
            parts = ", ".join(f"{name} {secs:.1f} s" for _, name, _, secs in self.stages)
            self._emit(f"finished in {total:.1f} s ({parts or 'no stages'})")
        return total
