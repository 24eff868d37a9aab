"""Per-shape kernel choice by measured speed (issue 16: a quantized model is never slower than float).

Deployment attaches the tuner to a weight (:func:`attach`, or :func:`attach_model` for every packed weight of a
model). From then on ``ops.linear`` / ``ops.conv2d`` on that weight do not take the registry's priority order but the
backend that was **measured** fastest for the call's shape on this machine:

* candidates: every enabled backend that accepts the call (``supports``), except the eager reference (it
  dequantizes at every call; ``dense`` does the same float computation with the weight dequantized once), plus
  ``dense`` (:mod:`.dense`, the float path of the same quantized weights) unless float fallback is off;
* measurement: each candidate runs once (building its caches: oneDNN blobs, int8 copies of int4 weights, the
  float copy), then ``rounds`` rounds in which the candidates alternate (so the load of a shared machine hits
  all alike); the minimum per candidate counts. The registry's own choice stays unless another candidate is
  faster by more than ``MARGIN`` (10 %). The call that tuned returns the winner's output;
* check: at that first call each candidate's output is compared once with the eager reference's (:func:`_wrong`);
  one off by more than ``CHECK_TOL`` is never served for that shape (a ``RuntimeWarning`` names it; the decision
  lists it under ``wrong``), and a shape every kernel gets wrong runs on the reference;
* cache: in memory, keyed by (candidate backends, format, shapes, dtype, threads, device); optionally also a JSON
  file (``LOWBIT_AUTOTUNE_CACHE=1`` for ``$XDG_CACHE_HOME/lowbit/autotune.json``, or a path), keyed in addition
  by the CPU model and torch version, so a second process skips the measurements;
* memory: the losers' caches are dropped from the weight (a backend's caches carry its name: ``cpu.*``,
  ``onednn.*``, ``dense.*``). With tuning, an int4 weight the integer kernels win keeps one int8 copy (oneDNN's
  prepacked blob, or the cpu backend's unpacked copy, which saves unpacking at every call: +1 byte per weight), and
  a layer that falls back to float keeps a float copy (+4 bytes per weight for fp32 inputs, +2 for bf16).
  :func:`summary` reports the bytes;
* budget: the copies one model's tuned weights keep together are bounded (:class:`Budget`, ``attach_model``'s
  ``budget_bytes``; ``quant.deploy_`` gives 64 MiB by default). A weight is admitted at its first call if the most its
  copies can take (5 bytes per weight: a float copy and an int8 copy) fits in what is left, and charged at least
  that much. A weight that does not fit is not tuned: it runs in registry order with no copies, as an untuned
  model does. Small models (whose small layers are where integer kernels lose to float GEMMs) are tuned whole; a
  large model spends the budget on its first layers called and keeps the packed size elsewhere.

``LOWBIT_AUTOTUNE=0`` turns tuning off (registry order, as untuned: set before a weight's first call, it keeps no
copies; set later, the copies already made stay); ``LOWBIT_AUTOTUNE_DENSE=0`` keeps the integer
kernels only (no float copies: memory first); ``LOWBIT_BACKEND`` / ``forced_backend`` always win over the tuner.

Report: ``summary(model)`` -> dict (layers per backend, per-layer measured times, cache bytes) and
``format_summary(summary(model))`` -> a few lines a CLI or a node can print.
"""
from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import dense  # noqa: F401  (registers the dense backend)
from . import registry
from .formats.base import _nested_bytes

__all__ = ["attach", "attach_model", "Budget", "is_attached", "usable", "run", "summary", "format_summary", "clear",
           "decisions", "enabled", "active", "chosen", "Choice", "path_choice", "choose_path", "settle", "set_mode",
           "ROUNDS"]

ROUNDS = 3  # timed rounds per candidate (after one warm-up call each)
# the registry's own choice is kept unless another candidate is measured faster by more than this fraction
# (per-layer timings on a shared machine are noisy, and a layer timed alone runs with hotter caches than in a model)
MARGIN = 0.10
_SLOW_CALL_S = 0.5  # a candidate slower than this gets one timed round only
# call shapes tuned per weight (and decisions kept in this process): inputs whose shapes keep changing (variable
# token counts) would otherwise grow the tables, and pay a measurement, at every new shape; beyond the limit a new
# shape runs in registry order, untuned
MAX_SHAPES = 256
MAX_DECISIONS = 65536
_KEEP_CACHE = ("autotune", "cache_int4")

_MODES = ("tuned", "float", "integer")


class Choice:
    """The measured choice for one call shape of one weight: the interchangeable implementations (``options``:
    name -> function of the same arguments), which one was measured fastest (``tuned``), which is the float path
    (``float_name``: the dense backend, or a layer's fused float computation) and which the integer kernels take
    in registry order (``int_name``). ``impl`` / ``name``: the one in use, set by :meth:`use` (the tuned one unless a
    whole-model mode says otherwise, see :func:`settle`). Calling it calls ``impl``."""

    __slots__ = ("impl", "name", "options", "tuned", "float_name", "int_name", "times")

    def __init__(self, options: dict, tuned: str, float_name: Optional[str], int_name: Optional[str],
                 times: Optional[dict] = None, mode: str = "tuned"):
        self.options, self.tuned, self.float_name, self.int_name = options, tuned, float_name, int_name
        self.times = times or {}
        self.use(mode)

    def use(self, mode: str = "tuned"):
        n = {"float": self.float_name, "integer": self.int_name}.get(mode) or self.tuned
        if n not in self.options:
            n = self.tuned
        self.name, self.impl = n, self.options[n]
        return self

    def __call__(self, *args):
        return self.impl(*args)

    def __repr__(self):
        return f"Choice({self.name}; tuned {self.tuned}, options {sorted(self.options)})"


