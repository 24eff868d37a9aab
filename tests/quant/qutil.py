import torch


def tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11,
                       norm_num_groups=8).eval().requires_grad_(False)


def record(unet, ts=(900, 600, 300, 50), seed=1):
    from lowbit.quant import CallRecorder

    g = torch.Generator().manual_seed(seed)
    lab = torch.tensor([1, 2, 3, 10])
    with CallRecorder(unet) as rec, torch.no_grad():
        for t in ts:
            unet(torch.randn(4, 1, 16, 16, generator=g), torch.tensor([t] * 4), class_labels=lab)
    return rec.calls


def state_copy(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_state(m, before):
    after = m.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def output_error(fp, q, calls, mean=False):
    """Squared error of ``q``'s UNet outputs against ``fp``'s on ``calls`` (summed, or the mean per call)."""
    from lowbit.quant.calib import unet_output

    err = 0.0
    with torch.no_grad():
        for c in calls:
            a, kw = c.to("cpu", torch.float32)
            d = (unet_output(q(*a, **kw)) - unet_output(fp(*a, **kw))).pow(2)
            err += float(d.mean() if mean else d.sum())
    return err
