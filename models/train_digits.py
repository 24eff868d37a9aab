"""Train the embedded default model: ``python -m lowbit.models.train_digits [--out-dir DIR] [--steps N] ...``

Trains (seeded, CPU) on the 1397-image training split of scikit-learn digits:
  1. a small CNN classifier (the feature space of our FID, and the class-accuracy judge);
  2. a class-conditional DDPM (diffusers UNet2DModel, 1000 steps, linear betas, epsilon prediction, 10% label
     dropout to the null class for classifier-free guidance, EMA weights are saved);
then evaluates the DDPM (FID in the classifier's feature space vs the 400 held-out digits, class accuracy)
and writes ``digits_heldout.safetensors``, ``digits_classifier.safetensors`` and ``digits_ddpm.safetensors``
(default: next to this file). Needs scikit-learn. Results are reproducible for a fixed seed and thread count.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .classifier import CLASSIFIER_DEFAULTS, DigitClassifier
from .data import (
    HELDOUT_PER_CLASS,
    NULL_CLASS,
    NUM_CLASSES,
    SPLIT_SEED,
    load_raw_digits,
    preprocess,
    random_shift,
    split_indices,
)
from .digits import (
    FORMAT_VERSION,
    SCHEDULER_CONFIG,
    TYPE_CLASSIFIER,
    TYPE_DDPM,
    TYPE_HELDOUT,
    UNET_CONFIG,
    build_unet,
    save_with_header,
)
from .zoo.common import batches  # the zoo's training scripts draw batches the same way

_HERE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[train_digits {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------- classifier
def train_classifier(x, y, x_val, y_val, *, seed: int, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                     shift: int = 1, noise_std: float = 0.1):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(**CLASSIFIER_DEFAULTS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    model.train()
    for step, idx in enumerate(batches(x.shape[0], batch_size, steps, g)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=50)
        xb = random_shift(x[idx], shift, g)
        xb = (xb + noise_std * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        raw_feats = model.embed(model.body(x)).double()
        scale = float(1.0 / raw_feats.var(0).mean().sqrt())
    cfg = dict(model.config, feature_scale=round(scale, 6))
    state = model.state_dict()
    model = DigitClassifier(**cfg)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        acc = float((model(x_val).argmax(1) == y_val).float().mean())
        train_acc = float((model(x).argmax(1) == y).float().mean())
    info = {"seed": seed, "epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr,
            "optimizer": "AdamW(wd=1e-4), warmup 50 + cosine",
            "augmentation": f"shift +-{shift}px, noise std {noise_std}",
            "heldout_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4),
            "feature_scale": "1 / sqrt(mean per-dim variance of the training images' raw features)"}
    return model.requires_grad_(False), info


# ------------------------------------------------------------------------------------------- DDPM
def train_ddpm(x, y, *, seed: int, steps: int, batch_size: int, lr: float, ema_decay: float, label_dropout: float,
               shift: int, warmup: int = 100, log_every: int = 100, eval_every: int = 0, eval_fn=None):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    unet = build_unet(UNET_CONFIG)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod.float()
    T = SCHEDULER_CONFIG["num_train_timesteps"]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    unet.train()
    t0 = time.time()
    running = 0.0
    for step, idx in enumerate(batches(x.shape[0], batch_size, steps, g)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=warmup)
        x0 = random_shift(x[idx], shift, g)
        c = y[idx].clone()
        c[torch.rand(c.shape, generator=g) < label_dropout] = NULL_CLASS
        t = torch.randint(0, T, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        running += loss.item()
        if (step + 1) % log_every == 0:
            el = time.time() - t0
            _log(f"ddpm step {step + 1}/{steps} loss {running / log_every:.4f} "
                 f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
            running = 0.0
        if eval_every and eval_fn is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            eval_fn(ema, step + 1)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
            "optimizer": "AdamW(wd=0), linear warmup + cosine to 5%, grad clip 1.0",
            "ema_decay": ema_decay, "label_dropout": label_dropout, "augmentation": f"shift +-{shift}px",
            "loss": "MSE on epsilon, t ~ U[0, T)", "train_seconds": round(time.time() - t0, 1)}
    return ema, info


# ------------------------------------------------------------------------------------------- main
def _evaluate(unet, classifier, heldout_x, *, n_per_class: int, steps: int, guidance: float, seed: int,
              demo_sampler: bool = False):
    from diffusers import DDPMScheduler

    from .metrics import class_accuracy, fid
    from .sample import sample

    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    t0 = time.time()
    # demo_sampler: the sampler of `lowbit demo` (timesteps linspace(999, 0), no x0 clipping)
    imgs = sample(unet, labels, steps=steps, eta=0.0, guidance=guidance, seed=seed, batch_size=500,
                  scheduler=DDPMScheduler(**SCHEDULER_CONFIG), clip_x0=not demo_sampler,
                  spacing="linspace" if demo_sampler else "leading")
    return {"samples": int(labels.numel()), "ddim_steps": steps, "eta": 0.0, "guidance": guidance, "seed": seed,
            "sampler": "linspace(999,0), no x0 clip (demo)" if demo_sampler else "leading, x0 clipped",
            "fid_vs_heldout": round(fid(imgs, heldout_x, classifier), 3),
            "class_accuracy": round(class_accuracy(imgs, labels, classifier), 4),
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.models.train_digits", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=_HERE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5000, help="DDPM optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay (with the warm-up min(decay, (1 + step) / (10 + step)))")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=0, help="DDPM random-shift augmentation in pixels")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--eval-per-class", type=int, default=100, help="final evaluation samples per class (0: skip)")
    p.add_argument("--eval-every", type=int, default=0, help="quick EMA evaluation every N steps (0: off)")
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    raw, labels = load_raw_digits()
    train_idx, held_idx = split_indices(labels)
    x_all = preprocess(raw)
    x_tr, y_tr = x_all[train_idx], labels[train_idx]
    x_he, y_he = x_all[held_idx], labels[held_idx]
    _log(f"data: {x_tr.shape[0]} train, {x_he.shape[0]} held-out")
    split = {"dataset": "sklearn.datasets.load_digits", "n_train": int(x_tr.shape[0]), "n_heldout": int(x_he.shape[0]),
             "split": f"stratified, {HELDOUT_PER_CLASS} per class held out, torch.randperm seed {SPLIT_SEED}",
             "preprocess": "x/16, bilinear 8x8->16x16 (align_corners=False), *2-1"}

    save_with_header(
        {"images": x_he.half(), "images_8x8": raw[held_idx].contiguous(), "labels": y_he,
         "indices": held_idx},
        args.out_dir / "digits_heldout.safetensors", TYPE_HELDOUT,
        {"count": int(x_he.shape[0]), "image_size": 16, "range": [-1.0, 1.0], **split},
    )

    t0 = time.time()
    clf, clf_info = train_classifier(x_tr, y_tr, x_he, y_he, seed=args.seed, epochs=args.classifier_epochs)
    clf_info["train_seconds"] = round(time.time() - t0, 1)
    _log(f"classifier: held-out accuracy {clf_info['heldout_accuracy']:.4f} ({clf_info['train_seconds']}s)")
    save_with_header(clf.state_dict(), args.out_dir / "digits_classifier.safetensors", TYPE_CLASSIFIER,
                     {"config": clf.config, "training": {**clf_info, **split},
                      "features": "embed (penultimate, pre-ReLU) * feature_scale"})

    def quick_eval(model, step):
        r = _evaluate(model, clf, x_he, n_per_class=20, steps=25, guidance=args.eval_guidance[0], seed=123,
                      demo_sampler=True)
        _log(f"  eval @ {step}: FID {r['fid_vs_heldout']:.2f} acc {r['class_accuracy']:.3f} "
             f"(200 samples, 20 DDIM steps, guidance {r['guidance']})")

    ema, ddpm_info = train_ddpm(x_tr, y_tr, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                ema_decay=args.ema_decay, label_dropout=args.label_dropout, shift=args.shift,
                                eval_every=args.eval_every, eval_fn=quick_eval)
    header = {"unet_config": UNET_CONFIG, "scheduler_config": SCHEDULER_CONFIG, "training": {**ddpm_info, **split},
              "null_class": NULL_CLASS, "num_classes": NUM_CLASSES, "weights": "EMA, fp32",
              "format_version": FORMAT_VERSION}
    ddpm_path = args.out_dir / "digits_ddpm.safetensors"
    save_with_header(ema.state_dict(), ddpm_path, TYPE_DDPM, header)
    _log(f"ddpm: saved {ddpm_path} ({ddpm_info['train_seconds']}s)")

    if args.eval_per_class > 0:
        from .metrics import fid

        evals = []
        for gs in args.eval_guidance:
            for demo in (False, True):
                r = _evaluate(ema, clf, x_he, n_per_class=args.eval_per_class, steps=25, guidance=gs, seed=1,
                              demo_sampler=demo)
                _log(f"eval: {r}")
                evals.append(r)
        half = torch.cat([torch.nonzero(y_he == c).flatten()[: HELDOUT_PER_CLASS // 2] for c in range(NUM_CLASSES)])
        rest = torch.ones(x_he.shape[0], dtype=torch.bool)
        rest[half] = False
        rvr = round(fid(x_he[half], x_he[rest], clf), 3)
        _log(f"eval: real-vs-real FID (held-out halves 200/200) {rvr}")
        header["evaluation"] = {"fp_samples": evals, "real_vs_real_fid_200_200": rvr,
                                "classifier_heldout_accuracy": clf_info["heldout_accuracy"]}
        save_with_header(ema.state_dict(), ddpm_path, TYPE_DDPM, header)
    _log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
