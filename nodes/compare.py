"""The "Compare Images (LowBit)" node: full-precision vs quantized images, PSNR, SSIM and a difference heat map.

Images are ComfyUI IMAGE tensors: float [B, H, W, 3] in [0, 1].

The math (PSNR, SSIM on luminance, the heat map) is the core's ``quant/compare.py``.

The UI payload ``{"a_images": [...], "b_images": [...]}`` is the one ComfyUI's core Image Compare widget and
rgthree's comparer read; ``web/js/lowbit_compare.js`` draws a before/after slider from it (classic canvas and
Nodes 2.0; checked in frontends 1.27.10 and 1.58.1 by ``tests/nodes/test_comfyui_browser.py``).
"""
from __future__ import annotations

import math

from ..quant.compare import compare as compare_images
from .common import CATEGORY, SOCKET


class LowBitCompareImages:
    DESCRIPTION = ("Compare the full-precision result (image_a) with the quantized one (image_b): PSNR and SSIM "
                   "(luminance, 11x11 Gaussian window) per image, a before/after slider on the node, and a "
                   "difference heat map output (white = largest difference).")
    CATEGORY = f"{CATEGORY}/image"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("difference_map", "metrics")
    OUTPUT_TOOLTIPS = ("Per-pixel |a - b| heat map, black = identical, white = largest difference.",
                       "PSNR and SSIM per image as text.")
    OUTPUT_NODE = True
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_a": SOCKET("IMAGE", "Reference image(s), normally from the full-precision model."),
            "image_b": SOCKET("IMAGE", "Image(s) to compare, normally from the quantized model (same seed and "
                                       "size)."),
        }}

    def compare(self, image_a, image_b):
        from . import comfy_adapter as adapter

        p, s, heat, text = compare_images(image_a, image_b)
        ui = {"a_images": adapter.save_preview(image_a, "lowbit_compare_a"),
              "b_images": adapter.save_preview(image_b, "lowbit_compare_b"),
              "text": [text],
              "psnr": [None if math.isinf(v) else v for v in p], "ssim": s}
        return {"ui": ui, "result": (heat, text)}
