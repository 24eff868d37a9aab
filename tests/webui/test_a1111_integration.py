"""Integration tests against a real headless AUTOMATIC1111 WebUI (skipped unless A1111_DIR is set).

    (set up once as in the README section 'Testing inside real hosts')
    A1111_DIR=/path/to/stable-diffusion-webui pytest -m a1111 tests/webui -v

What A1111 offers LowBit (ui/webui.py): the SD Unet options (Settings -> Stable Diffusion -> SD Unet; calibration
free W8A8 with dynamic activations, weight-only W4A16, saved files) and, since A1111 1.10, the same AlwaysVisible
section as on Forge (``process_before_every_sampling``). Both are checked here the way the Forge tests check the
section: against the same request in full precision and with another seed, on the random SD1.5 fixture.

Last runs: 2026-12-06, A1111 v1.10.1 (82a973c), torch 2.14.1 CPU, 2 cores: 4 passed in 5 min 12 s and 5 min 17 s,
peak RSS 8.0-8.4 GB (SD Unet W8A8 dynamic: 4.9 against 57.7 seed to seed; the section's W8A8 naive+ptqd: 4.8-5.2,
the kernel autotuner's choices vary).
"""
from __future__ import annotations

import pytest

from forge_harness import EXTENSION_NAME, REPO_ROOT
from make_sd15_fixture import FIXTURE_VERSION
from test_forge_integration import BASELINE, LOWBIT_W8A8, _mean_abs_diff

pytestmark = [pytest.mark.a1111, pytest.mark.slow]

W8A8_DYNAMIC = "LowBit W8A8 (dynamic activations)"


@pytest.fixture(scope="module")
def references(a1111):
    """The full-precision image of BASELINE and the same request with another seed."""
    # (sd_unet must be in A1111's config for override_settings to be undone after a request: A1111 restores only
    # settings that were stored; a fresh install has none)
    a1111.post("/sdapi/v1/options", {"sd_unet": "Automatic"})
    return a1111.txt2img(dict(BASELINE))[0], a1111.txt2img(dict(BASELINE, seed=2))[0]


def test_txt2img_baseline(a1111, references):
    fp, other_seed = references
    assert fp.size == (64, 64) and fp.mode == "RGB"
    assert any(hi > lo for lo, hi in fp.getextrema()), "constant image (NaN in the UNet/VAE?)"
    a1111.txt2img(dict(BASELINE))
    assert a1111.last_info.get("sd_model_name") == f"lowbit-{FIXTURE_VERSION}"
    assert _mean_abs_diff(fp, other_seed) > 1.0


def test_extension_loaded_without_errors(a1111, a1111_server):
    assert (a1111_server.forge_dir / "extensions" / EXTENSION_NAME).resolve() == REPO_ROOT
    errors = a1111_server.error_blocks()
    assert not errors, "\n\n".join(errors[:5])
    listed = a1111.scripts()
    assert "lowbit" in listed["txt2img"] and "lowbit" in listed["img2img"], listed
    assert [s for s in a1111.script_info() if s["name"] == "lowbit" and s["is_alwayson"]]


def test_sd_unet_option_samples_quantized_and_is_undone(a1111, a1111_server, references):
    """Selecting the W8A8 SD Unet option (here per request, as override_settings) quantizes the checkpoint's UNet
    (A1111 logs "Activating unet: <label>"), the infotext names it, the image stays close to full precision; the
    next request without it is bit-identical to full precision again."""
    fp, other_seed = references
    q = a1111.txt2img(dict(BASELINE, override_settings={"sd_unet": W8A8_DYNAMIC}))[0]
    params = a1111.last_info.get("extra_generation_params", {})
    assert params.get("LowBit") == "W8A8 (dynamic activations) (SD Unet)", (params, a1111.log_tail(40))
    assert f"Activating unet: {W8A8_DYNAMIC}" in a1111_server.log_tail(400)
    d, d_seed = _mean_abs_diff(fp, q), _mean_abs_diff(fp, other_seed)
    print(f"\nSD Unet W8A8 dynamic: mean |fp - q| = {d:.3f}, seed to seed {d_seed:.3f}")
    assert 0.0 < d < 0.75 * d_seed, (d, d_seed)
    assert _mean_abs_diff(fp, a1111.txt2img(dict(BASELINE))[0]) == 0.0
    assert not a1111_server.error_blocks()


def test_section_w8a8_differs_plausibly_and_is_cached_and_undone(a1111, a1111_server, references):
    """The AlwaysVisible section through `alwayson_scripts`, as on Forge (test_forge_integration.py): W8A8
    naive+ptqd calibrated inside the request; a second request reuses it (identical image); full precision
    afterwards is bit-identical. Slow on a busy 2-core machine (the first request quantizes the SD1.5 UNet)."""
    fp, other_seed = references
    w8 = dict(BASELINE, alwayson_scripts={"lowbit": {"args": list(LOWBIT_W8A8)}})
    q8 = a1111.txt2img(w8, timeout=3600)[0]
    params = a1111.last_info.get("extra_generation_params", {})
    assert params.get("LowBit") == "W8A8 naive+ptqd", (params, a1111.log_tail(60))
    errors = a1111_server.error_blocks()
    assert not errors, "\n\n".join(errors[:3])
    q8_again = a1111.txt2img(w8)[0]
    fp_again = a1111.txt2img(dict(BASELINE))[0]
    d8, d_seed = _mean_abs_diff(fp, q8), _mean_abs_diff(fp, other_seed)
    print(f"\nsection W8A8 naive+ptqd: mean |fp - q| = {d8:.3f}, seed to seed {d_seed:.3f}")
    assert 0.0 < d8 < 0.75 * d_seed, (d8, d_seed)
    assert _mean_abs_diff(q8, q8_again) == 0.0
    assert _mean_abs_diff(fp, fp_again) == 0.0
