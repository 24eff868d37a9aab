"""The gradio app (lowbit.ui.app) and its default-model backend, without a browser.

Jobs run with the smallest settings. "embedded" uses the trained default model (skipped until
models/digits_ddpm.safetensors exists); "random" is the same architecture with random weights, so the UI
plumbing is tested everywhere.
"""
from __future__ import annotations

import math

import pytest

gr = pytest.importorskip("gradio")
torch = pytest.importorskip("torch")

from lowbit.ui.app import build_blocks  # noqa: E402
from lowbit.ui.backend import DefaultModelBackend, SettingError, check_name  # noqa: E402


def _random_setup():
    from diffusers import DDPMScheduler

    from lowbit.models.digits import IMAGE_SIZE, NULL_CLASS, SCHEDULER_CONFIG, UNET_CONFIG, build_unet
    from lowbit.recipes import Setup

    torch.manual_seed(0)
    unet = build_unet(dict(UNET_CONFIG)).eval().requires_grad_(False)
    return Setup(unet, DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.float(), NULL_CLASS,
                 (1, IMAGE_SIZE, IMAGE_SIZE))


def _embedded_setup():
    from lowbit.models.digits import DDPM_PATH

    if not DDPM_PATH.exists():
        pytest.skip(f"the embedded default model is not trained yet ({DDPM_PATH} missing)")
    from lowbit.recipes import default_setup

    return default_setup()


@pytest.fixture(scope="module", params=["embedded", "random"])
def quantized(request, tmp_path_factory):
    """A backend that has quantized its model once (W8A8 naive, 2 calibration runs x 3 steps)."""
    setup = _embedded_setup() if request.param == "embedded" else _random_setup()
    b = DefaultModelBackend(models_dir=str(tmp_path_factory.mktemp("models")), setup=setup)
    seen = []
    status = b.quantize("W8A8", "naive", 2, 3, progress=lambda f, text: seen.append((f, text)))
    b._test_kind, b._test_progress = request.param, seen
    assert "quantized" in status and "W8A8" in status, status
    return b


def test_build_blocks_constructs_on_default_backend(tmp_path):
    """The Blocks builds without touching the model (weights load lazily on the first job)."""
    b = DefaultModelBackend(models_dir=str(tmp_path))
    demo = build_blocks(b)
    assert isinstance(demo, gr.Blocks)
    assert b._setup is None  # building the UI loaded nothing


@pytest.mark.parametrize("call, words", [
    (lambda b: b.quantize("W3A3", "naive", 2, 3), ["bits", "W8A8", "W4A16"]),
    (lambda b: b.quantize("W8A8", "no-such-method", 2, 3), ["method", "naive"]),
    (lambda b: b.quantize("W8A8", "naive", 0, 3), ["calibration samples", "1..1024"]),
    (lambda b: b.quantize("W8A8", "naive", 2, 5000), ["calibration steps", "1..1000"]),
    (lambda b: b.quantize("W8A8", "naive", 2.5, 3), ["calibration samples", "whole number"]),
    (lambda b: b.quantize("W8A8", "naive", float("inf"), 3), ["calibration samples", "whole number"]),
    (lambda b: b.quantize("W8A8", "naive", 2, "-inf"), ["calibration steps", "whole number"]),
    (lambda b: b.compare("12", 1, 5, 1), ["digit", "0..9"]),
    (lambda b: b.compare("3", -1, 5, 1), ["seed"]),
    (lambda b: b.compare("3", 1, 0, 1), ["sampling steps", "1..1000"]),
    (lambda b: b.fine_tune(0, 4, 2), ["fine-tune steps"]),
    (lambda b: b.save("../escape"), ["file name"]),
    # the pipeline's own checks, before ~18 s of calibration runs (it failed after them)
    (lambda b: b.quantize("W4A16", "recon+ptqd+vsc+mixed", 1, 2), ["W4A16", "recon+ptqd+vsc+mixed", "weight-only"]),
    (lambda b: b.ptqd(False, False, False), ["all three corrections", "tick at least one"]),
    (lambda b: b.ptqd(True, True, True, 2.7, 3), ["calibration samples", "whole number"]),
])
def test_settings_are_validated_before_any_work(tmp_path, call, words):
    """Every message names the setting and the allowed range/choices; no model is loaded to say so."""
    b = DefaultModelBackend(models_dir=str(tmp_path))
    with pytest.raises(SettingError) as ei:
        call(b)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
    assert b._setup is None


def test_jobs_need_a_quantized_model_first(tmp_path):
    b = DefaultModelBackend(models_dir=str(tmp_path), setup=object())  # never touched
    for call in (lambda: b.compare("3", 1, 5, 1), lambda: b.ptqd(), lambda: b.save("x")):
        with pytest.raises(SettingError, match="Quantize"):
            call()


