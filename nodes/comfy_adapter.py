"""The only module of the pack that knows ComfyUI's objects (ModelPatcher, BaseModel, samplers, folder_paths).

Every ComfyUI import is inside a function, so the node modules import (and their contracts can be tested)
without ComfyUI. Facts about ComfyUI used here were read in v0.3.64 and checked by the integration tests:

* A MODEL is a ``ModelPatcher``; ``clone()`` shares the torch module, so a quantized UNet is installed on a
  clone with ``add_object_patch("diffusion_model", q_unet)``; the input MODEL stays usable and unchanged.
* ``patcher.get_model_object("diffusion_model")`` is the UNet that patcher runs (its object patch, else the
  original, also while another clone's object patch is applied).
* ``BaseModel.apply_model`` calls ``diffusion_model(x_in, t, context=..., transformer_options=...)`` with
  ``t = model_sampling.timestep(sigma)``: the quantized UNet reads its timestep from that call.
* ``patcher.pre_run()`` runs the ``ON_PRE_RUN`` callbacks right before every sampling run, after the model
  was loaded and its object patches applied; ``ON_LOAD`` runs at the end of every (re)load.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import List, Optional

import torch

from ..quant.calib import CallRecorder, plain_calls, plain_copy, sanitize_calls, training_mode  # noqa: F401
from ..quant.context import get_context
from ..quant.layers import QuantLayer, quant_layers
from ..quant.profiles import comfy_sd3 as _comfy_sd3  # noqa: F401  (registers ComfyUI's SD3 profile)
from ..quant.split import ChannelSplitConv2d
from ..quant import side_paths as lora_side
from .common import NodeInputError

log = logging.getLogger("lowbit.nodes")

LOWBIT_FOLDER = "lowbit"  # models/lowbit/ (folder_paths key)
CALLBACK_KEY = "lowbit"


# ---------------------------------------------------------------------------------------------- progress
class NodeProgress:
    """Core progress callback ``(done, total, info)`` -> ComfyUI progress bar, plus the interrupt check
    (raises ComfyUI's InterruptProcessingException when the user presses Cancel)."""

    def __init__(self, total: int = 1):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(int(total), 1))
        self.last_info = {}

    def __call__(self, done, total, info=None):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.last_info = info or {}
        self.bar.update_absolute(int(done), int(total))


def node_text_sink(unique_id):
    """``line -> None`` that shows ``line`` on the node in ComfyUI's UI (the server's progress text, as core nodes
    do), or None outside a server / on a ComfyUI without it."""
    if unique_id is None:
        return None
    try:
        from server import PromptServer
    except ImportError:
        return None
    inst = getattr(PromptServer, "instance", None)
    if inst is None or not hasattr(inst, "send_progress_text"):
        return None
    return lambda line: inst.send_progress_text(line, str(unique_id))


def check_interrupt():
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------------------------------------- models
def unet_of(model):
    """The UNet this MODEL runs (its object patch if it has one)."""
    if not hasattr(model, "get_model_object"):
        raise NodeInputError(f"expected a MODEL (ComfyUI ModelPatcher), got {type(model).__name__}")
    return model.get_model_object("diffusion_model")


def is_quantized(unet) -> bool:
    return get_context(unet) is not None or any(isinstance(m, QuantLayer) for m in unet.modules())


def require_fp_unet(model, what="model"):
    unet = unet_of(model)
    if is_quantized(unet):
        raise NodeInputError(f"{what} is already quantized by LowBit; connect the full-precision MODEL "
                             "(e.g. straight from the checkpoint loader)")
    return unet


def require_quantized_unet(model, what="model"):
    unet = unet_of(model)
    if get_context(unet) is None:
        raise NodeInputError(f"{what} is not a LowBit quantized model; connect the output of Quantize UNet "
                             "(LowBit) or Load Quantized UNet (LowBit)")
    return unet


def model_sampling(model):
    return model.get_model_object("model_sampling")


def is_flow(model) -> bool:
    """Rectified-flow models (SD3, Flux, ...): ComfyUI's ``CONST`` prediction, x_t = (1 - sigma) x0 + sigma eps."""
    import comfy.model_sampling as cms

    return isinstance(model_sampling(model), cms.CONST)


