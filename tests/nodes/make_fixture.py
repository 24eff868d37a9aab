"""A small, deterministic, randomly initialised SD1.5-class checkpoint for the ComfyUI integration tests.

Nothing is downloaded. The UNet is ComfyUI's own ``UNetModel`` with the SD1.5 numbers that ComfyUI's model
detection keys on (``model_channels=320``, ``context_dim=768``, conv ``proj_in`` i.e. no linear-in-transformer,
no ``adm_in_channels``) but reduced depth, the text encoder is ComfyUI's own CLIP-L (``comfy/sd1_clip_config.json``,
the one size ComfyUI accepts for SD1.x) and the VAE is ComfyUI's TAESD (``first_stage_model.taesd_encoder.*`` /
``taesd_decoder.*``). Everything is written in the original LDM key layout (``model.diffusion_model.``,
``cond_stage_model.transformer.text_model.``, ``first_stage_model.``) as one fp16 safetensors file, so
``CheckpointLoaderSimple`` detects it as SD15 and loads MODEL, CLIP and VAE from it.

Weights are initialised explicitly (ComfyUI's ``disable_weight_init`` ops leave them as ``torch.empty``): each
tensor comes from its own CPU generator seeded by (FIXTURE_VERSION, seed, key), so the bytes depend only on the
key table and torch's CPU RNG. Linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales
1 + N(0, 0.05^2), embeddings ~ N(0, 0.02^2): non-degenerate activations everywhere (no zero-initialised output
layers), which is what quantization tests need. Buffers that a checkpoint carries are filled too (SD3's
``pos_embed``: the 2-D sin-cos table real SD3 files hold), and a build with any non-finite tensor is refused.

Variants (UNet only; CLIP-L ~246 MB fp16 dominates the file):
    micro  channel_mult [1],    1 res block, attention at the level and in the middle   (~26 M UNet params)
    tiny   channel_mult [1, 2], 1 res block per level, attention everywhere           (~107 M UNet params)

Other architectures (each builder's comment says what ComfyUI's detection fixes and what was reduced):
    sd3    ComfyUI's MMDiT, depth 2 (hidden 128), CLIP-L only, TAESD3                         (~0.25 GB file)
    sdxl   ComfyUI's UNetModel with Segmind Vega's block depths at 320 channels everywhere (detected as
           Segmind_Vega, an SDXL-family config), full-size CLIP-L + CLIP-G, TAESDXL          (~1.8 GB, ~1 min)
    flux   ComfyUI's Flux dev at its fixed width (3072, 24 heads), 1 double + 1 single block, the diffusion
           model only (no text encoder: Flux's always builds T5-XXL); for models/diffusion_models (~1.0 GB, ~30 s)

Must run with ComfyUI's python (it imports ``comfy``). Usage:

    $COMFYUI_PYTHON tests/nodes/make_fixture.py --comfyui-dir $COMFYUI_DIR [--variant micro] [--seed 0]
        [--cache-dir DIR] [--out PATH] [--force]

It prints the path of the checkpoint as the last line of stdout. Without ``--out`` the file is cached as
``<cache-dir>/lowbit-comfy-sd15-<variant>-<FIXTURE_VERSION>-s<seed>.safetensors``; the cache dir is
``--cache-dir``, else ``$LOWBIT_FIXTURE_CACHE``, else ``<tempdir>/lowbit-fixtures``. A cached file is reused.

This module has no top-level imports of torch or comfy, so the test harness (which may run in another python)
can import it for ``fixture_path()``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Bump when the architecture table or the initialisation changes: the cache file name carries it.
FIXTURE_VERSION = "v1"

VARIANTS = {
    # UNetModel kwargs that differ per variant. transformer_depth has one entry per input res block,
    # transformer_depth_output one per output res block (num_res_blocks + 1 per level).
    "micro": dict(channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
                  transformer_depth_output=[1, 1], transformer_depth_middle=1),
    "tiny": dict(channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1),
}
DEFAULT_VARIANT = "micro"

# SD1.5 values shared by every variant (comfy.supported_models.SD15 + model_detection).
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, context_dim=768,
                 num_heads=8, num_head_channels=-1, use_spatial_transformer=True, use_linear_in_transformer=False,
                 legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."   # + text_model.*
VAE_PREFIX = "first_stage_model."
TAESD_SD15_SCALE = 0.18215                      # what nodes.VAELoader.load_taesd sets for "taesd"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_FIXTURE_CACHE") or Path(tempfile.gettempdir()) / "lowbit-fixtures")


EXTRA_VARIANTS = ("sd3", "sdxl", "flux")


def fixture_name(variant: str = DEFAULT_VARIANT, seed: int = 0) -> str:
    if variant == "sd3":
        return f"lowbit-comfy-sd3-d{SD3_DEPTH}-{SD3_FIXTURE_VERSION}-s{seed}.safetensors"
    if variant == "sdxl":
        return f"lowbit-comfy-sdxl-vega-c111-{FIXTURE_VERSION}-s{seed}.safetensors"
    if variant == "flux":
        return f"lowbit-comfy-flux-d{FLUX_DEPTH}s{FLUX_SINGLE}-unet-{FIXTURE_VERSION}-s{seed}.safetensors"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS) + list(EXTRA_VARIANTS)}")
    return f"lowbit-comfy-sd15-{variant}-{FIXTURE_VERSION}-s{seed}.safetensors"


def fixture_path(variant: str = DEFAULT_VARIANT, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / fixture_name(variant, seed)


# --------------------------------------------------------------------------------------------- building
def _import_comfy(comfyui_dir: str | None):
    if comfyui_dir:
        comfyui_dir = os.path.abspath(comfyui_dir)
        if comfyui_dir not in sys.path:
            sys.path.insert(0, comfyui_dir)
    try:
        import comfy.cli_args  # parses no argv unless comfy.options.args_parsing is set
    except ImportError as exc:
        raise SystemExit(f"make_fixture.py needs ComfyUI's python and source (--comfyui-dir or COMFYUI_DIR): {exc}")
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (docs/HOST_INTERNALS.md §5.4)
    import comfy.ops
    import comfy.clip_model
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return comfy, UNetModel


def _generator(seed: int, key: str):
    import torch
    digest = hashlib.sha256(f"{FIXTURE_VERSION}/{seed}/{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _init_module(module, prefix: str, seed: int, norm_scale_names: tuple = ()) -> None:
    """Fill every parameter (and float buffer) of `module` in place, one generator per full key.
    ``norm_scale_names``: names of 1-D parameters that are norm gains in modules that are not torch norms
    (Flux's RMSNorm ``scale``): initialised like a norm weight, 1 + N(0, 0.05^2)."""
    import torch
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, p in list(mod.named_parameters(recurse=False)):
                key = f"{prefix}{mod_name}.{p_name}" if mod_name else f"{prefix}{p_name}"
                g = _generator(seed, key)
                t = torch.empty(p.shape, dtype=torch.float32)
                if isinstance(mod, norm_types) or (p_name in norm_scale_names and p.dim() == 1):
                    t.normal_(0.0, 0.05, generator=g)
                    if p_name in ("weight",) + tuple(norm_scale_names):
                        t += 1.0
                elif isinstance(mod, torch.nn.Embedding):
                    t.normal_(0.0, 0.02, generator=g)
                elif p_name == "bias" or p.dim() < 2:
                    t.normal_(0.0, 0.02, generator=g)
                else:
                    fan_in = 1
                    for s in p.shape[1:]:
                        fan_in *= s
                    t.normal_(0.0, fan_in ** -0.5, generator=g)
                p.data = t.to(p.dtype)


def _add_taesd(sd: dict, seed: int, latent_channels: int, scale: float, shift: float) -> None:
    """ComfyUI's TAESD as the checkpoint's VAE (``first_stage_model.taesd_*`` keys) with its latent scale/shift."""
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _init_module(taesd, VAE_PREFIX, seed)
    for k, v in taesd.state_dict().items():
        sd[VAE_PREFIX + k] = v
    sd[VAE_PREFIX + "vae_scale"] = torch.tensor(scale)
    sd[VAE_PREFIX + "vae_shift"] = torch.tensor(shift)


def build_state_dict(variant: str = DEFAULT_VARIANT, seed: int = 0, comfyui_dir: str | None = None) -> dict:
    """The fp16 LDM-layout state dict (needs ComfyUI importable)."""
    import torch
    comfy, UNetModel = _import_comfy(comfyui_dir)
    ops = comfy.ops.disable_weight_init
    sd: dict[str, torch.Tensor] = {}

    unet = UNetModel(**SD15_UNET, **VARIANTS[variant], dtype=torch.float32, device="cpu", operations=ops)
    _init_module(unet, UNET_PREFIX, seed)
    sd.update({UNET_PREFIX + k: v for k, v in unet.state_dict().items()})
    del unet

    cfg_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"  # comfy is a namespace package
    clip_cfg = json.loads(cfg_path.read_text())
    clip = comfy.clip_model.CLIPTextModel(clip_cfg, dtype=torch.float32, device="cpu", operations=ops)
    _init_module(clip, CLIP_PREFIX, seed)
    for k, v in clip.state_dict().items():
        if k.startswith("text_model."):      # SD1.5 checkpoints carry no text_projection / logit_scale
            sd[CLIP_PREFIX + k] = v
    del clip

    _add_taesd(sd, seed, 4, TAESD_SD15_SCALE, 0.0)

    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


# A reduced SD3 (rectified flow, ComfyUI's MMDiT) that ComfyUI's detection still reads as SD3: it derives the
# transformer's size from the weights (depth = x_embedder width / 64, context and pooled widths from the
# embedders, pos_embed grid from its length; comfy/model_detection.py), the text encoder from the keys present
# (CLIP-L only: its output is zero-padded to 4096 and the pooled CLIP-G half is zeros, comfy/text_encoders/
# sd3_clip.py) and the VAE from the TAESD keys (16 latent channels).
SD3_DEPTH, SD3_POS_GRID = 2, 16           # hidden 128, 2 heads; latents up to 32x32 (images up to 256 px)
SD3_TE_PREFIX = "text_encoders.clip_l.transformer."
# v1 left MMDiT's pos_embed buffer as ComfyUI allocates it (torch.empty): whatever memory held, NaN in some
# builds (seen with ComfyUI 0.33.0 / torch 2.14.1, where the float model sampled NaN). v2 fills it.
SD3_FIXTURE_VERSION = "v2"


def sd3_pos_embed(hidden: int, grid: int):
    """SD3's fixed 2-D sin-cos position table, [1, grid * grid, hidden] (ComfyUI's own formula)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    return torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().reshape(1, grid * grid, hidden)


def build_sd3_state_dict(seed: int = 0, comfyui_dir: str | None = None) -> dict:
    import torch
    comfy, _ = _import_comfy(comfyui_dir)
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    ops = comfy.ops.disable_weight_init
    hidden = 64 * SD3_DEPTH
    sd: dict[str, torch.Tensor] = {}
    mmdit = OpenAISignatureMMDITWrapper(
        in_channels=16, out_channels=16, patch_size=2, depth=SD3_DEPTH, input_size=None, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        num_patches=SD3_POS_GRID ** 2, pos_embed_max_size=SD3_POS_GRID, pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[], dtype=torch.float32, device="cpu", operations=ops)
    _init_module(mmdit, UNET_PREFIX, seed)
    if getattr(mmdit, "pos_embed", None) is None:
        raise SystemExit("ComfyUI's MMDiT has no pos_embed buffer; the SD3 fixture needs one for detection")
    mmdit.pos_embed.copy_(sd3_pos_embed(hidden, SD3_POS_GRID))   # a buffer: _init_module fills parameters only
    for k, v in mmdit.state_dict().items():
        sd[UNET_PREFIX + k] = v
    del mmdit

    cfg_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"
    clip = comfy.clip_model.CLIPTextModel(json.loads(cfg_path.read_text()), dtype=torch.float32, device="cpu",
                                          operations=ops)
    _init_module(clip, SD3_TE_PREFIX, seed)
    for k, v in clip.state_dict().items():
        if k.startswith("text_model."):
            sd[SD3_TE_PREFIX + k] = v
    del clip

    _add_taesd(sd, seed, 16, 1.5305, 0.0609)   # SD3's latent scale and shift (latent_formats.SD3)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


# A reduced SDXL UNet that ComfyUI detects as an SDXL-family model. ComfyUI matches a checkpoint to a config of
# comfy/supported_models.py by the keys each config lists: every SDXL config fixes model_channels=320,
# linear proj_in, context_dim=2048, adm_in_channels=2816 and the per-input-block transformer depths, but not
# channel_mult, the middle depth or the output depths. Segmind Vega's depths [0, 0, 1, 1, 2, 2] are the
# smallest of the family; channel_mult [1, 1, 1] keeps every level at 320 channels (the real Vega has
# [1, 2, 4]), so the UNet is ~0.1 B parameters instead of 0.75 B. ComfyUI loads it as Segmind_Vega, a
# subclass of SDXL (model_base.SDXL: the 2816-wide ADM vector from CLIP-G's pooled output and the size
# embeddings, SDXL latent format, SDXLClipModel). Text encoders: full-size CLIP-L and CLIP-G (ComfyUI's
# SDXLClipModel builds both and has no smaller config; CLIP-G is ~0.69 B parameters, ~1.4 GB of the file),
# written in the SDXL checkpoint layout by ComfyUI's own process_clip_state_dict_for_saving. VAE: TAESDXL
# layout (first_stage_model.taesd_*, 4 latent channels, scale 0.13025).
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, context_dim=2048,
                 num_heads=-1, num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 legacy=False, num_classes="sequential", adm_in_channels=2816, use_temporal_attention=False,
                 use_temporal_resblock=False, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=1,
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2])
TAESDXL_SCALE = 0.13025


def build_sdxl_state_dict(seed: int = 0, comfyui_dir: str | None = None) -> dict:
    import torch
    comfy, UNetModel = _import_comfy(comfyui_dir)
    from comfy import sdxl_clip, supported_models
    ops = comfy.ops.disable_weight_init
    sd: dict[str, torch.Tensor] = {}
    unet = UNetModel(**SDXL_UNET, dtype=torch.float32, device="cpu", operations=ops)
    _init_module(unet, UNET_PREFIX, seed)
    sd.update({UNET_PREFIX + k: v.to(torch.float16) for k, v in unet.state_dict().items()})
    del unet

    clip = sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16,
                                         model_options={"custom_operations": ops})
    _init_module(clip, "sdxl_clip.", seed)
    clip_sd = {k: v for k, v in clip.state_dict().items() if ".transformer." in k or k.endswith("logit_scale")}
    del clip
    cfg = supported_models.SDXL(dict(supported_models.SDXL.unet_config))
    sd.update(cfg.process_clip_state_dict_for_saving(clip_sd))
    del clip_sd

    _add_taesd(sd, seed, 4, TAESDXL_SCALE, 0.0)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


# A reduced Flux (dev: guidance embedding) diffusion model, ComfyUI's own comfy.ldm.flux.model.Flux. ComfyUI's
# detection (comfy/model_detection.py) reads only in_channels (img_in), vec_in_dim (vector_in) and the block
# counts from the weights; hidden_size 3072, 24 heads (head dim 128, axes_dim [16, 56, 56]), mlp_ratio 4 and
# context_in_dim 4096 are fixed there, so a narrower Flux is not detected (its weights would not fit the model
# ComfyUI builds). The reduction is depth: 1 double-stream + 1 single-stream block (the real model has 19 + 38),
# ~0.55 B parameters, ~1.1 GB in fp16. The file is the diffusion model alone (keys without prefix, for
# models/diffusion_models and the stock "Load Diffusion Model" node): Flux's text encoder (comfy.text_encoders
# .flux.FluxClipModel) always builds T5-XXL (~4.7 B parameters), which no test here can build or hold, so the
# test supplies CONDITIONING ([1, L, 4096] T5-shaped context + a 768-wide CLIP-L pooled_output) through a
# test-only custom node it writes into the server's private custom_nodes folder; FluxGuidance (stock) adds
# the guidance value.
FLUX_DEPTH, FLUX_SINGLE = 1, 1
FLUX_PARAMS = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=FLUX_DEPTH, depth_single_blocks=FLUX_SINGLE,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def flux_params(fields) -> dict:
    """FLUX_PARAMS for the FluxParams whose dataclass ``fields`` are given. Newer ComfyUI (0.33.0) added a
    required ``txt_ids_dims``, which its detection sets to [] for Flux.1 (text positions carry no ids); 0.3.64's
    FluxParams refuses the keyword."""
    params = dict(FLUX_PARAMS)
    if "txt_ids_dims" in {f.name for f in fields}:
        params["txt_ids_dims"] = []
    return params


def build_flux_state_dict(seed: int = 0, comfyui_dir: str | None = None) -> dict:
    import torch
    comfy, _ = _import_comfy(comfyui_dir)
    import dataclasses

    from comfy.ldm.flux.model import Flux, FluxParams
    ops = comfy.ops.disable_weight_init
    flux = Flux(**flux_params(dataclasses.fields(FluxParams)), dtype=torch.float16, device="cpu", operations=ops)
    _init_module(flux, "", seed, norm_scale_names=("scale",))
    sd = {}
    for k, v in flux.state_dict().items():
        if k.endswith("_norm.weight"):
            # Newer ComfyUI (0.33.0) builds the q/k RMSNorms as torch.nn.RMSNorm ("weight", which _init_module
            # filled like a bias, ~0) and renames a file's "_norm.scale" on load (supported_models.Flux); Flux
            # files and 0.3.64 name it "scale". Written as "scale" with the gain 0.3.64's build gives it, so the
            # fixture is the same file whichever ComfyUI builds it.
            k = k[:-len("weight")] + "scale"
            t = torch.empty(v.shape, dtype=torch.float32).normal_(0.0, 0.05, generator=_generator(seed, k))
            v = (t + 1.0).to(v.dtype)
        sd[k] = v.detach().to(torch.float16).contiguous()
    del flux
    return sd


BUILDERS = {"sd3": build_sd3_state_dict, "sdxl": build_sdxl_state_dict, "flux": build_flux_state_dict}
ARCHITECTURES = {
    "sd3": "sd3-reduced-random (ComfyUI MMDiT + CLIP-L + TAESD3)",
    "sdxl": "sdxl-reduced-random (ComfyUI UNetModel detected as Segmind_Vega/SDXL + CLIP-L + CLIP-G + TAESDXL)",
    "flux": "flux-dev-reduced-random (ComfyUI Flux, 1 double + 1 single block, diffusion model only)",
}


def check_finite(sd: dict, variant: str) -> None:
    """Refuse a state dict with NaN/Inf (an uninitialised tensor): the float model would sample garbage."""
    import torch

    bad = sorted(k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise SystemExit(f"make_fixture.py --variant {variant}: non-finite values in {len(bad)} tensor(s), "
                         f"left uninitialised? {', '.join(bad[:5])}")


def make_fixture(variant: str = DEFAULT_VARIANT, seed: int = 0, out: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, comfyui_dir: str | None = None,
                 force: bool = False) -> Path:
    """Build (or reuse) the checkpoint and return its path. Writes atomically (tmp file + rename)."""
    path = Path(out) if out else fixture_path(variant, seed, cache_dir)
    if path.is_file() and not force:
        return path
    from safetensors.torch import save_file
    sd = BUILDERS[variant](seed, comfyui_dir) if variant in BUILDERS else build_state_dict(variant, seed, comfyui_dir)
    check_finite(sd, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # One metadata key: safetensors writes the metadata map in hash order, so several keys would make the
    # header (and the file's bytes) differ from run to run.
    version = SD3_FIXTURE_VERSION if variant == "sd3" else FIXTURE_VERSION
    meta = {"lowbit_fixture": json.dumps({"version": version, "variant": variant, "seed": seed,
            "architecture": ARCHITECTURES.get(variant, "sd15-reduced-random (ComfyUI UNetModel + CLIP-L + TAESD)")},
            sort_keys=True)}
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"),
                    help="ComfyUI source tree to import comfy from (default: $COMFYUI_DIR, else sys.path)")
    ap.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(VARIANTS) + list(EXTRA_VARIANTS),
                    help="an SD1.5-class UNet size, or sd3: a reduced SD3 (MMDiT, CLIP-L only, TAESD 16 channels), "
                         "sdxl: a reduced SDXL (Segmind Vega depths at 320 channels, CLIP-L + CLIP-G, TAESDXL), "
                         "flux: a reduced Flux dev diffusion model (1 double + 1 single block, no text encoder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="write here instead of the cache")
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = make_fixture(a.variant, a.seed, a.out, a.cache_dir, a.comfyui_dir, a.force)
    print(f"# fixture ready in {time.perf_counter() - t0:.1f}s ({path.stat().st_size / 2**20:.0f} MiB)",
          file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
