"""Noisy ("salt-and-pepper") full-precision samples of the default model, per class, with the demo's sampler:

    python -m lowbit.models.noisy [--samples 200] [--steps 25] [--seed 7] [--weights FILE] [--grid PNG]

Samples exactly what ``lowbit demo`` samples for its full-precision row (``lowbit.recipes.evaluate``: DDIM eta
0 over ``linspace(999, 0, steps)``, x0 clipped, guidance 1, labels ``arange(n) % 10``, seed 7) and prints, per
class, how many samples are rougher than every held-out real digit (``lowbit.models.metrics.noisy_mask``),
then FID and class accuracy. ``--weights`` evaluates another ``digits_ddpm.safetensors`` (e.g. a retrained one
in a scratch folder); ``--grid`` writes one row per class with the noisy samples framed in red.
"""
from __future__ import annotations

import argparse
import time


def save_class_grid(images, labels, mask, path, per_row: int = 20, scale: int = 4) -> None:
    """PNG: row c holds the first ``per_row`` samples of class c; samples with ``mask`` True framed in red."""
    import torch
    from PIL import Image

    pad, size = 1, images.shape[-1]
    cell = size + 2 * pad
    n_cls = int(labels.max()) + 1
    out = torch.zeros(3, n_cls * cell, per_row * cell)
    seen = [0] * n_cls
    for img, c, bad in zip(images, labels.tolist(), mask.tolist()):
        j = seen[c]
        seen[c] += 1
        if j >= per_row:
            continue
        y, x = c * cell, j * cell
        if bad:
            out[0, y:y + cell, x:x + cell] = 1.0
        out[:, y + pad:y + pad + size, x + pad:x + pad + size] = (img[0].float().clamp(-1, 1) + 1) / 2
    arr = (out.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    im = Image.fromarray(arr, mode="RGB")
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.models.noisy", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=200, help="samples (labels arange(n) %% 10); default 200")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps; default 25 (the demo's)")
    p.add_argument("--seed", type=int, default=7, help="seed of recipes.evaluate; default 7 (the demo's)")
    p.add_argument("--weights", default=None, help="a digits_ddpm.safetensors; default: the embedded model")
    p.add_argument("--grid", default=None, metavar="PNG", help="write a per-class grid, noisy samples framed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)

    import torch

    from .. import recipes
    from .digits import NULL_CLASS, default_scheduler, load_default_unet
    from .metrics import class_accuracy, fid, noisy_mask

    if a.threads:
        torch.set_num_threads(a.threads)
    unet = load_default_unet(a.weights)
    setup = recipes.Setup(unet, default_scheduler(a.weights).alphas_cumprod.float(), NULL_CLASS, (1, 16, 16))
    t0 = time.time()
    images, labels = recipes.generate(setup, unet, a.samples, steps=a.steps, seed=a.seed)
    dt = time.time() - t0
    mask = noisy_mask(images)
    per_class = torch.bincount(labels[mask], minlength=10).tolist()
    total = torch.bincount(labels, minlength=10).tolist()
    print("class  " + " ".join(f"{c:>4d}" for c in range(10)) + "   all")
    print("noisy  " + " ".join(f"{k:>4d}" for k in per_class) + f"  {int(mask.sum()):>4d}")
    print("of     " + " ".join(f"{k:>4d}" for k in total) + f"  {a.samples:>4d}")
    print(f"noisy {int(mask.sum())}/{a.samples}  FID {fid(images):.3f}  acc {class_accuracy(images, labels):.3f}  "
          f"({a.steps} steps, seed {a.seed}, sampling {dt:.1f}s)")
    if a.grid:
        save_class_grid(images, labels, mask, a.grid)
        print(f"grid: {a.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
