"""quant/sthdr.py, the torch-free safetensors header checks: what a crafted index or JSON must not get past."""
import pytest

from lowbit.quant import sthdr


def _entry(a, b, n):
    return {"dtype": "F32", "shape": [n], "data_offsets": [a, b]}


def test_tensors_must_tile_the_data():
    ok = {"x": _entry(0, 16, 4), "y": _entry(16, 24, 2)}
    sthdr.check_index(ok, 100, 124)
    sthdr.check_index({"y": ok["y"], "x": ok["x"]}, 100, 124)  # any order in the header
    with pytest.raises(ValueError, match="overlaps"):  # two names on the same bytes: safetensors refuses it
        sthdr.check_index({"x": _entry(0, 16, 4), "y": _entry(8, 16, 2)}, 100, 116)
    with pytest.raises(ValueError, match="no tensor owns"):  # hidden bytes before a tensor
        sthdr.check_index({"x": _entry(0, 16, 4), "y": _entry(4112, 4120, 2)}, 100, 4220)
    with pytest.raises(sthdr.Length):
        sthdr.check_index(ok, 100, 125)


def test_json_keys_appear_once():
    assert sthdr.parse_json('{"a": 1, "b": {"a": 2}}', "h") == {"a": 1, "b": {"a": 2}}
    with pytest.raises(ValueError, match="appears twice"):
        sthdr.parse_json('{"a": 1, "b": 2, "a": 3}', "the header")
