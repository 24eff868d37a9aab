"""Train the zoo model ``rgb``: ``python -m lowbit.models.zoo.train_rgb [--out-dir DIR] [--steps N]``.

Data: 16x16 RGB crops of six photos that ship inside pip packages (scikit-learn's ``china.jpg`` and
``flower.jpg``, scikit-image's astronaut, coffee, chelsea and rocket), each downscaled (antialiased) to a
shorter side of 64 px; the class is the photo. Every image is cut into vertical stripes 20 px wide; every
third stripe (k % 3 == 1) is held out (crops never straddle stripes), so held-out crops cover the whole photo but no
training crop overlaps them. Trains (seeded, CPU) a source-photo classifier (the metric's feature space),
then a class-conditional ``UNet2DModel`` (cosine betas, v-prediction, no attention, scale-shift time
conditioning, 10% label dropout to the null class 6), and writes ``rgb.safetensors`` (EMA weights) and
``rgb_eval.safetensors`` (classifier + held-out crops). Needs scikit-learn and scikit-image.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import DIR, alphas_cumprod, features, frechet, predictions, save_file_with_header, save_grid, \
    train_featurenet, train_loop
from .rgb import CLASS_NAMES, EVAL_PATH, SCHEDULE, TYPE_EVAL, TYPE_MODEL, UNET_CONFIG, WEIGHTS_PATH, build_unet

SHORT_SIDE = 64
STRIPE = 20
CROP = 16


def _log(msg):
    print(f"[train_rgb {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_photos() -> list:
    """Six float tensors ``[3, H, W]`` in [-1, 1], shorter side ``SHORT_SIDE``, in ``CLASS_NAMES`` order."""
    try:
        import skimage.data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover
        raise ImportError("training the rgb zoo model needs `pip install scikit-learn scikit-image`") from exc
    sk = dict(zip(("china", "flower"), load_sample_images().images))
    arrays = {"china": sk["china"], "flower": sk["flower"], "astronaut": skd.astronaut(), "coffee": skd.coffee(),
              "chelsea": skd.chelsea(), "rocket": skd.rocket()}
    out = []
    for name in CLASS_NAMES:
        x = torch.from_numpy(arrays[name][..., :3].copy()).permute(2, 0, 1).float()[None] / 255.0
        h, w = x.shape[-2:]
        s = SHORT_SIDE / min(h, w)
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
        out.append((x[0] * 2 - 1).clamp(-1, 1))
    return out


def crops(photos, n_per_class: int, heldout: bool, g: torch.Generator):
    """``n_per_class`` random 16x16 crops per photo from the training (or held-out) stripes."""
    xs, ys = [], []
    for c, img in enumerate(photos):
        _, h, w = img.shape
        stripes = [k for k in range(w // STRIPE) if (k % 3 == 1) == heldout]
        k = torch.tensor(stripes)[torch.randint(len(stripes), (n_per_class,), generator=g)]
        ox = k * STRIPE + torch.randint(STRIPE - CROP + 1, (n_per_class,), generator=g)
        oy = torch.randint(h - CROP + 1, (n_per_class,), generator=g)
        xs.append(torch.stack([img[:, y:y + CROP, x:x + CROP] for x, y in zip(ox.tolist(), oy.tolist())]))
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def flip(x, g):
    m = torch.rand(x.shape[0], generator=g) < 0.5
    x = x.clone()
    x[m] = x[m].flip(-1)
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.models.zoo.train_rgb", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--eval-samples", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    photos = load_photos()
    g = torch.Generator().manual_seed(a.seed)
    x_tr, y_tr = crops(photos, 2000, False, g)
    x_he, y_he = crops(photos, 100, True, g)
    _log(f"data: {x_tr.shape[0]} training crops, {x_he.shape[0]} held-out crops, photos "
         f"{[tuple(ph.shape[1:]) for ph in photos]}")

    t0 = time.time()
    clf = train_featurenet(x_tr, y_tr, heads=[len(CLASS_NAMES)], seed=a.seed, steps=a.classifier_steps,
                           augment=flip, log=_log)
    clf_acc = float((predictions(clf, x_he)[:, 0] == y_he).float().mean())
    clf_info = {"steps": a.classifier_steps, "heldout_accuracy": round(clf_acc, 4),
                "seconds": round(time.time() - t0, 1),
                "augmentation": "horizontal flip, noise std 0.05"}
    _log(f"classifier: held-out accuracy {clf_acc:.4f} ({clf_info['seconds']}s)")
    half = torch.arange(x_he.shape[0]) % 2 == 0
    rvr = frechet(features(clf, x_he[half]), features(clf, x_he[~half]))
    tvh = frechet(features(clf, x_tr[torch.randperm(x_tr.shape[0], generator=g)[:x_he.shape[0]]]), features(clf, x_he))
    _log(f"real-vs-real FID: held-out halves {rvr:.3f}, train vs held-out (600/600) {tvh:.3f}")

    unet = build_unet(UNET_CONFIG)
    n_params = sum(q.numel() for q in unet.parameters())
    _log(f"unet: {n_params:,} parameters")
    acp = alphas_cumprod(SCHEDULE["beta_schedule"], SCHEDULE["num_train_timesteps"]).float()
    T = SCHEDULE["num_train_timesteps"]
    null = len(CLASS_NAMES)

    def loss_fn(step, gen):
        idx = torch.randint(x_tr.shape[0], (a.batch_size,), generator=gen)
        x0 = flip(x_tr[idx], gen)
        c = y_tr[idx].clone()
        c[torch.rand(c.shape, generator=gen) < a.label_dropout] = null
        t = torch.randint(0, T, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = acp[t].sqrt().view(-1, 1, 1, 1)
        s1 = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        xt = s * x0 + s1 * noise
        v = s * noise - s1 * x0
        return F.mse_loss(unet(xt, t, class_labels=c).sample, v)

    (ema,), info = train_loop(unet, loss_fn, steps=a.steps, lr=a.lr, ema_decay=a.ema_decay, seed=a.seed, log=_log)
    info.update(batch_size=a.batch_size, label_dropout=a.label_dropout, loss="MSE on v, t ~ U[0, T)",
                augmentation="random crops from the training stripes, horizontal flip", parameters=n_params)
    header = {"unet_config": UNET_CONFIG, "schedule": SCHEDULE, "class_names": list(CLASS_NAMES),
              "null_class": null, "training": info,
              "data": {"photos": "sklearn china/flower, skimage astronaut/coffee/chelsea/rocket",
                       "short_side": SHORT_SIDE, "stripe": STRIPE, "heldout": "stripes k % 3 == 1"}}
    save_file_with_header(ema.state_dict(), a.out_dir / WEIGHTS_PATH.name, TYPE_MODEL, header)
    save_file_with_header({**{f"classifier.{k}": v for k, v in clf.state_dict().items()},
                           "heldout_images": x_he.half(), "heldout_labels": y_he},
                          a.out_dir / EVAL_PATH.name, TYPE_EVAL,
                          {"classifier_config": clf.config, "classifier": clf_info,
                           "real_vs_real_fid_300_300": round(rvr, 4), "train_vs_heldout_fid_600_600": round(tvh, 4)})
    _log(f"saved ({info['train_seconds']}s training)")

    if a.eval_samples:
        from . import rgb

        m = rgb.build(a.out_dir)
        t0 = time.time()
        imgs, labels = m.sample(m.denoiser, a.eval_samples, seed=1)
        r = m.metrics(imgs, labels)
        _log(f"eval: {a.eval_samples} samples, 25 steps: {r} ({time.time() - t0:.0f}s)")
        save_grid(imgs[:48], "/tmp/zoo_rgb_samples.png", nrow=12)
        save_grid(x_he[::50][:12], "/tmp/zoo_rgb_real.png", nrow=12)
        header["evaluation"] = {"samples": a.eval_samples, "steps": 25, "seed": 1, **r}
        save_file_with_header(ema.state_dict(), a.out_dir / WEIGHTS_PATH.name, TYPE_MODEL, header)
    _log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
