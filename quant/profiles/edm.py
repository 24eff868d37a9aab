"""EDM-preconditioned denoisers called with ``c_noise = 0.25 * ln(sigma)`` instead of a timestep: diffusers' Stable
Video Diffusion UNet (``UNetSpatioTemporalConditionModel``, its pipeline passes ``0.25 * log(sigma)``) and Cosmos
(``CosmosTransformer3DModel``, the same convention).

Their per-timestep tables are keyed on [0, T) like every other model's: ``ln(sigma)`` over the model's noise range
[sigma_min, sigma_max] (its scheduler's: SVD 0.002..700, Cosmos 0.002..80) maps linearly onto [0, 1000] (high noise
high, as DDPM timesteps), so the received ``c`` maps by ``key = 1000 * (4c - ln sigma_min) / ln(sigma_max /
sigma_min)``: a scale and an offset. (Found by audit: under scale 1 the keys were about -1.5..1.6 and every step
shared one table entry, silently.) Edges: the diffusers UNet's names for SVD.
"""
import math

from . import ModelProfile, class_named, register_profile
from .diffusers_unet import BLOCKS, DIFFUSERS_UNET


def log_sigma_map(sigma_min: float, sigma_max: float, per_ln_sigma: float = 0.25):
    """(timestep_scale, timestep_offset) taking ``c = per_ln_sigma * ln(sigma)`` over [sigma_min, sigma_max] onto
    [0, 1000] (EDM's c_noise: 0.25; a profile with ``timestep_log``, whose key is taken of ln(sigma) itself: 1)."""
    span = math.log(sigma_max / sigma_min)
    return 1000.0 / (per_ln_sigma * span), -1000.0 * math.log(sigma_min) / span


_SVD_SCALE, _SVD_OFFSET = log_sigma_map(0.002, 700.0)
_COSMOS_SCALE, _COSMOS_OFFSET = log_sigma_map(0.002, 80.0)

SVD = register_profile(ModelProfile(
    name="edm-svd", matches=class_named("UNetSpatioTemporalConditionModel"), priority=20,
    edge_rules=DIFFUSERS_UNET.edge_rules,
    block_types=BLOCKS,  # (not the spatio-temporal wrappers: their forward reshapes the batch by frames, so a
    # reconstruction unit cannot be run on a subset of its recorded rows)
    timestep_kwargs=("timestep",), sample_kwargs=("sample",), timestep_scale=_SVD_SCALE,
    timestep_offset=_SVD_OFFSET, channel_dim=2,
    description="Stable Video Diffusion UNet: [B, F, C, H, W], called with 0.25 * ln(sigma)"))

COSMOS = register_profile(ModelProfile(
    name="edm-cosmos", matches=class_named("CosmosTransformer3DModel"), priority=20,
    structural_edges=False, timestep_kwargs=("timestep",), sample_kwargs=("hidden_states",),
    timestep_scale=_COSMOS_SCALE, timestep_offset=_COSMOS_OFFSET,
    description="Cosmos transformer: called with 0.25 * ln(sigma)"))
