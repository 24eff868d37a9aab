"""A toy architecture and its model profile, in one file: importing it registers the profile ``toy-arch``.

``ToyDenoiser`` is a Linear-only flow-matching-style denoiser called as ``model(x, noise_level=sigma)`` with
sigma in [0, 1] (neither diffusers' nor ComfyUI's keyword names), its input/output projections named
``inp``/``outp`` and its blocks of class ``ToyBlock``. The profile tells the core all of that.
"""
import torch
import torch.nn as nn

from lowbit.quant.config import LayerRule
from lowbit.quant.profiles import ModelProfile, class_named, register_profile


class ToyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, emb):
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h) + emb)))


class ToyDenoiser(nn.Module):
    def __init__(self, dim=16, width=32, depth=2):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.t_mlp = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.outp = nn.Linear(width, dim)

    def forward(self, x, *, noise_level):
        emb = self.t_mlp(noise_level.reshape(-1, 1).to(x.dtype))[:, None, :]
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, emb)
        return self.outp(h)


TOY_PROFILE = register_profile(ModelProfile(
    name="toy-arch", matches=class_named("ToyDenoiser"), priority=50,
    edge_rules=(LayerRule(r"^(inp|outp)$", "w8a8"), LayerRule(r"^t_mlp\.", "w8a8")),
    structural_edges=False, block_types=("ToyBlock",), timestep_kwargs=("noise_level",), sample_kwargs=("x",),
    timestep_scale=1000.0, prediction="flow", channel_dim=-1, description="test-only toy denoiser"))
