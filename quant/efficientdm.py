"""EfficientDM (docs/PAPERS.md A7-A11): data-free, quantization-aware LoRA fine-tuning of a quantized UNet.

Verbs:
  finetune(qmodel, teacher, calls, FinetuneConfig, progress) -> fine-tuned copy (inputs untouched)
  merge_(model)                    fold the adapters into the integer weights (exact), round TALSQ zero points
  save_adapters(model, dir)        peft-style ``adapter_config.json`` + ``adapter_model.safetensors`` (+ TALSQ tables)
  load_adapters(qmodel, dir)       a copy of ``qmodel`` with those adapters and tables
  distillation_loss(model, teacher, calls)   mean squared error of the noise predictions (evaluation)

Pieces:
* QALoRA (A8): every quantized layer except the W8A8 ones (``layer.scheduled is False``) computes its weight
  as Q(W0 + B·A) with straight-through rounding, W0 = the layer's dequantized integer grid, with the layer's
  frozen per-channel step sizes. Linear: A [r, K], B [N, r]; Conv2d: A [r, C, kh, kw] (a kxk conv C->r),
  B [N, r, 1, 1] (a 1x1 conv r->N), i.e. dW[o,i,:,:] = sum_r B[o,r] A[r,i,:,:]. Tensors are named and
  shaped as peft names them (``lora_A.weight``, ``lora_B.weight``, lora_alpha = r so the scale is 1).
* TALSQ (A11): the activation step sizes *and* zero points of those layers are learned per entry of a
  timestep table (``ActQuantizer.retable(time_bins)``), looked up by the timestep the UNet call carries
  (linear interpolation), never by a call counter; the zero point is rounded (STE) in the forward pass.
* Distillation (A9): teacher = the full-precision UNet; inputs = UNet calls recorded along its own sampling
  trajectories (``CallRecorder``); loss = MSE between student and teacher noise predictions.
* Scale-aware learning rates (A10): each layer's LoRA parameters get lr = mean(weight step size) x a factor
  (``lora_lr``: ``lr_scale_factor`` or, by default, one derived from steps, rank and fan-in); TALSQ tables get
  ``act_lr``; AdamW, linear decay to 0.
* Merge: because W0 is on the grid, Q(W0 + BA) = clamp(W_int + round(BA / step)) exactly: the fine-tuned
  model deploys to plain integer weights and runs on the same kernels as any quantized model.

Departures from the official code (docs/PAPERS.md section E), on purpose:
* weight step sizes are frozen (a learnable step shared by the dequantizer of W0 and the requantizer rescales
  the base weights too); AdamW weight decay defaults to 0 (the official code applies 0.01 to LoRA and scales);
* TALSQ is keyed by timestep with interpolation, so guidance as one or two calls, any step count or sampler
  pick the same scales; zero points are rounded in the forward pass so merging/deployment is exact;
* rank and target layers are configurable (``FinetuneConfig.rank``, ``FinetuneConfig.targets``) instead of
  rank 32 on hard-coded module indices; the W8A8 layers are found from the quantization plan;
* the loss compares every row's prediction (conditional and unconditional rows alike) instead of the
  guidance-combined prediction: matching both branches matches every guidance scale;
  it is mean- rather than sum-reduced (Adam is invariant to a constant loss scale);
* the adapters are merged offline; the official code recomputes B·A and requantizes at every inference step;
* the student shares every frozen tensor with the quantized input (no second full-precision copy).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import tempfile
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .calib import (Call, CallRecorder, _to_model, batch_rows, keyed, model_device_dtype, require_timesteps,
                    unet_output)
from .config import FinetuneConfig, to_json_obj
from .context import get_context, sample_of_call, timestep_of_call
from .errors import ConfigError, LoadError, NumericalError
from .layers import ActQuantizer, QuantLayer, quant_layers
from .progress import Stage
from .quantizer import expand_weight_scale, quantize_weight_int, round_ste, w_qrange
from .transaction import check_finite, transaction

__all__ = ["finetune", "merge_", "save_adapters", "load_adapters", "distillation_loss", "QALoRA", "lora_layers"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TALSQ_TABLES = "lowbit_talsq.safetensors"
ADAPTER_FORMAT = "lowbit.qalora"
ADAPTER_FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
MAX_LOSS_GROWTH = 10.0  # loss (summed over recorded timesteps) above this multiple of the initial one stops the run
MIN_ACT_SCALE = 1e-8
# TALSQ's learning rate is absolute (``FinetuneConfig.act_lr``, the paper's setting), but Adam moves every parameter
# by about its lr per step whatever the gradient's size, so a layer whose activation step is small moves by a large
# fraction of it: with 8-bit steps of 0.008-0.08 on the embedded model, 5e-4 per step drifted them 6 % per step and
# wrecked the t = 0 outputs within 16 steps (the README example diverged). Each layer's step sizes are therefore
# capped at this fraction of their mean per step; steps of 0.05 and more (typical at 4 bits) keep ``act_lr``.
TALSQ_MAX_REL_STEP = 0.01


# ----------------------------------------------------------------------------------------------- QALoRA
class QALoRA(nn.Module):
    """Weight modifier of one quantized layer (the ``QuantLayer.modifier`` protocol).

    Parameters (peft shapes; r = rank, N = output channels, weight of logical shape (N, ...)):
      lora_A  fp32 [r, K] (Linear) or [r, C, kh, kw] (Conv2d)   init kaiming-uniform(a=sqrt(5))
      lora_B  fp32 [N, r] (Linear) or [N, r, 1, 1] (Conv2d)     init 0, so dW = B·A = 0 at the start

    fake_weight(layer) = clamp(round_ste(W_int0 + dW / step), qmin, qmax) · step, with W_int0 the layer's
    integer weights for its frozen step sizes (computed from the shared float weight, not stored), which is
    Q(W0 + dW) because W0 = W_int0 · step is on the grid.
    """

    def __init__(self, layer: QuantLayer, rank: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        shape = tuple(layer.weight_shape)
        self.weight_shape, self.rank = shape, int(rank)
        a = torch.empty((rank,) + shape[1:], dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros((shape[0], rank) + (1,) * (len(shape) - 2)))

    def delta(self) -> torch.Tensor:
        """B·A as a tensor of the layer's logical weight shape."""
        n = self.weight_shape[0]
        return (self.lora_B.reshape(n, self.rank) @ self.lora_A.reshape(self.rank, -1)).reshape(self.weight_shape)

    def _base(self, layer: QuantLayer):
        with torch.no_grad():
            s = expand_weight_scale(layer.w_scale.detach().float(), self.weight_shape, layer.group_size)
            w_int0 = quantize_weight_int(layer.weight.detach(), layer.w_scale.detach().float(), layer.w_bits,
                                         layer.group_size).float()
        return w_int0, s

    def fake_weight(self, layer: QuantLayer) -> torch.Tensor:
        w_int0, s = self._base(layer)
        qmin, qmax = w_qrange(layer.w_bits)
        return torch.clamp(round_ste(w_int0 + self.delta() / s), qmin, qmax) * s

    def weight_int(self, layer: QuantLayer) -> torch.Tensor:
        """Merged integers W_int0 + round(B·A / step), clamped (int8 of the logical shape)."""
        with torch.no_grad():
            w_int0, s = self._base(layer)
            qmin, qmax = w_qrange(layer.w_bits)
            return torch.clamp(torch.round(w_int0 + self.delta().float() / s), qmin, qmax).to(torch.int8)

    def extra_repr(self):
        return f"rank={self.rank}, shape={self.weight_shape}"


