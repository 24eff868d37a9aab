"""Triton kernels: numerics in the interpreter (CPU tensors, outputs poisoned with NaN before launch) and
ahead-of-time compilation for CUDA targets (no GPU needed) to catch what the interpreter accepts but ptxas does not
(e.g. int8 tl.dot with K < 32)."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("act", [ActQuant(8, 0.02, 131), ActQuant(8, dynamic=True), ActQuant(4, dynamic=True),
                                 ActQuant(3, 0.25, 2)])
def test_act_quant_kernel_bit_exact(triton_interpret, act):
    from lowbit.kernels import triton_gpu
    from lowbit.kernels.eager import quantize_act

    x = torch.randn(37, 300) * torch.rand(37, 1) * 3
    x[0] = 0.0
    x[1, :4] = torch.tensor([0.01, 0.03, -0.01, 0.05])  # exact ties x/scale = k + 0.5 for the static 0.02 case
    q, scale, zp = triton_gpu.quantize_rows(x, act)
    q_ref, s_ref, z_ref = quantize_act(x, act, "token")
    assert torch.equal(q.to(torch.float32) + 128, q_ref)
    if act.dynamic:
        assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)


@pytest.mark.parametrize("wbits,gs", [(4, None), (4, 64), (8, 32), (2, None)])
def test_linear_masked_shapes(triton_interpret, wbits, gs):
    # M, N not multiples of the tiles, odd K (a padded nibble), K not a multiple of the group
    x = torch.randn(45, 131)
    pw = ops.quantize_weight(torch.randn(70, 131) * 0.05, wbits, gs)
    bias = torch.randn(70)
    for act in (ActQuant(8, dynamic=True), None):
        ref = ops.run_on("eager", "linear", x, pw, bias, act)
        out = ops.run_on("triton", "linear", x, pw, bias, act)
        assert rel_err(out, ref) < 1e-5


def test_conv_dilation_batch_and_bf16(triton_interpret):
    x = torch.randn(2, 5, 8, 7)
    pw = ops.quantize_weight(torch.randn(24, 5, 3, 3) * 0.05, 4, 32)
    act = ActQuant(8, dynamic=True)
    ref = ops.run_on("eager", "conv2d", x, pw, None, (1, 2), (2, 1), (2, 1), 1, act)
    out = ops.run_on("triton", "conv2d", x, pw, None, (1, 2), (2, 1), (2, 1), 1, act)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5
    xb = x.bfloat16()
    ref = ops.run_on("eager", "conv2d", xb, pw, None, 1, 1, 1, 1, act)
    out = ops.run_on("triton", "conv2d", xb, pw, None, 1, 1, 1, 1, act)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_refuses_cpu_without_interpreter(clean_env):
    from lowbit.kernels.registry import get_backend

    pw = ops.quantize_weight(torch.randn(32, 64), 8)
    ok, why = get_backend("triton").check("linear", torch.randn(4, 64), pw, None, None)
    assert not ok and "CUDA" in why


_AOT_SCRIPT = textwrap.dedent(r"""
    import re, sys, triton
    from triton.backends.compiler import GPUTarget
    from lowbit.kernels import triton_gpu as tg

    PTRS = {"a_ptr": "*i8", "w_ptr": "*u8", "x_ptr": "*bf16", "q_ptr": "*i8", "out_ptr": "*fp32"}

    def compile_(name, cap, ptr_over, **const):
        fn = tg.jit_function(name)
        sig = {a: ("constexpr" if a in const
                   else ptr_over.get(a, PTRS.get(a, "*fp32" if a.endswith("_ptr") else "i32")))
               for a in fn.arg_names}
        for a in ("s_static", "zp_static"):
            if a in sig:
                sig[a] = "fp32"
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
        return triton.compile(src, target=GPUTarget("cuda", cap, 32)).asm["ptx"]

    F = dict(FUSED_A=False, QMAX=0, POST="")
    CFGS = {"w4_grouped_conv": dict(W4=True, GROUPED=True, IS_CONV=True, NHWC=False, STATIC_ACT=False, OUT_NHWC=False,
                                    **F),
            "w8_linear": dict(W4=False, GROUPED=False, IS_CONV=False, NHWC=False, STATIC_ACT=True, OUT_NHWC=False, **F),
            "w4_nhwc_conv": dict(W4=True, GROUPED=False, IS_CONV=True, NHWC=True, STATIC_ACT=False, OUT_NHWC=True, **F),
            "w8_nhwc_conv": dict(W4=False, GROUPED=False, IS_CONV=True, NHWC=True, STATIC_ACT=True, OUT_NHWC=False,
                                 **F),
            "w4_linear_fused": dict(W4=True, GROUPED=False, IS_CONV=False, NHWC=False, STATIC_ACT=True,
                                    OUT_NHWC=False, FUSED_A=True, QMAX=255, POST=""),
            # activation epilogues (kernels/post.py): the GEGLU tile's split and the GELUs still compile, MMA kept
            "w8_linear_geglu": dict(W4=False, GROUPED=False, IS_CONV=False, NHWC=False, STATIC_ACT=True,
                                    OUT_NHWC=False, **dict(F, POST="geglu")),
            "w4_linear_geglu": dict(W4=True, GROUPED=True, IS_CONV=False, NHWC=False, STATIC_ACT=False,
                                    OUT_NHWC=False, **dict(F, POST="geglu")),
            "w4_linear_gelu_tanh": dict(W4=True, GROUPED=False, IS_CONV=False, NHWC=False, STATIC_ACT=False,
                                        OUT_NHWC=False, **dict(F, POST="gelu_tanh"))}
    for cap in (80, 86, 89, 90):
        for name, cfg in CFGS.items():
            if cap not in (80, 90) and not name.startswith("w4"):
                continue
            big = cap == 90 and not cfg["GROUPED"]  # the large tiles of big problems on an H100 / H200
            ptx = compile_("int_gemm", cap, {"w_ptr": "*u8" if cfg["W4"] else "*i8", "out_ptr": "*bf16",
                                             "bias_ptr": "*bf16", "cs_ptr": "*i32",
                                             "a_ptr": "*bf16" if cfg["FUSED_A"] else "*i8"}, HAS_BIAS=True,
                           BM=128 if big else 64, BN=128 if big else 64, BK=64 if big else 32, **cfg)
            mma = sorted(set(re.findall(r"\w*mma[\w.:]*\.s32\.s8\.s8[\w.]*", ptx)))
            print("RESULT", cap, name, mma)
    for cap in (80, 90):
        compile_("act_quant", cap, {"x_ptr": "*fp32"}, QMAX=255, DYNAMIC=True, DEQUANT=False, BR=4, BL=1024)
        compile_("act_quant", cap, {"x_ptr": "*bf16", "q_ptr": "*bf16"}, QMAX=255, DYNAMIC=False, DEQUANT=True,
                 BR=4, BL=1024)
        compile_("wo_gemm", cap, {"w_ptr": "*u8", "x_ptr": "*fp32"}, W4=True, GROUPED=False, HAS_BIAS=True,
                 IEEE=True, POST="", BM=64, BN=64, BK=64)
        compile_("wo_gemm", cap, {"w_ptr": "*u8", "x_ptr": "*fp32"}, W4=True, GROUPED=False, HAS_BIAS=True,
                 IEEE=True, POST="gelu", BM=64, BN=64, BK=64)
    # the GPU check's empty kernels (host cost per launch), as a CUDA machine compiles them
    from lowbit.bench import _empty_kernels as ek
    for fn, n_const in ((ek.empty_2, 0), (ek.empty_38, 5)):
        jf = triton.runtime.jit.JITFunction(fn)
        const = {f"C{i}": i + 1 for i in range(n_const)}
        sig = {a: ("constexpr" if a in const else "*fp32" if a.endswith("_ptr") else "fp32" if a in ("s0", "s1")
                   else "i32") for a in jf.arg_names}
        triton.compile(triton.compiler.ASTSource(fn=jf, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    print("RESULT empty kernels compiled")
    ptx = compile_("wo_gemm", 80, {"w_ptr": "*u8"}, W4=True, GROUPED=True, HAS_BIAS=False, IEEE=False,
                   POST="", BM=64, BN=64, BK=64)
    print("RESULT wo", sorted(set(re.findall(r"mma[\w.:]*bf16[\w.]*", ptx))))
    ptx = compile_("wo_gemm", 80, {"w_ptr": "*u8"}, W4=True, GROUPED=True, HAS_BIAS=True, IEEE=False,
                   POST="geglu", BM=64, BN=64, BK=64)
    print("RESULT wo-geglu", sorted(set(re.findall(r"mma[\w.:]*bf16[\w.]*", ptx))))
""")


CFG_NAMES = ("w4_grouped_conv", "w8_linear", "w4_nhwc_conv", "w8_nhwc_conv", "w4_linear_fused", "w8_linear_geglu",
             "w4_linear_geglu", "w4_linear_gelu_tanh")


def test_aot_compile_for_cuda_targets():
    """Compile in a fresh process (this one imported triton for the interpreter) for sm_80/86/89/90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        if (any(s in proc.stderr for s in ("ptxas", "No such file", "CUDA_HOME", "libcuda"))
                and "CompilationError" not in proc.stderr):
            pytest.skip("cannot compile for CUDA here: " + " | ".join(tail))
        pytest.fail("AOT compilation failed:\n" + proc.stderr[-3000:])
    res = {tuple(l.split(None, 3)[1:3]): l.split(None, 3)[3] for l in proc.stdout.splitlines()
           if l.startswith("RESULT") and not l.startswith("RESULT wo")}
    for cap in ("80", "86", "89"):
        for name in ("w4_grouped_conv", "w4_nhwc_conv", "w4_linear_fused", "w4_linear_geglu", "w4_linear_gelu_tanh"):
            assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in res[(cap, name)], res
    for name in ("w8_linear", "w8_nhwc_conv", "w8_linear_geglu"):
        assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in res[("80", name)], res
    for name in CFG_NAMES:  # sm_90: Hopper's asynchronous warpgroup MMA
        assert "wgmma.mma_async.sync.aligned" in res[("90", name)] and ".s32.s8.s8" in res[("90", name)], res
    assert "RESULT empty kernels compiled" in proc.stdout
    wo = [l for l in proc.stdout.splitlines() if l.startswith("RESULT wo")]
    assert "bf16" in wo[0] and wo[1].startswith("RESULT wo-geglu") and "bf16" in wo[1]


def test_gpu_check_correctness_cases_in_interpreter(triton_interpret):
    """The GPU check's own correctness code (bench/gpu_check.py) runs and passes on the small cases in the
    interpreter, so a CUDA run does not fail on a bug in the check itself."""
    from lowbit.bench import gpu_check

    res = gpu_check.correctness_checks("cpu", large=False)
    # act quant, linear (+ fused act quant, + activation epilogues), fake quant, conv, layouts
    assert len(res) == 4 + 4 * 4 + 4 * 2 + 2 * 3 * 3 + 3 * 2 + 4 * 2 + 3
    assert sum("fused-act" in r["check"] for r in res) == 8
    assert {r["check"].rsplit("post=", 1)[1] for r in res if "post=" in r["check"]} == {"gelu", "gelu_tanh", "geglu"}
    assert sum("NHWC" in r["check"] for r in res) == 3 and sum("channels-last" in r["check"] for r in res) == 2
    assert [r for r in res if not r["ok"]] == []


def test_gpu_check_kernel_and_tile_variants(triton_interpret):
    """The timing table's and the tile sweep's variants (data, quantized weights, tile override) run end to end on
    CPU under TRITON_INTERPRET=1, and each of our variants matches bf16 at a tiny shape."""
    from lowbit.bench import gpu_check as gc

    lin, conv = gc.LinearCase("t", "lin", 40, 64, 48), gc.ConvCase("t", "conv", 1, 16, 6, 6, 40)
    variants = gc.kernel_variants("cpu")
    tiles = gc.tile_variants("cpu", formats=("W8A8", "W4A8"), configs=[(32, 32, 32, 4, 3), (64, 32, 64, 8, 3)])
    assert list(tiles)[0] == "bf16" and "W4A8 64x32x64 w8 s3" in tiles and "W4A8 64x32x64 w8 s3 nchw" in tiles
    for case in (lin, conv):
        ref = variants["bf16"](case)().float()
        for name, make in list(variants.items())[2:] + list(tiles.items())[1:]:
            if name == "W4A16":
                # bf16 x bf16 tl.dot: the Triton interpreter computes it wrongly (a plain bf16 tl.dot is off by
                # 1e9 there); correctness_checks(large=True) checks this kernel with bf16 inputs on a GPU
                if case.kind == "conv":
                    assert make(case) is None  # no weight-only conv kernel
                continue
            fn = make(case)
            if (name.endswith(" nchw") and case.kind == "linear") or (name == "W8A8 fused-act" and case.kind == "conv"):
                assert fn is None  # the NCHW kernel is a conv layout; the fused activation quantizer Linear only
                continue
            out = fn().float()
            err = float((out - ref).norm() / ref.norm())
            lim = 0.2 if "A4" in name else 0.1 if name.startswith("W4") else 0.05  # 4-bit weights: ~5-8 %
            assert out.shape == ref.shape and err < lim, (case.name, name, err)
    from lowbit.kernels import triton_gpu
    with pytest.raises(ValueError, match="multiples of 32"):
        with triton_gpu.tiles(64, 64, 16):
            pass
    assert torch.is_tensor(variants["int_mm"](gc.LinearCase("t", "mm", 32, 64, 32))())


@pytest.mark.parametrize("wbits", [8, 4])
def test_large_problems_take_the_large_tiles(triton_interpret, wbits):
    """M >= 1024, N >= 256, K >= 256 per-channel: the 128x128x64 tiles (4 warps, 4 stages), still exact against
    eager."""
    from lowbit.kernels import triton_gpu

    x = torch.randn(1030, 264)
    pw = ops.quantize_weight(torch.randn(260, 264) * 0.05, wbits, None)
    assert triton_gpu._tile_config(1030, 260, pw) == ((128, 128, 64), dict(num_warps=4, num_stages=4))
    assert triton_gpu._tile_config(1030, 260, ops.quantize_weight(torch.randn(260, 264), 4, 64))[0][:2] == (64, 64)
    assert triton_gpu._tile_config(1030, 260, pw, gather=True)[0][:2] == (64, 64)  # the NCHW conv kernel
    act = ActQuant(8, 0.05, 128)
    ref = ops.run_on("eager", "linear", x, pw, None, act)
    out = ops.run_on("triton", "linear", x, pw, None, act)
    assert rel_err(out, ref) < 1e-5


def test_activation_quantizer_walks_rows_longer_than_the_grid(triton_interpret, monkeypatch):
    """A conv row (a whole sample) can need more column blocks than a CUDA grid's second dimension holds (65535):
    the kernel then strides over the row. With the limit set to 2 blocks, 5000-value rows are still bit-exact."""
    from lowbit.kernels import triton_gpu
    from lowbit.kernels.eager import quantize_act

    monkeypatch.setattr(triton_gpu, "_MAX_GRID_Y", 2)
    x = torch.randn(3, 5000) * 2
    for act in (ActQuant(8, dynamic=True), ActQuant(8, 0.03, 120)):
        q, scale, zp = triton_gpu.quantize_rows(x.contiguous(), act)
        q_ref, s_ref, z_ref = quantize_act(x, act, "token")
        assert torch.equal(q.float() + 128, q_ref)
        if act.dynamic:
            assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)


def test_weight_only_kernel_keeps_the_small_tiles(triton_interpret):
    from lowbit.kernels import triton_gpu

    pw = ops.quantize_weight(torch.randn(260, 264) * 0.05, 4, None)
    assert triton_gpu._tile_config(1030, 260, pw, integer=False) == ((64, 64, 64), {})


@pytest.mark.parametrize("wbits,gs", [(8, None), (4, None), (4, 32)])
def test_prepared_weight_inputs_are_cached_once(triton_interpret, wbits, gs):
    """The integer GEMM's weight-constant inputs (column sums; for channels-last convs the weights reordered to
    [N, KH, KW, C]) are computed on first use, kept in ``pw.cache``, counted by ``nbytes`` and dropped when a
    state dict loads other integers into the weight."""
    pw = ops.quantize_weight(torch.randn(24, 32, 3, 3) * 0.05, wbits, gs)
    q = ops.unpack_weight(pw).reshape(24, -1).to(torch.int32)
    before = pw.nbytes()
    x, act = torch.randn(1, 32, 5, 5), ActQuant(8, dynamic=True)
    ops.run_on("triton", "conv2d", x, pw, None, 1, 1, 1, 1, act)
    cs = pw.cache["triton.colsum"][1]
    assert torch.equal(cs, q.sum(1) if gs is None else q.reshape(24, -1, gs).sum(2))
    nhwc = gs is None  # group-wise weights keep the NCHW kernel
    assert ("triton.nhwc" in pw.cache) == nhwc
    if nhwc:
        w, k_w = pw.cache["triton.nhwc"][1]
        assert k_w == w.shape[1] == (32 * 9 if wbits > 4 else 32 * 9 // 2)
        if wbits <= 4:  # nibbles: low = even k
            w = torch.stack([(w.view(torch.int8) << 4) >> 4, w.view(torch.int8) >> 4], 2).reshape(24, -1)
        assert torch.equal(w, ops.unpack_weight(pw).permute(0, 2, 3, 1).reshape(24, -1))
        assert pw.nbytes() >= before + pw.qdata.numel()  # the reordered copy is counted
    ops.run_on("triton", "conv2d", x, pw, None, 1, 1, 1, 1, act)
    assert pw.cache["triton.colsum"][1] is cs  # not recomputed
    other = ops.quantize_weight(torch.randn(24, 32, 3, 3) * 0.05, wbits, gs)
    pw.load_state_dict(other.state_dict())
    assert pw.cache == {}
    ref = ops.run_on("eager", "conv2d", x, other, None, 1, 1, 1, 1, act)
    assert rel_err(ops.run_on("triton", "conv2d", x, pw, None, 1, 1, 1, 1, act), ref) < 1e-5

def test_host_costs_run_in_the_interpreter(triton_interpret):
    """The host-cost section's calls (empty Triton kernels, act quant, both W8A8 linear paths) run; each cost is a
    positive time."""
    from lowbit.bench import gpu_check as gc

    costs = gc.host_costs("cpu", calls=2)
    assert set(costs) == set(gc.host_cost_variants("cpu")) and len(costs) == 8
    assert all(0 < c < 1 for c in costs.values()), costs


@pytest.mark.parametrize("env", ["triton_interpret", "clean_env"])
def test_dense_fake_quant_on_cuda_path_with_dense_forced(request, env):
    """The dense path's CUDA fake quantizer (``dense._gpu_fake_quant``, called here on CPU tensors) uses Triton's
    one-pass kernel where Triton accepts the call (here: under the interpreter) and the reference otherwise, also
    with the dense backend forced (dispatch would look for ``fake_quant_act`` in the dense backend and fail)."""
    from lowbit.kernels import dense, registry

    request.getfixturevalue(env)  # triton_interpret: Triton accepts CPU tensors; clean_env: it refuses them
    x = torch.randn(2, 16, 5, 6) * 2
    for act in (ActQuant(8, 0.02, 131), ActQuant(8, dynamic=True)):
        ref = ops.run_on("eager", "fake_quant_act", x, act, "sample")
        with registry.forced_backend("dense"):
            out = dense._gpu_fake_quant(x, act, "sample")
        assert torch.equal(out, ref)
