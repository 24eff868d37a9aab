"""make_fixture.py's host-independent parts (no ComfyUI needed)."""
import dataclasses

import pytest
import torch

import make_fixture


def test_check_finite_refuses_uninitialised_tensors():
    make_fixture.check_finite({"a": torch.zeros(2), "ids": torch.arange(3)}, "sd3")
    bad = {"a": torch.zeros(2), "model.diffusion_model.pos_embed": torch.tensor([0.0, float("nan")])}
    with pytest.raises(SystemExit, match="pos_embed"):
        make_fixture.check_finite(bad, "sd3")
    with pytest.raises(SystemExit, match="1 tensor"):
        make_fixture.check_finite({"w": torch.tensor([float("inf")], dtype=torch.float16)}, "flux")


def test_sd3_fixture_name_carries_its_own_version():
    # v1 SD3 files (pos_embed left uninitialised) must not be reused from a cache
    name = make_fixture.fixture_path("sd3", 0, "/c").name
    assert name == f"lowbit-comfy-sd3-d2-{make_fixture.SD3_FIXTURE_VERSION}-s0.safetensors"
    assert make_fixture.SD3_FIXTURE_VERSION != "v1"


@dataclasses.dataclass
class _FluxParams0364:          # the fields of ComfyUI 0.3.64's FluxParams
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list
    theta: int
    patch_size: int
    qkv_bias: bool
    guidance_embed: bool


@dataclasses.dataclass
class _FluxParamsNew(_FluxParams0364):   # 0.33.0 adds a required txt_ids_dims (and defaulted fields)
    txt_ids_dims: list = None
    global_modulation: bool = False


def test_flux_params_follow_the_hosts_dataclass():
    old = make_fixture.flux_params(dataclasses.fields(_FluxParams0364))
    assert "txt_ids_dims" not in old and old == make_fixture.FLUX_PARAMS
    new = make_fixture.flux_params(dataclasses.fields(_FluxParamsNew))
    assert new["txt_ids_dims"] == []                  # Flux.1, as ComfyUI's detection sets it
    assert "txt_ids_dims" not in make_fixture.FLUX_PARAMS   # the table itself is not changed
