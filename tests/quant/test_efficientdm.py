"""EfficientDM fine-tuning (quant/efficientdm.py) on a tiny random class-conditional UNet2DModel, a few steps each."""
import copy
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from lowbit.quant import CallRecorder, FinetuneConfig, QuantConfig, deploy_, load, quant_layers, quantize, save
from lowbit.quant import efficientdm as E
from lowbit.quant.context import get_context
from lowbit.quant.errors import ConfigError, Interrupted, NumericalError
from lowbit.quant.quantizer import quantize_weight_int

NULL = 2  # the tiny UNet's "no label" class


def tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=3).eval()


def run_ddim(unet, seed, steps=10, guidance=2.0, split=False, n=4):
    """Minimal DDIM (eta 0) with classifier-free guidance as one batched call or two calls."""
    from diffusers import DDPMScheduler

    acp = DDPMScheduler().alphas_cumprod.double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    labels = torch.arange(n) % 2
    ts = list(range(0, 1000, 1000 // steps))[::-1]
    with torch.no_grad():
        for i, t in enumerate(ts):
            if split:
                c = unet(x, torch.full((n,), t), class_labels=labels).sample
                u = unet(x, torch.full((n,), t), class_labels=torch.full_like(labels, NULL)).sample
            else:
                both = unet(torch.cat([x, x]), torch.full((2 * n,), t),
                            class_labels=torch.cat([labels, torch.full_like(labels, NULL)])).sample
                c, u = both.chunk(2)
            eps = (u + guidance * (c - u)).double()
            a, ap = acp[t], (acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
            x0 = ((x.double() - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = (ap.sqrt() * x0 + (1 - ap).sqrt() * eps).float()
    return x


def record(unet, seed, **kw):
    with CallRecorder(unet) as rec:
        run_ddim(unet, seed, **kw)
    return rec.calls


FAST = dict(steps=30, rank=4, batch_size=8, time_bins=10, lr_scale_factor=0.4, act_lr=1e-4, seed=0)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    unet = tiny_unet()
    calls, held = record(unet, 0), record(unet, 1)
    torch.manual_seed(0)
    q = quantize(unet, QuantConfig.preset("W4A4"), calls)
    student = E.finetune(q, unet, calls, FinetuneConfig(**FAST))
    return unet, q, calls, held, student


def snapshot(m):
    """Every tensor of a module (parameters, buffers, activation tables), its requires_grad flag and .grad."""
    out = {}
    for k, v in m.state_dict(keep_vars=True).items():
        out[k] = (v.detach().clone(), bool(v.requires_grad), None if getattr(v, "grad", None) is None else 1)
    out["__training__"] = [mod.training for mod in m.modules()]
    return out


def same(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        if k == "__training__":
            if a[k] != b[k]:
                return False
            continue
        (x, rx, gx), (y, ry, gy) = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y) or rx != ry or gx != gy:
            return False
    return True


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------------------
def test_adapters_on_scheduled_layers_only(setup):
    unet, q, calls, held, s = setup
    with_lora = {n for n, _ in E.lora_layers(s)}
    for n, l in quant_layers(s):
        assert (n in with_lora) == l.scheduled  # the W8A8 layers (conv_in/out, time embedding, shortcuts) have none
    l = s.get_submodule("down_blocks.0.resnets.0.conv1")
    assert l.modifier.lora_A.shape == (4, 16, 3, 3) and l.modifier.lora_B.shape == (16, 4, 1, 1)
    l = s.get_submodule("down_blocks.1.attentions.0.to_q")
    assert l.modifier.lora_A.shape == (4, 32) and l.modifier.lora_B.shape == (32, 4)
    assert len(l.act.tgrid) == FAST["time_bins"]
    # targets regex restricts further
    only = E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=1, targets=r"attentions")))
    assert {n for n, _ in E.lora_layers(only)} == {n for n in with_lora if "attentions" in n}
    with pytest.raises(ConfigError):
        E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=1, targets=r"^nothing$")))


