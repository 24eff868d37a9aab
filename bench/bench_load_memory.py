"""Peak memory of loading a quantized file: the float path ``load(float_model, path)`` against the no-float path
``load_model(path)`` (issue 14 item 1).

    cd /tmp && python -m lowbit.bench.bench_load_memory [--models embedded,sd15] [--methods W8A8,W4A8]
        [--out <repo>/bench/results/load_memory.json]

(Run from outside the repository: its root on sys.path would shadow the ``kernels`` package.)

Files are built once in a temporary folder, by a child process: the embedded digits model, and an SD1.5-size
diffusers ``UNet2DConditionModel`` (SD1.5 configuration, random fp32 weights from seed 0, calibrated on two calls
at an 8x8 latent, min/max weight ranges: the numbers do not depend on the weights' values). Then every
(model, method, path) loads in a fresh child process that reports

* ``base``: resident memory after the imports (torch, diffusers, lowbit) and a warm-up ``load_model`` of the
  embedded W8A8 file (so lazily loaded code counts in ``base``, as in a host that has run before);
* ``peak``: the child's ``ru_maxrss`` right after loading (before any forward pass);
* ``added = peak - base``: what loading cost.

Float path: the float model is built in the child the cheapest way (constructed with its random init from the
same seed for SD1.5, so no checkpoint file is read; ``load_default_unet()`` for the embedded model), then the file
is applied. No-float path: ``load_model(path)`` (meta-device construction, tensors read with plain file reads).
After measuring, each child runs one forward pass on the reference kernels (``forced_backend("eager")``) and
reports the output's sha256: the two paths must give the same digest (checked; a mismatch fails the bench).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2)

COMMON = textwrap.dedent('''
    import os, sys, json, hashlib, resource
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import diffusers
    import lowbit.quant as Q
    from lowbit.kernels.registry import forced_backend
    from lowbit.models import load_default_unet
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    SD15 = json.loads(sys.argv[2])
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * page
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    def sd15_float():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(**SD15).eval().requires_grad_(False)
    def inputs(model):
        g = torch.Generator().manual_seed(1)
        if model == "embedded":
            return (torch.randn(2, 1, 16, 16, generator=g), torch.tensor([700.0, 90.0])), \\
                dict(class_labels=torch.tensor([3, 10]))
        return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])), \\
            dict(encoder_hidden_states=torch.randn(1, 77, 768, generator=g))
''')

BUILD = COMMON + textwrap.dedent('''
    model, out_dir, methods = sys.argv[1], sys.argv[3], sys.argv[4].split(",")
    unet = load_default_unet().eval().requires_grad_(False) if model == "embedded" else sd15_float()
    fp_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    g = torch.Generator().manual_seed(2)
    with Q.CallRecorder(unet) as rec, torch.no_grad():
        for t in (900, 300):
            a, kw = inputs(model)
            unet(*a, **kw)
    files = {}
    for m in methods:
        q = Q.quantize(unet, Q.QuantConfig.preset(m, w_init="minmax"), rec.calls)
        Q.deploy_(q)
        files[m] = Q.save(q, os.path.join(out_dir, f"{model}_{m}.safetensors"))
        del q
    print(json.dumps(dict(files=files, fp_bytes=fp_bytes, build_peak=maxrss())))
''')

LOAD = COMMON + textwrap.dedent('''
    model, path, how, warm = sys.argv[1], sys.argv[3], sys.argv[4], sys.argv[5]
    import gc
    Q.load_model(warm)  # warm-up on the embedded model's file: code and lazy imports are loaded before ``base``
    diffusers.UNet2DConditionModel, diffusers.UNet2DModel
    gc.collect()
    base = rss()
    if how == "float":
        fp = load_default_unet().eval().requires_grad_(False) if model == "embedded" else sd15_float()
        q = Q.load(fp, path)
    else:
        q = Q.load_model(path)
    peak = maxrss()
    held = rss()
    a, kw = inputs(model)
    with torch.no_grad(), forced_backend("eager"):
        out = q(*a, **kw).sample
    digest = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()
    print(json.dumps(dict(base=base, peak=peak, held=held, q_bytes=Q.weight_bytes(q), digest=digest)))
''')


COMFY_COMMON = textwrap.dedent('''
    import os, sys, json, hashlib, resource
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, sys.argv[1])
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.sd, comfy.model_management as mm
    import lowbit.quant as Q
    from lowbit.nodes import io as nio, comfy_adapter as adapter
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * page
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def inputs(g):
        return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
''')

COMFY_BUILD = COMFY_COMMON + textwrap.dedent('''
    ckpt, out_dir, methods = sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
    unet = model.model.diffusion_model
    from safetensors.torch import save_file
    unet_file = os.path.join(out_dir, "comfy_unet_fp.safetensors")  # what "Load Diffusion Model" reads
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, unet_file)
    fp_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    g = torch.Generator().manual_seed(2)
    with Q.CallRecorder(unet) as rec, torch.no_grad():
        for t in (900.0, 300.0):
            x, c = inputs(g)
            unet(x, torch.tensor([t]), context=c)
    files = {}
    for m in methods:
        q = Q.quantize(unet, Q.QuantConfig.preset(m, w_init="minmax"), rec.calls)
        Q.deploy_(q)
        arch = nio.comfy_arch(adapter.attach_quantized_unet(model, q))
        files[m] = Q.save(q, os.path.join(out_dir, f"comfy_{m}.safetensors"), arch=arch)
        del q
    print(json.dumps(dict(files=files, fp_bytes=fp_bytes, unet_file=unet_file, build_peak=maxrss())))
''')

COMFY_LOAD = COMFY_COMMON + textwrap.dedent('''
    path, how, unet_file = sys.argv[2], sys.argv[3], sys.argv[4]
    import gc; gc.collect()
    base = rss()
    if how == "float":  # "Load Diffusion Model" + "Load Quantized UNet" with the MODEL connected
        fp = comfy.sd.load_diffusion_model(unet_file)
        m = adapter.attach_quantized_unet(fp, Q.load(adapter.unet_of(fp), path))
    else:  # "Load Quantized UNet" with no MODEL
        m = nio.load_standalone(path)
    mm.load_models_gpu([m])
    peak = maxrss()
    g = torch.Generator().manual_seed(1)
    x, c = inputs(g)
    with torch.no_grad():
        out = m.model.apply_model(x, torch.tensor([3.0]), c_crossattn=c).float()
    digest = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()
    print(json.dumps(dict(base=base, peak=peak, q_bytes=Q.weight_bytes(adapter.unet_of(m)), digest=digest)))
''')


def _child(script: str, *args: str, timeout: int = 3600, python: str = sys.executable) -> dict:
    cmd = [python, "-c", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"child {args[:1]} {args[2:]} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _row(model, method, path, builds, f, n):
    mib = 1 / 2 ** 20
    if f["digest"] != n["digest"]:
        raise SystemExit(f"{model} {method}: the two load paths give different outputs")
    row = dict(model=model, method=method, file_mib=round(os.path.getsize(path) * mib, 1),
               fp_weight_mib=builds[model]["fp_weight_mib"], quant_weight_mib=round(n["q_bytes"] * mib, 1),
               float_path=dict(base_mib=round(f["base"] * mib), peak_mib=round(f["peak"] * mib),
                               added_mib=round((f["peak"] - f["base"]) * mib)),
               no_float_path=dict(base_mib=round(n["base"] * mib), peak_mib=round(n["peak"] * mib),
                                  added_mib=round((n["peak"] - n["base"]) * mib)),
               peak_ratio=round(f["peak"] / n["peak"], 2),
               added_ratio=round((f["peak"] - f["base"]) / max(1, n["peak"] - n["base"]), 2), same_output=True)
    print(f"  {method}: file {row['file_mib']:,.1f} MiB | float path peak {row['float_path']['peak_mib']:,} MiB "
          f"(+{row['float_path']['added_mib']:,} over imports) | no-float peak {row['no_float_path']['peak_mib']:,} "
          f"MiB (+{row['no_float_path']['added_mib']:,}) | peak {row['peak_ratio']}x, added {row['added_ratio']}x | "
          "outputs identical", flush=True)
    return row


def _comfy_rows(comfy_dir, methods, d, builds):
    """ComfyUI: float path = "Load Diffusion Model" (the fixture's UNet weights as their own file) + "Load Quantized
    UNet" with that MODEL; no-float path = "Load Quantized UNet" with no MODEL. Peak after ComfyUI loaded the model
    for sampling (load_models_gpu), before the forward pass."""
    sys.path.insert(0, str(REPO / "tests" / "nodes"))
    try:
        import comfy_harness
    finally:
        sys.path.pop(0)
    comfy_dir = Path(comfy_dir).resolve()
    py = comfy_harness.comfyui_python(comfy_dir)
    ckpt = comfy_harness.ensure_fixture(comfy_dir, py)
    mib = 1 / 2 ** 20
    b = _child(COMFY_BUILD, str(comfy_dir), str(ckpt), d, methods, python=py)
    model = f"comfyui_{Path(ckpt).stem}"
    builds[model] = dict(fp_weight_mib=round(b["fp_bytes"] * mib, 1), build_peak_mib=round(b["build_peak"] * mib))
    print(f"{model}: float UNet weights {b['fp_bytes'] * mib:,.1f} MiB; files built", flush=True)
    rows = []
    for method, path in b["files"].items():
        f, n = (_child(COMFY_LOAD, str(comfy_dir), path, how, b["unet_file"], python=py) for how in ("float", "no"))
        rows.append(_row(model, method, path, builds, f, n))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedded,sd15", help="comma list of: embedded, sd15 (may be empty)")
    ap.add_argument("--methods", default="W8A8,W4A8", help="comma list of QuantConfig presets")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "load_memory.json"))
    ap.add_argument("--comfyui", metavar="DIR", help="also measure ComfyUI's node paths on the random SD1.5-class "
                    "fixture checkpoint of tests/nodes (ComfyUI checkout; its python from COMFYUI_PYTHON or "
                    "DIR/../comfy-venv)")
    a = ap.parse_args(argv)
    mib = 1 / 2 ** 20
    rows, builds = [], {}
    sd15 = json.dumps(SD15)
    with tempfile.TemporaryDirectory(prefix="lowbit-loadmem-") as d:
        models = [m for m in a.models.split(",") if m]
        os.makedirs(os.path.join(d, "warm"))
        # the warm-up file of every load child
        warm = _child(BUILD, "embedded", sd15, os.path.join(d, "warm"), "W8A8")["files"]["W8A8"]
        for model in models:
            b = _child(BUILD, model, sd15, d, a.methods)
            builds[model] = dict(fp_weight_mib=round(b["fp_bytes"] * mib, 1),
                                 build_peak_mib=round(b["build_peak"] * mib))
            print(f"{model}: float weights {b['fp_bytes'] * mib:,.1f} MiB (fp32); files built (peak "
                  f"{b['build_peak'] * mib:,.0f} MiB)", flush=True)
            for method, path in b["files"].items():
                res = {how: _child(LOAD, model, sd15, path, how, warm) for how in ("float", "nofloat")}
                rows.append(_row(model, method, path, builds, res["float"], res["nofloat"]))
        if a.comfyui:
            rows += _comfy_rows(a.comfyui, a.methods, d, builds)
    out = dict(bench="load_memory", host=platform.node(), python=platform.python_version(), builds=builds, rows=rows,
               command="cd /tmp && python -m lowbit.bench.bench_load_memory " + " ".join(argv or sys.argv[1:]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
