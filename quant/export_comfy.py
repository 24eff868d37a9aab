"""Export a LowBit quantized model to ComfyUI's native quantized checkpoint layout.

ComfyUI (``comfy/ops.py`` ``mixed_precision_ops``, ``comfy/quant_ops.py`` ``QUANT_ALGOS``, kernels from the
``comfy-kitchen`` package) loads a safetensors file in which every quantized ``Linear`` has its storage tensors
under the layer's name, a ``<layer>.comfy_quant`` uint8 tensor holding a JSON object ``{"format": ...}`` and,
equivalently, an entry in the header's ``__metadata__["_quantization_metadata"]`` (``{"format_version": "1.0",
"layers": {<full layer key>: {...}}}``, turned into the per-layer tensors by ``comfy/utils.py``'s
``convert_old_quants``). The layouts LowBit writes, and why they are exact:

``int8_tensorwise``  (``TensorWiseINT8Layout``): ``<layer>.weight`` int8 [N, K], ``<layer>.weight_scale`` fp32
    [N, 1]; ComfyUI dequantizes ``q * scale`` (scale broadcast per output row). LowBit's ``int8_channel`` weights
    (5..8 bits, symmetric, one fp32 scale per output channel) are exactly that. Activations: ComfyUI runs these
    layers through comfy-kitchen's ``int8_linear``, which quantizes the input *dynamically per row, symmetric int8*
    (absmax / 127) for an int8 matmul: measured in ComfyUI 0.33.0 on a CPU, where ``full_precision_matrix_mult``
    does not change it (``tests/nodes/test_comfyui_integration.py``); its code dequantizes the weight instead where a
    LoRA is patched on the layer. LowBit's static per-tensor asymmetric scales are not written, and a layer LowBit
    runs with float activations (W8A16) gets ComfyUI's int8 activations (listed in ``dropped``).
``awq_w4a16``  (``TensorCoreAWQW4A16Layout``): ``<layer>.weight`` int8 [N, K/2] holding unsigned nibbles
    (even column in the low nibble), ``<layer>.weight_scale`` and ``<layer>.weight_zeros`` [K/G, N];
    ``W = (u - 8) * scale + zeros``. LowBit's ``int4_group`` / ``int4_channel`` weights (signed q in [-8, 7],
    ``W = q * s``) are exactly that with ``u = q + 8``, ``scale = s.T``, ``zeros = 0`` (per-channel: G = K).
    Activations stay in float (W4A16): LowBit's 4/8-bit activation quantization is not written.

Not expressible, so written as float weights (LowBit's dequantized integers, exact in fp32) and listed in the
returned ``dropped``: convolutions (ComfyUI's mixed-precision ops quantize ``Linear`` only), group-wise 8-bit
weights (no ComfyUI int8 layout has group scales), 4-bit weights whose K is odd or not a multiple of the group.
``asym_w4a8_int8`` and ``convrot_w4a4`` store Hadamard-rotated weights (block a power of 4, never identity)
decoded through an int8 grid, so LowBit's un-rotated int4 grid cannot be stored in them exactly; LowBit does
not write them. Never written either: per-timestep activation tables, PTQD statistics (correction and variance
calibration), the step-aware bitwidth schedule. EfficientDM's LoRA is already merged into the integers.

Keys: the model's own parameter names (plus ``prefix``). For the ComfyUI node path the quantized UNet *is*
ComfyUI's module, so its names are ComfyUI's diffusion-model keys and the file loads with "Load Diffusion
Model" (``prefix=""``) or as the UNet part of a checkpoint (``prefix="model.diffusion_model."``). A diffusers-
named UNet needs ComfyUI's diffusers->LDM key map, which this module does not build: pass ``key_map`` (a dict or
callable from LowBit's parameter name to the ComfyUI key), else the file has diffusers names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .errors import ConfigError

__all__ = ["export_comfy", "comfy_state_dict", "ExportResult", "COMFY_LAYOUTS", "pack_uint4", "unpack_uint4"]

COMFY_LAYOUTS = ("int8_tensorwise", "awq_w4a16")
W4_LAYOUTS = ("awq_w4a16", "int8_tensorwise")  # int8_tensorwise: per-channel int4 only, 1 byte per weight
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportResult:
    """What :func:`export_comfy` wrote: ``path`` (None if not written), ``layers`` (ComfyUI key of each quantized
    layer -> its ``comfy_quant`` object), ``float_layers`` (LowBit layer name -> why it is written as float),
    ``dropped`` (one line per LowBit feature the file does not carry) and ``tensors`` (number written)."""

    path: Optional[str]
    layers: Dict[str, dict] = field(default_factory=dict)
    float_layers: Dict[str, str] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    tensors: int = 0
    kind: str = "ComfyUI-native export"
    scale_rounding: float = 0.0  # (GGUF: largest relative change of a weight scale rounded to fp16)

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for conf in self.layers.values():
            counts[conf["format"]] = counts.get(conf["format"], 0) + 1
        fmt = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no quantized layers"
        lines = [f"{self.kind}{'' if self.path is None else ' ' + self.path}: {fmt}, "
                 f"{len(self.float_layers)} layers as float"]
        lines += [f"  dropped: {d}" for d in self.dropped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ nibbles
def pack_uint4(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [N, K] (K even, values 0..15) -> int8 [N, K/2]: column 2j in the low nibble,
    2j+1 in the high nibble (comfy-kitchen's row-major uint4 storage)."""
    u = u.to(torch.int16)
    return ((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8).contiguous()


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: int8 [N, K/2] -> int16 [N, K] in 0..15."""
    p = packed.view(torch.uint8).to(torch.int16)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------------------ layers
def _conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _int8_tensorwise(pw):
    from ..kernels import ops

    q = ops.unpack_weight(pw).reshape(pw.N, pw.K).to(torch.int8).contiguous()
    return {"weight": q, "weight_scale": pw.scale.float().reshape(pw.N, 1).contiguous()}, {"format": "int8_tensorwise"}


def _awq_w4a16(pw, scale_dtype):
    from ..kernels import ops

    g = pw.K if pw.group_size is None else int(pw.group_size)
    q = ops.unpack_weight(pw).reshape(pw.N, pw.K).to(torch.int16)
    scale = pw.scale.float().reshape(pw.N, -1)  # [N, G]
    tensors = {"weight": pack_uint4(q + 8),
               "weight_scale": scale.t().contiguous().to(scale_dtype),
               "weight_zeros": torch.zeros(scale.shape[1], pw.N, dtype=scale_dtype)}
    return tensors, {"format": "awq_w4a16", "group_size": g}


def _plan(layer, w4_layout: str):
    """(comfy format or None, reason when None) for one quantized layer."""
    from .layers import QuantLinear

    if not isinstance(layer, QuantLinear):
        return None, "ComfyUI's mixed-precision ops quantize Linear layers only"
    fmt = layer.w_format
    n, k = layer.weight_shape
    if fmt == "int8_channel":
        return "int8_tensorwise", ""
    if fmt in ("int4_group", "int4_channel"):
        g = k if layer.group_size is None else layer.group_size
        if w4_layout == "int8_tensorwise" and fmt == "int4_channel":
            return "int8_tensorwise", ""
        if k % 2 or k % g:
            return None, f"awq_w4a16 needs an even K divisible by the group size (K={k}, group {g})"
        return "awq_w4a16", ""
    if fmt == "int8_group":
        return None, "no ComfyUI int8 layout has group-wise scales"
    return None, f"LowBit weight format {fmt!r} has no ComfyUI equivalent"


def _float_weight(module, dtype):
    """Dequantized weight of a quantized layer or split convolution (parts concatenated along input channels)."""
    from ..kernels import ops
    from .split import ChannelSplitConv2d

    if isinstance(module, ChannelSplitConv2d):
        w = torch.cat([_float_weight(p, torch.float32) for p in module.parts], dim=1)
    elif not hasattr(module, "packed_weight"):  # a part left in float
        w = module.weight.detach().float()
    else:
        with torch.no_grad():
            w = ops.dequantize_weight(module.packed_weight()).float()
    return w.to(dtype).contiguous()


def _bias_of(module):
    from .split import ChannelSplitConv2d

    if isinstance(module, ChannelSplitConv2d):
        return module.parts[0].bias
    return module.bias


def _default_float_dtype(model: nn.Module, skip) -> torch.dtype:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(name.startswith(s + ".") for s in skip):
            return p.dtype
    return torch.float32


def _units(qmodel: nn.Module) -> Dict[str, nn.Module]:
    """Module name -> module written as one unit: each quantized layer and split convolution (its parts inside)."""
    from .layers import QuantLayer
    from .split import ChannelSplitConv2d

    special: Dict[str, nn.Module] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLayer, ChannelSplitConv2d)) and not any(name.startswith(s + ".") for s in special):
            special[name] = m
    return special


def _plain_tensors(qmodel: nn.Module, special):
    """(name, tensor) of every parameter and persistent buffer outside the ``special`` units."""
    for mname, m in qmodel.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in special):
            continue
        local = dict(m._parameters)
        local.update({k: v for k, v in m._buffers.items() if k not in m._non_persistent_buffers_set})
        for pname, t in local.items():
            if t is not None:
                yield (f"{mname}.{pname}" if mname else pname), t


def _as_key_fn(key_map) -> Callable[[str], str]:
    if key_map is None:
        return lambda k: k
    if callable(key_map):
        return key_map
    if isinstance(key_map, dict):
        return lambda k: key_map.get(k, k)
    raise ConfigError(f"key_map must be None, a dict or a callable, got {type(key_map).__name__}")


def comfy_state_dict(qmodel: nn.Module, *, prefix: str = "", float_dtype: Optional[torch.dtype] = None,
                     w4_layout: str = "awq_w4a16", scale_dtype: Union[str, torch.dtype] = "float32",
                     key_map=None) -> tuple:
    """The tensors of a ComfyUI-native file for ``qmodel`` and what they keep: returns ``(tensors, metadata,
    result)`` (``metadata`` is the safetensors header dict, ``result`` an :class:`ExportResult` with path None).

    ``float_dtype``: dtype of the weights written as float (convolutions and other layers ComfyUI cannot hold
    quantized) and of their biases; default the dtype of the model's float parameters (fp32 keeps LowBit's
    dequantized weights exactly). ``w4_layout``: "awq_w4a16" (4-bit weights stay 4-bit, activations float) or
    "int8_tensorwise" (per-channel 4-bit weights as int8, 1 byte each, with ComfyUI's dynamic int8
    activations; group-wise 4-bit still goes to awq_w4a16). ``scale_dtype``: dtype of the AWQ scales/zeros
    (float32: exact, and comfy-kitchen computes those layers in fp32; float16/bfloat16 round the scales).
    """
    from .layers import quant_layers
    from .split import ChannelSplitConv2d

    if w4_layout not in W4_LAYOUTS:
        raise ConfigError(f"w4_layout must be one of {W4_LAYOUTS}, got {w4_layout!r}")
    if isinstance(scale_dtype, str):
        if scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {scale_dtype!r}")
        scale_dtype = _SCALE_DTYPES[scale_dtype]
    if scale_dtype not in _SCALE_DTYPES.values():
        raise ConfigError(f"scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a string such as '' or 'model.diffusion_model.', got {prefix!r}")
    qlayers = quant_layers(qmodel)
    if not qlayers:
        raise ConfigError("this model has no LowBit quantized layers; quantize it before exporting")
    key_of = _as_key_fn(key_map)

    def full(name: str) -> str:
        return prefix + key_of(name)

    special = _units(qmodel)
    if float_dtype is None:
        float_dtype = _default_float_dtype(qmodel, special)

    tensors: Dict[str, torch.Tensor] = {}
    result = ExportResult(path=None)

    def put(key, t):
        if key in tensors:
            raise ConfigError(f"two tensors map to the ComfyUI key {key!r}; check key_map")
        tensors[key] = t.detach().cpu().contiguous().clone()

    # plain parameters and persistent buffers of every other module, under their own names and dtypes
    for pname, t in _plain_tensors(qmodel, special):
        put(full(pname), t)

    static_act = dynamic_act = time_tables = float_act_int8 = 0
    for name, m in special.items():
        bias = _bias_of(m)
        fmt, why = (None, "a split convolution (shortcut split) is one Conv2d in ComfyUI") \
            if isinstance(m, ChannelSplitConv2d) else _plan(m, w4_layout)
        layers = [p for p in m.parts] if isinstance(m, ChannelSplitConv2d) else [m]
        for lay in layers:
            if getattr(lay, "a_dynamic", False):
                dynamic_act += 1
            elif getattr(lay, "act", None) is not None:
                static_act += 1
                if len(lay.act.tgrid) > 1:
                    time_tables += 1
        if fmt is None:
            put(full(f"{name}.weight"), _float_weight(m, float_dtype))
            result.float_layers[name] = why
        else:
            with torch.no_grad():
                pw = m.packed_weight()
                st, conf = _int8_tensorwise(pw) if fmt == "int8_tensorwise" else _awq_w4a16(pw, scale_dtype)
            for suffix, t in st.items():
                put(full(f"{name}.{suffix}"), t)
            put(full(f"{name}.comfy_quant"), _conf_tensor(conf))
            result.layers[full(name)] = conf
            if fmt == "int8_tensorwise" and getattr(m, "act", None) is None and not getattr(m, "a_dynamic", False):
                float_act_int8 += 1
        if bias is not None:
            put(full(f"{name}.bias"), bias.detach().float().to(float_dtype))

    # what the file does not carry
    d = result.dropped
    n_int8 = sum(1 for c in result.layers.values() if c["format"] == "int8_tensorwise")
    n_awq = len(result.layers) - n_int8
    if static_act:
        d.append(f"static activation quantization of {static_act} layers (LowBit's per-tensor asymmetric scales): "
                 f"int8_tensorwise layers ({n_int8}) get ComfyUI's own, dynamic per row, symmetric int8, for its int8 "
                 f"matmul; awq_w4a16 ({n_awq}) and float layers ({len(result.float_layers)}) run activations in float")
    if dynamic_act:
        d.append(f"dynamic per-token asymmetric activation quantization of {dynamic_act} layers: ComfyUI's is "
                 "symmetric per row (int8_tensorwise) or absent (awq_w4a16, float layers)")
    if float_act_int8:
        d.append(f"float activations of {float_act_int8} int8_tensorwise layers: ComfyUI runs int8_tensorwise layers "
                 "through its int8 matmul and quantizes their inputs itself, dynamically per row, symmetric int8")
    if time_tables:
        d.append(f"per-timestep activation tables of {time_tables} layers (TALSQ / time bins)")
    convs = [n for n, why in result.float_layers.items() if "Linear layers only" in why or "split" in why]
    if convs:
        d.append(f"{len(convs)} convolutions are written as {_dt(float_dtype)} weights (LowBit's dequantized "
                 f"integers{', exact' if float_dtype == torch.float32 else ', rounded'}): ComfyUI quantizes Linear "
                 "layers only")
    other = {n: why for n, why in result.float_layers.items() if n not in convs}
    if other:
        d.append(f"{len(other)} Linear layers written as float {_dt(float_dtype)} weights: "
                 + "; ".join(sorted({why for why in other.values()})))
    if n_awq and scale_dtype != torch.float32:
        d.append(f"awq_w4a16 scales rounded to {_dt(scale_dtype)} (float32 keeps them exact)")
    d += context_dropped(qmodel, "ComfyUI's layouts have one precision for every step")

    quant_meta = {"format_version": "1.0", "layers": result.layers}
    metadata = {"_quantization_metadata": json.dumps(quant_meta, sort_keys=True),
                "lowbit_export": json.dumps({"dropped": d, "float_layers": result.float_layers}, sort_keys=True)}
    result.tensors = len(tensors)
    return tensors, metadata, result


def context_dropped(qmodel: nn.Module, one_precision: str) -> List[str]:
    """The dropped lines of the model's LowBit state no export layout carries: PTQD statistics and a step-aware
    schedule (``one_precision``: why the layout cannot hold one)."""
    from .context import get_context

    ctx = get_context(qmodel)
    out = []
    if ctx is not None and ctx.ptqd is not None:
        out.append("PTQD statistics: no bias / correlated-noise correction and no variance-schedule calibration")
    if ctx is not None and ctx.schedule is not None:
        out.append(f"step-aware bitwidth schedule ({one_precision})")
    return out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_export_path(path, overwrite: bool, suffix: str):
    """(path, its folder) for an export, checked before any work: the folder exists and is writable, the path is
    not a folder, nothing is replaced unless ``overwrite``; GGUF files must end in ``.gguf`` (loaders list only
    those)."""
    from .io import SaveError, SaveExistsError, SaveFolderError

    path = os.fspath(path)
    if suffix == ".gguf" and not path.endswith(suffix):
        raise SaveError(f"cannot export to {path}: give a file name ending in .gguf (GGUF loaders list only those)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveFolderError(f"cannot export to {path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise SaveError(f"cannot export to {path}: it is a folder; give a file name ending in {suffix}")
    if not os.access(folder, os.W_OK):
        raise SaveFolderError(f"cannot export to {path}: folder {folder} is not writable (permission or a "
                              "read-only file system); choose a writable folder")
    if not overwrite and os.path.lexists(path):
        raise SaveExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    return path, folder


def export_comfy(qmodel: nn.Module, path: str, *, prefix: str = "", float_dtype: Optional[torch.dtype] = None,
                 w4_layout: str = "awq_w4a16", scale_dtype: Union[str, torch.dtype] = "float32", key_map=None,
                 overwrite: bool = False, log: Optional[Callable[[str], None]] = None,
                 reader_formats: Optional[Collection[str]] = None) -> ExportResult:
    """Write ``qmodel`` (a LowBit quantized model, fake-quant or deployed) as a ComfyUI-native quantized
    safetensors file at ``path`` (never replacing a file unless ``overwrite``; the folder must exist). Returns an
    :class:`ExportResult`; its ``dropped`` lines (also in the file's ``lowbit_export`` header entry and passed to
    ``log``, e.g. ``print``) say what the ComfyUI layouts cannot carry. ``reader_formats``: the ``comfy_quant``
    formats the ComfyUI that will read the file knows (its ``comfy.quant_ops.QUANT_ALGOS``); a layer in any other
    format is refused before anything is written (that ComfyUI would load its integers as float weights).
    Options: :func:`comfy_state_dict`."""
    from safetensors.torch import save_file

    from .io import clean_stale_temps, write_new_file

    path, folder = check_export_path(path, overwrite, ".safetensors")
    tensors, metadata, result = comfy_state_dict(qmodel, prefix=prefix, float_dtype=float_dtype, w4_layout=w4_layout,
                                                 scale_dtype=scale_dtype, key_map=key_map)
    if reader_formats is not None:
        unknown = sorted({c["format"] for c in result.layers.values()} - set(reader_formats))
        if unknown:
            raise ConfigError(f"the ComfyUI that reads this file does not know the comfy_quant format(s) "
                              f"{', '.join(unknown)} (it knows: {', '.join(sorted(reader_formats)) or 'none'}) and "
                              "would load those integers as float weights; "
                              + ("it reads no 4-bit layout LowBit can write exactly (asym_w4a8_int8 and convrot_w4a4 "
                                 "hold rotated weights): keep LowBit's own file for 4 bits (layout=lowbit, Load "
                                 "Quantized UNet), or quantize to W8A8 for a native file"
                                 if "awq_w4a16" in unknown else "update ComfyUI"))
    clean_stale_temps(folder)  # (an interrupted export's or save's temporary file)
    write_new_file(path, folder, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite)
    result.path = path
    if log is not None:
        log(result.summary())
    return result