_DECISIONS: Dict[str, dict] = {}  # key -> {"backend": name, "times": {name: seconds}}
_FILE_LOADED: Dict[str, bool] = {}
_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------- switches
def enabled() -> bool:
    return registry.env_flag("LOWBIT_AUTOTUNE", True)


def _dense_allowed() -> bool:
    return registry.env_flag("LOWBIT_AUTOTUNE_DENSE", True)


# bytes per weight a tuned layer may keep: the float path's copy for fp32 inputs (4) and an int8 copy (1; oneDNN's
# prepacked blob or an unpacked int4 weight) for a weight whose call shapes choose both paths
_RESERVE_PER_WEIGHT = 5


class Budget:
    """Bytes of backend caches (float copies for the float path, int8 copies of int4 weights, prepacked blobs) that
    the tuned weights of one model may keep together; ``limit`` None: no bound. Shared by the model's weights
    (their ``tune`` arming holds it), it also holds the model's whole-model tuning state (``state``: the mode
    :func:`set_mode` / :func:`settle` fixed, kept through device moves); a copied or unpickled model gets its own,
    empty one.

    Each admitted weight is charged the larger of its reservation (5 bytes per weight: a float copy and an int8
    copy) and what its caches hold after each decision, so admissions are bounded by the reservations whatever
    the first decisions kept. Charges belong to the weight's cache as it was (``cache_id``): after a device move or
    a state-dict load drops the caches, the weight is admitted again and its old charge no longer counts. Caches
    can pass the reservation in one case, then charged as they are: a split convolution's fused float copy, kept
    with its first part, spans all its parts."""

    def __init__(self, limit: Optional[int]):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"Budget: limit must be a non-negative number of bytes or None, got {limit!r}")
        self.limit = limit
        self._charges = weakref.WeakKeyDictionary()  # weight -> (its cache_id, reservation, bytes charged)
        self.state: dict = {}  # the model's whole-model tuning state (set_mode's mode, settle's report)

    def __reduce__(self):  # copies (deepcopy, pickle) start empty: their caches are rebuilt on use
        return (Budget, (self.limit,))

    def used(self) -> int:
        return sum(c[2] for pw, c in list(self._charges.items()) if c[0] == getattr(pw, "cache_id", c[0]))

    def admit(self, pw) -> bool:
        """Whether ``pw`` may be tuned: the most its copies can take fits in what is left (then reserved)."""
        if self.limit is None:
            return True
        self._charges.pop(pw, None)  # (an earlier charge belongs to caches that are gone)
        reserve = math.prod(pw.shape) * _RESERVE_PER_WEIGHT
        if self.used() + reserve > self.limit:
            return False
        self._charges[pw] = (getattr(pw, "cache_id", None), reserve, reserve)
        return True

    def charge(self, pw):
        """Charge ``pw``'s caches as they are now (after a decision dropped the losers'), at least its reservation."""
        c = self._charges.get(pw) if self.limit is not None else None
        if c is not None and c[0] == getattr(pw, "cache_id", None):
            self._charges[pw] = (c[0], c[1], max(c[1], pw.nbytes(include_cache=True) - pw.nbytes(include_cache=False)))

    def __repr__(self):
        lim = "none" if self.limit is None else f"{self.limit / 2**20:.1f} MiB"
        return f"Budget(limit {lim}, used {self.used() / 2**20:.2f} MiB)"


def _arming(pw):
    """(cache_int4, budget) the weight was attached with, or None."""
    arm = getattr(pw, "tune", None) if hasattr(pw, "tune") else pw.cache.get("autotune.arm")
    if arm is None or arm is False:
        return None
    return arm if isinstance(arm, tuple) else (bool(arm), None)


def _reset(pw, arm=None):
    """Drop ``pw``'s caches (a new ``cache_id`` for a PackedWeight; a duck-typed weight keeps its arming ``arm``)."""
    if hasattr(pw, "reset_cache"):
        pw.reset_cache()
    else:
        pw.cache.clear()
        if arm is not None:
            pw.cache["autotune.arm"] = arm


def attach(pw, cache_int4: bool = True, budget: Optional[Budget] = None):
    """Tune ``pw``'s calls from now on. ``cache_int4``: keep an int8 copy of an int4 weight (see module doc);
    ``budget``: the :class:`Budget` its copies count against (shared with the rest of its model), or None: none.
    Only arms it: the weight is admitted (and the backends told to keep copies) at its first tuned call, so
    ``LOWBIT_AUTOTUNE=0`` from the start leaves it exactly as untuned."""
    if "autotune.fits" in pw.cache:  # armed before: choices and copies go, admitted again at its next call
        _reset(pw)
    if hasattr(pw, "tune"):  # survives a cache reset on device moves and copies (PackedWeight.tune)
        pw.tune = (bool(cache_int4), budget)
    else:
        pw.cache["autotune.arm"] = (bool(cache_int4), budget)
    return pw


