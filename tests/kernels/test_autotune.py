"""kernels/autotune.py and the dense (float path) backend: per-shape choice by measured speed, cached."""
import json
import time

import pytest
import torch
import torch.nn as nn

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, ops, autotune, registry, vnni


@pytest.fixture
def tune_env(clean_env):
    for v in ("LOWBIT_AUTOTUNE", "LOWBIT_AUTOTUNE_DENSE", "LOWBIT_AUTOTUNE_CACHE"):
        clean_env.delenv(v, raising=False)
    autotune.clear()
    yield clean_env
    autotune.clear()


@pytest.fixture
def fake_backend(tune_env):
    """A high-priority backend named 'fake' computing the reference, with a settable delay and a call counter."""
    b = registry.register_backend("fake", priority=99, description="test")
    state = dict(delay=0.0, calls=0)

    def impl(x, pw, bias=None, act=None):
        state["calls"] += 1
        time.sleep(state["delay"])
        return ops.run_on("eager", "linear", x, pw, bias, act)

    b.op("linear", supports=lambda x, pw, bias, act: (x.device.type == "cpu", "cpu only"))(impl)
    yield state
    registry._BACKENDS.pop("fake", None)


@pytest.mark.parametrize("act", [None, ActQuant(8, 0.05, 128), ActQuant(8, dynamic=True), ActQuant(4, 0.3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backend_is_the_reference(tune_env, act, dtype):
    x = torch.randn(2, 8, 9, 7).to(dtype)
    pw = ops.quantize_weight(torch.randn(16, 8, 3, 3) * 0.1, 4)
    bias = torch.randn(16)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = ops.run_on("eager", "conv2d", x, pw, bias, 1, 1, 1, 1, act)
    out = ops.run_on("dense", "conv2d", x, pw, bias, 1, 1, 1, 1, act)
    assert out.dtype == dtype and rel_err(out.float(), ref.float()) < tol
    xl = torch.randn(5, 3, 40).to(dtype)
    pwl = ops.quantize_weight(torch.randn(24, 40) * 0.1, 8, 8)
    ref = ops.run_on("eager", "linear", xl, pwl, None, act)
    out = ops.run_on("dense", "linear", xl, pwl, None, act)
    assert out.shape == ref.shape and rel_err(out.float(), ref.float()) < tol
    assert ("dense.w.bf16" if dtype == torch.bfloat16 else "dense.w.fp32") in pwl.cache


def test_plain_dispatch_never_picks_dense(tune_env):
    pw = ops.quantize_weight(torch.randn(32, 64), 4, group_size=32)
    assert ops.backend_for("linear", torch.randn(4, 64), pw, None, ActQuant(8, 0.1, 100)) == "eager"


@pytest.mark.parametrize("slow", ["fake", "dense"])
def test_picks_the_measured_faster_and_caches_the_choice(fake_backend, slow):
    x = torch.randn(6, 64)
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    act = ActQuant(8, 0.05, 128)
    if slow == "fake":
        fake_backend["delay"] = 0.02
    else:  # make the float path slow instead

        orig = registry.get_backend("dense").ops["linear"].impl

        def slow_dense(*a):
            time.sleep(0.02)
            return orig(*a)
        registry.get_backend("dense").ops["linear"].impl = slow_dense
    try:
        out = ops.linear(x, pw, None, act)
        ref = ops.run_on("eager", "linear", x, pw, None, act)
        assert rel_err(out, ref) < 1e-5
        calls = pw.cache["autotune.calls"]
        (dec,) = calls.values()
        assert set(dec["times"]) >= {"fake", "dense", "cpu"}
        assert dec["backend"] != slow and dec["times"][slow] >= 0.02
        n = fake_backend["calls"]
        for _ in range(3):
            ops.linear(x, pw, None, act)
        per_call = 1 if dec["backend"] == "fake" else 0
        assert fake_backend["calls"] == n + 3 * per_call  # no re-measuring
        # another weight of the same shape and format reuses the decision (no measurement)
        pw2 = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
        ops.linear(x, pw2, None, ActQuant(8, 0.07, 120))
        assert fake_backend["calls"] == n + 4 * per_call
        # a new shape is measured anew
        ops.linear(torch.randn(7, 64), pw, None, act)
        assert len(pw.cache["autotune.calls"]) == 2
    finally:
        if slow == "dense":
            registry.get_backend("dense").ops["linear"].impl = orig


# every CPU candidate of a static fp32 Linear (vnni where it builds and runs here)
_ALL_CPU = ("fake", "cpu", "onednn", "dense") + (() if vnni.unavailable() else ("vnni",))


@pytest.mark.parametrize("wrong", [("fake",), _ALL_CPU])
def test_a_kernel_that_computes_a_shape_wrong_is_never_chosen_for_it(fake_backend, wrong, monkeypatch):
    """A new call shape is checked once against the eager reference when it is measured: a kernel whose output is
    off (here the fastest one; a backend library's bug for shapes nobody listed, as torch's oneDNN int8 convolution
    on a one-pixel-wide strided output) is dropped for that shape with a warning, in the tuned and the "integer"
    choice alike; if every kernel is off, the reference computes the shape."""
    entries = {n: registry.get_backend(n).ops["linear"] for n in wrong if n != "fake"}
    for n, e in entries.items():
        monkeypatch.setattr(e, "impl", lambda *a, _f=e.impl, **k: _f(*a, **k) * 3.0)
    orig = registry.get_backend("fake").ops["linear"].impl
    monkeypatch.setattr(registry.get_backend("fake").ops["linear"], "impl", lambda *a: orig(*a) * 1.5)
    x, act = torch.randn(6, 64), ActQuant(8, 0.05, 128)
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    ref = ops.run_on("eager", "linear", x, pw, None, act)
    with pytest.warns(RuntimeWarning) as caught:
        out = ops.linear(x, pw, None, act)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for n in wrong:  # one warning per wrong candidate, naming it and the call
        assert any(m.startswith(f"LowBit: the {n} backend computed linear (input [6, 64]") and "wrong" in m
                   for m in said), (n, said)
    (dec,) = pw.cache["autotune.calls"].values()
    assert set(dec["wrong"]) == set(wrong) and dec["backend"] not in wrong and "fake" not in dec["times"]
    assert rel_err(out, ref) < 1e-5 and rel_err(ops.linear(x, pw, None, act), ref) < 1e-5
    (ch,) = pw.cache["autotune.fast"].values()
    assert not set(wrong) & set(ch.options) and ch.int_name not in wrong
    if len(wrong) > 1:
        assert dec["backend"] == "eager" and ch.int_name is None


def test_forced_backend_and_switch_off_win_over_the_tuner(fake_backend):
    x = torch.randn(6, 64)
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    fake_backend["delay"] = 0.01
    with registry.forced_backend("fake"):
        ops.linear(x, pw, None, None)
    assert fake_backend["calls"] == 1 and "autotune.calls" not in pw.cache
    fake_backend["calls"] = 0
    fake_backend["delay"] = 0.0
    # with tuning off, registry order: fake (priority 99) is the pick
    fake_backend_env = fake_backend
    import os
    os.environ["LOWBIT_AUTOTUNE"] = "0"
    try:
        ops.linear(x, pw, None, None)
    finally:
        del os.environ["LOWBIT_AUTOTUNE"]
    assert fake_backend_env["calls"] == 1 and "autotune.calls" not in pw.cache


def test_dense_fallback_can_be_switched_off(fake_backend, tune_env):
    tune_env.setenv("LOWBIT_AUTOTUNE_DENSE", "0")
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    ops.linear(torch.randn(6, 64), pw, None, ActQuant(8, 0.05, 128))
    (dec,) = pw.cache["autotune.calls"].values()
    assert "dense" not in dec["times"] and not any(str(k).startswith("dense") for k in pw.cache)


def test_json_cache_file_reused_by_a_new_process_state(fake_backend, tune_env, tmp_path):
    path = tmp_path / "tune.json"
    tune_env.setenv("LOWBIT_AUTOTUNE_CACHE", str(path))
    fake_backend["delay"] = 0.005
    x = torch.randn(6, 64)
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    ops.linear(x, pw, None, None)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and len(data["decisions"]) == 1
    (dec,) = data["decisions"].values()
    autotune.clear()  # as if a new process: only the file knows
    fake_backend["calls"] = 0
    pw2 = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    ops.linear(x, pw2, None, None)
    assert fake_backend["calls"] == (1 if dec["backend"] == "fake" else 0)


def test_loser_caches_dropped_and_summary(tune_env):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = autotune.attach(ops.quantize_weight(torch.randn(32, 16, 3, 3) * 0.1, 4))
            self.b = autotune.attach(ops.quantize_weight(torch.randn(8, 32) * 0.1, 8))

    m = M()
    assert not m.a.cache  # armed only: admitted (and its backends told to keep copies) at its first tuned call
    assert autotune.is_attached(m.a) and autotune.is_attached(m.b)
    assert m.a.cache.get("cache_int4") and not m.b.cache.get("cache_int4")
    x = torch.randn(1, 16, 12, 12)
    y = ops.conv2d(x, m.a, None, 1, 1, act=ActQuant(8, 0.05, 128))
    ops.linear(y.mean((2, 3)), m.b, None, ActQuant(8, dynamic=True))
    for pw in (m.a, m.b):
        (dec,) = pw.cache["autotune.calls"].values()
        prefixes = {(k[0] if isinstance(k, tuple) else k).split(".")[0] for k in pw.cache}
        for loser in set(dec["times"]) - {dec["backend"]}:
            assert loser not in prefixes, (loser, dec, list(pw.cache))
    s = autotune.summary(m)
    assert sum(s["layers"].values()) == 2 and s["untuned"] == 0
    assert {r["name"] for r in s["rows"]} == {"a", "b"}
    text = autotune.format_summary(s, max_rows=2)
    assert text.startswith("kernel choice (measured on this machine): 2 layers:") and "memory:" in text


@pytest.mark.skipif(not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qconv2d_pointwise"),
                    reason="this torch build has no oneDNN int8 ops")
def test_onednn_winner_keeps_no_unpacked_int8_copy(tune_env):
    """An int4 weight whose calls go to oneDNN keeps its prepacked blob only: the cpu backend's unpacked int8 copies
    (``cpu.int8``, ``cpu.int8_hwc``: 1 byte per weight each) are dropped with the loser's caches, and oneDNN's
    prepacking does not store one; the kept blob still gives the same output."""
    pw = autotune.attach(ops.quantize_weight(torch.randn(32, 16, 3, 3) * 0.1, 4))
    assert autotune.is_attached(pw)  # (admitted: int8 copies allowed)
    x, act = torch.randn(1, 16, 12, 12), ActQuant(8, 0.05, 128)
    args = (x, pw, None, 1, 1, 1, 1, act)
    ref = ops.run_on("cpu", "conv2d", *args)
    # the cpu backend keeps an int8 copy of a tuned int4 weight while it may win: one, in the layout it reads
    assert "cpu.int8_hwc" in pw.cache and "cpu.int8" not in pw.cache
    out = ops.run_on("onednn", "conv2d", *args)
    fn = lambda *a: None  # noqa: E731 (the Choice's implementations are not called here)
    pw.cache["autotune.fast"] = {"k": autotune.Choice({"onednn": fn, "cpu": fn}, "onednn", None, "onednn")}
    autotune._drop_loser_caches(pw)
    assert not [k for k in pw.cache if str(k).startswith("cpu.")] and any(isinstance(k, tuple) for k in pw.cache)
    assert torch.equal(ops.run_on("onednn", "conv2d", *args), out) and rel_err(out, ref) < 1e-3
    assert "cpu.int8" not in pw.cache
    pw2 = ops.quantize_weight(torch.randn(32, 16, 3, 3) * 0.1, 4)
    pw2.cache["cache_int4"] = True
    ops.run_on("onednn", "conv2d", x, pw2, None, 1, 1, 1, 1, act)
    assert "cpu.int8" not in pw2.cache and any(isinstance(k, tuple) for k in pw2.cache)


@pytest.mark.parametrize("act", [ActQuant(8, 0.037, 121), ActQuant(4, 0.3, 7), ActQuant(8, 0.011, 0),
                                 ActQuant(8, 0.02, 255), ActQuant(8, dynamic=True)])
def test_dense_activation_fake_quant_uses_the_integer_kernels_codes(act, monkeypatch):
    """The float path fake-quantizes with the codes the CPU integer kernels use: by default the fused quantizer's
    (so both paths of a deployed layer compute with the same integers), with LOWBIT_CPU_EXACT_ACT_QUANT=1 the
    reference's, bit for bit."""
    from lowbit.kernels import cpu as cpu_mod
    from lowbit.kernels.dense import _fake_quant
    from lowbit.kernels.eager import fake_quant_act

    x = torch.randn(64, 5000) * 4
    x[0, :4] = torch.tensor([0.0185, -0.0185, 0.0555, 1e-9])  # ties and tiny values
    ref = fake_quant_act(x, act, "token")
    monkeypatch.delenv("LOWBIT_CPU_EXACT_ACT_QUANT", raising=False)
    fused = _fake_quant(x, act, "token", torch.float32)
    if act.dynamic:
        assert torch.equal(fused, ref)
    else:
        codes = cpu_mod.quant_static(x, act).float()
        assert torch.equal(fused, (codes - act.zero_point) * torch.tensor(act.scale))
        assert float((fused - ref).abs().max()) <= act.scale * 1.0001  # one step at most, at ties
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1")
    assert torch.equal(_fake_quant(x, act, "token", torch.float32), ref)


@pytest.mark.parametrize("times,expected", [({"fake": 1.05, "dense": 1.0, "cpu": 1.3}, "fake"),
                                            ({"fake": 1.2, "dense": 1.0, "cpu": 1.3}, "dense")])
def test_registry_choice_kept_within_the_margin(fake_backend, monkeypatch, times, expected):
    x = torch.randn(6, 64)
    pw = autotune.attach(ops.quantize_weight(torch.randn(48, 64), 8))
    real = autotune._measure
    monkeypatch.setattr(autotune, "_measure", lambda op, names, args, post=None: (
        {n: times[n] for n in names}, real(op, names, args, post)[1]))  # (the candidates' own outputs)
    out = ops.linear(x, pw, None, None)
    (dec,) = pw.cache["autotune.calls"].values()
    assert dec["backend"] == expected  # 'fake' has the highest priority: the registry's own pick
    assert rel_err(out, ops.run_on("eager", "linear", x, pw, None, None)) < 1e-5


def _tiny_deployed(tune: bool, seed: int = 0):
    from lowbit.quant import CallRecorder, QuantConfig, deploy_, quantize

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 16, 3, padding=1)
            self.l = nn.Linear(16, 6)

        def forward(self, x, t):
            return self.l(self.c(x).mean((2, 3)))

    torch.manual_seed(seed)
    fp = M().eval()
    with CallRecorder(fp, store_dtype=torch.float32) as rec, torch.no_grad():
        for t in (900.0, 100.0):
            fp(torch.randn(3, 4, 6, 6) * (3 if t > 500 else 1), torch.tensor([t] * 3))
    cfg = QuantConfig.preset("W8A8", w_init="minmax", a_init="minmax", time_bins=2)
    return deploy_(quantize(fp, cfg, rec.calls), tune=tune)


def test_deployed_layer_fast_path_is_the_tuned_kernel(tune_env, monkeypatch):
    """After its first call of a (timestep, bits, shape) a tuned deployed layer goes straight to the chosen kernel:
    same outputs as the untuned deployed model (per timestep), no registry walk, and the switches still win."""
    q, ref = _tiny_deployed(True), _tiny_deployed(False)
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        outs = {t: ref(x, torch.tensor([t] * 3)) for t in (900.0, 100.0)}
        assert not torch.equal(outs[900.0], outs[100.0])  # per-timestep activation scales
        for _ in range(3):  # first call tunes, the next ones take the fast path
            for t in (900.0, 100.0):
                assert rel_err(q(x, torch.tensor([t] * 3)), outs[t]) < 1e-5
        for layer in (q.c, q.l):
            table = layer.packed.cache["autotune.layer"]
            assert len(table) == 2 and all(callable(v[0]) for v in table.values())
        walks = []
        orig = registry.select
        monkeypatch.setattr(registry, "select", lambda *a, **k: walks.append(a[0]) or orig(*a, **k))
        q(x, torch.tensor([900.0] * 3))
        assert walks == []
        # a new shape is looked up (and tuned) once, then fast as well
        x2 = torch.randn(5, 4, 6, 6)
        y2 = q(x2, torch.tensor([900.0] * 3))
        assert rel_err(y2, ref(x2, torch.tensor([900.0] * 3))) < 1e-5
        assert len(q.c.packed.cache["autotune.layer"]) == 3
        # forcing a backend or switching tuning off bypasses the fast path at once
        walks.clear()
        with registry.forced_backend("eager"):
            assert rel_err(q(x, torch.tensor([900.0] * 3)), outs[900.0]) < 1e-5
        assert walks == ["conv2d", "linear"]
        tune_env.setenv("LOWBIT_AUTOTUNE", "0")
        assert rel_err(q(x, torch.tensor([900.0] * 3)), outs[900.0]) < 1e-5
        assert walks == ["conv2d", "linear"] * 2
        # a copy (caches dropped) rebuilds its table and gives the same outputs
        tune_env.delenv("LOWBIT_AUTOTUNE")
        import copy

        q2 = copy.deepcopy(q)
        assert "autotune.layer" not in q2.c.packed.cache
        assert rel_err(q2(x, torch.tensor([100.0] * 3)), outs[100.0]) < 1e-5


@pytest.mark.parametrize("costs,expected", [({"tuned": 1.0, "float": 0.5, "integer": 2.0}, "float"),
                                            ({"tuned": 1.0, "float": 1.5, "integer": 0.6}, "integer"),
                                            ({"tuned": 1.0, "float": 0.99, "integer": 1.2}, "tuned")])
def test_settle_keeps_the_fastest_whole_model_mode(tune_env, monkeypatch, costs, expected):
    """settle: whole forwards under the tuned choice, the float path everywhere and the integer kernels everywhere;
    the fastest by CPU time is fixed for the model (the tuned one within the margin). A stub clock, no timing."""
    import types

    q, ref = _tiny_deployed(True), _tiny_deployed(False)
    x = torch.randn(3, 4, 6, 6)
    t = torch.tensor([900.0] * 3)
    clock = {}

    def clock_of(unit):
        def now():  # each reading advances by the cost of the mode in use: a forward's delta is its mode's cost
            clock[unit] = clock.get(unit, 0.0) + costs[autotune._mode(q.c.packed)] * unit
            return clock[unit]
        return now

    monkeypatch.setattr(autotune, "time", types.SimpleNamespace(process_time=clock_of(1.0),
                                                                perf_counter=clock_of(1e-3)))
    with torch.no_grad():
        rep = autotune.settle(q, ((x, t), {}), rounds=3)
        assert rep["mode"] == expected and rep["rounds"] == 3
        assert rep["cpu_ms"] == {m: c * 1e3 for m, c in costs.items()}
        assert rep["wall_ms"] == {m: c for m, c in costs.items()}
        for layer in (q.c, q.l):
            names = {c.name for c in autotune._choices(layer.packed)}
            if expected == "float":
                assert names == {"dense"}
            elif expected == "integer":
                assert "dense" not in names
        assert rel_err(q(x, t), ref(x, t)) < 1e-5
        # a new shape tuned after settling follows the model's mode
        x2 = torch.randn(5, 4, 6, 6)
        assert rel_err(q(x2, t), ref(x2, t)) < 1e-5
        if expected == "float":
            assert all(c.name == "dense" for c in autotune._choices(q.c.packed))
    s = autotune.summary(q)
    assert s["settled"]["mode"] == expected
    assert "whole-model check" in autotune.format_summary(s)


def test_a_model_of_the_same_structure_takes_the_settled_mode(tune_env, monkeypatch):
    """settle's choice is kept per model structure in the process: a second model of that structure (a quantized
    model's saved-and-reloaded twin) gets the same mode when it is deployed, settle on a call of the same shapes
    reuses it without measuring (a busy machine could choose otherwise within the 3 % margin: in a real ComfyUI the
    reloaded model then sampled a different latent), a call of other shapes measures again, clear() forgets."""
    import types

    costs = {"tuned": 1.0, "float": 0.5, "integer": 2.0}
    q1 = _tiny_deployed(True)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([900.0] * 3)
    clock = {}

    def clock_of(unit):
        def now():
            clock[unit] = clock.get(unit, 0.0) + 1.0 * unit
            return clock[unit]
        return now

    def timed(q):
        def now_cpu():
            clock["cpu"] = clock.get("cpu", 0.0) + costs[autotune._mode(q.c.packed)]
            return clock["cpu"]
        monkeypatch.setattr(autotune, "time", types.SimpleNamespace(process_time=now_cpu, perf_counter=clock_of(1e-3)))

    with torch.no_grad():
        timed(q1)
        assert autotune.settle(q1, ((x, t), {}), rounds=2)["mode"] == "float"
        y1 = q1(x, t)
        q2 = _tiny_deployed(True)  # the same structure and weights, deployed anew
        assert autotune._mode(q2.c.packed) == "float" and autotune.summary(q2)["settled"]["reused"] is True
        assert "call" not in autotune.summary(q2)["settled"]
        assert torch.equal(q2(x, t), y1)  # the same kernels: the same numbers bit for bit
        costs.update(float=3.0, integer=0.5)  # the machine now says otherwise: not asked again for these shapes
        timed(q2)
        before = dict(clock)
        rep = autotune.settle(q2, ((x, t), {}), rounds=2)
        assert rep["mode"] == "float" and rep["reused"] is True and clock.get("cpu") == before.get("cpu")
        assert "as measured earlier in this process" in autotune.format_summary(autotune.summary(q2))
        x2 = torch.randn(5, 4, 6, 6)  # other shapes: measured again
        rep2 = autotune.settle(q2, ((x2, t), {}), rounds=2)
        assert rep2["mode"] == "integer" and not rep2.get("reused")
        autotune.clear()
        assert autotune._mode(_tiny_deployed(True).c.packed) == "tuned"


def test_settle_modes_compute_the_same_function(tune_env):
    q, ref = _tiny_deployed(True), _tiny_deployed(False)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([100.0] * 3)
    with torch.no_grad():
        want = ref(x, t)
        rep = autotune.settle(q, lambda m: m(x, t), rounds=1)
        assert rep["mode"] in ("tuned", "float", "integer")
        for mode in ("float", "integer", "tuned"):
            autotune.set_mode(q, mode)
            assert rel_err(q(x, t), want) < 1e-5
    with pytest.raises(ValueError):
        autotune.set_mode(q, "fastest")
    assert autotune.settle(_tiny_deployed(False), lambda m: None) is None  # nothing tuned: nothing to settle


def test_dense_scaled_weight_follows_the_activation_step(monkeypatch):
    """With the exact codes (LOWBIT_CPU_EXACT_ACT_QUANT=1) the float path folds the step into the weight (small
    weights, large inputs) at each call: a new step (per-timestep tables) gives the reference's outputs, and the
    weight keeps one float copy only (no second, scaled one)."""
    monkeypatch.setenv("LOWBIT_CPU_EXACT_ACT_QUANT", "1")
    pw = ops.quantize_weight(torch.randn(6, 5) * 0.1, 8)
    x = torch.randn(40, 5)
    for a in (ActQuant(8, 0.05, 128), ActQuant(8, 0.02, 100), ActQuant(8, 0.05, 128)):
        ref = ops.run_on("eager", "linear", x, pw, None, a)
        assert rel_err(ops.run_on("dense", "linear", x, pw, None, a), ref) < 1e-5
        assert sorted(pw.cache) == ["dense.w.fp32"]


def test_settle_does_not_take_less_cpu_time_for_more_wall_time(tune_env, monkeypatch):
    import types

    q = _tiny_deployed(True)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([900.0] * 3)
    cost = {"cpu": {"tuned": 1.0, "float": 1.2, "integer": 0.5}, "wall": {"tuned": 1.0, "float": 1.2, "integer": 1.1}}
    clock = {}

    def clock_of(kind, unit):
        def now():
            clock[kind] = clock.get(kind, 0.0) + cost[kind][q.c.packed.cache.get("autotune.mode", "tuned")] * unit
            return clock[kind]
        return now

    monkeypatch.setattr(autotune, "time", types.SimpleNamespace(process_time=clock_of("cpu", 1.0),
                                                                perf_counter=clock_of("wall", 1e-3)))
    with torch.no_grad():
        assert autotune.settle(q, ((x, t), {}), rounds=2)["mode"] == "tuned"


def test_backends_disabled_after_tuning_are_not_used(tune_env):
    """LOWBIT_DISABLE_BACKENDS and LOWBIT_AUTOTUNE_DENSE=0 are read at every call, also for shapes already tuned:
    a stored choice of a backend disabled since is made again among the others (kernel level and through a deployed
    layer's own table)."""
    from lowbit.quant import QuantConfig, deploy_, quant_layers, quantize

    pw = autotune.attach(ops.quantize_weight(torch.randn(64, 64) * 0.1, 8))
    x, act = torch.randn(32, 64), ActQuant(8, dynamic=True)
    ops.linear(x, pw, None, act)
    first = autotune.chosen("linear", (x, pw, None, act)).name
    tune_env.setenv("LOWBIT_DISABLE_BACKENDS", first)
    ref = ops.run_on("eager", "linear", x, pw, None, act)
    assert rel_err(ops.linear(x, pw, None, act), ref) < 1e-4
    again = autotune.chosen("linear", (x, pw, None, act))
    assert again.name != first and first not in again.options
    tune_env.delenv("LOWBIT_DISABLE_BACKENDS")
    tune_env.setenv("LOWBIT_AUTOTUNE_DENSE", "0")
    ops.linear(x, pw, None, act)
    ch = autotune.chosen("linear", (x, pw, None, act))
    assert ch.name != "dense" and "dense" not in ch.options and not any(str(k).startswith("dense.") for k in pw.cache)
    tune_env.delenv("LOWBIT_AUTOTUNE_DENSE")

    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q = deploy_(quantize(m, QuantConfig.preset("W8A8", a_dynamic=True)), tune=True)
    with torch.no_grad():
        y0 = q(x)
        layer = dict(quant_layers(q))["0"]
        (hit,) = layer.packed_weight().cache["autotune.layer"].values()
        tune_env.setenv("LOWBIT_DISABLE_BACKENDS", hit[0].name)
        y1 = q(x)
    (hit2,) = layer.packed_weight().cache["autotune.layer"].values()
    assert hit2[0].name != hit[0].name and rel_err(y1, y0) < 1e-3


def test_tuned_shapes_per_weight_are_bounded(tune_env):
    """Inputs whose shapes keep changing do not grow a weight's tables (nor pay a measurement) without end: past
    ``MAX_SHAPES`` a new shape runs in registry order, untuned, and still computes the layer."""
    tune_env.setattr(autotune, "MAX_SHAPES", 3)
    pw = autotune.attach(ops.quantize_weight(torch.randn(32, 48) * 0.1, 8))
    act = ActQuant(8, 0.05, 128)
    measured = []
    real = autotune._measure
    tune_env.setattr(autotune, "_measure", lambda *a: measured.append(1) or real(*a))
    for rows in range(1, 7):
        x = torch.randn(rows, 48)
        assert rel_err(ops.linear(x, pw, None, act), ops.run_on("eager", "linear", x, pw, None, act)) < 1e-4
    assert len(pw.cache["autotune.fast"]) == 3 and len(pw.cache["autotune.calls"]) == 3 and len(measured) <= 3
    x = torch.randn(2, 48)  # a shape tuned before the limit keeps its choice
    assert autotune.chosen("linear", (x, pw, None, act)) is not None


def _linears(budget_mb, tune=True, bits="W4A8"):
    """Deployed Linears 64->64, 64->256, 256->256, 256->64 (reservations at 5 bytes per weight: 20, 80, 320 and
    80 KiB), with the call they were calibrated on."""
    from lowbit.quant import CallRecorder, QuantConfig, deploy_, quantize

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 64)).eval()
    x = torch.randn(8, 64)
    with CallRecorder(fp, store_dtype=torch.float32) as rec, torch.no_grad():
        fp(x)
    q = quantize(fp, QuantConfig.preset(bits, w_init="minmax", a_init="minmax"), rec.calls)
    return deploy_(q, tune=tune, copy_budget_mb=budget_mb), x


