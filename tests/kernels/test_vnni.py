"""kernels/vnni.py: the fused AVX512-VNNI int8 Linear (built here with the local compiler, once per machine)."""
import logging

import pytest
import torch

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, autotune, ops, registry, vnni
from lowbit.kernels import cpu as C

WHY = vnni.unavailable()
needs_vnni = pytest.mark.skipif(bool(WHY), reason=f"vnni backend unavailable here: {WHY}")
_FLAGS = vnni._cpu_flags()
# the builds this CPU runs (both on a CPU with AVX512-VNNI and AVX-VNNI: each is compiled and checked here)
HERE = [v for v, (need, _) in vnni.VARIANTS.items() if not isinstance(_FLAGS, str) and all(f in _FLAGS for f in need)]
each_build = pytest.mark.parametrize("variant", HERE or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no VNNI build runs on this CPU: {vnni.cpu_variant()[1]}"))])


def _direct(variant, x, pw, bias, act, post=None):
    """The ``variant`` build's Linear, called as the backend calls the default one."""
    from lowbit.kernels import post as P

    ext = vnni.extension(variant)
    w8 = C._int8_weight(pw, keep=False).reshape(pw.N, pw.K)
    out = ext.linear(x.reshape(-1, pw.K).contiguous(), ext.pack(w8), w8.sum(1, dtype=torch.int32),
                     C._per_channel_scale(pw).float().contiguous(), bias, pw.N, float(act.scale),
                     int(act.zero_point), int(act.qmax), C.exact_act_quant(), vnni._POSTS[post])
    assert P.check(post, pw.N) == post
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _act_for(x, bits=8, zp=None):
    qmax = (1 << bits) - 1
    return ActQuant(bits=bits, scale=float(x.abs().max()) * 2 / qmax, zero_point=(qmax + 1) // 2 if zp is None else zp)


@each_build
@pytest.mark.parametrize("K", [1, 3, 7, 8, 9, 15, 16, 17, 64, 100, 4100])
@pytest.mark.parametrize("bits,zp", [(8, 128), (8, 0), (8, 255), (4, 7)])
@pytest.mark.parametrize("exact", [False, True])
def test_codes_are_the_other_cpu_paths_bit_for_bit(variant, K, bits, zp, exact, monkeypatch):
    """The kernel's activation codes equal kernels/cpu.py's quantizer's, by default the fused one
    (torch.quantize_per_tensor), with ``LOWBIT_CPU_EXACT_ACT_QUANT=1`` the reference's, so every CPU path of a
    deployed model (onednn, cpu, dense, vnni) computes with the same integers: random values, values on rounding
    ties, values past the clamp and infinities."""
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1" if exact else "0")
    x = torch.randn(9, K) * 4
    act = _act_for(x, bits, zp)
    ties = (torch.randint(-300, 300, (9, K)).float() + 0.5) * act.scale  # (k + 1/2) steps: ties before the zp shift
    for t in (x, ties, x * 1e3):
        t = t.clone()
        t[0, 0] = float("inf")
        t[-1, -1] = float("-inf")
        want = C.quant_static(t, act).clone()
        got = vnni.extension(variant).codes(t.contiguous(), act.scale, act.zero_point, act.qmax, exact)
        assert torch.equal(got, want), (got != want).sum()


@needs_vnni
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 17), (33, 64, 64), (70, 33, 40), (129, 320, 48), (5, 4100, 16)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("exact", ["0", "1"])
def test_linear_is_the_float_path_of_the_same_codes(M, K, N, bits, with_bias, exact, clean_env):
    """Rows not a multiple of the 4-row tile or the 32-row block, columns not a multiple of 16, K not a multiple of 4
    or 16, a K beyond a small buffer: the fused kernel equals the dense backend (the same codes, fused or exact, and
    weights in fp32) to float rounding, and the eager reference to its own codes' difference (none when exact)."""
    clean_env.setenv("LOWBIT_CPU_CACHE_INT4", "1")
    clean_env.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", exact)
    x = torch.randn(M, K) * 2
    pw = ops.quantize_weight(torch.randn(N, K) * 0.2, bits)
    bias = torch.randn(N) if with_bias else None
    act = _act_for(x)
    out = ops.run_on("vnni", "linear", x, pw, bias, act)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert rel_err(out, ops.run_on("dense", "linear", x, pw, bias, act)) < 1e-5
    assert rel_err(out, ops.run_on("eager", "linear", x, pw, bias, act)) < (1e-5 if exact == "1" else 2e-2)


@each_build
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 9), (70, 33, 40), (129, 96, 24)])
@pytest.mark.parametrize("exact", ["0", "1"])
def test_each_build_is_the_float_path_of_the_same_codes(variant, M, K, N, exact, clean_env):
    """Each build this CPU runs (the 8-lane AVX-VNNI one included, whatever the backend picks), called directly:
    columns not a multiple of its lanes, short rows, K not a multiple of 4: the dense backend's result."""
    clean_env.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", exact)
    x, bias = torch.randn(M, K) * 2, torch.randn(N)
    pw = ops.quantize_weight(torch.randn(N, K) * 0.2, 8)
    act = _act_for(x)
    assert vnni.extension(variant).lanes == {"avx512": 16, "avx2": 8}[variant]
    assert rel_err(_direct(variant, x, pw, bias, act), ops.run_on("dense", "linear", x, pw, bias, act)) < 1e-5