def num_train_timesteps(model) -> int:
    """T of the per-timestep tables. Discrete eps/v models: the length of their sigma table (1000 for SD).
    Flow models: 1000, as the tables are keyed by 1000 * sigma (quant/profiles: ComfyUI's SD3 receives
    1000 * sigma, its Flux sigma, scaled by 1000); Flux's own table has 10000 entries, which is not T."""
    if is_flow(model):
        return 1000
    ms = model_sampling(model)
    sig = getattr(ms, "sigmas", None)
    return int(sig.shape[0]) if torch.is_tensor(sig) and sig.dim() == 1 else 1000


def percent_to_timestep_fn(model):
    """percent of the run (0 = start) -> the table key the UNet sees there (the timestep it receives, mapped by its
    profile's ``ModelProfile.table_key``: x1000 for ComfyUI's Flux)."""
    from ..quant.profiles import profile_for

    ms = model_sampling(model)
    key = profile_for(unet_of(model)).table_key

    def f(p: float) -> float:
        sigma = ms.percent_to_sigma(float(p))
        return key(float(ms.timestep(torch.tensor(float(sigma))).float()))

    return f


def load_model(model):
    """Load (and weight-patch) the MODEL the way sampling would, so its UNet weights include any LoRA."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])


def attach_quantized_unet(model, q_unet, merged: bool = False):
    """A clone of ``model`` that runs ``q_unet``; ``model`` itself is not changed.

    ``merged``: ``q_unet`` was quantized from ``model``'s weights with its LoRA (weight) patches applied
    (:func:`load_model`), so the clone drops those patches: kept, they would be added a second time, as side paths
    on the quantized layers (:func:`sync_lora_side_paths`) and by ComfyUI on the float ones. A LoRA loaded after
    this node adds new patches to the clone, which do become side paths. Without ``merged`` (a file loaded onto
    ``model``, a fine-tuned student) the patches stay: they were not part of ``q_unet``."""
    import comfy.model_management

    fp_unet = unet_of(model)
    m = model.clone()
    if merged:
        for key in [k for k in m.patches if k.startswith("diffusion_model.")]:
            del m.patches[key]
    m.add_object_patch("diffusion_model", q_unet)
    # A new patches_uuid makes ComfyUI reload when switching between this clone and the float one (otherwise
    # an already-loaded float model with the same uuid is reused without moving/patching the quantized UNet).
    m.patches_uuid = uuid.uuid4()
    # Memory estimate: ModelPatcher.size is cached from the float model; the clone holds the quantized UNet
    # (packed integers) instead of the float one. The float UNet stays in RAM as the object-patch backup.
    # ComfyUI's module_size sums state_dict() bytes, which miss the packed weights (they are not parameters and
    # the state dict reports zero-byte placeholders; ComfyUI's load log counted 119 MB for the W8A8 Flux
    # test model, whose comfyui-native export is 610 MiB), so
    # the quantized UNet is counted with the core's weight_bytes (packed integers, scales, float rest), plus what
    # the kernels may keep next to them (the autotuner's copy budget, or the copies already made if larger).
    try:
        from ..kernels import autotune
        from ..quant.api import kernel_copy_bytes, weight_bytes

        copies = max(autotune.summary(q_unet)["budget_bytes"] or 0, kernel_copy_bytes(q_unet))
        q_bytes = max(comfy.model_management.module_size(q_unet), weight_bytes(q_unet)) + copies
        size = model.model_size() - comfy.model_management.module_size(fp_unet) + q_bytes
        if size > 0:
            m.size = size
    except Exception as exc:  # an estimate only; never fail the node on it
        log.debug("LowBit: model size estimate skipped (%s)", exc)
    install_lora_support(m, q_unet)
    return m


# ---------------------------------------------------------------------------------------------- calibration
def empty_latent(model, width: int, height: int, batch: int = 1):
    import comfy.sample

    lat = torch.zeros([batch, 4, height // 8, width // 8], device="cpu")
    return comfy.sample.fix_empty_latent_channels(model, lat)


def record_unet_calls(model, positive, negative, *, steps: int, samples: int, seed: int, cfg: float,
                      width: int, height: int, progress=None, sampler_name: str = "euler",
                      scheduler: str = "normal"):
    """Sample ``samples`` images with ComfyUI's own sampler and the float MODEL, recording every UNet call
    (its input x_t, timestep, context...). Returns the core's ``Call`` list."""
    import comfy.sample

    unet = unet_of(model)
    latent = empty_latent(model, width, height)
    total = steps * samples
    rec = CallRecorder(unet)
    with rec:
        for i in range(samples):
            rec.new_trajectory()
            seed_i = (seed + i) % 2 ** 64  # (the widget allows up to 2^64 - 1)
            noise = comfy.sample.prepare_noise(latent, seed_i)

            def cb(step, x0, x, total_steps, _i=i):
                if progress is not None:
                    progress(_i * steps + step + 1, total, {"stage": "calibration sampling"})

            comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                denoise=1.0, callback=cb, disable_pbar=True, seed=seed_i)
    if not rec.calls:
        raise NodeInputError("calibration recorded no model calls; check that the MODEL is a diffusion model "
                             "(SD1.x/SD2.x/SDXL UNet, SD3 or Flux transformer) and that calibration_steps > 0")
    return sanitize_calls(rec.calls)


