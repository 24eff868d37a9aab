"""``vnni`` backend (CPU, priority 25): a fused int8 Linear for x86 CPUs with VNNI, built once on this machine.

The other CPU paths make several passes per quantized Linear: the activation quantizer writes uint8 codes, the GEMM
reads them, and (``cpu``) an int32 accumulator is written and read again by the dequantize epilogue. Where K is small
(the zoo's DiT and text-conditioned UNets: K = 32-256) a layer is memory-bound and those passes cost more than the
int8 arithmetic saves (bench/README "Session 19"). This backend does it in one pass (``csrc/vnni_linear.cpp``):

* a block of 32 rows is quantized into a small buffer with exactly the codes of the other CPU paths: the fused
  quantizer's (``torch.quantize_per_tensor``: ``clamp(nearbyint(x * (1/scale) + zp), 0, qmax)``, one fused
  multiply-add), or with ``LOWBIT_CPU_EXACT_ACT_QUANT=1`` the reference's (``clamp(nearbyint(x / scale) + zp, 0,
  qmax)``);
* the ``vpdpbusd`` sums stay in registers;
* the epilogue ``sx * sw[n] * (acc - zp * rowsum[n]) + bias[n]`` writes fp32, with a feed-forward's GELU (erf or
  tanh) applied there, or GEGLU's ``a * gelu(g)`` over the halves of the row block's output (kernels/post.py; erf by
  Abramowitz & Stegun 7.1.26, absolute error < 1.5e-7, e^x by a degree-6 polynomial: within 2e-6 of torch's GELU,
  far inside the quantization error).

No AMX: at K >= 128 oneDNN's int8 GEMM (AMX tiles on CPUs that have them) is faster, and the autotuner keeps it.

Takes: Linear, fp32 inputs, static per-tensor activations (8 bits or fewer), per-channel int8 weights, and int4
weights when int8 copies are kept (as oneDNN: ``LOWBIT_CPU_CACHE_INT4=1`` or the autotuner's per-weight copy). Keeps
one int8 copy of each weight in VNNI order (``pw.cache["vnni.w"]``, +1 byte per weight, dropped when another backend
wins the weight's shapes) and its row sums.

Built with the local C++ compiler through ``torch.utils.cpp_extension`` at the first call that could use it (about
30 s on a 2-core machine, logged; then cached under torch's extension folder, keyed by a digest of the source and
flags). Two builds of the one source: AVX512-VNNI (16 lanes: Intel server CPUs from Cascade Lake, AMD from Zen 4) and
AVX2 + AVX-VNNI (8 lanes: Intel client CPUs from Alder Lake, which have no AVX512); the best one the CPU runs is
used (``/proc/cpuinfo``). It declines, with the reason, where the CPU has neither, where no compiler or ninja
is found, or where the build fails; ``LOWBIT_DISABLE_BACKENDS=vnni`` skips it and its build.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch

from . import cpu as _cpu  # (the CPU paths' int8 weights, scales, codes rule; cpu does not import this module)
from .formats import PackedWeight
from .registry import register_backend

backend = register_backend("vnni", priority=25,
                           description="fused VNNI int8 Linear: quantize + GEMM + epilogue in one pass (CPU with "
                                       "AVX512-VNNI or AVX-VNNI, built once with the local compiler)")

_log = logging.getLogger("lowbit.kernels")
SOURCE = Path(__file__).resolve().parent / "csrc" / "vnni_linear.cpp"
# the two builds of the source, best first: (CPU flags it needs, as /proc/cpuinfo names them; compiler flags)
VARIANTS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
               ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-fopenmp")),
    "avx2": (("avx2", "fma", "avx_vnni"), ("-O3", "-mavx2", "-mfma", "-mavxvnni", "-DLOWBIT_V256", "-fopenmp")),
}
MAX_K = 65536  # |sum of K products u8 x s8| < 255 * 128 * K stays below 2^31

_lock = threading.Lock()
_state: dict = {}  # variant -> the loaded module, or the reason (str) it is not available; "best": cpu_variant()


def _cpu_flags():
    """This CPU's feature flags, or the reason they cannot be known / the kernel cannot run here (str)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for Linux x86-64 with VNNI; this is {platform.system()} {platform.machine()}"
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError as exc:
        return f"cannot read /proc/cpuinfo ({exc})"
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return "no CPU flags in /proc/cpuinfo"


