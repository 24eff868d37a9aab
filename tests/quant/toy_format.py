"""A toy weight format in one file: 2..8-bit integers stored one per byte with ONE fp32 scale for the whole tensor.

Importing this module registers it; ``QuantConfig(w_format="toy")`` then uses it. No backend's integer kernels read
it (``backends = ()``), so quantized layers compute ``op(fake_quant_act(x), dequantize(w))``.
"""
import math

import torch

from lowbit.kernels.formats import PackedWeight, WeightFormat, int_range, register_format


@register_format
class ToyPerTensor(WeightFormat):
    name = "toy"
    bits_range = (2, 8)
    grouped = False
    backends = ()

    def storage(self, shape, bits, group_size):
        return {"q": (torch.int8, (int(shape[0]), math.prod(int(d) for d in shape[1:]))),
                "s": (torch.float32, (1,))}

    def to_storage(self, pw):
        return {"q": pw.qdata, "s": pw.scale}

    def from_storage(self, tensors, shape, bits, group_size):
        return PackedWeight(tensors["q"], tensors["s"], bits, shape, None, self.name)

    def check_values(self, tensors, bits, group_size):
        s = float(tensors["s"][0])
        if not (math.isfinite(s) and s > 0):
            return "s must be a finite positive scale"
        lo, hi = int_range(bits)
        q = tensors["q"]
        if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
            return f"q holds values outside [{lo}, {hi}]"
        return None

    def constrain_scale(self, scale):
        return torch.full_like(scale, float(scale.max()))  # one step size for every channel

    def fake_scale(self, pw):
        return pw.scale.expand(pw.N).clone()

    def pack(self, w_int, bits, scale, group_size):
        self.check(bits, group_size)
        if scale.numel() and not torch.all(scale == scale.reshape(-1)[0]):
            raise ValueError("toy format: the step sizes must be equal for every channel (constrain_scale)")
        q = w_int.reshape(w_int.shape[0], -1).to(torch.int8).contiguous()
        return PackedWeight(q, scale.reshape(-1)[:1].float().contiguous(), bits, tuple(w_int.shape), None, self.name)

    def unpack(self, pw):
        return pw.qdata.reshape(pw.shape)

    def dequantize(self, pw):
        return (pw.qdata.float() * pw.scale).reshape(pw.shape)
