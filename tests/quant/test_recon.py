import torch

from lowbit.quant import QuantConfig, ReconConfig, get_context, quant_layers, quantize, reconstruct
from lowbit.quant.recon import FixedInt, find_units


def _weight_err(fp, q, calls):
    ctx = get_context(q)
    ctx.act_enabled = False
    err = 0.0
    try:
        with torch.no_grad():
            for c in calls:
                a, kw = c.to("cpu", torch.float32)
                err += float((q(*a, **kw).sample - fp(*a, **kw).sample).pow(2).sum())
    finally:
        ctx.act_enabled = True
    return err


def test_units_in_execution_order(unet, calls):
    q = quantize(unet, QuantConfig.preset("W4A8"), calls)
    names = [n for n, _ in find_units(q, calls[0])]
    assert names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")  # registration order differs
    assert names.index("conv_in") < names.index("down_blocks.0.resnets.0") and names[-1] == "conv_out"


def test_adaround_reconstruction_reduces_output_error(unet, calls):
    naive = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), calls)
    rec = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), calls)
    reconstruct(unet, rec, calls, ReconConfig(weight_iters=60))
    assert _weight_err(unet, rec, calls) < _weight_err(unet, naive, calls)
    mods = [l.modifier for _, l in quant_layers(rec)]
    assert all(isinstance(m, FixedInt) for m in mods)  # hard rounding, compact int8 storage
