"""Train the zoo model ``dit_flow``: ``python -m lowbit.models.zoo.train_dit_flow [--out-dir DIR]``.

Needs the shapes VAE and classifier written by ``train_latent_text`` in the same directory. Renders the same
4800 training images as ``train_latent_text`` (same seed), encodes them with the VAE, and trains (seeded, CPU)
a tiny ``FluxTransformer2DModel`` jointly with a word-level text encoder by rectified flow: ``x_s = (1 - s) x0 +
s noise``, target velocity ``noise - x0``, ``s`` logit-normal(0, 1) as in SD3, 10% empty prompts for CFG.
Writes ``dit_flow.safetensors`` (EMA weights).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import DIR, TinyTextEncoder, evaluate_text_model, save_file_with_header, train_loop
from .dit_flow import TRANSFORMER_CONFIG, TYPE_MODEL, WEIGHTS_PATH, build_transformer, image_ids, pack
from .latent_text import ShapesData, prompts_for
from .shapes import NUM_COMBOS, VOCAB
from .train_latent_text import dataset, encode

TEXT_CONFIG = {"vocab": VOCAB, "dim": 64, "max_len": 5, "heads": 4}


def _log(msg):
    print(f"[train_dit_flow {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.models.zoo.train_dit_flow", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=1.0, help="sampling time shift (SD3); 1.0 = plain linspace")
    p.add_argument("--eval-samples", type=int, default=480)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t_start = time.time()

    shapes = ShapesData(a.out_dir)
    x_tr, c_tr = dataset(100, a.seed)
    g = torch.Generator().manual_seed(a.seed + 7)
    lat = pack(encode(shapes.vae, x_tr, g) * shapes.scaling_factor)
    _log(f"data: {lat.shape[0]} latents packed to {tuple(lat.shape[1:])}")

    tr = build_transformer(TRANSFORMER_CONFIG)
    text = TinyTextEncoder(**TEXT_CONFIG)
    n_params = sum(q.numel() for q in tr.parameters())
    _log(f"transformer: {n_params:,} parameters (Linear only: "
         f"{all(not isinstance(m, torch.nn.Conv2d) for m in tr.modules())})")
    tok_all = text.tokenize(prompts_for(range(NUM_COMBOS)))
    tok_empty = text.tokenize([""])[0]
    img_ids = image_ids()
    txt_ids = torch.zeros(TEXT_CONFIG["max_len"], 3)

    def loss_fn(step, gen):
        idx = torch.randint(lat.shape[0], (a.batch_size,), generator=gen)
        x0 = lat[idx]
        tok = tok_all[c_tr[idx]].clone()
        tok[torch.rand(a.batch_size, generator=gen) < a.caption_dropout] = tok_empty
        s = torch.sigmoid(torch.randn(a.batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise
        h, pooled = text(tok)
        v = tr(xs, timestep=s, encoder_hidden_states=h, pooled_projections=pooled, img_ids=img_ids,
               txt_ids=txt_ids).sample
        return F.mse_loss(v, noise - x0)

    (ema, ema_text), info = train_loop(tr, loss_fn, steps=a.steps, lr=a.lr, ema_decay=a.ema_decay, seed=a.seed,
                                       extra_params=[text], log=_log)
    info.update(batch_size=a.batch_size, caption_dropout=a.caption_dropout, parameters=n_params,
                loss="MSE on velocity noise - x0, s ~ logit-normal(0, 1), text encoder trained jointly")
    header = {"transformer_config": TRANSFORMER_CONFIG, "text_config": TEXT_CONFIG, "sampling": {"shift": a.shift},
              "training": info}
    tensors = {**{f"transformer.{k}": v for k, v in ema.state_dict().items()},
               **{f"text.{k}": v for k, v in ema_text.state_dict().items()}}
    save_file_with_header(tensors, a.out_dir / WEIGHTS_PATH.name, TYPE_MODEL, header)
    _log(f"saved ({info['train_seconds']}s training)")

    if a.eval_samples:
        from . import dit_flow

        m = dit_flow.build(a.out_dir)
        header["evaluation"] = evaluate_text_model(m, a.eval_samples, "/tmp/zoo_dit_flow_samples.png", _log)
        save_file_with_header(tensors, a.out_dir / WEIGHTS_PATH.name, TYPE_MODEL, header)
    _log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