def test_copy_budget_bounds_what_tuning_keeps(tune_env):
    """deploy_'s copy budget: a layer is tuned only while the most its copies can take (5 bytes per weight) fits in
    what the model's tuned layers keep; a layer refused runs in registry order and keeps what an untuned deployment
    keeps (no float copy, no int8 copy of its int4 weight), and the model's caches stay within the budget, also
    when the decisions are already known (a second model: no measurement builds the caches first)."""
    from lowbit.kernels.formats.base import _nested_bytes

    plain, x = _linears(None, tune=False)
    with torch.no_grad():
        ref = plain(x)
    untuned = {n: sorted(map(str, pw.cache)) for n, pw in autotune._packed_weights(plain)}
    for attempt in range(2):
        q, _ = _linears(0.15)  # 157286 bytes: 20 + 80 KiB admitted, then 320 KiB and 80 KiB refused
        with torch.no_grad():
            y = q(x)
        s = autotune.summary(q)
        assert s["over_budget"] == 2 and sum(s["layers"].values()) == 2 and s["budget_bytes"] == 157286, s
        assert s["cache_bytes"] <= 157286 and rel_err(y, ref) < 1e-2
        pws = dict(autotune._packed_weights(q))
        for n in ("2", "3"):
            assert not autotune.is_attached(pws[n])
            assert sorted(str(k) for k in pws[n].cache if k != "autotune.fits") == untuned[n]
        assert all(autotune.is_attached(pws[n]) for n in ("0", "1"))
        assert "2 in registry order (their copies would exceed the 0.15 MiB budget)" in autotune.format_summary(s)
    # no budget: every layer tuned; a zero budget: none, and the bytes of an untuned deployment
    q, _ = _linears(None)
    with torch.no_grad():
        q(x)
    assert autotune.summary(q)["over_budget"] == 0 and sum(autotune.summary(q)["layers"].values()) == 4
    q, _ = _linears(0)
    with torch.no_grad():
        q(x)
    assert autotune.summary(q)["over_budget"] == 4
    assert ({n: _nested_bytes(pw.cache) for n, pw in autotune._packed_weights(q)}
            == {n: _nested_bytes(pw.cache) for n, pw in autotune._packed_weights(plain)})