@each_build
@pytest.mark.parametrize("M", [1, 5, 32, 33])
@pytest.mark.parametrize("post", [None, "gelu"])
def test_few_rows_split_the_columns_between_threads(variant, M, post, clean_env):
    """Up to one 32-row block with two threads: the rows are quantized once and the threads take column blocks
    (N = 72: a partial last block); one row more takes the row-block path. Both the dense backend's result."""
    from lowbit.kernels import post as P

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, bias = torch.randn(M, 300), torch.randn(72)
        pw = ops.quantize_weight(torch.randn(72, 300) * 0.1, 8)
        act = _act_for(x)
        want = P.apply(ops.run_on("dense", "linear", x, pw, bias, act), post)
        assert rel_err(_direct(variant, x, pw, bias, act, post), want) < 1e-5
    finally:
        torch.set_num_threads(threads)


@needs_vnni
def test_leading_dims_and_strided_input(clean_env):
    x = torch.randn(2, 7, 96)[..., ::2]  # [2, 7, 48], not contiguous
    pw = ops.quantize_weight(torch.randn(20, 48) * 0.1, 8)
    act = ActQuant(8, 0.03, 128)
    out = ops.run_on("vnni", "linear", x, pw, None, act)
    assert out.shape == (2, 7, 20)
    assert rel_err(out, ops.run_on("dense", "linear", x.contiguous(), pw, None, act)) < 1e-5
    assert "vnni.w" in pw.cache  # the VNNI-ordered copy is kept (dropped with the loser's caches when tuned)


@pytest.mark.parametrize("case,expected", [
    ("bf16", "reads fp32"), ("dynamic", "dynamic activations"), ("weight_only", "weight-only"),
    ("group", "group-wise"), ("int4_no_copy", "int4 weight"), ("bf16_bias", "bias dtype"), ("huge_k", "overflow")])
def test_declines_what_it_does_not_compute_with_the_reason(case, expected, clean_env):
    x, pw, act = torch.randn(4, 64), ops.quantize_weight(torch.randn(8, 64), 8), ActQuant(8, 0.05, 128)
    if case == "bf16":
        x = x.bfloat16()
    elif case == "dynamic":
        act = ActQuant(8, dynamic=True)
    elif case == "weight_only":
        act = None
    elif case == "group":
        pw = ops.quantize_weight(torch.randn(8, 64), 8, group_size=32)
    elif case == "int4_no_copy":
        pw = ops.quantize_weight(torch.randn(8, 64), 4)
    elif case == "huge_k":
        x, pw = torch.randn(1, vnni.MAX_K + 4), ops.quantize_weight(torch.randn(1, vnni.MAX_K + 4), 8)
    bias = torch.randn(8, dtype=torch.bfloat16) if case == "bf16_bias" else None
    ok, why = registry.get_backend("vnni").check("linear", x, pw, bias, act)
    assert not ok and expected in why, why


