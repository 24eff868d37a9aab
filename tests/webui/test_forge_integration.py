"""Integration tests against a real headless Forge (skipped unless FORGE_DIR is set).

    (set up once as in the README section 'Testing inside real hosts')
    FORGE_DIR=/work/forge pytest -m forge tests/webui -v   # about 10 min on 2 CPU cores

Last run: 2026-12-05, Forge main dfdcbab (2025-06-26, "f2.0.1v1.10.1-1.10.1"), torch 2.14.1 CPU, shared 2 cores: the 5
forge tests passed in 7 min 13 s (the tab test in headless Chromium included; 6 min 23 s to 9 min 39 s over three runs
that day); largest process peak RSS 11.3 GiB.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from forge_harness import EXTENSION_NAME, REPO_ROOT
from make_sd15_fixture import FIXTURE_VERSION, sd15_spec

BASELINE = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 7, "seed": 1, "batch_size": 1}


def _extension_script_files() -> list[Path]:
    return sorted(p for p in (REPO_ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))


# -- the fixture checkpoint (no Forge needed) ---------------------------------------------------------------

def test_fixture_layout_matches_diffusers_converters():
    """The hand-written LDM key/shape table is exactly what diffusers' LDM converters and the SD1.5 configs
    expect (UNet, KL VAE, CLIP-L), checked on the meta device: no 2 GB file is built here."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    spec = sd15_spec()
    ckpt = {k: torch.empty(shape, device="meta", dtype=torch.float16) for k, (shape, _) in spec.items()}
    assert sum(t.numel() for k, t in ckpt.items() if k.startswith("model.diffusion_model.")) == 859_520_964

    def same(model_sd: dict, converted: dict, what: str) -> None:
        model_sd = {k: v for k, v in model_sd.items() if not k.endswith("position_ids")}
        assert set(model_sd) == set(converted), (what, sorted(set(model_sd) ^ set(converted))[:10])
        bad = [k for k in model_sd if tuple(model_sd[k].shape) != tuple(converted[k].shape)]
        assert not bad, (what, bad[:10])

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4)
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77))
    same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "unet")
    same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "vae")
    prefix = "cond_stage_model.transformer.text_model."
    text_model = getattr(clip, "text_model", clip)  # transformers 5 flattened CLIPTextModel
    same(text_model.state_dict(), {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}, "clip")
    assert len(spec) == len(ckpt) == 686 + 196 + 248


# -- a real Forge -------------------------------------------------------------------------------------------

@pytest.mark.forge
@pytest.mark.slow
def test_txt2img_baseline(forge):
    """The random SD1.5 fixture loads and a 64x64, 2-step txt2img answers with one valid RGB image."""
    images = forge.txt2img(dict(BASELINE))
    assert len(images) == 1
    im = images[0]
    assert im.size == (64, 64) and im.mode == "RGB"
    extrema = im.getextrema()
    assert any(hi > lo for lo, hi in extrema), f"constant image {extrema} (NaN in the UNet/VAE?)"
    assert forge.last_info.get("sd_model_name") == f"lowbit-{FIXTURE_VERSION}", forge.last_info.get("sd_model_name")


@pytest.mark.forge
@pytest.mark.slow
def test_extension_loaded_without_errors(forge, forge_server):
    """Forge saw extensions/lowbit and logged no traceback through it or through the `lowbit` package
    (script import, ui()/ui_settings/ui_tabs callbacks, which --nowebui runs too while building the API)."""
    link = forge_server.forge_dir / "extensions" / EXTENSION_NAME
    assert link.resolve() == REPO_ROOT
    errors = forge_server.error_blocks()
    assert not errors, "\n\n".join(errors[:5])


@pytest.mark.forge
@pytest.mark.slow
def test_extension_scripts_discovered(forge):
    """Every extension script is listed by GET /sdapi/v1/scripts. Convention: the titles of LowBit's
    scripts contain "LowBit" (the API lists titles lower-cased)."""
    files = _extension_script_files()
    if not files:
        pytest.skip(f"{REPO_ROOT / 'scripts'} has no scripts yet")
    listed = forge.scripts()
    ours = {tab: [t for t in titles if "lowbit" in t] for tab, titles in listed.items()}
    assert ours["txt2img"], f"no script titled '*LowBit*' among txt2img scripts {listed['txt2img']}"
    alwayson = [s for s in forge.script_info() if "lowbit" in s["name"] and s["is_alwayson"]]
    assert alwayson, "LowBit's script is listed but not AlwaysVisible"