def lora_layers(model: nn.Module):
    """(name, layer) for every quantized layer of ``model`` that carries a QALoRA adapter."""
    return [(n, l) for n, l in quant_layers(model) if isinstance(l.modifier, QALoRA)]


def _targets(model: nn.Module, cfg: FinetuneConfig):
    out = []
    for name, layer in quant_layers(model):
        if not layer.scheduled:
            continue  # kept at W8A8 (first/last conv, time embedding, shortcuts): no adapter (A8)
        if cfg.targets and not re.search(cfg.targets, name):
            continue
        if getattr(layer, "groups", 1) != 1:
            continue  # grouped convolutions: B·A does not have the grouped weight layout
        out.append((name, layer))
    return out


# ----------------------------------------------------------------------------------- the student copy
def _shared_copy(qmodel: nn.Module) -> nn.Module:
    """Deep copy of a quantized model that shares every frozen tensor with it.

    Shared by storage (read-only; wrapped in new frozen ``nn.Parameter`` objects, so no gradient or flag ever
    reaches the originals): the float/dequantized weights of the quantized layers (which ``quantize`` already
    shares with the full-precision model), weight step sizes, biases, norms, embeddings and buffers.
    Copied: the activation tables (``ActQuantizer``; small), because TALSQ trains them and deployment rounds
    their zero points in place. New: the adapters.
    """
    memo = {}
    for mod in qmodel.modules():
        if isinstance(mod, ActQuantizer):
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        for b in mod.buffers(recurse=False):
            memo[id(b)] = b
    student = copy.deepcopy(qmodel, memo)
    for _, layer in quant_layers(student):  # (packed weights drop their backend caches when copied)
        if layer.mode == "deployed":
            layer.undeploy()  # new float W0 = dequantized grid; the shared packed buffers are only read
    ctx = get_context(student)
    if ctx is not None and ctx.ptqd is not None:
        # PTQD statistics describe the error of the model *before* fine-tuning; collect them again afterwards
        ctx.ptqd = None
        ctx.ptqd_active = False
    return student