def copy_quantized(q_unet):
    """Deep copy of a quantized UNet without the kernels' prepacked caches (``PackedWeight.cache`` may hold
    opaque oneDNN tensors, which cannot be deep-copied; the copy rebuilds them on first use)."""
    import copy

    memo = {id(layer._packed): None for _, layer in quant_layers(q_unet) if getattr(layer, "_packed", None) is not None}
    return copy.deepcopy(q_unet, memo)


def alphas_cumprod(model) -> torch.Tensor:
    """abar_t of the model's schedule, indexed by the table key t in [0, T).

    Discrete eps/v models: from their sigmas (abar = 1 / (1 + sigma^2)). Flow models: the key is 1000 * sigma,
    and x_t = (1 - s) x0 + s eps has the SNR of a VP model with abar = (1 - s)^2 / ((1 - s)^2 + s^2)."""
    if is_flow(model):
        T = num_train_timesteps(model)
        s = torch.arange(1, T + 1, dtype=torch.float32) / T
        return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
    sig = model_sampling(model).sigmas.detach().float().cpu()
    return 1.0 / (1.0 + sig ** 2)


# -------------------------------------------------------------------------------------------------- LoRA
class _WeightKeyState:
    """State-dict hook on a deployed quantized layer, and on a split convolution (``quant/split.py``: its float
    ``<conv>.weight`` became ``<conv>.parts.N.*``): reports zero-byte ``<layer>.weight`` (and, for a split
    conv with a bias, ``<layer>.bias``) placeholders, so the state dict has the float model's keys. ComfyUI's
    LoRA key map (``comfy.lora.model_lora_keys_unet``) and ``ModelPatcher.add_patches`` read the keys of
    ``state_dict()`` of whichever UNet is attached at that moment: the quantized one while a quantized clone
    is loaded, also when the LoRA is applied to the *float* MODEL. Zero bytes: memory estimates stay right."""

    def __call__(self, module, state_dict, prefix, local_metadata):
        if "weight" not in module._parameters and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = torch.empty(0, device="meta")
        if isinstance(module, ChannelSplitConv2d) and module.parts[0].bias is not None \
                and prefix + "bias" not in state_dict:
            state_dict[prefix + "bias"] = torch.empty(0, device="meta")
        return state_dict


def _report_float_keys(module):
    if not any(isinstance(h, _WeightKeyState) for h in module._state_dict_hooks.values()):
        module._register_state_dict_hook(_WeightKeyState())


def split_convs(q_unet):
    """(name, ChannelSplitConv2d) for every split convolution of ``q_unet``."""
    return [(n, m) for n, m in q_unet.named_modules() if isinstance(m, ChannelSplitConv2d)]


def install_lora_support(patcher, q_unet):
    for _, layer in quant_layers(q_unet):
        _report_float_keys(layer)
        lora_side.ensure_hook(layer)
    for _, conv in split_convs(q_unet):
        _report_float_keys(conv)
    import comfy.patcher_extension as pe

    for kind in (pe.CallbacksMP.ON_PRE_RUN, pe.CallbacksMP.ON_LOAD):
        existing = patcher.callbacks.get(kind, {}).get(CALLBACK_KEY, [])
        if not existing:
            patcher.add_callback_with_key(kind, CALLBACK_KEY, _sync_callback)