def cpu_variant():
    """(the best build this CPU runs, "") or (None, why none); read once per process (kept in ``_state``)."""
    best = _state.get("best")
    if best is None:
        flags = _cpu_flags()
        if isinstance(flags, str):
            best = (None, flags)
        else:
            best = next(((name, "") for name, (need, _) in VARIANTS.items() if all(f in flags for f in need)),
                        (None, "this CPU has neither AVX512-VNNI nor AVX-VNNI (avx512_vnni / avx_vnni in "
                               "/proc/cpuinfo)"))
        _state["best"] = best
    return best


def _toolchain_lacks() -> str:
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # pragma: no cover - torch always has it
        return f"torch.utils.cpp_extension unavailable ({exc})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH) to build it"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (torch builds C++ extensions with it: pip install ninja)"
    return ""


def extension(variant=None):
    """The built module (``lanes``, ``pack``, ``linear``, ``codes``, ``post``) of ``variant`` (default: the best
    this CPU runs), or None; built at the first call in a process, once per variant. Building a variant the CPU
    cannot run is allowed (tests compile both), running it is not."""
    if variant is None:
        variant, why = cpu_variant()
        if variant is None:
            _state.setdefault(None, why)
    hit = _state.get(variant)
    if hit is not None:
        return None if isinstance(hit, str) else hit
    with _lock:
        hit = _state.get(variant)
        if hit is not None:
            return None if isinstance(hit, str) else hit
        why = _toolchain_lacks()
        if not why:
            try:
                _state[variant] = _build(variant)
                return _state[variant]
            except Exception as exc:  # a failed build is a declined backend, never a failed call
                first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                why = f"building csrc/vnni_linear.cpp ({variant}) failed: {first[:200]}"
                _log.warning("lowbit.kernels: vnni backend off: %s", why)
        _state[variant] = why
        return None


def unavailable() -> str:
    """Why the backend is off on this machine ("" once it is built and loaded)."""
    if extension() is not None:
        return ""
    variant, why = cpu_variant()
    return why or _state.get(variant, "")


backend.unavailable = unavailable


STALE_LOCK_S = 300  # a build takes ~30 s; a lock file this old was left by a process killed while building


def wait_for_lock(build_dir, stale_s: float = STALE_LOCK_S, poll_s: float = 0.5) -> bool:
    """Return once the build folder has no ``lock`` file: another process's build finishing, or, once the lock is
    older than ``stale_s``, removing it. torch's builder (where it locks by the file's existence, :func:`baton_lock`)
    waits for that file to go away, forever, so a process killed during a build (a ComfyUI window closed at its
    first quantized generation) would make every later process hang at its first quantized layer. True if a stale
    lock was removed."""
    lock = Path(build_dir) / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return False  # no lock (or none any more)
        if age >= stale_s:
            try:
                lock.unlink()
            except OSError:
                return False
            _log.warning("lowbit.kernels: removed a stale build lock (%.0f s old, left by an interrupted build): %s",
                         age, lock)
            return True
        time.sleep(poll_s)


