"""Score-SDE (variance exploding) UNets: diffusers' ``UNet2DModel`` with ``time_embedding_type="fourier"`` (NCSN++,
``ScoreSdeVePipeline``), called with sigma itself: the model embeds ``ln(sigma)`` and divides its output by sigma.

Sigma runs over several decades (the scheduler's 0.01..1348 by default; 0.01..50 for CIFAR-10, ..348 for CelebA-HQ),
geometrically spaced. Keyed on sigma as received, every step of a sampling run landed in the first few entries of
the [0, T) tables, the low-noise steps sharing the activation ranges of the high-noise ones (found by audit: W8A8
relative errors of 0.1-0.2 at the low-noise steps, growing as sigma falls). The key here is ``ln(sigma)`` over
[SIGMA_MIN, SIGMA_MAX] mapped linearly onto [0, 1000] (high noise high, as DDPM timesteps): a log map, not a scale
(``ModelProfile.timestep_log``). The input is ``x0 + sigma * z``: its scale follows sigma over those decades, so one
activation range for every step (``time_bins=1``, the default elsewhere) crushed the low-noise steps' activations
into a few codes (relative errors about 1 at the low-noise half of a tiny NCSN++): this family quantizes with at
least 25 timestep bins of its own activation ranges (half an e-fold of sigma each). Edges and blocks: the diffusers
UNet's.
"""
from . import ModelProfile, config_value, register_profile
from .diffusers_unet import DIFFUSERS_UNET
from .edm import log_sigma_map

SIGMA_MIN, SIGMA_MAX = 0.002, 2000.0  # around every published VE schedule, so their keys fall inside [0, 1000]


def _is_fourier_unet2d(model) -> bool:
    if not any(c.__name__ == "UNet2DModel" for c in type(model).__mro__):
        return False
    return config_value(model, "time_embedding_type") == "fourier"


_SCALE, _OFFSET = log_sigma_map(SIGMA_MIN, SIGMA_MAX, per_ln_sigma=1.0)

SCORE_SDE = register_profile(ModelProfile(
    name="score-sde-ve", matches=_is_fourier_unet2d, priority=20,
    edge_rules=DIFFUSERS_UNET.edge_rules, block_types=DIFFUSERS_UNET.block_types,
    timestep_kwargs=("timestep",), sample_kwargs=("sample",),
    timestep_log=True, min_time_bins=25, replaces="diffusers-unet",
    timestep_scale=_SCALE, timestep_offset=_OFFSET,
    description="score-SDE VE UNet2DModel (fourier time embedding): called with sigma, keyed on ln(sigma)"))