# -- LowBit's AlwaysVisible script on a real Forge ------------------------------------------------------------

# Script args, in the order of LowBitScript.ui(): enable, bits, method, calibration samples, calibration steps.
# One 2-step calibration run (4 recorded UNet calls: 2 steps x cond/uncond batched) keeps the full SD1.5 UNet's
# calibration at a few seconds of CPU; PTQD statistics come from the same calls.
LOWBIT_W8A8 = [True, "W8A8", "naive+ptqd", 1, 2]


def _mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference in 0..255 units over RGB."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    assert x.shape == y.shape
    return float(np.abs(x - y).mean())


@pytest.mark.forge
@pytest.mark.slow
def test_lowbit_generation_differs_plausibly_from_full_precision(forge, forge_server):
    """txt2img with LowBit enabled through `alwayson_scripts` (W8A8, min/max + PTQD, calibrated inside the
    request by one 2-step full-precision run) versus the same request without it (same seed).

    What is plausible on this checkpoint (random weights: images are noise-like): offline, on the same UNet
    weights, W8A8's UNet-level error is SQNR ~24 dB (W8A16 ~29 dB), and the random VAE decoder amplifies
    latent differences, so pixels move a lot even for a small UNet error. Measured here (0..255 units, mean
    |difference| to the full-precision image): W8A8 naive 33.9, W8A8 naive+PTQD 34.1 (2-step calibration) /
    32.7 (2 runs x 4 steps), W4A8 36.2, W4A16 22.8, another seed 57.7. Pixel error is not monotonic in the
    bit-width on this fixture (activation clipping dominates, the VAE is chaotic), so no ordering is asserted.
    The checks:
      * W8A8 differs from full precision (> 0: the quantized UNet really ran -- Forge reports script errors
        in the log and then samples in full precision) and the infotext names it;
      * it stays closer to full precision than another seed is: < 0.75 x the seed-to-seed difference
        (measured ratio 0.59 with name-rule precision; with the measured per-layer plan, the default since
        2026-12-03: 5.73 to 6.23 against 57.70, ratio 0.10-0.11, on Forge dfdcbab, 2026-12-05);
      * a second W8A8 request reuses the cached quantized UNet (identical image), and a full-precision
        request afterwards is bit-identical to the first (the float UNet is back in place).
    """
    fp = forge.txt2img(dict(BASELINE))[0]
    other_seed = forge.txt2img(dict(BASELINE, seed=2))[0]
    w8 = dict(BASELINE, alwayson_scripts={"lowbit": {"args": list(LOWBIT_W8A8)}})
    q8 = forge.txt2img(w8)[0]
    params = forge.last_info.get("extra_generation_params", {})
    assert params.get("LowBit") == "W8A8 naive+ptqd", (params, forge.log_tail(60))
    errors = forge_server.error_blocks()
    assert not errors, "\n\n".join(errors[:3])
    q8_again = forge.txt2img(w8)[0]
    fp_again = forge.txt2img(dict(BASELINE))[0]

    d8, d_seed = _mean_abs_diff(fp, q8), _mean_abs_diff(fp, other_seed)
    print(f"\nmean |fp - W8A8| = {d8:.3f}, |seed 1 - seed 2| = {d_seed:.3f} (0..255 units)")
    assert d_seed > 1.0, "the random checkpoint gives the same image for two seeds; the bound would be meaningless"
    assert 0.0 < d8 < 0.75 * d_seed, (d8, d_seed)
    assert _mean_abs_diff(q8, q8_again) == 0.0
    assert _mean_abs_diff(fp, fp_again) == 0.0


# -- the LowBit tab in Forge's own UI, driven by headless Chromium ---------------------------------------------