def test_finetune_reduces_heldout_loss(setup):
    unet, q, calls, held, s = setup
    before = E.distillation_loss(q, unet, held)
    after = E.distillation_loss(s, unet, held)
    assert after < 0.97 * before, (before, after)


def test_merge_is_exact_and_deploys(setup, tmp_path):
    unet, q, calls, held, s = setup
    # the adapters moved some integers, otherwise this test would prove nothing
    changed = sum(int((l.modifier.weight_int(l) != quantize_weight_int(l.weight, l.w_scale, l.w_bits)).sum())
                  for _, l in E.lora_layers(s))
    assert changed > 0
    merged = E.merge_(E.load_adapters(q, _save(s, tmp_path / "a")))
    assert not E.lora_layers(merged)
    dep = deploy_(copy.deepcopy(merged))
    for (n, l), (_, d) in zip(E.lora_layers(s), [(n, dep.get_submodule(n)) for n, _ in E.lora_layers(s)]):
        assert torch.equal(l.modifier.weight_int(l), d.weight_int()), n  # integers are exactly the merged ones
    for c in held[::5]:
        args, kw = c.to("cpu", torch.float32)
        with torch.no_grad():
            y_fake = s(*args, **kw).sample
            y_merged = merged(*args, **kw).sample
            y_dep = dep(*args, **kw).sample
        # merged fake-quant model: the same function as the unmerged one (float rounding only)
        assert torch.allclose(y_merged, y_fake, atol=1e-5, rtol=0), (y_merged - y_fake).abs().max()
        # deployed kernels sum in another order; a ~1e-7 input difference can flip a 4-bit activation rounding at
        # a tie, which moves single outputs by one activation step: relative L2 error below 2%
        assert rel_err(y_dep, y_fake) < 2e-2
    # saved like any quantized model (quant.io), with the fine-tune recorded in the header
    path = save(s, str(tmp_path / "ft.safetensors"))
    back = load(unet, path)
    assert get_context(back).finetune_info["steps"] == FAST["steps"]
    for n, l in quant_layers(dep):
        assert torch.equal(back.get_submodule(n).weight_int(), l.weight_int()), n


def _save(s, d):
    return E.save_adapters(s, str(d))


def test_talsq_keyed_by_timestep(setup):
    unet, q, calls, held, s = setup
    seen = {}

    def hook(name):
        def h(mod, args):
            bits, sc, z = mod.act_params()
            key = (name, mod.ctx.t)
            val = (float(sc), float(z))
            assert seen.setdefault(key, val) == val, key  # the same t always gives the same (scale, zero)
        return h

    m = copy.deepcopy(s)
    for n, l in E.lora_layers(m):
        l.register_forward_pre_hook(hook(n))
    run_ddim(m, 5, steps=20, split=False)  # guidance batched, t = 950, 900, ... 0
    n1 = len(seen)
    run_ddim(m, 6, steps=50, split=True)  # guidance as two calls, t = 980, 960, ... 0 (shares 900, 800, ...)
    assert len(seen) > n1
    # the learned tables really depend on t (else the check above would be trivial)
    layer = dict(E.lora_layers(m))["down_blocks.0.resnets.0.conv2"]
    assert not torch.allclose(layer.act.scale_4, layer.act.scale_4[:1].expand_as(layer.act.scale_4))
    # batched vs split guidance: same predictions for the same rows
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    lab = torch.tensor([0, 1, 0])
    with torch.no_grad():
        both = m(torch.cat([x, x]), torch.full((6,), 500),
                 class_labels=torch.cat([lab, torch.full_like(lab, NULL)])).sample
        c = m(x, torch.full((3,), 500), class_labels=lab).sample
        u = m(x, torch.full((3,), 500), class_labels=torch.full_like(lab, NULL)).sample
    assert rel_err(both, torch.cat([c, u])) < 1e-2


