"""Reliability: hostile files, interruption, numerical faults (issue 8)."""
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.quant import (CallRecorder, ConfigError, Interrupted, LoadError, NumericalError, QuantConfig, deploy_,
                          load, quantize, save)
from lowbit.quant.sthdr import header_digest
from qutil import assert_same_state, state_copy


@pytest.fixture(scope="module")
def good_file(unet, calls, tmp_path_factory):
    q = deploy_(quantize(unet, QuantConfig.preset("W4A8", time_bins=2), calls))
    p = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    save(q, str(p))
    return p.read_bytes()


def _try_load(unet, data, tmp_path, name):
    p = tmp_path / name
    p.write_bytes(data)
    before = state_copy(unet)
    try:
        load(unet, str(p))
    except LoadError as exc:
        assert str(p) in str(exc)  # the message names the file
    assert_same_state(unet, before)  # never a partially modified model


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_loader(unet, good_file, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("f")
    raw = bytearray(good_file)
    kind = data.draw(st.sampled_from(["truncate", "bitflip", "header_len", "shape", "json"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "bitflip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "header_len":
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([2 ** 63, 2 ** 40, len(raw), 0, 7])))
    else:
        (n,) = struct.unpack("<Q", bytes(raw[:8]))
        header = json.loads(bytes(raw[8:8 + n]))
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        if kind == "shape":
            header[key]["shape"] = [d + 1 for d in header[key]["shape"]]
        else:
            lb = json.loads(header["__metadata__"]["lowbit"])
            lb["layers"][next(iter(lb["layers"]))]["shape"] = "x" * 10
            header["__metadata__"]["lowbit"] = json.dumps(lb)
        hb = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(hb)) + hb + bytes(raw[8 + n:]))
    _try_load(unet, bytes(raw), tmp, "fuzzed.safetensors")


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                      st.text(max_size=8), st.sampled_from([0, -1, 2 ** 64, "", "W4A8", [], {}]))
_JSON = st.recursive(_JSON_LEAF, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), ch, max_size=3)),
                     max_leaves=12)


def _paths(obj, prefix=()):
    """Every (path) to a value inside a JSON object, e.g. ('layers', 'conv_in', 'w_bits')."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _set_path(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _rewrite_lowbit(raw: bytes, new_lowbit: str) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["lowbit"] = new_lowbit
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + raw[8 + n:]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_lowbit_header(unet, good_file, tmp_path_factory, data):
    """The JSON header: any value at any place replaced by any JSON (wrong types, huge integers, nesting), deep
    nesting, huge integers in the text: only LoadError, never RecursionError/ValueError/TypeError/KeyError..."""
    tmp = tmp_path_factory.mktemp("h")
    raw = bytes(good_file)
    (n,) = struct.unpack("<Q", raw[:8])
    lb = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["lowbit"])
    kind = data.draw(st.sampled_from(["replace", "deep", "bigint", "delete", "garbage"]))
    if kind == "replace":
        path = data.draw(st.sampled_from(_paths(lb)))
        _set_path(lb, path, data.draw(_JSON))
        text = json.dumps(lb)
    elif kind == "delete":
        path = data.draw(st.sampled_from([p for p in _paths(lb) if not isinstance(p[-1], int)]))
        parent = lb
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        text = json.dumps(lb)
    elif kind == "deep":
        depth = data.draw(st.sampled_from([40, 1000, 100_000]))
        path = data.draw(st.sampled_from(_paths(lb)))
        _set_path(lb, path, "@@")
        text = json.dumps(lb).replace('"@@"', "[" * depth + "]" * depth)
    elif kind == "bigint":
        path = data.draw(st.sampled_from(_paths(lb)))
        _set_path(lb, path, "@@")
        text = json.dumps(lb).replace('"@@"', "9" * data.draw(st.sampled_from([19, 5000, 50_000])))
    else:
        text = data.draw(st.sampled_from(["", "[]", "null", "{", '{"format": 1}', "NaN", '"x"']))
    if kind in ("replace", "delete") and path[0] != "header_sha256" and isinstance(lb.get("header_sha256"), str):
        lb["header_sha256"] = header_digest(lb)  # a crafter recomputes it: the fuzz reaches the meaning checks
        text = json.dumps(lb)
    _try_load(unet, _rewrite_lowbit(raw, text), tmp, "header.safetensors")


def test_cancelled_quantization_leaves_model_intact(unet, calls):
    before = state_copy(unet)
    seen = []

    def cancel(done, total, info):
        seen.append(info.get("stage"))
        if info.get("stage") == "calibrate activations" and done == 2:
            raise Interrupted("user cancelled")

    with pytest.raises(Interrupted):
        quantize(unet, QuantConfig.preset("W4A8"), calls, progress=cancel)
    assert "quantize weights" in seen
    assert_same_state(unet, before)


def test_interrupted_save_leaves_no_partial_file(unet, calls, tmp_path, monkeypatch):
    import safetensors.torch as stt

    q = quantize(unet, QuantConfig.preset("W8A8"), calls)

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(stt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save(q, str(tmp_path / "out.safetensors"))
    assert os.listdir(tmp_path) == []


def test_nan_in_calibration_data_is_named(unet):
    with pytest.raises(NumericalError, match="NaN"):
        with CallRecorder(unet):
            unet(torch.full((1, 1, 16, 16), float("nan")), torch.tensor([10]), class_labels=torch.tensor([1]))


def test_settings_validated_before_work(unet, calls):
    before = state_copy(unet)
    for kw in (dict(w_bits=0), dict(a_bits=9), dict(w_group_size=7), dict(time_bins=5000)):
        with pytest.raises(ConfigError):
            quantize(unet, QuantConfig(**kw), calls)
    assert_same_state(unet, before)
