"""Stable-Diffusion-WebUI glue: the Forge backend of the LowBit tab, the per-generation UNet patch (Forge and
A1111 >= 1.10), A1111's ``SdUnet`` options. Only ``scripts/lowbit_webui.py`` imports this module, and only inside
the WebUI; every ``modules.*`` (WebUI) and ``backend.*`` (Forge) import is inside a function.

Facts used here (read in Forge's source, checked by tests/webui/test_forge_integration.py on a real Forge):

* ``p.sd_model.forge_objects.unet`` is a ``UnetPatcher``; ``clone()`` shares the torch modules, and
  ``add_object_patch("diffusion_model", q)`` swaps the UNet while that clone is loaded. Forge resets
  ``forge_objects`` from ``forge_objects_after_applying_lora`` before every sampling and then calls
  ``Script.process_before_every_sampling``: that is where the clone is installed, per generation.
* ``KModel.apply_model`` calls ``diffusion_model(x, t, context=..., control=..., transformer_options=...)``
  with ``t = predictor.timestep(sigma)`` (the DDPM timestep): the quantized UNet reads its per-step tables
  (activation scales, PTQD statistics, bitwidth schedule) from that argument. Nothing counts steps.
* The UNet is an ``IntegratedUNet2DConditionModel`` whose Linear layers are ``backend.operations``'
  ``ForgeOperations.Linear`` -- not ``torch.nn.Linear`` subclasses; the core recognises them by interface
  (``quant.layers.qlayer_class_for``), so the Forge UNet itself is quantized. ``check_float_weights`` refuses
  NF4/FP4/GGUF/scaled-fp8 loads ("Diffusion in Low Bits") with the fix in the message.
* Loading a clone unloads the other patchers of the same model (``unload_model_clones``), which removes
  their object patches: after a LowBit generation the float UNet is back in place for the next one.

A1111 (read in its 1.10.1 source, run on it with tests/webui/test_a1111_integration.py):

* ``p.sd_model`` is ldm's ``LatentDiffusion``; the float UNet is ``p.sd_model.model.diffusion_model``, an ldm
  ``UNetModel`` whose class ``forward`` ``modules/sd_hijack.py`` replaced: while ``sd_unet.current_unet`` is set,
  every ``UNetModel`` call goes to ``current_unet.forward(x, timesteps, context, ...)`` instead (the "SD Unet"
  setting's mechanism). The per-generation patch sets ``current_unet`` only while this generation's sampler
  samples (``install_a1111`` wraps that sampler's ``sample``/``sample_img2img``, a new object per generation), so
  nothing is left behind by an error or an interruption; it takes precedence over an SD Unet option. Calibration
  runs with ``current_unet`` cleared: the checkpoint's own float UNet, whatever SD Unet is selected.
* ``Script.process_before_every_sampling(p, x, noise, c, uc)`` exists since A1111 1.10 (commit 17e8461) with
  Forge's arguments; older A1111 never calls it, so the section says it was not applied (``process``).
* The quantized copies of ``UNetModel`` keep its class, so calling one re-enters the patched ``forward``:
  ``_call_own`` clears ``current_unet`` around it.
* LoRAs (``extensions-builtin/Lora``) are merged into the float Linear/Conv weights at their first forward after
  activation, i.e. during the calibration runs, so the quantized UNet is built with them; the cache key names
  them (``p.extra_network_data``). Not run with a LoRA here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from typing import Optional

import torch
import torch.nn as nn

from ..quant.calib import CallRecorder, sanitize_calls
from ..quant.context import get_context
from ..quant.errors import ConfigError, Interrupted
from .backend import BITS_CHOICES, Backend, SettingError, pil_to_image

log = logging.getLogger("lowbit.webui")

FROM_TAB = "from LowBit tab"  # script choice: use the UNet quantized in the LowBit tab
SCRIPT_BITS = tuple(BITS_CHOICES) + (FROM_TAB,)
DEFAULT_METHOD = "naive+ptqd"  # min/max PTQ + PTQD correction: affordable for a full SD UNet on a CPU
CALIB_PROMPTS = ("a photo of a cat", "a landscape with mountains and a lake, golden hour",
                 "portrait of an old man, detailed, studio lighting", "a red sports car on a city street",
                 "a bowl of fruit on a wooden table, still life", "an astronaut riding a horse, digital art",
                 "a cozy living room interior, warm light", "a watercolor painting of a lighthouse")


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def has_sampling_hook() -> bool:
    """Whether this WebUI calls ``Script.process_before_every_sampling`` (Forge; A1111 since 1.10)."""
    from modules import scripts

    return hasattr(getattr(scripts, "ScriptRunner", None), "process_before_every_sampling")


def opt(name: str, default):
    from modules import shared

    return getattr(shared.opts, name, default)


# ------------------------------------------------------------------------------------------ the float UNet
def check_float_weights(unet: nn.Module) -> nn.Module:
    """``unet`` if every Linear/Conv weight is a plain float tensor; a ConfigError naming the layer otherwise."""
    for name, m in unet.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() not in (2, 4):
            continue
        if type(w) not in (nn.Parameter, torch.Tensor) or not w.is_floating_point():  # NF4/FP4/GGUF tensors
            raise ConfigError(f"layer {name} holds a {type(w).__name__} weight ({getattr(w, 'dtype', '?')}): "
                              "LowBit quantizes fp16/bf16/fp32 checkpoints. Set 'Diffusion in Low Bits' to "
                              "Automatic (not NF4/FP4/GGUF) and reload the model")
        if w.dtype not in FLOAT_WEIGHT_DTYPES:  # A1111's "FP8 weight" stores Linear weights as float8
            raise ConfigError(f"layer {name} holds a {w.dtype} weight: LowBit quantizes fp16/bf16/fp32 checkpoints. "
                              "Turn off Settings -> Optimizations -> FP8 weight (A1111) and reload the model")
        if getattr(m, "scale_weight", None) is not None:
            raise ConfigError(f"layer {name} is a scaled-fp8 weight; LowBit needs an fp16/bf16/fp32 checkpoint")
    return unet


FLOAT_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_lowbit(unet) -> bool:
    return get_context(unet) is not None


def fp_unet_of(patcher) -> nn.Module:
    """The float UNet of a Forge UnetPatcher, even right after a LowBit clone of it was used."""
    unet = patcher.model.diffusion_model
    if is_lowbit(unet):
        from backend import memory_management

        memory_management.unload_model_clones(patcher)  # removes the clone's object patch
        unet = patcher.model.diffusion_model
    if is_lowbit(unet):
        raise ConfigError("the loaded UNet is still LowBit's quantized one after unloading its clones; "
                          "reload the checkpoint (Settings -> Stable Diffusion -> reload) and try again")
    return unet


def alphas_cumprod_of(patcher) -> torch.Tensor:
    pred = patcher.model.predictor
    ac = getattr(pred, "alphas_cumprod", None)
    if ac is None:
        ac = 1.0 / (1.0 + pred.sigmas.float() ** 2)
    return ac.detach().float().cpu()


def install(p, qunet, label: str):
    """Make this generation's sampling run ``qunet`` (a clone of the UnetPatcher; the original is untouched)."""
    unet = p.sd_model.forge_objects.unet.clone()
    unet.add_object_patch("diffusion_model", qunet)
    p.sd_model.forge_objects.unet = unet
    p.extra_generation_params["LowBit"] = label


