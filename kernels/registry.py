"""Backend registry: every backend declares what it can run, dispatch checks before it calls.

A backend module registers itself once::

    backend = register_backend("cpu", priority=20, description="torch._int_mm / onednn int8 kernels")

    def _linear_supports(x, pw, bias, act):      # same arguments as the op
        if x.device.type != "cpu":
            return False, f"x is on {x.device}, cpu backend needs cpu tensors"
        return True, ""

    @backend.op("linear", supports=_linear_supports)
    def linear(x, pw, bias, act): ...

Dispatch (:func:`dispatch`) picks the highest-priority enabled backend whose ``supports(*args)`` returns
``(True, "")``. There is no try/except fallback: a backend that accepts a call must run it. When nothing fits,
:class:`NoBackendError` lists every backend and the reason it refused.

Environment (read at every call, so tests can monkeypatch it):
    LOWBIT_BACKEND=<name>             force one backend; error if it refuses
    LOWBIT_DISABLE_BACKENDS=a,b       never use these
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["Backend", "NoBackendError", "register_backend", "get_backend", "backends", "status", "dispatch", "run_on",
           "select", "forced_backend", "with_post", "dispatch_post"]

Verdict = Tuple[bool, str]


try:  # the root of LowBit's error family (lowbit/_errors.py imports nothing)
    from .._errors import LowBitError
except ImportError:  # this folder imported as a top-level `kernels` (repo root on sys.path, e.g. diffusers probing
    class LowBitError(Exception):  # for Hugging Face's `kernels` package): not inside lowbit, no shared base
        pass


class NoBackendError(LowBitError, RuntimeError):
    """No registered backend accepted an op call. ``refusals`` maps backend name -> reason."""

    def __init__(self, op: str, refusals: Dict[str, str], hint: str = ""):
        self.op = op
        self.refusals = dict(refusals)
        lines = [f"lowbit.kernels: no backend can run `{op}` for these arguments:"]
        lines += [f"  - {name}: {why}" for name, why in refusals.items()]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass
class _OpEntry:
    impl: Callable
    supports: Callable[..., Verdict]
    posts: frozenset = frozenset()  # activation epilogues (kernels/post.py) the impl applies itself: ``post=`` kwarg


@dataclass
class Backend:
    """One backend: a name, a priority (higher wins) and its ops, each with a ``supports`` check."""

    name: str
    priority: int
    description: str = ""
    ops: Dict[str, _OpEntry] = field(default_factory=dict)
    # why the backend can run nothing on this machine ("" when it can), for status(); None: it always can
    unavailable: Optional[Callable[[], str]] = None

    def op(self, op_name: str, supports: Optional[Callable[..., Verdict]] = None, posts=()):
        """Decorator registering ``fn`` as this backend's implementation of ``op_name``.

        ``supports`` takes the op's arguments and returns ``(ok, reason)``; omitted means "always". ``posts``: the
        activation epilogues (names of :mod:`.post`) ``fn`` fuses itself, taking ``post=<name>``; any other is
        applied after it (:func:`with_post`).
        """
        from . import post as _post

        unknown = set(posts) - set(_post.POSTS)
        if unknown:
            raise ValueError(f"{self.name}.{op_name}: unknown activation epilogues {sorted(unknown)}")

        def deco(fn):
            self.ops[op_name] = _OpEntry(fn, supports or _always, frozenset(posts))
            return fn

        return deco

    def check(self, op_name: str, *args, **kwargs) -> Verdict:
        entry = self.ops.get(op_name)
        if entry is None:
            return False, f"does not implement `{op_name}`"
        return entry.supports(*args, **kwargs)


def _always(*args, **kwargs) -> Verdict:
    return True, ""


_BACKENDS: Dict[str, Backend] = {}
_forced_stack: List[str] = []


def register_backend(name: str, priority: int, description: str = "",
                     unavailable: Optional[Callable[[], str]] = None) -> Backend:
    """Create and register a backend (re-registering a name replaces it, which keeps module reloads harmless).
    ``unavailable``: returns why the backend can run nothing on this machine, or "" (see :func:`status`)."""
    b = Backend(name, priority, description, unavailable=unavailable)
    _BACKENDS[name] = b
    return b


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise KeyError(f"lowbit.kernels: unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def backends() -> List[Backend]:
    """Registered backends, highest priority first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def status() -> List[dict]:
    """Every registered backend, highest priority first: ``name``, ``priority``, ``description``, ``state``
    ("ready", "disabled" by ``LOWBIT_DISABLE_BACKENDS``, or "unavailable" here) and ``why`` (the reason, or "").
    A backend that builds itself on first use (``vnni``) is built by this call where it can be."""
    disabled = _disabled()
    rows = []
    for b in backends():
        if b.name in disabled:
            state, why = "disabled", "LOWBIT_DISABLE_BACKENDS names it"
        else:
            why = "" if b.unavailable is None else b.unavailable()
            state = "unavailable" if why else "ready"
        rows.append(dict(name=b.name, priority=b.priority, description=b.description, state=state, why=why))
    return rows


