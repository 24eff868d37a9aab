"""Helpers for the transaction and numerics tests: a very small UNet, its calls, and a deep fingerprint of a
model's whole state (written independently of quant/transaction.py, so the tests can catch its faults)."""
import math

import torch


def micro_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=3).eval().requires_grad_(False)


def micro_calls(unet, ts=(900, 500, 100), seed=1, n=2):
    from lowbit.quant import CallRecorder

    g = torch.Generator().manual_seed(seed)
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in ts:
            unet(torch.randn(n, 1, 8, 8, generator=g), torch.tensor([t] * n), class_labels=torch.arange(n) % 3)
    return rec.calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).clone() if t.dtype != torch.bool else t.clone()


def _ours(v) -> bool:
    return (getattr(type(v), "__module__", "") or "").startswith("lowbit.") and hasattr(v, "__dict__")


def _val(v, depth=0):
    """A comparable picture of a Python value: tensors by dtype/shape/bits/flags, containers recursively,
    LowBit's own objects by identity and contents, anything else by type and identity."""
    if depth > 12:
        return ("deep", type(v).__name__, id(v))
    if v is None or isinstance(v, (bool, int, str, bytes)):
        return v
    if isinstance(v, float):
        return ("float", v) if not math.isnan(v) else ("nan",)
    if isinstance(v, torch.Tensor) and v.layout != torch.strided:  # opaque backend caches (oneDNN blobs)
        return ("opaque", id(v), v.dtype, tuple(v.shape))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.dtype, tuple(v.shape), _bits(v), v.requires_grad, v.grad is None)
    if isinstance(v, torch.Generator):
        return ("gen", id(v), _bits(v.get_state()))
    if isinstance(v, torch.nn.Module):
        return ("module", type(v).__name__, id(v))
    if isinstance(v, dict):
        return ("dict", id(v), [(k, _val(x, depth + 1)) for k, x in v.items()])
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, id(v) if isinstance(v, list) else None, [_val(x, depth + 1) for x in v])
    if _ours(v):
        return ("obj", type(v).__name__, id(v), [(k, _val(x, depth + 1)) for k, x in vars(v).items()])
    return ("other", type(v).__name__, id(v))


def deep_state(model: torch.nn.Module) -> dict:
    """Every module's attributes (flags, hooks, modifiers, observation reservoirs, the LowBit context reached
    through the timestep hook), parameters and buffers (identity, bits, requires_grad, grad)."""
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for k, v in mod.__dict__.items():
            if k == "_modules":
                out[f"{name}:_modules"] = [(c, id(m)) for c, m in v.items()]
            else:
                out[f"{name}:{k}"] = _val(v)
    return out


def assert_same_deep(after: dict, before: dict):
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))[:5]
    for k in before:
        assert _eq(after[k], before[k]), f"{k} changed"


def _eq(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def tensor_bits(model: torch.nn.Module) -> dict:
    """Name -> bits of every parameter and buffer (for comparing two distinct models bit for bit)."""
    return {k: (v.dtype, tuple(v.shape), _bits(v)) for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), f"{k} differs"


def outputs(model, calls):
    from lowbit.quant.calib import unet_output

    with torch.no_grad():
        return [unet_output(model(*c.to("cpu", torch.float32)[0], **c.to("cpu", torch.float32)[1])).clone()
                for c in calls]
