"""EfficientDM fine-tuning under torchrun + DistributedDataParallel (gloo, 2 CPU processes, tiny UNet, a few steps)."""
import os
import socket
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import os, sys, json
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, {testdir!r})
    from test_efficientdm import tiny_unet, record
    from lowbit.quant import FinetuneConfig, QuantConfig, quantize
    from lowbit.quant import efficientdm as E
    from lowbit.quant.context import get_context

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    unet = tiny_unet()
    calls = record(unet, 0, steps=6)
    torch.manual_seed(0)
    q = quantize(unet, QuantConfig.preset("W4A4"), calls)
    seen = []
    s = E.finetune(q, unet, calls, FinetuneConfig(steps=3, rank=4, batch_size=4, time_bins=6, lr_scale_factor=0.4,
                                                  act_lr=1e-3, seed=0),
                   progress=lambda d, n, info: seen.append(info["loss"]))
    out = os.path.join({outdir!r}, "rank%d" % rank)
    E.save_adapters(s, out)
    json.dump(dict(losses=seen, **{{k: v for k, v in get_context(s).finetune_info.items() if k != "config"}}),
              open(os.path.join(out, "info.json"), "w"))
    dist.destroy_process_group()
''')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical(tmp_path):
    import json

    from safetensors.torch import load_file

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(testdir=os.path.dirname(os.path.abspath(__file__)), outdir=str(tmp_path)))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    info = [json.load(open(tmp_path / f"rank{r}" / "info.json")) for r in (0, 1)]
    assert [i["rank"] for i in info] == [0, 1] and all(i["world_size"] == 2 for i in info)
    assert info[0]["shard"] + info[1]["shard"] == info[0]["calls"]  # disjoint shards of the recorded calls
    assert info[0]["losses"] == info[1]["losses"]  # the divergence check sees the rank-averaged loss
    for name in ("adapter_model.safetensors", "lowbit_talsq.safetensors"):
        a = load_file(str(tmp_path / "rank0" / name))
        b = load_file(str(tmp_path / "rank1" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k  # gradients all-reduced: both ranks hold the same weights
    a = load_file(str(tmp_path / "rank0" / "adapter_model.safetensors"))
    moved = [k for k, v in a.items() if k.endswith("lora_B.weight") and v.abs().max() > 0]
    assert moved  # training happened (B starts at 0)
