"""Activation epilogues (kernels/post.py): ``ops.linear(..., post=...)`` == the activation of ``ops.linear(...)`` on
every backend, fused (oneDNN) or applied after (the others), through dispatch and through the autotuner."""
import pytest
import torch
import torch.nn.functional as F

from kernels_testutil import rel_err
from lowbit.kernels import ActQuant, autotune, ops, post, registry

CASES = {  # name: (weight bits, activation quantizer or None)
    "W8A8": (8, lambda: ActQuant(8, 0.035, 121)),
    "W4A8": (4, lambda: ActQuant(8, 0.035, 121)),
    "W8A8-dynamic": (8, lambda: ActQuant(8, dynamic=True)),
    "W4A16": (4, None),
}


def _case(bits, act_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(3, 11, 64, generator=g) * 2
    return x, ops.quantize_weight(w, bits), torch.randn(48, generator=g), act_f() if act_f else None


@pytest.mark.parametrize("name", list(post.POSTS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_applies_the_epilogue(case, name, registry_kernels):
    x, pw, b, act = _case(*CASES[case])
    ran = []
    for backend in registry.backends():
        if backend.name == "triton" or not backend.check("linear", x, pw, b, act)[0]:
            continue
        ref = post.POSTS[name](registry.run_on(backend.name, "linear", x, pw, b, act))
        out = registry.with_post(backend.ops["linear"], name)(x, pw, b, act)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < 1e-5, (backend.name, rel_err(out, ref))
        ran.append(backend.name)
    assert "eager" in ran and "dense" in ran
    if case in ("W8A8", "W4A8") and "onednn" in ops.available_backends():
        assert ("onednn" in ran) == (case == "W8A8")  # int4 needs the int8 copy (cache_int4) on oneDNN
    # the public op, in registry order
    out = ops.linear(x, pw, b, act, post=name)
    assert rel_err(out, post.POSTS[name](ops.linear(x, pw, b, act))) < 1e-5


def test_onednn_fuses_gelu_and_others_apply_it_after():
    assert registry.get_backend("eager").ops["linear"].posts == frozenset()
    if "onednn" not in ops.available_backends():
        pytest.skip("no onednn backend")
    entry = registry.get_backend("onednn").ops["linear"]
    assert entry.posts == {"gelu", "gelu_tanh", "geglu"}
    fused = registry.with_post(entry, "gelu_tanh")
    assert fused.func is entry.impl and fused.keywords == {"post": "gelu_tanh"}  # the kernel's own epilogue
    x, pw, b, act = _case(*CASES["W8A8"])
    after = F.gelu(entry.impl(x, pw, b, act), approximate="tanh")
    assert not torch.equal(fused(x, pw, b, act), entry.impl(x, pw, b, act))
    assert rel_err(fused(x, pw, b, act), after) < 1e-6


def test_unknown_epilogue_is_refused():
    x, pw, b, act = _case(*CASES["W8A8"])
    with pytest.raises(ValueError, match="unknown activation epilogue 'relu'"):
        ops.linear(x, pw, b, act, post="relu")
    with pytest.raises(ValueError, match="unknown activation epilogues"):
        registry.register_backend("toy-post", priority=-99).op("linear", posts=("swish",))
    registry._BACKENDS.pop("toy-post", None)


def test_autotuner_keys_and_times_the_epilogue(monkeypatch):
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    monkeypatch.delenv("LOWBIT_AUTOTUNE_CACHE", raising=False)
    x, pw, b, act = _case(*CASES["W8A8"])
    autotune.attach(pw)
    plain = ops.linear(x, pw, b, act)
    fused = ops.linear(x, pw, b, act, post="gelu")
    assert rel_err(fused, F.gelu(plain)) < 1e-5
    fast = pw.cache["autotune.fast"]
    assert {k[-1] for k in fast} == {None, "gelu"}  # one choice per epilogue, not one shared
    ch = autotune.chosen("linear", (x, pw, b, act), "gelu")
    assert ch is not None and rel_err(ch.impl(x, pw, b, act), fused) < 1e-6
    assert any(k[0] == "linear+gelu" for k in pw.cache["autotune.calls"])


def test_geglu_halves_the_features_and_refuses_odd_widths(registry_kernels):
    """"geglu" is ``a * gelu(g)`` of the output's halves (SD-style transformer blocks' GEGLU): N / 2 features out; on
    oneDNN two int8 Linears over the halves' rows share the input codes, the GELU in the second one's epilogue."""
    x, pw, b, act = _case(*CASES["W8A8"])
    out = ops.linear(x, pw, b, act, post="geglu")
    a, g = ops.linear(x, pw, b, act).chunk(2, dim=-1)
    assert out.shape == (3, 11, 24) and rel_err(out, a * F.gelu(g)) < 1e-5
    if "onednn" in ops.available_backends():
        assert ops.backend_for("linear", x, pw, b, act) == "onednn" and "onednn.geglu" in pw.cache
    odd = ops.quantize_weight(torch.randn(47, 64), 8)
    with pytest.raises(ValueError, match="47 features is odd"):
        ops.linear(x, odd, None, act, post="geglu")