def _attach(student: nn.Module, cfg: FinetuneConfig) -> List[tuple]:
    gen = torch.Generator().manual_seed(int(cfg.seed))  # same init on every rank
    targets = _targets(student, cfg)
    if not targets:
        raise ConfigError(f"no layer to fine-tune: no quantized layer outside the W8A8 ones matches targets="
                          f"{cfg.targets!r}; widen FinetuneConfig.targets (\"\" = all)")
    from .profiles import get_profile

    bins = max(cfg.time_bins, get_profile(get_context(student).profile).min_time_bins)  # (the family's floor)
    for _, layer in targets:
        dev = layer.weight.device
        layer.modifier = QALoRA(layer, cfg.rank, gen).to(dev)
        if layer.act is not None and cfg.act_lr > 0:
            layer.act.retable(bins)
            for b in layer.act.bits_set:
                for p in layer.act.table(b):
                    p.requires_grad_(True)
    return targets


AUTO_LR_REACH = 1.0  # in weight steps: how far B·A may move a weight over a run under the automatic rule
AUTO_LR_MIN_STEPS = 300  # shorter runs keep the rate of a 300-step run (a larger one makes the first steps diverge)


def lora_lr(layer, cfg: FinetuneConfig) -> float:
    """Scale-aware LoRA learning rate of ``layer`` (A10): mean weight step size x a factor.

    With ``lr_scale_factor`` given, that factor (the paper: 1/2500 for 16 000 steps). Otherwise automatic: Adam
    moves B by about lr per step, so after ``steps`` steps with linear decay |B| ~ lr·steps/2, and B·A sums r
    products with A ~ U(±1/sqrt(fan_in)) (std 1/sqrt(3·fan_in)), i.e. |B·A| ~ lr·steps/2·sqrt(r/(3·fan_in)).
    Asking for ``AUTO_LR_REACH`` weight steps gives factor = 2·REACH·sqrt(3·fan_in/r)/steps (steps at least
    ``AUTO_LR_MIN_STEPS``: shorter runs move the weights less rather than diverge). Merged weights
    only change where |B·A| passes half a step, so a rate far below this trains nothing but TALSQ: on the default
    model at W4A4, 300 steps at the paper-derived factor 0.004 changed 0.3% of the integers and not the FID.
    """
    step = float(layer.w_scale.detach().float().mean())
    if cfg.lr_scale_factor is not None:
        factor = cfg.lr_scale_factor
    else:
        fan_in = math.prod(layer.weight_shape[1:])
        factor = 2 * AUTO_LR_REACH * math.sqrt(3.0 * fan_in / cfg.rank) / max(cfg.steps, AUTO_LR_MIN_STEPS)
    return step * factor * cfg.lr_multiplier


def _param_groups(targets, cfg: FinetuneConfig):
    """AdamW groups: each layer's LoRA pair (its own lr), each layer's TALSQ step sizes (``act_lr``, capped at
    ``TALSQ_MAX_REL_STEP`` x their mean, see there; marked ``talsq_scale``, the tensors kept positive after each
    step), and all zero points (``act_lr``, in units of codes)."""
    groups, zeros = [], []
    for name, layer in targets:
        lr = lora_lr(layer, cfg)
        groups.append(dict(params=[layer.modifier.lora_A, layer.modifier.lora_B], lr=lr, name=name))
        if layer.act is None:
            continue
        for b in layer.act.bits_set:
            scale, zero = layer.act.table(b)
            if scale.requires_grad:
                cap = TALSQ_MAX_REL_STEP * float(scale.detach().abs().mean())
                groups.append(dict(params=[scale], lr=min(cfg.act_lr, cap), name=f"talsq:{name}:{b}", talsq_scale=True))
            if zero.requires_grad:
                zeros.append(zero)
    if zeros:
        groups.append(dict(params=zeros, lr=cfg.act_lr, name="talsq:zero"))
    return groups


# ---------------------------------------------------------------------------------------- the data
def _first_tensor(v):
    if torch.is_tensor(v):
        return v
    if isinstance(v, (list, tuple)):
        for x in v:
            r = _first_tensor(x)
            if r is not None:
                return r
    return None


def _rows(call: Call, profile=None) -> int:
    """The batch size of a recorded call: its noisy input's rows (the first positional tensor, else the profile's
    sample keyword: transformers' pipelines pass ``hidden_states=`` by keyword)."""
    x = _first_tensor(call.args)
    if x is None:
        x = sample_of_call((), call.kwargs, profile)
    if x is None or not torch.is_tensor(x) or x.dim() < 1:
        raise ConfigError("a recorded UNet call has no batched input tensor (expected forward(sample, timestep, "
                          "...)); record the calls with lowbit.quant.CallRecorder on the UNet itself")
    return int(x.shape[0])


class _Mismatch(Exception):
    pass


