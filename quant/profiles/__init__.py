"""Model profiles: what LowBit needs to know about one architecture family, in one file per family.

A profile says which layers are the model's edges (kept at higher precision unless measured otherwise),
which modules are reconstruction blocks (BRECQ units), how the timestep (or sigma) reaches the model and on
which scale, and where the output's channels are. ``profile_for(model)`` picks the first registered profile
that matches (most specific first); ``generic`` matches anything. Adding an architecture is one new file in
this folder that calls ``register_profile`` (or, from outside the package, any module that does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn

from ..config import LayerRule


# the names a denoiser's timestep (or noise level) goes by, tried in this order: diffusers, ComfyUI / LDM, research
# code ("t"), k-diffusion / EDM wrappers ("sigma", "noise_labels", "c_noise"), Stable Cascade ("timestep_ratio")
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "timestep_ratio", "noise_level", "noise_labels",
                  "c_noise", "time")
# those among them that name a noise level sigma (a scale over decades, not a step index)
SIGMA_NAMES = frozenset({"sigma", "sigmas", "noise_labels", "c_noise"})


@dataclass(frozen=True)
class ModelProfile:
    """What the core needs to know about one architecture family.

    name: registry key, stored in saved files.
    matches: ``model -> bool``; class names are the usual test (no host import needed).
    edge_rules: name rules of layers that stay at W8A8 by default (input/output projections, embeddings);
        applied after the user's ``QuantConfig.rules``.
    structural_edges: keep the first and last Conv2d at W8A8 even if no rule names them (unknown UNets).
    block_types: class names of the reconstruction units (BRECQ blocks) and of the blocks that EfficientDM
        checkpoints.
    timestep_kwargs / sample_kwargs: keyword names of the timestep (or sigma) and of the noisy input; a positional
        call reads the timestep at the position of the first ``forward`` parameter so named, else the convention
        ``forward(sample, timestep, ...)`` (context.timestep_slot).
    timestep_scale: multiplies the received timestep so that per-timestep tables are keyed in [0, T)
        (1000 for models called with sigma or t/T in [0, 1], e.g. diffusers' Flux and SD3 transformers).
    timestep_offset: added after scaling: the key is ``timestep_offset + timestep_scale * received`` (Lumina's
        pipelines pass ``1 - t/T``, reversed: scale -1000, offset 1000).
    timestep_log: the model is called with sigma itself over a range of several decades (score-SDE VE models): the
        key is ``timestep_offset + timestep_scale * ln(received)`` (received values below 1e-12 count as 1e-12), so
        the steps of a geometric sigma schedule spread over the table instead of sharing its first entries.
    min_time_bins: the fewest timestep bins with their own activation ranges this family quantizes with, whatever
        ``QuantConfig.time_bins`` asks (1: the config decides): for models whose inputs change scale by orders of
        magnitude along a sampling run (score-SDE VE: ``x0 + sigma * z`` with sigma over decades), where one range
        for all steps rounds the low-noise steps' activations to a few codes.
    replaces: the profile that matched this family before this one was added, for saved files that do not record
        theirs (format < 4; ``io.file_profile``): their tables are keyed that way.
    prediction: what the output is ("epsilon", "v_prediction", "flow"); None: read from the host.
    channel_dim: dimension of the output that holds channels (PTQD statistics are per channel).
    host_option_keys: call keywords holding the host's per-run bookkeeping (dropped from recorded calls).
    out_channels: ``model -> int | None``, the size of the output's ``channel_dim`` (what PTQD's per-channel
        tables are checked against when a file is loaded) where the model's own ``out_channels`` attribute means
        something else (ComfyUI's Flux: 16 * patch_size^2 packed-token channels, its output unpatchified to
        16); None: read from the model's config / attribute.
    keep_float: regular expressions (searched in qualified names) of layers whose float weight or parameters the
        model's own code reads outside their forward (diffusers' Wan: ``next(iter(time_embedder.parameters()))``,
        Z-Image: ``t_embedder.mlp[0].weight.dtype``): a deployed layer holds neither, so these stay float whatever
        the rules or the measured plan say.
    act_epilogues: (block class name, Linear child, activation child) of blocks whose code feeds that Linear's
        output to that activation module and to nothing else (diffusers' Flux single-stream block: ``proj_mlp`` ->
        ``act_mlp``): at deployment the activation moves into the Linear's kernel (quant/fuse.py). The generic
        patterns (an ``nn.Sequential``'s Linear then GELU, diffusers' ``GELU(proj)``) need no declaration.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    edge_rules: Tuple[LayerRule, ...] = ()
    structural_edges: bool = True
    block_types: Tuple[str, ...] = ()
    timestep_kwargs: Tuple[str, ...] = TIMESTEP_NAMES
    sample_kwargs: Tuple[str, ...] = ("sample", "x", "hidden_states")
    timestep_scale: float = 1.0
    timestep_offset: float = 0.0
    timestep_log: bool = False
    min_time_bins: int = 1
    replaces: Optional[str] = None
    prediction: Optional[str] = None
    channel_dim: int = 1
    host_option_keys: Tuple[str, ...] = ("transformer_options",)
    out_channels: Optional[Callable[[nn.Module], Optional[int]]] = None
    keep_float: Tuple[str, ...] = ()
    act_epilogues: Tuple[Tuple[str, str, str], ...] = ()
    priority: int = 0  # higher is tried first
    description: str = field(default="", compare=False)

    def table_key(self, t: float) -> float:
        """The per-timestep table key of a received timestep ``t``: ``timestep_offset + timestep_scale * t`` (with
        ``timestep_log``: of ``ln(t)``)."""
        t = float(t)
        if self.timestep_log:
            t = math.log(max(t, 1e-12))
        return self.timestep_offset + t * self.timestep_scale