_POSIX = os.name == "posix"
_ENV_KEYS: Dict[str, bytes] = {}


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read at every call but cheaply: deployed layers read these switches at every
    call (tests and users change them between calls), and ``os.environ.get`` of an unset name costs microseconds
    (it raises and catches a KeyError). On POSIX the lookup goes to the dict that ``os.environ`` keeps in sync."""
    data = getattr(os.environ, "_data", None) if _POSIX else None
    if type(data) is not dict:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    v = data.get(key)
    return default if v is None else os.fsdecode(v)


def raw_env(keys: tuple) -> tuple:
    """The raw values (None when unset) of the environment variables ``keys``, in one go: a cheap snapshot that
    callers reading several switches at every call use as a cache key for what they derive from them."""
    data = getattr(os.environ, "_data", None) if _POSIX else None
    if type(data) is not dict:
        return tuple(os.environ.get(k) for k in keys)
    enc = _ENV_TUPLES.get(keys)
    if enc is None:
        enc = _ENV_TUPLES[keys] = tuple(os.fsencode(k) for k in keys)
    return tuple(map(data.get, enc))


_ENV_TUPLES: Dict[tuple, tuple] = {}


FALSE_WORDS = frozenset(("0", "false", "off", "no"))


def env_flag(name: str, default: bool) -> bool:
    """A boolean switch from the environment, one rule for all of LowBit's: unset or blank -> ``default``;
    ``0`` / ``false`` / ``off`` / ``no`` (any case, surrounding spaces ignored) -> False; any other value -> True."""
    v = getenv(name)
    if v in ("0", "1"):  # the common spellings without the normalisation (read at every kernel call)
        return v == "1"
    v = v.strip().lower()
    return default if not v else v not in FALSE_WORDS


def _disabled() -> set:
    v = getenv("LOWBIT_DISABLE_BACKENDS")
    return {s.strip() for s in v.split(",") if s.strip()} if v else set()


def _forced() -> Optional[str]:
    if _forced_stack:
        return _forced_stack[-1]
    name = getenv("LOWBIT_BACKEND").strip()
    return name or None


@contextmanager
def forced_backend(name: str):
    """Context manager: like ``LOWBIT_BACKEND=name`` for the calls made inside the block."""
    get_backend(name)
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()


def select(op: str, *args, **kwargs) -> Backend:
    """The backend :func:`dispatch` would use for this call (raises :class:`NoBackendError` if none)."""
    forced = _forced()
    disabled = _disabled()
    if forced is not None and forced in _BACKENDS and op not in _BACKENDS[forced].ops:
        forced = None  # it forces the calls it implements (the dense backend has no pack / dequantize ops)
    if forced is not None:
        if forced not in _BACKENDS:
            raise NoBackendError(op, {forced: "not a registered backend"},
                                 f"LOWBIT_BACKEND={forced!r}; registered backends: {sorted(_BACKENDS)}")
        if forced in disabled:
            raise NoBackendError(op, {forced: "forced by LOWBIT_BACKEND but also listed in LOWBIT_DISABLE_BACKENDS"})
        ok, why = _BACKENDS[forced].check(op, *args, **kwargs)
        if not ok:
            raise NoBackendError(op, {forced: why}, f"The backend is forced by LOWBIT_BACKEND={forced}; "
                                                    "unset it to let dispatch choose.")
        return _BACKENDS[forced]
    refusals = {}
    for b in backends():
        if b.name in disabled:
            refusals[b.name] = "disabled by LOWBIT_DISABLE_BACKENDS"
            continue
        ok, why = b.check(op, *args, **kwargs)
        if ok:
            return b
        refusals[b.name] = why
    raise NoBackendError(op, refusals)


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on the highest-priority backend that accepts these arguments."""
    return select(op, *args, **kwargs).ops[op].impl(*args, **kwargs)


def with_post(entry: _OpEntry, post: Optional[str]) -> Callable:
    """``entry``'s implementation followed by the activation epilogue ``post`` (a name of :mod:`.post`; None: the
    implementation itself): fused where the backend declared it, else the torch activation on its output."""
    if post is None:
        return entry.impl
    impl = entry.impl
    if post in entry.posts:
        return functools.partial(impl, post=post)
    from .post import POSTS

    act = POSTS[post]
    return lambda *args: act(impl(*args))


def dispatch_post(op: str, post: Optional[str], *args):
    """:func:`dispatch` followed by the activation epilogue ``post`` (:func:`with_post`; None: plain dispatch)."""
    if post is None:
        return dispatch(op, *args)
    return with_post(select(op, *args).ops[op], post)(*args)


def run_on(name: str, op: str, *args, **kwargs):
    """Run ``op`` on the named backend (cross-backend tests, benchmarks); raises if that backend refuses."""
    ok, why = get_backend(name).check(op, *args, **kwargs)
    if not ok:
        raise NoBackendError(op, {name: why})
    return _BACKENDS[name].ops[op].impl(*args, **kwargs)