def _sync_callback(patcher, *args):
    sync_lora_side_paths(patcher)


def _is_plain_lora(entry) -> bool:
    strength, v, strength_model, offset, function = entry
    w = getattr(v, "weights", None)
    return (getattr(v, "name", None) == "lora" and isinstance(w, (tuple, list)) and len(w) >= 6
            and w[3] is None and w[4] is None and w[5] is None and offset is None and function is None
            and strength_model == 1.0)


def _dense_delta(patches, base: torch.Tensor, key: str) -> torch.Tensor:
    import comfy.lora

    out = comfy.lora.calculate_weight(patches, base.clone(), key)
    return out - base


def side_paths_for(layer, weight_patches, bias_patches, key: str, device) -> List[lora_side.SidePath]:
    """ComfyUI patch entries for one quantized layer -> side paths (low-rank when exact, else dense)."""
    from ..kernels import ops

    paths = []
    if weight_patches:
        plain = [_is_plain_lora(e) for e in weight_patches]
        factored = []
        if all(plain):
            for strength, v, *_ in weight_patches:
                up, down, alpha = v.weights[0], v.weights[1], v.weights[2]
                fu = lora_side.check_conv_low_rank(layer, down.float(), up.float())
                if fu is None:
                    factored = None
                    break
                rank = down.shape[0]
                scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
                factored.append(lora_side.SidePath(down=fu[0], up=fu[1], scale=scale))
        if all(plain) and factored is not None:
            paths += factored
        else:
            w0 = ops.dequantize_weight(layer.packed_weight()).float().to(device)
            paths.append(lora_side.SidePath(delta_w=_dense_delta(weight_patches, w0, key + ".weight")))
    if bias_patches and layer.bias is not None:
        b0 = layer.bias.detach().float().to(device)
        paths.append(lora_side.SidePath(delta_b=_dense_delta(bias_patches, b0, key + ".bias")))
    return [p.to(device) for p in paths]


def _split_side_paths(conv, weight_patches, bias_patches, key: str, device) -> int:
    """Route the LoRA patches of a split convolution's float key (``<conv>.weight``/``.bias``) to its parts.

    ``conv(cat(x_i), W) = sum_i conv(x_i, W[:, off_i:off_i + C_i])``, so the delta of ``W`` splits along the
    input channels: a plain LoRA's ``down`` is sliced the same way (``up`` is shared), anything else becomes a
    dense delta computed on the whole weight (the parts' dequantized weights side by side) and sliced. The
    bias (held by part 0) gets the whole bias delta. Returns the number of parts that carry side paths."""
    from ..kernels import ops

    parts = list(conv.parts)
    if not all(isinstance(p, QuantLayer) for p in parts):
        log.warning("LowBit: the LoRA patch of %s is not applied: a part of this split convolution is not "
                    "quantized (side paths need quantized parts)", key)
        return 0
    offs = [0]
    for c in conv.sizes:
        offs.append(offs[-1] + c)
    per_part = [[] for _ in parts]
    if weight_patches:
        plain = all(_is_plain_lora(e) for e in weight_patches)
        factored = [[] for _ in parts] if plain else None
        if plain:
            for strength, v, *_ in weight_patches:
                up, down, alpha = v.weights[0].float(), v.weights[1].float(), v.weights[2]
                rank = down.shape[0]
                scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
                if down.dim() != 4 or down.shape[1] != conv.in_channels:
                    factored = None
                    break
                for i, p in enumerate(parts):
                    fu = lora_side.check_conv_low_rank(p, down[:, offs[i]:offs[i + 1]].contiguous(), up)
                    if fu is None:
                        factored = None
                        break
                    factored[i].append(lora_side.SidePath(down=fu[0], up=fu[1], scale=scale))
                if factored is None:
                    break
        if factored is not None:
            for i in range(len(parts)):
                per_part[i] += factored[i]
        else:
            w0 = torch.cat([ops.dequantize_weight(p.packed_weight()).float().to(device) for p in parts], dim=1)
            dw = _dense_delta(weight_patches, w0, key + ".weight")
            for i in range(len(parts)):
                per_part[i].append(lora_side.SidePath(delta_w=dw[:, offs[i]:offs[i + 1]].contiguous()))
    if bias_patches and parts[0].bias is not None:
        b0 = parts[0].bias.detach().float().to(device)
        per_part[0].append(lora_side.SidePath(delta_b=_dense_delta(bias_patches, b0, key + ".bias")))
    n = 0
    for p, paths in zip(parts, per_part):
        if paths:
            lora_side.set_side_paths(p, [x.to(device) for x in paths])
            n += 1
    return n


