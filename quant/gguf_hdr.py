"""GGUF header reading without torch (the command line's checks and ``lowbit inspect`` run before torch loads).

A GGUF (v2 / v3) file: magic ``GGUF``, version, tensor and field counts, typed key/value fields, tensor descriptions
(name, dimensions innermost first, GGML type, offset), then the tensors' bytes from an aligned start. The header is
read from the file as a stream (a multi-GB file is not loaded); every count, length and offset is checked against
the file's size before it is used. :mod:`.export_gguf` writes such files and reads their tensors.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, List, Tuple

__all__ = ["GGUF_ARCHS", "GGML_TYPES", "BLOCK", "GGUFError", "read_header", "is_gguf"]

# ComfyUI-GGUF's IMG_ARCH_LIST (loader.py): the image-model architectures its loader accepts
GGUF_ARCHS = ("sd1", "sdxl", "sd3", "flux", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
              "qwen_image")
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "BF16": 30}  # the types LowBit writes and reads
TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}
BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 30: (1, 2)}  # (values per block, bytes per block)
MAGIC, VERSION, ALIGN = b"GGUF", 3, 32
U32, I32, STR, ARR = 4, 5, 8, 9  # GGUF value types LowBit writes
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
MAX_DIMS = 8


class GGUFError(ValueError):
    """A file that is not a GGUF file LowBit can read (one line, naming the file and the problem)."""


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Stream:
    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        pos = self.f.tell()
        if n < 0 or pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated at byte {pos} (needs {n} more); the file is cut or not GGUF")
        return self.f.read(n)

    def num(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        try:
            return self.take(self.num("Q")).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: a string that is not UTF-8 at byte {self.f.tell()}") from None

    def value(self, typ: int, depth: int = 0):
        if typ in _SCALARS:
            return self.num(_SCALARS[typ])
        if typ == STR:
            return self.string()
        if typ == ARR and depth < 2:
            et, n = self.num("I"), self.num("Q")
            if n > self.size:
                raise GGUFError(f"{self.path}: an array of {n} values in a {self.size}-byte file")
            return [self.value(et, depth + 1) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown or nested value type {typ} at byte {self.f.tell()}")


def read_header(path: str) -> Tuple[Dict[str, object], List[tuple], int]:
    """``(fields, tensors, data start)``: ``fields`` {key: value}, ``tensors`` [(name, type name, shape in torch's
    order, offset from the data start, bytes)]; every tensor checked to lie inside the file, on the alignment, in
    whole blocks of a type LowBit reads (``GGML_TYPES``)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        s = _Stream(f, size, path)
        if s.take(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        version = s.num("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} (LowBit reads 2 and 3)")
        n_tensors, n_fields = s.num("Q"), s.num("Q")
        if n_tensors > size or n_fields > size:
            raise GGUFError(f"{path}: {n_tensors} tensors / {n_fields} fields in a {size}-byte file")
        fields: Dict[str, object] = {}
        for _ in range(n_fields):
            key = s.string()
            fields[key] = s.value(s.num("I"))
        align = fields.get("general.alignment", ALIGN)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: general.alignment {align!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = s.string()
            nd = s.num("I")
            if nd > MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name!r} has {nd} dimensions")
            dims = [s.num("Q") for _ in range(nd)]
            typ, off = s.num("I"), s.num("Q")
            if typ not in BLOCK:
                raise GGUFError(f"{path}: tensor {name!r} has GGML type {typ} (LowBit reads "
                                f"{', '.join(sorted(GGML_TYPES))})")
            infos.append((name, typ, tuple(reversed(dims)), off))
        start = f.tell() + (-f.tell() % align)
    tensors = []
    for name, typ, shape, off in infos:
        per, nb = BLOCK[typ]
        numel = 1
        for d in shape:
            numel *= d
        if shape and shape[-1] % per:
            raise GGUFError(f"{path}: tensor {name!r}: rows of {shape[-1]} values are not whole {TYPE_NAMES[typ]} "
                            "blocks")
        nbytes = numel // per * nb
        if off % align or start + off + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} lies outside the file or off the alignment; the file is cut "
                            "or corrupt")
        tensors.append((name, TYPE_NAMES[typ], shape, off, nbytes))
    return fields, tensors, start
