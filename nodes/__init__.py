"""LowBit's ComfyUI nodes (V1 classic API: works on old and new ComfyUI).

Import this package only relatively (``from .nodes import ...``): ComfyUI has its own top-level ``nodes``
module. Nothing here imports ComfyUI at import time (``comfy_adapter.py`` does, inside functions), so the
node classes can be inspected and tested without it.
"""
from .compare import LowBitCompareImages
from .finetune import LowBitEfficientDMFinetune
from .io import LowBitLoadQuantizedUNet, LowBitSaveQuantizedUNet
from .quantize import LowBitQuantizeUNet
from .sampler import LowBitPTQDKSampler, LowBitPTQDSampler
from .schedule import LowBitBitwidthSchedule

_NODES = (
    ("LowBitQuantizeUNet", LowBitQuantizeUNet, "Quantize UNet (LowBit)"),
    ("LowBitBitwidthSchedule", LowBitBitwidthSchedule, "Bitwidth Schedule (LowBit)"),
    ("LowBitPTQDSampler", LowBitPTQDSampler, "PTQD Sampler (LowBit)"),
    ("LowBitPTQDKSampler", LowBitPTQDKSampler, "PTQD KSampler (LowBit)"),
    ("LowBitEfficientDMFinetune", LowBitEfficientDMFinetune, "EfficientDM LoRA Fine-tune (LowBit)"),
    ("LowBitSaveQuantizedUNet", LowBitSaveQuantizedUNet, "Save Quantized UNet (LowBit)"),
    ("LowBitLoadQuantizedUNet", LowBitLoadQuantizedUNet, "Load Quantized UNet (LowBit)"),
    ("LowBitCompareImages", LowBitCompareImages, "Compare Images (LowBit)"),
)

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, _, name in _NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