def test_an_unusable_machine_or_a_failed_build_declines_with_the_reason(monkeypatch, caplog):
    """No VNNI, no compiler, a compile error: the backend declines every call with one reason and never raises;
    the other backends run the layer."""
    x, pw, act = torch.randn(4, 64), ops.quantize_weight(torch.randn(8, 64), 8), ActQuant(8, 0.05, 128)
    monkeypatch.setattr(vnni, "_state", {})
    monkeypatch.setattr(vnni, "_cpu_flags", lambda: {"sse2", "avx2", "fma"})
    ok, why = registry.get_backend("vnni").check("linear", x, pw, None, act)
    assert not ok and why.startswith("this CPU has neither AVX512-VNNI nor AVX-VNNI")
    assert registry.select("linear", x, pw, None, act).name != "vnni"

    def broken():
        raise RuntimeError("Error building extension 'lowbit_vnni_x'\nmore lines")

    monkeypatch.setattr(vnni, "_state", {})
    monkeypatch.setattr(vnni, "_cpu_flags", lambda: set(vnni.VARIANTS["avx2"][0]))
    monkeypatch.setattr(vnni, "_toolchain_lacks", lambda: "")
    monkeypatch.setattr(vnni, "_build", lambda variant: broken())
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels"):
        ok, why = registry.get_backend("vnni").check("linear", x, pw, None, act)
        registry.get_backend("vnni").check("linear", x, pw, None, act)  # decided once: no second build, no 2nd log
    assert not ok and why == "building csrc/vnni_linear.cpp (avx2) failed: Error building extension 'lowbit_vnni_x'"
    assert sum("vnni backend off" in r.getMessage() for r in caplog.records) == 1
    assert rel_err(ops.linear(x, pw, None, act), ops.run_on("eager", "linear", x, pw, None, act)) < 2e-2


def test_a_build_lock_is_waited_for_and_removed_once_stale(tmp_path):
    """torch's builder waits forever for its ``lock`` file: a fresh one (another process building) is waited for
    until it goes or turns stale; one left by a process killed mid-build (older than any build takes) is removed at
    once."""
    import os
    import threading
    import time

    lock = tmp_path / "lock"
    assert not vnni.wait_for_lock(tmp_path / "missing")
    lock.write_text("")
    old = time.time() - vnni.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert vnni.wait_for_lock(tmp_path) and not lock.exists()
    lock.write_text("")  # fresh: another build that ends after 0.3 s
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.perf_counter()
    assert not vnni.wait_for_lock(tmp_path, poll_s=0.05) and 0.25 < time.perf_counter() - t0 < 5
    lock.write_text("")  # fresh and never released: removed once it is stale_s old
    t0 = time.perf_counter()
    assert vnni.wait_for_lock(tmp_path, stale_s=0.4, poll_s=0.05) and not lock.exists()
    assert 0.3 < time.perf_counter() - t0 < 5