def test_cancel_and_success_leave_inputs_bit_identical(setup):
    unet, q, calls, held, _ = setup
    t0, q0 = snapshot(unet), snapshot(q)

    def cancel(done, total, info):
        assert "loss" in info and info["stage"] == "fine-tune"
        if done == 2:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=10)), progress=cancel)
    assert same(snapshot(unet), t0) and same(snapshot(q), q0)
    # a full run, merged and deployed, shares frozen storage with the inputs but never writes to it
    s = E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=3, grad_checkpointing=True)))
    deploy_(E.merge_(s))
    assert same(snapshot(unet), t0) and same(snapshot(q), q0)


def test_student_shares_frozen_storage(setup):
    """No second full-precision copy: the student's frozen tensors are the teacher's / qmodel's storage."""
    unet, q, calls, held, s = setup
    for n, l in quant_layers(s):
        assert l.weight.data_ptr() == q.get_submodule(n).weight.data_ptr()
        if ".parts." not in n:  # parts of a split convolution hold their slice of the float weight (small)
            assert l.weight.data_ptr() == unet.get_submodule(n).weight.data_ptr()
        assert not l.weight.requires_grad
        assert l.act.tgrid.data_ptr() != q.get_submodule(n).act.tgrid.data_ptr() or not l.scheduled
    norm = "down_blocks.0.resnets.0.norm1"
    assert s.get_submodule(norm).weight.data_ptr() == q.get_submodule(norm).weight.data_ptr()


def test_grad_checkpointing_same_result(setup):
    unet, q, calls, held, _ = setup
    cfg = dict(FAST, steps=3)
    a = E.finetune(q, unet, calls, FinetuneConfig(**cfg))
    b = E.finetune(q, unet, calls, FinetuneConfig(**dict(cfg, grad_checkpointing=True)))
    for (n, la), (_, lb) in zip(E.lora_layers(a), E.lora_layers(b)):
        assert torch.allclose(la.modifier.lora_B, lb.modifier.lora_B, atol=1e-6), n
    assert all("forward" not in m.__dict__ for m in b.modules())  # checkpoint wrappers removed


def test_diverging_run_raises(setup):
    unet, q, calls, held, _ = setup
    with pytest.raises(NumericalError, match=r"step \d+/"):
        E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=30, lr_scale_factor=10.0, lr_multiplier=100.0,
                                                               act_lr=1.0)))


def test_nan_loss_raises(setup, monkeypatch):
    unet, q, calls, held, _ = setup
    real = E.QALoRA.fake_weight
    state = {"n": 0}

    def poisoned(self, layer):
        state["n"] += 1
        w = real(self, layer)
        return w * float("nan") if state["n"] > 200 else w  # NaN from the ~4th step on

    monkeypatch.setattr(E.QALoRA, "fake_weight", poisoned)
    with pytest.raises(NumericalError, match=r"diverged at step [2-9]/10: loss NaN"):
        E.finetune(q, unet, calls, FinetuneConfig(**dict(FAST, steps=10)))


def test_adapters_roundtrip_peft(setup, tmp_path):
    import peft
    from safetensors.torch import load_file

    unet, q, calls, held, s = setup
    d = _save(s, tmp_path / "adapters")
    cfg = peft.LoraConfig.from_pretrained(d)
    names = [n for n, _ in E.lora_layers(s)]
    assert cfg.r == FAST["rank"] and cfg.lora_alpha == cfg.r and cfg.lora_dropout == 0.0
    assert sorted(cfg.target_modules) == sorted(names)
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    with pytest.raises(FileExistsError):
        _save(s, tmp_path / "adapters")
    # peft itself accepts the files: inject LoRA into a float copy and load the state dict without missing keys
    from peft import get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(unet), cfg)
    res = set_peft_model_state_dict(pm, tensors)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    assert not [k for k in res.missing_keys if "lora_" in k]
    # and our loader restores the very same fine-tuned model
    r = E.load_adapters(q, d)
    for c in held[::7]:
        args, kw = c.to("cpu", torch.float32)
        with torch.no_grad():
            assert torch.equal(r(*args, **kw).sample, s(*args, **kw).sample)
    # corrupt files are refused with a LoadError
    json.dump({"r": "x"}, open(os.path.join(d, "adapter_config.json"), "w"))
    from lowbit.quant.errors import LoadError

    with pytest.raises((LoadError, ConfigError)):
        E.load_adapters(q, d)