# ----------------------------------------------------------------------------------------------- A1111 side
def _call_own(unet, *args, **kwargs):
    """Call one of LowBit's copies of A1111's ``UNetModel``: its class ``forward`` is A1111's patched one, which
    would hand the call to ``sd_unet.current_unet`` (i.e. back to us) while that is set: clear it around the call."""
    from modules import sd_unet

    saved = sd_unet.current_unet
    sd_unet.current_unet = None
    try:
        return unet(*args, **kwargs)
    finally:
        sd_unet.current_unet = saved


class _A1111Step:
    """What ``sd_unet.current_unet`` dispatches to while LowBit's per-generation UNet samples."""

    def __init__(self, unet):
        self.unet = unet

    def forward(self, x, timesteps, context, *args, **kwargs):
        return _call_own(self.unet, x, timesteps, context, *args, **kwargs)


@contextlib.contextmanager
def a1111_unet(unet: Optional[nn.Module]):
    """While inside, A1111 samples with ``unet`` (None: the checkpoint's own float UNet, even when an SD Unet
    option is selected); the previous ``sd_unet.current_unet`` is put back on the way out, error or not."""
    from modules import sd_unet

    saved = sd_unet.current_unet
    sd_unet.current_unet = None if unet is None else _A1111Step(unet)
    try:
        yield
    finally:
        sd_unet.current_unet = saved