def is_attached(pw) -> bool:
    """Whether ``pw``'s calls are tuned: armed (:func:`attach`), and admitted by its budget (decided at the first
    ask after each cache reset; a weight refused runs in registry order without copies, as if never attached)."""
    c = pw.cache
    fits = c.get("autotune.fits")
    if fits is not None:
        return fits
    arm = _arming(pw)
    if arm is None:
        return False
    with _LOCK:
        fits = arm[1] is None or arm[1].admit(pw)
        if fits:
            c["autotune"] = True  # (the backends' and the layer's sign of a tuned weight)
            if arm[0] and pw.bits <= 4:
                c["cache_int4"] = True
        else:  # as untuned: registry order, no copies (also none an earlier arming made)
            _reset(pw, arm)
            c = pw.cache
        c["autotune.fits"] = fits
    return fits


def _packed_weights(model):
    """(name, PackedWeight) of every deployed quantized layer of ``model`` (duck-typed: the kernels never import
    the quant package)."""
    from .formats import PackedWeight

    out, seen = [], set()
    for name, m in model.named_modules():
        pw = None
        if isinstance(m, PackedWeight):
            pw = m
            name = name.rsplit(".", 1)[0] if "." in name else name
        elif getattr(m, "mode", None) == "deployed" and callable(getattr(m, "packed_weight", None)):
            pw = m.packed_weight()
        if pw is not None and id(pw) not in seen:
            seen.add(id(pw))
            out.append((name, pw))
    return out


def attach_model(model, cache_int4: bool = True, budget_bytes: Optional[int] = None):
    """:func:`attach` every packed weight of a deployed model to one :class:`Budget` of ``budget_bytes`` (None: no
    bound); returns the model."""
    budget = Budget(budget_bytes)
    pws = _packed_weights(model)
    for _, pw in pws:
        attach(pw, cache_int4, budget)
    seen = _SETTLED.get(_fingerprint([pw for _, pw in pws]))
    if seen is not None:  # a model of this structure was settled in this process: the same mode (see settle)
        set_mode(model, seen[1]["mode"], _drop=False)
        budget.state["autotune.settled"] = dict(seen[1], reused=True)
    return model


# ----------------------------------------------------------------------------------------------- keys
def _fmt_key(pw, act) -> str:
    a = "none" if act is None else f"a{act.bits}{'dyn' if act.dynamic else 'st'}"
    return f"{getattr(pw, 'format', '')}:w{pw.bits}g{pw.group_size}:{a}"


def _call_key(op: str, args, post: Optional[str] = None) -> tuple:
    """Shape part of the key (no tensor values, no activation scale: those change per timestep); an activation
    epilogue (kernels/post.py) is part of the op: ``linear+gelu_tanh``."""
    x, pw, bias, act = args[0], args[1], args[2], args[-1]
    conv = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in args[3:-1]) if op == "conv2d" else ()
    return (op if post is None else f"{op}+{post}", _fmt_key(pw, act), tuple(x.shape), tuple(pw.shape), conv,
            bias is not None, str(x.dtype), x.device.type, torch.get_num_threads())


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}|torch {torch.__version__}"


def _cache_file() -> Optional[Path]:
    v = os.environ.get("LOWBIT_AUTOTUNE_CACHE", "").strip()
    if not v or v.lower() in registry.FALSE_WORDS:  # the switches' spellings (registry.env_flag), or a path
        return None
    if v.lower() in ("1", "true", "on", "yes"):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "lowbit" / "autotune.json"
    return Path(v)


def _load_file(path: Path):
    if _FILE_LOADED.get(str(path)):
        return
    _FILE_LOADED[str(path)] = True
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("decisions"), dict):
        for k, v in data["decisions"].items():
            if isinstance(v, dict) and isinstance(v.get("backend"), str):
                _DECISIONS.setdefault(k, v)


def _save_file(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = {}
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("decisions", {})
            except ValueError:
                old = {}
        old.update(_DECISIONS)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "decisions": old}, indent=0))
        os.replace(tmp, path)
    except OSError:  # a read-only home must not break inference
        pass


# ----------------------------------------------------------------------------------------------- tuning
def _candidates(op: str, args) -> List[str]:
    disabled = registry._disabled()
    names = []
    for b in registry.backends():
        if b.name in disabled or b.name == "eager" or (b.name == "dense" and not _dense_allowed()):
            continue
        ok, _ = b.check(op, *args)
        if ok:
            names.append(b.name)
    return names


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _time_alternating(fns: dict, x):
    """-> (times {name: min seconds}, outputs {name: last output}) of zero-argument functions: one warm-up call
    each (caches: prepacking, int8 copies, float copies, first-call allocations, a GPU kernel's compilation), then
    rounds in which they alternate, so the load of a shared machine hits all alike. How many rounds follows the
    first timed round (not the warm-up, whose compilation or prepacking says nothing of the call's cost)."""
    outs = {}
    for n, f in fns.items():
        outs[n] = f()
        _sync(x)
    times = {n: float("inf") for n in fns}

    def one_round():
        for n, f in fns.items():
            t0 = time.perf_counter()
            outs[n] = f()
            _sync(x)
            times[n] = min(times[n], time.perf_counter() - t0)

    one_round()
    slowest = max(times.values())
    rounds = 1 if slowest > _SLOW_CALL_S else (2 * ROUNDS if slowest < 0.02 else ROUNDS)  # short calls: more rounds
    for _ in range(rounds - 1):
        one_round()
    return times, outs


