"""The ``lowbit`` command line (also ``python -m lowbit``).

  lowbit demo            quantize the embedded default model (W8A8, W4A8), compare with full precision
  lowbit quantize OUT    quantize a diffusers pipeline's denoiser (--pipeline DIR --prompt ...), the default model
                         or a diffusers UNet folder, and save it to OUT
  lowbit generate        generate a PNG with a diffusers pipeline and its quantized denoiser (--compare: beside
                         the full-precision one)
  lowbit inspect FILE    what a saved file holds: format, layers and their precision, bytes, configs, PTQD data
                         (also a ComfyUI-layout file from export --comfy: its formats and what it dropped)
  lowbit export --comfy IN OUT   a saved file in ComfyUI's own quantized layout (stock Load Diffusion Model)
  lowbit ui              serve the gradio app on localhost

Every input is checked before any work starts: a bad one prints one line (the problem and the fix) and exits
with status 2. Failures during the work print one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import struct
import sys
import tempfile
import time

# OpenMP's thread waiting is left as the environment sets it (OpenMP's default: spin a while, then sleep), what
# every other torch program gets. On a machine shared with other busy processes, OMP_WAIT_POLICY=PASSIVE stops
# idle threads spinning (up to 5x faster there); on an idle one it costs the quantized model more than the float
# one (each parallel region wakes a sleeping thread; bench/README.md).

_PKG = __package__ or "lowbit"
SUFFIX = ".safetensors"
# quantize --pipeline's defaults, sized for a CPU: the ComfyUI node's method (no reconstruction) and the model
# profile's name rules (the measured plan runs the model once per call and shortlisted layer; on the tiny test SD
# pipeline, 2 prompts x 10 steps, it made the default run 10 min 41 s instead of 59 s on the shared 2-core machine)
PIPELINE_METHOD, PIPELINE_PRECISION = "lp+ptqd", "rules"
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
MAX_ST_HEADER = 100 * 1024 * 1024  # a safetensors header above this is refused when checking an input file


class UsageError(Exception):
    """A bad command-line input, found before any work: one line, exit status 2."""


# ------------------------------------------------------------------------------------------ light imports

def _core(name: str):
    """``lowbit.quant.<name>`` for a module that needs no torch (``config``, ``errors``, ``sthdr``, ``gguf_hdr``),
    without running ``quant/__init__.py`` (which imports torch, about 2 s): ``lowbit --help`` and the input checks
    stay fast.

    The submodule is imported under a temporary bare ``lowbit.quant`` package that is removed again, so a later
    ``import lowbit.quant`` runs the real ``__init__`` and reuses the same submodule (same classes)."""
    full, pkg = f"{_PKG}.quant.{name}", f"{_PKG}.quant"
    if full in sys.modules or pkg in sys.modules:
        return importlib.import_module(full)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant")
    spec = importlib.util.spec_from_file_location(pkg, os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    sys.modules[pkg] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(full)
    finally:
        del sys.modules[pkg]


def _quant():
    """The real ``lowbit.quant`` (imports torch); re-attaches submodules loaded early by :func:`_core`."""
    q = importlib.import_module(f"{_PKG}.quant")
    for sub in ("config", "errors", "sthdr", "gguf_hdr"):
        m = sys.modules.get(f"{_PKG}.quant.{sub}")
        if m is not None and getattr(q, sub, None) is not m:
            setattr(q, sub, m)
    return q


def _arg_spec(name):
    return _core("config").arg_spec(name)


# --------------------------------------------------------------------------------------- option building

def _range_hint(spec) -> str:
    return spec.range_text() or ", ".join(map(str, spec.choices))


def _int_type(spec, flag):
    def parse(text):
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: use {_range_hint(spec)} "
                                             f"(default {spec.default})") from None
        if not spec.lo <= v <= spec.hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {_range_hint(spec)} (default {spec.default})")
        return v

    parse.__name__ = flag
    return parse


def _bits_type(text):
    """A format the project supports; for other W<b>A<b> the reason (out of range, or valid but untested)."""
    spec = _arg_spec("bits")
    name = text.strip().upper()
    if name in spec.choices:
        return name
    C = _core("config")
    try:
        C.QuantConfig.preset(text)
    except C.ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a format: {exc}; choose one of "
                                         f"{', '.join(spec.choices)}") from None
    raise argparse.ArgumentTypeError(f"{text!r} is not a supported format (the library builds it, the tested "
                                     f"formats are {', '.join(spec.choices)}); choose one of those")


def _method_type(text):
    spec = _arg_spec("method")
    if text not in spec.choices:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: choose one of {', '.join(spec.choices)}")
    return text


def _float_type(spec, flag, shown=None):
    """``shown``: the default as the refusal says it, where the option's default is not the spec's (--guidance:
    the pipeline's own)."""
    default = spec.default if shown is None else shown

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: use {_range_hint(spec)} "
                                             f"(default {default})") from None
        try:
            return spec.check(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {_range_hint(spec)} "
                                             f"(default {default})") from None

    parse.__name__ = flag
    return parse


def _add(p, flag, spec_name, *, default=None, help=None, shown=None, **kw):
    """An option whose limits, default and help come from ``quant.config`` (``ARGS``); ``shown``: the default as
    --help says it, where it depends on other options (the option's value is then None unless given)."""
    spec = _arg_spec(spec_name)
    default = spec.default if default is None and shown is None else default
    if spec.kind == "int":
        kw.setdefault("type", _int_type(spec, flag))
        kw.setdefault("metavar", "N")
        limits = spec.range_text()
    elif spec.kind == "float":
        kw.setdefault("type", _float_type(spec, flag))
        kw.setdefault("metavar", "X")
        limits = spec.range_text()
    else:
        limits = "one of " + ", ".join(spec.choices)
        kw.setdefault("metavar", spec.name.upper())
    if shown is None:
        shown = " ".join(default) if isinstance(default, (list, tuple)) else default
    p.add_argument(flag, default=default, help=f"{help or spec.help}; {limits}, default: {shown}", **kw)