def install_a1111(p, qunet, label: str):
    """A1111: make this generation's sampler (a new object per generation and per hires pass) sample with ``qunet``.
    Each sampling entry point is wrapped on the instance, from the class's own method, so installing twice on one
    sampler wraps once."""
    sampler = p.sampler
    for name in ("sample", "sample_img2img"):
        own = getattr(type(sampler), name, None)
        if own is None:
            continue

        def wrapped(*args, _own=own.__get__(sampler), **kwargs):
            with a1111_unet(qunet):
                return _own(*args, **kwargs)

        setattr(sampler, name, wrapped)
    p.extra_generation_params["LowBit"] = label


def generation_unet(p) -> nn.Module:
    """The float UNet this generation samples with (Forge: of its UnetPatcher; A1111: the checkpoint's)."""
    if is_forge():
        return fp_unet_of(p.sd_model.forge_objects.unet)
    unet = p.sd_model.model.diffusion_model
    if is_lowbit(unet):
        raise ConfigError("the loaded model's UNet is a LowBit quantized one; reload the checkpoint")
    return unet


def generation_alphas(p) -> torch.Tensor:
    if is_forge():
        return alphas_cumprod_of(p.sd_model.forge_objects.unet)
    return p.sd_model.alphas_cumprod.detach().float().cpu()


def generation_loras(p) -> tuple:
    """What LoRAs act on this generation's float UNet (part of the cache key)."""
    if is_forge():
        return lora_key(p.sd_model.forge_objects.unet)
    data = getattr(p, "extra_network_data", None) or {}
    return tuple(sorted(f"{kind}:{':'.join(map(str, getattr(x, 'items', x)))}"
                        for kind, params in data.items() for x in (params or ())))


def checkpoint_key(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "filename", None) or getattr(info, "title", None) or id(sd_model))


def lora_key(patcher) -> tuple:
    return tuple(sorted(map(str, getattr(patcher, "lora_patches", {}) or {})))


# --------------------------------------------------------------------------------- state shared by tab + script
class _Shared:
    def __init__(self):
        self.lock = threading.RLock()
        self.key = None  # (checkpoint, lora, bits, method, samples, steps) of `qmodel`
        self.qmodel = None
        self.tab_backend: Optional["ForgeBackend"] = None

    def clear(self, *_):
        with self.lock:
            self.key, self.qmodel = None, None
            if self.tab_backend is not None:
                self.tab_backend.qmodel, self.tab_backend.calls, self.tab_backend.info = None, None, {}


SHARED = _Shared()


def on_model_loaded(sd_model):
    """A new checkpoint: every cached quantized UNet belongs to the old one."""
    SHARED.clear()


# --------------------------------------------------------------------------------------------- the script
def _rng_state(p):
    rng = getattr(p, "rng", None)
    gens = getattr(rng, "generators", None)
    if rng is None or gens is None:
        return None
    return [g.get_state() for g in gens], getattr(rng, "is_first", None)


def _rng_restore(p, state):
    if state is None:
        return
    states, is_first = state
    for g, s in zip(p.rng.generators, states):
        g.set_state(s)
    if is_first is not None:
        p.rng.is_first = is_first


