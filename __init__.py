"""LowBit: low-bit diffusion UNets.

One folder, three faces:
  * Python library ``lowbit`` (``lowbit.quant`` core verbs, ``lowbit.kernels`` integer kernels, ``lowbit`` CLI);
  * ComfyUI custom node pack (this file exports ``NODE_CLASS_MAPPINGS`` when ComfyUI is the importer);
  * Stable-Diffusion-WebUI extension (``scripts/``, ``install.py``).

The core never imports a host; host detection happens here and in ``scripts/`` only.
"""
import importlib.util
import logging
import sys

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

_log = logging.getLogger("lowbit")


def _running_inside_comfyui() -> bool:
    # ComfyUI puts its own top-level packages `comfy` and `folder_paths` on sys.path.
    try:
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


if _running_inside_comfyui():
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except Exception as exc:
        if "folder_paths" in sys.modules:  # ComfyUI itself is loading the pack: it lists it as IMPORT FAILED, with
            raise  # this error, where users look (ComfyUI-Manager); swallowed, the pack looked loaded with 0 nodes
        # a library import in an environment that also has ComfyUI: the nodes are disabled, not `import lowbit`
        _log.exception("LowBit: the ComfyUI nodes failed to load (%s); the pack is disabled.", exc)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
