"""The "Save Quantized UNet" and "Load Quantized UNet" nodes: ``models/lowbit/<prefix>_NNNNN.safetensors`` via quant.io.

The file holds the quantized UNet (packed integers, scales, activation tables, PTQD statistics), the UNet's float
tensors outside the quantized layers and ComfyUI's architecture record, with a versioned JSON header; it is applied
to the same full-precision checkpoint's MODEL when loading, or, with no MODEL connected, builds the model alone
(``load_standalone``: ComfyUI's model on the meta device, filled from the file; no float weights in memory). With
``layout=comfyui-native`` the save node writes ComfyUI's own quantized layout instead (quant/export_comfy.py).
"""
from __future__ import annotations

import os
import re
from typing import Tuple

from . import comfy_adapter as adapter
from .common import CATEGORY, SOCKET, NodeInputError

COUNTER_DIGITS = 5


def split_prefix(prefix: str) -> Tuple[str, str]:
    """'sub/dir/name' -> ('sub/dir', 'name'); rejects absolute paths, '..' and empty names."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise NodeInputError("filename_prefix is empty; give a name such as 'sd15_w4a8' (saved under models/lowbit/)")
    p = prefix.strip().replace("\\", "/")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p):
        raise NodeInputError(f"filename_prefix {prefix!r} is an absolute path; give a name relative to models/lowbit/")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if any(x == ".." for x in parts):
        raise NodeInputError(f"filename_prefix {prefix!r} leaves models/lowbit/ ('..'); remove the '..'")
    if not parts:
        raise NodeInputError(f"filename_prefix {prefix!r} has no file name")
    if parts[-1].lower().endswith(".safetensors"):
        parts[-1] = parts[-1][: -len(".safetensors")]
    return "/".join(parts[:-1]), parts[-1]


def next_free_path(folder: str, prefix: str, ext: str = ".safetensors") -> str:
    """``<folder>/<subdir>/<name>_NNNNN<ext>`` with NNNNN one above the highest existing counter."""
    sub, name = split_prefix(prefix)
    d = os.path.join(folder, sub) if sub else folder
    os.makedirs(d, exist_ok=True)
    pat = re.compile(re.escape(name) + r"_(\d{%d,})%s$" % (COUNTER_DIGITS, re.escape(ext)))
    used = [int(m.group(1)) for f in os.listdir(d) if (m := pat.match(f))]
    n = max(used, default=0) + 1
    while True:
        path = os.path.join(d, f"{name}_{n:0{COUNTER_DIGITS}d}{ext}")
        if not os.path.exists(path):
            return path
        n += 1


LAYOUTS = ("lowbit", "comfyui-native", "gguf")
# ComfyUI model config classes (or a base class of theirs) -> the GGUF architecture ComfyUI-GGUF's loader accepts
GGUF_ARCH_OF = {"SD15": "sd1", "SDXL": "sdxl", "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                "KOALA_700M": "sdxl", "KOALA_1B": "sdxl", "SD3": "sd3", "Flux": "flux", "AuraFlow": "aura",
                "HiDream": "hidream", "LTXV": "ltxv", "HunyuanVideo": "hyvid", "WAN21_T2V": "wan",
                "Lumina2": "lumina2", "QwenImage": "qwen_image", "CosmosT2V": "cosmos"}


UNRECORDED = "this file needs the float MODEL connected to load: its architecture could not be recorded"


def save_unet(model, filename_prefix: str, folder: str, arch=None) -> str:
    """Save the quantized UNet of ``model``; returns the path. The file records the architecture (and loads without
    a MODEL) when :func:`comfy_arch` can describe it (``arch``: its result, when the caller has it; False: it could
    not, and the node warns)."""
    from ..quant.io import save

    q = adapter.require_quantized_unet(model)
    arch = comfy_arch(model) if arch is None else arch
    return _save_free(lambda path: save(q, path, overwrite=False, arch=arch), filename_prefix, folder)


# ------------------------------------------------------------------------------ loading without the float model
# ComfyUI objects are touched here (not in comfy_adapter.py) so that the standalone loader is one reviewable piece;
# every ComfyUI import is inside a function (the nodes package imports no host at module level).
COMFY_DTYPES = ("float32", "float16", "bfloat16")


def comfy_arch(model):
    """The architecture record of a ComfyUI MODEL for the file header (quant.io ``arch``): ComfyUI's model config
    class name (one of ``comfy.supported_models.models``), its ``unet_config`` without the dtype, the model type
    (EPS, V_PREDICTION, FLOW, ...) and the weight dtype. False when the config is not plain JSON (then the file
    loads onto a float MODEL only)."""
    from ..quant.io import check_arch, plain_json

    try:
        base = model.model
        mc = base.model_config
        cfg = {f"unet_config.{k}": plain_json(v) for k, v in mc.unet_config.items() if k != "dtype"}
        cfg["model_type"] = base.model_type.name
        dt = str(mc.unet_config.get("dtype") or base.get_dtype()).replace("torch.", "")
        cfg["weight_dtype"] = dt if dt in COMFY_DTYPES else "float32"
        arch = {"library": "comfyui", "class": type(mc).__name__, "config": cfg}
        check_arch("<save>", arch)
        return arch
    except Exception as exc:  # the record is optional; saving must not fail on it
        print(f"[LowBit] the file will not load without a float MODEL: the architecture is not recordable ({exc})")
        return False


def _standalone_fail(path, problem, fix):
    raise NodeInputError(f"cannot load {os.path.basename(path)} without a MODEL: {problem}; {fix}")


def build_comfy_model(path: str, arch: dict):
    """ComfyUI's BaseModel for a checked ``arch`` (library comfyui) with its diffusion model on the meta device:
    the config class is looked up by name in ComfyUI's own list of supported models (nothing else is built) and
    must accept the recorded unet_config; the model type is a ModelType name. No float weight is allocated."""
    import torch

    import comfy.model_base
    import comfy.model_management as mm
    import comfy.supported_models

    cfg = arch["config"]
    classes = {c.__name__: c for c in comfy.supported_models.models}
    cls = classes.get(arch["class"])
    if cls is None:
        _standalone_fail(path, f"ComfyUI here has no model config {arch['class']!r}", "update ComfyUI or connect "
                               "the float MODEL")
    unet_config = {k[len("unet_config."):]: v for k, v in cfg.items() if k.startswith("unet_config.")}
    if not unet_config or not cls.matches(unet_config):
        _standalone_fail(path, f"its unet_config is not a {arch['class']} config", "the file is corrupt; connect "
                               "the float MODEL")
    try:
        mtype = comfy.model_base.ModelType[cfg.get("model_type")]
    except KeyError:
        _standalone_fail(path, f"model_type {str(cfg.get('model_type'))[:40]!r} is not a ComfyUI ModelType",
                         "the file is corrupt")
    wdt = cfg.get("weight_dtype")
    if wdt not in COMFY_DTYPES:
        _standalone_fail(path, f"weight_dtype {str(wdt)[:40]!r} is not one of {list(COMFY_DTYPES)}",
                         "the file is corrupt")
    mc = cls(unet_config)
    dtype = getattr(torch, wdt)
    load_device = mm.get_torch_device()
    mc.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, mc.supported_inference_dtypes))
    mc.model_type = lambda state_dict, prefix="": mtype  # the recorded type, not one guessed from weights
    try:
        base = mc.get_model({}, "", device=torch.device("meta"))
    except Exception as exc:  # ComfyUI's constructors raise many types on configs they do not take
        _standalone_fail(path, f"ComfyUI cannot build {arch['class']} from it ({type(exc).__name__}: "
                               f"{str(exc)[:160]})", "connect the float MODEL")
    return base, load_device


def load_standalone(path: str):
    """A ComfyUI MODEL running the quantized UNet of ``path``, built without any float weight: ComfyUI's model
    from the file's recorded architecture on the meta device, its diffusion model filled from the file
    (quant.io.load_empty checks every tensor against it), the rest (sampling schedule) from ComfyUI's config."""
    import comfy.model_management as mm
    import comfy.model_patcher

    from ..quant.io import check_arch, load_empty, read_header

    header, _ = read_header(path)
    arch = check_arch(path, header.get("arch"))
    if arch is None or arch["library"] != "comfyui":
        what = "no architecture" if arch is None else f"a {arch['library']} {arch['class']} architecture"
        _standalone_fail(path, f"it records {what} (saved by an older LowBit or outside ComfyUI)",
                         "connect the float MODEL of its checkpoint to the model input, then save it again with "
                         "Save Quantized UNet to make a file that loads alone")
    base, load_device = build_comfy_model(path, arch)
    base.diffusion_model = load_empty(base.diffusion_model, path)
    left = [n for n, t in list(base.named_parameters()) + list(base.named_buffers()) if t.is_meta]
    if left:
        _standalone_fail(path, f"{len(left)} tensors of the model are not in the file (e.g. {left[0][:120]!r})",
                         "connect the float MODEL")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    adapter.install_lora_support(patcher, base.diffusion_model)
    return patcher


