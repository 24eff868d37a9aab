"""Save and load quantized UNets: one safetensors file, each layer's weight in its registered format + activation
tables + a versioned JSON header.

Loading checks meaning, not only bytes, before anything is built: the header is parsed by us with size, depth and
integer-size limits; configs are rebuilt only from the allowlist in ``config.py`` (and must be of the type their slot
holds); every layer's kind and shape must match the target model; every tensor's dtype and shape follows from the
layer's format and settings; scales are finite and positive, zero points integers in range, time grids sorted,
activation bits match their tables, group sizes divide; PTQD tables have the model's output channels. Tensors the
loader does not need are never read. Every failure is a ``LoadError`` naming the field and the fix; the target model
is never modified (a new quantized module tree is returned). No pickle, no code execution.

File layout (tensor names; L = qualified layer name):
  L.<storage>    the weight in format ``layers[L].w_format`` (``kernels/formats``); the kernel layouts store
                 L.qdata (int8 [N, K] or uint8 [N, ceil(K/2)]) and L.w_scale (fp32 [N] or [N, G])
  L.bias         fp32 [N]                              (if the layer has a bias)
  L.act.tgrid    fp32 [K_t]; L.act.scale_<b>, L.act.zero_<b> fp32 [K_t]   (static activation tables)
  __extra__.<name>.<key>                               (PTQD statistics etc., see EXTRAS)
  __float__.<key>                                      (format 3: every tensor of the model's state outside the
                                                        quantized layers: norms, embeddings, float-kept layers)
Header: ``__metadata__["lowbit"]`` = JSON {format, format_version, config, schedule, num_train_timesteps,
layers{L: {kind, shape, w_format, w_bits, a_bits, group_size, a_dynamic, a_bits_set, time_bins, has_bias, scheduled}},
model{...}, splits{...}, extras{...}, arch, float_tensors[...], profile, tensor_sha256{...}, header_sha256}
(``header_sha256``, format 5: sha256 of the header's canonical JSON without it, ``sthdr.header_digest``).
``arch`` (format 3) is null or {library, class, config}: the architecture to build without a float model
(``load_model``); for ``library="diffusers"`` only the classes of ``ARCH_CLASSES`` with their ``__init__`` keywords
are accepted, other libraries (``comfyui``) are built and checked by their host's node. Older format versions are
upgraded on load by ``MIGRATIONS``.

Two ways to load: ``load(model, path)`` applies the file to the full-precision ``model`` (every file version), and
``load_model(path)`` (or ``load(path)``) builds the architecture on the meta device and fills it from the file alone,
so the float weights never exist in memory (format 3 files with an ``arch``).

Saving is atomic and never clobbers: the data goes to a temporary file ``.<name>.lowbit-<pid>-<rand>.tmp`` (mode from
the umask) in the destination folder, which is then linked to the final name (``link`` fails if the name exists, so
there is no check-then-rename race) or, with ``overwrite=True``, renamed over it. Temporary files of processes that no
longer run (a save killed by SIGKILL) are removed by the next save into that folder; the loader never reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from . import config as C
from . import sthdr
from .context import QuantContext, attach_context, get_context
from .errors import ConfigError, LoadError, LowBitError
from .layers import QuantLayer, qlayer_class_for, quant_layers
from .split import ChannelSplitConv2d, apply_splits

FORMAT = "lowbit.quantized_unet"
FORMAT_VERSION = sthdr.LOWBIT_FORMAT_VERSION
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TIME_BINS = 100_000
MAX_EXTRA_TENSORS = 256
MAX_FLOAT_TENSORS = 100_000
FLOAT_PREFIX = "__float__."
PTQD_MAX_K = 1e3  # PTQD tables' bounds of meaning (see _check_ptqd_values)
PTQD_MAX_BIAS = 1e4
# diffusers classes ``load_model`` may build from a file's ``arch`` (nothing else is ever constructed)
ARCH_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel",
                "DiTTransformer2DModel", "PixArtTransformer2DModel", "SanaTransformer2DModel", "HunyuanDiT2DModel",
                "CogView3PlusTransformer2DModel", "AuraFlowTransformer2DModel", "LuminaNextDiT2DModel",
                "Lumina2Transformer2DModel")
ARCH_LIBRARIES = ("diffusers", "comfyui")
_ARCH_COUNT_KEYS = ("layers_per_block", "num_layers", "num_single_layers", "transformer_layers_per_block",
                    "reverse_transformer_layers_per_block", "num_mmdit_layers", "num_single_dit_layers",
                    "num_refiner_layers")
_ARCH_STR_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,100}$")

class SaveError(LowBitError, OSError):
    """A file cannot be written where asked (also an OSError, so callers catching those keep working)."""


class SaveExistsError(SaveError, FileExistsError):
    """The destination exists and ``overwrite`` is False."""


class SaveFolderError(SaveError, FileNotFoundError):
    """The destination folder does not exist and ``make_dirs`` is False."""


# name -> (to_state(qmodel) -> (meta dict, tensors dict) | None, from_state(qmodel, meta, tensors) -> None)
EXTRAS: Dict[str, tuple] = {}
# name -> check_meta(meta): raises ValueError/ConfigError/TypeError when an extra's header part is malformed; run by
# ``check_header`` (so ``lowbit inspect`` and loading refuse the same headers) before anything is built
EXTRA_CHECKS: Dict[str, Callable] = {}


def register_extra(name: str, to_state: Callable, from_state: Callable, check_meta: Optional[Callable] = None):
    EXTRAS[name] = (to_state, from_state)
    if check_meta is not None:
        EXTRA_CHECKS[name] = check_meta
    else:
        EXTRA_CHECKS.pop(name, None)


# ------------------------------------------------------------------------------------------ per-model state
def _get_state(qmodel: nn.Module) -> dict:
    """What the file records about the model besides its layers (one place, so the state's home can move)."""
    ctx = get_context(qmodel)
    return dict(config=getattr(ctx, "config", None), schedule=getattr(ctx, "schedule", None),
                num_train_timesteps=ctx.num_train_timesteps if ctx is not None else 1000,
                profile=getattr(ctx, "profile", None))


def _set_state(qmodel: nn.Module, ctx: QuantContext, config, schedule, splits) -> None:
    ctx.config = config
    ctx.schedule = schedule
    ctx.splits = {n: tuple(v) for n, v in splits.items()}


# ------------------------------------------------------------------------------------------ migrations
def _migrate_1_to_2(header: dict) -> dict:
    """Version 1 keyed the weight layout by its bit count; version 2 names the registered format per layer."""
    from ..kernels.formats import default_format

    layers = header.get("layers")
    if isinstance(layers, dict):
        for lm in layers.values():
            if isinstance(lm, dict) and "w_format" not in lm:
                bits, g = lm.get("w_bits"), lm.get("group_size")
                if isinstance(bits, int) and not isinstance(bits, bool):
                    lm["w_format"] = default_format(bits, g)
    header["format_version"] = 2
    return header


def _migrate_2_to_3(header: dict) -> dict:
    """Version 3 may record the architecture (``arch``) and the float tensors outside the quantized layers
    (``float_tensors``, stored as ``__float__.<key>``); older files hold neither and load onto a float model only."""
    header.setdefault("arch", None)
    header.setdefault("float_tensors", [])
    header["format_version"] = 3
    return header


def _migrate_3_to_4(header: dict) -> dict:
    """Version 4 records the model profile the tables were keyed with (``profile``); older files hold none and are
    read with the profile that matched their model class when they were written (:func:`file_profile`)."""
    header.setdefault("profile", None)
    header["format_version"] = 4
    return header


def _migrate_4_to_5(header: dict) -> dict:
    """Version 5 records a checksum of the header itself (``header_sha256``, ``sthdr.header_digest``), checked by
    ``read_header``; older files hold none (their tensors are covered by ``tensor_sha256`` from version 2 on)."""
    header["format_version"] = 5
    return header


# version n -> function(header) -> header of version n + 1 (tensor names are unchanged so far)
MIGRATIONS: Dict[int, Callable[[dict], dict]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4,
                                                 4: _migrate_4_to_5}


def migrate(header: dict, path: str = "<header>") -> dict:
    v = header.get("format_version")
    if not sthdr.lowbit_version_ok(v):
        _fail(path, f"format version {v!r} is not supported (this LowBit reads 1..{FORMAT_VERSION})",
              "upgrade LowBit or re-save the file with this version")
    # fields a later version introduced, in a header that claims an earlier one: not a file that version wrote
    # (e.g. a version-3 file relabelled 1, which would skip its tensor checksums)
    layers = header.get("layers")
    found = {2: [k for k in ("tensor_sha256",) if k in header],
             3: [k for k in ("arch", "float_tensors") if k in header],
             4: [k for k in ("profile",) if k in header],
             5: [k for k in ("header_sha256",) if k in header]}
    if isinstance(layers, dict) and any(isinstance(lm, dict) and "w_format" in lm for lm in layers.values()):
        found[2].append("per-layer w_format")
    for since, fields in found.items():
        if v < since and fields:
            _fail(path, f"it says format version {v} but holds {', '.join(fields)} (version {since} and later)",
                  "the file was edited after saving; save it again with LowBit")
    header["_migrated_from"] = v
    while v < FORMAT_VERSION:
        header = MIGRATIONS[v](header)
        v += 1
    return header


# ------------------------------------------------------------------------------------------ fingerprint
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
    return dict(kind=layer.float_type.__name__, shape=list(layer.weight_shape), w_format=layer.w_format,
                w_bits=layer.w_bits, a_bits=layer.a_bits, group_size=layer.group_size, a_dynamic=layer.a_dynamic,
                a_bits_set=list(layer.act.bits_set) if layer.act is not None else [],
                time_bins=len(layer.act.tgrid) if layer.act is not None else 0,
                has_bias=layer.bias is not None, scheduled=layer.scheduled)


# ------------------------------------------------------------------------------------------ save
_TMP_RE = re.compile(r"^\..*\.lowbit-(\d+)-[0-9a-f]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its file
    return True


def clean_stale_temps(folder: str) -> list:
    """Remove temporary files of interrupted saves (``.<name>.lowbit-<pid>-<rand>.tmp`` whose process is gone)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for f in names:
        m = _TMP_RE.match(f)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, f))
                removed.append(f)
            except OSError:
                pass
    return removed


def _is_write_error(exc: BaseException) -> bool:
    """An error of the writing itself (the OS said no), as opposed to a bug in what was to be written:
    ``OSError`` (PIL, plain files) or safetensors' ``SafetensorError``, which wraps the OS error in its text."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def _os_reason(exc: BaseException) -> str:
    """The OS's words for a write failure: ``strerror`` of an OSError, the ``message`` inside safetensors' text
    (``IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })``), else the first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    m = re.search(r'message: "([^"]{1,200})"', str(exc))
    if m:
        return m.group(1)
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    return (lines[0][:200] if lines else type(exc).__name__)


def write_new_file(path: str, folder: str, write, overwrite: bool) -> None:
    """Write a file the way every LowBit file is written: ``write(tmp)`` fills a temporary file
    ``.<name>.lowbit-<pid>-<rand>.tmp`` in ``folder`` (mode from the umask, like any new file: safetensors itself
    writes 0600), synced to disk, then put at ``path`` atomically, never over an existing file unless
    ``overwrite`` (:class:`SaveExistsError`); the temporary file is removed whatever happens. A failed write (full
    disk, quota, I/O error; an ``OSError`` or safetensors' ``SafetensorError``) is a one-line :class:`SaveError`
    naming ``path`` and the OS's reason."""
    tmp = os.path.join(folder, f".{os.path.basename(path)[:100]}.lowbit-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask, like any new file
    except OSError as exc:  # read-only or immutable folder, no permission: said before anything is written
        raise SaveFolderError(f"cannot save {path}: cannot write in folder {folder} ({exc.strerror}); choose a "
                              "writable folder") from None
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        try:
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as exc:  # a full disk, a quota, an I/O error: one line, not the writer's own traceback
            if not _is_write_error(exc):
                raise
            raise SaveError(f"cannot save {path}: writing failed ({_os_reason(exc)}); free space or choose another "
                            "folder, then save again (nothing was written)") from None
        if overwrite:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise SaveError(f"cannot save {path}: putting the file in place failed ({_os_reason(exc)}); "
                                "choose another name or folder") from None
        else:
            try:
                os.link(tmp, path)  # atomic: fails with FileExistsError if the name appeared meanwhile
            except FileExistsError:
                raise SaveExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
            except OSError:  # file systems without hard links: claim the name exclusively, then replace it
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    raise SaveExistsError(f"{path} already exists; choose another name or pass overwrite=True") \
                        from None
                os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def plain_json(v, depth=0):
    """``v`` as plain JSON (tuples -> lists), or raise ValueError for anything else."""
    if depth > 4:
        raise ValueError("nested too deep")
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("not finite")
        return v
    if isinstance(v, (list, tuple)):
        return [plain_json(x, depth + 1) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: plain_json(x, depth + 1) for k, x in v.items()}
    raise ValueError(f"a {type(v).__name__}")


def model_arch(model: nn.Module) -> Optional[dict]:
    """What ``load_model`` needs to build ``model`` without its weights: {library, class, config} for the
    diffusers classes in ``ARCH_CLASSES`` (the config without its ``_`` keys), else None."""
    cls = type(model)
    if not cls.__module__.startswith("diffusers.") or cls.__name__ not in ARCH_CLASSES:
        return None
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "items"):
        return None
    try:
        data = {str(k): plain_json(v) for k, v in cfg.items() if not str(k).startswith("_")}
    except ValueError:
        return None
    return dict(library="diffusers", config=data, **{"class": cls.__name__})


def model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` plus its non-persistent buffers: tensors a module computes in its
    ``__init__`` and does not save (the sin-cos position table of diffusers' ``PatchEmbed`` in DiT and PixArt). A
    model built on the meta device has those on meta too, so a file that rebuilds it must hold them."""
    out = dict(model.state_dict(keep_vars=True))
    for mname, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            v = m._buffers.get(b)
            if v is not None:
                out.setdefault(f"{mname}.{b}" if mname else b, v)
    return out


def float_state(qmodel: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state outside its quantized layers (norms, embeddings, float-kept layers, non-persistent
    buffers): what a file needs, besides the layers, to rebuild the model without a float copy."""
    names = [n for n, _ in quant_layers(qmodel)]
    out = {}
    for k, v in model_state(qmodel).items():
        if v is None or v.is_meta or any(k.startswith(n + ".") for n in names):
            continue  # meta: a host's zero-byte placeholder for a replaced float weight, not data
        out[k] = v
    return out


def _collect(qmodel: nn.Module):
    layers = quant_layers(qmodel)
    tensors, lmeta = {}, {}
    for name, layer in layers:
        pw = layer.packed_weight()
        for k, t in pw.fmt.to_storage(pw).items():
            tensors[f"{name}.{k}"] = t.detach().contiguous().cpu()
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
    state = _get_state(qmodel)
    cfg, sched = state["config"], state["schedule"]
    header = dict(format=FORMAT, format_version=FORMAT_VERSION,
                  config=C.to_json_obj(cfg) if cfg is not None else None,
                  schedule=C.to_json_obj(sched) if sched is not None else None,
                  num_train_timesteps=state["num_train_timesteps"], profile=state["profile"],
                  layers=lmeta, model=dict(cls=type(qmodel).__name__, fingerprint=model_fingerprint(qmodel)),
                  splits={n: list(m.sizes) for n, m in qmodel.named_modules() if isinstance(m, ChannelSplitConv2d)},
                  extras=extras)
    header["arch"] = model_arch(qmodel)
    fl = float_state(qmodel)
    for k, v in fl.items():
        tensors[FLOAT_PREFIX + k] = v.detach().cpu().contiguous().clone()  # clone: no storage shared between keys
    header["float_tensors"] = sorted(fl)
    return tensors, header


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (CPU, contiguous), the checksum stored per tensor in the header."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(memoryview(t.view(torch.uint8).numpy())).hexdigest()


def save(qmodel: nn.Module, path: str, overwrite: bool = False, make_dirs: bool = False,
         arch: Optional[dict] = None) -> str:
    """Write ``qmodel`` to ``path`` atomically, never replacing an existing file unless ``overwrite=True``.
    The destination folder must exist (``make_dirs=True`` creates it). Returns the path.

    The file also holds the model's float tensors outside the quantized layers and, for the diffusers classes of
    ``ARCH_CLASSES``, its architecture, so ``load_model(path)`` rebuilds it without the float model. ``arch``
    overrides the recorded architecture (a host's node passes its own, e.g. {"library": "comfyui", ...});
    ``arch=False`` records none."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not quant_layers(qmodel):
        raise ConfigError("this model has no LowBit quantized layers; quantize it before saving")
    if not path.lower().endswith(".safetensors") and not os.path.isdir(path):  # (the CLI refuses it too: a .pt name
        # on a safetensors file sends other tools to torch.load, i.e. pickle)
        raise SaveError(f"cannot save {path}: LowBit writes safetensors files, so the name must end in .safetensors, "
                        f"e.g. {os.path.splitext(path)[0] or 'model'}.safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not make_dirs:
            raise SaveFolderError(f"cannot save {path}: folder {folder} does not exist; create it or pass "
                                    "make_dirs=True")
        os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise SaveError(f"cannot save {path}: it is a folder; give a file name ending in .safetensors")
    if not overwrite and os.path.lexists(path):  # early answer only; the link below is the real no-clobber check
        raise SaveExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    if not os.access(folder, os.W_OK):
        raise SaveFolderError(f"cannot save {path}: folder {folder} is not writable (permission or a read-only "
                              "file system); choose a writable folder")
    clean_stale_temps(folder)
    if arch is not None and arch is not False:
        try:
            arch = check_arch(path, arch)
        except LoadError as exc:
            raise ConfigError(f"arch is not valid: {str(exc).split(': ', 1)[-1]}") from None
    tensors, header = _collect(qmodel)
    if arch is not None:
        header["arch"] = arch or None
    # a flipped byte in the data is caught on load (sha256: ~0.8 s per 480 MB, an SD1.5 UNet at W4, on 1 core)
    header["tensor_sha256"] = {k: tensor_digest(v) for k, v in tensors.items()}
    header = json.loads(json.dumps(header))  # (as it is read back: tuples are lists) for its own checksum
    header["header_sha256"] = sthdr.header_digest(header)
    write_new_file(path, folder, lambda tmp: save_file(tensors, tmp, metadata={"lowbit": json.dumps(header,
                                                                                       sort_keys=True)}), overwrite)
    return path


# ------------------------------------------------------------------------------------------ header
def _fail(path, problem, fix):
    raise LoadError(f"cannot load {path}: {problem}. {fix}")


# every dtype safetensors writes, so any tensor of a model (norms, embeddings, buffers) loads back: float64
# position tables (CogVideoX), complex rotary tables, bool masks, unsigned ids, fp8 weights kept in float
_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "I16": torch.int16, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
           "U64": torch.uint64, "C64": torch.complex64}


def _parse_json(path, text: str, what: str):
    try:
        return sthdr.parse_json(text, what)
    except ValueError as exc:
        _fail(path, str(exc), "the file is corrupt or crafted" if isinstance(exc, sthdr.TooDeep) else
              "the file is corrupt or not safetensors")


def read_header(path: str):
    """(lowbit header dict, migrated to the current version; tensor index) after checking the file is a complete
    safetensors file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        _fail(path, "it is a folder", "give the .safetensors file saved by LowBit (a file, not its folder)")
    if not os.path.isfile(path):
        if os.path.islink(path) and not os.path.exists(path):
            _fail(path, f"broken symbolic link {path} -> {sthdr.link_target(path)}",
                  "point the link at the file, or give the file's own path")
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
            text = f.read(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(path, f"header is not UTF-8 ({exc})", "the file is corrupt or not safetensors")
    index = _parse_json(path, text, "the safetensors header")
    if not isinstance(index, dict):
        _fail(path, "header is not a JSON object", "the file is corrupt or not safetensors")
    meta = index.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or "lowbit" not in meta:
        _fail(path, "it has no LowBit metadata (it may be a regular checkpoint or LoRA)",
              "load it with the host's normal loader, or pick a file saved by LowBit's Save Quantized UNet")
    if not isinstance(meta["lowbit"], str):
        _fail(path, "the LowBit metadata is not a JSON string", "the file is corrupt; save it again")
    header = _parse_json(path, meta["lowbit"], "the LowBit metadata")
    if not isinstance(header, dict):
        _fail(path, "the LowBit metadata is not a JSON object", "the file is corrupt; save it again")
    if header.get("format") != FORMAT:
        _fail(path, f"unknown format {str(header.get('format'))[:80]!r}", "this file was not written by LowBit")
    v = header.get("format_version")
    if sthdr.lowbit_version_ok(v) and v >= 5:  # (a checksum in a header that claims an older version: migrate)
        if not isinstance(header.get("header_sha256"), str):
            _fail(path, "its header checksum (header_sha256) is missing", "the file is corrupt or was edited; save "
                        "it again with LowBit")
        if sthdr.header_digest(header) != header["header_sha256"]:
            _fail(path, "the header was edited or damaged: its checksum does not match", "the file is corrupt; copy "
                        "or save it again with LowBit")
    header = migrate(header, path)
    try:
        sthdr.check_index(index, 8 + n, size, dtypes=_DTYPES)
    except ValueError as exc:
        _fail(path, str(exc), "the file is truncated or padded; save it again" if isinstance(exc, sthdr.Length) else
              "the file is corrupt")
    return header, index


# ------------------------------------------------------------------------------------------ load
def _expect(path, index, key, dtype, shape):
    e = index.get(key)
    if e is None:
        _fail(path, f"tensor {key!r} is missing", "the file is incomplete or for another LowBit version")
    if _DTYPES[e["dtype"]] != dtype or tuple(e["shape"]) != tuple(shape):
        _fail(path, f"tensor {key!r} is {e['dtype']}{e['shape']}, expected {dtype}{list(shape)}", "the file is corrupt")


def _int_field(path, n, lm, key, lo, hi, allow_none=False):
    v = lm.get(key)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(path, f"layer {n!r}: {key}={repr(v)[:40]} is not an integer in {lo}..{hi}", "the file is corrupt")
    return v


def _bool_field(path, n, lm, key, default):
    v = lm.get(key, default)
    if not isinstance(v, bool):
        _fail(path, f"layer {n!r}: {key}={repr(v)[:40]} is not true/false", "the file is corrupt")
    return v


def _plan_layer(path, n, lm, mod, kinds):
    """Checked settings of one layer and the tensors it needs: {key: (dtype, shape)}."""
    from ..kernels.formats import get_format

    if not isinstance(lm, dict):
        _fail(path, f"layer {n!r} has malformed metadata (not an object)", "the file is corrupt")
    kind, shape = lm.get("kind"), lm.get("shape")
    if not isinstance(kind, str) or kind not in kinds or not isinstance(mod, kinds[kind]):
        _fail(path, f"layer {n!r} is a {type(mod).__name__} in this model but a {str(kind)[:40]} in the file",
              "pick the file made from this model's architecture")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        _fail(path, f"layer {n!r}: shape is not a list of integers", "the file is corrupt")
    shape = tuple(shape)
    if tuple(mod.weight.shape) != shape:
        _fail(path, f"layer {n!r} has shape {tuple(mod.weight.shape)} in this model but {shape} in the file",
              "pick the file made from this checkpoint's architecture (e.g. SD1.5 vs SDXL), or re-quantize")
    w_bits = _int_field(path, n, lm, "w_bits", 2, 8)
    a_bits = _int_field(path, n, lm, "a_bits", 2, 16)
    if 8 < a_bits < 16:
        _fail(path, f"layer {n!r}: a_bits={a_bits} (allowed 2..8, or 16 for float activations)", "the file is corrupt")
    g = _int_field(path, n, lm, "group_size", 1, 1 << 30, allow_none=True)
    fname = lm.get("w_format")
    try:
        fmt = get_format(fname)
        fmt.check(w_bits, g, shape)
    except ValueError as exc:
        _fail(path, f"layer {n!r}: {exc}", "load it with the LowBit version (or format plug-in) that wrote it")
    dyn = _bool_field(path, n, lm, "a_dynamic", False)
    has_bias = _bool_field(path, n, lm, "has_bias", False)
    scheduled = _bool_field(path, n, lm, "scheduled", True)
    bits_set = lm.get("a_bits_set", [])
    if not (isinstance(bits_set, list) and len(bits_set) <= 7
            and all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in bits_set)
            and len(set(bits_set)) == len(bits_set)):
        _fail(path, f"layer {n!r}: a_bits_set is not a list of distinct bit widths in 2..8", "the file is corrupt")
    tb = _int_field(path, n, lm, "time_bins", 0, MAX_TIME_BINS)
    static = a_bits != 16 and not dyn
    if dyn and a_bits == 16:
        _fail(path, f"layer {n!r}: dynamic activations with a_bits=16", "the file is corrupt")
    if static and (a_bits not in bits_set or tb < 1):
        _fail(path, f"layer {n!r}: static {a_bits}-bit activations but tables for bits {bits_set} over {tb} steps",
              "the file is corrupt; re-quantize and save again")
    if not static and (bits_set or tb):
        _fail(path, f"layer {n!r}: activation tables for a layer without static activation quantization",
              "the file is corrupt")
    if has_bias != (getattr(mod, "bias", None) is not None):
        _fail(path, f"layer {n!r}: {'a' if has_bias else 'no'} bias in the file but {'none' if has_bias else 'one'} "
                    "in this model", "pick the file made from this model's architecture")
    need = {f"{n}.{k}": v for k, v in fmt.storage(shape, w_bits, g).items()}
    if has_bias:
        need[f"{n}.bias"] = (torch.float32, (shape[0],))
    if bits_set:
        need[f"{n}.act.tgrid"] = (torch.float32, (tb,))
        for b in bits_set:
            need[f"{n}.act.scale_{b}"] = (torch.float32, (tb,))
            need[f"{n}.act.zero_{b}"] = (torch.float32, (tb,))
    settings = dict(w_format=fmt.name, w_bits=w_bits, a_bits=a_bits, group_size=g, a_dynamic=dyn,
                    a_bits_set=tuple(bits_set), time_bins=tb, scheduled=scheduled, has_bias=has_bias, shape=shape)
    return settings, need


def _check_layer_values(path, n, st, tensors, num_train_timesteps):
    from ..kernels.formats import get_format

    fmt = get_format(st["w_format"])
    names = fmt.storage(st["shape"], st["w_bits"], st["group_size"])
    wt = {k: tensors[f"{n}.{k}"] for k in names}
    problem = fmt.check_values(wt, st["w_bits"], st["group_size"])
    if problem:
        _fail(path, f"layer {n!r}: {problem}", "the file is corrupt or was saved from a diverged run")
    if st["has_bias"] and not torch.isfinite(tensors[f"{n}.bias"]).all():
        _fail(path, f"layer {n!r}: bias contains NaN/Inf", "the file is corrupt or was saved from a diverged run")
    if st["a_bits_set"]:
        g = tensors[f"{n}.act.tgrid"]
        if not torch.isfinite(g).all() or (g < 0).any() or (g > num_train_timesteps).any() \
                or (len(g) > 1 and not (g[1:] > g[:-1]).all()):
            _fail(path, f"layer {n!r}: act.tgrid must be increasing timesteps in [0, {num_train_timesteps}]",
                  "the file is corrupt")
        for b in st["a_bits_set"]:
            s, z = tensors[f"{n}.act.scale_{b}"], tensors[f"{n}.act.zero_{b}"]
            if not (torch.isfinite(s).all() and (s > 0).all()):
                _fail(path, f"layer {n!r}: act.scale_{b} holds a zero, negative, NaN or infinite step size",
                      "the file is corrupt or was saved from a diverged run")
            if not (torch.isfinite(z).all() and torch.equal(z, z.round()) and (z >= 0).all()
                    and (z <= (1 << b) - 1).all()):
                _fail(path, f"layer {n!r}: act.zero_{b} must hold integers in [0, {(1 << b) - 1}]",
                      "the file is corrupt")


def _model_out_channels(model: nn.Module) -> Optional[int]:
    from .profiles import profile_for

    if profile_for(model).out_channels is not None:  # the profile knows (ComfyUI's Flux: out_channels is packed)
        return profile_for(model).out_channels(model)
    cfg = getattr(model, "config", None)
    oc = getattr(cfg, "out_channels", None) if cfg is not None else None
    if oc is None and isinstance(cfg, dict):
        oc = cfg.get("out_channels")
    if isinstance(oc, int):
        return oc
    oc = getattr(model, "out_channels", None)  # ComfyUI's models keep it as an attribute
    if isinstance(oc, int) and not isinstance(oc, bool):
        return oc
    from .profiles import profile_for

    if not profile_for(model).structural_edges:  # a transformer: its last conv is the patch embedding, not the output
        return None
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    return None if last is None else last.out_channels


def _check_ptqd(path, meta, index, model, T):
    """PTQD tables: t [S] (increasing, in [0, T)), k/var/m [S], bias [S, C] with C the model's output channels."""
    pref = "__extra__.ptqd."  # (meta, its config included, was checked by check_header)
    shp = {k[len(pref):]: index[k]["shape"] for k in index if k.startswith(pref)}
    for k in ("t", "k", "bias", "var"):
        if k not in shp:
            _fail(path, f"its PTQD table {k!r} is missing", "the file is corrupt; save it again")
    S = shp["t"][0] if len(shp["t"]) == 1 else -1
    if S < 1:
        _fail(path, "its PTQD timestep table is empty or not 1-D", "the file is corrupt; re-collect the statistics")
    for k in ("k", "var", "m"):
        if k in shp and shp[k] != [S]:
            _fail(path, f"its PTQD table {k!r} has shape {shp[k]}, expected [{S}]", "the file is corrupt")
    C_out = _model_out_channels(model)
    if len(shp["bias"]) != 2 or shp["bias"][0] != S or (C_out is not None and shp["bias"][1] != C_out):
        _fail(path, f"its PTQD bias table has shape {shp['bias']}, expected [{S}, {C_out}] (steps, output channels of "
                    "this model)", "pick the file made from this model, or re-collect the PTQD statistics")
    for k in shp:
        if k not in ("t", "k", "bias", "var", "m"):
            _fail(path, f"its PTQD data has an unknown table {k!r}", "the file is corrupt")
        if index[pref + k]["dtype"] != "F32":
            _fail(path, f"its PTQD table {k!r} is {index[pref + k]['dtype']}, expected F32", "the file is corrupt")


def _check_ptqd_values(path, ts, T):
    for k, v in ts.items():
        if not torch.isfinite(v).all():
            _fail(path, f"its PTQD table {k!r} contains NaN/Inf",
                  "the file is corrupt or was saved from a diverged run")
    t = ts["t"]
    if (t < 0).any() or (t > T).any() or (len(t) > 1 and not (t.sort().values[1:] > t.sort().values[:-1]).all()):
        _fail(path, f"its PTQD timesteps must be distinct values in [0, {T}]", "the file is corrupt")
    if (ts["var"] < 0).any():
        _fail(path, "its PTQD residual variances are negative", "the file is corrupt")
    # Meaning (quant/ptqd.py's noise model eps_q = (1 + k) eps + m x_t + bias + r, the correction
    # (eps_q - m x_t - bias) / (1 + k)): the predictions and their quantization errors are of order 1 (a few units at
    # most, and |x_t| at most the largest noise level, a few hundred), so a fitted bias, input slope m, or error
    # standard deviation beyond 1e4 is no statistic of a working model: finite but huge values (3e38) would turn
    # every corrected prediction into inf. k is the slope of the error against the prediction: the fit stores
    # max(k, -0.5) (ptqd.K_MIN), and k = 1e3 would mean the quantized model predicts a thousand times the float one.
    from .ptqd import K_MIN

    bounds = {"k": (K_MIN - 1e-6, PTQD_MAX_K), "m": (-PTQD_MAX_BIAS, PTQD_MAX_BIAS),
              "bias": (-PTQD_MAX_BIAS, PTQD_MAX_BIAS), "var": (0.0, PTQD_MAX_BIAS ** 2)}
    for k, (lo, hi) in bounds.items():
        v = ts.get(k)
        if v is not None and v.numel() and not (float(v.min()) >= lo and float(v.max()) <= hi):
            _fail(path, f"its PTQD table {k!r} holds {float(v.min()):.3g}..{float(v.max()):.3g}, outside "
                        f"[{lo:g}, {hi:g}] (no statistic of a working model)",
                  "the file is corrupt or crafted, or was saved from a diverged run; re-collect the statistics")


def _set_float_dtype(qmodel: nn.Module) -> None:
    """Each quantized layer's ``float_dtype`` (what its ``weight`` stand-in reports, and the dtype undeploy gives its
    float weight): the dtype most of the model's other floating tensors have now (a model built in fp32 and filled
    from a bf16 file is bf16 around its quantized layers)."""
    from collections import Counter

    from .layers import QuantLayer, quant_layers

    seen = Counter()
    inside = {id(x) for layer in qmodel.modules() if isinstance(layer, QuantLayer) for x in layer.modules()}
    for m in qmodel.modules():
        if id(m) in inside:  # (a layer's scales, tables and packed integers keep their own dtypes)
            continue
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and t.is_floating_point() and not t.is_meta:
                seen[t.dtype] += t.numel()
    if seen:
        dtype = seen.most_common(1)[0][0]
        for _, layer in quant_layers(qmodel):
            layer.float_dtype = dtype


# ------------------------------------------------------------------------------------------ arch / float tensors
def _arch_value(path, key, v, depth=0):
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, int):
        if not -(1 << 20) <= v <= (1 << 20):
            _fail(path, f"its arch config {key!r} holds the integer {v}, outside -2^20..2^20", "the file is corrupt")
        if key in _ARCH_COUNT_KEYS and not 0 <= v <= 64:
            _fail(path, f"its arch config {key!r}={v} is not a count in 0..64", "the file is corrupt")
        return
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            _fail(path, f"its arch config {key!r} is not finite", "the file is corrupt")
        return
    if isinstance(v, str):
        if not _ARCH_STR_RE.match(v):
            _fail(path, f"its arch config {key!r} holds the string {v[:60]!r} (allowed: up to 100 letters, digits, "
                        "'_.:-')", "the file is corrupt or crafted")
        return
    if isinstance(v, list) and depth < 2 and len(v) <= 64:
        for x in v:
            _arch_value(path, key, x, depth + 1)
        return
    if isinstance(v, dict) and depth < 2 and len(v) <= 64:
        for k, x in v.items():
            if not _ARCH_STR_RE.match(k):
                _fail(path, f"its arch config {key!r} has the key {k[:60]!r}", "the file is corrupt or crafted")
            _arch_value(path, key, x, depth + 1)
        return
    _fail(path, f"its arch config {key!r} is not a number, string, or short list or object of them",
          "the file is corrupt")


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)  # name is one of ARCH_CLASSES (checked by the caller)


def check_arch(path, arch):
    """None, or {library, class, config} with its meaning checked: a known library; for diffusers a class of
    ``ARCH_CLASSES`` and config keys that are that class's ``__init__`` keywords; every value a bounded plain JSON
    scalar or short list (other libraries' configs are checked for meaning by their host's node)."""
    import inspect

    if arch is None:
        return None
    if not isinstance(arch, dict) or set(arch) != {"library", "class", "config"}:
        _fail(path, "its arch is not an object {library, class, config}", "the file is corrupt")
    lib, cls, cfg = arch["library"], arch["class"], arch["config"]
    if lib not in ARCH_LIBRARIES:
        _fail(path, f"its arch library {str(lib)[:40]!r} is not one of {list(ARCH_LIBRARIES)}",
              "load it with the LowBit version or host that wrote it")
    if not isinstance(cls, str) or not _ARCH_STR_RE.match(cls) or not isinstance(cfg, dict) or len(cfg) > 256:
        _fail(path, "its arch class is not a name or its config not an object of at most 256 keys",
              "the file is corrupt")
    for k, v in cfg.items():
        if not _ARCH_STR_RE.match(k) or k.startswith("_"):
            _fail(path, f"its arch config has the key {k[:60]!r}", "the file is corrupt or crafted")
        _arch_value(path, k, v)
    if lib == "diffusers":
        if cls not in ARCH_CLASSES:
            _fail(path, f"its arch class {cls!r} is not one LowBit builds ({', '.join(ARCH_CLASSES)})",
                  "load it onto the float model with load(model, path)")
        try:
            params = inspect.signature(_diffusers_class(cls).__init__).parameters
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            _fail(path, f"diffusers has no {cls} here ({str(exc)[:100]})", "install a diffusers that has it")
        kw = {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        bad = sorted(set(cfg) - kw)
        if bad:
            _fail(path, f"its arch config has {len(bad)} keys {cls} does not take (e.g. {bad[0][:60]!r})",
                  "the file is for another diffusers version; load it onto the float model with load(model, path)")
    return dict(library=lib, config=dict(cfg), **{"class": cls})


def _check_float_tensors(path, header, index) -> list:
    """The file's ``float_tensors`` list: distinct names, each stored as ``__float__.<name>`` (floating or integer
    dtype), and no unlisted ``__float__`` tensor."""
    names = header.get("float_tensors", [])
    if not (isinstance(names, list) and len(names) <= MAX_FLOAT_TENSORS
            and all(isinstance(n, str) and 0 < len(n) <= 1000 for n in names) and len(set(names)) == len(names)):
        _fail(path, f"its float_tensors is not a list of at most {MAX_FLOAT_TENSORS} distinct tensor names",
              "the file is corrupt")
    listed = set(names)
    for n in names:
        if FLOAT_PREFIX + n not in index:
            _fail(path, f"float tensor {n[:200]!r} is listed but not stored", "the file is incomplete; save it again")
    extra = [k for k in index if k.startswith(FLOAT_PREFIX) and k[len(FLOAT_PREFIX):] not in listed]
    if extra:
        _fail(path, f"it stores {len(extra)} float tensors its header does not list (e.g. {extra[0][:200]!r})",
              "the file is corrupt or crafted; save it again with LowBit")
    return names


def _read_tensors(path, index, keys) -> Dict[str, torch.Tensor]:
    """The tensors ``keys`` read with plain file reads into fresh tensors (no memory map: the file's pages do not
    count towards the process's memory next to the tensors). ``index`` was checked by ``read_header``."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        for k in keys:
            e = index[k]
            a, b = e["data_offsets"]
            t = torch.empty(tuple(e["shape"]), dtype=_DTYPES[e["dtype"]])
            if b > a:
                f.seek(base + a)
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(buf) != b - a:
                    raise OSError(f"short read of {k!r}")
            out[k] = t
    return out


def _assign(model: nn.Module, key: str, t: torch.Tensor):
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[name] = t


class _EmptyTensors:
    """Within: every parameter and buffer a module registers is moved to the meta device as it is registered (the
    float weights never take memory; the file fills them), while other tensors a constructor computes stay real:
    a tensor kept as a plain attribute (Lumina 2's rotary table ``freqs_cis``) is not in any file, and built under
    ``torch.device("meta")`` it would have no data at the first forward."""

    def __enter__(self):
        self._reg_p, self._reg_b = nn.Module.register_parameter, nn.Module.register_buffer
        reg_p, reg_b = self._reg_p, self._reg_b

        def register_parameter(mod, name, param):
            reg_p(mod, name, param)
            p = mod._parameters.get(name)
            if p is not None and not p.is_meta:
                mod._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        def register_buffer(mod, name, tensor, persistent=True):
            reg_b(mod, name, tensor, persistent=persistent)
            b = mod._buffers.get(name)
            if b is not None and not b.is_meta:
                mod._buffers[name] = b.to("meta")

        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter, nn.Module.register_buffer = self._reg_p, self._reg_b
        return False


def _meta_attributes(model: nn.Module) -> list:
    """Names of tensors held as plain module attributes (not parameters or buffers) that are on the meta device."""
    out = []
    for mname, m in model.named_modules():
        for k, v in vars(m).items():
            if k.startswith("_"):
                continue
            vs = v if isinstance(v, (list, tuple)) else [v]
            if any(torch.is_tensor(x) and x.is_meta for x in vs):
                out.append(f"{mname}.{k}" if mname else k)
    return out


def build_arch(path, arch) -> nn.Module:
    """The diffusers model of a checked ``arch`` with its parameters and buffers on the meta device (no memory
    for its weights; ``_EmptyTensors``)."""
    cls = _diffusers_class(arch["class"])
    try:
        with _EmptyTensors():
            model = cls(**arch["config"])
    except MemoryError:  # (parameters go to the meta device, so only a constructor's own tables can be this big)
        _fail(path, f"building its {arch['class']} ran out of memory (its arch config asks for sizes this machine "
                    "cannot hold)", "the file is corrupt; load it onto the float model with load(model, path)")
    except Exception as exc:  # whatever diffusers raises for a config it rejects (UnboundLocalError for an unknown
        # time_embedding_type, OverflowError, ImportError of an optional part...): one line, not its traceback
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        _fail(path, f"its arch config does not build a {arch['class']} ({type(exc).__name__}: {why})",
              "the file is corrupt or for another diffusers version; load it onto the float model with load(model, "
              "path)")
    return model.eval().requires_grad_(False)


def load_model(path: str, tune: bool = True, copy_budget_mb: Optional[float] = C.DEFAULT_COPY_BUDGET_MB) -> nn.Module:
    """Build the model recorded in the file at ``path`` on the meta device and fill it from the file alone: the
    float weights never exist in memory (peak memory is the quantized model's). Returns a deployed quantized
    model, the same as ``load(float_model, path)`` gives. The file must record its architecture (format 3, a
    diffusers class of ``ARCH_CLASSES``; files of other hosts load through their node). ``tune`` /
    ``copy_budget_mb``: the kernel autotuner, as ``deploy_`` arms it (``tune=False``: registry order)."""
    _check_tune(tune, copy_budget_mb)
    path = os.fspath(path)
    header, index = read_header(path)
    arch = check_arch(path, header.get("arch"))
    if arch is None or not header.get("float_tensors"):
        v = header.get("_migrated_from", FORMAT_VERSION)
        cls = (header.get("model") or {}).get("cls") if isinstance(header.get("model"), dict) else None
        why = f"written in file format {v}" if v < 3 else "saved without them (arch=False or a model LowBit " \
                                                            "cannot rebuild)"
        fix = ("load it onto the float model with load(model, path) and save the result again with this LowBit, "
               "which records them")
        if v >= 3 and arch is None and isinstance(cls, str) and cls not in ARCH_CLASSES:
            why = f"its model class {cls[:80]} is not one load_model builds: {', '.join(ARCH_CLASSES)}"
            fix = "load it onto its float model instead: load(model, path) with the model built from its checkpoint"
        _fail(path, f"it does not record the model's architecture and float tensors ({why})", fix)
    if arch["library"] != "diffusers":
        _fail(path, f"its architecture is a {arch['library']} model ({arch['class']})",
              "load it in that host (ComfyUI: Load Quantized UNet with no MODEL connected)")
    return _load(build_arch(path, arch), path, header, index, standalone=True, tune=tune,
                 copy_budget_mb=copy_budget_mb)


def load_empty(model: nn.Module, path: str, tune: bool = True,
               copy_budget_mb: Optional[float] = C.DEFAULT_COPY_BUDGET_MB) -> nn.Module:
    """Fill ``model``, built without weights (on the meta device, by a host's node), from the file at ``path``:
    quantized layers and every float tensor come from the file, which must hold them all. ``model`` becomes the
    returned quantized model (it is not copied). ``tune`` / ``copy_budget_mb``: as for ``load_model``."""
    _check_tune(tune, copy_budget_mb)
    path = os.fspath(path)
    header, index = read_header(path)
    if not header.get("float_tensors"):
        _fail(path, f"it holds no float tensors (written in file format {header.get('_migrated_from')})",
              "load it onto the float model, then save it again with this LowBit")
    return _load(model, path, header, index, standalone=True, tune=tune, copy_budget_mb=copy_budget_mb)


def _check_tune(tune, copy_budget_mb):
    from .api import check_tune_args

    check_tune_args("load", tune, copy_budget_mb)


def load(model, path: Optional[str] = None, tune: bool = True,
         copy_budget_mb: Optional[float] = C.DEFAULT_COPY_BUDGET_MB) -> nn.Module:
    """Apply the quantized UNet saved at ``path`` to ``model`` (the same full-precision architecture) and
    return a new deployed quantized model. ``model`` itself is never modified. ``load(path)`` loads without a
    float model (``load_model``). ``tune`` / ``copy_budget_mb``: the kernel autotuner, as ``deploy_`` arms it (not
    recorded in files: a loaded model is armed as asked here; ``tune=False``: registry order)."""
    if path is None:
        if isinstance(model, (str, os.PathLike)):
            return load_model(model, tune, copy_budget_mb)  # (checks the tuning arguments itself)
        raise ConfigError("load needs a file: load(model, path), or load(path) to build the model from the file")
    _check_tune(tune, copy_budget_mb)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load(model, path): model must be the full-precision torch module the file was made from, "
                          f"got {type(model).__name__}; to build the model from the file alone use load(path)")
    path = os.fspath(path)
    header, index = read_header(path)
    return _load(model, path, header, index, standalone=False, tune=tune, copy_budget_mb=copy_budget_mb)


def file_profile(path, header: dict, model: nn.Module) -> str:
    """The model profile a file's tables are keyed with: the recorded one (format 4; a name this LowBit must know,
    else LoadError), or for older files the profile that matched the model's class when they were written: the
    one matching now, unless it is newer than the file (``ModelProfile.replaces``: a class whose own profile came
    later was keyed with the one named there; e.g. NCSN++ files made before ``score-sde-ve`` hold tables keyed on
    sigma itself, which the log map would look up at other keys: found by audit)."""
    from .profiles import profile_for

    name = header.get("profile")
    if name is None:
        p = profile_for(model)
        return p.replaces or p.name
    _check_profile_name(path, name)
    return name


def _check_profile_name(path, name) -> None:
    from .profiles import PROFILES

    if name is not None and (not isinstance(name, str) or name not in PROFILES):
        _fail(path, f"its tables are keyed with the model profile {str(name)[:100]!r}, which this LowBit does not know",
              f"upgrade LowBit (known profiles: {', '.join(sorted(PROFILES))})")


def check_header(path, header: dict, index: dict):
    """The meaning of a LowBit header's model-independent fields, as loading checks them before building anything:
    ``arch`` (``check_arch``), ``float_tensors``, the configs (rebuilt from the allowlist only, each of its slot's
    type), ``num_train_timesteps``, the ``profile`` name, the ``tensor_sha256`` object (format 2 on), a non-empty
    ``layers`` object, the schedule's bits against the layers' activation tables, ``splits``, ``extras`` (an object;
    each registered extra's part through its ``check_meta``). Returns (config, schedule, num_train_timesteps, splits,
    float tensor names); raises ``LoadError`` naming the field. ``lowbit inspect`` runs it too, so it says what
    loading would say about a crafted header: checks that need no model belong here, in one place."""
    check_arch(path, header.get("arch"))
    fnames = _check_float_tensors(path, header, index)
    cfg = sched = None
    for slot, typ in (("config", C.QuantConfig), ("schedule", C.BitwidthSchedule)):
        obj = header.get(slot)
        if obj is None:
            continue
        try:
            val = C.from_json_obj(obj)
        except (ConfigError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            _fail(path, f"its {slot} is not valid ({str(exc)[:200]})",
                  "the file is corrupt or from an incompatible LowBit")
        if not isinstance(val, typ):
            _fail(path, f"its {slot} slot holds a {type(val).__name__}, expected a {typ.__name__}",
                  "the file is corrupt")
        if slot == "config":
            cfg = val
        else:
            sched = val
    T = header.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= 100_000:
        _fail(path, f"num_train_timesteps={str(T)[:40]!r} is not an integer in 1..100000", "the file is corrupt")
    if sched is not None and sched.num_train_timesteps != T:
        _fail(path, f"its schedule is for {sched.num_train_timesteps} timesteps, the model for {T}",
              "the file is corrupt")
    _check_profile_name(path, header.get("profile"))
    digests = header.get("tensor_sha256")
    if digests is not None or header.get("_migrated_from", FORMAT_VERSION) >= 2:
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            _fail(path, "its tensor checksums (tensor_sha256) are missing or not an object", "the file is corrupt")
    layers = header.get("layers")
    if not isinstance(layers, dict) or not layers:
        _fail(path, "it lists no quantized layers", "the file is corrupt")
    if sched is not None:  # (each layer's fields are checked for meaning against the model when loading; a layer
        # whose fields are malformed is left to that check, which names the field)
        want = set(sched.bits_used) - {16}
        for n, lm in layers.items():
            bits = lm.get("a_bits_set", []) if isinstance(lm, dict) else None
            if not (isinstance(bits, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in bits)):
                continue
            if lm.get("scheduled", True) is True and lm.get("a_bits") != 16 and lm.get("a_dynamic", False) is False \
                    and not want <= set(bits):
                _fail(path, f"its schedule uses activation bits {sorted(want)} but layer {n[:200]!r} has tables for "
                            f"{list(bits)} only", "the file is corrupt; re-quantize with that schedule")
    splits = header.get("splits") or {}
    if not (isinstance(splits, dict) and all(isinstance(v, list) and v and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v) for v in splits.values())):
        _fail(path, "its list of split convolutions is malformed", "the file is corrupt")
    extras = header.get("extras") or {}
    if not isinstance(extras, dict):
        _fail(path, "its extras are not an object", "the file is corrupt")
    for ename, meta in extras.items():
        if ename in EXTRAS and ename in EXTRA_CHECKS:  # (unknown extras are ignored: never read, never executed)
            try:
                EXTRA_CHECKS[ename](meta)
            except (ConfigError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                _fail(path, f"its {ename} data is malformed ({str(exc)[:200]})", "the file is corrupt; save it again")
    return cfg, sched, T, splits, fnames


def _load(model: nn.Module, path: str, header: dict, index: dict, standalone: bool, *, tune: bool,
          copy_budget_mb: Optional[float]) -> nn.Module:
    from .api import _set_module, structural_copy, tune_kernels_
    from .fuse import fuse_activations_
    from .layers import QLAYERS

    cfg, sched, T, splits, fnames = check_header(path, header, index)
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        _fail(path, "the target model is already quantized", "apply the file to the full-precision UNet")
    layers = header["layers"]
    fmods = dict(model.named_modules())
    for n, sizes in splits.items():
        m = fmods.get(n)
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.in_channels != sum(sizes):
            _fail(path, f"it does not match this model: split convolution {n!r} with {sum(sizes)} input channels is "
                        f"{'missing' if m is None else type(m).__name__ + ' ' + str(tuple(m.weight.shape))} here",
                  "pick the quantized file made from this checkpoint's architecture, or re-quantize this model")
    # the plan on a throwaway structure first: every check runs before the copy that is returned is built
    qmodel = model if standalone else structural_copy(model)  # never modify ``model`` (unless it is empty)
    apply_splits(qmodel, splits)
    mods = dict(qmodel.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        _fail(path, f"it does not match this model: {len(missing)} of its {len(layers)} layers are not in "
                    f"{type(model).__name__} (e.g. {missing[0][:200]!r})",
              "pick the quantized file made from this checkpoint's architecture, or re-quantize this model")
    kinds = {c.__name__: c for c in QLAYERS}
    plan, need = {}, {}
    for n, lm in layers.items():
        plan[n], nd = _plan_layer(path, n, lm, mods[n], kinds)
        need.update(nd)
    for key, (dt, shp) in need.items():
        _expect(path, index, key, dt, shp)
    fneed, recast = [], {}
    if standalone:  # the file must hold exactly the model's state outside the quantized layers
        own = {k: v for k, v in model_state(qmodel).items()
               if v is not None and not any(k.startswith(n + ".") for n in plan)}
        lacking = sorted(set(own) - set(fnames))
        if lacking:
            _fail(path, f"it lacks {len(lacking)} float tensors of this model (e.g. {lacking[0][:200]!r})",
                  "load it onto the float model with load(model, path) and save it again with this LowBit")
        surplus = sorted(set(fnames) - set(own))
        if surplus:
            _fail(path, f"it holds float tensor {surplus[0][:200]!r} that this model does not have",
                  "pick the file made from this architecture")
        for k, v in own.items():
            e = index[FLOAT_PREFIX + k]
            dt = _DTYPES[e["dtype"]]
            if tuple(e["shape"]) != tuple(v.shape) or (dt.is_floating_point != v.dtype.is_floating_point) \
                    or (not dt.is_floating_point and dt != v.dtype):
                _fail(path, f"float tensor {k[:200]!r} is {e['dtype']}{e['shape']}, this model holds "
                            f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}", "pick the file made from this "
                            "architecture")
        fneed = [FLOAT_PREFIX + k for k in own]
        # float parts in one dtype (a model cast whole: fp16 everywhere) or each in the dtype the model builds it in
        # (an fp32 model's fp64 position table) load as stored; a mix (fp16 parts next to fp32 parts, cast piecewise)
        # would fail at the first forward, so each floating tensor takes the dtype the model builds it in, as
        # ``load(model, path)`` casts the file's tensors to the given float model's
        fdt = {k: _DTYPES[index[FLOAT_PREFIX + k]["dtype"]] for k, v in own.items() if v.dtype.is_floating_point}
        if len(set(fdt.values())) > 1 and any(dt != own[k].dtype for k, dt in fdt.items()):
            recast = {k: own[k].dtype for k, dt in fdt.items() if dt != own[k].dtype}
    elif header.get("_migrated_from", FORMAT_VERSION) >= 3:  # onto a given float model, but the file holds the
        # float tensors it was saved with (format 3 on; older files list none): those are used
        own = {k: v for k, v in model_state(qmodel).items()
               if v is not None and not any(k.startswith(n + ".") for n in plan)}
        # the file describes every tensor of the model it was made from (its layers and its float tensors): a
        # quantizable layer of this model it describes neither way was not in that model (or its entry was moved
        # or removed), and would silently stay float here
        listed = set(fnames)
        undescribed = [n for n, m in mods.items() if n not in plan and not isinstance(m, (QuantLayer,
                       ChannelSplitConv2d)) and qlayer_class_for(m) is not None
                       and isinstance(getattr(m, "weight", None), torch.Tensor) and not m.weight.is_meta
                       and f"{n}.weight" not in listed]
        if undescribed:
            _fail(path, f"it does not describe {len(undescribed)} of this model's layers, neither as quantized "
                        f"layers nor as float tensors (e.g. {undescribed[0][:200]!r}): it was made from another model "
                        "or edited",
                  "pick the quantized file made from this checkpoint's architecture, or re-quantize this model")
        surplus = sorted(set(fnames) - set(own))
        if surplus:  # a tensor the file's model had and this one has not: another architecture (or host's ops)
            _fail(path, f"it holds float tensor {surplus[0][:200]!r} that this model does not have (it was made from "
                        "another architecture)", "pick the file made from this model's architecture, or re-quantize "
                        "this model")
        for k in sorted(set(own) & set(fnames)):
            e = index[FLOAT_PREFIX + k]
            if tuple(e["shape"]) != tuple(own[k].shape):
                _fail(path, f"float tensor {k[:200]!r} is {e['shape']}, this model holds {list(own[k].shape)}",
                      "pick the file made from this architecture")
            dt, v = _DTYPES[e["dtype"]], own[k]
            if dt.is_floating_point != v.dtype.is_floating_point or (not dt.is_floating_point and dt != v.dtype):
                # (as loading alone refuses it: an integer, bool or complex tensor would be cast silently)
                _fail(path, f"float tensor {k[:200]!r} is {e['dtype']}{e['shape']}, this model holds "
                            f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}", "pick the file made from this "
                            "architecture")
        fneed = [FLOAT_PREFIX + k for k in sorted(set(own) & set(fnames))]
    extras = header.get("extras") or {}  # (an object, each known extra's header part checked: check_header)
    extra_keys = [k for k in index if k.startswith("__extra__.")]
    if len(extra_keys) > MAX_EXTRA_TENSORS:
        _fail(path, f"it has {len(extra_keys)} extra tensors (at most {MAX_EXTRA_TENSORS})", "the file is corrupt")
    undeclared = [k for k in extra_keys if k.split(".")[1] not in extras]  # (declared but unknown extras: ignored)
    if undeclared:
        _fail(path, f"it holds {len(undeclared)} extra tensors its header does not declare (e.g. "
                    f"{undeclared[0][:200]!r})", "the file is corrupt or crafted; save it again with LowBit")
    unknown = [k for k in index if k not in need and not k.startswith("__extra__.") and not k.startswith(FLOAT_PREFIX)]
    if unknown:
        _fail(path, f"it holds {len(unknown)} tensors no layer uses (e.g. {unknown[0][:200]!r})",
              "the file is corrupt or crafted; save it again with LowBit")
    if "ptqd" in extras and "ptqd" in EXTRAS:
        _check_ptqd(path, extras["ptqd"], index, model, T)
    wanted = list(need) + [k for k in extra_keys if k.split(".")[1] in extras and k.split(".")[1] in EXTRAS] + fneed
    try:
        tensors = _read_tensors(path, index, wanted)  # tensors no one uses are never read
    except (OSError, ValueError, RuntimeError) as exc:
        _fail(path, f"reading tensors failed ({str(exc)[:200]})", "the file is corrupt; save it again")
    digests = header.get("tensor_sha256")  # (an object of strings from format 2 on: check_header)
    if digests is not None:
        for k, v in tensors.items():
            if not isinstance(digests.get(k), str) or tensor_digest(v) != digests[k]:
                _fail(path, f"tensor {k[:200]!r} does not match its checksum (the data changed after saving)",
                      "the file is corrupt; copy or save it again")
    for n, st in plan.items():
        _check_layer_values(path, n, st, tensors, T)
    if "ptqd" in extras and "ptqd" in EXTRAS:
        _check_ptqd_values(path, {k[len("__extra__.ptqd."):]: v for k, v in tensors.items()
                                  if k.startswith("__extra__.ptqd.")}, T)
    for k in list(fneed):
        t = tensors[k]
        if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            if not standalone:  # onto a given model: its own tensor stays (e.g. a buffer a checkpoint does not
                fneed.remove(k)  # fill, uninitialised memory in unused parts: differs between processes anyway)
                continue
            _fail(path, f"float tensor {k[len(FLOAT_PREFIX):][:200]!r} contains NaN/Inf",
                  "the file is corrupt or was saved from a diverged run")
    for k, dt in recast.items():  # (finite, checked above)
        t = tensors[FLOAT_PREFIX + k] = tensors[FLOAT_PREFIX + k].to(dt)
        if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            _fail(path, f"float tensor {k[:200]!r} overflows {str(dt).replace('torch.', '')}, the dtype this model "
                        "builds it in (the file's float tensors mix float dtypes)", "save the model cast to one dtype")

    from ..kernels.formats import get_format

    ctx = QuantContext(T)
    ctx.profile = file_profile(path, header, qmodel)
    ctx = attach_context(qmodel, ctx)
    for n, st in plan.items():
        src = qmodel.get_submodule(n)
        cls = qlayer_class_for(src)
        layer = cls(src, w_bits=st["w_bits"], a_bits=st["a_bits"], group_size=st["group_size"],
                    a_dynamic=st["a_dynamic"], ctx=ctx, a_bits_set=st["a_bits_set"] or None,
                    time_bins=max(st["time_bins"], 1), name=n, scheduled=st["scheduled"], init_scale=False,
                    w_format=st["w_format"])
        fmt = get_format(st["w_format"])
        wt = {k: tensors[f"{n}.{k}"] for k in fmt.storage(st["shape"], st["w_bits"], st["group_size"])}
        try:
            layer.set_packed(fmt.from_storage(wt, st["shape"], st["w_bits"], st["group_size"]))
        except ValueError as exc:
            _fail(path, f"layer {n!r}: {exc}", "the file is corrupt")
        layer.bias = nn.Parameter(tensors[f"{n}.bias"], requires_grad=False) if st["has_bias"] else None
        if layer.act is not None:
            layer.act.tgrid = tensors[f"{n}.act.tgrid"]
            for b in st["a_bits_set"]:
                setattr(layer.act, f"scale_{b}", nn.Parameter(tensors[f"{n}.act.scale_{b}"], requires_grad=False))
                setattr(layer.act, f"zero_{b}", nn.Parameter(tensors[f"{n}.act.zero_{b}"], requires_grad=False))
        layer._params_to_buffers()
        _set_module(qmodel, n, layer)
    _set_state(qmodel, ctx, cfg, sched, splits)
    differ = []
    for k in fneed:
        t = tensors.pop(k)
        key = k[len(FLOAT_PREFIX):]
        if not standalone:  # in the model's dtype (a checkpoint loaded in fp16 keeps running in fp16)
            mine = own[key].detach()
            t = t.to(mine.dtype)
            ref = mine.cpu()
            if t.is_floating_point() and not torch.allclose(t.float(), ref.float(), rtol=1e-2, atol=1e-6) \
                    or not t.is_floating_point() and not torch.equal(t, ref):
                differ.append(key)
            t = t.to(mine.device)
        _assign(qmodel, key, t)
    if differ:
        warnings.warn(f"{path}: {len(differ)} float tensors of the given model differ from the ones saved in the "
                      f"file (e.g. {differ[0][:200]!r}): it was made from another checkpoint; the file's are used, "
                      "so the result is the saved model", stacklevel=3)
    if standalone:
        for k, t in list(qmodel.named_parameters()) + list(qmodel.named_buffers()):
            if t.is_meta:
                _fail(path, f"the model's tensor {k[:200]!r} is not in the file (a buffer the model does not save)",
                      "load it onto the float model with load(model, path)")
        empty = _meta_attributes(qmodel)
        if empty:
            _fail(path, f"the model's tensor attribute {empty[0][:200]!r} (not a parameter or buffer) has no data "
                        "when the model is built without weights", "load it onto the float model with load(model, "
                        "path)")
    for ename, meta in extras.items():
        if ename not in EXTRAS:
            continue  # unknown extras are ignored (never read, never executed)
        pref = f"__extra__.{ename}."
        ts = {k[len(pref):]: v for k, v in tensors.items() if k.startswith(pref)}
        try:
            EXTRAS[ename][1](qmodel, meta, ts)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, ConfigError) as exc:
            _fail(path, f"its {ename} data is malformed ({str(exc)[:200]})", "the file is corrupt; save it again")
    qmodel.eval()
    from .transaction import check_finite

    check_finite(qmodel, "load")
    _set_float_dtype(qmodel)
    fuse_activations_(qmodel)  # as deploy_ does: a GELU after a Linear in its kernel's epilogue
    # each layer's kernel chosen by measured speed, as deploy_ does by default
    return tune_kernels_(qmodel, copy_budget_mb) if tune else qmodel