PROFILES: Dict[str, ModelProfile] = {}


def register_profile(profile: ModelProfile) -> ModelProfile:
    if not isinstance(profile, ModelProfile):
        raise TypeError("register_profile takes a ModelProfile")
    PROFILES[profile.name] = profile
    return profile


def class_named(*names: str) -> Callable[[nn.Module], bool]:
    """A ``matches`` function: the model's class (or one of its bases) has one of ``names``."""
    wanted = set(names)
    return lambda model: any(c.__name__ in wanted for c in type(model).__mro__)


def config_value(model: nn.Module, key: str):
    """``key`` of a model's ``config`` (diffusers' FrozenDict, or an object with attributes), None when absent: what a
    ``matches`` function reads to tell variants of one class apart (Sana Sprint's guidance embedding, NCSN++'s fourier
    time embedding)."""
    cfg = getattr(model, "config", None)
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def profile_for(model: nn.Module) -> ModelProfile:
    """The most specific registered profile that matches ``model`` (``generic`` when none does)."""
    for p in sorted(PROFILES.values(), key=lambda p: -p.priority):
        if p.name != "generic" and p.matches(model):
            return p
    return PROFILES["generic"]


def resolve_profile(model: nn.Module, profile=None) -> ModelProfile:
    """The profile a user's ``profile=`` argument names: None -> the model's own (:func:`profile_for`), a
    ``ModelProfile`` as it is, a registered name; an unknown name is a ConfigError listing the known ones (a typo
    must not quantize under the generic profile)."""
    if profile is None:
        return profile_for(model)
    if isinstance(profile, ModelProfile):
        if PROFILES.get(profile.name) is not profile:
            from ..errors import ConfigError

            raise ConfigError(f"model profile {profile.name!r} is not registered; register it with "
                              "lowbit.quant.profiles.register_profile before quantizing (the model and its saved "
                              "files name their profile, and look it up by that name)")
        return profile
    if not isinstance(profile, str) or profile not in PROFILES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown model profile {profile!r}; one of {sorted(PROFILES)} (or None: the one that "
                          "matches the model)")
    return PROFILES[profile]


def get_profile(name: Optional[str]) -> ModelProfile:
    """A registered profile by name (a saved file stores the name); unknown names fall back to generic."""
    return PROFILES.get(name or "generic", PROFILES["generic"])


# the built-in families, one file each (each registers itself on import)
from . import generic, diffusers_unet, ldm_unet, dit, comfy_sd3, comfy_lumina, edm, score_sde, stable_cascade  # noqa: E402,F401
