"""The "Bitwidth Schedule" node: which activation bit-width applies in which part of the sampling run.

The node outputs a ``ScheduleSpec`` (a small frozen description, not yet tied to a model). "Quantize UNet"
turns it into the core's ``BitwidthSchedule``, which is keyed by DDPM timestep: "percent of the run" is
mapped through the model's own ``model_sampling`` (``percent_to_sigma`` then ``timestep``), so the split is
where ComfyUI's other percent-based nodes (ControlNet start/end, conditioning ranges) put it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .common import (CATEGORY, COMBO, FLOAT, INT, SCHEDULE_TYPE, NodeInputError, check_choice,
                     check_float, check_int)

MODE_FIXED = "fixed percent split"
MODE_AUTO = "auto (SNR)"


def available_modes():
    return [MODE_FIXED, MODE_AUTO]


@dataclass(frozen=True)
class ScheduleSpec:
    """What the user asked for. ``switch_percent``: fraction of the run (0 = first step, 1 = end) spent at
    ``early_bits`` before switching to ``late_bits``. ``mode == MODE_AUTO``: measured during calibration."""

    mode: str = MODE_FIXED
    switch_percent: float = 0.5
    early_bits: int = 4
    late_bits: int = 8

    @property
    def bits_used(self):
        return tuple(sorted({self.early_bits, self.late_bits}))

    def to_schedule(self, percent_to_timestep: Callable[[float], float], num_train_timesteps: int = 1000):
        """The core ``BitwidthSchedule``: timesteps above the switch point (early, noisy part of the run) use
        ``early_bits``, the rest ``late_bits``. ``percent_to_timestep`` is the model's mapping."""
        from ..quant.config import BitwidthSchedule

        if self.mode != MODE_FIXED:
            raise NodeInputError(f"schedule mode {self.mode!r} is measured during calibration; "
                                 "call it through Quantize UNet")
        T = float(num_train_timesteps - 1)
        if self.switch_percent <= 0.0:
            return BitwidthSchedule(((0.0, T, self.late_bits),), num_train_timesteps)
        if self.switch_percent >= 1.0:
            return BitwidthSchedule(((0.0, T, self.early_bits),), num_train_timesteps)
        cut = min(max(float(percent_to_timestep(self.switch_percent)), 0.0), T)
        if cut <= 0.0 or cut >= T:  # the split falls outside the timesteps: one segment (no zero-width one)
            return BitwidthSchedule(((0.0, T, self.late_bits if cut >= T else self.early_bits),), num_train_timesteps)
        return BitwidthSchedule(((0.0, cut, self.late_bits), (cut, T, self.early_bits)), num_train_timesteps)

    def describe(self) -> str:
        if self.mode == MODE_AUTO:
            return "auto (SNR) schedule"
        return (f"A{self.early_bits} for the first {self.switch_percent:.0%} of the run, "
                f"A{self.late_bits} after")


def check_schedule_settings(mode=None, switch_percent=None, early_bits=None, late_bits=None):
    if mode is not None:
        check_choice("mode", mode, available_modes(),
                     f"{MODE_FIXED!r} switches at switch_percent; {MODE_AUTO!r} measures where to switch.")
    if switch_percent is not None:
        check_float("switch_percent", switch_percent, 0.0, 1.0, "It is the fraction of the run, 0..1.")
    for name, b in (("early_bits", early_bits), ("late_bits", late_bits)):
        if b is not None:
            check_int(name, b, 2, 8, "Activation bits must be 2..8 (8 is the safe choice, 4 is aggressive).")


class LowBitBitwidthSchedule:
    DESCRIPTION = ("Step-aware activation precision: use one activation bit-width for the early (noisy) part of "
                   "the sampling run and another for the rest. Connect it to Quantize UNet's bitwidth_schedule; "
                   "the quantizer then calibrates activation scales for both bit-widths and the quantized UNet "
                   "switches by timestep, so it works with any sampler, scheduler and step count.")
    CATEGORY = f"{CATEGORY}/quantize"
    RETURN_TYPES = (SCHEDULE_TYPE,)
    RETURN_NAMES = ("bitwidth_schedule",)
    OUTPUT_TOOLTIPS = ("The schedule; connect it to Quantize UNet (LowBit).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        modes = available_modes()
        return {"required": {
            "mode": COMBO(modes, MODE_FIXED,
                          "fixed percent split: early_bits for the first switch_percent of the run, late_bits "
                          "after." + (" auto (SNR): Quantize UNet measures, per timestep, whether early_bits or "
                                      "late_bits keeps the quantization noise below the signal that step still "
                                      "resolves (PTQD's step-aware mixed precision); switch_percent is ignored."
                                      if MODE_AUTO in modes else "")),
            "switch_percent": FLOAT(0.5, 0.0, 1.0,
                                    "Fraction of the sampling run (0 = first step, 1 = last) that uses early_bits. "
                                    "Converted to a timestep with the model's own sigma schedule.", step=0.01),
            "early_bits": INT(4, 2, 8, "Activation bits while the image is still mostly noise (high timesteps). "
                                       "Coarse activations hurt least here."),
            "late_bits": INT(8, 2, 8, "Activation bits for the rest of the run, where fine detail is formed."),
        }}

    # (no VALIDATE_INPUTS: ComfyUI checks the declared ranges and choices itself, one error per bad input;
    # build() checks them again)

    def build(self, mode, switch_percent, early_bits, late_bits):
        check_schedule_settings(mode, switch_percent, early_bits, late_bits)
        return (ScheduleSpec(mode, float(switch_percent), int(early_bits), int(late_bits)),)


def check_schedule_with_bits(spec: Optional[ScheduleSpec], bits: str):
    """A schedule switches activation bits, so it cannot go with weight-only formats."""
    if spec is None:
        return
    if not isinstance(spec, ScheduleSpec):
        raise NodeInputError(f"bitwidth_schedule must come from a Bitwidth Schedule (LowBit) node, got "
                             f"{type(spec).__name__}")
    if bits.endswith("A16"):
        raise NodeInputError(f"a bitwidth schedule switches activation bits, but {bits} keeps activations in "
                             "floating point; pick W8A8/W4A8/W4A4 or disconnect the schedule")