def _save_free(write, filename_prefix: str, folder: str, ext: str = ".safetensors"):
    for _ in range(100):  # never overwrite: another save may take the name between the scan and the write
        path = next_free_path(folder, filename_prefix, ext)
        try:
            return write(path)
        except FileExistsError:
            continue
    raise NodeInputError(f"could not find a free file name for {filename_prefix!r} in {folder}")


def export_native(model, filename_prefix: str, folder: str):
    """Write the quantized UNet of ``model`` in ComfyUI's own quantized layout (quant/export_comfy.py) to
    ``<folder>/<prefix>_NNNNN.safetensors``; returns the ExportResult (path, layers, what is dropped). The UNet is
    ComfyUI's module, so the keys are ComfyUI's diffusion-model keys (no prefix: "Load Diffusion Model" reads it)."""
    from ..quant.export_comfy import export_comfy

    q = adapter.require_quantized_unet(model)
    formats = adapter.native_quant_formats()
    if formats is None:
        raise NodeInputError(
            f"layout comfyui-native: this ComfyUI ({adapter.comfyui_version()}) has no comfy_quant loader "
            "(comfy/quant_ops.py), so its Load Diffusion Model would read the integers as float weights; update "
            "ComfyUI, or save with layout=lowbit and load with Load Quantized UNet")
    return _save_free(lambda path: export_comfy(q, path, prefix="", overwrite=False, reader_formats=formats),
                      filename_prefix, folder)