def _cat(vs, ns):
    v0 = vs[0]
    if torch.is_tensor(v0):
        if all(torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n for v, n in zip(vs, ns)):
            return torch.cat(vs)
        if all(torch.is_tensor(v) and v.shape == v0.shape and torch.equal(v, v0) for v in vs):
            return v0
        raise _Mismatch
    if isinstance(v0, dict):
        if any(not isinstance(v, dict) or v.keys() != v0.keys() for v in vs):
            raise _Mismatch
        return {k: _cat([v[k] for v in vs], ns) for k in v0}
    if isinstance(v0, (list, tuple)):
        if any(not isinstance(v, (list, tuple)) or len(v) != len(v0) for v in vs):
            raise _Mismatch
        return type(v0)(_cat([v[i] for v in vs], ns) for i in range(len(v0)))
    if any(v != v0 for v in vs):
        raise _Mismatch
    return v0


class _Bank:
    """Training batches from recorded calls: every batch holds rows of one timestep (the context carries one
    t per UNet call, so TALSQ sees the right table entry); timesteps are visited in shuffled epochs; teacher
    predictions are computed once per call and cached (fp32, CPU)."""

    def __init__(self, calls: List[Call], batch_size: int, seed: int, profile=None):
        self.calls, self.batch_size = calls, batch_size
        self.n = [_rows(c, profile) for c in calls]
        self.groups: Dict[object, List[int]] = defaultdict(list)
        for i, c in enumerate(calls):
            self.groups[c.t].append(i)
        self.keys = sorted(self.groups, key=lambda k: (k is None, k if k is not None else 0.0))
        self.rng = random.Random(seed)
        self.order: List = []
        self.targets: Dict[int, torch.Tensor] = {}

    def next(self):
        if not self.order:
            self.order = list(self.keys)
            self.rng.shuffle(self.order)
        key = self.order.pop()
        pool = [(ci, r) for ci in self.groups[key] for r in range(self.n[ci])]
        pick = sorted(self.rng.sample(pool, min(self.batch_size, len(pool))))
        by_call: Dict[int, List[int]] = defaultdict(list)
        for ci, r in pick:
            by_call[ci].append(r)
        return list(by_call.items())

    def teacher_out(self, teacher, ci: int) -> torch.Tensor:
        if ci not in self.targets:
            self.targets[ci] = _predict(teacher, self.calls[ci], what="the full-precision teacher").cpu()
        return self.targets[ci]

    def build(self, parts, teacher):
        """(args, kwargs, target) on CPU for ``parts`` = [(call index, rows)]."""
        pieces = []
        for ci, rows in parts:
            c, n = self.calls[ci], self.n[ci]
            idx = torch.tensor(rows, dtype=torch.long)
            pieces.append((batch_rows(c.args, idx, n), batch_rows(c.kwargs, idx, n),
                           self.teacher_out(teacher, ci)[idx]))
        if len(pieces) > 1:
            try:
                ns = [len(r) for _, r in parts]
                return (_cat([p[0] for p in pieces], ns), _cat([p[1] for p in pieces], ns),
                        torch.cat([p[2] for p in pieces]))
            except _Mismatch:
                pass  # calls with different non-batch arguments: use the first one alone
        return pieces[0]


def _predict(model, call: Call, what: str) -> torch.Tensor:
    dev, dt = model_device_dtype(model)
    args, kwargs = call.to(dev, dt)
    with torch.no_grad():
        out = unet_output(model(*args, **kwargs)).float()
    if not torch.isfinite(out).all():
        raise NumericalError(f"{what} produced NaN/Inf at timestep {call.t}; check the model and its inputs")
    return out


def _record(teacher, fn: Callable) -> List[Call]:
    with CallRecorder(teacher) as rec:
        fn(teacher)
    if not rec.calls:
        raise ConfigError("the trajectory function made no UNet call; it must run a sampler on the model it "
                          "receives, e.g. lambda unet: sample(unet, labels)")
    return rec.calls


def distillation_loss(model: nn.Module, teacher: nn.Module, calls: Sequence[Call]) -> float:
    """Mean squared error between ``model`` and ``teacher`` noise predictions over all rows of ``calls``."""
    tot, cnt = 0.0, 0
    with _eval_mode(teacher), _eval_mode(model):
        for c in calls:
            y = _predict(teacher, c, "the teacher")
            q = _predict(model, c, "the model").to(y.device)
            tot += float((q - y).pow(2).sum())
            cnt += y.numel()
    return tot / max(cnt, 1)


class _eval_mode:
    """Temporarily eval() a module and restore its previous train/eval flags (input models stay untouched)."""

    def __init__(self, m):
        self.m, self.flags = m, None

    def __enter__(self):
        self.flags = [(mod, mod.training) for mod in self.m.modules()]
        self.m.eval()
        return self.m

    def __exit__(self, *exc):
        for mod, f in self.flags:
            mod.training = f
        return False