def _size_type(text):
    """--size: WxH or N (a square), each a multiple of 8 in 16..16384 -> (width, height)."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX]\s*(\d{1,6})\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use WxH (e.g. 512x768) or N (e.g. 512)")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    for v in (w, h):
        if not 16 <= v <= 16384 or v % 8:
            raise argparse.ArgumentTypeError(f"{v} in {text.strip()!r} must be a multiple of 8 in 16..16384 (latents "
                                             "are 1/8 of the image size), e.g. 512")
    return w, h


def _add_guidance(p, when=""):
    spec = _arg_spec("guidance")
    p.add_argument("--guidance", default=None, type=_float_type(spec, "--guidance", "the pipeline's own"), metavar="X",
                   help=f"{when}classifier-free guidance scale (the pipeline's guidance_scale); "
                        f"{spec.range_text()}, default: the pipeline's own (7.5 for Stable Diffusion)")


def _add_precision(p, shown=None):
    """--precision and --size-budget: the pipeline's per-layer precision plan (PipelineConfig fields); ``shown``:
    --precision's default as --help says it, where it depends on other options (None until resolved)."""
    _add(p, "--precision", "precision", choices=_arg_spec("precision").choices, shown=shown)
    _add(p, "--size-budget", "size_budget")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,quantize,generate,inspect,export,kernels,ui}")

    d = sub.add_parser("demo", help="quantize the embedded default model and compare it with full precision",
                       description="Quantize the embedded default model, sample the same seeds with full "
                                   "precision and quantized models, print a table and write a PNG grid.")
    d.add_argument("--out", default="out", metavar="DIR",
                   help="folder for demo_grid.png (created if missing; its parent must exist); default: out")
    d.add_argument("--overwrite", action="store_true", help="replace DIR/demo_grid.png if it exists; default: refuse")
    _add(d, "--samples", "samples")
    _add(d, "--steps", "steps", help="DDIM sampling steps")
    _add(d, "--bits", "bits", default=["W8A8", "W4A8"], nargs="+", type=_bits_type,
         help="formats to compare")
    _add(d, "--methods", "method", default=["lp"], nargs="+", type=_method_type, help="methods to compare")
    _add_precision(d)
    d.set_defaults(fn=_cmd_demo, check=_check_demo)

    q = sub.add_parser("quantize", help="quantize a diffusers pipeline's denoiser (--pipeline), the default model "
                                        "or a diffusers UNet folder, and save it",
                       description="Quantize the denoiser (pipe.unet or pipe.transformer) of a local diffusers "
                                   "pipeline folder (--pipeline, calibrated by generating your --prompt's), or the "
                                   "embedded default model (or --unet), and save it as one .safetensors file "
                                   "(packed integers, scales, configs). Calibration quality depends on the "
                                   "prompts (use ones like those you will generate with; a few different ones are "
                                   "better than one), on --steps and --size matching how you generate, and on "
                                   "--calib-steps (timesteps kept); the cost grows with prompts x steps.")
    q.add_argument("output", metavar="OUTPUT.safetensors",
                   help="file to write; its folder must exist and be writable")
    _add(q, "--bits", "bits", type=_bits_type)
    _add(q, "--method", "method", type=_method_type,
         shown=f"{_arg_spec('method').default} (with --pipeline: {PIPELINE_METHOD}, the ComfyUI node's: "
               "reconstruction trains every block, slow on a CPU at SD size)")
    q.add_argument("--pipeline", default=None, metavar="DIR",
                   help="a local diffusers pipeline folder (model_index.json, weights as safetensors; nothing is "
                        "downloaded) whose denoiser (pipe.unet or pipe.transformer) is quantized, calibrated by "
                        "generating each --prompt on the CPU in float32; default: none (the embedded model)")
    q.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="with --pipeline: a calibration prompt (repeat for more; a class name or number for a "
                        "class-conditional pipeline such as DiT); needed for a text-conditioned pipeline; "
                        "default: none")
    q.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="with --pipeline: more calibration prompts, one per line (blank lines and lines starting "
                        "with # skipped); default: none")
    _add(q, "--steps", "steps", help="sampling steps of each calibration run (with --pipeline: use the steps you "
                                     "will generate with)")
    q.add_argument("--size", default=None, type=_size_type, metavar="WxH",
                   help="with --pipeline: image size of the calibration runs, WxH or N (square), multiples of 8 in "
                        "16..16384 (smaller is faster on a CPU; use the size you will generate at; PixArt and Sana "
                        "pipelines run the nearest size of their resolution bins); default: the pipeline's own (e.g. "
                        "512 for SD 1.5)")
    _add_guidance(q, "with --pipeline: ")
    _add(q, "--seed", "seed", help="with --pipeline: seed of the first calibration run (prompt i uses seed + i)")
    q.add_argument("--unet", default=None, metavar="DIR",
                   help="a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) with "
                        "the embedded model's inputs (1x16x16, 11 class embeddings); default: the embedded model")
    _add(q, "--calib-samples", "calib_samples", help="calibration images of the embedded model (or --unet), each "
                                                     "a full-precision sampling run (with --pipeline: one run per "
                                                     "prompt instead)")
    _add(q, "--calib-steps", "calib_steps")
    _add_precision(q, shown=f"{_arg_spec('precision').default} (with --pipeline: {PIPELINE_PRECISION}: the measured "
                            "plan runs the model again per shortlisted layer and call, slow on a CPU at SD size)")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists; default: refuse")
    q.set_defaults(fn=_cmd_quantize, check=_check_quantize)

    g = sub.add_parser("generate", help="generate an image with a diffusers pipeline and its quantized denoiser",
                       description="Load a local diffusers pipeline folder, put the quantized denoiser saved by "
                                   "`lowbit quantize --pipeline` in place of its own (the file is checked against "
                                   "the pipeline's model first) and generate one image as a PNG; --compare also "
                                   "generates with the full-precision denoiser from the same seed and writes both "
                                   "side by side with their difference (PSNR, SSIM, mean absolute difference). "
                                   "Runs on the CPU in float32 with the pipeline's own scheduler (+vsc, PTQD's "
                                   "variance calibration in LowBit's samplers, does not apply here).")
    g.add_argument("--pipeline", required=True, metavar="DIR",
                   help="the local diffusers pipeline folder the file was quantized from (required; no default)")
    g.add_argument("--quantized", required=True, metavar="FILE.safetensors",
                   help="the quantized denoiser, from lowbit quantize --pipeline (required; no default)")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="what to generate (a class name or number for a class-conditional pipeline); needed for a "
                        "text- or class-conditioned pipeline; default: none")
    g.add_argument("--out", required=True, metavar="IMAGE.png",
                   help="the PNG to write (its folder must exist; required; no default)")
    _add(g, "--steps", "steps")
    _add(g, "--seed", "seed")
    g.add_argument("--size", default=None, type=_size_type, metavar="WxH",
                   help="image size, WxH or N (square), multiples of 8 in 16..16384; default: the pipeline's own")
    _add_guidance(g)
    g.add_argument("--compare", action="store_true",
                   help="also generate with the full-precision denoiser (same seed) and write "
                        "IMAGE_compare.png (full precision | quantized) and print their difference; default: off")
    g.add_argument("--overwrite", action="store_true", help="replace the PNG(s) if they exist; default: refuse")
    g.set_defaults(fn=_cmd_generate, check=_check_generate)

    i = sub.add_parser("inspect", help="show what a saved LowBit file holds, or a ComfyUI-layout / GGUF one from "
                                       "export (no model needed)",
                       description="Format, model, configs, what it holds (PTQD statistics, schedule, split "
                                   "convolutions; the method's name is not recorded), and every layer's precision "
                                   "and bytes of a file saved by LowBit; for a file in ComfyUI's quantized layout "
                                   "(lowbit export --comfy), its layers per comfy_quant format and what the export "
                                   "dropped; for a GGUF file (lowbit export --gguf, or any GGUF), its architecture, "
                                   "tensors per GGML type and what a LowBit export dropped. Reads only the header.")
    i.add_argument("file", metavar="FILE", help="a file saved by LowBit (or exported with --comfy or --gguf)")
    i.add_argument("--layers", action="store_true", help="list every layer; default: a summary by precision")
    i.add_argument("--json", action="store_true", help="print the raw LowBit header (ComfyUI layout: its "
                                                       "quantization metadata) as JSON; default: off")
    i.set_defaults(fn=_cmd_inspect, check=_check_inspect)

    e = sub.add_parser("export", help="rewrite a LowBit file in ComfyUI's native quantized layout or as GGUF",
                       description="Write a LowBit file as ComfyUI's own quantized checkpoint (--comfy: "
                                   "int8_tensorwise / awq_w4a16 per layer + _quantization_metadata, loadable by "
                                   "ComfyUI's stock Load Diffusion Model node) or as a GGUF file (--gguf ARCH: "
                                   "Q8_0 / Q4_0 blocks, for ComfyUI-GGUF's Unet Loader (GGUF)). Keys are the "
                                   "model's own parameter names. Prints what the layout cannot hold (dropped).")
    e.add_argument("input", metavar="IN.safetensors", help="a file saved by LowBit")
    e.add_argument("output", metavar="OUT", help="file to write (.safetensors, or .gguf with --gguf); its folder "
                                                 "must exist")
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--comfy", action="store_true", help="write ComfyUI's native layout (this or --gguf is "
                                                             "required; default: neither)")
    archs = _core("gguf_hdr").GGUF_ARCHS
    target.add_argument("--gguf", choices=archs, metavar="ARCH",
                        help="write a GGUF file whose general.architecture is ARCH (what ComfyUI-GGUF's loader "
                             f"checks): one of {', '.join(archs)}; default: none (this or --comfy is required)")
    e.add_argument("--unet", default=None, metavar="DIR", help="the diffusers UNet2DModel folder IN was made from; "
                                                                 "default: the embedded model")
    e.add_argument("--prefix", default="", help="key prefix, e.g. model.diffusion_model.; default: none")
    e.add_argument("--w4-layout", choices=["awq_w4a16", "int8_tensorwise"], default="awq_w4a16",
                   help="ComfyUI format for 4-bit weights; default: awq_w4a16")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists; default: refuse")
    e.set_defaults(fn=_cmd_export, check=_check_export)

    k = sub.add_parser("kernels", help="which kernel backends run on this machine, and why not",
                       description="List LowBit's kernel backends (highest priority first) and whether each can run "
                                   "here: ready, disabled (LOWBIT_DISABLE_BACKENDS) or unavailable, with the reason. "
                                   "Builds the vnni backend's fused CPU kernel where it can (once per machine, about "
                                   "30 s), so the first quantized generation does not wait for it.")
    k.add_argument("--json", action="store_true", help="print the list as JSON; default: a table")
    k.set_defaults(fn=_cmd_kernels, check=lambda a: None)

    u = sub.add_parser("ui", help="serve the gradio app on localhost",
                       description="Serve the LowBit gradio app (needs: pip install 'lowbit[ui]').")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on; default: 127.0.0.1")
    _add(u, "--port", "port")
    u.set_defaults(fn=_cmd_ui, check=_check_ui)
    return p


# -------------------------------------------------------------------------------------------- input checks

