import os

from lowbit.cli import main


def test_demo_writes_table_and_grid(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--samples", "20", "--steps", "5", "--bits", "W8A8", "W4A8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| full precision | fp32 |" in out and "| naive | W4A8 |" in out
    assert os.path.getsize(tmp_path / "demo_grid.png") > 100


def test_quantize_command_saves_and_refuses_overwrite(tmp_path, capsys):
    p = str(tmp_path / "q.safetensors")
    args = ["quantize", p, "--bits", "W8A8", "--method", "naive", "--calib-samples", "4", "--calib-steps", "3"]
    assert main(args) == 0
    assert os.path.exists(p)
    mtime = os.path.getmtime(p)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.getmtime(p) == mtime


def test_bad_bits_give_a_clear_error(tmp_path, capsys):
    rc = main(["quantize", str(tmp_path / "x.safetensors"), "--bits", "W9A8", "--calib-samples", "2",
               "--calib-steps", "2"])
    assert rc == 2
    assert "w_bits=9" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")