def test_quantize_reports_progress(quantized):
    assert quantized._test_progress and all(0.0 <= f <= 1.0 for f, _ in quantized._test_progress)
    assert any("calibration" in t for _, t in quantized._test_progress)
    # the quantization's own stages reach the bar (it stood at "quantizing to ..." for the whole build)
    assert any(t.startswith("quantizing to W8A8 (naive): ") and "quantize weights" in t
               for _, t in quantized._test_progress), quantized._test_progress[-5:]


def test_stop_is_honoured_during_quantization(tmp_path):
    """Stop during the quantization itself (not only between calibration and quantizing): the job ends with the
    previous model unchanged."""
    from lowbit.ui.backend import Interrupted

    b = DefaultModelBackend(models_dir=str(tmp_path), setup=_random_setup())

    def report(f, text):
        if text.startswith("quantizing to W8A8 (naive): "):
            b._stop.set()

    with pytest.raises(Interrupted, match="stopped by the user"):
        b.quantize("W8A8", "naive", 1, 2, progress=report)
    assert b.qmodel is None


def test_compare_returns_images_and_metrics(quantized):
    c = quantized.compare("3", 1, 4, 2)
    assert c.fp.shape == c.q.shape == c.diff.shape == (2, 16, 16, 3)
    assert float(c.fp.min()) >= 0.0 and float(c.fp.max()) <= 1.0
    assert "PSNR" in c.text and "SSIM" in c.text and len(c.psnr) == len(c.ssim) == 2
    assert all(-1.0 <= s <= 1.0 for s in c.ssim)
    if quantized._test_kind == "embedded":  # a trained model at W8A8 stays close to full precision
        assert min(c.psnr) > 15.0 and not any(math.isinf(p) for p in c.psnr), c.text
    from lowbit.ui.backend import to_pil_row

    img = to_pil_row(c.fp)
    assert img.height >= 256 and img.width == 2 * img.height  # two 16x16 images, enlarged


def test_ptqd_attaches_statistics(quantized):
    status = quantized.ptqd(True, True, True)
    assert "PTQD statistics" in status and "PTQD correction on" in status
    from lowbit.quant import get_stats

    assert get_stats(quantized.qmodel) is not None


def test_save_never_overwrites_and_load_restores(quantized, registry_kernels):
    msg = quantized.save("unit-test")
    assert "unit-test.safetensors" in msg and quantized.list_saved() == ["unit-test.safetensors"]
    with pytest.raises(SettingError, match="never overwrites"):
        quantized.save("unit-test.safetensors")
    before = quantized.compare("5", 3, 3, 1)
    assert "loaded" in quantized.load("unit-test.safetensors")
    after = quantized.compare("5", 3, 3, 1)
    assert torch.allclose(before.q, after.q, atol=1e-5)  # same integers, same tables, same PTQD statistics
    with pytest.raises(SettingError, match="does not exist"):
        quantized.load("missing.safetensors")


def test_finetune_runs_with_progress(quantized):
    if quantized._test_kind != "embedded":
        pytest.skip("a random UNet's distillation loss is not meaningful")
    seen = []
    status = quantized.fine_tune(2, 2, 2, progress=lambda f, text: seen.append(text))
    assert "fine-tuned" in status and "EfficientDM fine-tuned (2 steps)" in status, status
    assert any("loss" in t for t in seen), seen


def test_check_name():
    assert check_name("a-b_c.1") == "a-b_c.1.safetensors"
    assert check_name("x.safetensors") == "x.safetensors"
    for bad in ("", "/abs", "a/b", "..", ".hidden", "x" * 101):
        with pytest.raises(SettingError):
            check_name(bad)


# -- scripts/lowbit_webui.py: how the WebUI script finds the package (no WebUI needed: `modules` is stubbed) ---

_STUB_MODULES = {
    "modules/__init__.py": "",
    "modules/script_callbacks.py": (
        "registered = []\n"
        "def _reg(kind):\n"
        "    return lambda fn, **kw: registered.append(kind)\n"
        "on_ui_settings = _reg('ui_settings'); on_ui_tabs = _reg('ui_tabs'); on_model_loaded = _reg('model_loaded')\n"
        "on_list_unets = _reg('list_unets')\n"),
    "modules/scripts.py": "AlwaysVisible = object()\nclass Script:\n    pass\n",
    "modules/shared.py": "class _O: pass\nopts = _O()\n",
}