def _writable_dir(d: str) -> bool:
    """True when a file can be created in ``d`` (tried, not guessed: os.access is wrong for root, ACLs, RO mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=d)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def _check_safetensors(path: str, what: str, with_start: bool = False):
    """A real safetensors file (8-byte size, JSON header inside the file), read without torch: its header, or
    (header, offset of the data) with ``with_start``."""
    if not os.path.lexists(path):
        raise UsageError(f"{what} {path}: no such file; check the path")
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"{what} {path}: broken symbolic link {path} -> {_core('sthdr').link_target(path)}; point "
                         "the link at the file, or give the file's own path")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; give a .safetensors file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if size - 8 < n <= MAX_ST_HEADER and f.read(1) == b"{":  # cut inside its header: the loader's words
                raise UsageError(f"{what} {path}: its header runs past the end of the file; the file is truncated: "
                                 "save or download it again")
            f.seek(8)
            ok = 2 <= n <= min(MAX_ST_HEADER, size - 8)
            header = _core("sthdr").parse_json(f.read(n).decode("utf-8"), "the header") if ok else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UsageError(f"{what} {path} is not a safetensors file (no valid header); give a file saved as "
                         "safetensors (LowBit never reads pickle checkpoints)")
    return (header, 8 + n) if with_start else header


def _lowbit_meta(header: dict, what: str, redo: str, corrupt: str, old_version: str) -> dict:
    """The LowBit metadata of a safetensors header, checked before any work: present (else ``what`` is not a LowBit
    file: ``redo``), valid JSON (else ``corrupt``), a format version this LowBit reads (else ``old_version``)."""
    meta = header.get("__metadata__")
    raw = meta.get("lowbit") if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise UsageError(f"{what} is not a LowBit quantized file (its header has no LowBit metadata); {redo}")
    sthdr = _core("sthdr")
    try:
        lb = sthdr.parse_json(raw, "its LowBit metadata")
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}; the file is corrupt{corrupt}") from None
    v = lb.get("format_version") if isinstance(lb, dict) else None
    if not sthdr.lowbit_version_ok(v):
        raise UsageError(f"{what}: LowBit format version {v!r} is not supported (this LowBit reads "
                         f"1..{sthdr.LOWBIT_FORMAT_VERSION}); update LowBit, or {old_version}")
    return lb


def _check_out_path(path: str, overwrite: bool, suffix: str, what: str, why: str, example: str):
    """The checks every output file gets before any work: its suffix (``why``: what it is written as), not a
    folder, its folder exists and is writable, nothing replaced without --overwrite."""
    if not path.lower().endswith(suffix):
        raise UsageError(f"{what} {path!r} must end in {suffix} ({why}), e.g. "
                         f"{os.path.splitext(path)[0] or example}{suffix}")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; give a file name such as {os.path.join(path, example + suffix)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path}: folder {parent} does not exist; create it first (mkdir -p {parent}) or "
                         "choose another path")
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"{path} already exists; choose another name or pass --overwrite")
    if not _writable_dir(parent):
        raise UsageError(f"{what} {path}: cannot write to folder {parent} (permission denied or read-only); choose a "
                         "writable folder")


def _check_output_file(path: str, overwrite: bool):
    _check_out_path(path, overwrite, SUFFIX, "output", "LowBit saves safetensors only", "model")


def _check_out_dir(path: str):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} is a file, not a folder; choose a folder name")
    d = os.path.abspath(path)
    if not os.path.isdir(d):
        parent = os.path.dirname(d)
        if not os.path.isdir(parent):
            raise UsageError(f"--out {path}: folder {parent} does not exist; create it first or choose another "
                             "--out")
        d = parent
    if not _writable_dir(d):
        raise UsageError(f"--out {path}: cannot write to {d} (permission denied or read-only); choose a writable "
                         "folder with --out")


# what --unet must share with the embedded model: the CLI samples it with the embedded model's setup
_UNET_IO_KEYS = ("in_channels", "out_channels", "sample_size", "num_class_embeds")


def _embedded_unet_config() -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "digits_ddpm" + SUFFIX)
    try:
        meta = _check_safetensors(path, "embedded model").get("__metadata__", {})
        return json.loads(meta["lowbit"])["_data"]["unet_config"]
    except (UsageError, KeyError, TypeError, ValueError):
        return {}


def _read_json(path):
    """The JSON value in ``path``; None when it is unreadable or not JSON (FileNotFoundError propagates)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _check_unet(path: str, sampling: bool = True):
    """A diffusers UNet2DModel folder the CLI can read; ``sampling``: also one whose inputs fit the CLI's
    calibration sampling (``quantize``; ``export`` only loads a file onto it)."""
    fix = "give a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors)"
    if not os.path.exists(path):
        raise UsageError(f"--unet {path}: no such folder; {fix}")
    if not os.path.isdir(path):
        raise UsageError(f"--unet {path} is a file; {fix}")
    cfg_path = os.path.join(path, "config.json")
    try:
        cfg = _read_json(cfg_path)
    except FileNotFoundError:
        if os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"--unet {path} is a diffusers pipeline folder; give its UNet folder, e.g. --unet "
                             f"{os.path.join(path, 'unet')}") from None
        raise UsageError(f"--unet {path} has no config.json; {fix}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--unet {cfg_path} is not a JSON object; {fix}")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UsageError(f"--unet {path} holds a {cfg.get('_class_name')!r}; the CLI quantizes UNet2DModel only "
                         "(use the library, the ComfyUI nodes or the WebUI for other UNets)")
    weights = os.path.join(path, "diffusion_pytorch_model" + SUFFIX)
    if not os.path.isfile(weights):
        variants = [n for n in _files_in(path) if re.fullmatch(r"diffusion_pytorch_model\.[^.]+" + re.escape(SUFFIX),
                                                                os.path.basename(n))]
        if variants:
            raise UsageError(f"--unet {path} holds only the variant file {os.path.basename(variants[0])}; the CLI "
                             f"reads diffusion_pytorch_model{SUFFIX}: load the model with variant=... and "
                             "save_pretrained it again without variant")
        raise UsageError(f"--unet {path} has no diffusion_pytorch_model{SUFFIX} (pickle .bin checkpoints are not "
                         "read); save the model with safe_serialization=True")
    _check_safetensors(weights, "--unet weights")
    if not sampling:
        return
    ref = _embedded_unet_config()
    bad = [f"{k}={cfg.get(k)!r} (needs {ref[k]!r})" for k in _UNET_IO_KEYS if k in ref and cfg.get(k) != ref[k]]
    if bad:
        raise UsageError(f"--unet {path} does not fit the CLI's sampling setup: {', '.join(bad)}; the CLI calibrates "
                         "with the embedded model's inputs (use the library for other models)")


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file (the same path, or links to it): never the output of a command that reads it."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist)
        return False


def _files_in(folder: str) -> list:
    try:
        return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    except OSError:  # (not a folder, or unreadable: _check_unet names that)
        return []


def _refuse_input_file(output: str, files, what: str):
    """The output is none of ``files`` (an input's, ``what``: e.g. "the --unet model")."""
    if any(_same_file(output, f) for f in files):
        raise UsageError(f"output {output} is a file of {what}; choose another output name (--overwrite never "
                         "replaces the input)")


def _check_not_unet_file(a):
    """The output is none of the --unet model's files (quantize and export read that model)."""
    if a.unet:
        _refuse_input_file(a.output, _files_in(a.unet), "the --unet model")


def _check_precision(a):
    """--size-budget bounds the measured plan: with --precision rules it would be ignored without a word."""
    if a.precision == "rules" and a.size_budget != _arg_spec("size_budget").default:
        raise UsageError(f"--size-budget {a.size_budget} applies to --precision measured only (the rules plan keeps "
                         "the layers its name rules say); drop it or use --precision measured")


def _check_quantize(a):
    a.precision = a.precision or (PIPELINE_PRECISION if a.pipeline else _arg_spec("precision").default)
    _check_precision(a)
    if a.pipeline and a.unet:
        raise UsageError(f"--pipeline and --unet together: give one (--pipeline {a.pipeline} quantizes the pipeline's "
                         "denoiser, --unet a UNet2DModel folder shaped like the embedded model)")
    defaults = {"calib_samples": _arg_spec("calib_samples").default, "seed": _arg_spec("seed").default}
    if a.pipeline and a.calib_samples != defaults["calib_samples"]:
        raise UsageError(f"--calib-samples {a.calib_samples} applies to the embedded model and --unet; with "
                         "--pipeline each prompt is one calibration run: give more --prompt's (or --prompts-file)")
    if not a.pipeline:
        given = [flag for flag, v in (("--prompt", a.prompt), ("--prompts-file", a.prompts_file), ("--size", a.size),
                                      ("--guidance", a.guidance)) if v is not None]
        given += ["--seed"] if a.seed != defaults["seed"] else []
        if given:
            raise UsageError(f"{given[0]} applies to --pipeline only (calibration runs of a diffusers pipeline); add "
                             "--pipeline DIR or drop it")
    a.method = a.method or (PIPELINE_METHOD if a.pipeline else _arg_spec("method").default)
    _check_not_unet_file(a)
    if a.pipeline:
        _check_not_pipeline_file(a.output, a.pipeline)
    _check_output_file(a.output, a.overwrite)
    _check_combinations([a.bits], [a.method])
    if a.unet:
        _check_unet(a.unet)
    if a.pipeline:
        a.pipe_info = _check_pipeline(a.pipeline)
        a.prompts = _prompts(a.prompt, a.prompts_file)
        if a.pipe_info["text"] and not a.prompts:
            raise UsageError(f"--pipeline {a.pipeline} is text-conditioned ({a.pipe_info['cls']}): give calibration "
                             "prompts with --prompt TEXT (repeat it) or --prompts-file FILE, like the ones you will "
                             "generate with")