def baton_lock(cpp_extension) -> bool:
    """torch's builder locks its build folder by the ``lock`` file's existence (``FileBaton``, torch <= 2.13: a file
    left by a killed build blocks forever, see :func:`wait_for_lock`), not by an OS lock on it (``FileLock``, torch
    2.14: released when its process dies; the file stays, and must not be touched)."""
    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def _build(variant: str):
    from torch.utils import cpp_extension

    cflags = VARIANTS[variant][1]
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join(cflags).encode() + torch.__version__.encode()).hexdigest()[:12]
    name = f"lowbit_vnni_{variant}_{digest}"
    built = False
    try:  # (a private helper of torch's; without it the lock check is skipped and the message always says "built")
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if baton_lock(cpp_extension):
            wait_for_lock(build_dir)
        built = (build_dir / f"{name}.so").is_file()
    except Exception:
        pass
    t0 = time.perf_counter()
    if built:
        _log.info("lowbit.kernels: loading the fused VNNI int8 Linear (%s)", name)
    else:
        _log.warning("lowbit.kernels: compiling the fused VNNI int8 Linear (%s), once per machine, about 30 s "
                     "(LOWBIT_DISABLE_BACKENDS=vnni skips it)", name)
    # -fopenmp compiles at::parallel_for's OpenMP loop; the runtime is torch's own libgomp, already loaded
    ext = cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(cflags), verbose=False)
    _log.info("lowbit.kernels: vnni ready in %.1f s", time.perf_counter() - t0)
    return ext


# ----------------------------------------------------------------------------------------------- weights
def packed(pw: PackedWeight):
    """(VNNI-ordered int8 weight, int32 row sums, fp32 per-channel scale), cached in ``pw.cache``."""
    hit = pw.cache.get("vnni.w")
    if hit is None:
        w8 = _cpu._int8_weight(pw, keep=False).reshape(pw.N, pw.K)
        hit = pw.cache["vnni.w"] = (extension().pack(w8), w8.sum(1, dtype=torch.int32),
                                    _cpu._per_channel_scale(pw).float().contiguous())
    return hit


def _check_weight(pw: PackedWeight) -> str:
    if pw.device.type != "cpu":
        return f"weight is on {pw.device}"
    if pw.fmt.backends is not None:
        return f"weight format {pw.format!r} is not a kernel layout"
    if pw.group_size is not None and pw.group_size < pw.K:
        return (f"group-wise weight (group_size={pw.group_size}): the fused kernel scales per channel "
                "(use group_size=None, or the triton backend)")
    if pw.bits > 8:
        return f"{pw.bits}-bit weight (8 or fewer)"
    if pw.K > MAX_K:
        return f"K = {pw.K} input features: the int32 sums could overflow beyond {MAX_K}"
    return ""


def _supports(x, pw, bias, act):
    why = ""
    if x.device.type != "cpu":
        why = f"x is on {x.device}; this backend runs on CPU tensors"
    elif x.dtype != torch.float32:
        why = f"x dtype {x.dtype}: the fused kernel reads fp32 (bf16 inputs take the onednn / cpu / dense paths)"
    elif x.numel() == 0:
        why = "empty input"
    elif act is None:
        why = "weight-only call (the fused kernel quantizes activations)"
    elif act.dynamic:
        why = "dynamic activations: the fused kernel takes one static per-tensor scale"
    elif bias is not None and bias.dtype != torch.float32:
        why = f"bias dtype {bias.dtype} (fp32)"
    else:
        why = _check_weight(pw)
        if not why and pw.bits <= 4 and not _cpu.cache_int4(pw):
            why = ("int4 weight: the fused kernel runs on an int8 copy, kept only with LOWBIT_CPU_CACHE_INT4=1 or the "
                   "autotuner's copy")
        if not why:
            why = unavailable()
    return (False, why) if why else (True, "")


_POSTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "geglu": 3}  # csrc/vnni_linear.cpp's epilogue codes


@backend.op("linear", supports=_supports, posts=("gelu", "gelu_tanh", "geglu"))
def linear(x, pw, bias=None, act=None, post=None):
    wp, rowsum, sw = packed(pw)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = extension().linear(x2, wp, rowsum, sw, bias, pw.N, float(act.scale), int(act.zero_point), int(act.qmax),
                             _cpu.exact_act_quant(), _POSTS[post])
    return out.reshape(*lead, out.shape[-1])
