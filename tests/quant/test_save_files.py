"""Saving (issue 15 item 5): atomic no-clobber, nothing left behind after SIGKILL that the next save does not remove,
mode from the umask, a clear error for a missing folder."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from lowbit.quant import LowBitError, QuantConfig, load, quantize, save
from lowbit.quant import io as qio

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def qmodel(unet):
    return quantize(unet, QuantConfig.preset("W8A16"))  # weight-only: no calibration needed


def _temps(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_sigkill_during_save_is_cleaned_by_the_next_save(qmodel, unet, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {HERE!r})
        import safetensors.torch as stt
        from qutil import tiny_unet
        from lowbit.quant import QuantConfig, quantize, save

        q = quantize(tiny_unet(), QuantConfig.preset("W8A16"))
        real = stt.save_file

        def killed(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)  # half written
            os.kill(os.getpid(), signal.SIGKILL)

        stt.save_file = killed
        save(q, {str(tmp_path / "a.safetensors")!r})
    """)
    # cwd outside the repository root: `python -c` puts the cwd first on sys.path, and the root's kernels/ folder
    # would shadow the PyPI package `kernels` that diffusers -> transformers imports
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (tmp_path / "a.safetensors").exists()  # the final name never holds a partial file
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".a.safetensors.lowbit-")
    # the leftover is not a file anyone loads, and the next save into the folder removes it
    p = save(qmodel, str(tmp_path / "b.safetensors"))
    assert _temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors"]
    load(unet, p)


def test_live_process_temp_files_are_kept(qmodel, tmp_path):
    mine = tmp_path / f".x.safetensors.lowbit-{os.getpid()}-0123abcd.tmp"
    mine.write_bytes(b"in progress")
    save(qmodel, str(tmp_path / "c.safetensors"))
    assert mine.exists()


def test_no_clobber_when_the_name_appears_during_the_save(qmodel, tmp_path, monkeypatch):
    dest = tmp_path / "race.safetensors"
    real = qio._collect

    def collect_then_race(m):
        out = real(m)
        dest.write_bytes(b"someone else's file")  # created after the early existence check
        return out

    monkeypatch.setattr(qio, "_collect", collect_then_race)
    with pytest.raises(FileExistsError, match="overwrite=True") as ei:
        save(qmodel, str(dest))
    assert isinstance(ei.value, LowBitError)
    assert dest.read_bytes() == b"someone else's file"
    assert _temps(tmp_path) == []


def test_overwrite_replaces(qmodel, unet, tmp_path):
    dest = tmp_path / "o.safetensors"
    dest.write_bytes(b"old")
    save(qmodel, str(dest), overwrite=True)
    load(unet, str(dest))
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(qmodel, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = save(qmodel, str(tmp_path / f"m{umask:o}.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == mode


def test_missing_folder_is_an_error_unless_asked(qmodel, tmp_path):
    p = tmp_path / "no" / "such" / "q.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist.*make_dirs=True") as ei:
        save(qmodel, str(p))
    assert isinstance(ei.value, LowBitError) and "\n" not in str(ei.value)
    assert not (tmp_path / "no").exists()
    save(qmodel, str(p), make_dirs=True)
    assert p.is_file()


def test_unwritable_folder_is_a_save_error_before_anything_is_written(qmodel):
    """A folder the process cannot write in (here /proc: no new files even for root) is a one-line SaveError that
    says so, not a raw OSError naming a hidden temporary file."""
    with pytest.raises(LowBitError, match=r"folder /proc.*choose a writable folder") as ei:
        save(qmodel, "/proc/lowbit-q.safetensors")
    assert isinstance(ei.value, OSError) and "\n" not in str(ei.value) and ".tmp" not in str(ei.value)


@pytest.mark.parametrize("how", ["safetensors", "oserror"])
def test_a_write_error_is_a_one_line_save_error_and_leaves_nothing(qmodel, tmp_path, monkeypatch, how):
    """A full disk while writing (safetensors wraps the OS error in its own SafetensorError) is a SaveError naming
    the file and the OS's reason, not the writer's traceback; no temporary or partial file is left."""
    import errno

    import safetensors
    import safetensors.torch as stt

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        if how == "safetensors":
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stt, "save_file", full)
    dest = tmp_path / "full.safetensors"
    with pytest.raises(qio.SaveError) as ei:
        save(qmodel, str(dest))
    msg = str(ei.value)
    assert "\n" not in msg and str(dest) in msg and "No space left on device" in msg
    assert os.listdir(tmp_path) == []


def test_save_refuses_a_name_that_is_not_safetensors_and_load_names_a_folder(qmodel, unet, tmp_path):
    """save(q, "a.pt") wrote safetensors under a pickle name (the CLI refuses it); load(model, folder) said "no such
    file"."""
    with pytest.raises(qio.SaveError, match=r"must end in \.safetensors, e\.g\. .*a\.safetensors"):
        save(qmodel, str(tmp_path / "a.pt"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(LowBitError, match="it is a folder"):
        load(unet, str(tmp_path))