def _prompts(given, path) -> list:
    """--prompt's and the lines of --prompts-file (blank lines and # comments skipped)."""
    out = []
    for p in given or []:
        if not p.strip():
            raise UsageError("--prompt is empty; give the text to generate, e.g. --prompt 'a red fox in snow'")
        out.append(p.strip())
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"--prompts-file {path}: " + ("is a folder" if os.path.isdir(path) else "no such file")
                             + "; give a text file with one prompt per line")
        try:
            with open(path, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f.read().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompts-file {path} cannot be read as UTF-8 text ({exc.__class__.__name__}); give a "
                             "text file with one prompt per line") from None
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise UsageError(f"--prompts-file {path} holds no prompts (only blank or # lines); write one prompt per "
                             "line")
        out += lines
    return out


_WEIGHT_EXTS = (SUFFIX, ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_PLAIN_WEIGHTS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names


def _check_pipeline(path: str) -> dict:
    """A local diffusers pipeline folder the CLI can load without pickle: model_index.json, a unet or transformer
    component, every component's folder, safetensors weights (no variant-only folders). Returns what the CLI needs
    from it: the pipeline class name, the denoiser's attribute, class and config.json, whether it is
    text-conditioned. No torch."""
    fix = "give a diffusers pipeline folder (model_index.json and one folder per component, as save_pretrained writes)"
    if not os.path.exists(path):
        raise UsageError(f"--pipeline {path}: no such folder; {fix}")
    if not os.path.isdir(path):
        raise UsageError(f"--pipeline {path} is a file; {fix}")
    index_path = os.path.join(path, "model_index.json")
    try:
        index = _read_json(index_path)
    except FileNotFoundError:
        try:
            cfg = _read_json(os.path.join(path, "config.json"))
        except FileNotFoundError:
            cfg = None
        cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
        if cls == "UNet2DModel":
            raise UsageError(f"--pipeline {path} is a UNet folder (config.json, no model_index.json); give it with "
                             f"--unet {path}, or give the pipeline folder that holds it") from None
        if isinstance(cls, str):
            parent = os.path.dirname(os.path.abspath(path))
            where = (f"--pipeline {os.path.dirname(os.path.normpath(path)) or '.'}"
                     if os.path.isfile(os.path.join(parent, "model_index.json")) else
                     "the pipeline folder that holds it (with model_index.json)")
            raise UsageError(f"--pipeline {path} is a model folder ({_printable(cls[:80])}), not a pipeline (no "
                             f"model_index.json); give {where}") from None
        raise UsageError(f"--pipeline {path} has no model_index.json; {fix}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise UsageError(f"--pipeline {index_path} is not a pipeline index (a JSON object naming its _class_name); "
                         f"{fix}")
    cls = _printable(index["_class_name"][:100])
    comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and all(isinstance(x, str) for x in v)}
    den = next((n for n in ("transformer", "unet") if n in comps), None)
    if den is None:
        raise UsageError(f"--pipeline {path}: its {cls} has no unet or transformer component; the CLI quantizes the "
                         "denoiser at pipe.unet or pipe.transformer (for another module, record its calls with "
                         "lowbit.quant.CallRecorder in Python)")
    for name, (_lib, ccls) in comps.items():
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise UsageError(f"--pipeline {path}: its model_index.json lists {_printable(name[:80])} "
                             f"({_printable(ccls[:80])}) but the folder {_printable(name[:80])}/ is missing; give a "
                             "complete pipeline folder (save_pretrained writes one)")
        files = [n for n in _files_in(folder)]
        names = {os.path.basename(n) for n in files}
        weights = sorted(n for n in names if n.endswith(_WEIGHT_EXTS))
        st = [n for n in weights if n.endswith(SUFFIX)]
        if weights and not st:
            raise UsageError(f"--pipeline {path}: {name}/ holds no safetensors weights, only {weights[0]} (LowBit "
                             "never loads pickle .bin/.pt/.ckpt files): load the pipeline in Python and save it again "
                             "with save_pretrained(folder, safe_serialization=True)")
        if st and not any(b + SUFFIX in names or b + SUFFIX + ".index.json" in names for b in _PLAIN_WEIGHTS):
            raise UsageError(f"--pipeline {path}: {name}/ holds only the variant file {st[0]}; the CLI reads the plain "
                             "weights: load the pipeline with variant=... and save_pretrained it again without "
                             "variant")
    den_dir = os.path.join(path, den)
    try:
        den_cfg = _read_json(os.path.join(den_dir, "config.json"))
    except FileNotFoundError:
        den_cfg = None
    if not isinstance(den_cfg, dict):
        raise UsageError(f"--pipeline {path}: {den}/config.json is missing or not a JSON object; {fix}")
    if not any(n.endswith(SUFFIX) for n in _files_in(den_dir)):
        raise UsageError(f"--pipeline {path}: {den}/ holds no weights (diffusion_pytorch_model{SUFFIX}); {fix}")
    single = os.path.join(den_dir, "diffusion_pytorch_model" + SUFFIX)
    if os.path.lexists(single):
        _check_safetensors(single, f"--pipeline {den} weights")
    absent = [k for k, v in index.items() if not k.startswith("_") and v == [None, None]]
    return dict(cls=cls, denoiser=den, den_cls=comps[den][1], den_config=den_cfg, absent=absent,
                text=any(n.startswith(("text_encoder", "tokenizer")) for n in comps))


def _check_not_pipeline_file(output: str, folder: str):
    """The output is none of the pipeline's files (its folder and the components' folders)."""
    files = _files_in(folder)
    for d in list(files):
        files += _files_in(d) if os.path.isdir(d) else []
    _refuse_input_file(output, files, "the --pipeline folder")


def _check_png_out(path: str, overwrite: bool, what: str = "--out"):
    _check_out_path(path, overwrite, ".png", what, "the image is written as PNG", "image")


def compare_path(out: str) -> str:
    """Where ``generate --compare`` writes the side-by-side image: IMAGE_compare.png beside IMAGE.png."""
    stem, ext = os.path.splitext(out)
    return f"{stem}_compare{ext}"


def _json_same(x, y) -> bool:
    return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def _check_quantized_fits(path: str, info: dict, folder: str):
    """--quantized is a LowBit file made from this pipeline's denoiser, as far as its header says (its model class
    and, where recorded, the architecture's config against the denoiser's config.json): no torch, no weights read.
    Loading checks every layer against the model again."""
    header = _check_safetensors(path, "--quantized")
    redo = f"quantize this pipeline with lowbit quantize OUT{SUFFIX} --pipeline {folder} --prompt ..."
    lb = _lowbit_meta(header, f"--quantized {path}", redo, f": {redo}", redo)
    den, den_cls = info["denoiser"], info["den_cls"]
    model = lb.get("model") if isinstance(lb.get("model"), dict) else {}
    cls = model.get("cls")
    if isinstance(cls, str) and cls != den_cls:
        raise UsageError(f"--quantized {path} was made from a {_printable(cls[:80])}, but this pipeline's {den} is a "
                         f"{_printable(den_cls[:80])}; give the file quantized from this pipeline, or {redo}")
    arch = lb.get("arch") if isinstance(lb.get("arch"), dict) else {}
    cfg = arch.get("config") if isinstance(arch.get("config"), dict) else {}
    diff = [k for k, val in cfg.items() if k in info["den_config"] and not _json_same(val, info["den_config"][k])]
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more settings)" if len(diff) > 1 else ""
        raise UsageError(f"--quantized {path} does not fit this pipeline's {den}: its {_printable(k[:80])} is "
                         f"{_printable(json.dumps(cfg[k])[:80])}, the pipeline's "
                         f"{_printable(json.dumps(info['den_config'][k])[:80])}{more}; give the file quantized from "
                         f"this pipeline, or {redo}")


def _check_generate(a):
    _check_png_out(a.out, a.overwrite)
    if a.compare:
        _check_png_out(compare_path(a.out), a.overwrite, "--out (its _compare.png)")
    if a.prompt is not None and not a.prompt.strip():
        raise UsageError("--prompt is empty; give the text to generate, e.g. --prompt 'a red fox in snow'")
    a.pipe_info = _check_pipeline(a.pipeline)
    _check_quantized_fits(a.quantized, a.pipe_info, a.pipeline)
    a.prompts = [a.prompt.strip()] if a.prompt else []
    if a.pipe_info["text"] and not a.prompts:
        raise UsageError(f"--pipeline {a.pipeline} is text-conditioned ({a.pipe_info['cls']}): give --prompt TEXT")


def _check_demo(a):
    _check_precision(a)
    if not a.out.strip():  # (os.makedirs("") failed after the checks)
        raise UsageError("--out is empty; give a folder name, e.g. --out out (the default)")
    grid = os.path.join(a.out, "demo_grid.png")  # (recipes.DEMO_GRID; recipes imports torch)
    if os.path.isdir(grid):
        raise UsageError(f"{grid} is a folder; choose another --out")
    if os.path.lexists(grid) and not a.overwrite:
        raise UsageError(f"{grid} already exists; choose another --out or pass --overwrite")
    _check_combinations(a.bits, a.methods)
    _check_out_dir(a.out)  # (last: its write probe touches the folder)