def test_a_copied_model_has_a_budget_of_its_own(tune_env):
    import copy

    q, x = _linears(0.15)
    with torch.no_grad():
        q(x)
    q2 = copy.deepcopy(q)
    b1 = autotune._arming(dict(autotune._packed_weights(q))["0"])[1]
    arms = [autotune._arming(pw) for _, pw in autotune._packed_weights(q2)]
    assert all(a[1] is arms[0][1] for a in arms) and arms[0][1] is not b1 and arms[0][1].limit == b1.limit
    used = b1.used()
    with torch.no_grad():
        q2(x)
    assert b1.used() == used and arms[0][1].used() == used  # the copy charged its own budget, the same way
    assert autotune.summary(q2)["over_budget"] == 2


@pytest.mark.parametrize("kw", [dict(tune="yes"), dict(tune=1), dict(copy_budget_mb=-1), dict(copy_budget_mb=True),
                                dict(copy_budget_mb=float("nan")), dict(copy_budget_mb=float("inf")),
                                dict(copy_budget_mb="64")])
def test_deploy_settings_refused_before_any_work(tune_env, kw):
    from lowbit.quant import ConfigError, QuantConfig, deploy_, quantize
    from lowbit.quant.layers import quant_layers

    q = quantize(nn.Sequential(nn.Linear(8, 8)), QuantConfig.preset("W8A8", a_dynamic=True))
    with pytest.raises(ConfigError, match="deploy_: (tune|copy_budget_mb)"):
        deploy_(q, **kw)
    assert all(layer.mode != "deployed" for _, layer in quant_layers(q))


