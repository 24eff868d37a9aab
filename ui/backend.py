"""What the gradio app asks of a host: the ``Backend`` adapter, its setting checks, and the default-model one.

The app (``app.build_blocks``) only talks to a ``Backend``; a backend only calls the host-agnostic core
(``lowbit.quant``, ``lowbit.recipes``) plus, for the WebUI, a few host functions (``ui/webui.py``). Every
public method validates its settings first (``SettingError`` names the setting and the allowed range),
returns a status line, and runs under one lock so two jobs never mutate the same model at once.

Images travel as ComfyUI-style IMAGE tensors: float [B, H, W, 3] in [0, 1].

Subclasses implement five hooks:
  fp_unet()                                    the full-precision UNet to quantize (never modified)
  make_setup()                                 recipes.Setup for recipes.build (UNet, alphas_cumprod, ...)
  record_calls(samples, steps, progress)       UNet calls recorded along full-precision sampling runs
  render(model, subject, seed, steps, count, size, progress)   images from model (None = full precision)
  default_calib()                              (samples, steps) used when calls are needed but missing
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..quant.errors import ConfigError, Interrupted, LowBitError

log = logging.getLogger("lowbit.ui")

BITS_CHOICES = ("W8A8", "W4A8", "W4A4", "W4A16")
SAVE_SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

def _limits():
    """setting -> (label shown in messages, lowest, highest): the core's one set of limits (quant/config.py),
    plus the two settings only the app has (how many images, their size)."""
    from ..quant.config import FinetuneConfig, arg_spec, field_spec

    specs = {"calib_samples": arg_spec("calib_samples"), "calib_steps": arg_spec("calib_steps"),
             "seed": arg_spec("seed"), "steps": arg_spec("steps"),
             "ft_steps": field_spec(FinetuneConfig, "steps"), "ft_rank": field_spec(FinetuneConfig, "rank"),
             "ft_batch": field_spec(FinetuneConfig, "batch_size")}
    out = {k: (sp.label or sp.name, sp.lo, sp.hi) for k, sp in specs.items()}
    out.update(count=("images", 1, 16), size=("image size", 64, 2048))
    return out


LIMITS = _limits()


class SettingError(ConfigError):
    """A setting in the UI is out of range; raised before any work starts."""


def check_int(key: str, value) -> int:
    label, lo, hi = LIMITS[key]
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{label} must be a whole number in {lo}..{hi}, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):  # (int(inf) would raise OverflowError)
        raise SettingError(f"{label} must be a whole number in {lo}..{hi}, got {value!r}")
    v = int(f)
    if not lo <= v <= hi:
        raise SettingError(f"{label} = {v} is out of range: allowed {lo}..{hi}")
    return v


def check_plan(bits: str, method: str) -> None:
    """``bits`` with ``method`` builds a pipeline (the core's own checks: ``PipelineConfig.for_method``), said
    before any calibration run: W4A16 with a ``+mixed`` method failed only after recording the calls."""
    from ..quant import PipelineConfig

    try:
        PipelineConfig.for_method(method, bits)
    except ConfigError as exc:
        raise SettingError(f"bits {bits} with method {method}: {exc}") from None


def check_choice(label: str, value, choices) -> str:
    if value not in choices:
        raise SettingError(f"{label} {value!r} is not available; choose one of {', '.join(map(str, choices))}")
    return value


def check_name(name) -> str:
    """A file name for the models folder: letters, digits, '.', '_', '-' (no folders), '.safetensors' added."""
    name = (name or "").strip()
    if name.endswith(SAVE_SUFFIX):
        name = name[: -len(SAVE_SUFFIX)]
    if not _NAME_RE.match(name):
        raise SettingError(f"file name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit (no folders)")
    return name + SAVE_SUFFIX


@dataclass
class Comparison:
    fp: torch.Tensor  # IMAGE [B, H, W, 3] in [0, 1]
    q: torch.Tensor
    diff: torch.Tensor  # heat map IMAGE
    psnr: List[float]
    ssim: List[float]
    text: str


def compare_images(fp: torch.Tensor, q: torch.Tensor, title: str = "") -> Comparison:
    # The metric code is the core's (quant/compare.py), shared with the Compare node.
    from ..quant.compare import compare

    p, s, heat, text = compare(fp, q)
    return Comparison(fp, q, heat, p, s, f"{title}\n{text}" if title else text)


def to_pil_row(images: torch.Tensor, min_height: int = 256):
    """IMAGE [B, H, W, 3] -> one PIL image (a row), enlarged by an integer factor (nearest) to >= min_height."""
    from PIL import Image

    import numpy as np

    row = torch.cat(list(images.detach().float().clamp(0, 1)), dim=1)  # [H, B*W, 3]
    arr = (row.cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    f = max(1, -(-min_height // img.height))
    return img.resize((img.width * f, img.height * f), Image.NEAREST) if f > 1 else img


def pil_to_image(pils) -> torch.Tensor:
    """PIL images (same size) -> IMAGE [B, H, W, 3] in [0, 1]."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0) for p in pils])


class Backend:
    """Base adapter: settings checks, the current quantized model, save/load, stop, progress plumbing."""

    title = "LowBit"
    subject_label = "Prompt"
    subject_default = ""
    show_size = False  # the app shows width/height only when the host renders at a chosen size
    default_bits = "W8A8"
    default_method = "naive"
    default_compare_steps = 25

    def __init__(self, models_dir: str):
        self.models_dir = os.path.abspath(models_dir)
        self.qmodel = None
        self.calls = None
        self.calls_settings = None  # (samples, steps) the recorded calls were made with
        self.info = {}  # bits, method, source of the current quantized model
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- hooks -------------------------------------------------------------------------------------------
    def fp_unet(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_setup(self):
        raise NotImplementedError

    def record_calls(self, samples: int, steps: int, progress=None):
        raise NotImplementedError

    def render(self, model, subject: str, seed: int, steps: int, count: int, size: int, progress=None) -> torch.Tensor:
        raise NotImplementedError

    def default_calib(self) -> Tuple[int, int]:
        return 8, 10

    def methods(self) -> List[str]:
        from ..quant.config import METHODS

        return list(METHODS)

    def check_subject(self, subject) -> str:
        return "" if subject is None else str(subject)

    def var_fn(self, model) -> Optional[Callable]:
        """PTQD variance calibration for samplers that support it (the default model's); None elsewhere."""
        return None

    # ---- plumbing ----------------------------------------------------------------------------------------
    def stop(self) -> str:
        self._stop.set()
        return "stop requested: the running job stops at its next step"

    def _job(self):
        backend = self

        class _Guard:
            def __enter__(self):
                if not backend._lock.acquire(blocking=False):
                    raise SettingError("another LowBit job is running; wait for it to finish or press Stop")
                backend._stop.clear()

            def __exit__(self, *exc):
                backend._lock.release()
                return False

        return _Guard()

    def progress_fn(self, report: Optional[Callable], what: str):
        """Core progress ``(done, total, info)`` -> ``report(fraction, text)``; raises Interrupted on Stop."""

        def cb(done, total, info=None):
            if self._stop.is_set():
                raise Interrupted(f"{what} stopped by the user; the previous model is unchanged")
            if report is not None:
                info = info or {}
                extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in info.items() if k in ("loss", "stage"))
                report(min(float(done) / max(float(total), 1.0), 1.0),
                       f"{what}: {int(done)}/{int(total)}" + (f" ({extra})" if extra else ""))

        return cb

    def _require_q(self):
        if self.qmodel is None:
            raise SettingError("no quantized UNet yet: press Quantize (or load a saved one) first")
        return self.qmodel

    def _calib_settings(self, samples, steps):
        """(samples, steps) for a job's calibration (each checked; None: left empty in the UI), or None to use the
        calls already recorded. An empty one takes the default (``default_calib``); values that differ from the
        recorded calls' settings record again (they were silently ignored once calls were cached)."""
        samples = None if samples is None else check_int("calib_samples", samples)
        steps = None if steps is None else check_int("calib_steps", steps)
        if samples is None and steps is None and self.calls is not None:
            return None
        ds, dt = self.default_calib()
        want = (ds if samples is None else samples, dt if steps is None else steps)
        return None if (self.calls is not None and want == self.calls_settings) else want

    def _calls(self, settings, progress):
        """The calibration calls for ``settings`` (from :meth:`_calib_settings`; None: the recorded ones)."""
        if settings is not None:
            self.calls = self.record_calls(*settings, progress=self.progress_fn(progress, "calibration run"))
            self.calls_settings = settings
        return self.calls

    def status(self) -> str:
        if self.qmodel is None:
            return "no quantized UNet yet"
        from ..quant import get_stats, kernel_copy_bytes, weight_bytes

        stats = get_stats(self.qmodel)
        copies = kernel_copy_bytes(self.qmodel)
        parts = [f"quantized UNet: {self.info.get('bits', '?')} ({self.info.get('method', '?')})",
                 f"weights {weight_bytes(self.qmodel) / 2 ** 20:.2f} MiB"
                 + (f" (+ {copies / 2 ** 20:.2f} MiB kept by the kernels so far)" if copies else ""),
                 "PTQD correction on" if stats is not None else "no PTQD statistics"]
        if self.info.get("finetuned"):
            parts.append(f"EfficientDM fine-tuned ({self.info['finetuned']} steps)")
        if self.info.get("file"):
            parts.append(f"file {self.info['file']}")
        return "; ".join(parts)

    # ---- the jobs ------------------------------------------------------------------------------------------
    def quantize(self, bits, method, calib_samples, calib_steps, progress=None) -> str:
        bits = check_choice("bits", bits, BITS_CHOICES)
        method = check_choice("method", method, self.methods())
        samples, steps = check_int("calib_samples", calib_samples), check_int("calib_steps", calib_steps)
        check_plan(bits, method)
        from ..recipes import build

        with self._job():
            fp = self.fp_unet()  # noqa: F841  (fails early with the host's message if there is no model)
            calls = self.record_calls(samples, steps, progress=self.progress_fn(progress, "calibration run"))
            if progress is not None:
                progress(0.0, f"quantizing to {bits} ({method})")
            self._stop_check("quantization")
            # (the pipeline's stages reach the bar, and Stop is honoured at each of their steps)
            built = build(self.make_setup(), method, bits, calls,
                          progress=self.progress_fn(progress, f"quantizing to {bits} ({method})"))
            self.qmodel, self.calls, self.calls_settings = built.model, calls, (samples, steps)
            self.info = {"bits": bits, "method": method}
            return f"quantized in {built.seconds:.1f} s from {len(calls)} recorded UNet calls. {self.status()}"

    def ptqd(self, bias_correction=True, correlation_correction=True, variance_calibration=True,
             calib_samples=None, calib_steps=None, progress=None) -> str:
        if not (bias_correction or correlation_correction or variance_calibration):
            raise SettingError("PTQD: all three corrections (bias, correlation, variance) are off, so it would change "
                               "nothing; tick at least one")
        settings = self._calib_settings(calib_samples, calib_steps)
        from ..quant import PipelineConfig, PTQDConfig, get_stats, pipeline

        with self._job():
            q = self._require_q()
            cfg = PTQDConfig(bias_correction=bool(bias_correction), correlation_correction=bool(correlation_correction),
                             variance_calibration=bool(variance_calibration))
            calls = self._calls(settings, progress)
            res = pipeline.run(self.fp_unet(), calls,
                               PipelineConfig(method="lp+ptqd+vsc" if cfg.variance_calibration else "lp+ptqd",
                                              ptqd=cfg),
                               start=q, progress=self.progress_fn(progress, "PTQD statistics"))
            self.qmodel = res.model
            stats = get_stats(res.model)
            k = ", ".join(f"t={t:.0f}: k={kk:+.4f}" for t, kk in list(zip(stats.t.tolist(), stats.k.tolist()))[:4])
            return (f"PTQD statistics from {len(calls)} calls ({k}{', ...' if len(stats.t) > 4 else ''}). "
                    f"{self.status()}")

    def fine_tune(self, ft_steps, ft_rank, ft_batch, calib_samples=None, calib_steps=None, progress=None) -> str:
        steps, rank, batch = (check_int("ft_steps", ft_steps), check_int("ft_rank", ft_rank),
                              check_int("ft_batch", ft_batch))
        settings = self._calib_settings(calib_samples, calib_steps)
        from ..quant import FinetuneConfig, PipelineConfig, get_stats, pipeline

        with self._job():
            q = self._require_q()
            old = get_stats(q)
            # the statistics describe the old model's error: measured again (with its settings) after fine-tuning
            cfg = PipelineConfig(method="efficientdm+ptqd" if old is not None else "efficientdm",
                                 finetune=FinetuneConfig(steps=steps, rank=rank, batch_size=batch),
                                 ptqd=old.config if old is not None else PipelineConfig().ptqd)
            calls = self._calls(settings, progress)
            res = pipeline.run(self.fp_unet(), calls, cfg, start=q,
                               progress=self.progress_fn(progress, "EfficientDM fine-tune"))
            last = res.info.get("finetune", {})
            self.qmodel = res.model
            self.info = dict(self.info, finetuned=steps, file=None)
            msg = " PTQD statistics re-collected." if old is not None else ""
            return (f"fine-tuned {last.get('layers', '?')} layers for {steps} steps: distillation loss "
                    f"{last.get('first_loss', float('nan')):.4g} -> {last.get('last_loss', float('nan')):.4g}.{msg} "
                    f"{self.status()}")

    def compare(self, subject, seed, steps, count=1, size=None, progress=None) -> Comparison:
        subject = self.check_subject(subject)
        seed, steps, count = check_int("seed", seed), check_int("steps", steps), check_int("count", count)
        size = check_int("size", size) if (self.show_size and size is not None) else None
        if size is not None and size % 8:  # (latents are 1/8 of the image: the host renders the nearest multiple)
            raise SettingError(f"image size = {size} must be a multiple of 8, e.g. {size - size % 8} or "
                               f"{size - size % 8 + 8}")
        with self._job():
            q = self._require_q()
            fp_img = self.render(None, subject, seed, steps, count, size,
                                 progress=self.progress_fn(progress, "full precision"))
            q_img = self.render(q, subject, seed, steps, count, size,
                                progress=self.progress_fn(progress, f"quantized {self.info.get('bits', '')}"))
            return compare_images(fp_img, q_img, f"full precision vs {self.info.get('bits', '?')} "
                                                 f"({self.info.get('method', '?')}), seed {seed}, {steps} steps")

    def _stop_check(self, what):
        if self._stop.is_set():
            raise Interrupted(f"{what} stopped by the user; the previous model is unchanged")

    # ---- files ---------------------------------------------------------------------------------------------
    def list_saved(self) -> List[str]:
        if not os.path.isdir(self.models_dir):
            return []
        return sorted(f for f in os.listdir(self.models_dir)  # (only names Load accepts: check_name's)
                      if f.endswith(SAVE_SUFFIX) and _NAME_RE.match(f[: -len(SAVE_SUFFIX)]))

    def save(self, name) -> str:
        fname = check_name(name)
        from ..quant import save

        with self._job():
            q = self._require_q()
            path = os.path.join(self.models_dir, fname)
            if os.path.exists(path):
                raise SettingError(f"{path} already exists; LowBit never overwrites a file: choose another name")
            os.makedirs(self.models_dir, exist_ok=True)
            save(q, path)
            self.info = dict(self.info, file=fname)
            return f"saved {path} ({os.path.getsize(path) / 2 ** 20:.2f} MiB)"

    def load(self, name) -> str:
        if not name:
            raise SettingError(f"choose a saved file from {self.models_dir} (press Refresh to list them)")
        fname = check_name(name)
        from ..quant import load, read_header

        with self._job():
            path = os.path.join(self.models_dir, fname)
            if not os.path.isfile(path):
                raise SettingError(f"{path} does not exist; press Refresh and choose one of "
                                   f"{self.list_saved() or 'none'}")
            header, _ = read_header(path)
            q = load(self.fp_unet(), path)
            cfg = header.get("config") or {}
            data = cfg.get("_data", {}) if isinstance(cfg, dict) else {}
            bits = f"W{data.get('w_bits', '?')}A{data.get('a_bits', '?')}" if data else "?"
            self.qmodel = q
            self.info = {"bits": bits, "method": "loaded", "file": fname}
            return f"loaded {path}. {self.status()}"


# ------------------------------------------------------------------------------------------ default model
class DefaultModelBackend(Backend):
    """The embedded default model (class-conditional DDPM on 16x16 digits) through ``lowbit.recipes``."""

    title = "LowBit: embedded default model (16x16 digits)"
    subject_label = "Digit (class label 0-9)"
    subject_default = "3"
    default_compare_steps = 25

    def __init__(self, models_dir: Optional[str] = None, setup=None):
        super().__init__(models_dir or os.environ.get("LOWBIT_MODELS_DIR")
                         or os.path.join(os.getcwd(), "models", "lowbit"))
        self._setup = setup

    def setup(self):
        if self._setup is None:
            from ..recipes import default_setup

            self._setup = default_setup()
        return self._setup

    def fp_unet(self):
        return self.setup().unet

    def make_setup(self):
        return self.setup()

    def default_calib(self):
        return 8, 10

    def record_calls(self, samples, steps, progress=None):
        from ..recipes import record_calibration

        return record_calibration(self.setup(), n_samples=samples, steps=steps, progress=progress)

    def check_subject(self, subject) -> str:
        s = str(subject).strip() if subject is not None else ""
        if not re.fullmatch(r"\d", s):
            raise SettingError(f"digit (class label) must be one of 0..9, got {subject!r}")
        return s

    def var_fn(self, model):
        from ..quant import get_stats

        st = get_stats(model)
        return st.residual_var_at if (st is not None and st.config.variance_calibration) else None

    def render(self, model, subject, seed, steps, count, size, progress=None):
        from ..quant import guided_eps_fn, sample
        from ..recipes import GUIDANCE

        s = self.setup()
        net = s.unet if model is None else model
        labels = torch.full((count,), int(subject), dtype=torch.long)
        eps_fn = guided_eps_fn(net, labels, GUIDANCE, s.null_label)
        x = sample(eps_fn, (count,) + tuple(s.image_shape), s.alphas_cumprod, steps=steps, sampler="ddim",
                   seed=seed, var_fn=None if model is None else self.var_fn(model), progress=progress)
        img = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [B, H, W, 1]
        return img.expand(*img.shape[:-1], 3).contiguous()


def user_message(exc: BaseException) -> str:
    """The line shown in the status box for an exception from a backend call."""
    if isinstance(exc, (LowBitError, FileExistsError, FileNotFoundError)):
        return f"Error: {exc}"
    if isinstance(exc, (ValueError, TypeError)):
        return f"Error: {exc}"
    return f"Error: unexpected {type(exc).__name__}: {exc} (details in the console log)"
