"""Safetensors header checks that need no torch: bounded JSON parsing and the tensor index's consistency.

:mod:`.io` reads LowBit files with them (``read_header``); the command line (``lowbit inspect``) reads files in
ComfyUI's quantized layout with them, without importing torch. Every function raises ``ValueError`` with the
problem in words (:class:`TooDeep` for nesting past the bound, :class:`Length` for a file longer or shorter than its
index); the caller adds the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import re


class TooDeep(ValueError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH` (a crafted header rather than a damaged one)."""


class Length(ValueError):
    """The tensor data does not end where the file does (truncated or padded)."""


LOWBIT_FORMAT_VERSION = 5  # the newest LowBit file format this code reads (quant/io.py writes it)
MAX_JSON_DEPTH = 32  # nesting of any JSON value in a header
MAX_INT_DIGITS = 18  # integers in a header: |n| < 10^18

# bytes per element of every safetensors dtype this reader knows (sub-byte float formats are not among them)
DSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
         "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def header_digest(header: dict) -> str:
    """The ``header_sha256`` of a LowBit header (format 5): sha256 of its canonical JSON (sorted keys, no
    whitespace, ASCII) without the ``header_sha256`` field itself. It covers what the tensor checksums do not: the
    architecture, layers, splits, extras and configs, whose edited digit changes the model silently."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def link_target(path: str) -> str:
    """Where the symbolic link ``path`` points (for the message about a link whose target does not exist: the
    loader's and the command line's)."""
    try:
        return os.readlink(path)[:500]
    except OSError:
        return "?"


def lowbit_version_ok(v) -> bool:
    """``v`` is a LowBit ``format_version`` this code reads: an int (not a bool) in 1..LOWBIT_FORMAT_VERSION."""
    return not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= LOWBIT_FORMAT_VERSION


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(s)} digits")
    return int(s)


def _no_constant(s: str):
    raise ValueError(f"{s} is not valid JSON")


def json_depth_ok(s: str) -> bool:
    """Nesting of brackets outside strings is at most MAX_JSON_DEPTH (checked before parsing: no RecursionError)."""
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', s):
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:  # (readers disagree on which of two values counts: none is taken)
            raise ValueError(f"key {k[:200]!r} appears twice")
        out[k] = v
    return out


def parse_json(text: str, what: str):
    """``text`` parsed as JSON: nesting, integer size and the non-JSON constants (NaN, Infinity) bounded, no key
    twice in an object."""
    if not json_depth_ok(text):
        raise TooDeep(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON ({str(exc)[:120]})") from None


def check_index(index: dict, data_start: int, file_size: int, dtypes=None) -> None:
    """Every tensor entry of a safetensors header (``__metadata__`` removed) names a known dtype (``dtypes``, default
    all of :data:`DSIZE`), a shape of non-negative ints and offsets ``0 <= a <= b`` that span exactly its bytes; the
    tensors tile the data without overlap or gap (as the safetensors format requires: two names on the same bytes,
    or bytes no tensor owns, are refused) and the data ends where the file does (``data_start`` = 8 + header
    length)."""
    dtypes = DSIZE if dtypes is None else dtypes
    end = 0
    spans = []
    for k, e in index.items():
        if not (isinstance(e, dict) and e.get("dtype") in dtypes and isinstance(e.get("shape"), list)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2):
            raise ValueError(f"tensor {k[:200]!r} has a malformed or unsupported entry")
        a, b = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ValueError(f"tensor {k[:200]!r} has an invalid shape")
            numel *= d
        if not (isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool)
                and 0 <= a <= b) or b - a != numel * DSIZE[e["dtype"]]:
            raise ValueError(f"tensor {k[:200]!r} has inconsistent offsets")
        end = max(end, b)
        spans.append((a, b, k))
    pos = 0
    for a, b, k in sorted(spans):
        if a < pos:
            raise ValueError(f"tensor {k[:200]!r} overlaps another tensor's bytes")
        if a > pos:
            raise ValueError(f"tensor {k[:200]!r} starts at byte {a}, after {a - pos} bytes no tensor owns")
        pos = b
    if data_start + end != file_size:
        raise Length(f"expected {data_start + end} bytes, found {file_size}")
