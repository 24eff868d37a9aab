"""The A1111 side of ui/webui.py without an A1111: its ``modules.sd_unet`` / ``modules.scripts`` are stand-ins
that behave as A1111 1.10.1's do (``UNetModel.forward`` hands every call to ``sd_unet.current_unet`` while that
is set). The real host runs in tests/webui/test_a1111_integration.py (A1111_DIR)."""
from __future__ import annotations

import sys
import types

import pytest

torch = pytest.importorskip("torch")

from lowbit.ui import webui  # noqa: E402
from lowbit.ui.backend import SettingError  # noqa: E402
from lowbit.quant.errors import ConfigError  # noqa: E402


@pytest.fixture
def a1111(monkeypatch):
    """A stand-in ``modules`` package with A1111's ``sd_unet`` dispatch; ``webui`` believes it is not on Forge."""
    sd_unet = types.ModuleType("modules.sd_unet")
    sd_unet.current_unet = None
    modules = types.ModuleType("modules")
    modules.sd_unet = sd_unet
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.sd_unet", sd_unet)
    monkeypatch.setattr(webui, "is_forge", lambda: False)
    return sd_unet


class _UNet(torch.nn.Module):
    """A1111's patched ``UNetModel``: while ``current_unet`` is set, the call goes there."""

    def __init__(self, sd_unet, scale):
        super().__init__()
        self.sd_unet, self.scale, self.seen = sd_unet, scale, []

    def forward(self, x, timesteps=None, context=None):
        if self.sd_unet.current_unet is not None:
            return self.sd_unet.current_unet.forward(x, timesteps, context)
        self.seen.append(float(timesteps))
        return x * self.scale


class _Sampler:
    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def sample(self, p, x, c, uc, steps=None, image_conditioning=None):
        self.calls += 1
        return self.unet(x, torch.tensor(999.0), c)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, t_enc=None, image_conditioning=None):
        raise RuntimeError("interrupted")


def test_install_a1111_samples_this_generation_with_the_quantized_unet_only(a1111):
    """The quantized UNet runs while this generation's sampler samples, through A1111's own dispatch; afterwards,
    and after an error, ``current_unet`` is what it was (nothing left behind for the next generation). Installing
    again on the same sampler (a hires pass) wraps once."""
    fp, q = _UNet(a1111, 1.0), _UNet(a1111, 2.0)
    sampler = _Sampler(fp)
    p = types.SimpleNamespace(sampler=sampler, extra_generation_params={})
    webui.install_a1111(p, q, "W8A8 naive")
    webui.install_a1111(p, q, "W8A8 naive")
    assert p.extra_generation_params == {"LowBit": "W8A8 naive"}
    x = torch.ones(1, 4, 8, 8)
    out = sampler.sample(p, x, None, None)
    assert torch.equal(out, 2 * x) and q.seen == [999.0] and fp.seen == [] and sampler.calls == 1
    assert a1111.current_unet is None
    option = object()  # an SD Unet option selected in the settings is put back, also after an error
    a1111.current_unet = option
    with pytest.raises(RuntimeError, match="interrupted"):
        sampler.sample_img2img(p, x, x, None, None)
    assert a1111.current_unet is option
    assert torch.equal(sampler.sample(p, x, None, None), 2 * x) and a1111.current_unet is option
    assert "sample" in vars(sampler) and vars(_Sampler)["sample"].__qualname__ == "_Sampler.sample"  # class untouched


def test_calibration_runs_the_checkpoints_float_unet_even_with_an_sd_unet_selected(a1111, monkeypatch):
    """Calibration records the float UNet's own trajectory: an SD Unet option (e.g. a LowBit one) is set aside while
    the calibration runs sample, and put back afterwards."""
    fp = _UNet(a1111, 1.0)
    option = types.SimpleNamespace(forward=lambda *a: pytest.fail("the SD Unet ran during calibration"))
    a1111.current_unet = option
    sampler = _Sampler(fp)
    p = types.SimpleNamespace(sampler=sampler, seeds=[1], sd_model=types.SimpleNamespace(
        model=types.SimpleNamespace(diffusion_model=fp)), txt2img_image_conditioning=lambda x: None)
    calls = webui.calibrate_in_generation(p, 2, 1, {"x": torch.zeros(1, 4, 8, 8), "c": None, "uc": None})
    assert len(calls) == 2 and fp.seen == [999.0, 999.0]
    assert a1111.current_unet is option


