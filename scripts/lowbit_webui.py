"""LowBit for Stable-Diffusion-WebUI Forge and A1111: the "LowBit" tab (Forge), settings, an always-visible
txt2img/img2img section that samples with a quantized UNet (Forge, A1111 >= 1.10), and A1111's SD Unet options.

How this file finds the LowBit package
--------------------------------------
The WebUI executes this file by path (``spec_from_file_location("lowbit_webui.py", ...)``) with the extension
folder prepended to ``sys.path`` only while it loads. The folder's top-level modules have generic names
(``quant``, ``nodes``, ``kernels``, ``models``) that other extensions, ComfyUI or PyPI (``kernels``) also use,
so they are never imported as top-level modules; the code always runs as one package whose modules import
each other relatively. ``_import_lowbit`` picks that package:

1. ``lowbit`` is importable and *is this folder* (``pip install -e``, as in our Forge venv) -> ``import lowbit``.
2. nothing called ``lowbit`` is importable -> load this folder as the package ``lowbit`` from its
   ``__init__.py`` (no ``sys.path`` change: the folder name may be ``sd-webui-lowbit`` or any other name
   that is not an identifier, and putting ``extensions/`` itself on the path would expose every extension).
3. a *different* ``lowbit`` is installed (another version, another checkout) -> load this folder under the
   unique name ``lowbit_webui_ext`` so neither shadows the other; this file's code matches its own folder.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import gradio as gr

from modules import script_callbacks, scripts

log = logging.getLogger("lowbit")

EXT_DIR = Path(__file__).resolve().parent.parent
UNIQUE_NAME = "lowbit_webui_ext"


def _load_folder_as(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXT_DIR / "__init__.py",
                                                  submodule_search_locations=[str(EXT_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_lowbit():
    try:
        spec = importlib.util.find_spec("lowbit")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == EXT_DIR:
        return importlib.import_module("lowbit")
    return _load_folder_as("lowbit" if spec is None else UNIQUE_NAME)


lowbit = _import_lowbit()
_pkg = lowbit.__name__
webui = importlib.import_module(f"{_pkg}.ui.webui")
_config = importlib.import_module(f"{_pkg}.quant.config")
METHODS = list(_config.METHODS)  # the one method vocabulary
SAMPLES, STEPS = _config.arg_spec("calib_samples"), _config.arg_spec("calib_steps")  # the one set of limits
IS_FORGE = webui.is_forge()
HAS_SAMPLING_HOOK = webui.has_sampling_hook()  # A1111 < 1.10 never calls process_before_every_sampling
NOT_APPLIED = ("not applied: this WebUI has no per-sampling script hook (A1111 1.10 or Forge needed); "
               "use Settings -> Stable Diffusion -> SD Unet")
SECTION = ("lowbit", "LowBit")


# ------------------------------------------------------------------------------------------------- settings
def on_ui_settings():
    from modules import shared

    shared.opts.add_option("lowbit_default_bits", shared.OptionInfo(
        "W8A8", "Default bits of the LowBit section", gr.Dropdown, {"choices": list(webui.SCRIPT_BITS)},
        section=SECTION))
    shared.opts.add_option("lowbit_default_method", shared.OptionInfo(
        webui.DEFAULT_METHOD, "Default quantization method", gr.Dropdown, {"choices": METHODS}, section=SECTION))
    shared.opts.add_option("lowbit_calib_samples", shared.OptionInfo(
        2, "Calibration samples (full-precision sampling runs recorded)", gr.Slider,
        {"minimum": SAMPLES.lo, "maximum": SAMPLES.hi, "step": 1}, section=SECTION))
    shared.opts.add_option("lowbit_calib_steps", shared.OptionInfo(
        8, "Calibration steps (sampling steps of each calibration run)", gr.Slider,
        {"minimum": STEPS.lo, "maximum": STEPS.hi, "step": 1}, section=SECTION))
    if IS_FORGE:  # (A1111 has no LowBit tab)
        shared.opts.add_option("lowbit_calib_size", shared.OptionInfo(
            512, "Image size of the LowBit tab's calibration runs", gr.Slider,
            {"minimum": 64, "maximum": 2048, "step": 64}, section=SECTION))


# ------------------------------------------------------------------------------------------------- the tab
def on_ui_tabs():
    if not IS_FORGE:
        return []  # the tab's generations use Forge's UnetPatcher; on A1111 use Settings -> SD Unet
    from importlib import import_module

    app = import_module(f"{_pkg}.ui.app")
    blocks = app.build_blocks(webui.tab_backend())
    return [(blocks, "LowBit", "lowbit")]


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_model_loaded(webui.on_model_loaded)
if not IS_FORGE and hasattr(script_callbacks, "on_list_unets"):
    script_callbacks.on_list_unets(lambda options: options.extend(webui.a1111_unet_options()))


# ---------------------------------------------------------------------------------- the always-visible section
class LowBitScript(scripts.Script):
    sorting_priority = 20

    def title(self):
        return "LowBit"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        bits0 = webui.opt("lowbit_default_bits", "W8A8")
        method0 = webui.opt("lowbit_default_method", webui.DEFAULT_METHOD)
        with gr.Accordion("LowBit: quantized UNet", open=False, elem_id=self.elem_id("lowbit")):
            if not IS_FORGE:
                gr.Markdown("A1111: this section needs A1111 1.10 or later; without it, or to skip calibration, "
                            "choose a *LowBit* entry in Settings -> Stable Diffusion -> SD Unet.")
            enabled = gr.Checkbox(False, label="Enable (sample with a quantized UNet)", elem_id=self.elem_id("enable"))
            with gr.Row():
                bits = gr.Dropdown(list(webui.SCRIPT_BITS), value=bits0 if bits0 in webui.SCRIPT_BITS else "W8A8",
                                   label="Bits", elem_id=self.elem_id("bits"))
                method = gr.Dropdown(METHODS, value=method0 if method0 in METHODS else webui.DEFAULT_METHOD,
                                     label="Method", elem_id=self.elem_id("method"))
            with gr.Row():
                samples = gr.Slider(SAMPLES.lo, SAMPLES.hi, value=int(webui.opt("lowbit_calib_samples", 2)), step=1,
                                    label="Calibration samples", elem_id=self.elem_id("calib_samples"))
                steps = gr.Slider(STEPS.lo, STEPS.hi, value=int(webui.opt("lowbit_calib_steps", 8)), step=1,
                                  label="Calibration steps", elem_id=self.elem_id("calib_steps"))
            gr.Markdown("The first generation with new settings records its own full-precision calibration runs "
                        "(txt2img), then quantizes; later ones reuse the quantized UNet.")
        return [enabled, bits, method, samples, steps]

    def process(self, p, enabled=False, *args, **kwargs):
        if enabled and not HAS_SAMPLING_HOOK:  # say so instead of sampling in full precision silently
            log.warning("LowBit: %s", NOT_APPLIED)
            p.extra_generation_params["LowBit"] = NOT_APPLIED

    def process_batch(self, p, *args, **kwargs):
        # A1111 has applied the SD Unet setting by now; its infotext does not name the UNet, ours does
        label = None if IS_FORGE else webui.sd_unet_label()
        if label is not None and "LowBit" not in p.extra_generation_params:
            p.extra_generation_params["LowBit"] = f"{label.removeprefix('LowBit ')} (SD Unet)"

    def process_before_every_sampling(self, p, enabled=False, bits="W8A8", method=webui.DEFAULT_METHOD,
                                      calib_samples=2, calib_steps=8, *args, **kwargs):
        # Forge, A1111 >= 1.10. Errors here are reported by the WebUI, which then samples in full precision;
        # say so loudly in the log and the infotext rather than silently.
        try:
            webui.process_before_every_sampling(p, enabled, bits, method, calib_samples, calib_steps, **kwargs)
        except Exception as exc:
            p.extra_generation_params["LowBit"] = f"failed: {exc}"[:200]
            raise
