import pytest
import torch

from lowbit.kernels import ActQuant, PackedWeight, ops
from lowbit.kernels.formats import pack_int4, unpack_int4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(6, 7), (5, 3, 3, 3), (4, 1), (3, 10)])
def test_pack_unpack_round_trip(bits, shape):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    w.view(-1)[0], w.view(-1)[-1] = lo, hi  # both ends of the range
    scale = torch.rand(shape[0]) + 0.1
    pw = ops.pack_weight(w, bits, scale)
    k = w[0].numel()
    if bits <= 4:
        assert pw.qdata.dtype == torch.uint8 and tuple(pw.qdata.shape) == (shape[0], (k + 1) // 2)
    else:
        assert pw.qdata.dtype == torch.int8 and tuple(pw.qdata.shape) == (shape[0], k)
    assert pw.shape == shape and pw.K == k and pw.N == shape[0]
    assert torch.equal(ops.unpack_weight(pw), w)
    deq = ops.dequantize_weight(pw)
    assert deq.dtype == torch.float32 and tuple(deq.shape) == shape
    torch.testing.assert_close(deq, w.float() * scale.view(-1, *([1] * (len(shape) - 1))), rtol=0, atol=0)


def test_nibble_layout_low_is_even_k():
    w = torch.tensor([[1, -2, 7]], dtype=torch.int8)  # odd K: padded with a zero nibble
    packed = pack_int4(w)
    assert packed.tolist() == [[0x1 | (0xE << 4), 0x7]]
    assert unpack_int4(packed, 3).tolist() == [[1, -2, 7]]


def test_group_wise_dequantize():
    w = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    scale = torch.rand(3, 3) + 0.5  # groups of 4 over K=10: [0,4), [4,8), [8,10)
    pw = ops.pack_weight(w, 4, scale, group_size=4)
    expect = w.float() * scale.repeat_interleave(4, dim=1)[:, :10]
    torch.testing.assert_close(ops.dequantize_weight(pw), expect, rtol=0, atol=0)


def test_pack_rejects_out_of_range_and_bad_fields():
    with pytest.raises(ValueError, match=r"4-bit values must lie in \[-8, 7\]"):
        ops.pack_weight(torch.tensor([[8]]), 4, torch.ones(1))
    with pytest.raises(ValueError, match="scale must be fp32"):
        PackedWeight(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3), 8, (2, 3))
    with pytest.raises(ValueError, match="qdata must be uint8"):
        PackedWeight(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2), 4, (2, 3))


def test_nbytes_counts_cache():
    pw = ops.pack_weight(torch.zeros(4, 6, dtype=torch.int8), 4, torch.ones(4))
    assert pw.nbytes() == 4 * 3 + 4 * 4
    pw.cache["x"] = {"t": torch.zeros(10, dtype=torch.int32)}
    assert pw.nbytes() == 4 * 3 + 4 * 4 + 40 and pw.nbytes(include_cache=False) == 28


def test_actquant_validation():
    a = ActQuant(8, 0.1, 3)
    assert a.qmax == 255 and a.scale == float(torch.tensor(0.1, dtype=torch.float32))
    with pytest.raises(ValueError):
        ActQuant(8, 0.1, 256)
    with pytest.raises(ValueError):
        ActQuant(8, -1.0, 0)
    with pytest.raises(ValueError):
        ActQuant(8, 0.1, 0, dynamic=True)
    assert ActQuant(8, None, 0, dynamic=True).zero_point is None
    with pytest.raises(Exception):
        a.bits = 4  # frozen


# ---- weight formats as registered objects ------------------------------------------------------------------
from lowbit.kernels.formats import FORMATS, default_format, get_format  # noqa: E402


@pytest.mark.parametrize("bits,group,name", [(8, None, "int8_channel"), (6, 32, "int8_group"),
                                             (4, None, "int4_channel"), (3, 64, "int4_group")])
def test_kernel_layouts_are_registered_and_agree_with_ops(bits, group, name):
    assert default_format(bits, group) == name and name in FORMATS
    fmt = get_format(name)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = torch.randint(lo, hi + 1, (6, 2, 3, 3), dtype=torch.int8)
    k = 18
    scale = torch.rand(6) + 0.1 if group is None else torch.rand(6, -(-k // group)) + 0.1
    pw = fmt.pack(w, bits, scale, group)
    ref = ops.pack_weight(w, bits, scale, group)
    assert pw.format == ref.format == name
    spec = fmt.storage(pw.shape, bits, group)
    st = fmt.to_storage(pw)
    assert set(spec) == set(st) and all(st[n].dtype == spec[n][0] and tuple(st[n].shape) == spec[n][1] for n in spec)
    assert torch.equal(fmt.unpack(pw), w) and torch.equal(ops.unpack_weight(ref), w)
    torch.testing.assert_close(fmt.dequantize(pw), ops.dequantize_weight(ref), rtol=0, atol=0)
    back = fmt.from_storage(st, pw.shape, bits, group)
    assert torch.equal(fmt.unpack(back), w)
    assert fmt.check_values(st, bits, group) is None
    bad = dict(st, w_scale=st["w_scale"].clone().fill_(0))
    assert "w_scale" in fmt.check_values(bad, bits, group)


def test_format_refuses_bits_and_groups_it_does_not_store():
    with pytest.raises(ValueError, match="stores 5..8-bit"):
        get_format("int8_channel").check(4, None)
    with pytest.raises(ValueError, match="group_size must be None"):
        get_format("int4_channel").check(4, 32)
    with pytest.raises(ValueError, match="positive integer group_size"):
        get_format("int4_group").check(4, 0)
    with pytest.raises(ValueError, match="unknown weight format 'nope'"):
        get_format("nope")
    with pytest.raises(ValueError, match="does not store"):
        ops.pack_weight(torch.zeros(2, 4, dtype=torch.int8), 4, torch.ones(2), None, format="int4_group")


def test_packed_weight_is_a_module_and_drops_its_cache_on_copy_and_move():
    import copy
    import pickle

    pw = ops.pack_weight(torch.ones(4, 6, dtype=torch.int8), 8, torch.ones(4))
    assert set(dict(pw.named_buffers())) == {"qdata", "scale"}
    pw.cache["x"] = torch.zeros(3)
    c = copy.deepcopy(pw)
    assert c.cache == {} and torch.equal(c.qdata, pw.qdata) and c.format == pw.format and pw.cache
    p2 = pickle.loads(pickle.dumps(pw))
    assert p2.cache == {} and torch.equal(p2.scale, pw.scale)
    pw.to(torch.bfloat16)  # dtype casts never touch integers or scales; caches are dropped
    assert pw.qdata.dtype == torch.int8 and pw.scale.dtype == torch.float32 and pw.cache == {}