# --------------------------------------------------------------------------- gradient checkpointing
def _checkpoint_blocks(model: nn.Module) -> List[nn.Module]:
    """Wrap the UNet's top-level blocks (elements of top-level ModuleLists, e.g. diffusers down_blocks /
    up_blocks or LDM input_blocks / output_blocks, and mid_block / middle_block) in torch.utils.checkpoint."""
    from torch.utils.checkpoint import checkpoint

    wrapped = []
    for name, child in model.named_children():
        mods = list(child) if isinstance(child, nn.ModuleList) else (
            [child] if name in ("mid_block", "middle_block") else [])
        for m in mods:
            if not any(p.requires_grad for p in m.parameters()):
                continue
            orig = m.forward

            def fwd(*a, _orig=orig, **k):
                return checkpoint(_orig, *a, use_reentrant=False, **k)

            m.forward = fwd
            wrapped.append(m)
    return wrapped


def _unwrap_checkpoints(mods):
    for m in mods:
        m.__dict__.pop("forward", None)


# ---------------------------------------------------------------------------------------- finetune
def finetune(qmodel: nn.Module, teacher: nn.Module, calls: Union[Sequence[Call], Callable],
             config: Optional[FinetuneConfig] = None, progress=None) -> nn.Module:
    """EfficientDM fine-tuning. Returns a NEW model (fake-quant mode, adapters attached; ``merge_`` folds them).

    qmodel:  a LowBit quantized UNet (from ``quantize`` or ``load``; deployed models are undeployed in the copy).
    teacher: the full-precision UNet it was made from (frozen; run under no_grad, its train/eval flags restored).
    calls:   UNet calls recorded along full-precision sampling trajectories (``CallRecorder``), or a function
             ``fn(unet)`` that runs a sampler on the UNet it is given (it is run on the teacher and recorded).
    progress: ``progress(done, total, info)`` with ``info["loss"]`` every step, ``"tqdm"``, or None; it may raise
             to cancel: nothing of the inputs has been changed (the fine-tune works on a copy).

    Memory: the student is a copy of ``qmodel`` that shares all frozen tensors with it by storage (quantized
    layers' float weights, which ``quantize`` already shares with the teacher, step sizes, biases, norms,
    embeddings, buffers); only the activation tables are copied and the adapters are new. So a fine-tune holds
    one full-precision set of weights (the teacher's), not two as in the official code. Teacher predictions
    are cached per recorded call (fp32 on the CPU).

    Under ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU) each rank trains on its shard of the
    calls (``calls[rank::world_size]``) in DistributedDataParallel; gradients are averaged, so every rank ends
    with the same model. The loss checked for divergence is the average over ranks (all ranks stop together).

    Raises ``NumericalError`` (naming the step) on a NaN/Inf loss or a loss above 100x the first step's.

    ``config.sampling_steps / guidance / eta`` describe the trajectories a host should record (the calls carry
    their own timesteps and conditioning, so finetune itself does not read them). The returned model records
    ``finetune_info`` in its context (config, first/last loss, ranks), which ``quant.io.save`` writes into the file
    header.
    """
    cfg = FinetuneConfig() if config is None else config
    if not isinstance(cfg, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(cfg).__name__}")
    if get_context(qmodel) is None or not quant_layers(qmodel):
        raise ConfigError("finetune needs a LowBit quantized UNet (lowbit.quant.quantize or load) as qmodel and the "
                          "full-precision UNet as teacher")
    if teacher is qmodel or get_context(teacher) is not None:
        raise ConfigError("the teacher must be the full-precision UNet, not a quantized one")
    with transaction(qmodel, readonly=(teacher,)):  # the student is a copy; this covers what it shares
        student = _finetune(qmodel, teacher, calls, cfg, progress)
        check_finite(student, "finetune")
    return student


def _finetune(qmodel, teacher, calls, cfg: FinetuneConfig, progress):
    if callable(calls) and not isinstance(calls, (list, tuple)):
        with _eval_mode(teacher):
            calls = _record(teacher, calls)
    calls = list(calls)
    if not calls:
        raise ConfigError("finetune needs recorded UNet calls (CallRecorder around a full-precision sampling run)")
    calls = keyed(calls, teacher, get_context(qmodel).profile)
    require_timesteps(teacher, calls, get_context(qmodel).profile, "EfficientDM")

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    shard = calls[rank::world]
    if not shard:
        raise ConfigError(f"{len(calls)} recorded calls cannot be sharded over {world} ranks; record more calls")

    if dist:
        _check_same_model(dist, qmodel, world)
    student = _shared_copy(qmodel)
    student.requires_grad_(False)
    targets = _attach(student, cfg)
    groups = _param_groups(targets, cfg)
    act_scales = [p for g in groups if g.get("talsq_scale") for p in g["params"]]  # kept positive after each step
    first, last = _train(student, teacher, shard, cfg, groups, act_scales, progress, dist, rank, world)
    get_context(student).finetune_info = dict(config=to_json_obj(cfg), steps=cfg.steps, first_loss=first,
                                              last_loss=last,
                                    world_size=world, calls=len(calls), shard=len(shard), rank=rank,
                                    layers=len(targets))
    return student


