"""Export a LowBit quantized model as a GGUF file, the layout ComfyUI-GGUF (city96) and other GGUF loaders read.

GGUF (version 3) is a header of typed key/value fields and tensor descriptions, then the tensors' bytes, each
aligned to 32 bytes. Weights are stored in blocks of 32 along each row (the input dimension ``K``; a convolution's
weight is written as its [N, K] matrix, ``K = C/groups * kh * kw`` in PyTorch's order, with its 4-d shape in a
``comfy.gguf.orig_shape.<name>`` field, as ComfyUI-GGUF's own converter does). The layouts LowBit writes, and why
they hold LowBit's integers:

``Q8_0``  per block: fp16 ``d``, 32 int8 ``q``; ``W = d * q``. LowBit's ``int8_channel`` weights (5..8 bits,
    symmetric, one scale per output channel) and ``int8_group`` weights whose group size is a multiple of 32 are
    that, with ``d`` their channel's or group's scale in fp16.
``Q4_0``  per block: fp16 ``d``, 16 bytes of nibbles (element ``j`` in the low nibble of byte ``j``, element
    ``j + 16`` in its high nibble); ``W = d * (u - 8)``. LowBit's ``int4_channel`` / ``int4_group`` weights (signed
    ``q`` in [-8, 7], ``W = q * s``) are that with ``u = q + 8`` (groups: a multiple of 32).

The integers are written as they are; only the scales are rounded, to fp16 (the formats' own: relative change at
most 2^-11 for scales in fp16's normal range, reported as ``scale_rounding``). A layer whose scale does not fit
fp16 (over 65504, or so small that it rounds to zero or loses more than 1 %: a subnormal fp16) is written as float,
as are layers whose ``K`` or group size is not a multiple of 32 (an SD1.5 ``conv_in``: K = 36) and layers the
precision plan kept in float. Biases, norms and every other tensor keep their values (F32, or F16 / BF16 for
tensors in those dtypes). GGUF loaders dequantize the weights and run the activations in float: a W4A8 model runs
there as W4A16. Not written: activation scales and per-timestep tables, PTQD statistics (correction and variance
calibration), the step-aware bitwidth schedule (all listed in the result's ``dropped``); EfficientDM's LoRA is
already merged into the integers.

Keys and architecture: the model's own parameter names (plus ``prefix``), as in :mod:`.export_comfy`: the
ComfyUI node path's quantized UNet is ComfyUI's module, so its names are what ComfyUI-GGUF's "Unet Loader (GGUF)"
expects. ``arch`` is written to ``general.architecture``, which that loader checks against its list
(:data:`GGUF_ARCHS`).
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import ConfigError
from .export_comfy import (ExportResult, _as_key_fn, _bias_of, _float_weight, _plain_tensors, _units, check_export_path,
                           context_dropped)
from .gguf_hdr import ALIGN, ARR as _ARR, BLOCK as _BLOCK, GGML_TYPES, GGUF_ARCHS, I32 as _I32, MAGIC as _MAGIC
from .gguf_hdr import STR as _STR, U32 as _U32, VERSION as _VERSION, GGUFError, read_header

__all__ = ["export_gguf", "gguf_tensors", "read_gguf", "dequantize_gguf", "GGUF_ARCHS", "GGML_TYPES", "GGUFError"]

QK = 32  # values per Q8_0 / Q4_0 block


# ------------------------------------------------------------------------------------------------ blocks
def _block_scales(pw, k: int) -> torch.Tensor:
    """fp32 [N, K/32]: the scale of each 32-value block of each row (a channel's, or the group's that holds it)."""
    s = pw.scale.float().reshape(pw.N, -1)
    if s.shape[1] == 1:
        return s.expand(pw.N, k // QK)
    g = int(pw.group_size)
    return s[:, [(QK * j) // g for j in range(k // QK)]]


def _q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K], fp16 d [N, K/32] -> uint8 [N, K/32 * 34]."""
    n, k = q.shape
    dq = d.contiguous().view(torch.uint8).reshape(n, k // QK, 2)
    return torch.cat((dq, q.to(torch.int8).reshape(n, k // QK, QK).view(torch.uint8)), dim=2).reshape(n, -1)


def _q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """signed q [N, K] in [-8, 7], fp16 d [N, K/32] -> uint8 [N, K/32 * 18]."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).reshape(n, k // QK, QK)
    nib = (u[..., :QK // 2] | (u[..., QK // 2:] << 4)).to(torch.uint8)
    dq = d.contiguous().view(torch.uint8).reshape(n, k // QK, 2)
    return torch.cat((dq, nib), dim=2).reshape(n, -1)


def _plan(layer, k: int) -> Tuple[Optional[str], str]:
    """(GGUF type name or None, reason when None) for one quantized layer with reduction length ``k``."""
    fmt = layer.w_format
    if fmt not in ("int8_channel", "int8_group", "int4_channel", "int4_group"):
        return None, f"LowBit weight format {fmt!r} has no GGUF block type"
    if k % QK:
        return None, f"K={k} is not a multiple of GGUF's block of {QK}"
    if fmt.endswith("_group") and int(layer.group_size) % QK:
        return None, f"group size {layer.group_size} is not a multiple of GGUF's block of {QK}"
    return ("Q8_0" if fmt.startswith("int8") else "Q4_0"), ""


def _fp16_scales(s: torch.Tensor) -> Tuple[Optional[torch.Tensor], float, str]:
    """(fp16 scales or None, largest relative change, why None)."""
    d = s.to(torch.float16)
    if not torch.isfinite(d).all():
        return None, 0.0, f"a weight scale ({float(s.abs().max()):.3g}) exceeds fp16's range"
    nz = s != 0
    rel = ((d.float() - s).abs() / s.abs().clamp_min(1e-38))[nz]
    worst = float(rel.max()) if rel.numel() else 0.0
    if worst > 0.01:
        return None, worst, (f"a weight scale ({float(s[nz].abs().min()):.3g}) is below fp16's normal range "
                             f"(changes by {worst:.0%} in fp16)")
    return d, worst, ""


# ------------------------------------------------------------------------------------------------ tensors
def _float_entry(t: torch.Tensor, float_dtype: Optional[torch.dtype]):
    t = t.detach().cpu()
    dt = t.dtype if float_dtype is None or t.dim() < 2 else float_dtype
    if t.dim() < 2 or dt not in (torch.float16, torch.bfloat16):
        dt = torch.float32  # (1-d tensors, and every other dtype: F32)
    typ = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dt]
    data = t.to(dt).contiguous().reshape(-1).view(torch.uint8)
    return typ, tuple(t.shape), data


def gguf_tensors(qmodel: nn.Module, *, arch: str, prefix: str = "", key_map=None,
                 float_dtype: Optional[torch.dtype] = None) -> tuple:
    """``(tensors, fields, result)`` of a GGUF file for ``qmodel``: ``tensors`` maps each key to ``(type name,
    torch shape, uint8 data, original shape or None)``, ``fields`` the header's key/value fields, ``result`` an
    :class:`ExportResult` (path None; ``layers`` maps each quantized layer's key to its block type)."""
    from .layers import quant_layers
    from .split import ChannelSplitConv2d

    if arch not in GGUF_ARCHS:
        raise ConfigError(f"arch must be one of {', '.join(GGUF_ARCHS)} (ComfyUI-GGUF checks it), got {arch!r}")
    if float_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"float_dtype must be None, float32, float16 or bfloat16, got {float_dtype}")
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a string such as '' or 'model.diffusion_model.', got {prefix!r}")
    if not quant_layers(qmodel):
        raise ConfigError("this model has no LowBit quantized layers; quantize it before exporting")
    key_of = _as_key_fn(key_map)
    special = _units(qmodel)
    tensors: Dict[str, tuple] = {}
    result = ExportResult(path=None, kind="GGUF export")
    worst = 0.0

    def put(key, entry):
        if key in tensors:
            raise ConfigError(f"two tensors map to the key {key!r}; check key_map")
        tensors[key] = entry

    for pname, t in _plain_tensors(qmodel, special):
        put(prefix + key_of(pname), (*_float_entry(t, float_dtype), None))

    act_layers = time_tables = 0
    for name, m in special.items():
        key = prefix + key_of(f"{name}.weight")
        layers = list(m.parts) if isinstance(m, ChannelSplitConv2d) else [m]
        for lay in layers:
            if getattr(lay, "a_dynamic", False) or getattr(lay, "act", None) is not None:
                act_layers += 1
                if getattr(lay, "act", None) is not None and len(lay.act.tgrid) > 1:
                    time_tables += 1
        blocks = _blocks_of(m)
        if not isinstance(blocks, str):
            typ, shape, q, d, rounding = blocks
            worst = max(worst, rounding)
            data = (_q8_0 if typ == "Q8_0" else _q4_0)(q, d)
            put(key, (typ, tuple(q.shape), data.reshape(-1), shape if len(shape) != 2 else None))
            result.layers[prefix + key_of(name)] = {"format": typ}
        else:
            w = _float_weight(m, torch.float32)
            put(key, (*_float_entry(w, float_dtype if float_dtype is not None else _weight_dtype(m)), None))
            result.float_layers[name] = blocks
        bias = _bias_of(m)
        if bias is not None:
            put(prefix + key_of(f"{name}.bias"), (*_float_entry(bias.float(), None), None))

    dr = result.dropped
    if act_layers:
        dr.append(f"activation quantization of {act_layers} layers: GGUF loaders dequantize the weights and run "
                  "activations in float")
    if time_tables:
        dr.append(f"per-timestep activation tables of {time_tables} layers (TALSQ / time bins)")
    if result.float_layers:
        dr.append(f"{len(result.float_layers)} layers written as float weights: "
                  + "; ".join(sorted({w for w in result.float_layers.values()})))
    if worst > 0:
        dr.append(f"weight scales rounded to fp16 (GGUF's block scales): largest relative change {worst:.2g}")
    dr += context_dropped(qmodel, "one precision for every step")
    result.scale_rounding = worst
    fields = [("general.architecture", _STR, arch),
              ("general.quantization_version", _U32, 2),
              ("lowbit.export", _STR, json.dumps({"format_version": 1, "layers": result.layers,
                                                  "float_layers": result.float_layers, "dropped": dr},
                                                 sort_keys=True))]
    for key, (_, _, _, orig) in tensors.items():
        if orig is not None:
            fields.append((f"comfy.gguf.orig_shape.{key}", _ARR, list(orig)))
    result.tensors = len(tensors)
    return tensors, fields, result


def _blocks_of(m):
    """``(type, torch shape, q [N, K], fp16 block scales [N, K/32], largest scale rounding)`` of a quantized layer
    or split convolution (its parts' integers side by side along K: the parts split the input channels, so each
    part's rows are a contiguous stretch of the whole convolution's rows), or why it cannot be blocks (a str)."""
    from ..kernels import ops
    from .layers import QuantLayer
    from .split import ChannelSplitConv2d

    parts = list(m.parts) if isinstance(m, ChannelSplitConv2d) else [m]
    if not all(isinstance(p, QuantLayer) for p in parts):
        return "a split convolution with a part kept in float"
    typs = set()
    qs, ds, worst = [], [], 0.0
    for p in parts:
        k = int(torch.Size(p.weight_shape[1:]).numel())
        typ, why = _plan(p, k)
        if typ is None:
            return why
        typs.add(typ)
        with torch.no_grad():
            pw = p.packed_weight()
            qs.append(ops.unpack_weight(pw).reshape(pw.N, pw.K).cpu())
            d, rel, why = _fp16_scales(_block_scales(pw, pw.K).cpu())
        if d is None:
            return why
        ds.append(d)
        worst = max(worst, rel)
    if len(typs) > 1:
        return "a split convolution whose parts have different bit widths"
    shape = tuple(parts[0].weight_shape)
    if len(parts) > 1:
        shape = (shape[0], sum(p.weight_shape[1] for p in parts), *shape[2:])
    return typs.pop(), shape, torch.cat(qs, dim=1), torch.cat(ds, dim=1), worst


def _weight_dtype(m) -> torch.dtype:
    for t in m.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------ writing
def _s(text: str) -> bytes:
    b = text.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _field(key: str, typ: int, value) -> bytes:
    out = _s(key) + struct.pack("<I", typ)
    if typ == _STR:
        return out + _s(value)
    if typ == _U32:
        return out + struct.pack("<I", value)
    if typ == _ARR:  # (arrays of int32 only: original shapes)
        return out + struct.pack("<IQ", _I32, len(value)) + struct.pack(f"<{len(value)}i", *value)
    raise ValueError(f"GGUF value type {typ} not written here")


def write_gguf(path: str, tensors: Dict[str, tuple], fields: list, mode: str = "xb") -> None:
    """Write a GGUF v3 file: ``fields`` [(key, value type, value)], ``tensors`` {key: (type, shape, data, _)}
    (``mode`` "xb": never over an existing file)."""
    infos, offset, blobs = [], 0, []
    for key, (typ, shape, data, _) in tensors.items():
        t = GGML_TYPES[typ]
        dims = list(reversed(shape))  # (GGUF lists dimensions innermost first)
        per, size = _BLOCK[t]
        if dims[0] % per or data.numel() != (torch.Size(shape).numel() // per) * size:
            raise ValueError(f"{key}: {data.numel()} bytes do not hold a {typ} tensor of shape {list(shape)}")
        infos.append(_s(key) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", t, offset))
        blobs.append((offset, data))
        offset += -(-data.numel() // ALIGN) * ALIGN
    head = _MAGIC + struct.pack("<IQQ", _VERSION, len(tensors), len(fields))
    head += b"".join(_field(*f) for f in fields) + b"".join(infos)
    head += b"\0" * (-len(head) % ALIGN)
    with open(path, mode) as f:
        f.write(head)
        for off, data in blobs:
            f.write(data.numpy().tobytes())
            f.write(b"\0" * (-data.numel() % ALIGN))


def export_gguf(qmodel: nn.Module, path: str, *, arch: str, prefix: str = "", key_map=None,
                float_dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                log: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Write ``qmodel`` (a LowBit quantized model, fake-quant or deployed) as a GGUF file at ``path`` (never
    replacing a file unless ``overwrite``; the folder must exist; the name must end in ``.gguf``). ``arch``: the
    ``general.architecture`` GGUF loaders check (:data:`GGUF_ARCHS`, e.g. "sd1", "sdxl", "flux"). ``float_dtype``:
    dtype of the weights written as float (default: each layer's own). Returns an :class:`ExportResult` whose
    ``dropped`` lines (also in the file's ``lowbit.export`` field and passed to ``log``) say what GGUF does not
    carry."""
    from .io import clean_stale_temps, write_new_file

    path, folder = check_export_path(path, overwrite, ".gguf")
    tensors, fields, result = gguf_tensors(qmodel, arch=arch, prefix=prefix, key_map=key_map,
                                           float_dtype=float_dtype)
    clean_stale_temps(folder)
    write_new_file(path, folder, lambda tmp: write_gguf(tmp, tensors, fields, mode="wb"), overwrite)
    result.path = path
    if log is not None:
        log(result.summary())
    return result


# ------------------------------------------------------------------------------------------------ reading
def read_gguf(path: str) -> Tuple[dict, Dict[str, tuple]]:
    """``(fields, tensors)`` of a GGUF v2/v3 file: ``fields`` {key: value}, ``tensors`` {name: (type name, torch
    shape, uint8 data)} (the header checked by :func:`.gguf_hdr.read_header`; each tensor read from its offset)."""
    fields, infos, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, typ, shape, off, nbytes in infos:
            f.seek(start + off)
            tensors[name] = (typ, shape, torch.frombuffer(bytearray(f.read(nbytes)), dtype=torch.uint8))
    return fields, tensors


def dequantize_gguf(typ: str, shape, data: torch.Tensor, orig_shape=None) -> torch.Tensor:
    """fp32 values of one tensor read by :func:`read_gguf` (``orig_shape``: its ``comfy.gguf.orig_shape``)."""
    shape = tuple(orig_shape) if orig_shape is not None else tuple(shape)
    if typ == "F32":
        return data.view(torch.float32).reshape(shape).clone()
    if typ in ("F16", "BF16"):
        return data.view(torch.float16 if typ == "F16" else torch.bfloat16).float().reshape(shape)
    per, size = _BLOCK[GGML_TYPES[typ]]
    blocks = data.reshape(-1, size)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if typ == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        nib = blocks[:, 2:].to(torch.int16)
        q = (torch.cat((nib & 0xF, nib >> 4), dim=1) - 8).float()
    return (d * q).reshape(shape)


def file_layers(fields: dict) -> List[str]:
    """The quantized layers a LowBit GGUF export lists (its ``lowbit.export`` field), [] for other files."""
    raw = fields.get("lowbit.export")
    return sorted(json.loads(raw)["layers"]) if isinstance(raw, str) else []