def _check_combinations(bits_list, methods):
    """Every --bits x --method pair the job will run fits together (the core's rule, before the work and without
    torch: W4A16 with a +mixed method failed after calibration). --bits and --method are checked one by one when
    parsed."""
    C = _core("config")
    for bits in bits_list:
        for method in methods:
            try:
                C.check_schedule_fits(C.QuantConfig.preset(bits), "mixed" in method.split("+"))
            except C.ConfigError as exc:
                raise UsageError(f"--bits {bits} with --method {method}: {exc}") from None


_PREFIX_RE = re.compile(r"^(?:[A-Za-z0-9_]+\.)*$")  # a dotted key path ending in ".", or nothing


def _check_export(a):
    if not _PREFIX_RE.match(a.prefix):  # ("model.diffusion_model" glued keys: model.diffusion_modelconv_in.weight)
        hint = f"; did you mean {a.prefix}.?" if _PREFIX_RE.match(a.prefix + ".") else ""
        raise UsageError(f"--prefix {a.prefix!r} is not a dotted key path ending in '.' (e.g. model.diffusion_model.) "
                         f"or empty{hint}")
    if a.gguf and a.w4_layout != "awq_w4a16":
        raise UsageError("--w4-layout is a ComfyUI-layout option (--comfy); GGUF writes 4-bit weights as Q4_0")
    header = _check_safetensors(a.input, "input")
    if _same_file(a.input, a.output):
        raise UsageError(f"output {a.output} is the input file; choose another output name (--overwrite never "
                         "replaces the input)")
    _check_not_unet_file(a)
    if a.gguf:
        _check_out_path(a.output, a.overwrite, ".gguf", "output", "GGUF loaders list only .gguf files", "model")
    else:
        _check_output_file(a.output, a.overwrite)
    lb = _lowbit_meta(header, f"input {a.input}", "export reads files written by `lowbit quantize` or "
                      "lowbit.quant.save", "", "re-save the file with this version")
    # a file that records its architecture is exported from the model it builds (lowbit.quant.load_model), unless
    # --unet names the float model; others are loaded onto the embedded model or --unet
    a.standalone = bool(lb.get("arch"))
    if a.unet:
        _check_unet(a.unet, sampling=False)


def _check_inspect(a):
    # (a missing file, a folder, not safetensors, malformed ComfyUI quantization metadata: one line each)
    if os.path.isfile(a.file) and _core("gguf_hdr").is_gguf(a.file):
        a.gguf_header = _gguf_header(a.file)
        return
    _comfy_layout(a.file, *_check_safetensors(a.file, "file", with_start=True))


def _gguf_header(path: str):
    """A GGUF file's checked header (quant/gguf_hdr.py) and its LowBit export record, if any (checked)."""
    gh = _core("gguf_hdr")
    try:
        fields, tensors, _ = gh.read_header(path)
    except gh.GGUFError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"file {path}: cannot read it ({exc.strerror})") from None
    rec = fields.get("lowbit.export")
    if rec is not None:
        try:
            rec = _core("sthdr").parse_json(rec, "its lowbit.export record") if isinstance(rec, str) else None
        except ValueError:
            rec = None
        ok = (isinstance(rec, dict) and isinstance(rec.get("layers"), dict) and isinstance(rec.get("dropped"), list)
              and all(isinstance(d, str) for d in rec["dropped"]))
        if not ok:
            raise UsageError(f"file {path}: its lowbit.export record is malformed; export the file again")
    return fields, tensors, rec


def gguf_inspect_text(path: str, fields: dict, tensors: list, rec) -> str:
    counts, nbytes = {}, {}
    for _, typ, _, _, nb in tensors:
        counts[typ] = counts.get(typ, 0) + 1
        nbytes[typ] = nbytes.get(typ, 0) + nb
    arch = fields.get("general.architecture")
    lines = [f"file       {path}",
             "format     GGUF" + (f" (written by lowbit export: {len(rec['layers'])} quantized layers)" if rec
                                  else " (not written by LowBit)"),
             f"arch       {arch if isinstance(arch, str) else 'not recorded'}",
             "tensors    " + ", ".join(f"{counts[t]} {t} ({nbytes[t] / 2**20:.1f} MiB)" for t in sorted(counts))]
    if rec:
        lines += [f"dropped    {d}" for d in rec["dropped"]]
    return "\n".join(_printable(s) for s in lines)


def _check_ui(a):
    import ipaddress

    host = a.host.strip()
    looks_numeric = re.fullmatch(r"[0-9.]+|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*", host) is not None
    if not host or (looks_numeric and not _is_ip(host, ipaddress)):
        raise UsageError(f"--host {a.host!r} is not an IP address: use e.g. 127.0.0.1 (this machine only, the "
                         "default) or 0.0.0.0 (every interface)")
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("the ui needs gradio, which is not installed; pip install 'lowbit[ui]'")


def _is_ip(text: str, ipaddress) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- progress