@pytest.fixture
def forge_ui(tmp_path):
    """A second Forge with its gradio UI (``--api`` instead of ``--nowebui``): the tab only exists there."""
    from forge_harness import SKIP_REASON, ForgeServer, forge_paths
    from make_sd15_fixture import ensure_fixture

    paths = forge_paths()
    if paths is None:
        pytest.skip(SKIP_REASON)

    class ForgeWithUI(ForgeServer):
        def command(self):
            return ["--api" if a == "--nowebui" else a for a in super().command()]

    # The gradio UI mounts repositories/stable-diffusion-webui-assets (fonts, icons), a git clone launch.py makes
    # online; an empty folder lets the page load offline (cosmetic assets missing). Removed again if made here.
    assets = paths[0] / "repositories" / "stable-diffusion-webui-assets"
    made_assets = not assets.exists()
    if made_assets:
        assets.mkdir(parents=True)
    server = ForgeWithUI(*paths, checkpoint=ensure_fixture(), log_path=tmp_path / "forge-ui.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if made_assets:
            assets.rmdir()


@pytest.mark.forge
@pytest.mark.browser
@pytest.mark.slow
def test_lowbit_tab_quantizes_and_compares_in_forge_ui(forge_ui, tmp_path):
    """Open Forge's page, switch to the LowBit tab, type the smallest settings, press Quantize (one 2-step
    64x64 calibration txt2img, W8A8) and Compare (one 64x64 image, 2 steps): the status, the PSNR/SSIM text and
    the before/after slider appear. Screenshot: out/forge_tab_screenshot.png."""
    import base64
    import shutil

    from test_browser import CDP, CHROMIUM_FLAGS, _chromium, _stop, _wait

    exe = _chromium()
    pytest.importorskip("websocket", reason="pip install websocket-client (drives Chromium over DevTools)")
    forge_ui.client.post("/sdapi/v1/options", {"lowbit_calib_size": 64})
    import json
    import subprocess
    import urllib.request

    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        _wait(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium's DevTools port", proc)
        port = int(port_file.read_text().split()[0])
        pages = _wait(lambda: [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                               if t.get("type") == "page"], 30, "a Chromium page")
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        cdp("Page.navigate", url=forge_ui.client.base_url + "/")
        _wait(lambda: cdp.js("""(() => { const b = [...document.querySelectorAll('button')]
                .find(b => b.textContent.trim() === 'LowBit'); if (!b) return false;
                b.id = b.id || 'lowbit_tab_button'; return true; })()"""), 600, "Forge's LowBit tab button")
        cdp.click("#" + cdp.js("[...document.querySelectorAll('button')]"
                               ".find(b => b.textContent.trim() === 'LowBit').id"))
        _wait(lambda: cdp.js("(() => { const e = document.querySelector('#lowbit_quantize'); "
                             "return !!e && e.getBoundingClientRect().width > 0; })()"), 60, "the LowBit tab content")
        for sel, v in (("#lowbit_calib_samples input", 1), ("#lowbit_calib_steps input", 2),
                       ("#lowbit_steps input", 2), ("#lowbit_count input", 1), ("#lowbit_size input", 64)):
            cdp.type_into(sel, v)
        cdp.click("#lowbit_quantize")
        status = _wait(lambda: (lambda v: v if v and ("quantized in" in v or v.startswith("Error")) else None)(
            cdp.value("#lowbit_status textarea")), 1800, "the Quantize status")
        assert "quantized in" in status and "W8A8" in status, status
        cdp.click("#lowbit_compare")
        metrics = _wait(lambda: (lambda v: v if v and ("PSNR" in v or v.startswith("Error")) else None)(
            cdp.value("#lowbit_metrics textarea")), 1800, "the PSNR/SSIM text")
        assert "PSNR" in metrics and "SSIM" in metrics, (metrics, cdp.value("#lowbit_status textarea"))
        _wait(lambda: cdp.js("[...document.querySelectorAll('#lowbit_slider img, #lowbit_fp img')]"
                             ".some(i => i.complete && i.naturalWidth > 0)"), 60, "the comparison image")
        shot = tmp_path / "forge_tab_screenshot.png"
        shot.write_bytes(base64.b64decode(cdp("Page.captureScreenshot", format="png")["data"]))
        (REPO_ROOT / "out").mkdir(exist_ok=True)
        shutil.copy(shot, REPO_ROOT / "out" / "forge_tab_screenshot.png")
        errors = forge_ui.error_blocks()
        assert not errors, "\n\n".join(errors[:3])
    finally:
        _stop(proc)
