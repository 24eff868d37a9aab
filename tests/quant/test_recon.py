import pytest
import torch

from lowbit.quant import QuantConfig, ReconConfig, get_context, quant_layers, quantize, reconstruct
from lowbit.quant.recon import FixedInt, find_units

from qutil import output_error


def _weight_err(fp, q, calls):
    ctx = get_context(q)
    ctx.act_enabled = False
    try:
        return output_error(fp, q, calls)
    finally:
        ctx.act_enabled = True


def test_units_in_execution_order(unet, calls):
    q = quantize(unet, QuantConfig.preset("W4A8"), calls)
    names = [n for n, _ in find_units(q, calls[0])]
    assert names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")  # registration order differs
    assert names.index("conv_in") < names.index("down_blocks.0.resnets.0") and names[-1] == "conv_out"


def test_adaround_reconstruction_reduces_output_error(unet, calls):
    naive = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), calls)
    rec = quantize(unet, QuantConfig.preset("W4A8", w_init="minmax"), calls)
    reconstruct(unet, rec, calls, ReconConfig(weight_iters=60, act_iters=0))
    assert _weight_err(unet, rec, calls) < _weight_err(unet, naive, calls)
    mods = [l.modifier for _, l in quant_layers(rec)]
    assert all(isinstance(m, FixedInt) for m in mods)  # hard rounding, compact int8 storage


def test_activation_pass_learns_step_sizes_and_lowers_the_error(unet, calls):
    """BRECQ's activation pass: step sizes move away from the L_p search and the W4A4 output error drops."""
    from lowbit.quant.recon import reconstruct_activations

    q = quantize(unet, QuantConfig.preset("W4A4", time_bins=4), calls)
    reconstruct(unet, q, calls, ReconConfig(weight_iters=20, act_iters=0))
    before = {n: l.act.table(4)[0].clone() for n, l in quant_layers(q) if l.act is not None and 4 in l.act.bits_set}
    err0 = output_error(unet, q, calls)
    reconstruct_activations(unet, q, calls, ReconConfig(act_iters=40, act_lr=1e-3))
    after = {n: l.act.table(4)[0] for n, l in quant_layers(q) if n in before}
    moved = [n for n in before if not torch.allclose(before[n], after[n])]
    assert len(moved) > len(before) // 2
    assert all(not t.requires_grad and bool((t > 0).all()) for t in after.values())
    assert output_error(unet, q, calls) < err0


def test_minibatch_takes_rows_of_batched_tensors_only():
    from lowbit.quant.recon import _minibatch

    inp = ((torch.arange(6.).view(6, 1), torch.tensor(5.)), {"emb": torch.arange(12.).view(6, 2), "k": 3})
    tgt = torch.arange(6.) * 10
    (a, kw), t = _minibatch(inp, tgt, 2, torch.Generator().manual_seed(0))
    assert a[0].shape == (2, 1) and a[1].dim() == 0 and kw["emb"].shape == (2, 2) and kw["k"] == 3
    assert torch.equal(t, a[0].view(-1) * 10) and torch.equal(kw["emb"][:, 0], a[0].view(-1) * 2)


def test_activation_pass_restores_step_sizes_that_do_not_help(unet, calls):
    """A unit keeps its learned activation step sizes only if they lower its loss on all the calibration calls:
    with a step-size learning rate 1000x the one above (the largest allowed), Adam throws them far off, and the
    units keep their L_p-search step sizes (the output error stays what it was)."""
    from lowbit.quant.recon import reconstruct_activations

    q = quantize(unet, QuantConfig.preset("W4A4", time_bins=4), calls)
    before = {n: l.act.table(4)[0].clone() for n, l in quant_layers(q) if l.act is not None and 4 in l.act.bits_set}
    err0 = output_error(unet, q, calls)
    reconstruct_activations(unet, q, calls, ReconConfig(act_iters=5, act_lr=1.0))
    after = {n: l.act.table(4)[0] for n, l in quant_layers(q) if n in before}
    kept = [n for n in before if torch.equal(before[n], after[n])]
    assert len(kept) >= 0.8 * len(before), (len(kept), len(before))
    assert output_error(unet, q, calls) <= err0 * 1.05