def _shapes(args) -> str:
    """The call's input and weight shapes, for a message."""
    pw = args[1]
    return f"input {list(args[0].shape)}, weight {list(getattr(pw, 'shape', ()))}"


def _impls(op: str, names: List[str], post: Optional[str] = None) -> dict:
    """name -> the backend's implementation of ``op`` with the activation epilogue ``post`` (registry.with_post)."""
    return {n: registry.with_post(registry.get_backend(n).ops[op], post) for n in names}


def _measure(op: str, names: List[str], args, post: Optional[str] = None):
    """-> (times {name: min seconds}, outputs {name: output}). Candidates alternate round by round."""
    impls = _impls(op, names, post)
    return _time_alternating({n: (lambda f=impls[n]: f(*args)) for n in names}, args[0])


# A candidate whose output is this far from the reference's (relative, in the L2 norm) computes the call wrong: the
# backends' legitimate differences (summation order, a rounding tie of an activation code, bf16 weights on the
# weight-only paths) are 1e-7 to 1e-2; the kernel bugs found so far gave 0.8 to 1e8.
CHECK_TOL = 0.1


def _wrong(op: str, args, post: Optional[str], outs: dict) -> Dict[str, float]:
    """{candidate: relative error} of the candidates whose output disagrees with the eager reference's for this call
    (checked once per new call shape, when it is measured: a backend library's bug for shapes nobody listed, e.g.
    torch's oneDNN int8 convolution on a one-pixel-wide strided output, then never serves that shape). Empty when
    the reference cannot run the call or gives non-finite values (nothing to compare with)."""
    try:
        ref = registry.with_post(registry.get_backend("eager").ops[op], post)(*args)
    except Exception:
        return {}
    ref = ref.detach().float()  # (norms in fp32: enough for a 0.1 threshold, and no float64 copy of a big output)
    if not bool(torch.isfinite(ref).all()):
        return {}
    scale = float(torch.linalg.vector_norm(ref))
    floor = 1e-4 * math.sqrt(max(ref.numel(), 1))  # (an output near zero: an RMS difference below 1e-4 is no error)
    bad = {}
    for n, y in outs.items():
        if not torch.is_tensor(y) or y.shape != ref.shape:
            bad[n] = float("inf")
            continue
        err = float(torch.linalg.vector_norm(y.detach().float() - ref))
        if not (err <= CHECK_TOL * scale or err <= floor):
            bad[n] = err / scale if scale > 0 else float("inf")
    return bad


def _choices(pw):
    """Every :class:`Choice` held by ``pw`` (kernel choices per call shape, then path choices)."""
    out = list(pw.cache.get("autotune.fast", {}).values())
    out += list(pw.cache.get("autotune.paths", {}).values())
    return out


def _drop_loser_caches(pw):
    winners = {c.name for c in _choices(pw)}
    # (a backend's caches are named after it: the cpu backend's int8 copies / row sums are ``cpu.*``; oneDNN keeps
    # only its prepacked blobs, so an int4 weight whose calls all went to oneDNN keeps no unpacked int8 copy)
    keep = set(_KEEP_CACHE) | winners
    for k in list(pw.cache):
        prefix = (k[0] if isinstance(k, tuple) else str(k)).split(".")[0]
        if k not in keep and prefix not in keep:
            del pw.cache[k]
    arm = _arming(pw)
    if arm is not None and arm[1] is not None:
        arm[1].charge(pw)


def _fast_key(op: str, args, post: Optional[str] = None) -> tuple:
    """Cheap per-weight key (the weight's own format and shape are fixed): input shape and dtype, activation kind,
    conv arguments, bias presence, threads, activation epilogue."""
    x, act = args[0], args[-1]
    return (op, x.shape, x.dtype, None if act is None else (act.bits, act.dynamic), args[2] is not None,
            args[3:-1], torch.get_num_threads(), post)


_SWITCH_KEYS = ("LOWBIT_AUTOTUNE", "LOWBIT_AUTOTUNE_DENSE", "LOWBIT_BACKEND", "LOWBIT_DISABLE_BACKENDS")
_SWITCH_STATES: Dict[tuple, tuple] = {}


def _switches() -> tuple:
    """(tuning active, disabled backends, float path allowed), read from the environment at every call (tests and
    users change the switches between calls) but derived once per set of raw values: a deployed layer asks at each
    of its calls, and parsing four variables each time cost microseconds per layer."""
    raw = registry.raw_env(_SWITCH_KEYS) + ((registry._forced_stack[-1],) if registry._forced_stack else ())
    st = _SWITCH_STATES.get(raw)
    if st is None:
        disabled = frozenset(registry._disabled())
        st = (enabled() and registry._forced() is None, disabled, _dense_allowed() and "dense" not in disabled)
        if len(_SWITCH_STATES) < 256:
            _SWITCH_STATES[raw] = st
    return st


def active() -> bool:
    """Whether tuned weights take their tuned kernel now: tuning on and no backend forced (read at every call)."""
    return _switches()[0]