def _initial_loss(net, trainable, init, args, kwargs, target) -> float:
    """Loss of the student with its trainable tensors at their initial values (restored afterwards)."""
    now = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        for p, v in zip(trainable, init):
            p.copy_(v)
        try:
            out = unet_output(net(*args, **kwargs)).float()
            return float((out - target.to(out.device)).pow(2).mean())
        finally:
            for p, v in zip(trainable, now):
                p.copy_(v)


def _loss_key(t):
    """The divergence test's key of a step's timestep: the recorded value itself (see ``_train``)."""
    return None if t is None else round(float(t), 6)


def _train(student, teacher, shard, cfg: FinetuneConfig, groups, act_scales, progress, dist, rank, world):
    """The distillation loop over ``groups`` (AdamW param groups with their lrs). Returns (first, last) loss."""
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / cfg.steps))
    bank = _Bank(shard, cfg.batch_size, cfg.seed + 7919 * rank, profile=get_context(student).profile)

    wrapped = _checkpoint_blocks(student) if cfg.grad_checkpointing else []
    net = student
    if dist:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # frozen tensors are shared with the input models: DDP must not broadcast into them
        frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in student.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(student, frozen)
        # tables of activation bit-widths a BitwidthSchedule does not use at some t get no gradient there
        multi = any(isinstance(m, ActQuantizer) and len(m.bits_set) > 1 for m in student.modules())
        net = DDP(student, find_unused_parameters=multi)
    dev, dt = model_device_dtype(student)
    first = lval = None
    # Divergence: the distillation loss summed over the timesteps seen so far (each: its latest batch) against
    # the same sum for the *initial* student (each: its first batch). Losses differ by orders of magnitude across
    # timesteps, so one global reference misfires; but a per-timestep test misfires too: at late timesteps the
    # quantized model is nearly exact (losses ~1e-4) and batch noise alone passes 10x there. A run that really
    # diverges raises the loss at every timestep, so the sum, dominated by the large terms, catches it. Keyed by
    # the recorded timestep itself, not a bin of them: t = 0 and t = 50 differed 12x on the embedded model, and a
    # bin's reference taken at t = 50 made the first t = 0 batch look like divergence.
    ref, cur = {}, {}
    init = [p.detach().clone() for p in trainable]
    try:
        with _eval_mode(teacher), Stage(progress, cfg.steps, "fine-tune") as st:
            student.eval()
            for step in range(1, cfg.steps + 1):
                args, kwargs, target = bank.build(bank.next(), teacher)
                args, kwargs = _to_model(args, dev, dt), _to_model(kwargs, dev, dt)
                out = unet_output(net(*args, **kwargs)).float()
                loss = (out - target.to(out.device)).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lval = loss.detach().float().reshape(1).cpu()
                if dist:
                    dist.all_reduce(lval)
                    lval /= world
                lval = float(lval)
                first = lval if first is None else first
                t = timestep_of_call(args, kwargs, get_context(student).profile, student)
                key = _loss_key(t)
                if key not in ref:
                    ref[key] = _initial_loss(net, trainable, init, args, kwargs, target)
                cur[key] = lval
                base, now = sum(ref.values()), sum(cur.values())
                if not math.isfinite(lval) or now > MAX_LOSS_GROWTH * max(base, 1e-12):
                    what = "NaN/Inf" if not math.isfinite(lval) else (
                        f"{now:.4g} summed over {len(cur)} timesteps, above {MAX_LOSS_GROWTH:g}x the loss "
                        f"before fine-tuning ({base:.4g})")
                    raise NumericalError(
                        f"EfficientDM fine-tune diverged at step {step}/{cfg.steps}: loss {what}; lower "
                        f"FinetuneConfig.lr_multiplier (now {cfg.lr_multiplier:g}) or act_lr (now {cfg.act_lr:g})")
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p in act_scales:  # TALSQ: keep the step sizes positive (zero points are free)
                        p.clamp_(min=MIN_ACT_SCALE)
                st.step(loss=lval)
        bad = [n for n, p in student.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NumericalError(f"EfficientDM fine-tune diverged at step {cfg.steps}/{cfg.steps}: NaN/Inf in "
                                 f"{bad[0]}; lower FinetuneConfig.lr_multiplier or act_lr")
    finally:
        _unwrap_checkpoints(wrapped)
        if dist:
            student.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
    student.requires_grad_(False)
    for p in trainable:
        p.grad = None
    return first, lval


def _check_same_model(dist, qmodel, world):
    """Every rank must start from the same quantized model (frozen tensors are not broadcast)."""
    fp = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for _, l in quant_layers(qmodel):
            fp[0] += l.weight_int().double().abs().sum()
            fp[1] += (l.w_scale if l.mode == "fake" else l.fmt.fake_scale(l.packed)).double().sum()
            if l.act is not None:
                fp[2] += sum(float(t.double().abs().sum()) for b in l.act.bits_set for t in l.act.table(b))
    allfp = [torch.zeros_like(fp) for _ in range(world)]
    dist.all_gather(allfp, fp)
    if any(not torch.equal(allfp[0], f) for f in allfp[1:]):
        raise ConfigError("the ranks of this distributed fine-tune hold different quantized models; quantize once "
                          "(e.g. on rank 0), save with lowbit.quant.save and load the same file on every rank")


def _dist():
    try:
        import torch.distributed as d
    except ImportError:
        return None
    return d if (d.is_available() and d.is_initialized()) else None


# ------------------------------------------------------------------------------------------- merge
def merge_(model: nn.Module) -> nn.Module:
    """Fold every QALoRA adapter into the layer's integer weights, in place: W_int' = clamp(W_int + round(B·A /
    step)) (exact, W0 being on the grid), stored as the dequantized grid W_int'·step; the adapter is dropped and
    the activation zero points are rounded. ``deploy_`` then packs the integers like any quantized model.
    Transactional: on an error (a deployed layer with an adapter, NaN/Inf in the result) ``model`` is left as it
    was."""
    with transaction(model):
        check_finite(model, "merge_")  # NaN adapters would round to arbitrary integers
        _merge(model)
        check_finite(model, "merge_")
    return model


def _merge(model: nn.Module):
    for name, layer in quant_layers(model):
        if isinstance(layer.modifier, QALoRA):
            if layer.mode != "fake":
                raise ConfigError(f"layer {name!r} is deployed but still has an adapter; this model was built "
                                  "incorrectly — merge before deploying")
            with torch.no_grad():
                w_int = layer.modifier.weight_int(layer)
                s = expand_weight_scale(layer.w_scale.detach().float(), layer.weight_shape, layer.group_size)
                layer.weight = nn.Parameter((w_int.float() * s).to(layer.weight.device), requires_grad=False)
            layer.modifier = None
        if layer.act is not None:
            for b in layer.act.bits_set:
                s_tab, z_tab = layer.act.table(b)
                z_tab.data = z_tab.data.round()  # new storage: tables shared with another model stay as they were
            layer.act.requires_grad_(False)


# -------------------------------------------------------------------------------------- save / load
def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("saving/loading EfficientDM adapters in peft format needs peft: pip install peft") from None
    return peft


def save_adapters(model: nn.Module, directory: str, overwrite: bool = False) -> str:
    """Write the adapters of a fine-tuned (unmerged) model to ``directory``:

      adapter_config.json        ``peft.LoraConfig`` (r, lora_alpha = r, lora_dropout 0, target_modules = layer names)
      adapter_model.safetensors  ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight`` (fp32, peft shapes)
      lowbit_talsq.safetensors   ``<layer>.act.tgrid`` / ``.scale_<b>`` / ``.zero_<b>``: the learned TALSQ tables

    The adapters apply to the quantized model they were trained on (its integer grid and step sizes)."""
    from safetensors.torch import save_file

    peft = _peft()
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("this model has no QALoRA adapters (already merged, or not from finetune)")
    ranks = {l.modifier.rank for _, l in layers}
    if len(ranks) != 1:
        raise ConfigError(f"adapters of different ranks {sorted(ranks)} cannot be described by one LoraConfig")
    r = ranks.pop()
    files = [os.path.join(directory, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TALSQ_TABLES)]
    if not overwrite and any(os.path.exists(f) for f in files):
        raise FileExistsError(f"{directory} already holds adapters; choose another directory or pass overwrite=True")
    os.makedirs(directory, exist_ok=True)
    names = [n for n, _ in layers]
    lcfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=names, bias="none")
    tensors, tables = {}, {}
    for n, l in layers:
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = l.modifier.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = l.modifier.lora_B.detach().float().contiguous().cpu()
        if l.act is not None:
            tables[f"{n}.act.tgrid"] = l.act.tgrid.float().contiguous().cpu()
            for b in l.act.bits_set:
                s, z = l.act.table(b)
                tables[f"{n}.act.scale_{b}"] = s.detach().float().contiguous().cpu()
                tables[f"{n}.act.zero_{b}"] = z.detach().float().contiguous().cpu()
    meta = dict(format=ADAPTER_FORMAT, format_version=ADAPTER_FORMAT_VERSION, rank=r,
                finetune=(get_context(model).finetune_info or {}).get("config"))
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lowbit-") as tmp:
        lcfg.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt", "lowbit": json.dumps(meta)})
        save_file(tables, os.path.join(tmp, TALSQ_TABLES), metadata={"format": "pt", "lowbit": json.dumps(meta)})
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TALSQ_TABLES):
            os.replace(os.path.join(tmp, f), os.path.join(directory, f))
    return directory