def gguf_arch(model) -> str:
    """The ``general.architecture`` of a GGUF file of ``model``'s UNet (ComfyUI-GGUF checks it against its list and
    then detects the model from the keys, as the stock loader does); a one-line NodeInputError for model families
    that list does not have."""
    try:
        mc = model.model.model_config
    except AttributeError:
        raise NodeInputError("layout gguf: this MODEL has no ComfyUI model config; save with layout=lowbit") from None
    for cls in type(mc).__mro__:
        if cls.__name__ in GGUF_ARCH_OF:
            return GGUF_ARCH_OF[cls.__name__]
    raise NodeInputError(f"layout gguf: ComfyUI-GGUF's loader has no architecture for {type(mc).__name__} models "
                         f"(it reads {', '.join(sorted(set(GGUF_ARCH_OF.values())))}); save with layout=lowbit or "
                         "comfyui-native")


def export_gguf_file(model, filename_prefix: str, folder: str):
    """Write the quantized UNet of ``model`` as a GGUF file (quant/export_gguf.py) to
    ``<folder>/<prefix>_NNNNN.gguf`` (ComfyUI-GGUF's "Unet Loader (GGUF)" lists .gguf files in the diffusion-model
    folders); returns the ExportResult. Keys are ComfyUI's diffusion-model keys, as for comfyui-native."""
    from ..quant.export_gguf import export_gguf

    q = adapter.require_quantized_unet(model)
    arch = gguf_arch(model)
    return _save_free(lambda path: export_gguf(q, path, arch=arch, overwrite=False), filename_prefix, folder, ".gguf")


def native_folder() -> str:
    """models/diffusion_models (where ComfyUI's "Load Diffusion Model" looks) when the adapter can name it, else
    models/lowbit."""
    find = getattr(adapter, "diffusion_models_folder", None)
    return find() if find is not None else adapter.lowbit_folder()