def sync_lora_side_paths(patcher):
    """Make the quantized UNet of ``patcher`` carry exactly the LoRA patches of ``patcher`` as side paths.

    Called before every sampling run and after every load, so switching between a clone with a LoRA and one
    without restores the quantized output exactly. Cheap when nothing changed (keyed by ``patches_uuid``).
    """
    q = patcher.get_model_object("diffusion_model")
    if get_context(q) is None:
        return
    device = patcher.load_device
    layers = quant_layers(q)
    here = next((b.device for b in q.buffers()), None)
    if here is not None and here != torch.device(device):
        # ComfyUI's partial (lowvram) loader skips modules whose parameters live in children (our layers keep
        # their activation tables in a child); the quantized UNet is small, so move it whole.
        q.to(device)
    state = (patcher.patches_uuid, str(device))
    host = get_context(q).host_state
    if host.get("lora") == state:
        return
    lora_side.clear_side_paths(q)
    n = 0
    for name, layer in layers:
        key = f"diffusion_model.{name}"
        wp = patcher.patches.get(key + ".weight")
        # ComfyUI patches the bias itself when it loads the layer as a leaf (no activation quantizer child)
        bp = patcher.patches.get(key + ".bias") if layer.act is not None else None
        if wp or bp:
            lora_side.set_side_paths(layer, side_paths_for(layer, wp, bp, key, device))
            n += 1
    for name, conv in split_convs(q):
        key = f"diffusion_model.{name}"
        wp, bp = patcher.patches.get(key + ".weight"), patcher.patches.get(key + ".bias")
        if wp or bp:
            n += _split_side_paths(conv, wp, bp, key, device)
    host["lora"] = state
    if n:
        log.info("LowBit: %d quantized layers carry LoRA side paths", n)


# ------------------------------------------------------------------------------------------------ sampling
class PTQDView:
    """What a sampler needs to apply PTQD variance-schedule calibration at a given sigma."""

    def __init__(self, model_sampling, stats, corrected: bool, eps_prediction: bool, table_key=float):
        self.model_sampling, self.stats, self.corrected, self.eps_prediction = \
            model_sampling, stats, corrected, eps_prediction
        self.table_key = table_key  # the profile's map from model_sampling.timestep to the tables' key

    def timestep(self, sigma) -> float:
        s = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma))
        return self.table_key(float(self.model_sampling.timestep(s.reshape(1)).float()[0]))

    def residual_var(self, sigma) -> float:
        return self.stats.residual_var_at(self.timestep(sigma), corrected=self.corrected)


_warned = set()