def _lfail(directory, problem, fix):
    raise LoadError(f"cannot load adapters from {directory}: {problem}. {fix}")


def load_adapters(qmodel: nn.Module, directory: str) -> nn.Module:
    """A copy of the quantized ``qmodel`` (sharing its frozen tensors, see ``finetune``) with the QALoRA adapters
    and TALSQ tables from ``directory`` (written by ``save_adapters``). ``qmodel`` is not changed.
    ``lora_alpha != r`` (other peft adapters) is folded into B; dropout is ignored (inference)."""
    from safetensors import safe_open

    peft = _peft()
    cpath = os.path.join(directory, ADAPTER_CONFIG)
    wpath = os.path.join(directory, ADAPTER_WEIGHTS)
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            _lfail(directory, f"{os.path.basename(p)} is missing", "pass the directory written by save_adapters")
    if os.path.getsize(cpath) > 4 * 1024 * 1024:
        _lfail(directory, "adapter_config.json is larger than 4 MiB", "the file is not an adapter config")
    try:
        with open(cpath) as f:
            raw = json.load(f)
        known = set(peft.LoraConfig.__dataclass_fields__)
        if not isinstance(raw, dict) or str(raw.get("peft_type", "LORA")).upper() != "LORA":
            raise ValueError("not a LoRA adapter config")
        lcfg = peft.LoraConfig(**{k: v for k, v in raw.items() if k in known})
        r, alpha = lcfg.r, lcfg.lora_alpha
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
            raise ValueError(f"r={r!r}, lora_alpha={alpha!r}")
    except (ValueError, TypeError) as exc:
        _lfail(directory, f"adapter_config.json is not a valid peft LoraConfig ({exc})", "save the adapters again")
    scale = (alpha / math.sqrt(r)) if lcfg.use_rslora else (alpha / r)
    try:
        with safe_open(wpath, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        _lfail(directory, f"reading {ADAPTER_WEIGHTS} failed ({exc})", "the file is corrupt; save it again")
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PEFT_PREFIX)})
    if not names:
        _lfail(directory, f"no {PEFT_PREFIX}<layer>.lora_A.weight tensors", "this is not a LoRA adapter file")
    qlayers = dict(quant_layers(qmodel))
    for n in names:
        if n not in qlayers:
            _lfail(directory, f"layer {n!r} is not a quantized layer of this model",
                   "load the adapters onto the quantized model they were trained on")
        shape = qlayers[n].weight_shape
        a, b = tensors.get(f"{PEFT_PREFIX}{n}.lora_A.weight"), tensors.get(f"{PEFT_PREFIX}{n}.lora_B.weight")
        want_a = (r,) + tuple(shape[1:])
        want_b = (shape[0], r) + (1,) * (len(shape) - 2)
        if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            _lfail(directory, f"layer {n!r}: adapter tensors missing or of the wrong shape (want A {want_a}, "
                              f"B {want_b})", "the adapters belong to another model or rank")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            _lfail(directory, f"layer {n!r} has NaN/Inf adapter weights", "the adapters come from a diverged run")
    tables = {}
    tpath = os.path.join(directory, TALSQ_TABLES)
    if os.path.isfile(tpath):
        try:
            with safe_open(tpath, framework="pt") as f:
                tables = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            _lfail(directory, f"reading {TALSQ_TABLES} failed ({exc})", "the file is corrupt; save it again")
    model = _shared_copy(qmodel)
    for n in names:
        layer = model.get_submodule(n)
        mod = QALoRA(layer, r)
        with torch.no_grad():
            mod.lora_A.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"].float())
            mod.lora_B.copy_(tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"].float() * scale)
        layer.modifier = mod.to(layer.weight.device)
        if layer.act is not None and f"{n}.act.tgrid" in tables:
            g = tables[f"{n}.act.tgrid"].float()
            for bb in layer.act.bits_set:
                s, z = tables.get(f"{n}.act.scale_{bb}"), tables.get(f"{n}.act.zero_{bb}")
                if s is None or z is None or s.shape != g.shape or z.shape != g.shape or not torch.isfinite(s).all():
                    _lfail(directory, f"layer {n!r}: TALSQ table for {bb} bits missing or malformed",
                           "the file is corrupt; save it again")
                setattr(layer.act, f"scale_{bb}", nn.Parameter(s.float().clone(), requires_grad=False))
                setattr(layer.act, f"zero_{bb}", nn.Parameter(z.float().clone(), requires_grad=False))
            layer.act.tgrid = g.clone()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------- provenance in saved quantized models
def _to_state(qmodel):
    info = get_context(qmodel).finetune_info
    return None if not info else (dict(info), {})


def _check_meta(meta) -> None:
    if not isinstance(meta, dict):
        raise ValueError("efficientdm metadata must be an object")


def _from_state(qmodel, meta, tensors):
    _check_meta(meta)
    get_context(qmodel).finetune_info = meta


def _register():
    from .io import register_extra

    register_extra("efficientdm", _to_state, _from_state, check_meta=_check_meta)


_register()
