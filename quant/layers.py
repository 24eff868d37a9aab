"""Quantized Conv2d / Linear layers with two modes.

* ``fake`` mode (calibration, reconstruction, fine-tuning): keeps the float weight (shared, never mutated)
  and a step size; the forward pass quantizes and dequantizes weights and input activations with
  straight-through rounding. Optional weight modifiers (AdaRound offsets, QALoRA adapters) plug in here.
* ``deployed`` mode: holds one packed weight object (``layer.packed``, a ``kernels.PackedWeight`` in the layer's
  registered weight format ``layer.w_format``) and computes through ``kernels.ops`` (real integer kernels where a
  backend supports the format; formats no backend runs compute ``op(fake_quant_act(x), dequantize(w))``).

Both modes compute the same function on the same step sizes: deployed(x) == fake(x) up to float rounding.

A registry maps float layer types to their quantized class (``@register_qlayer(nn.Conv2d)``).
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ACT_BITS_NONE
from .context import QuantContext
from .errors import NumericalError
from .quantizer import (act_scale_search, fake_quant_act, fake_quant_weight, quantize_weight_int, weight_scale,
                        a_qmax)

QLAYERS: Dict[type, type] = {}

RESERVOIR = 1 << 15  # activation values kept per (layer, time bin) for the L_p range search
_TABLE_VERSIONS = itertools.count(1)  # ActQuantizer._tables_version: unique across quantizers (a new one differs)


def register_qlayer(float_type):
    def deco(cls):
        QLAYERS[float_type] = cls
        cls.float_type = float_type
        return cls

    return deco


def qlayer_class_for(module: nn.Module):
    for t in type(module).__mro__:
        if t in QLAYERS:
            return QLAYERS[t]
    # Hosts with their own Linear that is not an nn.Linear subclass (Forge's ForgeOperations.Linear):
    # recognised by shape of the interface, i.e. in/out features and a 2-D weight.
    w = getattr(module, "weight", None)
    if (type(module).__name__ == "Linear" and isinstance(w, torch.Tensor) and w.dim() == 2
            and hasattr(module, "in_features") and hasattr(module, "out_features")):
        return QLAYERS.get(nn.Linear)
    return None


class ActQuantizer(nn.Module):
    """Static asymmetric activation quantizer with per-timestep tables, one table per supported bit-width.

    Buffers/parameters (K = number of table entries):
      tgrid      fp32 [K]     timesteps of the table entries (sorted); lookups interpolate linearly in t
      scale_<b>  fp32 [K]     step size for ``b``-bit activations (learnable: TALSQ, step-size calibration)
      zero_<b>   fp32 [K]     zero point (rounded in the forward pass, so deployment matches exactly)

    ``_tables_version`` changes whenever the tables do (assigned, loaded with ``load_state_dict``, resampled,
    calibrated): a deployed layer keeps the quantizers built from them until it differs. Code that edits the tensors
    in place calls ``tables_changed()``.
    """

    _tables_version = 0  # (class default: an instance unpickled from an older version has none)

    def __init__(self, bits_set, num_train_timesteps: int = 1000, time_bins: int = 1):
        super().__init__()
        self.tables_changed()
        self.bits_set = tuple(sorted(set(int(b) for b in bits_set)))
        self.num_train_timesteps = num_train_timesteps
        grid = self._grid(time_bins, num_train_timesteps)
        self.register_buffer("tgrid", grid)
        for b in self.bits_set:
            self.register_parameter(f"scale_{b}", nn.Parameter(torch.ones(len(grid)), requires_grad=False))
            self.register_parameter(f"zero_{b}", nn.Parameter(torch.zeros(len(grid)), requires_grad=False))
        self._obs = None
        self._gen = None  # seeded sampler of the calibration reservoir (only while observing)

    def tables_changed(self):
        """Mark the tables as changed: deployed layers rebuild their activation quantizers at their next call."""
        self.__dict__["_tables_version"] = next(_TABLE_VERSIONS)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "tgrid" or name.startswith(("scale_", "zero_")):
            self.tables_changed()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # (copies into the tables in place)
        self.tables_changed()

    @staticmethod
    def _grid(k: int, T: int) -> torch.Tensor:
        return (torch.arange(k, dtype=torch.float32) + 0.5) * (T / k) if k > 1 else torch.tensor([T / 2.0])

    def table(self, bits: int):
        return getattr(self, f"scale_{bits}"), getattr(self, f"zero_{bits}")

    @property
    def per_timestep(self) -> bool:
        """Whether the tables have several timestep entries (else the timestep is never needed, nor read: no host
        synchronisation on a GPU)."""
        return self._buffers["tgrid"].shape[0] > 1  # (len() of a buffer costs microseconds at every layer call)

    def lookup(self, t: Optional[float], bits: int):
        """(scale, zero) at timestep t, linear interpolation over the table (scalar tensors)."""
        scale, zero = self.table(bits)
        if scale.numel() == 1 or t is None:
            return scale[0] if t is not None or scale.numel() == 1 else scale.mean(), \
                zero[0] if t is not None or zero.numel() == 1 else zero.mean()
        g = self.tgrid
        tt = min(max(float(t), float(g[0])), float(g[-1]))
        i = int(torch.searchsorted(g, torch.tensor(tt), right=True).clamp(1, len(g) - 1)) - 1
        w = (tt - float(g[i])) / max(float(g[i + 1] - g[i]), 1e-12)
        return scale[i] * (1 - w) + scale[i + 1] * w, zero[i] * (1 - w) + zero[i + 1] * w

    def retable(self, time_bins: int):
        """Resample every table onto ``time_bins`` entries (interpolation), e.g. to start TALSQ."""
        new = self._grid(time_bins, self.num_train_timesteps).to(self.tgrid.device)
        for b in self.bits_set:
            s_old, z_old = self.table(b)
            s = torch.stack([self.lookup(float(t), b)[0].detach() for t in new])
            z = torch.stack([self.lookup(float(t), b)[1].detach() for t in new])
            setattr(self, f"scale_{b}", nn.Parameter(s.clone(), requires_grad=s_old.requires_grad))
            setattr(self, f"zero_{b}", nn.Parameter(z.clone(), requires_grad=z_old.requires_grad))
        self.tgrid = new

    # ---- calibration statistics (bounded memory: exact min/max + a fixed-size random reservoir) ----
    def observe(self, x: torch.Tensor, t: Optional[float], layer: Optional[str] = None):
        """Add ``x`` (the input of quantized layer ``layer``) to the statistics of its timestep bin; NaN/Inf in it
        raise ``NumericalError`` naming the layer: layers observe in the order they run, so it is the first quantized
        layer reached by non-finite values (they come from its inputs: the layers or operations before it)."""
        if self._obs is None:
            self._obs = {}
        k = len(self.tgrid)
        b = 0 if (t is None or k == 1) else min(int(float(t) / self.num_train_timesteps * k), k - 1)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            from .errors import NumericalError

            where = f"the input of layer {layer!r} (the first quantized layer they reach)" if layer else "an activation"
            raise NumericalError(f"NaN/Inf in {where} during calibration (timestep {t}); check the calibration inputs "
                                 "and the float model (what runs before that layer)")
        flat = x.detach().reshape(-1)
        n = min(flat.numel(), RESERVOIR // 4)
        if self._gen is None:  # fixed seed: the same calibration data gives the same scales
            self._gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, flat.numel(), (n,), generator=self._gen).to(flat.device)
        smp = flat[idx].float().cpu()
        st = self._obs.get(b)
        if st is None:
            self._obs[b] = [lo, hi, smp, flat.numel()]
        else:
            st[0], st[1] = min(st[0], lo), max(st[1], hi)
            # weighted merge: each part keeps a share proportional to the values it stands for, so the
            # sample stays uniform over all calls (a plain concat-and-subsample favours the latest calls)
            seen, new = st[3], flat.numel()
            st[3] = seen + new
            if st[2].numel() + smp.numel() <= RESERVOIR:
                keep_old, keep_new = st[2].numel(), smp.numel()
            else:
                keep_old = min(st[2].numel(), round(RESERVOIR * seen / (seen + new)))
                keep_new = min(smp.numel(), RESERVOIR - keep_old)
            old = (st[2] if keep_old == st[2].numel()
                   else st[2][torch.randperm(st[2].numel(), generator=self._gen)[:keep_old]])
            st[2] = torch.cat([old, smp[:keep_new]])

    def finish_observation(self, method: str):
        if not self._obs:
            return False
        k = len(self.tgrid)
        filled = sorted(self._obs)
        for bits in self.bits_set:
            s_tab, z_tab = self.table(bits)
            vals = {}
            for b in filled:
                lo, hi, smp = self._obs[b][:3]
                vals[b] = act_scale_search(smp, lo, hi, bits, method)
            # bins without data take the nearest observed bin
            for j in range(k):
                nearest = min(filled, key=lambda b: abs(b - j))
                s_tab.data[j] = vals[nearest][0]
                z_tab.data[j] = vals[nearest][1]
        self.tables_changed()
        self._obs = None
        self._gen = None
        return True

    def extra_repr(self):
        return f"bits={self.bits_set}, entries={len(self.tgrid)}"


_MISSING = object()
_KERNELS = []  # lowbit.kernels, imported at first use (the layers module is imported before the kernels are needed)


def _kernels():
    if not _KERNELS:
        from .. import kernels
        from ..kernels import autotune, ops, post  # noqa: F401  (submodules reached as attributes below)

        _KERNELS.append(kernels)
    return _KERNELS[0]


def _global_forward_hooks():
    return torch.nn.modules.module._global_forward_hooks


_SIDE_PATH_HOOK = []


def _side_path_hook():
    if not _SIDE_PATH_HOOK:
        from .side_paths import SidePathHook

        _SIDE_PATH_HOOK.append(SidePathHook)
    return _SIDE_PATH_HOOK[0]


_DYN_AQ: Dict[int, object] = {}


def _dynamic_aq(bits: int):
    aq = _DYN_AQ.get(bits)
    if aq is None:  # frozen, so one per width serves every layer
        aq = _DYN_AQ[bits] = _kernels().ActQuant(bits=bits, scale=None, zero_point=0, dynamic=True)
    return aq


_SHAPE_ONLY = frozenset({"dtype", "shape", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout",
                         "is_sparse", "is_quantized", "is_mkldnn", "size", "dim", "numel", "is_floating_point",
                         "is_complex", "element_size", "nelement", "__len__", "get_device"})


class DeployedWeight(torch.Tensor):
    """What a deployed layer answers for ``weight``: a tensor of the weight's shape, dtype and device that holds no
    memory (one zero expanded) for code that only asks what the weight is, and that becomes the dequantized weight
    (the packed integers times their scales, in the float parts' dtype) the moment code computes with it or reads
    its values: diffusers' ``fuse_qkv_projections`` concatenates ``to_q.weight.data`` and its siblings into a new
    float Linear, which got zeros from the earlier all-zero stand-in (silently wrong outputs; found by audit)."""

    @staticmethod
    def of(layer, pw) -> "DeployedWeight":
        stand_in = torch.zeros((), dtype=layer.__dict__.get("float_dtype", torch.float32),
                               device=pw.qdata.device).expand(layer.weight_shape)
        w = torch.Tensor._make_subclass(DeployedWeight, stand_in, False)
        w._pw = pw  # (the packed weight, not the layer: no cycle, nothing kept past the answer)
        return w

    def dequantized(self) -> torch.Tensor:
        from ..kernels import ops

        with torch._C.DisableTorchFunctionSubclass():
            dtype, shape = self.dtype, self.shape
        return ops.dequantize_weight(self._pw).to(dtype).reshape(shape)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(getattr(func, "__self__", None), "__name__", None) if getattr(func, "__name__", "") == \
            "__get__" else getattr(func, "__name__", None)
        if name in _SHAPE_ONLY:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name in ("data", "detach") and len(args) == 1 and not kwargs:
            return args[0]  # (still the stand-in: diffusers reads ``.weight.data`` then concatenates)

        def real(v):
            if isinstance(v, DeployedWeight):
                return v.dequantized()
            if isinstance(v, (list, tuple)):
                return type(v)(real(x) for x in v)
            return v

        with torch._C.DisableTorchFunctionSubclass():
            return func(*real(args), **{k: real(v) for k, v in kwargs.items()})


class QuantLayer(nn.Module):
    """Common part of the quantized Linear / Conv2d. Subclasses define ``_op`` and ``_kernel``."""

    float_type = None
    # (class defaults for layers made by an older version and unpickled whole: set per instance in __init__)
    post = None
    float_dtype = torch.float32

    def __init__(self, src: nn.Module, w_bits: int, a_bits: int, group_size=None, a_dynamic=False,
                 ctx: Optional[QuantContext] = None, a_bits_set=None, time_bins: int = 1, w_init: str = "lp",
                 name: str = "", scheduled: bool = True, init_scale: bool = True, w_format: Optional[str] = None):
        super().__init__()
        from ..kernels.formats import default_format, get_format
        from .errors import ConfigError

        self.w_bits, self.a_bits, self.group_size, self.a_dynamic = w_bits, a_bits, group_size, a_dynamic
        self.name = name
        if w_format is None and ctx is not None:  # the config names the format (QuantConfig.w_format) ...
            cfg_fmt = getattr(getattr(ctx, "config", None), "w_format", None)
            try:  # ... for the layers it can store (not those kept at 8 bits by a 4-bit layout)
                get_format(cfg_fmt).check(w_bits, group_size)
                w_format = cfg_fmt
            except ValueError:
                pass
        self.w_format = w_format or default_format(w_bits, group_size)
        try:
            get_format(self.w_format).check(w_bits, group_size, tuple(src.weight.shape))
        except ValueError as exc:
            raise ConfigError(f"layer {name!r}: {exc}; pick a w_format that stores W{w_bits}"
                              f"{'' if group_size is None else f' with group size {group_size}'}") from None
        self.weight_shape = tuple(src.weight.shape)
        # the dtype of the float parts around the layer (the source's; follows the model's casts, see _apply): what
        # a deployed layer's ``weight`` stand-in reports
        self.float_dtype = src.weight.dtype if src.weight.is_floating_point() else torch.float32
        # The float weight is shared with the source model (never mutated) to avoid a copy.
        self.weight = nn.Parameter(src.weight.detach(), requires_grad=False)
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().clone().float(), requires_grad=False)
        self.scheduled = scheduled  # follows the BitwidthSchedule (False for the layers kept at W8A8)
        try:
            scale = weight_scale(src.weight, w_bits, group_size, w_init) if init_scale else torch.ones(1)
        except NumericalError as exc:
            raise NumericalError(f"layer {name!r}: {exc}") from None
        if init_scale:
            scale = self.fmt.constrain_scale(scale)
        self.w_scale = nn.Parameter(scale, requires_grad=False)
        self.act = None
        if a_bits != ACT_BITS_NONE and not a_dynamic:
            self.act = ActQuantizer(a_bits_set or (a_bits,), ctx.num_train_timesteps if ctx else 1000, time_bins)
        self.modifier = None  # AdaRound / QALoRA: a module with ``weight(layer) -> fake-quantized weight``
        self._ctx = [ctx]  # list: keeps the context out of the module tree
        self.post = None  # activation applied to the output (kernels/post.py), taken in at deployment: set_post
        self.register_module("packed", None)  # deployed: the PackedWeight (float weight and w_scale are gone)

    def __getattr__(self, name):
        # A deployed layer has no float weight; hosts that look at ``linear.weight`` get a stand-in
        # (:class:`DeployedWeight`) with the weight's shape, on its device, in the dtype of the float parts around the
        # layer (``float_dtype``), no memory: ComfyUI's NextDiT checks ``isinstance(linear.weight, QuantizedTensor)``
        # of each block's projections (a plain tensor subclass: its own quantized path declines and the layer is
        # called); diffusers casts inputs with ``x.to(layer.weight.dtype)`` (IP-Adapter's image projection,
        # CustomDiffusion's processors: the packed int8 codes there turned inputs into integers). Code that computes
        # with it (diffusers' ``fuse_qkv_projections`` concatenates q / k / v weights) gets the dequantized weight.
        try:
            return super().__getattr__(name)
        except AttributeError:
            pw = self._modules.get("packed")
            if name == "weight" and pw is not None:
                return DeployedWeight.of(self, pw)
            raise

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """"deployed" when the layer holds a packed weight, "fake" otherwise (derived, never stored)."""
        return "fake" if self._modules.get("packed") is None else "deployed"

    @property
    def fmt(self):
        from ..kernels.formats import get_format

        return get_format(self.w_format)

    @property
    def _packed(self):
        # Legacy slot (a separate cache object before weight formats were modules): always None now; PackedWeight
        # drops its backend caches itself on deepcopy/pickle/device moves.
        return None

    @_packed.setter
    def _packed(self, value):
        pass

    @property
    def w_scale_buf(self):
        """Deprecated alias: the deployed weight's step sizes as the fake layer holds them (``packed_weight()``)."""
        return self.fmt.fake_scale(self.packed)

    # ---- context -------------------------------------------------------------------------------------
    @property
    def ctx(self) -> Optional[QuantContext]:
        return self._ctx[0]

    def set_context(self, ctx):
        self._ctx = [ctx]

    def current_a_bits(self) -> int:
        ctx = self.ctx
        return ctx.a_bits_for(self.a_bits) if (ctx is not None and self.scheduled) else self.a_bits

    # ---- weights -------------------------------------------------------------------------------------
    def weight_int(self) -> torch.Tensor:
        """Integer weights (int8 tensor of the logical shape), including any modifier (AdaRound, LoRA)."""
        if self.mode == "deployed":
            from ..kernels import ops

            return ops.unpack_weight(self.packed_weight())
        if self.modifier is not None:
            return self.modifier.weight_int(self)
        return quantize_weight_int(self.weight, self.w_scale.detach(), self.w_bits, self.group_size)

    def fake_weight(self) -> torch.Tensor:
        if self.modifier is not None:
            return self.modifier.fake_weight(self)
        return fake_quant_weight(self.weight.float(), self.w_scale, self.w_bits, self.group_size)

    def packed_weight(self):
        """The layer's PackedWeight: the one it holds when deployed, else a freshly packed one (modifiers merged)."""
        if self.packed is not None:
            return self.packed
        with torch.no_grad():
            return self._pack()

    def _pack(self):
        from ..kernels import ops

        return ops.pack_weight(self.weight_int(), self.w_bits, self.w_scale.detach().float().clone(), self.group_size,
                               format=self.w_format)

    def _apply(self, fn, *args, **kwargs):
        # Device moves apply; dtype casts do not: scales, tables and bias stay fp32 and integers stay
        # integers, so `model.to(torch.bfloat16)` runs the float parts (norms, attention) in bf16 while the
        # quantized layers keep exact scales (their outputs follow the input dtype). The packed weight drops its
        # backend caches (prepacked forms follow the device of the buffers). A fake layer's float weight is the
        # float model's tensor and follows casts like the float parts: it is the layer's first parameter, which hosts
        # read as the model's dtype (diffusers' ``ModelMixin.dtype``: kept fp32, a UNet2DModel cast to bf16 fed its
        # timestep embedding in fp32 to its bf16 layers); its quantization still computes in fp32 (``fake_weight``).
        weight = self._parameters.get("weight")
        follow = () if weight is None else (weight, weight.grad)

        def keep_dtype(t):
            out = fn(t)
            if out.dtype == t.dtype or any(t is f for f in follow):
                return out
            return t.to(device=out.device)  # (a cast and back would round the fp32 scales and tables)

        try:  # where the model's float tensors go (``model.to(torch.bfloat16)``, ``.half()``): ``float_dtype``
            probe = fn(torch.empty(0, dtype=self.__dict__.get("float_dtype", torch.float32)))
            if probe.is_floating_point():
                self.float_dtype = probe.dtype
        except Exception:  # a function that only makes sense for this module's tensors: the dtype stays
            pass
        return super()._apply(keep_dtype, *args, **kwargs)

    def deploy(self):
        """fake -> deployed: pack the integers (merging any modifier) and drop the float weight."""
        if self.mode == "deployed":
            return self
        with torch.no_grad():
            pw = self._pack()
        self.set_packed(pw)
        if self.act is not None:
            for b in self.act.bits_set:  # integer zero points in the deployed model
                z = self.act.table(b)[1]
                z.data.round_()
        self._params_to_buffers()
        return self

    def set_packed(self, pw):
        """Hold ``pw`` (a PackedWeight of this layer's shape and format) as the weight: drops the float weight, its
        step sizes and any modifier. Used by ``deploy`` and the loader."""
        if tuple(pw.shape) != self.weight_shape or pw.format != self.w_format or pw.bits != self.w_bits \
                or pw.group_size != self.group_size:
            raise ValueError(f"layer {self.name!r}: packed weight {pw.format} W{pw.bits} {list(pw.shape)} "
                             f"does not match {self.w_format} W{self.w_bits} {list(self.weight_shape)}")
        for n in ("weight", "w_scale"):
            if n in self._parameters:
                del self._parameters[n]
        self.modifier = None
        self.packed = pw
        return self

    def _params_to_buffers(self):
        """Deployed layers hold no parameters (bias and activation tables become buffers): they stay fp32
        under ``model.to(bf16)``, and hosts that read a model's dtype from its first parameter (diffusers'
        ``ModelMixin.dtype``) see the float parts' dtype, not ours."""
        mods = [self] + ([self.act] if self.act is not None else [])
        for m in mods:
            for name, p in list(m._parameters.items()):
                del m._parameters[name]
                if p is not None:
                    m.register_buffer(name, p.detach())
                else:
                    m.register_buffer(name, None)

    def _buffers_to_params(self):
        mods = [self] + ([self.act] if self.act is not None else [])
        names = {self: ("bias",), self.act: tuple(n for n in (self.act._buffers if self.act is not None else {})
                                                   if n != "tgrid")}
        for m in mods:
            for name in names[m]:
                if name in m._buffers:
                    t = m._buffers.pop(name)
                    setattr(m, name, None if t is None else nn.Parameter(t, requires_grad=False))

    def undeploy(self):
        """deployed -> fake, exactly: the float weight is the dequantized integer grid (EfficientDM's W0)."""
        if self.mode == "fake":
            return self
        from ..kernels import ops

        pw = self.packed
        w0 = ops.dequantize_weight(pw)
        scale = self.fmt.fake_scale(pw).float().clone()
        self.__dict__.pop("_aq_cache", None)  # the tables may be trained again (TALSQ)
        self.packed = None
        self._buffers_to_params()
        # the float parts' dtype (a model cast to bf16 after deployment stays bf16; the integers re-quantize exactly:
        # bf16 holds q * s within a quarter step)
        self.weight = nn.Parameter(w0.to(self.float_dtype), requires_grad=False)
        self.w_scale = nn.Parameter(scale, requires_grad=False)
        order = {"weight": self._parameters["weight"]}  # the weight first again, as in the float layer: hosts read
        order.update(self._parameters)  # a model's dtype from its first parameter (diffusers' ModelMixin.dtype)
        self._parameters.clear()
        self._parameters.update(order)
        return self

    # ---- activations ---------------------------------------------------------------------------------
    def act_params(self):
        """(bits, scale, zero) of the static activation quantizer at the current timestep, or None."""
        if self.act is None:
            return None
        bits = self.current_a_bits()
        if bits == ACT_BITS_NONE:
            return None
        if bits not in self.act.bits_set:
            raise RuntimeError(f"layer {self.name!r} has no activation scales for {bits} bits (calibrated for "
                               f"{self.act.bits_set}); re-quantize with a schedule that includes {bits} bits")
        ctx = self.ctx
        s, z = self.act.lookup(ctx.t if (ctx is not None and self.act.per_timestep) else None, bits)
        return bits, s, z

    def _fake_act(self, x):
        if self.a_dynamic:
            return _fake_dynamic(x, self.a_bits, per_token=self.float_type is nn.Linear)
        p = self.act_params()
        if p is None:
            return x
        bits, s, z = p
        return fake_quant_act(x, s.to(x.dtype), z.to(x.dtype), bits)

    def set_post(self, post: Optional[str]):
        """Take the activation that follows this layer (a name of kernels/post.py: "gelu", "gelu_tanh"; None: none)
        into the layer: every mode then returns ``post(output)`` (the deployed one in the kernel's epilogue where a
        backend fuses it) while nothing observes the output (:meth:`post_now`). quant/fuse.py sets it at
        deployment, where it puts a ``MovedActivation`` in the activation module's place."""
        if post is not None and self.float_type is not nn.Linear:
            raise ValueError(f"layer {self.name!r}: activation epilogues are for Linear layers")
        try:
            post = _kernels().post.check(post, self.weight_shape[0])
        except ValueError as exc:
            raise ValueError(f"layer {self.name!r}: {exc}") from None
        self.post = post
        pw = self._modules.get("packed")
        if pw is not None:  # the kernels chosen for this layer's calls were bound without it
            pw.cache.pop("autotune.layer", None)
        return self

    def post_now(self, post: Optional[str] = None) -> Optional[str]:
        """The activation a call takes in (``post``, else the layer's own), unless a forward hook would see the
        output (a LoRA side path adds to the Linear's output, before the activation; any other hook expects the
        Linear's output): then None, and the caller (quant/fuse.py's modules) applies it. A side-path hook without
        paths does not count (it leaves the output alone)."""
        if post is None:
            post = self.post
        if post is None:
            return None
        if _global_forward_hooks():
            return None
        if not self._forward_hooks:
            return post
        for h in self._forward_hooks.values():
            if not (isinstance(h, _side_path_hook()) and not h.paths):
                return None
        return post

    def forward(self, input, *, post: Optional[str] = None):
        """``post``: an activation applied to the output (kernels/post.py) for this call, in the kernel's epilogue
        where a backend fuses it, unless a hook watches the layer (``post_now``: then the caller applies it);
        quant/fuse.py's modules pass it. None: the layer's own ``post`` (set for declared pairs), if any."""
        x = input  # (torch's name for it: diffusers' AnimateDiff calls ``proj_in(input=hidden_states)``)
        if not x.is_floating_point():
            raise TypeError(f"quantized layer {self.name!r} got a {x.dtype} input; it takes float inputs (fp32, "
                            "bf16, fp16)")
        ctx = self._ctx[0]
        if ctx is not None and ctx.observing and self.act is not None:
            self.act.observe(x, ctx.t, self.name)
        if self._modules.get("packed") is not None:  # deployed
            return self._deployed_forward(x, post)
        if ctx is not None and (not ctx.quant_enabled or self.name in ctx.float_layers):
            return _kernels().post.apply(self._op(x, self.weight.to(x.dtype),
                                        None if self.bias is None else self.bias.to(x.dtype)), self.post_now(post))
        w = self.fake_weight().to(x.dtype)
        xq = x if (ctx is not None and (ctx.observing or not ctx.act_enabled)) else self._fake_act(x)
        return _kernels().post.apply(self._op(xq, w, None if self.bias is None else self.bias.to(x.dtype)),
                           self.post_now(post))

    def _deployed_forward(self, x, post=None):
        pw = self._modules["packed"]
        # The act quantizer and the kernel depend on (timestep, activation bits) and (input shape, dtype, threads)
        # only; both are resolved once per key and kept (a deployed layer's tables are frozen), so a later call of the
        # same key goes straight to the kernel the autotuner chose (no dispatch, no ActQuant, no argument checks).
        tkey, bits = self._act_key()
        post = self.post_now(post)
        cache = pw.cache
        table = cache.get("autotune.layer")
        if table is not None and cache.get("autotune"):
            key = (tkey, bits, x.shape, x.dtype, torch.get_num_threads(), post)
            hit = table.get(key)
            if hit is not None and _kernels().autotune.runnable(hit[0]):
                return hit[0].impl(x, pw, self.bias, *hit[1])
        aq = self._deployed_aq(tkey, bits)
        if pw.fmt.backends is None:  # a kernel layout: integer kernels where a backend accepts the call
            if x.dtype not in (torch.float32, torch.bfloat16):
                return self._kernel(x.float(), pw, self.bias, aq, post).to(x.dtype)
            tail = self._kernel_tail(aq)
            y = self._kernel_op(x, pw, self.bias, *tail, post=post)
            impl = _kernels().autotune.chosen(self._op_name, (x, pw, self.bias, *tail), post)
            if impl is not None:
                table = cache.setdefault("autotune.layer", {})
                if len(table) < 4096:
                    table[(tkey, bits, x.shape, x.dtype, torch.get_num_threads(), post)] = (impl, tail)
            return y
        # a format no kernel reads: the reference semantics, x quantized-dequantized times the weight
        ops = _kernels().ops
        gran = "token" if self.float_type is nn.Linear else "sample"
        xq = x.float() if aq is None else ops.fake_quant_act(x.float(), aq, gran)
        return _kernels().post.apply(self._op(xq, ops.dequantize_weight(pw), self.bias), post).to(x.dtype)

    def _act_key(self):
        """(timestep, activation bits) the deployed input quantizer depends on now (None, None: float activations)."""
        ctx = self._ctx[0]
        act = self._modules.get("act")
        if act is None:
            return None, None
        if act._tables_version != self.__dict__.get("_aq_version"):  # new tables: the old ones' quantizers are stale
            self._drop_act_caches(act._tables_version)
        tkey = ctx.t if (ctx is not None and act.per_timestep) else None
        return tkey, (ctx.a_bits_for(self.a_bits) if (ctx is not None and self.scheduled) else self.a_bits)

    def _drop_act_caches(self, version):
        """Forget the activation quantizers built from the tables (this layer's and its tuned calls' in the packed
        weight's cache); ``version``: the tables' version the next ones are built from."""
        self.__dict__.pop("_aq_cache", None)
        pw = self._modules.get("packed")
        if pw is not None:
            pw.cache.pop("autotune.layer", None)
        self.__dict__["_aq_version"] = version

    def _deployed_aq(self, tkey, bits):
        if self.a_dynamic:
            return _dynamic_aq(self.a_bits)
        # building a quantizer (table interpolation, checks) cost about as much as a small layer's kernel
        aqs = self.__dict__.setdefault("_aq_cache", {})
        aq = aqs.get((tkey, bits), _MISSING)
        if aq is _MISSING:
            p = self.act_params()
            aq = None if p is None else _kernels().ActQuant(bits=p[0], scale=float(p[1]),
                                                             zero_point=int(round(float(p[2]))))
            if len(aqs) < 4096:
                aqs[(tkey, bits)] = aq
        return aq

    def deployed_act(self):
        """The ``kernels.ActQuant`` a deployed layer applies to its input now (current timestep and activation bits;
        kept per (timestep, bits)), or None (float activations)."""
        return self._deployed_aq(*self._act_key())

    def _kernel(self, x, pw, bias, aq, post=None):
        return self._kernel_op(x, pw, bias, *self._kernel_tail(aq), post=post)

    def weight_bytes(self) -> int:
        if self.mode == "deployed":  # the packed integers and scales (the kernels' copies: kernel_copy_bytes)
            return self.packed_weight().nbytes(include_cache=False)
        n = 1
        for d in self.weight_shape:
            n *= d
        return math.ceil(n * self.w_bits / 8) + self.w_scale.numel() * 4

    def extra_repr(self):
        a = "fp" if self.a_bits == ACT_BITS_NONE else ("dyn" if self.a_dynamic else self.a_bits)
        g = f", group={self.group_size}" if self.group_size else ""
        return f"{self.name!r}, W{self.w_bits}A{a}{g}, {self.w_format}, {self.mode}, shape={self.weight_shape}"


def _fake_dynamic(x, bits, per_token: bool):
    dims = (-1,) if per_token else tuple(range(1, x.dim()))
    lo = x.detach().amin(dim=dims, keepdim=True).clamp_max(0)
    hi = x.detach().amax(dim=dims, keepdim=True).clamp_min(0)
    s = ((hi - lo) / a_qmax(bits)).clamp_min(1e-8)
    z = torch.round(-lo / s)
    return fake_quant_act(x, s, z, bits)


@register_qlayer(nn.Linear)
class QuantLinear(QuantLayer):
    def __init__(self, src: nn.Linear, **kw):
        super().__init__(src, **kw)
        self.in_features, self.out_features = src.in_features, src.out_features

    _op_name = "linear"

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _kernel_tail(self, aq):
        return (aq,)

    def _kernel_op(self, x, pw, bias, aq, post=None):
        return _kernels().ops.linear(x, pw, bias, aq, post)


@register_qlayer(nn.Conv2d)
class QuantConv2d(QuantLayer):
    def __init__(self, src: nn.Conv2d, **kw):
        if src.padding_mode != "zeros":
            raise ValueError(f"padding_mode={src.padding_mode!r} is not supported by quantized convolutions")
        super().__init__(src, **kw)
        self.stride, self.padding, self.dilation, self.groups = src.stride, src.padding, src.dilation, src.groups
        self.in_channels, self.out_channels = src.in_channels, src.out_channels

    def _op(self, x, w, b):
        # contiguous: a channels_last input made oneDNN's conv backward segfault (torch 2.13 CPU, 4x4 maps)
        return F.conv2d(x.contiguous(), w, b, self.stride, self.padding, self.dilation, self.groups)

    _op_name = "conv2d"

    def _kernel_tail(self, aq):
        """The arguments after (x, pw, bias) as ``ops.conv2d`` normalizes them (so the autotuner's key matches)."""
        conv = self.__dict__.get("_conv_args")
        if conv is None:
            ops = _kernels().ops
            pad = self.padding if isinstance(self.padding, str) else ops._pair(self.padding)
            conv = self.__dict__["_conv_args"] = (ops._pair(self.stride), pad, ops._pair(self.dilation),
                                                  int(self.groups))
        return (*conv, aq)

    def _kernel_op(self, x, pw, bias, stride, padding, dilation, groups, aq, post=None):
        return _kernels().ops.conv2d(x, pw, bias, stride, padding, dilation, groups, aq)


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
