"""Calibration memory stays bounded on an SD1.5-architecture UNet (issue 4).

The whole pipeline (record calls, quantize W4A8, AdaRound/BRECQ reconstruction, PTQD statistics) runs on
a random-weight diffusers UNet2DConditionModel with the SD1.5 configuration at an 8x8 latent, in a child
process. A sampling thread records the resident memory; what the pipeline adds on top of the float model
(peak RSS during the pipeline minus RSS once the model is built) must stay below 2.0x the fp32 weight bytes.
Stated bound: the quantized copy shares the float weights, AdaRound state (alpha, floor, Adam moments)
exists for one block at a time, reconstructed integers are kept as int8 (0.25x), packed weights add 0.13x,
cached block inputs are fp16 for one block at a time; the rest is allocator slack from per-layer
temporaries. Measured here: 1.51x. Without streaming (every block's activations for every sample cached, as
in the papers' code) memory grows with samples x blocks instead."""
import json
import subprocess
import tempfile
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import os, json, threading, time
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from diffusers import UNet2DConditionModel
    from lowbit.quant import (CallRecorder, QuantConfig, ReconConfig, collect_stats, quantize, reconstruct,
                              attach_stats, deploy_, weight_bytes)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval().requires_grad_(False)
    fp_bytes = sum(p.numel() * 4 for p in unet.parameters())
    import gc; gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    base = rss()
    peak = [base]
    done = threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)
    threading.Thread(target=watch, daemon=True).start()
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in (900, 300):
            unet(torch.randn(2, 4, 8, 8), torch.tensor([t, t]), encoder_hidden_states=torch.randn(2, 77, 768))
    q = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), rec.calls)
    reconstruct(unet, q, rec.calls, ReconConfig(weight_iters=1, act_iters=1))
    attach_stats(q, collect_stats(unet, q, rec.calls))
    deploy_(q)
    peak[0] = max(peak[0], rss())
    done.set()
    print(json.dumps(dict(fp_bytes=fp_bytes, peak=peak[0], base=base, q_bytes=weight_bytes(q))))
''')


@pytest.mark.slow
def test_calibration_memory_bounded_on_sd15_architecture():
    # cwd outside the repository root (see tests/quant/test_save_files.py)
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=1800,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = (res["peak"] - res["base"]) / res["fp_bytes"]
    print(f"float model {res['fp_bytes'] / 2**30:.2f} GiB; the pipeline added {ratio:.2f}x on top (peak "
          f"{res['peak'] / 2**30:.2f} GiB)")
    assert ratio < 2.0, res
