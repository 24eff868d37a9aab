"""The package's __init__ under ComfyUI: a node import that fails is ComfyUI's to report (it lists the pack as
IMPORT FAILED); in a library import where ComfyUI is merely installed, it only disables the nodes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, types, importlib, importlib.util, logging
logging.basicConfig(level=logging.ERROR, format="LOG %(message)s")
stubs = sys.argv[1]
sys.path.insert(0, stubs)
if sys.argv[2] == "comfyui":
    import folder_paths  # ComfyUI imports it before it loads custom nodes
sys.modules["lowbit.nodes"] = None  # the node import fails
try:
    import lowbit
    print("IMPORTED", lowbit.NODE_CLASS_MAPPINGS)
except ImportError as e:
    print("RAISED", type(e).__name__)
"""


def _run(tmp_path, mode):
    stubs = tmp_path / "stubs"
    (stubs / "comfy").mkdir(parents=True, exist_ok=True)
    (stubs / "comfy" / "__init__.py").write_text("")
    (stubs / "folder_paths.py").write_text("")
    r = subprocess.run([sys.executable, "-c", CHILD, str(stubs), mode], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=120)
    return r.stdout + r.stderr


def test_failed_node_import_is_raised_to_comfyui(tmp_path):
    assert "RAISED" in _run(tmp_path, "comfyui")  # (ModuleNotFoundError: the stubbed failure)


def test_failed_node_import_only_disables_the_nodes_in_a_library_import(tmp_path):
    out = _run(tmp_path, "library")
    assert "IMPORTED {}" in out and "the pack is disabled" in out
