"""What ComfyUI's stock loader makes of a ``layout=comfyui-native`` file, for the real-host tests
(``test_comfyui_integration.py``, ``test_comfyui_dit.py``).

Files derived from one 8-bit native file (``write_variants``), loaded with the stock "Load Diffusion Model"
(UNETLoader) next to the native file itself:

- ``dequant``: a plain float file (no ``comfy_quant``) whose int8 layers hold LowBit's own weights, decoded from
  the ``layout=lowbit`` file of the same model by LowBit's weight formats (``kernels/formats``,
  ``ops.dequantize_weight``), not by the export under test; every other tensor is the native file's. ComfyUI
  runs it as a float model: LowBit's quantized weights with float activations.
- ``per_tensor``: the native file with each layer's scales replaced by their mean (one scale per tensor): a
  deliberately wrong scale convention, the control that shows the comparisons can fail.

``comfy_weights`` runs this file with ComfyUI's python (``python native_check.py --comfyui-dir ...``): it loads
files with ``comfy.sd.load_diffusion_model`` (what UNETLoader calls) and compares every quantized Linear's weight,
as ComfyUI dequantizes it, with the ``dequant`` file's, and each such layer's output on a random input with
``F.linear`` on those weights (what ComfyUI's int8 path does to the activations).

The test side needs torch, safetensors and lowbit; the ComfyUI side only ComfyUI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = ("dequant", "per_tensor")
MARK = "@@NATIVE_CHECK@@"


# ------------------------------------------------------------------------------------------- test side
def lowbit_linear_weights(lowbit_path) -> dict:
    """{layer name: (LowBit weight format, fp32 weight)} of every quantized Linear layer of a LowBit file, decoded
    by LowBit's own weight formats."""
    return lowbit_weights(lowbit_path, kinds=("Linear",))


def lowbit_weights(lowbit_path, kinds=None) -> dict:
    """{layer name: (LowBit weight format, fp32 weight)} of every quantized layer of a LowBit file whose kind is in
    ``kinds`` (all: None), decoded by LowBit's own weight formats (split convolutions' parts as saved)."""
    from safetensors import safe_open

    from lowbit.kernels import ops
    from lowbit.kernels.formats import get_format
    from lowbit.quant.io import read_header

    header, _ = read_header(str(lowbit_path))
    out = {}
    with safe_open(str(lowbit_path), "pt") as f:
        for name, lm in header["layers"].items():
            if kinds is not None and lm["kind"] not in kinds:
                continue
            shape, bits, g = tuple(lm["shape"]), lm["w_bits"], lm["group_size"]
            fmt = get_format(lm["w_format"])
            st = {k: f.get_tensor(f"{name}.{k}") for k in fmt.storage(shape, bits, g)}
            out[name] = (fmt.name, ops.dequantize_weight(fmt.from_storage(st, shape, bits, g)).float().reshape(shape))
    return out