def _float_ok() -> bool:
    """The float path may run now: ``LOWBIT_AUTOTUNE_DENSE`` on and the dense backend not disabled."""
    return _switches()[2]


def usable(ch: "Choice") -> bool:
    """Whether a stored choice may run now (read at every call, as the registry reads its environment): not a
    backend listed in ``LOWBIT_DISABLE_BACKENDS`` since it was made, nor the float path while
    ``LOWBIT_AUTOTUNE_DENSE=0`` or the dense backend is disabled. A choice that may not is made again among what
    is allowed (and replaces it)."""
    return _allowed(ch, _switches())


def runnable(ch: "Choice") -> bool:
    """``active() and usable(ch)`` with one read of the environment (a deployed layer's fast path, every call)."""
    st = _switches()
    return st[0] and _allowed(ch, st)


def _allowed(ch: "Choice", st: tuple) -> bool:
    """``ch`` may run under the switches ``st`` (:func:`_switches`)."""
    return st[2] if ch.name == ch.float_name else ch.name not in st[1]


def chosen(op: str, args, post: Optional[str] = None):
    """The :class:`Choice` already made for this call's shape on ``args[1]`` (normalized arguments; its ``impl`` is
    the backend implementation in use), or None (not attached, not tuned yet, or tuning off / a backend forced).
    A deployed layer keeps it, with the rest of its per-call arguments, so that its later calls of the same shape go
    straight to the kernel (quant/layers.py)."""
    pw = args[1]
    if not (active() and is_attached(pw)):
        return None
    fast = pw.cache.get("autotune.fast")
    ch = None if fast is None else fast.get(_fast_key(op, args, post))
    return ch if ch is not None and usable(ch) else None


def run(op: str, *args, post: Optional[str] = None):
    """Run ``op`` (normalized arguments, as the registry gets them) on the backend measured fastest for this shape;
    ``post``: an activation epilogue (kernels/post.py), timed with each candidate (fused where a backend can)."""
    pw = args[1]
    fk = _fast_key(op, args, post)
    fast = pw.cache.get("autotune.fast")
    if fast is not None:
        hit = fast.get(fk)
        if hit is not None and usable(hit):
            return hit.impl(*args)
        if hit is None and len(fast) >= MAX_SHAPES:
            return registry.dispatch_post(op, post, *args)
    ck = _call_key(op, args, post)
    names = _candidates(op, args)
    if not names:  # nothing but the reference accepts it
        return registry.dispatch_post(op, post, *args)
    key = "|".join(map(str, ck)) + "|" + ",".join(names)
    path = _cache_file()
    with _LOCK:
        if path is not None:
            _load_file(path)
            key = _machine() + "|" + key
        dec = _DECISIONS.get(key)
        out = None
        try:
            default = registry.select(op, *args).name
        except Exception:
            default = None
        if dec is None or dec["backend"] not in names + ["eager"]:
            if len(names) == 1:
                times, outs = {}, {names[0]: _impls(op, names, post)[names[0]](*args)}
            else:
                times, outs = _measure(op, names, args, post)
            wrong = _wrong(op, args, post, outs)
            for n, err in wrong.items():
                times.pop(n, None)
                warnings.warn(f"LowBit: the {n} backend computed {op} ({_shapes(args)}) wrong (relative error "
                              f"{err:.2g} against the reference): not used for this call shape", RuntimeWarning,
                              stacklevel=3)
            ok = [n for n in names if n not in wrong]
            if not ok:  # every kernel wrong: the reference computes this shape
                best = "eager"
            else:
                best = min(ok, key=lambda n: times.get(n, 0.0))
                if default in ok and (not times or times[default] <= times[best] * (1.0 + MARGIN)):
                    best = default
                out = outs[best]
            dec = {"backend": best, "times": times}
            if wrong:
                dec["wrong"] = sorted(wrong)
            if len(_DECISIONS) < MAX_DECISIONS or key in _DECISIONS:
                _DECISIONS[key] = dec
            if path is not None:
                _save_file(path)
        # the integer kernels in registry order: what dispatch picks, or else the first integer candidate
        names = [n for n in names if n not in dec.get("wrong", ())] or ["eager"]
        int_name = default if default in names else next((n for n in names if n not in ("dense", "eager")), None)
        ch = Choice(_impls(op, names, post), dec["backend"],
                    "dense" if "dense" in names else None, int_name, dec["times"], _mode(pw))
        pw.cache.setdefault("autotune.fast", {})[fk] = ch
        pw.cache.setdefault("autotune.calls", {})[ck] = dec
        y = out if (out is not None and ch.name == dec["backend"]) else ch.impl(*args)
        _drop_loser_caches(pw)  # (after the call: a decision found in memory or on file builds its caches there)
    return y


def _mode(pw) -> str:
    """The whole-model mode :func:`settle` fixed for ``pw``'s model ("tuned" unless settled otherwise)."""
    return _state(pw).get("autotune.mode", "tuned")


# ----------------------------------------------------------------------------------------------- path choices
def path_choice(pw, key):
    """The :class:`Choice` between a layer's alternative paths already made for ``key`` (held by ``pw``, the weight
    the layer's state lives with), or None (not made yet, not attached, or tuning off / a backend forced)."""
    if not (active() and is_attached(pw)):
        return None
    paths = pw.cache.get("autotune.paths")
    ch = None if paths is None else paths.get(key)
    return ch if ch is not None and usable(ch) else None