class Progress:
    """The core's ``progress=`` callback for a terminal: one line per stage (its name, count, elapsed time and,
    after two seconds, the time left at the stage's rate so far) on stderr; redrawn in place on a terminal, printed
    at start, every 30 s and at the end otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.t_last = time.time()
        self.stage, self.t_stage, self.t_print, self.open = None, 0.0, 0.0, False

    def _write(self, text, end="\n"):
        self.stream.write(("\r" + text + "\033[K" if self.tty else text) + end)
        self.stream.flush()

    def _close_line(self):
        if self.open and self.tty:
            self.stream.write("\n")
        self.open = False

    def banner(self, text: str):
        """A stage of the job (a line of its own)."""
        self._close_line()
        self.stage = None
        self.t_last = time.time()
        self._write(f"[{self.t_last - self.t0:6.1f} s] {text}")

    def __call__(self, done, total, info):
        now = time.time()
        stage = info.get("stage") or "working"
        if stage != self.stage:
            self._close_line()
            # a stage whose first report is a finished step (a sampler's 1/N) began when the last event ended: its
            # first step is counted (generate's first quantized step includes the kernel autotuning)
            self.stage, self.t_stage, self.t_print = stage, (now if done == 0 else self.t_last), 0.0
        self.t_last = now
        extra = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}"
                        for k, v in info.items() if k != "stage")
        spent = now - self.t_stage
        left = f", about {spent / done * (total - done):.0f} s left" if 0 < done < total and spent > 2 else ""
        line = f"  {stage}: {done}/{total} ({spent:.1f} s{left}){extra}"
        if done >= total:
            self._write(line)
            self.open, self.stage = False, None
        elif self.tty and now - self.t_print > 0.2:
            self._write(line, end="")
            self.open, self.t_print = True, now
        elif not self.tty and (self.t_print == 0.0 or now - self.t_print > 30):
            self._write(line)
            self.t_print = now


# -------------------------------------------------------------------------------------------------- jobs
# The jobs call recipes.py (the embedded model's jobs), whose models come from lowbit.quant.pipeline.run.

def _cmd_demo(a, prog: Progress):
    from .recipes import demo, format_table

    prog.banner(f"demo: {', '.join(a.bits)} x {', '.join(a.methods)}; {a.samples} samples per model, "
                f"{a.steps} steps")

    def table(rows):  # printed before the grid is written: a grid that cannot be saved keeps the results
        print(format_table(rows))
        print("\nweight bytes: packed integers and scales, without the kernels' copies (deploy_ tunes each "
              "layer's kernel by measured speed and may keep float / int8 copies, at most 64 MiB per model). "
              "sampling s: one run per model, one after the other in this process (the quantized runs include "
              "the kernel tuning), "
              "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "default") + "; noisy on a small or shared "
              "machine. Deployed vs full precision measured with runs alternating: python -m "
              "lowbit.bench.bench_sampling (README, 'Speed and memory').", flush=True)
        prog.banner(f"writing {os.path.join(a.out, 'demo_grid.png')}")

    res = demo(a.out, n_eval=a.samples, steps=a.steps, bits_list=tuple(a.bits), methods=tuple(a.methods),
               progress=prog, precision=a.precision, size_budget=a.size_budget, overwrite=a.overwrite, on_rows=table)
    prog.banner("done")
    print(f"\nside-by-side grid (rows: full precision, then per format: quantized, |difference|): {res['grid']}")
    return 0


def _load_unet(path: str):
    """The diffusers UNet2DModel in folder ``path`` (checked by ``_check_unet``); weights that do not fit its
    config.json (diffusers' multi-line ``Cannot load ... expected shape ...`` or a missing tensor) are one
    ``LoadError`` naming the folder and the mismatch."""
    import re

    from diffusers import UNet2DModel

    try:
        return UNet2DModel.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        text = _one_line(exc)
        m = re.search(r"because (.{1,300}?expected shape .{1,300}?)(?:\. If you want|$)", text)
        why = m.group(1) if m else text.split(" If you want", 1)[0][:300]
        raise _core("errors").LoadError(f"--unet {path}: its weights do not fit its config.json ({why}); give a "
                                        "folder saved by save_pretrained from one model (config and weights "
                                        "together)") from None


def _cmd_quantize(a, prog: Progress):
    if a.pipeline:
        return _quantize_pipeline(a, prog)
    prog.banner("loading torch and the model")
    q = _quant()
    from . import recipes

    setup = recipes.default_setup()
    if a.unet:
        setup.unet = _load_unet(a.unet)
    prog.banner(f"recording calibration: {a.calib_samples} full-precision sampling runs")
    calls = recipes.record_calibration(setup, n_samples=a.calib_samples, steps=a.steps, progress=prog)
    calls = q.timestep_aware_subset(calls, a.calib_steps)
    prog.banner(f"quantizing to {a.bits} with {a.method} on {len(calls)} calibration calls")
    # (saved, not run here: no kernel tuning, whose choices are measured again where the file is loaded)
    b = recipes.build(setup, a.method, a.bits, calls, progress=prog, precision=a.precision,
                      size_budget=a.size_budget, tune_kernels=False)
    print("\n".join(q.pipeline.describe(b.model)))
    prog.banner(f"saving {a.output}")
    q.save(b.model, a.output, overwrite=a.overwrite)
    print(f"saved {a.bits} ({a.method}) to {a.output} in {time.time() - prog.t0:.1f} s")
    return 0


# ------------------------------------------------------------------------------------- diffusers pipelines

def _pipeline_class(a):
    """The diffusers pipeline class of --pipeline (imports diffusers and torch, reads no weights), and the checks
    its signature allows before the weights are loaded: a prompt or class to calibrate with, a size and guidance it
    takes. Refusals are UsageErrors (one line, exit 2)."""
    import diffusers

    info, D = a.pipe_info, _quant().diffusers_pipeline
    cls = getattr(diffusers, info["cls"], None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UsageError(f"--pipeline {a.pipeline}: diffusers {diffusers.__version__} has no pipeline class "
                         f"{info['cls']}; update diffusers, or give a diffusers pipeline folder")
    how = D.conditioning(cls)
    if how is None:
        raise UsageError(f"--pipeline {a.pipeline}: {info['cls']} is unconditional (it takes no prompt or class), and "
                         "the CLI calibrates with prompts; record its denoiser's calls in Python "
                         "(lowbit.quant.CallRecorder around pipe(...))")
    if not a.prompts:
        raise UsageError(f"--pipeline {a.pipeline} is class-conditional ({info['cls']}): give classes with --prompt "
                         "(a class number or a label name)")
    if a.size is not None and not D.takes(cls, "height", "width"):
        raise UsageError(f"--size: {info['cls']} takes no height/width (its image size is fixed by its model or by "
                         "its input image); drop --size")
    if a.guidance is not None and not D.takes(cls, "guidance_scale"):
        raise UsageError(f"--guidance: {info['cls']} takes no guidance_scale; drop --guidance")
    a.image_input = next((n for n in _IMAGE_INPUTS if D.takes(cls, n)), None)
    a.binning = D.takes(cls, "use_resolution_binning")  # (on by default in the pipelines that take it)
    return cls


# the inputs of image-conditioned pipelines (img2img, inpainting, ControlNet, ...), which the CLI does not give
_IMAGE_INPUTS = ("image", "control_image", "mask_image")


def _load_pipeline(a, cls):
    """The pipeline of --pipeline from its local folder (safetensors only, nothing downloaded) on the CPU in
    float32, its progress bars off (the CLI prints its own stages); a folder diffusers cannot load is one LoadError."""
    import torch
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:  # (a pipeline without transformers models)
        pass
    try:
        # components saved as absent ([null, null]: SD3 without its T5) passed as None, as a user would: diffusers
        # refuses to build a pipeline without them otherwise (only its optional components may be left out)
        pipe = cls.from_pretrained(a.pipeline, use_safetensors=True, local_files_only=True,
                                   **{k: None for k in a.pipe_info["absent"]})
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, OSError, ImportError) as exc:
        raise _core("errors").LoadError(f"--pipeline {a.pipeline}: diffusers cannot load it "
                                        f"({_one_line(exc)[:300]}); give a complete pipeline folder saved by "
                                        "save_pretrained(folder, safe_serialization=True)") from None
    w, h = a.size or (None, None)
    for prompt in a.prompts:  # (a class name or number the pipeline has no class for: before any work)
        try:
            _quant().diffusers_pipeline.pipeline_call_kwargs(pipe, prompt, steps=1, height=h, width=w,
                                                             guidance=a.guidance)
        except _core("errors").ConfigError as exc:
            raise UsageError(f"--prompt {prompt[:80]!r}: {exc}") from None
    # every component in float32, not only the denoiser: diffusers loads its own models in float32 whatever they were
    # saved in, transformers 5 keeps a text encoder saved in fp16 in fp16 (its dtype="auto"), and a float32 UNet fed
    # fp16 text embeddings fails ("mat1 and mat2 must have the same dtype"); cast per component (pipe.to(dtype)
    # warns about every diffusers model)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module) and any(p.dtype != torch.float32 for p in comp.parameters()
                                                     if p.is_floating_point()):
            comp.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _pipeline_errors(a):
    """An error of the pipeline itself while it generates (a size it cannot take, ...) as one line, exit 1; exit 2
    (a UsageError) where the pipeline takes an input image the CLI does not give (img2img, inpainting, ...)."""
    errors = _core("errors")
    try:
        yield
    except errors.LowBitError:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError, KeyError, AttributeError) as exc:
        what = f"the {a.pipe_info['cls']} failed while generating ({_one_line(exc)[:300]})"
        if getattr(a, "image_input", None):  # (img2img, inpainting, ControlNet...: it failed at its first step)
            raise UsageError(f"--pipeline {a.pipeline}: {what}; it takes an input image ({a.image_input}=...), "
                             "which the CLI does not give (it generates from prompts only): give the text-to-image "
                             "pipeline folder of this model, or record its denoiser's calls in Python "
                             "(lowbit.quant.CallRecorder around pipe(...))") from None
        raise errors.LowBitError(f"{what}; check that --size, --steps and --guidance suit this pipeline") from None


def _size_text(a) -> str:
    if not a.size:
        return "the pipeline's size"
    text = f"{a.size[0]}x{a.size[1]}"
    if getattr(a, "binning", False):  # (PixArt, Sana: --size 512 on a 1024 model runs at 1024x1024)
        text += (f" (asked: the {a.pipe_info['cls']} runs at the nearest size of its resolution bins and resizes the "
                 "image)")
    return text


def _quantize_pipeline(a, prog: Progress):
    prog.banner("loading torch and the pipeline")
    cls = _pipeline_class(a)
    q = _quant()
    from . import recipes

    info, D = a.pipe_info, q.diffusers_pipeline
    try:  # the whole configuration checked before any work (as the pipeline verb checks it)
        cfg = recipes.pipeline_config(a.method, a.bits, precision=a.precision, size_budget=a.size_budget,
                                      tune_kernels=False)
    except q.ConfigError as exc:
        raise UsageError(str(exc)) from None
    pipe = _load_pipeline(a, cls)
    den = getattr(pipe, info["denoiser"])
    sched = D.noise_schedule(pipe)
    try:
        q.pipeline.check(den, None, cfg, alphas_cumprod=sched["alphas_cumprod"])
    except q.ConfigError as exc:
        raise UsageError(str(exc)) from None
    w, h = a.size or (None, None)
    prog.banner(f"recording calibration: {len(a.prompts)} prompt(s) x {a.steps} steps at {_size_text(a)} with the "
                f"full-precision {info['denoiser']} ({info['den_cls']})")
    with _pipeline_errors(a):
        calls = D.record_pipeline_calls(pipe, a.prompts, steps=a.steps, seed=a.seed, height=h, width=w,
                                        guidance=a.guidance, progress=prog)
    del pipe  # (the text encoders and the VAE are not needed any more)
    calls = q.timestep_aware_subset(calls, a.calib_steps)
    prog.banner(f"quantizing to {a.bits} with {a.method} on {len(calls)} calibration calls")
    b = recipes.build_model(den, a.method, a.bits, calls, **sched, progress=prog, precision=a.precision,
                            size_budget=a.size_budget, tune_kernels=False)
    print("\n".join(q.pipeline.describe(b.model)))
    prog.banner(f"saving {a.output}")
    q.save(b.model, a.output, overwrite=a.overwrite)
    print(f"saved {a.bits} ({a.method}) of {info['denoiser']} ({info['den_cls']}) to {a.output} in "
          f"{time.time() - prog.t0:.1f} s")
    return 0


def _cmd_generate(a, prog: Progress):
    prog.banner("loading torch and the pipeline")
    cls = _pipeline_class(a)
    q = _quant()
    from . import recipes

    info, D = a.pipe_info, q.diffusers_pipeline
    pipe = _load_pipeline(a, cls)
    den = getattr(pipe, info["denoiser"])
    prog.banner(f"loading {a.quantized} onto the pipeline's {info['denoiser']}")
    qden = q.load(den, a.quantized)
    w, h = a.size or (None, None)
    kw = dict(steps=a.steps, seed=a.seed, height=h, width=w, guidance=a.guidance, progress=prog)
    prompt = a.prompts[0] if a.prompts else None
    fp_img = None
    if a.compare:
        prog.banner(f"generating with the full-precision {info['denoiser']}: {a.steps} steps at {_size_text(a)}")
        with _pipeline_errors(a):
            fp_img = D.generate(pipe, prompt, stage="full precision: generate", **kw)
    prog.banner(f"generating with the quantized {info['denoiser']}: {a.steps} steps at {_size_text(a)}")
    with _pipeline_errors(a), D.swapped_denoiser(pipe, qden):
        img = D.generate(pipe, prompt, stage="quantized: generate", **kw)
    recipes.write_grid(img, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out} ({img.width}x{img.height}) in {time.time() - prog.t0:.1f} s")
    if fp_img is not None:
        side = compare_path(a.out)
        recipes.write_grid(_side_by_side(fp_img, img), side, overwrite=a.overwrite)
        print(f"full precision | quantized: {side}; {_difference_text(fp_img, img)}")
    return 0


def _side_by_side(left, right):
    """One PIL image: ``left`` and ``right`` next to each other (a 4-pixel white gap between)."""
    from PIL import Image

    gap = 4
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right.convert("RGB"), (left.width + gap, 0))
    return out


def _difference_text(a_img, b_img) -> str:
    """PSNR, SSIM (quant.compare) and the mean absolute pixel difference of two PIL images."""
    import numpy as np
    import torch

    from .quant.compare import psnr, ssim

    t = [torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0)[None] for i in (a_img, b_img)]
    mad = float((t[0] - t[1]).abs().mean()) * 255
    p, s = psnr(*t)[0], ssim(*t)[0]
    return f"PSNR {p:.2f} dB, SSIM {s:.4f}, mean |difference| {mad:.2f} of 255"


def _cmd_export(a, prog: Progress):
    prog.banner("loading torch and the model")
    q = _quant()
    from . import recipes

    standalone = getattr(a, "standalone", False) and not a.unet  # (set by _check_export)
    if a.unet:
        fp = _load_unet(a.unet)
    elif not standalone:
        fp = recipes.default_setup().unet
    prog.banner(f"loading {a.input}")
    qmodel = q.load_model(a.input) if standalone else q.load(fp, a.input)
    if a.gguf:
        prog.banner(f"writing {a.output} (GGUF, architecture {a.gguf})")
        q.export_gguf(qmodel, a.output, arch=a.gguf, prefix=a.prefix, overwrite=a.overwrite, log=print)
    else:
        prog.banner(f"writing {a.output} (ComfyUI-native)")
        q.export_comfy(qmodel, a.output, prefix=a.prefix, w4_layout=a.w4_layout, overwrite=a.overwrite, log=print)
    print(f"wrote {a.output} in {time.time() - prog.t0:.1f} s")
    return 0


def _cmd_kernels(a, prog: Progress):
    from .kernels import registry

    rows = registry.status()
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'backend':{width}s}  priority  state        what / why not")
    for r in rows:
        print(f"{r['name']:{width}s}  {r['priority']:8d}  {r['state']:11s}  {r['why'] or r['description']}")
    print("Each quantized layer runs on the backend measured fastest for its shape among those that accept it "
          "(kernels/README.md).")
    return 0


def _cmd_ui(a, prog: Progress):
    from .ui.app import launch

    launch(host=a.host, port=a.port)
    return 0


# ---------------------------------------------------------------------------------------------- inspect

def _nbytes(index: dict, prefix: str) -> int:
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in index.items() if k.startswith(prefix))


def _precision(m: dict) -> str:
    a = m.get("a_bits")
    a = "16" if a == 16 else ("dyn8" if m.get("a_dynamic") else str(a))
    g = f" g{m['group_size']}" if m.get("group_size") else ""
    return f"W{m.get('w_bits')}A{a}{g}"


def _config_text(obj) -> str:
    if not isinstance(obj, dict) or "_data" not in obj:
        return "none"
    data = obj["_data"] if isinstance(obj["_data"], dict) else {}
    parts = [f"{k}={len(v)} rules" if k == "rules" and isinstance(v, (list, tuple)) else f"{k}={v}"
             for k, v in data.items()]
    return f"{obj.get('_type')} v{obj.get('_version')}: " + ", ".join(parts)


def inspect_text(path: str, layers: bool = False) -> str:
    """The human-readable summary printed by ``lowbit inspect`` (header only; no model, no tensor data read)."""
    q = _quant()
    header, index = q.read_header(path)
    try:  # what loading says about the header's meaning (arch, configs, float tensors), before calling it fine
        q.io.check_header(path, header, index)
        refused = None
    except q.LoadError as exc:
        refused = str(exc)
    lm = header.get("layers") if isinstance(header.get("layers"), dict) else {}
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    extras = header.get("extras") if isinstance(header.get("extras"), dict) else {}
    total = os.path.getsize(path)
    cfg = header.get("config") if isinstance(header.get("config"), dict) else None
    name = None
    if cfg and isinstance(cfg.get("_data"), dict):
        d = cfg["_data"]
        name = f"W{d.get('w_bits')}A{d.get('a_bits')}"
    method = ["quantized (" + (name or "?") + ")"]
    if "ptqd" in extras:
        method.append("PTQD statistics")
    if header.get("schedule"):
        method.append("step-aware bit schedule")
    if header.get("splits"):
        splits = header["splits"]
        method.append(f"shortcut split ({len(splits) if isinstance(splits, (dict, list)) else '?'} convs)")
    dec = extras.get("decisions") if isinstance(extras.get("decisions"), dict) else {}
    dec_layers = ([d for d in dec.get("layers", []) if isinstance(d, dict)]
                  if isinstance(dec.get("layers"), list) else [])
    if dec_layers:
        method.append("per-layer precision plan")
    method += [k for k in extras if k not in ("ptqd", "decisions")]
    out = [f"file       {path} ({total:,} bytes)",
           f"format     {header.get('format')} v{header.get('_migrated_from', header.get('format_version'))}"
           + (f" (read as v{header.get('format_version')})"
              if header.get("_migrated_from", header.get("format_version")) != header.get("format_version") else ""),
           f"model      {model.get('cls')} (fingerprint {model.get('fingerprint')}), "
           f"{header.get('num_train_timesteps')} training timesteps",
           f"profile    {_profile_text(header.get('profile'))}",
           # (the file does not record the method that made it, e.g. "recon+ptqd+vsc": what it holds shows its parts)
           f"holds      {header['method'] if isinstance(header.get('method'), str) else ', '.join(method)}",
           f"config     {_config_text(cfg)}",
           f"schedule   {_config_text(header.get('schedule'))}"]
    arch = header.get("arch") if isinstance(header.get("arch"), dict) else None
    floats = header.get("float_tensors") if isinstance(header.get("float_tensors"), list) else []
    if refused:
        out.append("standalone no: loading refuses this file (see 'loads')")
    elif arch and floats:
        how = "lowbit.quant.load_model(path)" if arch.get("library") == "diffusers" else \
            "Load Quantized UNet with no MODEL connected"
        out.append(f"standalone yes: {arch.get('library')} {arch.get('class')} + {len(floats)} float tensors "
                   f"({_nbytes(index, '__float__.'):,} bytes) rebuild it without the float weights ({how})")
    else:
        out.append("standalone no: loads onto the float model only (load(model, path)); saving the loaded model "
                   "again records what loading alone needs")
    out.append(f"loads      no: {refused}" if refused else
               "loads      yes as far as the header goes (tensor values are checked when loading)")
    for k, v in header.items():  # other configs in the header (e.g. the pipeline's), shown the same way
        if k not in ("config", "schedule") and isinstance(v, dict) and "_type" in v:
            out.append(f"{k:<10} {_config_text(v)}")
    for k, meta in extras.items():
        if k == "decisions":
            continue
        cfgs = [_config_text(v) for v in meta.values() if isinstance(v, dict) and "_type" in v] \
            if isinstance(meta, dict) else []
        tensors = _nbytes(index, f"__extra__.{k}.")
        out.append(f"extra      {k}: {tensors:,} bytes" + (f"; {'; '.join(cfgs)}" if cfgs else ""))
    groups = {}
    for lname, m in lm.items():
        m = m if isinstance(m, dict) else {}
        g = groups.setdefault(_precision(m), [0, 0, 0])
        g[0] += 1
        g[1] += _nbytes(index, f"{lname}.qdata") + _nbytes(index, f"{lname}.w_scale")
        g[2] += _nbytes(index, f"{lname}.act.") + _nbytes(index, f"{lname}.bias")
    out.append(f"layers     {len(lm)} quantized layers")
    out.append(f"  {'precision':<14}{'layers':>7}{'weight bytes':>16}{'other bytes':>14}")
    for prec, (n, wb, ob) in sorted(groups.items()):
        out.append(f"  {prec:<14}{n:>7}{wb:>16,}{ob:>14,}")
    if dec_layers:
        modes = {}
        for d in dec_layers:
            modes[d.get("mode")] = modes.get(d.get("mode"), 0) + 1
        out.append("decisions  " + ", ".join(f"{n} layers {'kept in float' if m == 'fp' else 'at ' + str(m)}"
                                             for m, n in sorted(modes.items(), key=str)) +
                   ("" if layers else " (--layers lists them with the reason: measured, or a name rule)"))
    if layers:
        for d in dec_layers:
            out.append(f"  {_printable(str(d.get('name'))):<48}{_printable(str(d.get('mode'))):<8}"
                       f"{d.get('reason', '')}")
        out.append(f"  {'layer':<48}{'kind':<8}{'shape':<20}{'precision':<14}{'bytes':>10}")
        for lname, m in lm.items():
            m = m if isinstance(m, dict) else {}
            shape = m.get("shape")
            shape = "x".join(map(str, shape)) if isinstance(shape, list) else str(shape)
            out.append(f"  {_printable(lname):<48}{_printable(str(m.get('kind'))):<8}{_printable(shape):<20}"
                       f"{_printable(_precision(m)):<14}"
                       f"{_nbytes(index, lname + '.'):>10,}")
    return "\n".join(_printable(line) for line in out)


def _profile_text(name) -> str:
    """The ``inspect`` line of the model profile a file records (format 4) or, older files, how loading picks it."""
    if name is None:
        return "not recorded (format < 4): the one its model class matched when it was saved"
    return str(name)[:100]


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``...): header strings are the file's, and a
    crafted one must not drive the terminal (escape sequences)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _comfy_layout(path: str, header: dict, start: int):
    """(quantization metadata, LowBit export record or None) of a file in ComfyUI's own quantized layout (its
    ``_quantization_metadata`` header entry; ``lowbit export --comfy`` adds ``lowbit_export``), every field checked
    for meaning, the tensor index too (dtypes, shapes, offsets, file length; ``start``: where the data begins, as
    ``_check_safetensors`` read it); None when the file has LowBit's own metadata or no ComfyUI quantization
    metadata. No torch."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "lowbit" in meta or "_quantization_metadata" not in meta:
        return None
    sthdr = _core("sthdr")
    ours = "lowbit_export" in meta

    def bad(what):
        raise UsageError(f"file {path}: {what}; the file is corrupt or was edited"
                         + (": export it again (lowbit export --comfy)" if ours else
                            " (it is not a ComfyUI quantized checkpoint this reader understands)"))

    try:
        if not isinstance(meta["_quantization_metadata"], str) or (ours and not isinstance(meta["lowbit_export"], str)):
            bad("its ComfyUI quantization metadata is malformed (not a JSON string)")
        qm = sthdr.parse_json(meta["_quantization_metadata"], "its ComfyUI quantization metadata")
        ex = sthdr.parse_json(meta["lowbit_export"], "its lowbit_export record") if ours else None
        sthdr.check_index({k: v for k, v in header.items() if k != "__metadata__"}, start, os.path.getsize(path))
    except ValueError as exc:
        bad(str(exc))
    if not isinstance(qm, dict) or not isinstance(qm.get("layers"), dict):
        bad("its ComfyUI quantization metadata is malformed (no 'layers' object)")
    if not isinstance(qm.get("format_version"), str):
        bad("its ComfyUI quantization metadata is malformed (format_version is not a string)")
    for name, conf in qm["layers"].items():
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str) or not conf["format"]:
            bad(f"its ComfyUI quantization metadata is malformed (layer {name[:200]!r} has no format name)")
    if ours and not (isinstance(ex, dict) and isinstance(ex.get("dropped", []), list)
                     and all(isinstance(d, str) for d in ex.get("dropped", []))
                     and isinstance(ex.get("float_layers", {}), dict)
                     and all(isinstance(v, str) for v in ex.get("float_layers", {}).values())):
        bad("its lowbit_export record is not LowBit's")
    return qm, ex


