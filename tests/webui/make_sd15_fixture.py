"""A deterministic, randomly initialised, full-architecture SD1.5 checkpoint for host integration tests.

Nothing is downloaded. The file is a single fp16 safetensors in the original LDM key layout
(`model.diffusion_model.*`, `cond_stage_model.transformer.text_model.*`, `first_stage_model.*`), with the
full KL VAE (Forge builds its VAE from the fixed diffusers config, so a TAESD fixture would not load there)
and the full CLIP-L text encoder: Forge, A1111 and ComfyUI all detect and load it as SD1.5.

The key/shape table is written out from the known SD1.5 configs (the same numbers as Forge's
backend/huggingface/runwayml/stable-diffusion-v1-5/{unet,vae,text_encoder}/config.json) rather than from
diffusers/transformers modules, so the bytes depend on torch's RNG only, not on the installed library
versions: every tensor comes from its own generator seeded by (FIXTURE_VERSION, key). tests check the table
against diffusers' own LDM converter (tests/webui/test_forge_integration.py).

    python tests/webui/make_sd15_fixture.py [--out PATH]     # prints the path (cached by version)
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from pathlib import Path

# Bump when the table or the initialisation changes: the cache file name carries it.
FIXTURE_VERSION = "sd15-random-ldm-v1"
FILE_NAME = f"lowbit-{FIXTURE_VERSION}.safetensors"

# SD1.5 numbers (runwayml/stable-diffusion-v1-5 unet, vae and text_encoder configs).
UNET_CH = 320
UNET_MULT = (1, 2, 4, 4)          # block_out_channels 320, 640, 1280, 1280
UNET_RES = 2                      # layers_per_block
UNET_ATTN_LEVELS = (0, 1, 2)      # CrossAttnDownBlock2D x3, DownBlock2D
CONTEXT_DIM = 768
VAE_CH = 128
VAE_MULT = (1, 2, 4, 4)           # block_out_channels 128, 256, 512, 512
VAE_RES = 2
CLIP_DIM, CLIP_LAYERS, CLIP_FF, CLIP_VOCAB, CLIP_POS = 768, 12, 3072, 49408, 77

# kinds: "w" weight (normal, std 1/sqrt(fan_in)), "b" bias (0), "n" norm scale (1), "e" embedding (std 0.02)
Spec = dict  # key -> (shape tuple, kind)


def _norm(s: Spec, p: str, c: int) -> None:
    s[p + ".weight"] = ((c,), "n")
    s[p + ".bias"] = ((c,), "b")


def _conv(s: Spec, p: str, cin: int, cout: int, k: int = 3, bias: bool = True) -> None:
    s[p + ".weight"] = ((cout, cin, k, k), "w")
    if bias:
        s[p + ".bias"] = ((cout,), "b")


def _linear(s: Spec, p: str, cin: int, cout: int, bias: bool = True) -> None:
    s[p + ".weight"] = ((cout, cin), "w")
    if bias:
        s[p + ".bias"] = ((cout,), "b")


def _unet_resblock(s: Spec, p: str, cin: int, cout: int, emb: int) -> None:
    _norm(s, p + ".in_layers.0", cin)
    _conv(s, p + ".in_layers.2", cin, cout)
    _linear(s, p + ".emb_layers.1", emb, cout)
    _norm(s, p + ".out_layers.0", cout)
    _conv(s, p + ".out_layers.3", cout, cout)
    if cin != cout:
        _conv(s, p + ".skip_connection", cin, cout, k=1)


def _unet_transformer(s: Spec, p: str, c: int) -> None:
    # SD1.x: conv proj_in/proj_out (use_linear_in_transformer=False), one BasicTransformerBlock.
    _norm(s, p + ".norm", c)
    _conv(s, p + ".proj_in", c, c, k=1)
    b = p + ".transformer_blocks.0"
    for attn, kv_dim in (("attn1", c), ("attn2", CONTEXT_DIM)):
        _linear(s, f"{b}.{attn}.to_q", c, c, bias=False)
        _linear(s, f"{b}.{attn}.to_k", kv_dim, c, bias=False)
        _linear(s, f"{b}.{attn}.to_v", kv_dim, c, bias=False)
        _linear(s, f"{b}.{attn}.to_out.0", c, c)
    _linear(s, b + ".ff.net.0.proj", c, 8 * c)   # GEGLU: 2 x 4c
    _linear(s, b + ".ff.net.2", 4 * c, c)
    for n in ("norm1", "norm2", "norm3"):
        _norm(s, f"{b}.{n}", c)
    _conv(s, p + ".proj_out", c, c, k=1)


def unet_spec(prefix: str = "model.diffusion_model.") -> Spec:
    s: Spec = {}
    emb = 4 * UNET_CH
    _linear(s, prefix + "time_embed.0", UNET_CH, emb)
    _linear(s, prefix + "time_embed.2", emb, emb)
    _conv(s, prefix + "input_blocks.0.0", 4, UNET_CH)
    chans = [UNET_CH]
    ch, idx = UNET_CH, 1
    for level, mult in enumerate(UNET_MULT):
        for _ in range(UNET_RES):
            out = UNET_CH * mult
            _unet_resblock(s, f"{prefix}input_blocks.{idx}.0", ch, out, emb)
            ch = out
            if level in UNET_ATTN_LEVELS:
                _unet_transformer(s, f"{prefix}input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(UNET_MULT) - 1:
            _conv(s, f"{prefix}input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            idx += 1
    _unet_resblock(s, prefix + "middle_block.0", ch, ch, emb)
    _unet_transformer(s, prefix + "middle_block.1", ch)
    _unet_resblock(s, prefix + "middle_block.2", ch, ch, emb)
    idx = 0
    for level, mult in reversed(list(enumerate(UNET_MULT))):
        for i in range(UNET_RES + 1):
            skip = chans.pop()
            out = UNET_CH * mult
            _unet_resblock(s, f"{prefix}output_blocks.{idx}.0", ch + skip, out, emb)
            ch = out
            sub = 1
            if level in UNET_ATTN_LEVELS:
                _unet_transformer(s, f"{prefix}output_blocks.{idx}.1", ch)
                sub = 2
            if level and i == UNET_RES:
                _conv(s, f"{prefix}output_blocks.{idx}.{sub}.conv", ch, ch)
            idx += 1
    _norm(s, prefix + "out.0", ch)
    _conv(s, prefix + "out.2", ch, 4)
    return s


def _vae_resblock(s: Spec, p: str, cin: int, cout: int) -> None:
    _norm(s, p + ".norm1", cin)
    _conv(s, p + ".conv1", cin, cout)
    _norm(s, p + ".norm2", cout)
    _conv(s, p + ".conv2", cout, cout)
    if cin != cout:
        _conv(s, p + ".nin_shortcut", cin, cout, k=1)


def _vae_mid(s: Spec, p: str, c: int) -> None:
    _vae_resblock(s, p + ".block_1", c, c)
    _norm(s, p + ".attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(s, f"{p}.attn_1.{n}", c, c, k=1)
    _vae_resblock(s, p + ".block_2", c, c)


def vae_spec(prefix: str = "first_stage_model.") -> Spec:
    s: Spec = {}
    e, d = prefix + "encoder", prefix + "decoder"
    _conv(s, e + ".conv_in", 3, VAE_CH)
    ch = VAE_CH
    for level, mult in enumerate(VAE_MULT):
        for i in range(VAE_RES):
            _vae_resblock(s, f"{e}.down.{level}.block.{i}", ch, VAE_CH * mult)
            ch = VAE_CH * mult
        if level != len(VAE_MULT) - 1:
            _conv(s, f"{e}.down.{level}.downsample.conv", ch, ch)
    _vae_mid(s, e + ".mid", ch)
    _norm(s, e + ".norm_out", ch)
    _conv(s, e + ".conv_out", ch, 8)          # 2 x latent channels (mean, logvar)
    _conv(s, prefix + "quant_conv", 8, 8, k=1)
    _conv(s, prefix + "post_quant_conv", 4, 4, k=1)
    ch = VAE_CH * VAE_MULT[-1]
    _conv(s, d + ".conv_in", 4, ch)
    _vae_mid(s, d + ".mid", ch)
    for level, mult in reversed(list(enumerate(VAE_MULT))):
        for i in range(VAE_RES + 1):
            _vae_resblock(s, f"{d}.up.{level}.block.{i}", ch, VAE_CH * mult)
            ch = VAE_CH * mult
        if level != 0:
            _conv(s, f"{d}.up.{level}.upsample.conv", ch, ch)
    _norm(s, d + ".norm_out", ch)
    _conv(s, d + ".conv_out", ch, 3)
    return s


def clip_spec(prefix: str = "cond_stage_model.transformer.text_model.") -> Spec:
    s: Spec = {}
    s[prefix + "embeddings.token_embedding.weight"] = ((CLIP_VOCAB, CLIP_DIM), "e")
    s[prefix + "embeddings.position_embedding.weight"] = ((CLIP_POS, CLIP_DIM), "e")
    for i in range(CLIP_LAYERS):
        p = f"{prefix}encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{p}.self_attn.{n}", CLIP_DIM, CLIP_DIM)
        _norm(s, p + ".layer_norm1", CLIP_DIM)
        _linear(s, p + ".mlp.fc1", CLIP_DIM, CLIP_FF)
        _linear(s, p + ".mlp.fc2", CLIP_FF, CLIP_DIM)
        _norm(s, p + ".layer_norm2", CLIP_DIM)
    _norm(s, prefix + "final_layer_norm", CLIP_DIM)
    return s


def sd15_spec() -> Spec:
    s = unet_spec()
    s.update(clip_spec())
    s.update(vae_spec())
    return s


def _tensor(key: str, shape: tuple, kind: str):
    import torch

    if kind == "b":
        return torch.zeros(shape, dtype=torch.float16)
    if kind == "n":
        return torch.ones(shape, dtype=torch.float16)
    seed = int.from_bytes(hashlib.sha256(f"{FIXTURE_VERSION}/{key}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    std = 0.02 if kind == "e" else 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(torch.float16)


def default_cache_dir() -> Path:
    env = os.environ.get("LOWBIT_FIXTURE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / "fixtures"


def build(out: Path) -> Path:
    """Write the checkpoint to `out` (atomically) and return it."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _tensor(k, shape, kind) for k, (shape, kind) in sd15_spec().items()}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # One metadata key only: safetensors writes metadata from a hash map, so with two keys their order (and
    # the file's sha256, which the WebUI shows as the model hash) would change from run to run.
    save_file(tensors, str(tmp), metadata={"lowbit_fixture": FIXTURE_VERSION})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def ensure_fixture(cache_dir: Path | None = None) -> Path:
    """Path of the cached checkpoint, building it (about 2.1 GB, ~30 s) when missing or of another version."""
    path = Path(cache_dir or default_cache_dir()) / FILE_NAME
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("lowbit_fixture") == FIXTURE_VERSION:
                    return path
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    return build(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write here instead of the version-keyed cache")
    ap.add_argument("--cache-dir", type=Path,
                    help="cache folder (default $LOWBIT_FIXTURE_CACHE or ~/.cache/lowbit/fixtures)")
    args = ap.parse_args(argv)
    path = build(args.out) if args.out else ensure_fixture(args.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
