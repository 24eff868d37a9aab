"""Calibration memory stays bounded on an SD1.5-architecture UNet (issue 4).

The whole pipeline (record calls, quantize W4A8, AdaRound/BRECQ reconstruction, PTQD statistics) runs on
a random-weight diffusers UNet2DConditionModel with the SD1.5 configuration at an 8x8 latent, in a child
process whose peak RSS must stay below 2.5x the fp32 weight bytes (stated bound; the float model itself is
1.0x, the quantized copy shares its weights)."""
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import os, resource, json
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from diffusers import UNet2DConditionModel
    from lowbit.quant import (CallRecorder, QuantConfig, ReconConfig, collect_stats, quantize, reconstruct,
                              attach_stats, deploy_, weight_bytes)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval().requires_grad_(False)
    fp_bytes = sum(p.numel() * 4 for p in unet.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in (900, 300):
            unet(torch.randn(2, 4, 8, 8), torch.tensor([t, t]), encoder_hidden_states=torch.randn(2, 77, 768))
    q = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), rec.calls)
    reconstruct(unet, q, rec.calls, ReconConfig(weight_iters=1))
    attach_stats(q, collect_stats(unet, q, rec.calls))
    deploy_(q)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(fp_bytes=fp_bytes, peak=peak, base=base, q_bytes=weight_bytes(q))))
''')


def test_calibration_memory_bounded_on_sd15_architecture():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = res["peak"] / res["fp_bytes"]
    print(f"peak RSS {res['peak'] / 2**30:.2f} GiB = {ratio:.2f}x fp32 weights")
    assert ratio < 2.5, res