def test_the_lock_file_is_left_alone_where_torch_locks_it_by_the_os(monkeypatch, tmp_path):
    """torch 2.14 builds under a ``filelock.FileLock``: its ``lock`` file stays after every build (an OS lock, freed
    with its process), so waiting for the file to go would stall every new process for minutes and removing it
    would break torch's own exclusion (found in a real ComfyUI on torch 2.14.1). Only torch's ``FileBaton``, which
    locks by the file's existence, gets the wait-and-clear; the builder of the torch here is recognised."""
    import types

    from torch.utils import cpp_extension

    assert vnni.baton_lock(types.SimpleNamespace(FileBaton=object)) is True
    assert vnni.baton_lock(types.SimpleNamespace(FileLock=object)) is False
    assert vnni.baton_lock(types.SimpleNamespace(FileLock=object, FileBaton=object)) is False
    assert vnni.baton_lock(cpp_extension) == (hasattr(cpp_extension, "FileBaton")
                                             and not hasattr(cpp_extension, "FileLock"))
    # the build path on an OS-locked torch never waits on or removes the file
    waited = []
    monkeypatch.setattr(vnni, "wait_for_lock", lambda d: waited.append(d))
    monkeypatch.setattr(cpp_extension, "FileLock", object, raising=False)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert vnni._build("avx512") == "module" and waited == []
    monkeypatch.delattr(cpp_extension, "FileLock")  # a FileBaton torch: the build waits for (or clears) the file
    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)
    assert vnni._build("avx512") == "module" and len(waited) == 1 and str(waited[0]).startswith(str(tmp_path))


def test_no_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-lowbit")
    assert "no C++ compiler ('no-such-compiler-lowbit'" in vnni._toolchain_lacks()


@needs_vnni
def test_the_tuner_measures_it_and_a_deployed_layer_serves_it(clean_env):
    """A tuned weight's candidates include vnni for a static fp32 Linear; when it is measured fastest the deployed
    call runs it (the decision names it); when it loses its copy is dropped."""
    autotune.clear()
    try:
        pw = autotune.attach(ops.quantize_weight(torch.randn(64, 32) * 0.1, 8))
        x, act = torch.randn(512, 32), ActQuant(8, 0.02, 128)
        out = ops.linear(x, pw, None, act)
        (dec,) = pw.cache["autotune.calls"].values()
        assert "vnni" in dec["times"], dec
        assert rel_err(out, ops.run_on("dense", "linear", x, pw, None, act)) < 1e-5
        assert ("vnni.w" in pw.cache) == (dec["backend"] == "vnni")
    finally:
        autotune.clear()


@each_build
@pytest.mark.parametrize("name,code", [("gelu", 1), ("gelu_tanh", 2)])
def test_epilogue_activation_is_torchs_within_float_error(variant, name, code):
    """The epilogue's own GELU (erf by Abramowitz & Stegun, e^x by a polynomial) against torch's over the whole
    range, tails, signed zeros and huge values: within 1e-6 absolute and 1e-6 of |y|, never NaN."""
    from lowbit.kernels import post

    y = torch.cat([torch.linspace(-40, 40, 100001), torch.randn(20000) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 88.0, -88.0])])
    out, ref = vnni.extension(variant).post(y, code), post.POSTS[name](y)
    err = (out - ref).abs()
    assert not out.isnan().any() and err.max() < 2e-6 and (err / y.abs().clamp_min(1e-30)).max() < 1e-6


@each_build
@pytest.mark.parametrize("M,K,N", [(70, 33, 40), (5, 64, 34), (33, 17, 96), (3, 9, 10)])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "geglu"])
def test_fused_epilogues_are_the_activation_of_the_plain_output(variant, M, K, N, name, clean_env):
    """Fused in the kernel: GELU / GELU-tanh on each output, GEGLU over the halves of the row block (halves that do
    not fall on the 16-column blocks, rows past the 32-row block): the activation of the plain output."""
    from lowbit.kernels import post

    x, pw, b, act = torch.randn(M, K) * 2, ops.quantize_weight(torch.randn(N, K) * 0.3, 8), torch.randn(N), None
    act = _act_for(x)
    assert name in registry.get_backend("vnni").ops["linear"].posts
    out = _direct(variant, x, pw, b, act, post=name)
    ref = post.POSTS[name](_direct(variant, x, pw, b, act))
    assert out.shape == ref.shape == (M, N // 2 if name == "geglu" else N)
    assert rel_err(out, ref) < 1e-5