_LOAD_SCRIPT = r"""
import importlib.util, json, sys
mode = sys.argv[1]
if mode == "hidden":  # no `lowbit` importable (the extension folder is not pip-installed)
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "lowbit":
                raise ModuleNotFoundError("hidden for the test")
            return None
    sys.meta_path.insert(0, Hide())
spec = importlib.util.spec_from_file_location("lowbit_webui.py", sys.argv[2])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
from modules import script_callbacks
print(json.dumps({"pkg": m.lowbit.__name__, "file": m.lowbit.__file__, "webui": m.webui.__name__,
                  "lowbit_is": None if mode == "hidden" else importlib.import_module("lowbit").__file__,
                  "scripts": [n for n, v in vars(m).items() if isinstance(v, type) and issubclass(v, m.scripts.Script)
                              and v is not m.scripts.Script],
                  "callbacks": script_callbacks.registered}))
"""


@pytest.mark.parametrize("mode", ["installed", "hidden", "other"])
def test_webui_script_imports_the_package(tmp_path, mode):
    """installed: `lowbit` is this folder -> import lowbit. hidden: nothing called lowbit -> this folder is loaded as
    `lowbit`. other: a different `lowbit` is installed -> this folder is loaded as `lowbit_webui_ext` and the
    other one is left alone."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    for rel, text in _STUB_MODULES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    path = [str(tmp_path)]
    if mode == "installed":  # (this checkout as `lowbit`, whichever one the environment has installed: a worktree)
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "lowbit").symlink_to(repo, target_is_directory=True)
        path.insert(0, str(tmp_path / "site"))
    if mode == "other":
        (tmp_path / "other" / "lowbit").mkdir(parents=True)
        (tmp_path / "other" / "lowbit" / "__init__.py").write_text("OTHER = True\n")
        path.insert(0, str(tmp_path / "other"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    res = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, mode, str(repo / "scripts" / "lowbit_webui.py")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = {"installed": "lowbit", "hidden": "lowbit", "other": "lowbit_webui_ext"}[mode]
    assert out["pkg"] == expected and out["webui"] == f"{expected}.ui.webui", out
    assert Path(out["file"]).resolve() == repo / "__init__.py"
    if mode == "other":
        assert out["lowbit_is"] == str(tmp_path / "other" / "lowbit" / "__init__.py")  # not shadowed
    assert out["scripts"] == ["LowBitScript"]
    assert out["callbacks"][:3] == ["ui_settings", "ui_tabs", "model_loaded"]
    assert "list_unets" in out["callbacks"]  # no `modules_forge` here: the A1111 SD Unet options are registered


def test_size_must_be_a_multiple_of_8_and_the_saved_list_holds_loadable_names(tmp_path):
    """A host renders the nearest multiple of 8 (latents are 1/8 of the image): a size of 100 ran the full-precision
    render and then failed as if interrupted; it is refused first. Files Load refuses by name (hand-copied ones with
    spaces) are not offered in the list."""
    b = DefaultModelBackend(models_dir=str(tmp_path), setup=object())  # never touched
    b.show_size = True
    with pytest.raises(SettingError, match="multiple of 8, e.g. 96 or 104"):
        b.compare("3", 1, 5, 1, size=100)
    for name in ("ok-1.safetensors", "my model (1).safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert b.list_saved() == ["ok-1.safetensors"]


def test_training_works_on_a_host_that_samples_under_inference_mode(tmp_path):
    """Forge loads checkpoints and generates under ``torch.inference_mode()``: the float UNet and the recorded
    calls are inference tensors, which autograd may not save. Fine-tuning failed there ("Inference tensors cannot be
    saved for backward"); training stages now get plain copies (``quant.calib.for_training``), made only when
    needed."""
    import torch

    from lowbit.quant.calib import for_training, training_mode
    from lowbit.recipes import record_calibration

    with torch.inference_mode():
        setup = _random_setup()

    class ForgeLike(DefaultModelBackend):
        def record_calls(self, samples, steps, progress=None):
            with torch.inference_mode():
                return record_calibration(self.setup(), n_samples=samples, steps=steps, progress=progress)

    b = ForgeLike(models_dir=str(tmp_path), setup=setup)
    assert "quantized" in b.quantize("W8A8", "naive", 1, 2)
    assert "fine-tuned" in b.fine_tune(2, 4, 2, 1, 2)
    with training_mode():
        unet, calls = for_training(setup.unet, b.calls)
        assert unet is not setup.unet and not any(p.is_inference() for p in unet.parameters())
        assert calls is not b.calls and not calls[0].args[0].is_inference()
        plain = DefaultModelBackend(models_dir=str(tmp_path), setup=_random_setup()).setup().unet
        assert for_training(plain, [])[0] is plain  # no copy where none is needed


def test_img2img_is_refused_before_calibrating():
    """The built-in calibration records txt2img generations only: an img2img pass (its processing object holds
    ``init_images``) is refused up front. The old test looked for a method Forge defines on every processing class,
    so img2img ran the full-precision calibration anyway."""
    import types

    import torch

    from lowbit.ui import webui

    x, c = torch.zeros(1, 4, 8, 8), {}
    img2img = types.SimpleNamespace(init_images=["an image"], txt2img_image_conditioning=lambda *a: None)
    with pytest.raises(SettingError, match="txt2img only"):
        webui.calibrate_in_generation(img2img, 1, 1, {"x": x, "c": c})


def test_from_tab_with_the_prompts_loras_is_refused(monkeypatch):
    """Forge applies a prompt's LoRAs to the float weights; the tab's quantized UNet has none, so "from LowBit tab"
    generated without them while the infotext listed them. It is refused, naming the LoRAs and the way out."""
    import types

    from lowbit.ui import webui

    installed = []
    monkeypatch.setattr(webui, "is_forge", lambda: True)  # (the tab exists on Forge only)
    monkeypatch.setattr(webui, "install", lambda *a: installed.append(a))
    monkeypatch.setattr(webui.SHARED, "tab_backend", types.SimpleNamespace(qmodel=object(), info={}))
    patcher = types.SimpleNamespace(lora_patches={"style_lora.safetensors": []})
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=patcher)))
    with pytest.raises(SettingError, match="style_lora.safetensors"):
        webui.process_before_every_sampling(p, True, webui.FROM_TAB, "naive", 1, 1)
    assert not installed
    patcher.lora_patches = {}
    webui.process_before_every_sampling(p, True, webui.FROM_TAB, "naive", 1, 1)
    assert len(installed) == 1


def test_calibration_settings_fill_defaults_and_record_again_when_changed(tmp_path, monkeypatch):
    """PTQD / Fine-tune calibration fields: an empty one takes the default (an empty steps field reached the core as
    ``steps=None``; an empty samples field replaced both by the defaults), and values that differ from the recorded
    calls' record again (they were silently ignored once calls were cached)."""
    b = DefaultModelBackend(models_dir=str(tmp_path), setup=object())
    assert b.default_calib() == (8, 10)
    assert b._calib_settings(2, None) == (2, 10)
    assert b._calib_settings(None, 2) == (8, 2)
    assert b._calib_settings(None, None) == (8, 10)
    b.calls, b.calls_settings = ["recorded"], (2, 3)
    assert b._calib_settings(None, None) is None and b._calib_settings(2, 3) is None  # the recorded ones
    assert b._calib_settings(4, 3) == (4, 3)
    with pytest.raises(SettingError, match="calibration steps"):
        b._calib_settings(2, "abc")

    seen = []

    class Recorded(Exception):
        pass

    def record(samples, steps, progress=None):
        seen.append((samples, steps))
        raise Recorded

    monkeypatch.setattr(b, "record_calls", record)
    b.qmodel = object()
    with pytest.raises(Recorded):
        b.ptqd(True, True, True, 4, None)
    assert seen == [(4, 10)]


@pytest.mark.parametrize("samples, steps, words", [
    (None, 2, ["LowBit calibration samples", "1..1024", "None"]),
    ("abc", 2, ["LowBit calibration samples", "whole number", "'abc'"]),
    (2.7, 2, ["LowBit calibration samples", "whole number", "2.7"]),
    (2, 0, ["LowBit calibration steps", "1..1000"]),
])
def test_forge_script_numbers_are_checked_naming_the_setting(monkeypatch, samples, steps, words):
    """The Forge script's number fields: an empty field or text gave Python's own words (int() of None), and 2.7
    was truncated to 2; each is refused once, naming the setting and its range."""
    import types

    from lowbit.ui import webui

    monkeypatch.setattr(webui, "calibrate_in_generation", lambda *a: pytest.fail("calibrated"))
    with pytest.raises(SettingError) as ei:
        webui.process_before_every_sampling(types.SimpleNamespace(), True, "W8A8", "naive", samples, steps)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_forge_script_checks_the_plan_before_calibrating(monkeypatch):
    import types

    from lowbit.ui import webui

    monkeypatch.setattr(webui, "calibrate_in_generation", lambda *a: pytest.fail("calibrated"))
    with pytest.raises(SettingError, match="weight-only"):
        webui.process_before_every_sampling(types.SimpleNamespace(), True, "W4A16", "recon+ptqd+vsc+mixed", 1, 2)