def check_calibratable(p, kwargs):
    """The built-in calibration records txt2img generations only."""
    # (img2img's processing object holds init_images; txt2img_image_conditioning is defined for both)
    if getattr(p, "init_images", None) is not None or "x" not in kwargs or "c" not in kwargs:
        first = ("quantize in the LowBit tab (or run one txt2img with LowBit enabled)" if is_forge() else
                 "run one txt2img with LowBit enabled and these same settings")
        raise SettingError(f"LowBit calibrates during txt2img only; {first} before using it in img2img")


def calibrate_in_generation(p, samples: int, steps: int, kwargs):
    """Built-in calibration: ``samples`` full-precision runs of this txt2img generation's own prompt and size
    with ``steps`` steps (Forge's sampler), recording every UNet call. The generation's RNG is restored, so the
    image itself is the one a full-precision run would start from."""
    check_calibratable(p, kwargs)
    fp = generation_unet(p)
    x = kwargs["x"]
    state = _rng_state(p)
    rec = CallRecorder(fp)
    try:
        with rec, (contextlib.nullcontext() if is_forge() else a1111_unet(None)):
            for i in range(samples):
                rec.new_trajectory()
                g = torch.Generator().manual_seed(int(p.seeds[0] if getattr(p, "seeds", None) else 0) + 7919 * (i + 1))
                noise = torch.randn(tuple(x.shape), generator=g).to(device=x.device, dtype=x.dtype)
                p.sampler.sample(p, noise, kwargs["c"], kwargs.get("uc"), steps=steps,
                                 image_conditioning=p.txt2img_image_conditioning(noise))
    finally:
        _rng_restore(p, state)
    if not rec.calls:
        raise SettingError("the LowBit calibration run recorded no UNet calls; is this a UNet model (SD1.x/SDXL)?")
    return sanitize_calls(rec.calls)


def build_for(p, calls, bits: str, method: str):
    from ..recipes import Setup, build

    # (Forge loads and samples under inference mode: the pipeline gives training methods plain copies)
    setup = Setup(check_float_weights(generation_unet(p)), generation_alphas(p), None, None)
    return build(setup, method, bits, calls).model


def process_before_every_sampling(p, enabled, bits, method, calib_samples, calib_steps, **kwargs):
    """The AlwaysVisible script's hook (Forge, A1111 >= 1.10): install the quantized UNet for this sampling pass."""
    if not enabled:
        return
    from ..quant.config import METHODS
    from .backend import check_int, check_plan

    if bits == FROM_TAB and not is_forge():
        raise SettingError("LowBit: 'from LowBit tab' needs Forge (A1111 has no LowBit tab); pick bits here, or a "
                           "LowBit entry in Settings -> Stable Diffusion -> SD Unet")
    if bits == FROM_TAB:
        tab = SHARED.tab_backend
        if tab is None or tab.qmodel is None:
            raise SettingError("LowBit: 'from LowBit tab' needs a UNet quantized (or loaded) in the LowBit tab first")
        loras = lora_key(p.sd_model.forge_objects.unet)
        if loras:  # (Forge applies them to the float weights; the tab's quantized UNet has neither: they were lost)
            raise SettingError(f"LowBit: the prompt's LoRAs ({', '.join(loras)[:200]}) cannot act on the LowBit tab's "
                               "quantized UNet; remove them, or pick bits here so that LowBit quantizes this "
                               "generation's model")
        install(p, tab.qmodel, f"{tab.info.get('bits', '?')} {tab.info.get('method', '')} (LowBit tab)".strip())
        return
    if bits not in BITS_CHOICES:
        raise SettingError(f"LowBit bits {bits!r} is not available; choose one of {', '.join(SCRIPT_BITS)}")
    if method not in METHODS:
        raise SettingError(f"LowBit method {method!r} is not available; choose one of {', '.join(METHODS)}")
    # the one set of limits (quant/config.py), the same in every host, checked once: an empty field, text or a
    # fraction is refused naming the setting (int() said "invalid literal for int()" or truncated 2.7 to 2)
    try:
        samples, steps = check_int("calib_samples", calib_samples), check_int("calib_steps", calib_steps)
        check_plan(bits, method)  # (before the calibration runs, not after them)
    except SettingError as exc:
        raise SettingError(f"LowBit {exc}") from None
    key = (checkpoint_key(p.sd_model), generation_loras(p), bits, method, samples, steps)
    with SHARED.lock:
        if SHARED.key != key:
            check_calibratable(p, kwargs)  # (before the cached UNet is dropped: an img2img request keeps it)
            SHARED.key, SHARED.qmodel = None, None  # free the old one before building the next
            calls = calibrate_in_generation(p, samples, steps, kwargs)
            SHARED.qmodel, SHARED.key = build_for(p, calls, bits, method), key
        q = SHARED.qmodel
    (install if is_forge() else install_a1111)(p, q, f"{bits} {method}")


