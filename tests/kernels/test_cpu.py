"""cpu / onednn backends against the eager reference (integer paths ~1e-5, bf16 paths ~2e-2)."""
import pytest
import torch

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops, registry
from lowbit.kernels import cpu as cpu_mod

INT_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.mark.parametrize("backend", ["cpu", "onednn"])
@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("act", [ActQuant(8, 0.04, 131), ActQuant(8, dynamic=True), ActQuant(4, 0.3, 6),
                                 ActQuant(4, dynamic=True)])
def test_linear_int(clean_env, backend, wbits, act):
    clean_env.setenv("LOWBIT_CPU_CACHE_INT4", "1")  # lets onednn take int4 weights too
    x = torch.randn(3, 41, 96)
    pw = ops.quantize_weight(torch.randn(80, 96) * 0.05, wbits)
    bias = torch.randn(80)
    ref = ops.run_on("eager", "linear", x, pw, bias, act)
    if backend == "onednn" and act.dynamic:
        pytest.raises(Exception, ops.run_on, backend, "linear", x, pw, bias, act)
        return
    out = ops.run_on(backend, "linear", x, pw, bias, act)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < INT_TOL


@pytest.mark.parametrize("backend", ["cpu", "onednn"])
@pytest.mark.parametrize("k,stride,pad,dil", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("act", [ActQuant(8, 0.05, 100), ActQuant(8, dynamic=True)])
def test_conv_int(clean_env, backend, k, stride, pad, dil, act):
    x = torch.randn(2, 12, 11, 9)
    pw = ops.quantize_weight(torch.randn(20, 12, k, k) * 0.05, 8)
    bias = torch.randn(20)
    ref = ops.run_on("eager", "conv2d", x, pw, bias, stride, pad, dil, 1, act)
    if backend == "onednn" and dil > 1:  # declined (test_onednn_declines_the_convolutions_it_computes_wrong)
        ok, why = registry.get_backend("onednn").check("conv2d", x, pw, bias, (stride,) * 2, (pad,) * 2, (dil,) * 2,
                                                          1, act)
        assert not ok and "dilation" in why
        return
    out = ops.run_on(backend, "conv2d", x, pw, bias, stride, pad, dil, 1, act)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < INT_TOL


def test_onednn_grouped_conv(clean_env):
    x = torch.randn(1, 8, 7, 7)
    pw = ops.quantize_weight(torch.randn(16, 4, 3, 3), 8)
    act = ActQuant(8, 0.05, 120)
    ref = ops.run_on("eager", "conv2d", x, pw, None, 1, 1, 1, 2, act)
    assert rel_err(ops.conv2d(x, pw, None, 1, 1, 1, 2, act), ref) < INT_TOL


def test_int4_unpacked_per_call_unless_cache_enabled(clean_env):
    x = torch.randn(8, 64)
    pw = ops.quantize_weight(torch.randn(32, 64), 4)
    act = ActQuant(8, dynamic=True)
    base = pw.nbytes()
    ops.run_on("cpu", "linear", x, pw, None, act)
    assert "cpu.int8" not in pw.cache and pw.nbytes() <= base + 4 * 32  # only the int32 rowsum was added
    ok, why = cpu_mod.onednn.check("linear", x, pw, None, ActQuant(8, 0.1, 100))
    assert not ok and "LOWBIT_CPU_CACHE_INT4=1" in why
    clean_env.setenv("LOWBIT_CPU_CACHE_INT4", "1")
    ops.run_on("cpu", "linear", x, pw, None, act)
    assert pw.cache["cpu.int8"].dtype == torch.int8 and pw.nbytes() >= base + 32 * 64


@pytest.mark.parametrize("m", [4, 200])  # int4pack GEMV path and dequantize + bf16 GEMM path
@pytest.mark.parametrize("gs", [None, 64, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linear(clean_env, m, gs, dtype):
    x = torch.randn(m, 128, dtype=dtype)
    pw = ops.quantize_weight(torch.randn(48, 128), 4, gs)
    bias = torch.randn(48)
    ref = ops.run_on("eager", "linear", x, pw, bias, None)
    out = ops.run_on("cpu", "linear", x, pw, bias, None)
    assert out.dtype == dtype and rel_err(out, ref) < BF16_TOL


def test_weight_only_conv_and_int8(clean_env):
    x = torch.randn(1, 16, 8, 8)
    for bits in (4, 8):
        pw = ops.quantize_weight(torch.randn(32, 16, 3, 3), bits)
        ref = ops.run_on("eager", "conv2d", x, pw, None, 1, 1, 1, 1, None)
        assert rel_err(ops.run_on("cpu", "conv2d", x, pw, None, 1, 1, 1, 1, None), ref) < BF16_TOL
        xl = torch.randn(5, 48)
        pwl = ops.quantize_weight(torch.randn(32, 48), bits)
        refl = ops.run_on("eager", "linear", xl, pwl, None, None)
        assert rel_err(ops.run_on("cpu", "linear", xl, pwl, None, None), refl) < BF16_TOL


def test_bf16_input_int_path(clean_env):
    x = torch.randn(16, 64).bfloat16()
    pw = ops.quantize_weight(torch.randn(32, 64), 8)
    act = ActQuant(8, 0.03, 128)
    out = ops.linear(x, pw, None, act)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ops.run_on("eager", "linear", x, pw, None, act)) < 1e-2


def _act_quant_cases(bits, scale, zp, dtype):
    act = ActQuant(bits, scale, zp)
    g = torch.Generator().manual_seed(bits)
    k = torch.randint(-300, 300, (4000,), generator=g).float() + 0.5
    ties = (k * act.scale).float()  # x / scale lands on (or next to) a half-integer
    x = torch.cat([torch.randn(20000, generator=g) * act.scale * act.qmax / 3, ties, torch.nextafter(ties, ties + 1),
                   torch.nextafter(ties, ties - 1), torch.tensor([float("inf"), -float("inf"), 3e9, -3e9, 1e30, 0.0,
                                                                  -0.0])]).to(dtype)
    from lowbit.kernels.eager import quantize_act

    return act, x, quantize_act(x, act)[0].to(torch.uint8)


ACT_CASES = [(8, 0.0123, 100), (8, 0.37, 0), (8, 1e-3, 255), (6, 0.05, 17), (4, 0.3, 6)]


@pytest.mark.parametrize("bits,scale,zp", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_static_act_quant_is_the_reference_exactly(clean_env, bits, scale, zp, dtype):
    """LOWBIT_CPU_EXACT_ACT_QUANT=1: the static quantizer (true division, round half to even, then clamp + zero
    point + uint8 in one pass) gives the reference's codes bit for bit, ties and out-of-range values included."""
    act, x, ref = _act_quant_cases(bits, scale, zp, dtype)
    assert torch.equal(cpu_mod.quant_static(x, act), ref)
    assert torch.equal(cpu_mod.quant_static(x.reshape(1, -1, 1, 1), act).flatten(), ref)


@pytest.mark.parametrize("bits,scale,zp", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_static_act_quant_is_one_step_from_the_reference_at_ties_only(clean_env, bits, scale, zp, dtype):
    """Default (fused one-pass quantizer, x * (1/scale) + zp rounded once): every code within one step of the
    reference's; a differing code only where x / scale is within a few ulps of a rounding tie; out-of-range values
    and zeros exact. Among fp32 values that are not constructed ties about 3 per million differ (bound here: 2 of
    20000); bf16 values, with 8 significant bits, land exactly on ties far more often (~1 % here), and there the two
    tie-breaks (half to even before or after adding the zero point) differ for odd zero points."""
    clean_env.delenv("LOWBIT_CPU_EXACT_ACT_QUANT")
    act, x, ref = _act_quant_cases(bits, scale, zp, dtype)
    q = cpu_mod.quant_static(x, act)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    d = (q.int() - ref.int()).abs()
    assert int(d.max()) <= 1
    y = x.float() / torch.tensor(act.scale, dtype=torch.float32)
    near_tie = (y - y.floor() - 0.5).abs() <= 8 * torch.finfo(torch.float32).eps * y.abs().clamp(min=1)
    assert not bool(((d > 0) & ~near_tie).any())
    if dtype == torch.float32:
        assert int(d[:20000].sum()) <= 2
    assert torch.equal(q[-7:], ref[-7:])  # +-inf, +-3e9, 1e30, +-0
    assert torch.equal(cpu_mod.quant_static(x.reshape(1, -1, 1, 1), act).flatten(), q)


@pytest.mark.parametrize("backend", ["cpu", "onednn"])
def test_default_fused_codes_stay_near_the_reference(clean_env, backend):
    """The default (fused activation codes) through the integer kernels: within 1e-3 of the reference (a code one
    step off at a tie moves one product term), and exactly the float path's result with the same codes."""
    clean_env.delenv("LOWBIT_CPU_EXACT_ACT_QUANT")
    x = torch.randn(3, 41, 96)
    pw = ops.quantize_weight(torch.randn(80, 96) * 0.05, 8)
    act = ActQuant(8, 0.04, 131)
    out = ops.run_on(backend, "linear", x, pw, None, act)
    assert rel_err(out, ops.run_on("eager", "linear", x, pw, None, act)) < 1e-3
    assert rel_err(out, ops.run_on("dense", "linear", x, pw, None, act)) < INT_TOL


@pytest.mark.parametrize("shape,bits,group", [((37, 101), 4, None), ((300, 256), 4, 128), ((64, 33, 3, 3), 8, None),
                                              ((129, 64), 4, 32), ((40, 30, 3, 3), 4, None), ((24, 96), 4, 64),
                                              ((16, 50), 4, 5)])
def test_weight_dequant_in_row_chunks_is_the_whole_product(monkeypatch, shape, bits, group):
    """The weight-only path's bf16 weight, built in row chunks (small temporaries), equals the one-shot
    ``(q.float() * scale).bfloat16()`` bit for bit, whatever the chunk boundaries."""
    from lowbit.kernels.eager import expand_scale
    from lowbit.kernels.formats import unpack_int4

    pw = ops.quantize_weight(torch.randn(*shape), bits, **({} if group is None else {"group_size": group}))
    q = unpack_int4(pw.qdata, pw.K) if bits <= 4 else pw.qdata
    ref = (q.to(torch.float32) * expand_scale(pw)).to(torch.bfloat16).reshape(pw.shape)
    for chunk in (1, 7 * pw.K, 1 << 21):  # one row per chunk, 7 rows, everything at once
        monkeypatch.setattr(cpu_mod, "_DEQUANT_CHUNK", chunk)
        assert torch.equal(cpu_mod._dequant_bf16(pw), ref)


@pytest.mark.parametrize("backend", ["onednn", "dense"])
def test_conv_keeps_the_input_layout(clean_env, backend):
    """NCHW in, NCHW out (as F.conv2d); channels-last in, channels-last out, also for a channel slice of a
    channels-last tensor (what a split convolution's parts read): the codes are written in the input's layout
    and the result is the NCHW computation's, whatever the layout."""
    clean_env.delenv("LOWBIT_CPU_EXACT_ACT_QUANT")
    x = torch.randn(2, 24, 9, 7)
    pw = ops.quantize_weight(torch.randn(16, 12, 3, 3) * 0.05, 8)
    act = ActQuant(8, 0.05, 120)
    part = x[:, 12:]  # an NCHW channel slice: contiguous
    ref = ops.run_on(backend, "conv2d", part.contiguous(), pw, None, 1, 1, 1, 1, act)
    assert ref.is_contiguous()
    xcl = x.contiguous(memory_format=torch.channels_last)
    for inp in (part.contiguous(memory_format=torch.channels_last), xcl[:, 12:]):
        assert cpu_mod.channels_last(inp)
        out = ops.run_on(backend, "conv2d", inp, pw, None, 1, 1, 1, 1, act)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert rel_err(out, ref) < INT_TOL
    codes = cpu_mod.quant_static_fused(xcl, act)
    assert codes.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cpu_mod._u8_view(codes), cpu_mod._u8_view(cpu_mod.quant_static_fused(x, act)))
    assert not cpu_mod.channels_last(x) and not cpu_mod.channels_last(torch.randn(3, 4))


def test_serial_runs_small_work_on_one_thread_and_restores_the_count(monkeypatch):
    """Under OMP_WAIT_POLICY=PASSIVE small quantizations and copies run on the calling thread (a parallel region
    costs a thread wake-up there); the thread count is restored, also when the work raises."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        cpu_mod._serial(100, 100, lambda: seen.append(torch.get_num_threads()))
        cpu_mod._serial(100, 101, lambda: seen.append(torch.get_num_threads()))
        assert seen == [1, 2] and torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            cpu_mod._serial(100, 1, lambda: 1 / 0)
        assert torch.get_num_threads() == 2
        # the quantizer takes the path under the module's thresholds, with the same codes
        x = torch.randn(4, 8, 5, 5)
        act = ActQuant(8, 0.05, 120)
        par = cpu_mod._u8_view(cpu_mod.quant_static_fused(x, act)).clone()
        monkeypatch.setattr(cpu_mod, "SERIAL_QUANT_MAX", 1 << 20)
        calls = []
        real = cpu_mod._serial
        monkeypatch.setattr(cpu_mod, "_serial", lambda lim, n, fn, *a: calls.append((lim, n)) or real(lim, n, fn, *a))
        cpu_mod._LAST_CODES.clear()  # (the same x again would reuse the codes just computed)
        assert torch.equal(cpu_mod._u8_view(cpu_mod.quant_static_fused(x, act)), par)
        assert calls == [(1 << 20, x.numel())]
    finally:
        torch.set_num_threads(threads)


def test_weight_only_scratch_buffer_is_shared_but_never_kept(clean_env):
    """Weight-only layers build their bf16 weight in one per-thread scratch buffer: layers of different sizes in
    turn give exactly the results of fresh buffers, the buffer grows to the largest weight and no more, and with
    a gradient to compute (autograd keeps the weight for backward) a fresh buffer is used."""
    import torch.nn.functional as F

    pws = [ops.quantize_weight(torch.randn(64, 32, 3, 3), 4), ops.quantize_weight(torch.randn(16, 32, 3, 3), 8),
           ops.quantize_weight(torch.randn(40, 32, 3, 3), 4)]
    x = torch.randn(2, 32, 6, 6)
    fresh = [F.conv2d(x.bfloat16(), cpu_mod._dequant_bf16(pw), padding=1).float() for pw in pws]
    cpu_mod._SCRATCH.__dict__.pop("bf16", None)
    for _ in range(2):
        for pw, ref in zip(pws, fresh):
            assert torch.equal(ops.run_on("cpu", "conv2d", x, pw, None, 1, 1, 1, 1, None), ref)
    assert cpu_mod._SCRATCH.bf16.numel() == 64 * 32 * 9
    xg = x.clone().requires_grad_(True)
    y = ops.run_on("cpu", "conv2d", xg, pws[0], None, 1, 1, 1, 1, None)
    ops.run_on("cpu", "conv2d", x, pws[2], None, 1, 1, 1, 1, None)  # reuses the scratch buffer
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    F.conv2d(xr.bfloat16(), cpu_mod._dequant_bf16(pws[0]), padding=1).float().sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    cpu_mod._SCRATCH.__dict__.pop("bf16", None)
    clean_env.setenv("LOWBIT_CPU_DEQUANT_SCRATCH", "0")
    assert torch.equal(ops.run_on("cpu", "conv2d", x, pws[0], None, 1, 1, 1, 1, None), fresh[0])
    assert not hasattr(cpu_mod._SCRATCH, "bf16")


def test_scratch_buffer_made_under_inference_mode_is_written_outside_it(clean_env):
    """Hosts sample under ``torch.inference_mode()`` (ComfyUI, Forge's generation) and call LowBit outside it too
    (Forge's tab, a library user after a host-style run): the per-thread scratch buffer, first made inside that
    mode, is written again at every call. An inference tensor may not be written outside the mode ("Inplace update
    to inference tensor outside InferenceMode"): the buffer is always a plain tensor."""
    pw = ops.quantize_weight(torch.randn(16, 8, 3, 3), 4)
    x = torch.randn(1, 8, 5, 5)
    cpu_mod._SCRATCH.__dict__.pop("bf16", None)
    with torch.inference_mode():
        inside = ops.run_on("cpu", "conv2d", x, pw, None, 1, 1, 1, 1, None)
    assert not cpu_mod._SCRATCH.bf16.is_inference()
    assert torch.equal(ops.run_on("cpu", "conv2d", x, pw, None, 1, 1, 1, 1, None), inside)
    with torch.inference_mode():  # and back
        assert torch.equal(ops.run_on("cpu", "conv2d", x, pw, None, 1, 1, 1, 1, None), inside)


def test_large_planes_go_channels_last_in_channel_blocks(clean_env, monkeypatch):
    """uint8 activations with planes of >= BLOCKED_TRANSPOSE_MIN_HW pixels reach oneDNN's int8 conv channels-last,
    copied in blocks of channels (the values unchanged, any channel count, batch > 1); smaller planes and tensors
    already channels-last are left as they are. The conv through that path still matches the reference."""
    q = torch.randint(0, 256, (2, 70, 64, 65), dtype=torch.uint8)  # 70 channels: a partial last block
    cl = cpu_mod.u8_channels_last(q)
    assert torch.equal(cl, q) and cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    small = torch.randint(0, 256, (1, 8, 16, 16), dtype=torch.uint8)
    assert cpu_mod.u8_channels_last(small) is small and cpu_mod.u8_channels_last(cl) is cl
    monkeypatch.setattr(cpu_mod, "BLOCKED_TRANSPOSE_MIN_HW", 64)  # a conv small enough for a test takes the path
    calls = []
    real = cpu_mod.u8_channels_last
    monkeypatch.setattr(cpu_mod, "u8_channels_last", lambda t: calls.append(t.shape) or real(t))
    x = torch.randn(2, 40, 9, 11)
    pw = ops.quantize_weight(torch.randn(24, 40, 3, 3) * 0.05, 8)
    for act in (ActQuant(8, 0.05, 100), ActQuant(8, dynamic=True)):
        ref = ops.run_on("eager", "conv2d", x, pw, None, 1, 1, 1, 1, act)
        assert rel_err(ops.run_on("onednn", "conv2d", x, pw, None, 1, 1, 1, 1, act), ref) < INT_TOL
    assert calls  # the conv went through it


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_codes_are_padded_in_code_space_channels_last(clean_env, monkeypatch, blocked, layout):
    """The im2col conv pads the uint8 codes with the zero point (one per sample for dynamic ranges) instead of
    padding the float input before quantizing, and lays them out channels-last in the same pass (in blocks of
    channels for large planes): the same bytes as F.pad of the codes, made channels-last."""
    monkeypatch.setattr(cpu_mod, "BLOCKED_TRANSPOSE_MIN_HW", 1 if blocked else 1 << 30)
    q = torch.randint(0, 256, (3, 70, 9, 11), dtype=torch.uint8)  # 70 channels: a partial last block
    if layout == "channels_last":
        q = q.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        q = q.contiguous(memory_format=torch.channels_last)[:, 3:60]
    for zp in (100, torch.tensor([7.0, 0.0, 255.0])):
        for pad in ((1, 1), (2, 0), (0, 3), (0, 0)):
            out = cpu_mod._u8_nhwc_padded(q, pad, zp)
            zs = [zp] * 3 if isinstance(zp, int) else [int(z) for z in zp]
            ref = torch.cat([torch.nn.functional.pad(q[i:i + 1], (pad[1], pad[1], pad[0], pad[0]), value=z)
                             for i, z in enumerate(zs)])
            assert torch.equal(out, ref) and out.permute(0, 2, 3, 1).is_contiguous(), (zp, pad)


@pytest.mark.parametrize("x_layout", ["nchw", "channels_last", "bf16"])
def test_im2col_conv_large_plane_and_uneven_padding(clean_env, x_layout):
    """The cpu conv at a plane past the blocked-copy threshold, with uneven padding and stride: the reference's
    values, in the input's layout and dtype (fp32 NCHW outputs are written by the epilogue itself)."""
    x = torch.randn(2, 40, 64, 66)
    if x_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif x_layout == "bf16":
        x = x.bfloat16()
    pw = ops.quantize_weight(torch.randn(24, 40, 3, 3) * 0.05, 4)
    bias = torch.randn(24)
    for act in (ActQuant(8, 0.05, 100), ActQuant(8, dynamic=True)):
        for stride, pad in (((1, 1), (1, 2)), ((2, 1), (0, 1))):
            ref = ops.run_on("eager", "conv2d", x, pw, bias, stride, pad, (1, 1), 1, act)
            out = ops.run_on("cpu", "conv2d", x, pw, bias, stride, pad, (1, 1), 1, act)
            assert out.dtype == x.dtype and out.shape == ref.shape
            assert out.is_contiguous(memory_format=torch.channels_last if x_layout == "channels_last"
                                     else torch.contiguous_format)
            assert rel_err(out.float(), ref.float()) < (BF16_TOL if x_layout == "bf16" else INT_TOL)


@pytest.mark.parametrize("act", [ActQuant(8, 0.05, 100), ActQuant(8, dynamic=True), ActQuant(4, 0.3, 6)])
def test_int4_calls_with_few_rows_read_the_packed_bytes_in_halves(clean_env, monkeypatch, act):
    """An int4 weight whose int8 copy is not kept, called with few rows (output pixels) per output channel,
    multiplies 16 x its even-k and odd-k nibbles straight from the packed bytes against the activations' columns
    in the same order: bit for bit the result of the unpacked weight (integer arithmetic throughout), for Linear
    and for convolutions (stride, dilation, uneven padding, 1x1 and 3x1 kernels), and taken only where it should."""
    taken, allow = [], [True]
    real, real_ok = cpu_mod._int4_x16_halves, cpu_mod._halves_ok
    monkeypatch.setattr(cpu_mod, "_int4_x16_halves", lambda pw: taken.append(pw.shape) or real(pw))
    monkeypatch.setattr(cpu_mod, "_halves_ok", lambda pw, rows, gather=False: allow[0] and real_ok(pw, rows,
                                                                                                gather))

    def both(fn):
        taken.clear()
        y = fn()
        assert taken, "the halves path was not taken"
        allow[0] = False
        ref = fn()
        allow[0] = True
        return y, ref

    pw = ops.quantize_weight(torch.randn(48, 96) * 0.05, 4)
    bias = torch.randn(48)
    x = torch.randn(3, 5, 96)
    y, ref = both(lambda: ops.run_on("cpu", "linear", x, pw, bias, act))
    assert torch.equal(y, ref) and rel_err(y, ops.run_on("eager", "linear", x, pw, bias, act)) < INT_TOL
    for k, stride, pad, dil in [((3, 3), (1, 1), (1, 2), (1, 1)), ((3, 3), (2, 2), (1, 1), (2, 2)),
                                ((1, 1), (1, 1), (0, 0), (1, 1)), ((3, 1), (1, 2), (1, 0), (1, 1))]:
        cpw = ops.quantize_weight(torch.randn(384, 10, *k) * 0.05, 4)
        xc = torch.randn(1, 10, 6, 5)  # at most 42 output pixels: fewer than 384 channels / 4
        y, ref = both(lambda: ops.run_on("cpu", "conv2d", xc, cpw, bias[:1].expand(384).contiguous(), stride, pad,
                                         dil, 1, act))
        assert torch.equal(y, ref), (k, stride, pad, dil)
        eager = ops.run_on("eager", "conv2d", xc, cpw, bias[:1].expand(384).contiguous(), stride, pad, dil, 1, act)
        assert rel_err(y, eager) < INT_TOL
    taken.clear()
    ops.run_on("cpu", "linear", torch.randn(25, 96), pw, bias, act)  # more rows than channels / 2: unpacked
    ops.run_on("cpu", "linear", x[..., :95], ops.quantize_weight(torch.randn(48, 95), 4), None, act)  # odd K
    clean_env.setenv("LOWBIT_CPU_CACHE_INT4", "1")  # int8 copies kept: those are read
    ops.run_on("cpu", "linear", x, ops.quantize_weight(torch.randn(48, 96), 4), None, act)
    assert not taken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_only_int4_takes_strided_inputs(dtype):
    """A W4A16 layer in a half-precision model gets non-contiguous rows (a transposed or sliced activation): the
    int4pack GEMM refused them ("expect A to be contiguous")."""
    pw = ops.quantize_weight(torch.randn(32, 64) * 0.1, 4, group_size=32)
    x = torch.randn(64, 3).to(dtype).t()  # [3, 64], strided
    ref = ops.run_on("eager", "linear", x.float(), pw, None, None)
    out = ops.run_on("cpu", "linear", x, pw, None, None)
    assert out.dtype == dtype and rel_err(out.float(), ref) < 2e-2


@pytest.mark.parametrize("backend", ["cpu", "onednn"])
def test_kernel_larger_than_the_padded_input_is_refused_like_the_reference(clean_env, backend):
    """F.conv2d refuses a kernel larger than the padded input; the integer paths returned an empty output. Now
    they decline the call (dispatch then reaches the reference, which raises); found by audit."""
    pw = ops.quantize_weight(torch.randn(8, 3, 3, 3), 8)
    x = torch.randn(1, 3, 2, 2)
    act = ActQuant(8, 0.02, 128)
    with pytest.raises(Exception, match="smaller than the kernel"):
        ops.run_on(backend, "conv2d", x, pw, None, 1, 0, 1, 1, act)
    with pytest.raises(RuntimeError):
        ops.conv2d(x, pw, None, 1, 0, 1, 1, act)
    assert ops.run_on(backend, "conv2d", x, pw, None, 1, 1, 1, 1, act).shape == (1, 8, 2, 2)


def test_int4_halves_stay_within_the_int32_accumulator(clean_env):
    """The halves' accumulator holds 16 x the products: a row longer than HALVES_MAX_K could pass 2^31 and wrap
    (K = 70000, weights -8, inputs at the top code: +4.9e6 instead of -5.6e6; found by audit). Such weights take the
    unpacked path; one just below the bound is still exact on the halves path."""
    act = ActQuant(8, 10.0 / 255, 0)
    for k, halves in ((80000, False), (cpu_mod.HALVES_MAX_K - 1, True)):  # (80000: the halves would wrap)
        k -= k % 2
        pw = ops.quantize_weight(torch.full((2, k), -8.0), 4)
        assert cpu_mod._halves_ok(pw, 1) is halves
        x = torch.full((1, k), 10.0)
        y = ops.run_on("cpu", "linear", x, pw, None, act)
        assert rel_err(y, ops.run_on("eager", "linear", x, pw, None, act)) < INT_TOL


def test_static_codes_of_one_input_are_computed_once_and_never_reused_wrongly():
    """quant_static_fused keeps its last result: a second layer reading the same tensor with the same quantizer (a
    transformer's q / k / v projections) gets the same codes without a second pass; anything else computes anew."""
    from lowbit.kernels import cpu as C

    a = ActQuant(8, 0.03, 128)
    x = torch.randn(64, 32)
    with torch.no_grad():
        q = C.quant_static_fused(x, a)
        assert C.quant_static_fused(x.reshape(-1, 32), a) is q  # a view of the same memory: reused
        assert torch.equal(C._u8_view(q), C._u8_view(torch.quantize_per_tensor(x, 0.03, 128, torch.quint8)))
        assert C.quant_static_fused(x, ActQuant(8, 0.031, 128)) is not q  # another quantizer
        q = C.quant_static_fused(x, a)
        x.mul_(2)  # written in place since: its version counter moved
        q2 = C.quant_static_fused(x, a)
        assert q2 is not q and torch.equal(C._u8_view(q2), C._u8_view(torch.quantize_per_tensor(x, 0.03, 128,
                                                                                                torch.quint8)))
        assert C.quant_static_fused(x[:32], a) is not q2  # another shape over the same memory
        y = x.clone()
        assert C.quant_static_fused(y, a) is not C.quant_static_fused(x, a)
        del x, y  # freed: a new tensor at the same address must not match (weak reference to the base)
        for _ in range(5):
            z = torch.randn(64, 32)
            assert torch.equal(C._u8_view(C.quant_static_fused(z, a)),
                               C._u8_view(torch.quantize_per_tensor(z, 0.03, 128, torch.quint8)))
            del z
    import threading

    big = torch.randn(256, 64)
    C.quant_static_fused(big, a)
    assert threading.get_ident() in C._LAST_CODES
    del big  # the input freed: its codes are dropped with it (not kept for the life of the process)
    assert threading.get_ident() not in C._LAST_CODES
    with torch.inference_mode():  # no version counter: never reused
        w = torch.randn(8, 32)
        q = C.quant_static_fused(w, a)
        w.add_(1)
        assert C.quant_static_fused(w, a) is not q


@pytest.mark.parametrize("wbits", [8, 4])
def test_one_input_feature_is_not_given_to_int_mm(clean_env, wbits):
    """torch._int_mm on CPU returns wrong sums when the inner dimension is 1 (torch 2.13; found when a deployed
    W4A8 model with a Linear(1, n) time embedding gave outputs 2-3x off, at random): the cpu backend refuses K = 1
    (a Linear of one input feature, a 1x1 convolution of one channel) and another backend computes it, right."""
    g = torch.Generator().manual_seed(0)
    act = ActQuant(8, 0.9 / 255, 0)
    x = torch.rand(2, 1, generator=g)
    pw = ops.quantize_weight(torch.randn(16, 1, generator=g), wbits, None)
    x4 = torch.randn(2, 1, 5, 5, generator=g)
    pwc = ops.quantize_weight(torch.randn(8, 1, 1, 1, generator=g), wbits, None)
    actc = ActQuant(8, float(x4.abs().max()) / 127, 128)
    conv = (x4, pwc, None, (1, 1), (0, 0), (1, 1), 1, actc)
    for op, args in (("linear", (x, pw, None, act)), ("conv2d", conv)):
        ok, why = cpu_mod.cpu.check(op, *args)
        assert not ok and "K = 1" in why
        for _ in range(3):  # (the wrong sums were not even the same from call to call)
            assert rel_err(getattr(ops, op)(*args), ops.run_on("eager", op, *args)) < 1e-5


@pytest.mark.parametrize("shape,kernel,padding", [((1, 16, 8, 1), 3, 1), ((1, 16, 1, 12), (1, 3), 0),
                                                  ((1, 8, 1, 9), (1, 5), (0, 2))])
@pytest.mark.parametrize("wbits", [8, 4])
def test_im2col_rows_that_overlap_are_copied_before_int_mm(clean_env, shape, kernel, padding, wbits):
    """A one-pixel-wide (or one-row-high, with a 1 x N kernel: a 1-D signal) output at batch 1: ``reshape`` of the
    im2col view merges into a view whose rows overlap, and torch's CPU ``_int_mm`` returns wrong sums for it
    (relative error 1e4 seen through deploy_, where the tuner picked the cpu backend); the rows are copied."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pw = ops.quantize_weight(torch.randn(32, shape[1], kh, kw) * 0.1, wbits)
    x = torch.randn(*shape)
    pad = (padding, padding) if isinstance(padding, int) else padding
    act = ActQuant(8, 0.05, 128)
    ref = ops.run_on("eager", "conv2d", x, pw, None, (1, 1), pad, (1, 1), 1, act)
    assert rel_err(ops.run_on("cpu", "conv2d", x, pw, None, (1, 1), pad, (1, 1), 1, act), ref) < 2e-3


# (input shape, weight shape, stride, padding, dilation, groups): one case of each kind torch's oneDNN int8
# convolution computed wrong (or crashed on) in a fuzz against the reference
ONEDNN_WRONG = [((1, 2, 6, 6), (66, 1, 3, 3), (1, 1), (1, 1), (1, 1), 2),     # grouped, > 32 outputs per group
                ((1, 16, 16, 2), (16, 16, 3, 3), (2, 2), (1, 1), (1, 1), 1),  # SD downsampler on a width-2 input
                ((1, 8, 6, 7), (8, 8, 1, 3), (1, 2), (0, 0), (1, 1), 1),      # unequal strides
                ((1, 8, 16, 16), (8, 8, 3, 1), (1, 1), (1, 0), (1, 1), 1),    # (3, 1) kernel padded along H only
                ((1, 4, 5, 3), (4, 4, 1, 1), (2, 2), (1, 1), (2, 2), 1)]      # dilation (width 1 crashed)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", ONEDNN_WRONG)
def test_onednn_declines_the_convolutions_it_computes_wrong(clean_env, xs, ws, stride, padding, dilation, groups):
    """Those calls go to another backend (registry order and the tuner alike), whose result is the reference's."""
    pw = ops.quantize_weight(torch.randn(*ws) * 0.1, 8)
    x, act = torch.randn(*xs), ActQuant(8, 0.05, 128)
    args = (x, pw, None, stride, padding, dilation, groups, act)
    ok, why = registry.get_backend("onednn").check("conv2d", *args)
    assert not ok and why
    ref = ops.run_on("eager", "conv2d", *args)
    assert ops.backend_for("conv2d", *args) != "onednn"
    assert rel_err(ops.conv2d(*args), ref) < 2e-3
