"""Uniform affine quantizers (docs/PAPERS.md A1), vectorised over channels.

Notation: b bits; weights are symmetric signed integers in [-2^(b-1), 2^(b-1)-1] with one step size per
output channel (or per group of input elements); activations are asymmetric unsigned integers in
[0, 2^b-1] with a step size and an integer zero point.

Departure from the papers' code: the L_p (p=2.4) range search runs over all channels at once (the papers
loop over channels in Python), and weights are symmetric so that integer kernels need no weight zero-point
cross terms (oneDNN's int8 convolution takes symmetric per-channel weights only).
"""
from __future__ import annotations

import torch

LP_NORM = 2.4
N_CANDIDATES = 80  # candidate ranges 1.00, 0.99, ... 0.21 of the full range (A1)
LP_SAMPLE = 1024  # columns per channel/group used to score the L_p candidates


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def w_qrange(bits: int):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def a_qmax(bits: int) -> int:
    return 2 ** bits - 1


def _grouped(w: torch.Tensor, group_size):
    """[N, ...] -> [N, G, g] view (zero-padded along K when K % g != 0) and K."""
    n = w.shape[0]
    flat = w.reshape(n, -1)
    k = flat.shape[1]
    if group_size is None:
        return flat.unsqueeze(1), k
    g = group_size
    pad = (-k) % g
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(n, -1, g), k


def weight_scale(w: torch.Tensor, bits: int, group_size=None, method: str = "lp") -> torch.Tensor:
    """Step size per output channel [N] (or per group [N, G]) for symmetric signed ``bits``-bit weights.

    method "minmax": absmax / (2^(b-1)-1); "lp": the absmax shrunk by the factor in {1.00, 0.99, ..., 0.21}
    that minimises mean |w - q(w)|^2.4 for each channel separately.
    """
    if not bool(torch.isfinite(w.detach()).all()):
        from .errors import NumericalError

        raise NumericalError(f"NaN/Inf in a float weight of shape {tuple(w.shape)} to be quantized (its step sizes "
                             "would be NaN); the float model is corrupt: reload or fix its checkpoint")
    with torch.no_grad():
        wg, _ = _grouped(w.detach().float(), group_size)
        qmin, qmax = w_qrange(bits)
        absmax = wg.abs().amax(dim=-1).clamp_min(1e-8)  # [N, G]
        best = absmax / qmax
        if method == "lp" and wg.shape[-1] > LP_SAMPLE:
            # the error of each candidate is estimated on a fixed random subset of columns (the range itself
            # comes from the full absmax): 80 passes over SD-size weights would otherwise take minutes
            idx = torch.randperm(wg.shape[-1], generator=torch.Generator().manual_seed(0))[:LP_SAMPLE]
            wg = wg[..., idx]
        if method == "lp":
            best_err = torch.full_like(absmax, float("inf"))
            for i in range(N_CANDIDATES):
                s = absmax * (1.0 - 0.01 * i) / qmax
                q = torch.clamp(torch.round(wg / s[..., None]), qmin, qmax) * s[..., None]
                err = (wg - q).abs().pow(LP_NORM).mean(dim=-1)
                better = err < best_err
                best = torch.where(better, s, best)
                best_err = torch.where(better, err, best_err)
        elif method != "minmax":
            raise ValueError(f"unknown weight scale method {method!r}")
        best = best.clamp_min(1e-8)
        return best[:, 0] if group_size is None else best


def expand_weight_scale(scale: torch.Tensor, shape, group_size=None) -> torch.Tensor:
    """Broadcast a [N] or [N, G] step size to the logical weight shape."""
    n = shape[0]
    if group_size is None:
        return scale.reshape((n,) + (1,) * (len(shape) - 1))
    k = 1
    for d in shape[1:]:
        k *= d
    full = scale.repeat_interleave(group_size, dim=1)[:, :k]
    return full.reshape(shape)


def quantize_weight_int(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size=None) -> torch.Tensor:
    """Integer weights (int8 tensor of the logical shape) for the given step sizes."""
    qmin, qmax = w_qrange(bits)
    s = expand_weight_scale(scale, w.shape, group_size)
    return torch.clamp(torch.round(w.float() / s), qmin, qmax).to(torch.int8)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size=None) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; gradients reach ``w`` (inside the range) and ``scale``."""
    qmin, qmax = w_qrange(bits)
    s = expand_weight_scale(scale, w.shape, group_size)
    return torch.clamp(round_ste(w / s), qmin, qmax) * s


def fake_quant_act(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """Asymmetric unsigned quantize-dequantize, STE rounding (zero point rounded too, so the integer
    kernels compute exactly this). ``scale``/``zero``: scalars or tensors broadcastable to x."""
    z = round_ste(zero) if torch.is_tensor(zero) else float(round(zero))
    q = torch.clamp(round_ste(x / scale) + z, 0, a_qmax(bits))
    return (q - z) * scale


def act_range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """(scale, zero) for an asymmetric range that always contains 0."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / a_qmax(bits)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return scale, zero


def act_shrink_factors() -> torch.Tensor:
    """Range shrink factors tried by the activation L_p search: 1.00 ... 0.21 in steps of 0.01 (the papers'),
    then geometric steps of 5% down to 0.01."""
    lin = 1.0 - 0.01 * torch.arange(N_CANDIDATES, dtype=torch.float32)
    geo = lin[-1] * torch.pow(torch.tensor(0.95), torch.arange(1, 200, dtype=torch.float32))
    return torch.cat([lin, geo[geo >= 0.01]])


def act_scale_search(sample: torch.Tensor, lo: float, hi: float, bits: int, method: str = "lp"):
    """(scale, zero) for one activation tensor population.

    ``sample``: 1-D subsample of the activation values; ``lo``/``hi``: exact min and max seen.
    "lp" shrinks both ends of [lo, hi] together and keeps the candidate with the least mean |x - q(x)|^2.4 on
    the sample (A1), evaluated for all candidates in one batched pass. The papers' grid (1.00, 0.99, ... 0.21)
    is extended geometrically down to 0.01 (``act_shrink_factors``): activations have rare outliers, and
    with more calibration data the exact min/max grows until the best range lies below 0.21 of it (on the
    default model at W4A4, 256 instead of 32 calibration trajectories made naive PTQ's FID 4x worse with
    the papers' grid).
    """
    lo_t = torch.tensor(float(lo))
    hi_t = torch.tensor(float(hi))
    if method == "minmax" or sample.numel() == 0:
        s, z = act_range_params(lo_t, hi_t, bits)
        return float(s), float(z)
    x = sample.float().reshape(1, -1)
    f = act_shrink_factors()
    s, z = act_range_params(lo_t * f, hi_t * f, bits)  # [C]
    s, z = s[:, None], z[:, None]
    err = torch.zeros(len(f))
    for chunk in torch.split(x, 65536, dim=1):
        q = (torch.clamp(torch.round(chunk / s) + z, 0, a_qmax(bits)) - z) * s
        err += (chunk - q).abs().pow(LP_NORM).sum(dim=1)
    i = int(torch.argmin(err))
    return float(s[i, 0]), float(z[i, 0])