@pytest.mark.parametrize("method", ["recon", "efficientdm"])
def test_training_stages_run_on_a_hosts_inference_tensors(method):
    """Hosts (Forge, ComfyUI) load checkpoints and sample under ``torch.inference_mode()``: reconstruction and
    EfficientDM, called there on such a model and calls, get plain views of the model and copies of the calls from
    the pipeline (autograd may not save inference tensors; the views share the host's weight memory, so the float
    model is not duplicated); the model and calls given are left as they were, values included."""
    from lowbit.quant import FinetuneConfig, PipelineConfig, pipeline

    from qutil import assert_same_state, record, state_copy, tiny_unet

    with torch.inference_mode():
        fp = tiny_unet()
        calls = record(fp, ts=(900, 300))
        before, x_before = state_copy(fp), calls[0].args[0].clone()
        cfg = PipelineConfig.for_method(method, "W8A8", recon=ReconConfig(weight_iters=2, act_iters=0),
                                         finetune=FinetuneConfig(steps=2, batch_size=2), precision="rules")
        res = pipeline.run(fp, calls, cfg)
        assert_same_state(fp, before)
        assert torch.equal(calls[0].args[0], x_before)
    assert res.model is not None and all(p.is_inference() for p in fp.parameters())
    assert calls[0].args[0].is_inference()


def test_plain_copy_of_a_hosts_model_shares_its_weight_memory():
    """``plain_copy`` (the training stages' and the precision screen's view of a host's model) makes plain
    Parameters over the inference tensors' memory instead of copying them: an SDXL UNet's copy was its size again
    (Forge's peak RSS rose by the float UNet when the screen came). Autograd works through the view, and the host's
    module keeps its own tensors and flags."""
    from lowbit.quant.calib import plain_copy, training_mode

    from qutil import tiny_unet

    with torch.inference_mode():
        fp = tiny_unet().requires_grad_(True)
        x = torch.randn(2, 1, 16, 16)
    with training_mode():
        view = plain_copy(fp)
        pairs = list(zip(fp.parameters(), view.parameters()))
        assert pairs and all(a.data_ptr() == b.data_ptr() and a is not b for a, b in pairs)
        assert not any(p.is_inference() for p in view.parameters())
        assert not any(b.is_inference() for b in view.buffers())
        xi = x.clone().requires_grad_(True)
        out = view(xi, torch.tensor([500, 500]), class_labels=torch.tensor([1, 10])).sample
        out.sum().backward()  # (refused for inference tensors: "Inference tensors cannot be saved for backward")
        assert xi.grad is not None and xi.grad.abs().sum() > 0
    assert all(p.is_inference() and p.requires_grad for p in fp.parameters())
    assert all(p.grad is None for p in fp.parameters())


@pytest.mark.parametrize("method,bits", [("naive+ptqd", "W8A8"), ("naive", "W4A16")])
def test_post_training_methods_take_a_hosts_inference_tensors_without_copying_the_model(method, bits):
    """ComfyUI's Quantize node runs the pipeline under the host's ``torch.inference_mode()`` on the checkpoint's own
    tensors (it used to copy the whole float UNet first: an SDXL / DiT-size copy). Post-training methods work there:
    the model and calls given stay as they were, the float layers the plan keeps share the model's weight memory
    (no copy), and the result equals a run on plain copies outside that mode (the route the node took before)."""
    from lowbit.quant import LayerRule, PipelineConfig, pipeline
    from lowbit.quant.calib import plain_calls, plain_copy, training_mode

    from qutil import assert_same_state, record, state_copy, tiny_unet

    keep = LayerRule(pattern=r"^time_embedding\.", mode="fp")  # (a float layer, as a measured plan keeps some)
    cfg = PipelineConfig.for_method(method, bits, precision="rules",
                                    quant=QuantConfig.preset(bits, rules=(keep,)))
    with torch.inference_mode():
        fp = tiny_unet()
        calls = record(fp, ts=(900, 500, 100))
        before = state_copy(fp)
        res = pipeline.run(fp, calls, cfg)
        assert_same_state(fp, before)
        err = output_error(fp, res.model, calls)
    assert all(p.is_inference() for p in fp.parameters()) and calls[0].args[0].is_inference()
    fp_ptrs = {p.data_ptr() for p in fp.parameters()}
    kept = [n for n, m in res.model.named_modules()
            if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and n != "" and m.weight.data_ptr() in fp_ptrs]
    assert kept == ["time_embedding.linear_1", "time_embedding.linear_2"]
    with training_mode():
        ref = pipeline.run(plain_copy(fp), plain_calls(calls), cfg)
    with torch.inference_mode():
        ref_err = output_error(fp, ref.model, calls)
    assert err == pytest.approx(ref_err, rel=0.05)  # (kernel choices may differ in float summation order)