def ptqd_view(model_k) -> Optional[PTQDView]:
    """PTQD statistics of the UNet being sampled, or None.

    The sampler function receives ComfyUI's ``KSamplerX0Inpaint``; its ``.inner_model`` is the guider
    (``CFGGuider``) whose ``.inner_model`` is the ``BaseModel`` with this run's object patches applied, so
    ``.diffusion_model`` is the quantized UNet actually called and ``.model_sampling`` the active sigma
    schedule. We read the statistics from that UNet (they are attached to it by Quantize/Load) rather than
    from ``extra_args["model_options"]``: model options are deep-copied on every clone, the UNet is not.
    """
    from ..quant.ptqd import get_stats

    guider = getattr(model_k, "inner_model", None)
    base = getattr(guider, "inner_model", None)
    unet = getattr(base, "diffusion_model", None)
    ms = getattr(base, "model_sampling", None)
    if unet is None or ms is None:
        return None
    stats = get_stats(unet)
    if stats is None:
        if "nostats" not in _warned:
            log.warning("LowBit PTQD Sampler: the model has no PTQD statistics (quantize with a method "
                        "containing '+ptqd', e.g. 'lp+ptqd'); "
                        "sampling without variance correction")
            _warned.add("nostats")
        return None
    import comfy.model_sampling as cms

    eps = isinstance(ms, cms.EPS) and not isinstance(ms, (cms.V_PREDICTION, cms.X0, cms.CONST))
    flow = isinstance(ms, cms.CONST)  # velocity models: the flow VSC (docs/FLOW_MATCHING.md)
    if not (eps or flow):
        if "noneps" not in _warned:
            log.warning("LowBit PTQD Sampler: variance correction is derived for eps-prediction and "
                        "rectified-flow models; this model is %s, so it is skipped", type(ms).__name__)
            _warned.add("noneps")
        return None
    ctx = get_context(unet)
    from ..quant.profiles import profile_for

    return PTQDView(ms, stats, bool(getattr(ctx, "ptqd_active", False)), eps, profile_for(unet).table_key)


def ksampler(sampler_function, extra_options: dict):
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sampler_function, extra_options=extra_options)


def scheduler_names() -> List[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:  # outside ComfyUI (contract tests)
        return ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]


def sample_with_sampler(model, sampler, seed: int, steps: int, cfg: float, scheduler: str, positive, negative,
                        latent_image: dict, denoise: float):
    """KSampler's behaviour (noise from seed, sigmas from scheduler + denoise, preview callback) with a custom
    SAMPLER object, through comfy.sample.sample_custom."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    batch_inds = latent_image.get("batch_index")
    noise = comfy.sample.prepare_noise(latent, seed, batch_inds)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, total).cpu()
    sigmas = sigmas[-(steps + 1):]
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                         noise_mask=latent_image.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent_image.copy()
    out["samples"] = samples
    return out


# -------------------------------------------------------------------------------------------------- images
def save_preview(images, prefix: str = "lowbit_compare"):
    """Save an IMAGE batch to ComfyUI's temp folder the way PreviewImage does; returns the ui image records."""
    import importlib

    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own top-level nodes.py (not this package)
    return comfy_nodes.PreviewImage().save_images(images, filename_prefix=prefix)["ui"]["images"]


# ------------------------------------------------------------------------------------------------- files
def lowbit_folder() -> str:
    """models/lowbit (registered with folder_paths, .safetensors only); created if missing."""
    import folder_paths

    if LOWBIT_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LOWBIT_FOLDER] = (
            [os.path.join(folder_paths.models_dir, LOWBIT_FOLDER)], {".safetensors"})
    d = folder_paths.get_folder_paths(LOWBIT_FOLDER)[0]
    os.makedirs(d, exist_ok=True)
    return d


def lowbit_files() -> List[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    lowbit_folder()
    return folder_paths.get_filename_list(LOWBIT_FOLDER)


def lowbit_file_path(name: str) -> str:
    import folder_paths

    lowbit_folder()
    path = folder_paths.get_full_path(LOWBIT_FOLDER, name)
    if path is None:
        raise NodeInputError(f"quantized UNet file {name!r} is not in {folder_paths.get_folder_paths(LOWBIT_FOLDER)}; "
                             "save one with Save Quantized UNet (LowBit) or copy it into models/lowbit/, then "
                             "refresh the browser (R)")
    return path


def native_quant_formats() -> Optional[frozenset]:
    """The ``comfy_quant`` formats this ComfyUI's stock loader reads (``comfy.quant_ops.QUANT_ALGOS``), or None when
    it has no such loader (v0.3.64 and older: it would load a native-layout file's integers as float weights)."""
    try:
        import comfy.quant_ops as qo
    except ImportError:
        return None
    algos = getattr(qo, "QUANT_ALGOS", None)
    return frozenset(algos) if algos is not None else None


def comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:
        return "unknown version"


def diffusion_models_folder() -> str:
    """ComfyUI's ``models/diffusion_models`` folder, where the stock Load Diffusion Model node finds
    ComfyUI-native quantized files (the Save node's ``comfyui-native`` layout writes there)."""
    import folder_paths

    return folder_paths.get_folder_paths("diffusion_models")[0]