def test_a1111_generation_builds_once_per_setting_and_names_the_loras(a1111, monkeypatch):
    fp = _UNet(a1111, 1.0)
    built, installed = [], []
    monkeypatch.setattr(webui, "calibrate_in_generation", lambda p, s, n, kw: ["call"])
    monkeypatch.setattr(webui, "build_for", lambda p, calls, bits, method: built.append((bits, method)) or object())
    monkeypatch.setattr(webui, "install_a1111", lambda p, q, label: installed.append(label))
    monkeypatch.setattr(webui, "install", lambda *a: pytest.fail("Forge's install on A1111"))
    monkeypatch.setattr(webui.SHARED, "key", None)
    monkeypatch.setattr(webui.SHARED, "qmodel", None)
    lora = types.SimpleNamespace(items=["style", "0.8"])
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename="a"),
                                                             model=types.SimpleNamespace(diffusion_model=fp)),
                              extra_network_data={"lora": [lora]})
    kw = {"x": torch.zeros(1, 4, 8, 8), "c": None}
    webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 2, **kw)
    webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 2, **kw)  # cached
    assert built == [("W8A8", "naive")] and installed == ["W8A8 naive"] * 2
    assert "lora:style:0.8" in webui.SHARED.key[1]
    p.extra_network_data = {}
    webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 2, **kw)  # the LoRA is gone: built anew
    assert len(built) == 2
    with pytest.raises(SettingError, match="needs Forge"):
        webui.process_before_every_sampling(p, True, webui.FROM_TAB, "naive", 1, 2)


def test_float8_weights_are_refused_naming_the_setting():
    """A1111's "FP8 weight" option stores Linear weights as float8: refused, naming the setting (they passed the
    floating-point check)."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    m = torch.nn.Linear(4, 4)
    webui.check_float_weights(m)
    m.weight = torch.nn.Parameter(m.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ConfigError, match="FP8 weight"):
        webui.check_float_weights(m)


def test_sd_unet_label_names_only_lowbits_option(a1111):
    assert webui.sd_unet_label() is None

    class Ours(webui.LowBitSdUnetBase):
        option = types.SimpleNamespace(label="LowBit W8A8 (dynamic activations)")

    a1111.current_unet = types.SimpleNamespace(option=Ours.option)  # somebody else's SD Unet (e.g. TensorRT)
    assert webui.sd_unet_label() is None
    a1111.current_unet = Ours()
    assert webui.sd_unet_label() == "LowBit W8A8 (dynamic activations)"


_STUBS = {
    "modules/__init__.py": "",
    "modules/script_callbacks.py": "def _reg(*a, **k):\n    pass\n"
                                   "on_ui_settings = on_ui_tabs = on_model_loaded = on_list_unets = _reg\n",
    "modules/shared.py": "class _O: pass\nopts = _O()\n",
}
_PROCESS = r"""
import importlib.util, json, sys, types
spec = importlib.util.spec_from_file_location("lowbit_webui.py", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
out = {"hook": m.HAS_SAMPLING_HOOK}
for enabled in (False, True):
    p = types.SimpleNamespace(extra_generation_params={})
    m.LowBitScript().process(p, enabled, "W8A8", "naive", 1, 2)
    out[str(enabled)] = p.extra_generation_params.get("LowBit")
print(json.dumps(out))
"""


@pytest.mark.parametrize("has_hook", [False, True])
def test_section_says_not_applied_on_a_webui_without_the_sampling_hook(tmp_path, has_hook):
    """A1111 before 1.10 never calls ``process_before_every_sampling``: an enabled section sampled in full precision
    without a word. Its ``process`` now says so in the infotext (and the log); with the hook it adds nothing."""
    import json
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    runner = "class ScriptRunner:\n    def process_before_every_sampling(self, p, **kw):\n        pass\n"
    stubs = dict(_STUBS, **{"modules/scripts.py": "AlwaysVisible = object()\nclass Script:\n    pass\n"
                            + (runner if has_hook else "class ScriptRunner:\n    pass\n")})
    for rel, text in stubs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "lowbit").symlink_to(repo, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(tmp_path)]))
    res = subprocess.run([sys.executable, "-c", _PROCESS, str(repo / "scripts" / "lowbit_webui.py")], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["hook"] is has_hook and out["False"] is None
    if has_hook:
        assert out["True"] is None
    else:
        assert out["True"].startswith("not applied") and "SD Unet" in out["True"], out


def test_img2img_with_other_settings_is_refused_and_keeps_the_cached_unet(a1111, monkeypatch):
    """img2img reuses the UNet a txt2img built with the same settings; one with other settings is refused (the
    calibration records txt2img only) -- and no longer drops the cached UNet on the way (it was freed before the
    refusal, so the next img2img with the right settings failed too). On A1111 the message names no LowBit tab."""
    fp, q = _UNet(a1111, 1.0), object()
    installed = []
    monkeypatch.setattr(webui, "install_a1111", lambda p, model, label: installed.append(model))
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename="a"),
                                                             model=types.SimpleNamespace(diffusion_model=fp)),
                              init_images=["an image"])
    monkeypatch.setattr(webui.SHARED, "key", ("a", (), "W8A8", "naive", 1, 2))
    monkeypatch.setattr(webui.SHARED, "qmodel", q)
    kwargs = {"x": torch.zeros(1, 4, 8, 8), "c": None}
    webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 2, **kwargs)
    with pytest.raises(SettingError, match="txt2img only") as ei:
        webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 3, **kwargs)
    assert "tab" not in str(ei.value)
    webui.process_before_every_sampling(p, True, "W8A8", "naive", 1, 2, **kwargs)
    assert installed == [q, q] and webui.SHARED.qmodel is q
