"""Recipes: the main jobs on the embedded default model, shared by the CLI, the gradio UI and the benches.

Each recipe is a few calls into ``lowbit.quant`` (the core) and ``lowbit.models`` (the default model); every
quantized model comes from the one pipeline verb ``lowbit.quant.pipeline.run`` (method names: its vocabulary).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .quant import (CallRecorder, FinetuneConfig, PipelineConfig, ReconConfig, guided_eps_fn, pipeline, sample,
                    timestep_aware_subset, weight_bytes)

GUIDANCE = 1.0  # classifier-free guidance for the default model: 1.0 gives its best FID (models/ README)


@dataclass
class Setup:
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor
    null_label: int
    image_shape: tuple


def default_setup() -> Setup:
    from .models import IMAGE_SIZE, NULL_CLASS, default_scheduler, load_default_unet

    unet = load_default_unet()
    return Setup(unet, default_scheduler().alphas_cumprod.float(), NULL_CLASS, (1, IMAGE_SIZE, IMAGE_SIZE))


def labels_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.arange(n) % 10


def generate(setup: Setup, model, n: int, steps: int = 25, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
             guidance: float = GUIDANCE, batch: int = 100, var_fn=None, progress=None, split_guidance=False):
    """(images [n,1,H,W] in [-1,1], labels) sampled with the same seeds for any model."""
    labels = labels_for(n)
    out = []
    for i in range(0, n, batch):
        lab = labels[i:i + batch]
        eps_fn = guided_eps_fn(model, lab, guidance, setup.null_label, split_guidance=split_guidance)
        out.append(sample(eps_fn, (len(lab),) + setup.image_shape, setup.alphas_cumprod, steps=steps,
                          sampler=sampler, eta=eta, seed=seed * 1000 + i, var_fn=var_fn, progress=progress,
                          clip_x0=sampler == "ddim"))  # a pixel-space model (as diffusers' clip_sample)
    return torch.cat(out).clamp(-1, 1), labels


def record_calibration(setup: Setup, n_samples: int = 32, steps: int = 25, seed: int = 1234, eta: float = 0.0,
                       progress=None):
    """UNet calls recorded along full-precision trajectories (cond + uncond batched, CFG)."""
    from .quant.config import check_verb_args

    check_verb_args("record_calibration", calib_samples=n_samples, steps=steps)
    with CallRecorder(setup.unet) as rec:
        generate(setup, setup.unet, n_samples, steps=steps, eta=eta, seed=seed, batch=n_samples, progress=progress)
    return rec.calls


@dataclass
class Built:
    model: torch.nn.Module
    var_fn: Optional[Callable] = None  # PTQD variance calibration (None: not used)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def _plan(precision: Optional[str], size_budget: Optional[float]) -> dict:
    """The per-layer precision plan's PipelineConfig fields that were given (None: the config's default)."""
    return {k: v for k, v in dict(precision=precision, size_budget=size_budget).items() if v is not None}


def build(setup: Setup, method: str, bits: str, calls, deploy: bool = True, recon: Optional[ReconConfig] = None,
          finetune: Optional[FinetuneConfig] = None, stat_calls=None, progress=None, precision: Optional[str] = None,
          size_budget: Optional[float] = None, tune_kernels: bool = True) -> Built:
    """One quantized model of the default model: ``lowbit.quant.pipeline.run`` with ``method`` (the pipeline's
    vocabulary, e.g. ``"recon+ptqd+vsc"``) at ``bits`` (e.g. ``"W4A8"``); ``precision`` / ``size_budget``: the
    per-layer precision plan (None: PipelineConfig's defaults); ``tune_kernels=False`` for a model that is only
    saved (the kernel choice is measured where the model runs: loading arms it again)."""
    return build_model(setup.unet, method, bits, calls, alphas_cumprod=setup.alphas_cumprod, deploy=deploy,
                       recon=recon, finetune=finetune, stat_calls=stat_calls, progress=progress, precision=precision,
                       size_budget=size_budget, tune_kernels=tune_kernels)


def build_model(model, method: str, bits: str, calls, alphas_cumprod=None, num_train_timesteps: Optional[int] = None,
                deploy: bool = True, recon: Optional[ReconConfig] = None, finetune: Optional[FinetuneConfig] = None,
                stat_calls=None, progress=None, precision: Optional[str] = None, size_budget: Optional[float] = None,
                tune_kernels: bool = True) -> Built:
    """:func:`build` for any float denoiser ``model`` (e.g. a diffusers pipeline's, ``lowbit quantize --pipeline``)
    with its scheduler's ``alphas_cumprod`` / ``num_train_timesteps`` (None where it has none)."""
    cfg = pipeline_config(method, bits, deploy=deploy, recon=recon, finetune=finetune, precision=precision,
                          size_budget=size_budget, tune_kernels=tune_kernels)
    r = pipeline.run(model, calls, cfg, alphas_cumprod=alphas_cumprod, num_train_timesteps=num_train_timesteps,
                     stat_calls=stat_calls, progress=progress)
    return Built(r.model, r.var_fn, r.total_seconds, dict(r.info, seconds=r.seconds))


def pipeline_config(method: str, bits: str, deploy: bool = True, recon: Optional[ReconConfig] = None,
                    finetune: Optional[FinetuneConfig] = None, precision: Optional[str] = None,
                    size_budget: Optional[float] = None, tune_kernels: bool = True) -> PipelineConfig:
    """The ``PipelineConfig`` of :func:`build` / :func:`build_model` (checked when built, before any work)."""
    return PipelineConfig.for_method(method, bits, recon=recon or ReconConfig(), finetune=finetune or FinetuneConfig(),
                                     deploy=deploy, tune_kernels=tune_kernels, **_plan(precision, size_budget))


def evaluate(setup: Setup, model, n: int = 1000, steps: int = 25, eta: float = 0.0, var_fn=None, seed: int = 7,
             progress=None) -> dict:
    """FID (classifier feature space, vs held-out real digits) and class accuracy of ``n`` samples."""
    from .models import class_accuracy, fid

    t0 = time.time()
    imgs, labels = generate(setup, model, n, steps=steps, eta=eta, seed=seed, var_fn=var_fn, progress=progress)
    dt = time.time() - t0
    return dict(fid=fid(imgs), acc=class_accuracy(imgs, labels), seconds=dt, images=imgs)


def image_grid(rows: List[torch.Tensor], scale: int = 4):
    """PIL image: one row per tensor [N,1,H,W] in [-1,1] (difference rows may be in [0,1])."""
    from PIL import Image

    tiles = []
    for r in rows:
        r = r.detach().float()
        if r.min() < 0:
            r = (r + 1) / 2
        r = r.clamp(0, 1)
        tiles.append(torch.cat(list(r[:, 0]), dim=1))
    grid = torch.cat(tiles, dim=0)
    arr = (grid.numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr, mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


DEMO_GRID = "demo_grid.png"


def demo_grid_path(out_dir: str, overwrite: bool = False) -> str:
    """Where :func:`demo` writes its grid; refuses (before any work) a folder of that name, and an existing file
    unless ``overwrite``."""
    import os

    from .quant.io import SaveError, SaveExistsError

    path = os.path.join(out_dir, DEMO_GRID)
    if os.path.isdir(path):
        raise SaveError(f"{path} is a folder; choose another output folder")
    if os.path.lexists(path) and not overwrite:
        raise SaveExistsError(f"{path} already exists; choose another output folder or pass overwrite")
    return path


def write_grid(image, path: str, overwrite: bool = False) -> str:
    """Write the PIL ``image`` as a PNG at ``path`` the way LowBit writes its safetensors files
    (``quant.io.write_new_file``): a temporary file in the same folder put in place atomically, never over a file
    that appeared during the run unless ``overwrite``, nothing (no empty PNG that would block the next run) left
    behind when writing fails. Every failure is a one-line ``SaveError`` naming ``path``."""
    import os

    from .quant.io import SaveError, SaveExistsError, clean_stale_temps, write_new_file

    folder = os.path.dirname(os.path.abspath(path))
    clean_stale_temps(folder)
    try:
        write_new_file(path, folder, lambda tmp: image.save(tmp, format="PNG"), overwrite)
    except SaveExistsError:
        raise SaveExistsError(f"{path} appeared during the run and was kept; choose another output folder or pass "
                              "overwrite (--overwrite)") from None
    except SaveError:
        raise
    except OSError as exc:
        raise SaveError(f"cannot save {path}: {exc.strerror or exc}; choose a writable folder with free "
                        "space") from None
    return path


def _labelled(progress, label: str):
    """``progress`` with ``label`` before every stage name (which model a sampling run is for); as is when it is
    not a callback (None, "tqdm")."""
    if not callable(progress):
        return progress

    def f(done, total, info=None):
        info = dict(info or {})
        info["stage"] = f"{label}: {info.get('stage') or 'working'}"
        return progress(done, total, info)

    return f


def demo(out_dir: str = "out", n_eval: int = 200, steps: int = 25, bits_list=("W8A8", "W4A8"), progress="tqdm",
         methods=("lp",), precision: Optional[str] = None, size_budget: Optional[float] = None,
         overwrite: bool = False, on_rows: Optional[Callable[[List[dict]], None]] = None) -> dict:
    """Quantize the embedded model, sample the same seeds with FP and quantized models, write a PNG grid
    (``<out_dir>/demo_grid.png``; an existing one only with ``overwrite``) and return the table rows.
    ``precision`` / ``size_budget``: the per-layer precision plan (see ``build``). Every setting is checked before
    the work starts. ``on_rows(rows)`` is called with the results before the grid is written, so a grid that
    cannot be saved (full disk, a file that appeared meanwhile) does not lose the measurements (the CLI prints its
    table there); the grid is written atomically (:func:`write_grid`)."""
    import os

    path = demo_grid_path(out_dir, overwrite)
    for bits in bits_list:  # each combination's config, checked now rather than after the ones before it ran
        for method in methods:
            PipelineConfig.for_method(method, bits, **_plan(precision, size_budget))
    os.makedirs(out_dir, exist_ok=True)
    setup = default_setup()
    calls = timestep_aware_subset(record_calibration(setup, progress=_labelled(progress, "calibration")), 10)
    rows = []
    fp = evaluate(setup, setup.unet, n=n_eval, steps=steps, progress=_labelled(progress, "full precision"))
    rows.append(dict(model="full precision", bits="fp32", weight_bytes=weight_bytes(setup.unet), fid=fp["fid"],
                     acc=fp["acc"], seconds=fp["seconds"]))
    grid_rows = [fp["images"][:10]]
    for bits in bits_list:
        for method in methods:
            label = f"{bits} {method}"
            b = build(setup, method, bits, calls, precision=precision, size_budget=size_budget,
                      progress=_labelled(progress, label))
            ev = evaluate(setup, b.model, n=n_eval, steps=steps, var_fn=b.var_fn, progress=_labelled(progress, label))
            rows.append(dict(model=method, bits=bits, weight_bytes=weight_bytes(b.model), fid=ev["fid"], acc=ev["acc"],
                             seconds=ev["seconds"]))
            grid_rows += [ev["images"][:10], (ev["images"][:10] - fp["images"][:10]).abs() / 2]
    if on_rows is not None:
        on_rows(rows)
    write_grid(image_grid(grid_rows), path, overwrite)
    return dict(rows=rows, grid=path)


def format_table(rows: List[dict], fp_bytes: Optional[int] = None) -> str:
    fp_bytes = fp_bytes or rows[0]["weight_bytes"]
    lines = ["| model | bits | weight bytes (x fp32) | FID (classifier space) | class acc | sampling s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits']} | {r['weight_bytes']:,} ({r['weight_bytes'] / fp_bytes:.3f}) | "
                     f"{r['fid']:.2f} | {r['acc']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
