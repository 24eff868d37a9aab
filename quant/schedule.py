"""Step-aware mixed precision (PTQD, docs/PAPERS.md A6): pick activation bits per timestep from measured SNR.

The official code never released this. Our rule (A6's suggestion): for every recorded timestep t and
candidate activation bit-width b, measure the signal-to-noise ratio of the quantized noise prediction
against the full-precision one, SNR_q(b, t) = E|eps_fp|^2 / E|eps_q,b - eps_fp|^2, and compare it with the
full-precision model's own SNR at that step, SNR_fp(t) = abar_t / (1 - abar_t). The lowest b with
SNR_q(b, t) >= margin * SNR_fp(t) is used at t: quantization noise then stays below the signal the step
still has to resolve. Early (noisy) steps get low bits, late steps high bits.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch

from .calib import Call, keyed, model_device_dtype, unet_output
from .config import BitwidthSchedule
from .context import get_context
from .errors import ConfigError, NumericalError
from .layers import quant_layers
from .progress import Stage
from .transaction import FIX, check_finite, check_tensor, transaction


def measure_snr(fp_model, qmodel, calls: List[Call], candidates: Sequence[int], progress=None
                ) -> Dict[float, Dict[int, float]]:
    """SNR_q(b, t) for every timestep in ``calls`` and every candidate bit-width (10*log10 not applied).

    Raises ``NumericalError`` when an output or a measurement is NaN/Inf. Transactional: cancelled or failing,
    both models are left as they were."""
    if not calls:
        raise ConfigError("measuring SNR needs recorded UNet calls (CallRecorder around a full-precision sampling run)")
    ctx = get_context(qmodel)
    if ctx is not None:
        calls = keyed(calls, fp_model, ctx.profile)
    with transaction(qmodel, readonly=(fp_model,)):
        return _measure_snr(fp_model, qmodel, calls, candidates, progress)


def _measure_snr(fp_model, qmodel, calls, candidates, progress):
    ctx = get_context(qmodel)
    if ctx is None:
        raise ConfigError("measure_snr needs a LowBit quantized UNet (lowbit.quant.quantize) as qmodel")
    have = set.intersection(*[set(l.act.bits_set) for _, l in quant_layers(qmodel)
                              if l.act is not None and l.scheduled])
    missing = [b for b in candidates if b not in have]
    if missing:
        raise ConfigError(f"the quantized model has no activation scales for {missing} bits; quantize it with "
                          f"a_bits_candidates={tuple(candidates)}")
    sig, err = defaultdict(float), defaultdict(float)
    dev, dt = model_device_dtype(fp_model)
    qdev, qdt = model_device_dtype(qmodel)
    saved = (ctx.a_bits_override, getattr(ctx, "ptqd_active", False))
    ctx.ptqd_active = False
    try:
        with torch.no_grad(), Stage(progress, len(calls) * len(candidates), "measure SNR") as st:
            for c in calls:
                a, kw = c.to(dev, dt)
                fp = unet_output(fp_model(*a, **kw)).float()
                check_tensor(fp, f"measure_snr: the full-precision model's output at timestep {c.t}", FIX)
                a, kw = c.to(qdev, qdt)
                for b in candidates:
                    ctx.a_bits_override = b
                    q = unet_output(qmodel(*a, **kw)).float().to(fp.device)
                    check_tensor(q, f"measure_snr: the quantized model's output at timestep {c.t} with {b}-bit "
                                    "activations", FIX)
                    sig[(c.t, b)] += float(fp.pow(2).sum())
                    err[(c.t, b)] += float((q - fp).pow(2).sum())
                    st.step()
    finally:
        ctx.a_bits_override, ctx.ptqd_active = saved
    out: Dict[float, Dict[int, float]] = defaultdict(dict)
    for (t, b), s in sig.items():
        if not (math.isfinite(s) and math.isfinite(err[(t, b)])):
            raise NumericalError(f"measure_snr: the signal or error energy at timestep {t} with {b}-bit activations "
                                 f"overflows (NaN/Inf); {FIX}")
        out[t][b] = s / max(err[(t, b)], 1e-30)
    return dict(out)


def choose_bits(snr: Dict[float, Dict[int, float]], alphas_cumprod: torch.Tensor, margin: float = 1.0
                ) -> List[Tuple[float, int]]:
    picks = []
    for t in sorted(snr):
        a = float(alphas_cumprod[int(round(t))])
        need = margin * a / max(1 - a, 1e-12)
        cands = sorted(snr[t])
        ok = [b for b in cands if snr[t][b] >= need]
        picks.append((t, ok[0] if ok else cands[-1]))
    return picks


def schedule_from_picks(picks: List[Tuple[float, int]], T: int = 1000) -> BitwidthSchedule:
    """Merge per-timestep picks into segments; boundaries halfway between neighbouring timesteps."""
    picks = sorted(picks)
    segs, lo = [], 0.0
    for i, (t, b) in enumerate(picks):
        last = i + 1 == len(picks)
        if last or picks[i + 1][1] != b:
            hi = float(T - 1) if last else (t + picks[i + 1][0]) / 2.0
            segs.append((lo, hi, b))
            lo = hi
    return BitwidthSchedule(tuple(segs), T)


def auto_schedule(fp_model, qmodel, calls: List[Call], alphas_cumprod: torch.Tensor, candidates=(4, 8),
                  margin: float = 1.0, progress=None):
    """(BitwidthSchedule, measurements) — and installs the schedule on ``qmodel``. Transactional: cancelled or
    failing, ``qmodel`` keeps its previous schedule and state."""
    if not calls:
        raise ConfigError("auto_schedule needs recorded UNet calls (CallRecorder around a full-precision sampling run)")
    ctx = get_context(qmodel)
    if ctx is not None:
        calls = keyed(calls, fp_model, ctx.profile)  # (the schedule lands on the keys the model looks up)
    with transaction(qmodel, readonly=(fp_model,)):
        snr = _measure_snr(fp_model, qmodel, calls, candidates, progress)
        picks = choose_bits(snr, alphas_cumprod, margin)
        sched = schedule_from_picks(picks, len(alphas_cumprod))
        ctx = get_context(qmodel)
        ctx.schedule = sched
        check_finite(qmodel, "auto_schedule")
    return sched, {"snr": snr, "picks": picks}
