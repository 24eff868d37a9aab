"""A weight format added in one file (``toy_format.py``) runs the whole path: quantize -> deploy -> save -> load ->
forward, named by ``QuantConfig(w_format="toy")``."""
import torch

import toy_format  # noqa: F401  (registers the "toy" format)
from lowbit.quant import QuantConfig, deploy_, load, quant_layers, quantize, save

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))


def out(m):
    with torch.no_grad():
        return m(X, torch.tensor([500] * 2), class_labels=torch.tensor([3, 10])).sample


def test_toy_format_round_trip(unet, calls, tmp_path):
    cfg = QuantConfig.preset("W8A8", w_format="toy")
    q = quantize(unet, cfg, calls)
    fake = out(q)
    layers = quant_layers(q)
    assert {m.w_format for _, m in layers} == {"toy"}
    deploy_(q)
    assert all(m.mode == "deployed" and m.packed.scale.shape == (1,) for _, m in layers)
    torch.testing.assert_close(out(q), fake, rtol=0, atol=1e-4)  # deployed == fake quantization
    p = save(q, str(tmp_path / "toy.safetensors"))
    from safetensors import safe_open

    with safe_open(p, "pt") as f:
        name = layers[0][0]
        assert f.get_tensor(f"{name}.s").shape == (1,) and f"{name}.qdata" not in f.keys()
    q2 = load(unet, p)
    assert {m.w_format for _, m in quant_layers(q2)} == {"toy"}
    assert torch.equal(out(q2), out(q))
    # differs from the per-channel kernel layout: the format is really used
    q3 = deploy_(quantize(unet, QuantConfig.preset("W8A8"), calls))
    assert not torch.equal(out(q3), out(q2))