def test_budget_charges_follow_the_caches_through_moves_and_re_arming(tune_env):
    """A device move (here a no-op .to('cpu'), which drops the caches as any move does) or a state-dict load does
    not leave the old caches' charges counted: the same layers are tuned after it. Arming the model again (another
    budget, or none) admits every weight again; a weight refused keeps no copy from an earlier arming; set_mode
    drops the caches of the mode left."""
    from lowbit.quant import tune_kernels_

    q, x = _linears(0.15)
    with torch.no_grad():
        q(x)
    budget = autotune._arming(dict(autotune._packed_weights(q))["0"])[1]
    tuned = [autotune.is_attached(pw) for _, pw in autotune._packed_weights(q)]
    used = budget.used()
    assert tuned == [True, True, False, False] and 0 < used <= budget.limit
    for step in ("move", "load"):
        if step == "move":
            q.to("cpu")
        else:
            q.load_state_dict(q.state_dict())
        assert budget.used() == 0  # (charges of dropped caches do not count)
        with torch.no_grad():
            q(x)
        assert [autotune.is_attached(pw) for _, pw in autotune._packed_weights(q)] == tuned
        assert budget.used() == used
    tune_kernels_(q, None)  # no bound: every weight tuned at its next call
    with torch.no_grad():
        q(x)
    s = autotune.summary(q)
    assert s["over_budget"] == 0 and sum(s["layers"].values()) == 4 and s["budget_bytes"] is None
    autotune.format_summary(s)
    tune_kernels_(q, 0)  # nothing fits: the copies the unbounded tuning made are dropped
    with torch.no_grad():
        q(x)
    plain, _ = _linears(None, tune=False)
    with torch.no_grad():
        plain(x)
    assert autotune.summary(q)["over_budget"] == 4
    assert [sorted(str(k) for k in pw.cache if k != "autotune.fits") for _, pw in autotune._packed_weights(q)] == \
        [sorted(map(str, pw.cache)) for _, pw in autotune._packed_weights(plain)]
    q, x = _linears(None)
    with torch.no_grad():
        q(x)
    for mode, gone in (("integer", "dense."), ("float", "onednn")):
        autotune.set_mode(q, mode)
        assert not [k for _, pw in autotune._packed_weights(q) for k in pw.cache if str(k).startswith(gone)
                    and not any(ch.name == gone.rstrip(".") for ch in autotune._choices(pw))]