def write_variants(native_path, lowbit_path, out_dir, stem: str) -> dict:
    """Write the files of the module docstring into ``out_dir`` (``<stem>_<variant>.safetensors``); returns
    {variant: path} plus "layers": the native file's int8_tensorwise layer names, asserted to be exactly the
    int8 (per-channel) Linear layers of the LowBit file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(native_path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    quant = json.loads(meta["_quantization_metadata"])
    layers = sorted(quant["layers"])
    formats = {c["format"] for c in quant["layers"].values()}
    assert formats == {"int8_tensorwise"}, f"expected an 8-bit native file, found formats {sorted(formats)}"
    lowbit = lowbit_linear_weights(lowbit_path)
    int8_lowbit = sorted(n for n, (fmt, _) in lowbit.items() if fmt == "int8_channel")
    assert layers == int8_lowbit, ("the native file's int8 layers are not LowBit's int8 Linear layers: "
                                   f"only native {sorted(set(layers) - set(int8_lowbit))[:5]}, "
                                   f"only LowBit {sorted(set(int8_lowbit) - set(layers))[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}

    dq = {k: v for k, v in tensors.items() if not k.endswith((".comfy_quant", ".weight_scale"))}
    for n in layers:
        w = lowbit[n][1]
        assert tuple(dq[f"{n}.weight"].shape) == tuple(w.shape), n
        dq[f"{n}.weight"] = w.contiguous()
    paths["dequant"] = out_dir / f"{stem}_dequant.safetensors"
    save_file(dq, str(paths["dequant"]))
    del dq

    pt = dict(tensors)
    for n in layers:
        s = tensors[f"{n}.weight_scale"]
        pt[f"{n}.weight_scale"] = torch.full_like(s, float(s.float().mean()))
    paths["per_tensor"] = out_dir / f"{stem}_per_tensor.safetensors"
    save_file(pt, str(paths["per_tensor"]), metadata=meta)
    paths["layers"] = layers
    return paths


def comfy_weights(comfyui_dir, python, reference, files: dict, timeout: float = 1200) -> dict:
    """Run this file with ComfyUI's python: {name: report} for each of ``files`` ({name: path}) loaded by
    ``comfy.sd.load_diffusion_model``, against the float ``reference`` file (see ``_comfy_side``)."""
    cmd = [python, str(Path(__file__).resolve()), "--comfyui-dir", str(comfyui_dir), "--reference", str(reference),
           *[f"{k}={v}" for k, v in files.items()]]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(comfyui_dir), env=env)
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not marks:
        raise AssertionError(f"native_check.py with ComfyUI's python failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(marks[-1][len(MARK):])


def rel(a, b) -> float:
    """Relative L2 distance ||a - b|| / ||b|| of two latents."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------------------- ComfyUI side
def _comfy_side(comfyui_dir: str, reference: str, files: dict) -> dict:
    """For each file: ComfyUI's stock load (``comfy.sd.load_diffusion_model``), then per quantized Linear (a
    ``QuantizedTensor`` weight): is ComfyUI's dequantized weight the reference weight, bit for bit (``identical``,
    ``max_weight_diff``), and the layer's output on a random input against ``F.linear`` with the reference weight
    (``max_out_rel``: ComfyUI's activation handling plus any weight difference). Also the op class, the formats,
    the config ComfyUI detected and the loader's warnings (missing / unexpected keys)."""
    import logging

    sys.path.insert(0, comfyui_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch
    from safetensors.torch import load_file

    import comfy.sd
    from comfy.quant_ops import QuantizedTensor

    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage()[:300])

    logging.getLogger().addHandler(Catch())
    ref = load_file(reference)
    out = {}
    for name, path in files.items():
        warnings.clear()
        patcher = comfy.sd.load_diffusion_model(path)
        dm = patcher.model.diffusion_model
        g = torch.Generator().manual_seed(0)
        layers, formats, ops = 0, set(), set()
        identical, max_wdiff, max_out_rel = 0, 0.0, 0.0
        with torch.no_grad():
            for mname, mod in dm.named_modules():
                w = getattr(mod, "weight", None)
                if not isinstance(w, QuantizedTensor):
                    continue
                layers += 1
                formats.add(str(getattr(mod, "quant_format", None)))
                ops.add(type(mod).__qualname__)
                r = ref[f"{mname}.weight"].float()
                wd = w.dequantize().float()
                diff = float((wd - r).abs().max()) if wd.shape == r.shape else float("inf")
                identical += diff == 0.0
                max_wdiff = max(max_wdiff, diff)
                x = torch.randn(2, 16, r.shape[1], generator=g)
                y = mod(x).float()
                bias = None if mod.bias is None else mod.bias.float()
                y_ref = torch.nn.functional.linear(x, r, bias)
                max_out_rel = max(max_out_rel, float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30)))
        out[name] = dict(config=type(patcher.model.model_config).__name__, quantized_layers=layers,
                         identical=identical, max_weight_diff=max_wdiff, max_out_rel=max_out_rel,
                         formats=sorted(formats), ops=sorted(ops),
                         warnings=[m for m in warnings if "missing" in m or "unexpected" in m or "left over" in m])
        del patcher, dm
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui-dir", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("files", nargs="+", help="name=path")
    a = ap.parse_args(argv)
    files = dict(f.split("=", 1) for f in a.files)
    print(MARK + json.dumps(_comfy_side(a.comfyui_dir, a.reference, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