def sd_unet_label() -> Optional[str]:
    """A1111: the label of the LowBit SD Unet option sampling now, else None (A1111's infotext does not name it)."""
    from modules import sd_unet

    unet = getattr(sd_unet, "current_unet", None)
    option = getattr(unet, "option", None)
    return option.label if isinstance(unet, LowBitSdUnetBase) and option is not None else None


# ------------------------------------------------------------------------------------------ the tab backend
class _PatchRunner:
    """Stands in for ``p.scripts`` in the tab's own generations: no other extension runs, and the only hook
    (``process_before_every_sampling``) installs the model under test. Built lazily on the WebUI's
    ``ScriptRunner`` so every other callback is its no-op loop over zero scripts."""

    def __new__(cls, qunet, label):
        from modules import scripts

        class Runner(scripts.ScriptRunner):
            def process_before_every_sampling(self, p, **kwargs):
                install(p, qunet, label)

        return Runner()


class ForgeBackend(Backend):
    """The LowBit tab on Forge: quantizes the loaded checkpoint's UNet; generations go through Forge's txt2img."""

    title = "LowBit: the loaded checkpoint's UNet (Forge)"
    subject_label = "Prompt"
    subject_default = "a photo of a cat"
    show_size = True
    default_method = DEFAULT_METHOD
    default_compare_steps = 20

    def __init__(self, models_dir: Optional[str] = None):
        if models_dir is None:
            from modules import paths

            models_dir = os.path.join(paths.models_path, "lowbit")
        super().__init__(models_dir)
        self.info = {}

    def default_calib(self):
        return int(opt("lowbit_calib_samples", 2)), int(opt("lowbit_calib_steps", 8))

    def patcher(self):
        from modules import sd_models, shared

        if getattr(shared.sd_model, "forge_objects", None) is None:
            sd_models.forge_model_reload()  # Forge loads the selected checkpoint lazily (first generation)
        sd_model = shared.sd_model
        objs = getattr(sd_model, "forge_objects_original", None) or getattr(sd_model, "forge_objects", None)
        if objs is None or getattr(objs, "unet", None) is None:
            raise SettingError("no Forge model is loaded: choose a checkpoint at the top of the page first")
        return objs.unet

    def fp_unet(self):
        return fp_unet_of(self.patcher())

    def make_setup(self):
        from ..recipes import Setup

        patcher = self.patcher()
        return Setup(check_float_weights(fp_unet_of(patcher)), alphas_cumprod_of(patcher), None, None)

    def _job(self):
        base = super()._job()

        @contextlib.contextmanager
        def job():
            from modules.call_queue import queue_lock

            with base, queue_lock, SHARED.lock:
                yield

        return job()

    def progress_fn(self, report, what):
        inner = super().progress_fn(report, what)

        def cb(done, total, info=None):
            from modules import shared

            if getattr(shared.state, "interrupted", False):
                raise Interrupted(f"{what} interrupted from the WebUI; the previous model is unchanged")
            inner(done, total, info)

        return cb

    def _txt2img(self, prompt, seed, steps, size, batch, scripts_runner=None):
        from modules import processing, shared

        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, negative_prompt="", seed=int(seed), steps=int(steps),
            width=int(size), height=int(size), batch_size=int(batch), n_iter=1, cfg_scale=7.0,
            sampler_name="Euler", scheduler="Automatic", do_not_save_samples=True, do_not_save_grid=True)
        p.scripts, p.script_args = scripts_runner, ()
        try:
            shared.state.begin(job="lowbit")
            return processing.process_images(p)
        finally:
            shared.state.end()
            p.close()

    def record_calls(self, samples, steps, progress=None):
        size = int(opt("lowbit_calib_size", 512))
        rec = CallRecorder(self.fp_unet())
        with rec:
            for i in range(samples):
                rec.new_trajectory()
                self._txt2img(CALIB_PROMPTS[i % len(CALIB_PROMPTS)], 1234 + i, steps, size, 1)
                if progress is not None:
                    progress(i + 1, samples, {"stage": "calibration txt2img"})
        if not rec.calls:
            raise SettingError("the calibration txt2img recorded no UNet calls; is the loaded model a UNet "
                               "(SD1.x/SD2.x/SDXL)?")
        return sanitize_calls(rec.calls)

    def render(self, model, subject, seed, steps, count, size, progress=None):
        runner = None if model is None else _PatchRunner(model, f"{self.info.get('bits', '?')} (LowBit tab)")
        if progress is not None:
            progress(0, 1, {"stage": "txt2img"})
        processed = self._txt2img(subject, seed, steps, size or 512, count, runner)
        if progress is not None:
            progress(1, 1, {"stage": "txt2img"})
        images = [im for im in processed.images if im.size == (int(size or 512), int(size or 512))][:count]
        if not images:
            raise SettingError("txt2img returned no image (interrupted?)")
        return pil_to_image(images)


