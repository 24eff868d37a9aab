"""Packed low-bit integer formats and kernels behind a backend registry.

    from lowbit.kernels import ops, PackedWeight, ActQuant

Weight formats are registered objects, one file each in ``formats/`` (``register_format``; see formats/__init__.py).

Backends (highest priority first): ``triton`` (CUDA; CPU only under TRITON_INTERPRET=1), ``onednn`` (CPU int8 conv /
static-activation linear), ``vnni`` (CPU fused int8 Linear, AVX512-VNNI, compiled here once), ``cpu``
(torch._int_mm, int4pack weight-only), ``eager`` (reference, everything).
``LOWBIT_BACKEND=name`` forces one, ``LOWBIT_DISABLE_BACKENDS=a,b`` disables some. See kernels/README.md.
"""
import importlib.util
import logging

from . import eager  # noqa: F401  (registers the reference backend)
from . import cpu  # noqa: F401  (registers the cpu and onednn backends)
from . import vnni  # noqa: F401  (registers the fused AVX512-VNNI Linear, built at its first use)
from . import ops
from .formats import FORMATS, ActQuant, PackedWeight, WeightFormat, get_format, register_format
from .registry import NoBackendError

_log = logging.getLogger("lowbit.kernels")

if importlib.util.find_spec("comfy_kitchen") is not None:  # ComfyUI's kernels; imported lazily by the backend
    from . import comfy_kitchen  # noqa: F401  (registers the comfy_kitchen backend)

if importlib.util.find_spec("triton") is not None:
    try:
        from . import triton_gpu  # noqa: F401
    except Exception as exc:  # a broken optional dependency disables one backend, not the package
        _log.warning("lowbit.kernels: triton backend disabled, importing it failed: %s", exc)

__all__ = ["ops", "PackedWeight", "ActQuant", "NoBackendError", "WeightFormat", "FORMATS", "register_format",
           "get_format"]
