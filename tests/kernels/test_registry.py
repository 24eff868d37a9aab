import pytest
import torch

from lowbit.kernels import ActQuant, NoBackendError, ops
from lowbit.kernels import registry


def _conv_case():
    x = torch.randn(1, 8, 6, 6)
    pw = ops.quantize_weight(torch.randn(16, 8, 3, 3), 8)
    return x, pw


def test_priority_order_and_choice(clean_env):
    names = ops.available_backends()
    assert names.index("onednn") < names.index("cpu") < names.index("eager")
    x, pw = _conv_case()
    assert ops.backend_for("conv2d", x, pw, None, 1, 1, 1, 1, ActQuant(8, 0.1, 100)) == "onednn"
    xl = torch.randn(4, 16)
    pwl = ops.quantize_weight(torch.randn(32, 16), 8)
    assert ops.backend_for("linear", xl, pwl, None, ActQuant(8, dynamic=True)) == "cpu"  # onednn: no per-token
    # group-wise int4 with int8 activations: only the reference accepts it on CPU
    pwg = ops.quantize_weight(torch.randn(32, 64), 4, group_size=32)
    assert ops.backend_for("linear", torch.randn(4, 64), pwg, None, ActQuant(8, 0.1, 100)) == "eager"


def test_force_backend_env(clean_env):
    x, pw = _conv_case()
    act = ActQuant(8, 0.1, 100)
    clean_env.setenv("LOWBIT_BACKEND", "cpu")
    assert ops.backend_for("conv2d", x, pw, None, 1, 1, 1, 1, act) == "cpu"
    clean_env.setenv("LOWBIT_BACKEND", "onednn")
    with pytest.raises(NoBackendError, match="onednn: weight-only call") as ei:
        ops.conv2d(x, pw, None, 1, 1, act=None)
    assert "LOWBIT_BACKEND=onednn" in str(ei.value)
    clean_env.setenv("LOWBIT_BACKEND", "nonexistent")
    with pytest.raises(NoBackendError, match="not a registered backend"):
        ops.conv2d(x, pw, None, 1, 1, act=act)


def test_disable_backends_env(clean_env):
    x, pw = _conv_case()
    act = ActQuant(8, 0.1, 100)
    clean_env.setenv("LOWBIT_DISABLE_BACKENDS", "onednn, cpu")
    assert ops.backend_for("conv2d", x, pw, None, 1, 1, 1, 1, act) == "eager"
    clean_env.setenv("LOWBIT_DISABLE_BACKENDS", "onednn,cpu,eager")
    with pytest.raises(NoBackendError) as ei:
        ops.conv2d(x, pw, None, 1, 1, act=act)
    msg = str(ei.value)
    for name in ops.available_backends():  # every backend is listed with its reason
        assert f"  - {name}: " in msg
    assert msg.count("disabled by LOWBIT_DISABLE_BACKENDS") == 3


def test_error_lists_each_refusal(clean_env):
    x = torch.randn(2, 64, dtype=torch.float16)
    pw = ops.quantize_weight(torch.randn(32, 64), 4, group_size=32)
    clean_env.setenv("LOWBIT_DISABLE_BACKENDS", "eager")
    with pytest.raises(NoBackendError) as ei:
        ops.linear(x, pw, None, ActQuant(8, 0.1, 100))
    err = ei.value
    assert err.op == "linear"
    assert "float16" in err.refusals["cpu"] and "float16" in err.refusals["onednn"]
    assert err.refusals["eager"] == "disabled by LOWBIT_DISABLE_BACKENDS"
    if "triton" in err.refusals:
        assert "CUDA" in err.refusals["triton"]


def test_forced_backend_context_and_run_on(clean_env):
    x, pw = _conv_case()
    with registry.forced_backend("eager"):
        assert ops.backend_for("conv2d", x, pw, None, 1, 1, 1, 1, ActQuant(8, 0.1, 100)) == "eager"
    with pytest.raises(NoBackendError, match="cpu: groups=2"):
        pw2 = ops.quantize_weight(torch.randn(16, 4, 3, 3), 8)
        ops.run_on("cpu", "conv2d", x, pw2, None, 1, 1, 1, 2, ActQuant(8, 0.1, 100))


def test_new_backend_registers_and_wins(clean_env):
    b = registry.register_backend("test_dummy", priority=1000)
    calls = []

    @b.op("linear", supports=lambda x, pw, bias, act: (x.shape[0] == 3, "only 3 rows"))
    def _lin(x, pw, bias, act):
        calls.append(1)
        return torch.zeros(x.shape[0], pw.N)

    try:
        pw = ops.quantize_weight(torch.randn(8, 4), 8)
        assert ops.linear(torch.randn(3, 4), pw).abs().sum() == 0 and calls == [1]
        ops.linear(torch.randn(2, 4), pw)  # refused -> next backend, no exception swallowed
        assert calls == [1]
    finally:
        registry._BACKENDS.pop("test_dummy")


def test_env_flag_one_rule_for_every_switch(monkeypatch):
    """Every boolean LOWBIT_* switch reads the same spellings: unset / blank -> default, 0 / false / off / no (any
    case, spaces ignored) -> off, anything else -> on. (Before, LOWBIT_CPU_CACHE_INT4=off switched caching on.)"""
    from lowbit.kernels import autotune, cpu
    from lowbit.kernels.registry import env_flag

    name = "LOWBIT_TEST_FLAG"
    monkeypatch.delenv(name, raising=False)
    assert env_flag(name, True) is True and env_flag(name, False) is False
    for v, want in [("", None), ("  ", None), ("0", False), ("1", True), ("off", False), ("OFF", False),
                    (" no ", False), ("False", False), ("true", True), ("yes", True), ("on", True), ("2", True)]:
        monkeypatch.setenv(name, v)
        for default in (True, False):
            assert env_flag(name, default) is (default if want is None else want), (v, default)
    monkeypatch.setenv("LOWBIT_CPU_CACHE_INT4", "off")
    assert cpu.cache_int4() is False
    monkeypatch.setenv("LOWBIT_CPU_CACHE_INT4", "On")
    assert cpu.cache_int4() is True
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "No")
    assert autotune.enabled() is False
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "")
    assert autotune.enabled() is True