def test_autotune_off_from_the_start_is_exactly_untuned(tune_env):
    """LOWBIT_AUTOTUNE=0 before a model deployed with the default tuning runs: the same kernels and the same
    caches as deploy_(tune=False) (arming alone tells no backend to keep copies)."""
    tune_env.setenv("LOWBIT_AUTOTUNE", "0")
    q, x = _linears(64.0)
    plain, _ = _linears(None, tune=False)
    with torch.no_grad():
        assert torch.equal(q(x), plain(x))
    assert [sorted(map(str, pw.cache)) for _, pw in autotune._packed_weights(q)] == \
        [sorted(map(str, pw.cache)) for _, pw in autotune._packed_weights(plain)]


def test_settled_mode_survives_a_device_move_and_reports_progress(tune_env):
    q, x = _linears(None)
    seen = []
    with torch.no_grad():
        q(x)
        rep = autotune.settle(q, ((x,), {}), rounds=2, progress=lambda d, t, info: seen.append((d, t, info["stage"])))
    assert [d for d, _, _ in seen] == list(range(1, 10)) and {t for _, t, _ in seen} == {9}
    assert {s for _, _, s in seen} == {"deploy: kernel check"}
    q.to("cpu")  # (drops the caches, as any move does)
    assert autotune.summary(q)["settled"] == rep and all(autotune._mode(pw) == rep["mode"]
                                                          for _, pw in autotune._packed_weights(q))