class LowBitSaveQuantizedUNet:
    DESCRIPTION = ("Save the quantized UNet of a MODEL (from Quantize UNet or EfficientDM Fine-tune) to "
                   "models/lowbit/<prefix>_NNNNN.safetensors: packed integer weights, scales, activation tables "
                   "and PTQD statistics, with a versioned header. Never overwrites. LoRAs applied on top are not "
                   "saved. Load it later with Load Quantized UNet on the same checkpoint. layout=comfyui-native "
                   "writes ComfyUI's own quantized layout instead (into the folder the stock Load Diffusion Model "
                   "reads: models/diffusion_models/ or models/unet/; no custom node needed to load it; needs a "
                   "ComfyUI with the comfy_quant loader) and lists what that layout cannot hold. layout=gguf writes a "
                   "GGUF file there (Q8_0 / Q4_0 blocks; loaded by ComfyUI-GGUF's Unet Loader (GGUF)).")
    CATEGORY = f"{CATEGORY}/io"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "A quantized MODEL (output of Quantize UNet or EfficientDM Fine-tune)."),
            "filename_prefix": ("STRING", {"default": "unet", "tooltip":
                                           "File name under models/lowbit/; '_00001.safetensors' etc. is appended. "
                                           "May contain subfolders ('sd15/w4a8')."}),
        }, "optional": {
            "layout": (list(LAYOUTS), {"default": "lowbit", "tooltip":
                       "lowbit: LowBit's file (everything: activation tables, PTQD statistics); load it with Load "
                       "Quantized UNet. comfyui-native: ComfyUI's own quantized layout (int8_tensorwise for 8-bit, "
                       "awq_w4a16 for 4-bit Linear weights where this ComfyUI reads it, e.g. not 0.33.0: 4-bit "
                       "is refused there; convolutions as float), loaded by the stock Load Diffusion Model with no "
                       "custom node; drops static activation scales, per-timestep tables, PTQD correction and "
                       "schedules (listed after saving). gguf: a .gguf file (8-bit weights as Q8_0, 4-bit as Q4_0, "
                       "convolutions included, scales in fp16) for ComfyUI-GGUF's Unet Loader (GGUF); activations "
                       "run in float there; drops the same features."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        if filename_prefix is None:
            return True
        try:
            split_prefix(filename_prefix)
        except NodeInputError as exc:
            return str(exc)
        return True

    def save(self, model, filename_prefix, layout="lowbit"):
        if layout not in LAYOUTS:
            raise NodeInputError(f"layout {layout!r} is not one of {list(LAYOUTS)}; pick one of those")
        if layout in ("comfyui-native", "gguf"):
            folder = native_folder()
            res = (export_native if layout == "comfyui-native" else export_gguf_file)(model, filename_prefix, folder)
            where = os.path.join(os.path.basename(folder), os.path.relpath(res.path, folder)).replace(os.sep, "/")
            print(f"[LowBit] {res.summary()}")
            kind = "ComfyUI-native" if layout == "comfyui-native" else "GGUF"
            return {"ui": {"text": [f"saved models/{where} ({kind})"] + [f"dropped: {d}" for d in res.dropped]},
                    "result": ()}
        folder = adapter.lowbit_folder()
        arch = comfy_arch(model)
        path = save_unet(model, filename_prefix, folder, arch=arch)
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        text = [f"saved models/lowbit/{rel}"]
        if not arch:  # (comfy_arch printed why on the console)
            text.append(f"warning: {UNRECORDED} (see the console)")
        return {"ui": {"text": text, "lowbit_files": [rel]}, "result": ()}


class LowBitLoadQuantizedUNet:
    DESCRIPTION = ("Apply a quantized UNet saved by Save Quantized UNet to a full-precision MODEL of the same "
                   "checkpoint architecture. Returns a clone that runs the quantized UNet (with its PTQD "
                   "statistics if the file has them); the input MODEL is unchanged. A file made from another "
                   "architecture is refused with the layer that does not match. Without a MODEL connected, the "
                   "model is built from the file alone (no float weights in memory; files saved by this LowBit).")
    CATEGORY = f"{CATEGORY}/io"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model running the loaded quantized UNet.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = adapter.lowbit_files()
        return {"required": {
            "unet_name": (files, {"tooltip": "A file in models/lowbit/ (press R in the browser after saving "
                                             "a new one)."}),
        }, "optional": {
            "model": SOCKET("MODEL", "The full-precision model the file was made from (same checkpoint "
                                     "architecture). Leave it unconnected to build the model from the file alone "
                                     "(files saved by this LowBit): the float weights are never loaded, so memory "
                                     "holds only the quantized model."),
        }}

    @classmethod
    def IS_CHANGED(cls, model=None, unet_name=None):
        try:
            st = os.stat(adapter.lowbit_file_path(unet_name))
            return f"{unet_name}:{st.st_size}:{st.st_mtime_ns}"
        except Exception:
            return unet_name

    def load(self, unet_name, model=None):
        from ..quant.io import load

        path = adapter.lowbit_file_path(unet_name)
        if model is None:
            return (load_standalone(path),)
        fp_unet = adapter.require_fp_unet(model, "the MODEL to load into")
        q_unet = load(fp_unet, path)
        return (adapter.attach_quantized_unet(model, q_unet),)