def choose_path(pw, key, options: dict, args, default: str, float_name: Optional[str] = None,
                shared_key: Optional[tuple] = None):
    """Measure interchangeable computations of one layer call and keep the fastest for ``key`` on ``pw``.

    ``options``: name -> function(*args), each computing the same function (the layer's contract) a different way
    (e.g. a split convolution's parts, or its fused float path); ``default``: the one used without tuning, kept
    unless another is faster by more than ``MARGIN`` (also the one the "integer" mode of :func:`settle` takes);
    ``float_name``: the float-path option (the "float" mode's). Timing as for kernels: one warm-up call each, then
    alternating rounds, minimum per option. ``shared_key`` (shapes, dtype, device...: what the timing depends on):
    the decision is also kept in this process's decisions, as kernel choices are, so that the same call on another
    weight of these shapes, or on this one after a device move dropped its caches, is not measured again.
    Returns (choice, output of this call)."""
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if float_name in options and not _float_ok():  # (LOWBIT_AUTOTUNE_DENSE=0, or the dense backend disabled)
        options = {n: f for n, f in options.items() if n != float_name}
    dkey = None if shared_key is None else "path|" + "|".join(map(str, shared_key)) + "|" + ",".join(sorted(options))
    with _LOCK:
        dec = None if dkey is None else _DECISIONS.get(dkey)
        if dec is not None and dec.get("backend") in options:  # decided before: no measurement
            best, times = dec["backend"], dict(dec.get("times", {}))
            outs = {best: options[best](*args)}
        elif len(options) == 1:  # nothing to measure
            (best, f), = options.items()
            times, outs = {}, {best: f(*args)}
        else:
            times, outs = _time_alternating({n: (lambda f=f: f(*args)) for n, f in options.items()}, x)
            best = min(times, key=times.get)
            if times[default] <= times[best] * (1.0 + MARGIN):
                best = default
            if dkey is not None and len(_DECISIONS) < MAX_DECISIONS:
                _DECISIONS[dkey] = {"backend": best, "times": times}
        ch = Choice(dict(options), best, float_name, default, times, _mode(pw))
        if ch.name not in outs:  # (a whole-model mode other than "tuned" takes another option)
            outs[ch.name] = ch.impl(*args)
        pw.cache.setdefault("autotune.paths", {})[key] = ch
        _drop_loser_caches(pw)
    return ch, outs[ch.name]


# ----------------------------------------------------------------------------------------------- whole model
SETTLE_ROUNDS = 5
SETTLE_MARGIN = 0.03  # the per-layer choice stays unless a whole-model mode is faster by more than this fraction
_SETTLE_SLOW_S = 2.0  # a forward slower than this: one timed round per mode
# what settle chose in this process, per model structure (see _fingerprint): a model of the same structure deployed
# or loaded later takes the same mode, so that two copies of one model in one process (a quantized model and its
# saved-and-reloaded twin) run the same kernels and give the same numbers bit for bit; with a 3 % margin a
# second measurement on a busy machine could choose another mode (found in a real ComfyUI, Save + Load)
_SETTLED: Dict[tuple, tuple] = {}  # fingerprint -> (the call's signature, settle's report)
_MAX_SETTLED = 256


def _fingerprint(pws) -> tuple:
    """A model's structure as the kernel choice sees it: every tuned weight's format, bits, group size, shape and
    device, in order, and the thread count."""
    return (torch.get_num_threads(),) + tuple((getattr(pw, "format", ""), pw.bits, pw.group_size, tuple(pw.shape),
                                               str(getattr(pw, "device", ""))) for pw in pws)


