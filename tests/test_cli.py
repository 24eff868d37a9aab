"""The command line: each bad input is refused in a fresh process with one line naming the problem and the fix,
exit status 2, before any work (before torch is even imported) and without writing anything; --help is fast
and shows choices and defaults; inspect reads a saved file; quantize and demo report their stages."""
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from lowbit.cli import build_parser, main

# Runs main() in a child and reports whether torch got imported (the proof that no work started).
CHILD = r"""
import json, os, sys
from lowbit.cli import main
rc = 0
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 1
with open(os.environ["LOWBIT_TEST_REPORT"], "w") as f:
    json.dump({"torch": "torch" in sys.modules}, f)
sys.exit(rc)
"""
FAST_S = 15.0  # generous for a loaded 2-core machine; a refusal takes ~0.3 s, any real work takes far longer


def _safetensors(path, metadata=None):
    header = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0")


def _unet_dir(root, name, config=None, weights="text"):
    d = root / name
    d.mkdir()
    cfg = {"_class_name": "UNet2DModel", "in_channels": 1, "out_channels": 1, "sample_size": 16,
           "num_class_embeds": 11}
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    if weights == "text":
        (d / "diffusion_pytorch_model.safetensors").write_text("this is not a tensor file\n")
    elif weights == "bin":
        (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    elif weights == "ok":
        _safetensors(d / "diffusion_pytorch_model.safetensors")
    return d


@pytest.fixture
def ws(tmp_path):
    """A working folder with the inputs the bad cases point at."""
    w = tmp_path / "ws"
    w.mkdir()
    (w / "text.safetensors").write_text("plain text, named like a tensor file\n")
    (w / "exists.safetensors").write_bytes(b"keep me")
    (w / "adir.safetensors").mkdir()
    os.symlink("/nonexistent/x.safetensors", w / "dangling.safetensors")  # a link whose target is gone
    (w / "afile").write_text("x")
    _unet_dir(w, "unet_text_weights")
    _unet_dir(w, "unet_pickle", weights="bin")
    _unet_dir(w, "unet_cond", config={"_class_name": "UNet2DConditionModel"}, weights="ok")
    _unet_dir(w, "unet_rgb", config={"in_channels": 4, "out_channels": 4}, weights="ok")
    (w / "unet_noconfig").mkdir()
    _unet_dir(w, "unet_ok", weights="ok")  # (a UNet the CLI would quantize)
    (w / "unet_ok" / "link.safetensors").symlink_to(w / "unet_ok" / "diffusion_pytorch_model.safetensors")
    variant = _unet_dir(w, "unet_variant", weights="ok")
    (variant / "diffusion_pytorch_model.safetensors").rename(variant / "diffusion_pytorch_model.fp16.safetensors")
    (w / "pipe").mkdir()
    (w / "pipe" / "model_index.json").write_text("{}")
    _safetensors(w / "plain.safetensors", metadata={"format": "pt"})
    _safetensors(w / "future.safetensors", metadata={"lowbit": json.dumps({"format_version": 99})})
    _safetensors(w / "twice.safetensors", metadata={"lowbit": '{"format_version": 3, "format_version": 1}'})
    (w / "outdir").mkdir()
    (w / "outdir" / "demo_grid.png").write_bytes(b"a user's file")
    (w / "outdir2" / "demo_grid.png").mkdir(parents=True)
    _safetensors(w / "cut.safetensors")
    (w / "cut.safetensors").write_bytes((w / "cut.safetensors").read_bytes()[:20])  # cut inside its header
    return w


def _snapshot(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


BAD = [
    # (argv, words the one line must contain)
    (["quantize", "q.safetensors", "--unet", "missing_dir"], ["--unet", "no such folder", "UNet2DModel folder"]),
    (["quantize", "q.safetensors", "--unet", "text.safetensors"], ["--unet", "is a file"]),
    (["quantize", "q.safetensors", "--unet", "unet_text_weights"], ["not a safetensors file"]),
    (["quantize", "q.safetensors", "--unet", "unet_pickle"], ["pickle", "safe_serialization=True"]),
    (["quantize", "q.safetensors", "--unet", "unet_noconfig"], ["config.json"]),
    (["quantize", "q.safetensors", "--unet", "unet_cond"], ["UNet2DConditionModel", "UNet2DModel only"]),
    (["quantize", "q.safetensors", "--unet", "unet_rgb"], ["in_channels=4", "needs 1"]),
    # the model being read is never the output, --overwrite or not (it wrote over the float checkpoint)
    (["quantize", "unet_ok/diffusion_pytorch_model.safetensors", "--unet", "unet_ok", "--overwrite"],
     ["is a file of the --unet model", "--overwrite never replaces the input"]),
    (["quantize", "unet_ok/link.safetensors", "--unet", "unet_ok", "--overwrite"], ["is a file of the --unet model"]),
    (["export", "--comfy", "plain.safetensors", "unet_ok/diffusion_pytorch_model.safetensors", "--unet", "unet_ok",
      "--overwrite"], ["is a file of the --unet model"]),
    (["quantize", "q.safetensors", "--unet", "unet_variant"],
     ["only the variant file diffusion_pytorch_model.fp16.safetensors", "without variant"]),
    (["quantize", "q.safetensors", "--unet", "pipe"], ["pipeline folder", "--unet pipe/unet"]),
    (["quantize", "q.safetensors", "--precision", "rules", "--size-budget", "0.5"],
     ["--size-budget 0.5 applies to --precision measured only"]),  # (it was ignored without a word)
    (["demo", "--precision", "rules", "--size-budget", "0.1"], ["--size-budget 0.1 applies to --precision measured"]),
    (["quantize", "q.safetensors", "--calib-samples", "0"], ["--calib-samples", "0 is out of range", "1..1024"]),
    (["demo", "--samples", "1"], ["--samples", "1 is out of range", "2..100_000"]),  # FID needs two samples
    (["demo", "--out", "outdir"], ["demo_grid.png already exists", "--overwrite"]),  # never replaced silently
    (["demo", "--out", "outdir2"], ["demo_grid.png is a folder"]),
    (["demo", "--out", ""], ["--out is empty", "--out out"]),
    (["inspect", "cut.safetensors"], ["header runs past the end of the file", "truncated"]),  # load's words
    (["ui", "--host", "999.1.1.1"], ["--host '999.1.1.1' is not an IP address", "127.0.0.1"]),
    (["export", "--comfy", "plain.safetensors", "o.safetensors", "--prefix", "model.diffusion_model"],
     ["--prefix 'model.diffusion_model'", "ending in '.'", "did you mean model.diffusion_model.?"]),
    (["export", "--comfy", "plain.safetensors", "o.safetensors", "--prefix", "bad prefix"], ["--prefix 'bad prefix'"]),
    (["demo", "--bits", "W8A8", "W4A16", "--methods", "recon+ptqd+vsc+mixed"],
     ["--bits W4A16 with --method recon+ptqd+vsc+mixed", "weight-only"]),
    (["quantize", "q.safetensors", "--bits", "W4A16", "--method", "recon+ptqd+vsc+mixed"],
     ["--bits W4A16 with --method recon+ptqd+vsc+mixed", "weight-only", "W4A8"]),
    (["quantize", "q.safetensors", "--calib-samples", "-5"], ["--calib-samples", "-5 is out of range"]),
    (["quantize", "q.safetensors", "--calib-samples", "many"], ["--calib-samples", "not a whole number"]),
    (["quantize", "q.safetensors", "--calib-steps", "-5"], ["--calib-steps", "out of range", "1..1000"]),
    (["quantize", "q.safetensors", "--bits", "W9A8"], ["--bits", "w_bits=9", "W4A8"]),
    (["quantize", "q.safetensors", "--bits", "W3A8"], ["--bits", "not a supported format", "W4A8"]),
    (["quantize", "q.safetensors", "--bits", "int4"], ["--bits", "W<bits>A<bits>"]),
    (["quantize", "q.safetensors", "--method", "best"], ["--method", "unknown method 'best'", "recon+ptqd"]),
    (["quantize", "q.txt"], ["must end in .safetensors", "q.safetensors"]),
    (["quantize", "no_such_dir/q.safetensors"], ["does not exist", "mkdir -p"]),
    (["quantize", "exists.safetensors"], ["already exists", "--overwrite"]),
    (["quantize", "adir.safetensors"], ["is a folder"]),
    (["quantize", "afile/q.safetensors"], ["does not exist"]),
    (["quantize"], ["required", "OUTPUT.safetensors"]),
    (["demo", "--samples", "0"], ["--samples", "out of range"]),
    (["demo", "--steps", "0"], ["--steps", "out of range", "1..1000"]),
    (["demo", "--out", "afile"], ["--out", "is a file"]),
    (["demo", "--out", "no_such_dir/out"], ["--out", "does not exist"]),
    (["demo", "--bits", "W8A8", "W9A8"], ["--bits", "w_bits=9"]),
    (["demo", "--methods", "naive", "magic"], ["--methods", "unknown method 'magic'"]),
    (["ui", "--port", "99999"], ["--port", "out of range", "1..65535"]),
    (["ui", "--port", "0"], ["--port", "out of range"]),
    (["inspect", "missing.safetensors"], ["no such file"]),
    (["inspect", "adir.safetensors"], ["is a folder"]),
    (["inspect", "dangling.safetensors"], ["broken symbolic link", "-> /nonexistent/x.safetensors"]),
    (["export", "--comfy", "missing.safetensors", "out.safetensors"], ["input missing.safetensors: no such file"]),
    (["export", "--comfy", "plain.safetensors", "plain.safetensors", "--overwrite"], ["is the input file"]),
    (["export", "--comfy", "plain.safetensors", "plain.safetensors"], ["is the input file"]),
    (["inspect", "text.safetensors"], ["not a safetensors file"]),
    (["export", "plain.safetensors", "out.safetensors"], ["required", "--comfy"]),
    (["export", "--comfy", "text.safetensors", "out.safetensors"], ["input", "not a safetensors file"]),
    (["export", "--comfy", "plain.safetensors", "exists.safetensors"], ["already exists", "--overwrite"]),
    # checked before torch loads (it took 4.5 s to refuse these)
    (["export", "--comfy", "plain.safetensors", "out.safetensors"], ["not a LowBit quantized file", "lowbit quantize"]),
    (["export", "--comfy", "future.safetensors", "out.safetensors"], ["format version 99", "1..5"]),
    (["export", "--comfy", "twice.safetensors", "out.safetensors"], ["'format_version' appears twice", "corrupt"]),
    (["export", "--comfy", "plain.safetensors", "plain.safetensors", "--overwrite"], ["is the input file"]),
    (["frobnicate"], ["invalid choice", "quantize"]),
    ([], ["required"]),
]
if os.path.isdir("/proc") and not os.access("/proc", os.W_OK):  # a read-only place even for root
    BAD += [(["quantize", "/proc/q.safetensors"], ["cannot write", "writable"]),
            (["demo", "--out", "/proc/lowbit-demo"], ["--out", "cannot write", "writable"])]


def _run(argv, cwd, tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, LOWBIT_TEST_REPORT=str(report))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    dt = time.monotonic() - t0
    rep = json.loads(report.read_text())
    report.unlink()
    return r, dt, rep


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_input_one_line_exit_2_before_any_work(ws, tmp_path, argv, words):
    before = _snapshot(ws)
    r, dt, rep = _run(argv, ws, tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    err = r.stderr.rstrip("\n")
    assert err and "\n" not in err, f"not one line:\n{r.stderr}"
    assert err.startswith("lowbit") and "error:" in err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert dt < FAST_S, f"took {dt:.1f} s"
    assert not rep["torch"], "torch was imported: work started before the input was checked"
    assert _snapshot(ws) == before, "something was written"


def _comfy_file(path, layers=None, version="1.0", offsets=(0, 4), data=4, export=True, raw_qm=None):
    """A small file in ComfyUI's quantized layout: one int8 tensor ``x.weight`` [4], crafted as asked."""
    qm = raw_qm if raw_qm is not None else json.dumps({"format_version": version,
                                                      "layers": {"x": {"format": "int8_tensorwise"}}
                                                      if layers is None else layers})
    meta = {"_quantization_metadata": qm}
    if export:
        meta["lowbit_export"] = json.dumps({"dropped": ["a line"], "float_layers": {}})
    header = {"x.weight": {"dtype": "I8", "shape": [4], "data_offsets": list(offsets)}, "__metadata__": meta}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * data)


COMFY_BAD = [  # (file's crafting, words of the one-line error)
    (dict(layers={"x": {}}), ["malformed", "'x' has no format name", "export it again"]),
    (dict(layers={"x": {"format": ""}}, export=False), ["no format name", "not a ComfyUI quantized checkpoint"]),
    (dict(offsets=("0", "4")), ["inconsistent offsets"]),
    (dict(offsets=(4, 0)), ["inconsistent offsets"]),
    (dict(offsets=(0, 400)), ["inconsistent offsets"]),
    (dict(data=2), ["bytes, found"]),
    (dict(version=1.0), ["format_version is not a string"]),
    (dict(raw_qm='{"format_version": NaN, "layers": {}}'), ["not valid JSON"]),
    (dict(raw_qm="[" * 40 + "]" * 40), ["nested deeper"]),
]


@pytest.mark.parametrize("craft,words", COMFY_BAD, ids=[str(i) for i in range(len(COMFY_BAD))])
def test_malformed_comfy_layout_file_is_refused_by_inspect_in_one_line(ws, tmp_path, craft, words):
    # a file in ComfyUI's quantized layout (as lowbit export --comfy writes) with one field made wrong: refused
    # before any work, one line, exit 2, torch not imported; the advice to export again only for LowBit's exports
    _comfy_file(ws / "badcomfy.safetensors", **craft)
    before = _snapshot(ws)
    r, dt, rep = _run(["inspect", "badcomfy.safetensors"], ws, tmp_path)
    err = r.stderr.rstrip("\n")
    assert r.returncode == 2 and r.stdout == "" and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not rep["torch"]
    assert _snapshot(ws) == before


def test_comfy_layout_file_of_another_tool_inspects(ws, tmp_path):
    _comfy_file(ws / "other.safetensors", export=False)
    r, _, rep = _run(["inspect", "other.safetensors"], ws, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "another tool" in r.stdout and "1 quantized layers" in r.stdout and "int8_tensorwise" in r.stdout
    assert not rep["torch"]


def test_non_lowbit_file_is_refused_by_inspect_in_one_line(ws, tmp_path):
    # a valid safetensors without LowBit metadata: the core's reader refuses it (this one imports torch)
    before = _snapshot(ws)
    r, dt, _ = _run(["inspect", "plain.safetensors"], ws, tmp_path)
    err = r.stderr.rstrip("\n")
    assert r.returncode == 2 and r.stdout == "" and "\n" not in err
    assert "no LowBit metadata" in err
    assert _snapshot(ws) == before


def test_help_is_fast_lists_choices_and_defaults(tmp_path):
    report = tmp_path / "r.json"
    for argv in ([], ["demo"], ["quantize"], ["inspect"], ["ui"]):
        r, dt, rep = _run(argv + ["--help"], tmp_path, tmp_path)
        assert r.returncode == 0 and "usage: lowbit" in r.stdout
        assert not rep["torch"], "--help imported torch (slow): keep the CLI's imports lazy"
        assert dt < FAST_S
    assert not report.exists()
    r = subprocess.run([sys.executable, "-m", "lowbit", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "lowbit inspect FILE" in r.stdout
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in subs.choices.items():
        for act in sp._actions:
            if act.option_strings and act.dest != "help":
                assert act.help and "default" in act.help, (name, act.option_strings, act.help)
    q = subs.choices["quantize"].format_help()
    for w in ("W8A8", "W4A8", "W4A16", "recon+ptqd+vsc", "naive", "1..1024", "default: 32"):
        assert w in q, w


def test_demo_writes_table_and_grid(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--samples", "20", "--steps", "5", "--bits", "W8A8", "W4A8",
               "--methods", "naive", "--precision", "rules"])  # (the CLI's plumbing; quality is the zoo bench's)
    assert rc == 0
    cap = capsys.readouterr()
    assert "| full precision | fp32 |" in cap.out and "| naive | W4A8 |" in cap.out
    assert "sampling s: one run per model" in cap.out and "bench_sampling" in cap.out  # the timing is explained
    assert os.path.getsize(tmp_path / "demo_grid.png") > 100
    assert "sample (ddim)" in cap.err  # the core's stage names reach the terminal
    # which model each stage is for, the quantization included (it ran silently)
    assert "full precision: sample (ddim)" in cap.err and "W4A8 naive: sample (ddim)" in cap.err
    assert [ln for ln in cap.err.splitlines() if "W8A8 naive:" in ln and "sample (ddim)" not in ln]


def test_quantize_command_saves_reports_stages_refuses_overwrite_and_inspects(tmp_path, capsys):
    p = str(tmp_path / "q.safetensors")
    args = ["quantize", p, "--bits", "W8A8", "--method", "naive", "--calib-samples", "4", "--calib-steps", "3"]
    assert main(args) == 0
    assert os.path.exists(p)
    err = capsys.readouterr().err
    for stage in ("recording calibration", "sample (ddim)", "quantizing to W8A8 with naive", "saving"):
        assert stage in err, stage
    assert "kernel check" not in err  # saved, not run: no whole-model kernel check (loading arms the tuner again)
    mtime = os.path.getmtime(p)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.path.getmtime(p) == mtime

    from lowbit.quant import read_header

    header, _ = read_header(p)
    assert main(["inspect", p]) == 0
    out = capsys.readouterr().out
    assert "lowbit.quantized_unet" in out and f"{len(header['layers'])} quantized layers" in out
    assert "QuantConfig" in out and "w_bits=8" in out and "W8A8" in out
    # the method's name is not in the file: the line says what the file holds, not "method ..." (README)
    assert "holds      quantized (W8A8)" in out and "\nmethod " not in out and "loads      yes" in out
    assert "format     lowbit.quantized_unet v5\n" in out and "profile    diffusers-unet" in out
    assert main(["inspect", p, "--layers"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in header["layers"])
    assert main(["inspect", p, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == header["layers"]
    c = str(tmp_path / "comfy.safetensors")
    assert header.get("arch")  # a file that records its architecture: exported from the model it builds
    assert main(["export", "--comfy", p, c]) == 0  # ComfyUI's native layout, with what it drops
    out = capsys.readouterr().out
    assert "int8_tensorwise" in out and "dropped:" in out
    from safetensors import safe_open

    with safe_open(c, "pt") as f:
        meta = f.metadata() or {}
        assert "_quantization_metadata" in meta
    # inspect reads the ComfyUI layout too: its formats, the export's dropped lines, every layer with --layers
    qm, ex = json.loads(meta["_quantization_metadata"]), json.loads(meta["lowbit_export"])
    assert main(["inspect", c]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI quantized layout" in out and "lowbit export --comfy" in out
    assert f"{len(qm['layers'])} quantized layers" in out and "int8_tensorwise" in out
    assert sum(ln.startswith("dropped    ") for ln in out.splitlines()) == len(ex["dropped"]) > 0
    assert main(["inspect", c, "--layers"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list(qm["layers"]) + list(ex["float_layers"]))
    assert main(["inspect", c, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"_quantization_metadata": qm, "lowbit_export": ex}


def test_bad_bits_give_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tmp_path / "x.safetensors"), "--bits", "W9A8", "--calib-samples", "2",
              "--calib-steps", "2"])
    assert e.value.code == 2
    assert "w_bits=9" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_precision_options_reach_the_plan(tmp_path, capsys):
    """--size-budget 0: nothing may be kept above the target; --precision rules: the profile's name rules (the
    edge convolutions at 8 bits), not measurement."""
    from lowbit.quant import read_header

    base = ["--bits", "W4A8", "--method", "naive", "--calib-samples", "4", "--calib-steps", "3"]
    bits = {}
    for name, extra in (("zero", ["--size-budget", "0"]), ("rules", ["--precision", "rules"])):
        p = str(tmp_path / f"{name}.safetensors")
        assert main(["quantize", p, *base, *extra]) == 0
        bits[name] = {n: m["w_bits"] for n, m in read_header(p)[0]["layers"].items()}
    capsys.readouterr()
    assert set(bits["zero"].values()) == {4}
    assert bits["rules"]["conv_in"] == 8 and bits["rules"]["conv_out"] == 8
    assert 4 in bits["rules"].values()
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tmp_path / "x.safetensors"), "--size-budget", "1.5"])
    assert exc.value.code == 2
    assert "out of range" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_inspect_shows_a_crafted_header_escaped_and_survives_fields_of_the_wrong_type(tmp_path, capsys):
    """Header strings are the file's: control characters are printed escaped (a crafted one must not drive the
    terminal), and a field of the wrong type (splits, rules, a layer's shape as numbers) is shown, not a traceback."""
    import json

    import torch
    from safetensors.torch import save_file

    from lowbit.quant.io import FORMAT

    h = {"format": FORMAT, "format_version": 3, "method": "\x1b[2Jcleared\x07", "splits": 5,
         "config": {"_type": "QuantConfig", "_version": 1, "_data": {"rules": 5, "w_bits": 4, "a_bits": 8}},
         "layers": {"conv\x1b[31m": {"shape": 5, "kind": "conv"}}, "model": {"cls": "X\x1b]0;title\x07"}}
    p = str(tmp_path / "crafted.safetensors")
    save_file({"x": torch.zeros(1)}, p, metadata={"lowbit": json.dumps(h)})
    for argv in (["inspect", p], ["inspect", p, "--layers"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b[2Jcleared\\x07" in out and "rules=5" in out


def test_inspect_json_prints_the_header_as_written(capsys):
    """--json is the file's own header: a version-1 file shows version 1 (it showed the header migrated to today's
    version, with fields the file does not hold)."""
    import json
    from pathlib import Path

    p = str(Path(__file__).parent / "fixtures" / "fmt1_w8a8.safetensors")
    assert main(["inspect", p, "--json"]) == 0
    h = json.loads(capsys.readouterr().out)
    assert h["format_version"] == 1 and "_migrated_from" not in h and "arch" not in h
    assert main(["inspect", p]) == 0  # the summary still reads it through today's reader
    out = capsys.readouterr().out
    assert "quantized layers" in out and "v1 (read as v5)" in out and "profile    not recorded (format < 4)" in out


def _users_unet_and_file(tmp_path, widths):
    """A user's own small diffusers UNet2DModel (RGB, 8x8; ``widths``: its block_out_channels) saved to
    ``tmp_path/myunet``, and its W8A8 quantization (dynamic activations) saved without a recorded architecture to
    ``tmp_path/q.safetensors``: (folder, file)."""
    import torch
    from diffusers import UNet2DModel

    from lowbit.quant import QuantConfig, quantize, save

    torch.manual_seed(0)
    fp = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                     norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    folder = tmp_path / "myunet"
    fp.save_pretrained(folder, safe_serialization=True)
    p = str(tmp_path / "q.safetensors")
    save(quantize(fp, QuantConfig.preset("W8A8", a_dynamic=True)), p, arch=False)
    return folder, p


def test_export_takes_a_users_unet_of_any_size(tmp_path, capsys):
    """``export --unet`` only loads the file onto the named float UNet: it no longer asks for the embedded model's
    sample size and class embeddings (which ``quantize`` needs for its calibration sampling), so a file quantized
    from the user's own UNet through the library exports; a file without a recorded architecture is loaded onto
    --unet."""
    folder, p = _users_unet_and_file(tmp_path, (8, 16))
    c = str(tmp_path / "c.safetensors")
    assert main(["export", "--comfy", p, c, "--unet", str(folder)]) == 0
    assert os.path.getsize(c) > 0 and "wrote" in capsys.readouterr().out


def test_export_gguf_writes_a_gguf_file_and_refuses_bad_targets_before_work(tmp_path, capsys):
    """``export --gguf ARCH IN OUT.gguf``: the file's architecture field is ARCH and its quantized layers are GGML
    blocks; a name without .gguf, an unknown ARCH, --w4-layout (a ComfyUI-layout option) and no target at all are
    refused in one line, nothing written. ``inspect`` reads the file's header without torch."""
    from lowbit.quant.export_gguf import read_gguf

    folder, p = _users_unet_and_file(tmp_path, (32, 64))
    g = str(tmp_path / "q.gguf")
    before = sorted(os.listdir(tmp_path))
    for argv, msg in ((["export", "--gguf", "sd1", p, str(tmp_path / "q.safetensors2")], "must end in .gguf"),
                      (["export", "--gguf", "sd15", p, g], "invalid choice"),
                      (["export", "--gguf", "sd1", "--w4-layout", "int8_tensorwise", p, g], "--w4-layout"),
                      (["export", p, g], "one of the arguments --comfy --gguf is required")):
        try:
            code = main(argv + ["--unet", str(folder)])
        except SystemExit as exc:  # (argparse's own refusals)
            code = exc.code
        assert code == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "lowbit export: error" in ln]
        assert len(err) == 1 and msg in err[0], err  # (other lines: torch's own import warnings)
    assert sorted(os.listdir(tmp_path)) == before
    assert main(["export", "--gguf", "sd1", p, g, "--unet", str(folder)]) == 0
    assert "GGUF export" in capsys.readouterr().out
    fields, tensors = read_gguf(g)
    assert fields["general.architecture"] == "sd1"
    assert {t[0] for t in tensors.values()} >= {"Q8_0", "F32"}
    # inspect reads its header without torch; a cut copy is refused in one line
    r, dt, rep = _run(["inspect", g], str(tmp_path), tmp_path)
    assert r.returncode == 0 and not rep["torch"], r.stderr
    n_q = sum(t[0] == "Q8_0" for t in tensors.values())
    assert "format     GGUF (written by lowbit export" in r.stdout and "arch       sd1" in r.stdout
    assert f"{n_q} Q8_0" in r.stdout and "dropped    activation quantization" in r.stdout
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(g, "rb").read()[:2000])
    r, dt, rep = _run(["inspect", str(cut)], str(tmp_path), tmp_path)
    assert r.returncode == 2 and not rep["torch"] and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cut" in r.stderr or "truncated" in r.stderr


def test_write_grid_is_atomic_never_clobbers_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """The demo grid is written like LowBit's safetensors files: a failed write leaves no (0-byte) PNG that would
    block the next run, and a file that appeared during the run is kept."""
    import errno

    from PIL import Image

    from lowbit import recipes
    from lowbit.quant.io import SaveError

    img = Image.new("L", (4, 4))
    path = str(tmp_path / "demo_grid.png")
    recipes.write_grid(img, path)
    assert Image.open(path).size == (4, 4) and os.listdir(tmp_path) == ["demo_grid.png"]
    with pytest.raises(FileExistsError, match="appeared during the run"):
        recipes.write_grid(Image.new("L", (8, 8)), path)
    assert Image.open(path).size == (4, 4)

    def full(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    other = str(tmp_path / "other.png")
    with pytest.raises(SaveError) as ei:
        recipes.write_grid(img, other)
    assert "\n" not in str(ei.value) and other in str(ei.value) and "No space left" in str(ei.value)
    assert os.listdir(tmp_path) == ["demo_grid.png"]


def test_demo_prints_the_table_before_a_failed_grid_save(tmp_path, capsys, monkeypatch):
    """A grid that cannot be written costs the grid only: the results table is already on the screen, the error is
    one line naming the file, exit status 1."""
    from lowbit import recipes
    from lowbit.quant.io import SaveError

    row = dict(model="full precision", bits="fp32", weight_bytes=100, fid=1.0, acc=0.5, seconds=1.0)

    def fake_demo(out_dir, on_rows=None, **kw):
        on_rows([row])
        raise SaveError(f"cannot save {out_dir}/demo_grid.png: writing failed (No space left on device)")

    monkeypatch.setattr(recipes, "demo", fake_demo)
    rc = main(["demo", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "| full precision | fp32 |" in cap.out
    last = cap.err.strip().splitlines()[-1]
    assert "demo_grid.png" in last and "No space left" in last and "Traceback" not in cap.err


def test_unet_whose_weights_do_not_fit_its_config_is_one_line(tmp_path, capsys):
    """diffusers' multi-line ``Cannot load ... expected shape`` (a config.json edited or copied from another model)
    is one line naming the folder and the mismatch, for quantize and export."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    kw = dict(sample_size=16, in_channels=1, out_channels=1, num_class_embeds=11, layers_per_block=1,
              norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path / "unet"
    UNet2DModel(block_out_channels=(8, 16), **kw).save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [16, 16]  # the weights are for (8, 16)
    (folder / "config.json").write_text(json.dumps(cfg))
    out = str(tmp_path / "q.safetensors")
    assert main(["quantize", out, "--unet", str(folder), "--calib-samples", "2", "--calib-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(folder) in err and "expected shape" in err and "config.json" in err and "If you want" not in err
    assert not os.path.exists(out)


@pytest.mark.parametrize("change, words", [
    (dict(arch={"library": "diffusers", "class": "os.system", "config": {}}), ["arch class 'os.system'"]),
    (dict(arch={"library": "builtins", "class": "UNet2DModel", "config": {}}), ["arch library 'builtins'"]),
    (dict(config={"_type": "subprocess.Popen", "_version": 1, "_data": {}}), ["its config is not valid"]),
    ({}, []),
])
def test_inspect_says_what_loading_says_about_a_crafted_header(tmp_path, capsys, change, words):
    """inspect called a header with arch.class "os.system" loadable standalone ("standalone yes") while load refuses
    it: it now runs loading's header checks (io.check_header) and prints loading's own words."""
    import torch
    from safetensors.torch import save_file

    from lowbit.quant.io import FORMAT

    h = {"format": FORMAT, "format_version": 3, "layers": {"conv_in": {"kind": "QuantConv2d"}},
         "float_tensors": ["x"], "arch": None, "config": None, "tensor_sha256": {}}  # (format 2 on: checksums)
    h.update(change)
    p = str(tmp_path / "crafted.safetensors")
    save_file({"__float__.x": torch.zeros(1)}, p, metadata={"lowbit": json.dumps(h)})
    assert main(["inspect", p]) == 0
    out = capsys.readouterr().out
    if words:
        assert "standalone yes" not in out and "loads      no: cannot load" in out
        for w in words:
            assert w in out, (w, out)
    else:
        assert "loads      yes" in out


def test_progress_lines_name_the_stage_and_the_time_left(monkeypatch):
    """A long stage's line says how long it has run and, from two seconds on, about how long is left at its rate so
    far (the default quantize spends minutes in AdaRound: a line every 30 s with no end in sight, found by audit)."""
    import io

    from lowbit import cli

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "time", lambda: clock[0])
    out = io.StringIO()
    p = cli.Progress(out)
    p(0, 100, {"stage": "reconstruct (AdaRound)"})
    clock[0] += 40.0
    p(20, 100, {"stage": "reconstruct (AdaRound)", "loss": 0.5})
    clock[0] += 120.0
    p(100, 100, {"stage": "reconstruct (AdaRound)"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "  reconstruct (AdaRound): 0/100 (0.0 s)"
    assert lines[1] == "  reconstruct (AdaRound): 20/100 (40.0 s, about 160 s left) loss=0.5"
    assert lines[2] == "  reconstruct (AdaRound): 100/100 (160.0 s)"


def test_progress_counts_a_stages_first_step_when_it_reports_finished_steps_only(monkeypatch):
    """A sampler reports 1/N after its first step (no 0/N): the stage's clock starts when the previous event ended,
    so the first step's time (generate's first quantized step includes the kernel autotuning) is counted; it showed
    '1/4 (0.0 s)' (found by audit)."""
    import io

    from lowbit import cli

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "time", lambda: clock[0])
    out = io.StringIO()
    p = cli.Progress(out)
    p.banner("sampling")
    clock[0] += 15.0  # (the first step, with tuning)
    p(1, 4, {"stage": "sample quantized"})
    clock[0] += 3.0
    p(4, 4, {"stage": "sample quantized"})
    lines = out.getvalue().splitlines()
    assert lines[-1] == "  sample quantized: 4/4 (18.0 s)"


def test_kernels_lists_every_backend_with_its_state(capsys, monkeypatch):
    """`lowbit kernels`: every registered backend, highest priority first, ready / disabled / unavailable with the
    reason (a disabled one is not built or probed); --json gives the same rows."""
    from lowbit.kernels import registry

    monkeypatch.setenv("LOWBIT_DISABLE_BACKENDS", "cpu")
    assert main(["kernels", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [b.name for b in registry.backends()]
    by = {r["name"]: r for r in rows}
    assert by["cpu"]["state"] == "disabled" and "LOWBIT_DISABLE_BACKENDS" in by["cpu"]["why"]
    assert by["eager"]["state"] == by["dense"]["state"] == "ready"
    import torch

    assert (by["triton"]["state"] == "ready") == torch.cuda.is_available() if "triton" in by else True
    assert all(r["state"] in ("ready", "disabled", "unavailable") and (r["state"] == "ready") == (not r["why"])
               for r in rows)
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("backend") and any(ln.startswith("cpu ") and "disabled" in ln for ln in out)
