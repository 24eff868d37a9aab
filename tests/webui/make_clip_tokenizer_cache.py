"""An offline Hugging Face cache entry for ``openai/clip-vit-large-patch14`` (tokenizer and text config, no weights),
which A1111 loads by name for every SD1.x checkpoint (ldm's ``FrozenCLIPEmbedder``: ``CLIPTokenizer.from_pretrained``,
and ``CLIPTextModel.from_pretrained(None, config=name, state_dict={})`` under A1111's ``sd_disable_initialization``).

Nothing is downloaded: CLIP's byte-pair vocabulary ships inside pip packages A1111 installs anyway
(``bpe_simple_vocab_16e6.txt.gz`` in open_clip and in OpenAI's ``clip``). From it this writes the same
``vocab.json`` (49408 tokens) and ``merges.txt`` (48894 merges) as the hub repository's, checked equal to the copy
Forge ships (``backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer``), plus the tokenizer settings and a
CLIP-L ``config.json``. Point A1111 at it with ``HF_HOME=<out> HF_HUB_OFFLINE=1``.

    python make_clip_tokenizer_cache.py OUT [--bpe PATH]   # run with A1111's python to find the BPE file
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # made up: the cache only needs refs/main to name a snapshot folder
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>"}
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1, model_type="clip_text_model")
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=14, hidden_act="quick_gelu", projection_dim=768, model_type="clip_vision_model")


def find_bpe() -> Path:
    """CLIP's BPE file from an installed package (open_clip or OpenAI's clip), without importing it (open_clip
    imports torch)."""
    for pkg in ("open_clip", "clip"):
        spec = importlib.util.find_spec(pkg)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / BPE_NAME
            if path.is_file():
                return path
    raise FileNotFoundError(f"no {BPE_NAME} in an installed open_clip or clip package; pass --bpe")


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def vocab_and_merges(bpe: Path) -> tuple[list[str], list[str]]:
    """CLIP's SimpleTokenizer construction: bytes, bytes + '</w>', one token per merge, then the two specials."""
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = bytes_to_unicode()
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges] + [SPECIAL["bos_token"],
                                                                                       SPECIAL["eos_token"]]
    if len(vocab) != TEXT["vocab_size"]:
        raise ValueError(f"{bpe}: {len(vocab)} tokens, expected {TEXT['vocab_size']}")
    return vocab, merges


def build(hf_home: Path, bpe: Path | None = None) -> Path:
    """Write the cache entry under ``hf_home`` (idempotent); returns the snapshot folder."""
    vocab, merges = vocab_and_merges(bpe or find_bpe())
    repo = Path(hf_home) / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(SPECIAL),
        "tokenizer_config.json": json.dumps(dict(SPECIAL, add_prefix_space=False, errors="replace", do_lower_case=True,
                                                 model_max_length=77, tokenizer_class="CLIPTokenizer")),
        "config.json": json.dumps(dict(architectures=["CLIPModel"], model_type="clip", projection_dim=768,
                                       logit_scale_init_value=2.6592, text_config=TEXT, vision_config=VISION),
                                  indent=1),
    }
    for name, text in files.items():
        tmp = snap / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, snap / name)
    (repo / "refs" / "main").write_text(REVISION)
    (Path(hf_home) / "hub" / "version.txt").write_text("1")  # transformers 4.30: no cache-migration pass at import
    return snap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the HF_HOME folder to write")
    ap.add_argument("--bpe", type=Path, help=f"CLIP's {BPE_NAME} (default: found in open_clip or clip)")
    args = ap.parse_args(argv)
    print(build(args.out, args.bpe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