def test_deployed_input_model(setup, tmp_path):
    """A quantized model loaded from a file (deployed) fine-tunes from its integer grid (EfficientDM's W0)."""
    unet, q, calls, held, _ = setup
    path = save(q, str(tmp_path / "q.safetensors"))
    qd = load(unet, path)
    args, kw = held[0].to("cpu", torch.float32)
    with torch.no_grad():
        qd(*args, **kw)  # builds the kernels' caches (prepacked weights), which a copy must not try to clone
    before = snapshot(qd)
    s = E.finetune(qd, unet, calls, FinetuneConfig(**dict(FAST, steps=2)))
    assert same(snapshot(qd), before)
    assert all(l.mode == "fake" for _, l in quant_layers(s))


def test_automatic_lora_lr_follows_steps_rank_and_fan_in(setup):
    """lr = step x 2·sqrt(3·fan_in/r)/max(steps, 300): B·A can reach about one weight step within the run."""
    import math

    _, q, _, _, _ = setup
    name, layer = next((n, l) for n, l in quant_layers(q) if l.scheduled and len(l.weight_shape) == 4)
    fan_in = math.prod(layer.weight_shape[1:])
    step = float(layer.w_scale.mean())
    lr = lambda **kw: E.lora_lr(layer, FinetuneConfig(**kw))  # noqa: E731
    assert math.isclose(lr(steps=300, rank=8), step * 2 * math.sqrt(3 * fan_in / 8) / 300, rel_tol=1e-6)
    assert math.isclose(lr(steps=600, rank=8), lr(steps=300, rank=8) / 2, rel_tol=1e-6)
    assert lr(steps=30, rank=8) == lr(steps=300, rank=8)  # short runs keep the 300-step rate
    assert math.isclose(lr(steps=300, rank=32), lr(steps=300, rank=8) / 2, rel_tol=1e-6)
    assert math.isclose(lr(steps=300, lr_scale_factor=1 / 2500), step / 2500, rel_tol=1e-6)  # the paper's rule
    assert math.isclose(lr(steps=300, rank=8, lr_multiplier=0.5), lr(steps=300, rank=8) / 2, rel_tol=1e-6)


def test_talsq_step_sizes_move_by_at_most_a_fraction_of_themselves(setup):
    """Adam moves a parameter by about its lr per step, so TALSQ's absolute act_lr is capped per layer at
    TALSQ_MAX_REL_STEP of the layer's mean step size (small 8-bit steps drifted 6 % per step and the README example
    diverged); zero points (units of codes) keep act_lr."""
    unet, q, calls, held, _ = setup
    for act_lr in (1e-4, 1.0):
        cfg = FinetuneConfig(**dict(FAST, act_lr=act_lr))
        student = E._shared_copy(q)
        student.requires_grad_(False)
        groups = E._param_groups(E._attach(student, cfg), cfg)
        scales = [g for g in groups if g.get("talsq_scale")]
        assert scales, "no TALSQ step-size group"
        for g in scales:
            (p,) = g["params"]
            cap = E.TALSQ_MAX_REL_STEP * float(p.detach().abs().mean())
            assert g["lr"] == pytest.approx(min(act_lr, cap))
        assert any(g["lr"] < act_lr for g in scales) == (act_lr == 1.0)  # W4A4 steps here are ~0.1: 1e-4 uncapped
        (zero,) = [g for g in groups if g["name"] == "talsq:zero"]
        assert zero["lr"] == act_lr


def test_divergence_reference_is_per_recorded_timestep():
    """t = 0 and t = 50 fall in one bin of 100 but their losses differ by an order of magnitude on the embedded
    model: each recorded timestep gets its own initial-loss reference."""
    assert E._loss_key(0) != E._loss_key(50) and E._loss_key(50.0) == E._loss_key(50)
    assert E._loss_key(None) is None