def tab_backend() -> ForgeBackend:
    if SHARED.tab_backend is None:
        SHARED.tab_backend = ForgeBackend()
    return SHARED.tab_backend


# ------------------------------------------------------------------------------------- A1111: SD Unet option
class LowBitSdUnetBase:
    """Marks LowBit's ``sd_unet.SdUnet`` (that class only exists inside A1111)."""


def a1111_unet_options():
    """``sd_unet.SdUnetOption``s for A1111's "SD Unet" setting: calibration-free W8A8 (dynamic activations),
    weight-only W4A16, and every saved file in models/lowbit. Written against A1111's ``modules/sd_unet.py``
    API; run on A1111 1.10.1 by tests/webui/test_a1111_integration.py. Each activation quantizes anew (W8A8 about
    a minute for SD1.5 on 2 CPU cores); a new file in models/lowbit is listed after the setting's refresh button
    or a restart."""
    from modules import paths, sd_unet

    class LowBitSdUnet(sd_unet.SdUnet, LowBitSdUnetBase):
        def __init__(self, option):
            super().__init__()
            self.option, self.q = option, None

        def activate(self):
            from modules import shared

            from ..quant import QuantConfig, deploy_, load, quantize

            fp = shared.sd_model.model.diffusion_model
            if self.option.path:
                self.q = load(fp, self.option.path)
            else:
                cfg = QuantConfig.preset(self.option.bits, w_init="minmax",
                                         **({"a_dynamic": True} if self.option.bits == "W8A8" else {}))
                self.q = deploy_(quantize(fp, cfg))

        def forward(self, x, timesteps, context, *args, **kwargs):
            # A1111 routes every UNetModel.forward to the current SdUnet -- including our copy's: step aside.
            return _call_own(self.q, x, timesteps, context, *args, **kwargs)

        def deactivate(self):
            self.q = None

    class LowBitUnetOption(sd_unet.SdUnetOption):
        def __init__(self, label, bits=None, path=None):
            self.label, self.model_name, self.bits, self.path = label, None, bits, path

        def create_unet(self):
            return LowBitSdUnet(self)

    opts = [LowBitUnetOption("LowBit W8A8 (dynamic activations)", bits="W8A8"),
            LowBitUnetOption("LowBit W4A16 (weights only)", bits="W4A16")]
    d = os.path.join(paths.models_path, "lowbit")
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                opts.append(LowBitUnetOption(f"LowBit file {f}", path=os.path.join(d, f)))
    return opts