def comfy_inspect_text(path: str, header: dict, layout, layers: bool = False) -> str:
    """``lowbit inspect`` of a file in ComfyUI's quantized layout (header only; ``layout``: what
    :func:`_comfy_layout` read from it): layers per ``comfy_quant`` format with their weight bytes, and, for a
    ``lowbit export --comfy`` file, what the layout could not carry."""
    qm, ex = layout
    index = {k: v for k, v in header.items() if k != "__metadata__"}  # checked by _comfy_layout
    groups = {}
    for name, conf in qm["layers"].items():
        g = groups.setdefault(conf["format"], [0, 0])
        g[0] += 1
        g[1] += _nbytes(index, name + ".weight")
    out = [f"file       {path} ({os.path.getsize(path):,} bytes)",
           f"format     ComfyUI quantized layout (_quantization_metadata v{qm.get('format_version')}): ComfyUI's "
           "own loaders read it (Load Diffusion Model)",
           "written by " + ("lowbit export --comfy" if ex is not None else "another tool (no lowbit_export record)"),
           f"layers     {len(qm['layers'])} quantized layers",
           f"  {'comfy_quant format':<22}{'layers':>7}{'weight bytes':>16}"]
    out += [f"  {_printable(fmt):<22}{n:>7}{wb:>16,}" for fmt, (n, wb) in sorted(groups.items())]
    floats = ex.get("float_layers", {}) if ex else {}
    if floats:
        out.append(f"float      {len(floats)} layers written as float weights"
                   + ("" if layers else " (--layers lists them with the reason)"))
    for d in (ex.get("dropped", []) if ex else []):
        out.append(f"dropped    {d}")
    if layers:
        out.append(f"  {'layer':<48}{'format':<22}{'bytes':>12}")
        out += [f"  {_printable(name):<48}{_printable(conf['format']):<22}{_nbytes(index, name + '.'):>12,}"
                for name, conf in qm["layers"].items()]
        out += [f"  {_printable(name):<48}{'float':<22}{why}" for name, why in floats.items()]
    return "\n".join(_printable(line) for line in out)


