"""Save and load quantized UNets: one safetensors file, packed integers + scales + a versioned JSON header.

Loading is safe by construction: the header is parsed by us with a size limit before anything else is
read, configs are rebuilt only from the allowlist in ``config.py``, every tensor's name, dtype and shape is
checked against the target model before anything is assigned, and the target model is never modified
(a new quantized module tree is returned). No pickle, no code execution.

File layout (tensor names; L = qualified layer name):
  L.qdata        int8 [N, K] (bits 5..8) or uint8 [N, ceil(K/2)] (bits <= 4, two nibbles per byte)
  L.w_scale      fp32 [N] or [N, G]
  L.bias         fp32 [N]                              (if the layer has a bias)
  L.act.tgrid    fp32 [K_t]; L.act.scale_<b>, L.act.zero_<b> fp32 [K_t]   (static activation tables)
  __extra__.<name>.<key>                               (PTQD statistics etc., see EXTRAS)
Header: ``__metadata__["lowbit"]`` = JSON {format, format_version, config, schedule, layers{...}, model{...}, extras{...}}
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Callable, Dict

import torch
import torch.nn as nn

from . import config as C
from .context import QuantContext, attach_context, get_context
from .errors import ConfigError, LoadError
from .layers import ActQuantizer, QuantLayer, qlayer_class_for, quant_layers
from .split import ChannelSplitConv2d, apply_splits

FORMAT = "lowbit.quantized_unet"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024

# name -> (to_state(qmodel) -> (meta dict, tensors dict) | None, from_state(qmodel, meta, tensors) -> None)
EXTRAS: Dict[str, tuple] = {}


def register_extra(name: str, to_state: Callable, from_state: Callable):
    EXTRAS[name] = (to_state, from_state)


def model_fingerprint(model: nn.Module) -> str:
    """Names and weight shapes of the quantizable layers: equal for a float UNet and its quantized copy (a split
    convolution counts as the convolution it replaces)."""
    h = hashlib.sha256()
    splits = set()
    for n, m in model.named_modules():
        if any(n.startswith(s + ".") for s in splits):
            continue
        if isinstance(m, ChannelSplitConv2d):
            splits.add(n)
            h.update(f"{n}:{(m.out_channels, m.in_channels) + tuple(m.kernel_size)};".encode())
        elif qlayer_class_for(m) is not None and not isinstance(m, QuantLayer):
            h.update(f"{n}:{tuple(m.weight.shape)};".encode())
        elif isinstance(m, QuantLayer):
            h.update(f"{n}:{m.weight_shape};".encode())
    return h.hexdigest()[:16]


def _layer_meta(layer: QuantLayer) -> dict:
    return dict(kind=layer.float_type.__name__, shape=list(layer.weight_shape), w_bits=layer.w_bits,
                a_bits=layer.a_bits, group_size=layer.group_size, a_dynamic=layer.a_dynamic,
                a_bits_set=list(layer.act.bits_set) if layer.act is not None else [],
                time_bins=len(layer.act.tgrid) if layer.act is not None else 0,
                has_bias=layer.bias is not None, scheduled=layer.scheduled)


def save(qmodel: nn.Module, path: str, overwrite: bool = False) -> str:
    """Write ``qmodel`` to ``path`` (atomically: temporary file, then rename). Returns the path."""
    from safetensors.torch import save_file

    from ..kernels import ops

    layers = quant_layers(qmodel)
    if not layers:
        raise ConfigError("this model has no LowBit quantized layers; quantize it before saving")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    tensors, lmeta = {}, {}
    for name, layer in layers:
        if layer.mode == "deployed":
            pw = layer.packed_weight()
        else:
            with torch.no_grad():
                pw = ops.pack_weight(layer.weight_int(), layer.w_bits, layer.w_scale.detach().float(), layer.group_size)
        tensors[f"{name}.qdata"] = pw.qdata.contiguous().cpu()
        tensors[f"{name}.w_scale"] = pw.scale.float().contiguous().cpu()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().contiguous().cpu()
        if layer.act is not None:
            tensors[f"{name}.act.tgrid"] = layer.act.tgrid.float().contiguous().cpu()
            for b in layer.act.bits_set:
                s, z = layer.act.table(b)
                tensors[f"{name}.act.scale_{b}"] = s.detach().float().contiguous().cpu()
                tensors[f"{name}.act.zero_{b}"] = z.detach().round().float().contiguous().cpu()
        lmeta[name] = _layer_meta(layer)
    extras = {}
    for ename, (to_state, _) in EXTRAS.items():
        st = to_state(qmodel)
        if st is None:
            continue
        meta, ts = st
        extras[ename] = meta
        for k, v in ts.items():
            tensors[f"__extra__.{ename}.{k}"] = v.detach().contiguous().cpu()
    ctx = get_context(qmodel)
    cfg = ctx.config if ctx else None
    sched = ctx.schedule if ctx else None
    header = dict(format=FORMAT, format_version=FORMAT_VERSION,
                  config=C.to_json_obj(cfg) if cfg is not None else None,
                  schedule=C.to_json_obj(sched) if sched is not None else None,
                  num_train_timesteps=ctx.num_train_timesteps if ctx else 1000,
                  layers=lmeta, model=dict(cls=type(qmodel).__name__, fingerprint=model_fingerprint(qmodel)),
                  splits={n: list(m.sizes) for n, m in qmodel.named_modules() if isinstance(m, ChannelSplitConv2d)},
                  extras=extras)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"lowbit": json.dumps(header, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _fail(path, problem, fix):
    raise LoadError(f"cannot load {path}: {problem}. {fix}")


_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I32": torch.int32, "I64": torch.int64}
_DSIZE = {"I8": 1, "U8": 1, "F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}


def read_header(path: str):
    """(lowbit header dict, tensor index) after checking the file is a complete safetensors file."""
    if not os.path.isfile(path):
        _fail(path, "no such file", "check the path (quantized UNets are .safetensors files saved by LowBit)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            _fail(path, f"file is {size} bytes, too short to be safetensors", "the file is truncated; save it again")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            _fail(path, f"header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit", "this is not a LowBit file")
        if 8 + n > size:
            _fail(path, "header runs past the end of the file", "the file is truncated; save or download it again")
        try:
            index = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            _fail(path, f"header is not valid JSON ({exc})", "the file is corrupt or not safetensors")
    if not isinstance(index, dict):
        _fail(path, "header is not a JSON object", "the file is corrupt or not safetensors")
    meta = index.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or "lowbit" not in meta:
        _fail(path, "it has no LowBit metadata (it may be a regular checkpoint or LoRA)",
              "load it with the host's normal loader, or pick a file saved by LowBit's Save Quantized UNet")
    try:
        header = json.loads(meta["lowbit"]) if isinstance(meta["lowbit"], str) else None
    except json.JSONDecodeError as exc:
        header = None
    if not isinstance(header, dict):
        _fail(path, "the LowBit metadata is not a JSON object", "the file is corrupt; save it again")
    if header.get("format") != FORMAT:
        _fail(path, f"unknown format {header.get('format')!r}", "this file was not written by LowBit")
    if header.get("format_version") != FORMAT_VERSION:
        _fail(path, f"format version {header.get('format_version')!r} is not supported (this LowBit reads "
                    f"{FORMAT_VERSION})", "upgrade LowBit or re-save the file with this version")
    end = 0
    for k, e in index.items():
        if not (isinstance(e, dict) and e.get("dtype") in _DTYPES and isinstance(e.get("shape"), list)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2):
            _fail(path, f"tensor {k!r} has a malformed or unsupported entry", "the file is corrupt")
        a, b = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            if not isinstance(d, int) or d < 0:
                _fail(path, f"tensor {k!r} has an invalid shape", "the file is corrupt")
            numel *= d
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b) or b - a != numel * _DSIZE[e["dtype"]]:
            _fail(path, f"tensor {k!r} has inconsistent offsets", "the file is corrupt")
        end = max(end, b)
    if 8 + n + end != size:
        _fail(path, f"expected {8 + n + end} bytes, found {size}", "the file is truncated or padded; save it again")
    return header, index


def _expect(path, index, key, dtype, shape):
    e = index.get(key)
    if e is None:
        _fail(path, f"tensor {key!r} is missing", "the file is incomplete or for another LowBit version")
    if _DTYPES[e["dtype"]] != dtype or tuple(e["shape"]) != tuple(shape):
        _fail(path, f"tensor {key!r} is {e['dtype']}{e['shape']}, expected {dtype}{list(shape)}", "the file is corrupt")


def load(model: nn.Module, path: str) -> nn.Module:
    """Apply the quantized UNet saved at ``path`` to ``model`` (the same full-precision architecture) and
    return a new deployed quantized model. ``model`` itself is never modified."""
    from safetensors import safe_open

    from .api import _set_module, structural_copy
    from .layers import QLAYERS

    header, index = read_header(path)
    try:
        cfg = C.from_json_obj(header["config"]) if header.get("config") else None
        sched = C.from_json_obj(header["schedule"]) if header.get("schedule") else None
    except ConfigError as exc:
        _fail(path, f"its config is not valid ({exc})", "the file is corrupt or from an incompatible LowBit")
    layers = header.get("layers")
    if not isinstance(layers, dict) or not layers:
        _fail(path, "it lists no quantized layers", "the file is corrupt")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        _fail(path, "the target model is already quantized", "apply the file to the full-precision UNet")
    splits = header.get("splits") or {}
    if not (isinstance(splits, dict) and all(isinstance(v, list) and v and all(isinstance(d, int) and d > 0 for d in v)
                                             for v in splits.values())):
        _fail(path, "its list of split convolutions is malformed", "the file is corrupt")
    fmods = dict(model.named_modules())
    for n, sizes in splits.items():
        m = fmods.get(n)
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.in_channels != sum(sizes):
            _fail(path, f"it does not match this model: split convolution {n!r} with {sum(sizes)} input channels is "
                        f"{'missing' if m is None else type(m).__name__ + ' ' + str(tuple(m.weight.shape))} here",
                  "pick the quantized file made from this checkpoint's architecture, or re-quantize this model")
    qmodel = structural_copy(model)  # never modify ``model``
    apply_splits(qmodel, splits)
    mods = dict(qmodel.named_modules())
    missing = [n for n in layers if n not in mods]
    kinds = {c.__name__: c for c in QLAYERS}
    if missing:
        _fail(path, f"it does not match this model: {len(missing)} of its {len(layers)} layers are not in "
                    f"{type(model).__name__} (e.g. {missing[0]!r})",
              "pick the quantized file made from this checkpoint's architecture, or re-quantize this model")
    # plan: check every layer's type and shape before touching anything
    expected = {}
    for n, lm in layers.items():
        try:
            kind, shape = lm["kind"], tuple(int(d) for d in lm["shape"])
            w_bits, a_bits = int(lm["w_bits"]), int(lm["a_bits"])
            g = None if lm["group_size"] is None else int(lm["group_size"])
            bits_set = tuple(int(b) for b in lm["a_bits_set"])
            tb = int(lm["time_bins"])
        except (KeyError, TypeError, ValueError):
            _fail(path, f"layer {n!r} has malformed metadata", "the file is corrupt")
        if kind not in kinds or not isinstance(mods[n], kinds[kind]):
            _fail(path, f"layer {n!r} is a {type(mods[n]).__name__} in this model but a {kind} in the file",
                  "pick the file made from this model's architecture")
        if tuple(mods[n].weight.shape) != shape:
            _fail(path, f"layer {n!r} has shape {tuple(mods[n].weight.shape)} in this model but {shape} in the file",
                  "pick the file made from this checkpoint's architecture (e.g. SD1.5 vs SDXL), or re-quantize")
        if not (2 <= w_bits <= 8) or not (a_bits == 16 or 2 <= a_bits <= 8):
            _fail(path, f"layer {n!r} has unsupported bits W{w_bits}A{a_bits}", "the file is corrupt")
        N, K = shape[0], 1
        for d in shape[1:]:
            K *= d
        qshape = (N, K) if w_bits > 4 else (N, (K + 1) // 2)
        _expect(path, index, f"{n}.qdata", torch.int8 if w_bits > 4 else torch.uint8, qshape)
        _expect(path, index, f"{n}.w_scale", torch.float32, (N,) if g is None else (N, (K + g - 1) // g))
        if lm.get("has_bias"):
            _expect(path, index, f"{n}.bias", torch.float32, (N,))
        if bits_set:
            _expect(path, index, f"{n}.act.tgrid", torch.float32, (tb,))
            for b in bits_set:
                _expect(path, index, f"{n}.act.scale_{b}", torch.float32, (tb,))
                _expect(path, index, f"{n}.act.zero_{b}", torch.float32, (tb,))
        expected[n] = (w_bits, a_bits, g, bool(lm.get("a_dynamic")), bits_set, tb, bool(lm.get("scheduled", True)))
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        _fail(path, f"reading tensors failed ({exc})", "the file is corrupt; save it again")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            _fail(path, f"tensor {k!r} contains NaN/Inf", "the file is corrupt or was saved from a diverged run")

    ctx = attach_context(qmodel, QuantContext(int(header.get("num_train_timesteps", 1000))))
    ctx.schedule = sched
    for n, (w_bits, a_bits, g, dyn, bits_set, tb, scheduled) in expected.items():
        src = qmodel.get_submodule(n)
        cls = qlayer_class_for(src)
        layer = cls(src, w_bits=w_bits, a_bits=a_bits, group_size=g, a_dynamic=dyn, ctx=ctx,
                    a_bits_set=bits_set or None, time_bins=max(tb, 1), name=n, scheduled=scheduled, init_scale=False)
        del layer.weight
        del layer.w_scale
        layer.register_buffer("qdata", tensors[f"{n}.qdata"])
        layer.register_buffer("w_scale_buf", tensors[f"{n}.w_scale"])
        layer.mode = "deployed"
        layer.bias = nn.Parameter(tensors[f"{n}.bias"], requires_grad=False) if f"{n}.bias" in tensors else None
        if layer.act is not None:
            layer.act.tgrid = tensors[f"{n}.act.tgrid"]
            for b in bits_set:
                setattr(layer.act, f"scale_{b}", nn.Parameter(tensors[f"{n}.act.scale_{b}"], requires_grad=False))
                setattr(layer.act, f"zero_{b}", nn.Parameter(tensors[f"{n}.act.zero_{b}"], requires_grad=False))
            layer.act.initialized = True
        layer._params_to_buffers()
        _set_module(qmodel, n, layer)
    ctx.config = cfg
    ctx.splits = {n: tuple(v) for n, v in splits.items()}
    for ename, meta in (header.get("extras") or {}).items():
        if ename not in EXTRAS:
            continue  # unknown extras are ignored (never executed)
        pref = f"__extra__.{ename}."
        ts = {k[len(pref):]: v for k, v in tensors.items() if k.startswith(pref)}
        try:
            EXTRAS[ename][1](qmodel, meta, ts)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            _fail(path, f"its {ename} data is malformed ({exc})", "the file is corrupt; save it again")
    qmodel.eval()
    return qmodel