def _call_sig(call):
    """The shapes and dtypes of a call's tensors (recorded call or (args, kwargs) pair), or None (a function)."""
    if hasattr(call, "args") and hasattr(call, "kwargs"):
        a, kw = call.args, call.kwargs
    elif isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
        a, kw = call
    else:
        return None
    leaves = list(a) + [kw[k] for k in sorted(kw)]
    return tuple((tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves)


def set_mode(model, mode: str = "tuned", _drop: bool = True):
    """Make every tuned weight of ``model`` (and the choices it makes later, for new shapes) take ``mode``:
    "tuned" (each call shape's measured choice), "float" (the float path everywhere: the dense backend, fused
    split convolutions) or "integer" (the integer kernels everywhere, registry order); the other modes' caches are
    dropped (this mode's are built at its next calls). The mode is kept with the model's :class:`Budget`, so it
    survives device moves. Returns the model."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    with _LOCK:
        for _, pw in _packed_weights(model):
            _state(pw)["autotune.mode"] = mode
            for ch in _choices(pw):
                ch.use(mode)
            if _drop:
                _drop_loser_caches(pw)
    return model


def _state(pw) -> dict:
    """Where a weight's whole-model tuning state (mode, the whole-model check's report) lives: its model's
    :class:`Budget` (one per model, kept through device moves and state-dict loads), else its own cache."""
    arm = _arming(pw)
    return arm[1].state if arm is not None and arm[1] is not None else pw.cache


def _forward_of(model, call):
    """A zero-argument function running ``model`` on ``call``: a recorded call (anything with ``.to(device,
    dtype) -> (args, kwargs)``, e.g. ``quant.calib.Call``), an ``(args, kwargs)`` pair, or a function of the model."""
    if hasattr(call, "to") and not isinstance(call, torch.Tensor):
        floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        dev = floats[0].device if floats else torch.device("cpu")
        dt = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
        a, kw = call.to(dev, dt)
        return lambda: model(*a, **kw)
    if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
        return lambda: model(*call[0], **call[1])
    if callable(call):
        return lambda: call(model)
    raise TypeError("call: a recorded call (with .to(device, dtype)), an (args, kwargs) pair or a function of the "
                    "model")


def settle(model, call, rounds: int = SETTLE_ROUNDS, margin: float = SETTLE_MARGIN,
           progress=None) -> Optional[dict]:
    """End-to-end guard of the per-layer choices: time whole forwards of ``model`` on ``call`` (a representative
    call: the shapes it will run) under the per-layer tuned choice, with every layer on the float path, and with the
    integer kernels everywhere (registry order), and keep the fastest for the whole model (:func:`set_mode`).

    Per-layer timings are taken one layer at a time (hot caches, a loaded machine's noise in each decision); a whole
    forward includes what they miss (cache traffic between layers, allocator, the other ops' share of the cores).
    Measurement: one forward first (per-layer tuning of new shapes), one warm-up forward per mode (its caches:
    float copies, oneDNN blobs), then ``rounds`` rounds with the modes alternating (order reversed every other
    round); per mode the minimum **process CPU time** of a forward counts (other jobs' load shows less in it than in
    wall time; wall times are reported too). The tuned choice stays unless another mode is faster by more than
    ``margin`` and its minimum wall time is not longer (less CPU time from fewer busy threads is not a speed-up).
    The losers' caches are dropped. A forward slower than 2 s gets one round.

    ``progress``: ``progress(done, total, info)`` after each forward, the core's protocol (quant/progress.py;
    ``info["stage"]`` is "deploy: kernel check"): a host's progress bar, and its Cancel, which raises from it.

    Once per model structure and call shape in a process: a model of the same structure (formats, bits, shapes of
    its tuned weights) settled before on a call of the same shapes takes that mode without measuring again
    (``reused: True`` in the report), and :func:`attach_model` gives it to a model of that structure deployed or
    loaded later, so two copies of one model in one process compute the same numbers. :func:`clear` forgets it.

    Returns dict(mode, rounds, cpu_ms={mode: ms}, wall_ms={mode: ms}), also kept with the model's weights and
    reported by :func:`summary` / :func:`format_summary`; None if no weight of ``model`` is tuned (or tuning is off).
    """
    every = [pw for _, pw in _packed_weights(model)]
    pws = [pw for pw in every if is_attached(pw)]
    if not pws or not active():
        return None
    fp, sig = _fingerprint(every), _call_sig(call)
    with _LOCK:
        seen = _SETTLED.get(fp)
    if seen is not None and sig is not None and seen[0] == sig:
        report = dict(seen[1], reused=True)
        set_mode(model, report["mode"])
        for pw in pws:
            _state(pw)["autotune.settled"] = report
        return report
    fwd = _forward_of(model, call)
    x = next((t for t in model.buffers() if t.is_floating_point()), torch.zeros(()))
    cpu = {m: [] for m in _MODES}
    wall = {m: [] for m in _MODES}
    with torch.no_grad():
        # (modes switch without dropping caches while timing: each mode's copies are built in its warm-up and
        # kept until the choice is made, so no timed forward rebuilds them)
        set_mode(model, "tuned", _drop=False)
        t0 = time.perf_counter()
        fwd()
        if time.perf_counter() - t0 > _SETTLE_SLOW_S:
            rounds = 1
        rounds = max(1, int(rounds))
        done, total = [0], len(_MODES) * (1 + rounds)

        def tick(mode):
            done[0] += 1
            if callable(progress):
                progress(done[0], total, dict(stage="deploy: kernel check", mode=mode))

        for m in _MODES:  # warm-up: the mode's caches
            set_mode(model, m, _drop=False)
            fwd()
            tick(m)
        for r in range(rounds):
            for m in (_MODES if r % 2 == 0 else _MODES[::-1]):
                set_mode(model, m, _drop=False)
                c0, t0 = time.process_time(), time.perf_counter()
                fwd()
                _sync(x)
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
                tick(m)
    score = {m: min(v) for m, v in cpu.items()}
    best = min(_MODES, key=score.get)
    if score[best] >= score["tuned"] * (1.0 - margin) or min(wall[best]) > min(wall["tuned"]):
        # within the margin, or less CPU time but not less wall time (fewer threads busy is not faster)
        best = "tuned"
    set_mode(model, best)
    report = dict(mode=best, rounds=len(cpu["tuned"]), cpu_ms={m: round(v * 1e3, 2) for m, v in score.items()},
                  wall_ms={m: round(min(v) * 1e3, 2) for m, v in wall.items()})
    for pw in pws:
        _state(pw)["autotune.settled"] = report
        _drop_loser_caches(pw)
    with _LOCK:
        if len(_SETTLED) < _MAX_SETTLED or fp in _SETTLED:
            _SETTLED[fp] = (sig, report)
    return report


def clear():
    """Forget every decision held in memory (the file cache, if any, stays)."""
    with _LOCK:
        _DECISIONS.clear()
        _FILE_LOADED.clear()
        _SETTLED.clear()


def decisions() -> Dict[str, dict]:
    return dict(_DECISIONS)


# ----------------------------------------------------------------------------------------------- report
def summary(model) -> dict:
    """What the tuner chose for a deployed model (after at least one forward).

    returns dict(layers={backend: count}, untuned=count (not called yet), over_budget=count (not tuned: their
                 copies would not fit in the model's budget), cache_bytes (every weight's, tuned or not), dense_bytes,
                 packed_bytes, budget_bytes (its limit) and budget_used (what its tuned weights are charged),
                 paths={option: count} (layers with alternative paths, e.g. split convolutions: fused or parts),
                 settled=None or the whole-model check of :func:`settle` (mode, times_ms per mode),
                 rows=[dict(name, backend, shape, times_ms={backend: ms})])
    """
    layers, rows, paths = {}, [], {}
    settled = budget = None
    untuned = over = cache_b = dense_b = packed_b = 0
    for name, pw in _packed_weights(model):
        arm = _arming(pw)
        budget = budget or (arm[1] if arm else None)
        if pw.cache.get("autotune.fits") is False:  # refused by the budget: registry order, not tuned
            over += 1
        packed_b += pw.nbytes(include_cache=False)
        cache_b += pw.nbytes(include_cache=True) - pw.nbytes(include_cache=False)
        for k, v in pw.cache.items():
            if isinstance(k, str) and k.startswith(("dense.w", "fused.w")):  # float copies (also scaled ones)
                dense_b += _nested_bytes(v)
        for ch in pw.cache.get("autotune.paths", {}).values():
            paths[ch.name] = paths.get(ch.name, 0) + 1
        settled = settled or _state(pw).get("autotune.settled")
        calls = pw.cache.get("autotune.calls")
        fast = list(pw.cache.get("autotune.fast", {}).values())
        if not calls or not fast:
            untuned += pw.cache.get("autotune.fits") is not False
            continue
        dec = list(calls.values())[-1]
        backend = fast[-1].name
        layers[backend] = layers.get(backend, 0) + 1
        rows.append(dict(name=name, backend=backend, shape=list(pw.shape), calls=len(calls),
                         times_ms={b: round(t * 1e3, 4) for b, t in dec["times"].items()}))
    return dict(layers=layers, untuned=untuned, over_budget=over, cache_bytes=cache_b, dense_bytes=dense_b,
                packed_bytes=packed_b, budget_bytes=None if budget is None else budget.limit,
                budget_used=None if budget is None else budget.used(), paths=paths, settled=settled, rows=rows)


def format_summary(s: dict, max_rows: int = 0) -> str:
    """A few lines: layers per kernel, measured time of the chosen vs the other candidates, memory."""
    tuned = sum(s["layers"].values())
    parts = ", ".join(f"{b} {n}" for b, n in sorted(s["layers"].items(), key=lambda kv: -kv[1]))
    lines = [f"kernel choice (measured on this machine): {tuned} layers: {parts or 'none yet (run a forward)'}"
             + (f"; {s['untuned']} not called yet" if s["untuned"] else "")
             + (f"; {s['over_budget']} in registry order (their copies would exceed the "
                f"{(s['budget_bytes'] or 0) / 2**20:.3g} MiB budget)" if s.get("over_budget") else "")]
    chosen = sum(r["times_ms"].get(r["backend"], 0.0) for r in s["rows"] if r["times_ms"])
    ints = [min((t for b, t in r["times_ms"].items() if b != "dense"), default=None) for r in s["rows"]]
    dens = [r["times_ms"].get("dense") for r in s["rows"]]
    if any(t is not None for t in ints) and all(t is not None for t in dens) and s["rows"]:
        tot_int = sum(t if t is not None else d for t, d in zip(ints, dens))
        lines.append(f"  sum over layers of one call: chosen {chosen:.2f} ms, integer kernels only {tot_int:.2f} ms, "
                     f"float path only {sum(dens):.2f} ms")
    if s.get("paths"):
        lines.append("  split convolutions: " + ", ".join(f"{n} {c}" for n, c in sorted(s["paths"].items())))
    st = s.get("settled")
    if st:
        ts = ", ".join(f"{m} {t:.1f}" for m, t in st["cpu_ms"].items())
        lines.append(f"  whole-model check ({st['rounds']} rounds, CPU ms per forward: {ts}): {st['mode']}"
                     + (" (as measured earlier in this process for a model of this structure)"
                        if st.get("reused") else ""))
    lines.append(f"  memory: packed weights {s['packed_bytes'] / 1e6:.2f} MB, backend caches "
                 f"{s['cache_bytes'] / 1e6:.2f} MB (of which float copies for the float path "
                 f"{s['dense_bytes'] / 1e6:.2f} MB)")
    for r in s["rows"][:max_rows]:
        ts = ", ".join(f"{b} {t:.3f}" for b, t in r["times_ms"].items())
        lines.append(f"  {r['name']}: {r['backend']} ({ts} ms)")
    return "\n".join(lines)