def _cmd_inspect(a, prog: Progress):
    gg = getattr(a, "gguf_header", None)
    if gg is not None:  # (checked in _check_inspect; no torch)
        fields, tensors, rec = gg
        if a.json:
            fields = dict(fields, **({"lowbit.export": rec} if rec else {}))  # (the record as an object)
            print(json.dumps({"fields": {k: v for k, v in fields.items() if not k.startswith("comfy.gguf.")},
                              "tensors": {n: {"type": t, "shape": list(s)} for n, t, s, _, _ in tensors}},
                             indent=2, sort_keys=True))
        else:
            print(gguf_inspect_text(a.file, fields, tensors, rec))
        return 0
    st_header, start = _check_safetensors(a.file, "file", with_start=True)
    comfy = _comfy_layout(a.file, st_header, start)
    if comfy is not None:  # ComfyUI's own layout (lowbit export --comfy): its metadata, checked, no torch
        if a.json:
            print(json.dumps({"_quantization_metadata": comfy[0], "lowbit_export": comfy[1]}, indent=2,
                             sort_keys=True))
        else:
            print(comfy_inspect_text(a.file, st_header, comfy, layers=a.layers))
        return 0
    if a.json:  # the file's own header, as written (read_header would show it migrated to today's version);
        # read_header still checks it is a LowBit file first. json.dumps escapes control characters itself.
        _quant().read_header(a.file)
        raw = json.loads(_check_safetensors(a.file, "file")["__metadata__"]["lowbit"])
        print(json.dumps(raw, indent=2, sort_keys=True))
        return 0
    try:
        text = inspect_text(a.file, layers=a.layers)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a field of the wrong type or shape
        raise _core("errors").LoadError(f"{a.file}: its LowBit header has a malformed field ({exc}); the file is "
                                        "corrupt or was edited: save it again with LowBit") from None
    print(text)
    return 0


# ------------------------------------------------------------------------------------------------- main

def _one_line(exc) -> str:
    text = " ".join(s.strip() for s in str(exc).splitlines() if s.strip())
    return text or type(exc).__name__


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)  # bad option values exit here with status 2 (one line, see _Parser.error)
    prog_name = f"lowbit {a.cmd}"
    errors = _core("errors")
    try:
        a.check(a)
    except (UsageError, errors.LowBitError) as exc:
        print(f"{prog_name}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return a.fn(a, Progress())
    except UsageError as exc:  # found once the pipeline's class is imported (before its weights are loaded)
        print(f"{prog_name}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and closed: not an error of the job
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"\n{prog_name}: interrupted; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (errors.LowBitError, OSError) as exc:
        kind = "error" if isinstance(exc, errors.LoadError) else "failed"
        print(f"{prog_name}: {kind}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, errors.LoadError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
