"""bench/bench_unet.py's accounting: resident weight bytes include the packed weights' backend caches."""
import torch

from lowbit.bench import bench_unet as B


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                             attention_head_dim=4, norm_num_groups=8).eval()


def test_resident_bytes_count_packed_weights_and_their_caches():
    m = _tiny_unet()
    fp = B.resident_weight_bytes(m)
    assert fp == sum(p.numel() * 4 for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
    q = B._quantize_ours(m, "W8A8", 8)
    packed = B.resident_weight_bytes(q)
    assert 0.2 * fp < packed < 0.4 * fp  # int8 weights (+ fp32 float parts, scales, tables)
    s, t, text = B.inputs(8)
    with torch.no_grad():
        q(s, t, encoder_hidden_states=text)
    cached = sum(pw.nbytes(True) - pw.nbytes(False) for pw in q.modules()
                 if hasattr(pw, "cache") and hasattr(pw, "nbytes"))
    assert cached > 0 and B.resident_weight_bytes(q) == packed + cached


def test_op_profile_names_the_operators_of_one_call():
    """--profile's table: the operators of one call by own CPU time, the heaviest first, shares summing to <= 1."""
    x = torch.randn(256, 256)
    rows = B.op_profile(lambda: (x @ x).relu_().sum(), top=5)
    assert rows and rows == sorted(rows, key=lambda r: -r["ms"])
    assert any("mm" in r["op"] for r in rows)
    assert all(r["calls"] >= 1 and 0 <= r["share"] <= 1 for r in rows) and sum(r["share"] for r in rows) <= 1.0001


def test_w4a8_int8cache_variant_keeps_int8_copies_and_counts_them():
    """W4A8-int8cache: the int4 weights' int8 copies are kept (oneDNN runs them) and the weight bytes show it;
    W4A8 deployed untuned rebuilds them per call and keeps none."""
    s, t, text = B.inputs(8)
    sizes = {}
    for name in ("W4A8-untuned", "W4A8-int8cache"):
        q = B._quantize_ours(_tiny_unet(), name, 8)
        with torch.no_grad():
            out = q(s, t, encoder_hidden_states=text).sample
        pws = [m for m in q.modules() if hasattr(m, "cache") and hasattr(m, "nbytes") and m.bits <= 4]
        kept = [pw for pw in pws if "cpu.int8" in pw.cache or any(isinstance(k, tuple) or str(k).startswith("onednn.")
                                                                  and k != "onednn.wzp" for k in pw.cache)]
        sizes[name] = (B.resident_weight_bytes(q), len(pws), len(kept), out)
    (b4, n4, k4, o4), (b8, n8, k8, o8) = sizes["W4A8-untuned"], sizes["W4A8-int8cache"]
    assert n4 == n8 > 0 and k4 == 0 and k8 == n8
    assert b8 > b4 and torch.allclose(o4, o8, atol=1e-3, rtol=1e-3)
