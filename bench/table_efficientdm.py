"""EfficientDM on the embedded default model (digits DDPM): quality, fine-tune time and memory.

    python -m lowbit.bench.table_efficientdm [--bits W4A4,W4A8] [--steps 400] [--samples 500] [--threads 1]
                                             [--out bench/results/efficientdm.json]

Rows per bit-width: naive PTQ (EfficientDM's starting point: per-channel weights, one static activation scale
per layer), PTQD correction on it, EfficientDM (QALoRA + TALSQ, merged and deployed), EfficientDM + PTQD
(statistics collected on the fine-tuned model), and full quantization-aware training (QAT: every quantized
layer's float weight trainable through the quantizer, same TALSQ, same loss, same steps) for the cost ratio.

Quality: FID in the digit classifier's feature space against the 400 held-out digits and class accuracy of the
samples (``lowbit.models`` metrics), plus the distillation MSE on held-out UNet calls. Sampling: DDIM eta 0,
``--sampling-steps``, classifier-free guidance ``--guidance``, the same seeds for every row; quantized rows run
deployed (packed integers through ``lowbit.kernels``).

Cost: each fine-tune (EfficientDM, QAT) runs in a fresh subprocess: wall time of ``finetune`` and its peak
resident memory above the resident memory just before it (sampled every 5 ms), so neither includes loading
or recording. Numbers from a 2-core shared CPU are noisy; the ratios QAT/EfficientDM are what to read.

Learning rates: by default the automatic scale-aware rule of ``efficientdm.lora_lr`` (per layer, from the steps,
rank and fan-in); ``--lr-scale-factor F`` uses lr = mean weight step x F for every layer instead (the paper:
1/2500 for 16 000 steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

if __package__:
    from .. import models as M
    from ..quant import (CallRecorder, FinetuneConfig, QuantConfig, deploy_, load, quant_layers, quantize, save,
                          undeploy_)
    from ..quant import efficientdm as E
    from ..quant.context import get_context
else:  # python bench/table_efficientdm.py
    from lowbit import models as M
    from lowbit.quant import (CallRecorder, FinetuneConfig, QuantConfig, deploy_, load, quant_layers, quantize, save,
                              undeploy_)
    from lowbit.quant import efficientdm as E
    from lowbit.quant.context import get_context

try:
    if __package__:
        from ..quant import ptqd as PTQD
    else:
        from lowbit.quant import ptqd as PTQD
    if not (hasattr(PTQD, "collect_stats") and hasattr(PTQD, "attach_stats")):
        PTQD = None
except ImportError:
    PTQD = None

CALIB_SEED, HELD_SEED, EVAL_SEED = 1234, 4321, 7


# ------------------------------------------------------------------------------------------------ data
def teacher_model(args):
    if args.random_unet:
        torch.manual_seed(0)
        return M.digits.build_unet().eval().requires_grad_(False)
    return M.load_default_unet(args.unet)


def scheduler(args):
    if args.random_unet:
        from diffusers import DDPMScheduler

        return DDPMScheduler(**M.digits.SCHEDULER_CONFIG)
    return M.default_scheduler(args.unet)


def labels_for(n):
    return torch.arange(n) % M.NUM_CLASSES


def record(teacher, args, n, seed):
    """UNet calls along full-precision DDIM trajectories (the training data of EfficientDM, data-free)."""
    with CallRecorder(teacher) as rec:
        M.sample(teacher, labels_for(n), steps=args.sampling_steps, eta=0.0, guidance=args.guidance, seed=seed,
                 scheduler=scheduler(args))
    return rec.calls


def ft_config(args):
    return FinetuneConfig(steps=args.steps, rank=args.rank, batch_size=args.batch_size,
                          lr_scale_factor=args.lr_scale_factor,
                          act_lr=args.act_lr, time_bins=args.sampling_steps, seed=0)


# ------------------------------------------------------------------------------------------- QAT baseline
def qat_finetune(qmodel, teacher, calls, cfg, lr_factor):
    """Full quantization-aware training: every quantized layer's weight is a trainable float copy, fake-quantized
    with STE in the forward pass (weight step sizes frozen, as in EfficientDM); TALSQ tables and the loss loop are
    EfficientDM's, so only the weight parametrisation differs. Per-layer lr = mean weight step x ``lr_factor``
    (each Adam step moves a weight by about that fraction of its step size; EfficientDM's LoRA rule would move every
    weight by a whole step on short runs and diverge)."""
    student = E._shared_copy(qmodel)
    student.requires_grad_(False)
    groups, scales = [], []
    for name, layer in quant_layers(student):
        layer.weight = nn.Parameter(layer.weight.detach().float().clone(), requires_grad=True)
        groups.append(dict(params=[layer.weight], lr=float(layer.w_scale.mean()) * lr_factor))
        if layer.act is not None and layer.scheduled:
            layer.act.retable(cfg.time_bins)
            for b in layer.act.bits_set:
                s, z = layer.act.table(b)
                s.requires_grad_(True)
                z.requires_grad_(True)
                groups.append(dict(params=[s, z], lr=cfg.act_lr))
                scales.append(s)
    first, last = E._train(student, teacher, list(calls), cfg, groups, scales, None, None, 0, 1)
    get_context(student).finetune_info = dict(method="qat", steps=cfg.steps, first_loss=first, last_loss=last)
    return student


# ------------------------------------------------------------------------------------------------- worker
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """One fine-tune in this (fresh) process: load the naive model, record the calls, fine-tune, save."""
    torch.set_num_threads(args.threads)
    teacher = teacher_model(args)
    calls = record(teacher, args, args.traj, CALIB_SEED)
    qmodel = load(teacher, args.qfile)
    cfg = ft_config(args)
    peak = [0]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    base = _rss_bytes()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if args.worker == "edm":
        model = E.finetune(qmodel, teacher, calls, cfg)
    else:
        model = qat_finetune(qmodel, teacher, calls, cfg, args.qat_lr_factor)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss_bytes())
    info = dict(get_context(model).finetune_info or {})
    trainable = (sum(l.modifier.lora_A.numel() + l.modifier.lora_B.numel() for _, l in E.lora_layers(model))
                 if args.worker == "edm" else sum(l.weight.numel() for _, l in quant_layers(model)))
    if args.worker == "edm":
        E.merge_(model)
    save(model, args.result + ".safetensors", overwrite=True)
    json.dump(dict(wall_s=wall, peak_mb=(peak[0] - base) / 2 ** 20, first_loss=info.get("first_loss"),
                   last_loss=info.get("last_loss"), trainable_weights=trainable), open(args.result + ".json", "w"))


def run_worker(kind, args, qfile, tmp):
    result = os.path.join(tmp, f"{kind}-{args.cur_bits}")
    cmd = [sys.executable, "-m", "lowbit.bench.table_efficientdm", "--worker", kind, "--qfile", qfile,
           "--result", result] + _passthrough(args)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return result


def _passthrough(args):
    out = ["--steps", str(args.steps), "--rank", str(args.rank), "--batch-size", str(args.batch_size),
           "--act-lr", str(args.act_lr), "--sampling-steps", str(args.sampling_steps), "--guidance", str(args.guidance),
           "--traj", str(args.traj), "--threads", str(args.threads), "--qat-lr-factor", str(args.qat_lr_factor)]
    if args.lr_scale_factor:
        out += ["--lr-scale-factor", str(args.lr_scale_factor)]
    if args.unet:
        out += ["--unet", args.unet]
    if args.random_unet:
        out += ["--random-unet"]
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model, args, ref, clf, held, teacher):
    if model is not teacher and not args.deployed:
        model = undeploy_(model)  # exact: the dequantized integer grid
    labels = labels_for(args.samples)
    t0 = time.perf_counter()
    x = M.sample(model, labels, steps=args.sampling_steps, eta=0.0, guidance=args.guidance, seed=EVAL_SEED,
                 scheduler=scheduler(args))
    return dict(fid=M.fid(x, ref, clf), acc=M.class_accuracy(x, labels, clf),
                held_mse=E.distillation_loss(model, teacher, held) if model is not teacher else 0.0,
                sample_s=time.perf_counter() - t0)


def with_ptqd(make_model, teacher, calls):
    m = make_model()  # a fresh deployed model (deployed kernels' caches cannot be deep-copied)
    stats = PTQD.collect_stats(teacher, m, calls)
    PTQD.attach_stats(m, stats, active=True)  # bias + correlation correction in an output hook (VSC: no-op at eta 0)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", default="W4A4,W4A8")
    ap.add_argument("--steps", type=int, default=400, help="fine-tune steps (EfficientDM and QAT)")
    ap.add_argument("--rank", type=int, default=FinetuneConfig.rank)
    ap.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    ap.add_argument("--lr-scale-factor", type=float, default=None)
    ap.add_argument("--act-lr", type=float, default=FinetuneConfig.act_lr)
    ap.add_argument("--qat-lr-factor", type=float, default=0.01, help="QAT weight lr = mean weight step x this")
    ap.add_argument("--deployed", action="store_true",
                    help="sample quantized rows on the integer kernels (default: fake-quant, the same function, "
                         "about 2x faster on the CPU reference kernels)")
    ap.add_argument("--sampling-steps", type=int, default=FinetuneConfig.sampling_steps)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--traj", type=int, default=32, help="full-precision trajectories recorded for training")
    ap.add_argument("--samples", type=int, default=500, help="images per row for FID / accuracy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet", default=None, help="DDPM file (default: the embedded digits model)")
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--heldout", default=None)
    ap.add_argument("--random-unet", action="store_true", help="smoke test: random weights, default architecture")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "efficientdm.json"))
    ap.add_argument("--worker", choices=("edm", "qat"), help=argparse.SUPPRESS)
    ap.add_argument("--qfile", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    torch.set_num_threads(args.threads)
    teacher = teacher_model(args)
    clf = M.load_classifier(args.classifier)
    ref = M.load_heldout(args.heldout)[0]
    calls = record(teacher, args, args.traj, CALIB_SEED)
    held = record(teacher, args, max(args.traj // 4, 4), HELD_SEED)
    cfg = ft_config(args)
    rows = []
    fp = evaluate(teacher, args, ref, clf, held, teacher)
    rows.append(dict(bits="FP32", method="full precision", **fp))
    print(f"FP32: FID {fp['fid']:.3f} acc {fp['acc']:.3f}", flush=True)
    notes = []
    if PTQD is None:
        notes.append("PTQD rows left out: lowbit.quant.ptqd (collect_stats/attach_stats) is not available")
    with tempfile.TemporaryDirectory(prefix="lowbit-edm-") as tmp:
        for bits in [b.strip() for b in args.bits.split(",") if b.strip()]:
            args.cur_bits = bits
            torch.manual_seed(0)
            naive = quantize(teacher, QuantConfig.preset(bits), calls)
            qfile = save(naive, os.path.join(tmp, f"naive-{bits}.safetensors"))
            naive_dep = deploy_(copy.deepcopy(naive))
            rows.append(dict(bits=bits, method="naive PTQ", **evaluate(naive_dep, args, ref, clf, held, teacher)))
            if PTQD is not None:
                rows.append(dict(bits=bits, method="PTQD",
                                 **evaluate(with_ptqd(lambda: deploy_(copy.deepcopy(naive)), teacher, calls), args, ref,
                                            clf, held, teacher)))
            for kind in ("edm", "qat"):
                res = run_worker(kind, args, qfile, tmp)
                cost = json.load(open(res + ".json"))
                model = load(teacher, res + ".safetensors")
                name = "EfficientDM" if kind == "edm" else "QAT (all weights)"
                rows.append(dict(bits=bits, method=name, **evaluate(model, args, ref, clf, held, teacher), **cost))
                if kind == "edm" and PTQD is not None:
                    rows.append(dict(bits=bits, method="EfficientDM + PTQD",
                                     **evaluate(with_ptqd(lambda: load(teacher, res + ".safetensors"), teacher, calls),
                                                args, ref, clf, held, teacher)))
                print(f"{bits} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                     rows[-1 - (kind == "edm" and PTQD is not None)].items()
                                                     if isinstance(v, float)), flush=True)
            edm = next(r for r in rows if r["bits"] == bits and r["method"] == "EfficientDM")
            qat = next(r for r in rows if r["bits"] == bits and r["method"].startswith("QAT"))
            for r in (edm, qat):
                r["time_vs_edm"] = r["wall_s"] / edm["wall_s"]
                r["mem_vs_edm"] = r["peak_mb"] / max(edm["peak_mb"], 1e-6)

    print()
    print(f"EfficientDM on the default digits model: {cfg.steps} fine-tune steps, rank {cfg.rank}, batch "
          f"{cfg.batch_size}, lr_scale_factor {cfg.lr_scale_factor if cfg.lr_scale_factor else 'auto'}, "
          f"act_lr {cfg.act_lr:g}; {args.samples} samples, "
          f"DDIM {args.sampling_steps} steps eta 0, guidance {args.guidance}")
    print()
    print("| bits | method | FID (clf) | class acc | held-out MSE | fine-tune s | peak MB | time x | mem x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt: (fmt % r[k]) if k in r else "-"  # noqa: E731
        print(f"| {r['bits']} | {r['method']} | {r['fid']:.3f} | {r['acc']:.3f} | {r['held_mse']:.5f} | "
              f"{f('wall_s', '%.1f')} | {f('peak_mb', '%.0f')} | "
              f"{f('time_vs_edm', '%.2f')} | {f('mem_vs_edm', '%.2f')} |")
    for n in notes:
        print(f"\nNote: {n}")
    out = dict(rows=rows, notes=notes, config=dict(vars(args), cur_bits=None),
               finetune_config=json.loads(json.dumps(E.to_json_obj(cfg))), machine=dict(
                   python=platform.python_version(), torch=torch.__version__, cpu=platform.processor(),
                   threads=args.threads, random_unet=args.random_unet))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
