"""A model whose ``out_channels`` attribute is not its output's channel count (ComfyUI's Flux keeps
``out_channels = 16 * patch_size ** 2`` for its packed tokens and returns the unpatchified 16-channel latent):
its profile says so (``ModelProfile.out_channels``), so a file with PTQD statistics saved from it loads again.
Found by tests/nodes/test_comfyui_dit.py on a real ComfyUI Flux; this is the host-free version."""
from types import SimpleNamespace

import torch
import torch.nn as nn

from lowbit.quant import CallRecorder, PipelineConfig, load, pipeline, save
from lowbit.quant.profiles import profile_for


class Flux(nn.Module):
    """Named like ComfyUI's class (the comfy-flux profile matches by class name); Linear layers on 2x2 patches,
    called as ``model(x, sigma, context=...)`` with sigma in [0, 1], NCHW in and out."""

    def __init__(self, c=4, p=2, width=32):
        super().__init__()
        self.params = SimpleNamespace(out_channels=c, patch_size=p)
        self.patch_size, self.out_channels = p, c * p * p  # as ComfyUI's Flux: the packed-token width
        self.img_in = nn.Linear(c * p * p, width)
        self.time_in = nn.Linear(1, width)
        self.txt_in = nn.Linear(8, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.final_layer = nn.Linear(width, c * p * p)

    def forward(self, x, timestep, context=None, transformer_options=None):
        b, c, h, w = x.shape
        p = self.patch_size
        tok = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
        z = self.img_in(tok) + self.time_in(timestep.reshape(-1, 1, 1).float()) + self.txt_in(context).mean(1, True)
        z = z + self.mlp(z)
        out = self.final_layer(z).reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


def test_comfy_flux_profile_reports_the_unpatchified_channels():
    m = Flux()
    prof = profile_for(m)
    assert prof.name == "comfy-flux" and prof.out_channels is not None
    assert m.out_channels == 16 and prof.out_channels(m) == 4


def test_ptqd_file_of_a_packed_token_model_loads(tmp_path, registry_kernels):
    torch.manual_seed(0)
    m = Flux().eval()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 3, 8, generator=g)
    with CallRecorder(m) as rec, torch.no_grad():
        for i in range(3):
            rec.new_trajectory()
            for s in (1.0, 0.6, 0.2):
                m(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([s]), context=ctx)
    q = pipeline.run(m, rec.calls, PipelineConfig.for_method("lp+ptqd", "W8A8")).model
    path = tmp_path / "flux_like.safetensors"
    save(q, path)
    q2 = load(m, path)  # refused before the profile said the output has 4 channels ([S, 4] vs "expected [S, 16]")
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        assert torch.equal(q(x, t, context=ctx), q2(x, t, context=ctx))