@pytest.mark.parametrize("method,bits", [("naive+ptqd", "W8A8"), ("lp", "W4A8")])
def test_quantizing_outside_inference_mode_a_model_a_host_loaded_inside_it(method, bits):
    """Forge loads checkpoints under ``torch.inference_mode()`` with ``requires_grad`` left on, and its LowBit tab
    quantizes from a gradio thread, outside that mode: the quantized copy's Parameter for a float-kept layer was made
    there with ``requires_grad=True`` and torch refused it ("Setting requires_grad=True on inference tensor outside
    InferenceMode is not allowed"; found in a real Forge). The run works, and the host's model keeps its tensors and
    flags."""
    from lowbit.quant import PipelineConfig, pipeline
    from lowbit.quant.calib import plain_calls, plain_copy, training_mode

    from qutil import assert_same_state, record, state_copy, tiny_unet

    # (the name rules, not the measured plan: the copy makes a Parameter for every quantizable layer either way, and
    # measuring twice took half a minute of the quick suite)
    cfg = PipelineConfig.for_method(method, bits, precision="rules")
    with torch.inference_mode():
        fp = tiny_unet().requires_grad_(True)  # (as Forge's: made under inference mode, requires_grad left on)
        calls = record(fp, ts=(900, 500, 100))
        before = state_copy(fp)
    res = pipeline.run(fp, calls, cfg)
    assert all(p.is_inference() and p.requires_grad for p in fp.parameters())
    with training_mode():
        ref = pipeline.run(plain_copy(fp).requires_grad_(False), plain_calls(calls), cfg)
    with torch.inference_mode():
        assert_same_state(fp, before)
        err, ref_err = output_error(fp, res.model, calls), output_error(fp, ref.model, calls)
    assert err == pytest.approx(ref_err, rel=0.05)  # (as on plain copies; kernel choices may differ in summation order)


class _ToyMoE(torch.nn.Module):
    """Tokens through a top-1 routed mixture of two experts (HiDream, Nucleus-MoE): which rows an expert gets depends
    on the router's input, which quantizing ``proj_in`` changes. ``experts``: the name of the expert list."""

    def __init__(self, experts="experts", d=16):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.proj_in, self.temb, self.router, self.proj_out = nn.Linear(d, d), nn.Linear(1, d), nn.Linear(d, 2), \
            nn.Linear(d, d)
        self.list_name = experts
        setattr(self, experts, nn.ModuleList(nn.Linear(d, d) for _ in range(2)))
        self.eval().requires_grad_(False)

    def forward(self, x, timestep):
        h = self.proj_in(x) + self.temb(timestep.float().view(-1, 1, 1) / 1000)
        flat = h.reshape(-1, h.shape[-1])
        pick = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for i, e in enumerate(getattr(self, self.list_name)):
            rows = (pick == i).nonzero().squeeze(1)
            if len(rows):
                out[rows] = e(flat[rows])
        return self.proj_out(out.view_as(h))


def _moe_calls(m):
    from lowbit.quant import CallRecorder

    g = torch.Generator().manual_seed(1)
    with CallRecorder(m) as rec, torch.no_grad():
        for t in (900, 500, 100):
            m(torch.randn(2, 32, 16, generator=g), torch.tensor([t, t]))
    return rec.calls


@pytest.mark.parametrize("experts", ["experts", "mixture"])
def test_routed_experts_are_not_fitted_against_other_tokens(experts):
    """Top-k routing sends other tokens (here another number of them) to an expert in the quantized model than in the
    float one: the experts keep their initial rounding, say why in the report, and everything else is reconstructed
    (it crashed in lp_loss on the row counts). An expert list named ``experts`` is known by name (equal counts would
    still be other tokens); another name, by its inputs' shapes differing between the two models."""
    from lowbit.quant import pipeline
    from lowbit.quant.recon import _capture

    fp = _ToyMoE(experts)
    calls = _moe_calls(fp)
    q = quantize(fp, QuantConfig.preset("W4A8"), calls)
    get_context(q).act_enabled = False
    rows = [(_capture(q, f"{experts}.0", c, "input")[0][0].shape[0], _capture(fp, f"{experts}.0", c, "output")[0]
             .shape[0]) for c in calls]
    get_context(q).act_enabled = True
    assert any(a != b for a, b in rows), rows  # the case this test is about: routing differs
    reconstruct(fp, q, calls, ReconConfig(weight_iters=3, act_iters=3, batch_size=2))
    for name, layer in quant_layers(q):
        assert (layer.modifier is None) == name.startswith(experts + "."), name
    lines = "\n".join(pipeline.describe(q))
    why = "routed mixture-of-experts expert" if experts == "experts" else "inputs differ between the quantized"
    assert lines.count("(not reconstructed: ") == 2 and lines.count(why) == 2, lines


def test_routed_expert_names():
    from lowbit.quant.recon import routed_expert

    assert routed_expert("single_stream_blocks.0.block.ff_i.experts.0.w1") and routed_expert("moe.experts.3")
    assert not routed_expert("ff_i.shared_experts.w1") and not routed_expert("experts") \
        and not routed_expert("blocks.0.experts_gate")
