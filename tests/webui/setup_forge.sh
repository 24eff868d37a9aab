#!/usr/bin/env bash
# Install a headless, CPU-only, offline-capable Stable-Diffusion-WebUI Forge for the integration tests
# in tests/webui/ (docs: shared/spec/HOSTS.md section 6.2). Idempotent: re-running only redoes what is missing.
#
#   bash tests/webui/setup_forge.sh /work/forge          # then: FORGE_DIR=/work/forge pytest tests/webui
#
# Inputs (environment, all optional):
#   FORGE_VENV      venv to create/use                    (default: <dir>/../forge-venv)
#   FORGE_GIT_DIR   bare git dir of lllyasviel/stable-diffusion-webui-forge, used when <dir> has no launch.py
#   HFGUESS_GIT_DIR bare git dir of lllyasviel/huggingface_guess, for <dir>/repositories/huggingface_guess
#   PYTHON          interpreter for the venv             (default: python3.11, else python3)
# Forge's code is never copied into this repository; it lives in <dir> only.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <forge dir>   (e.g. $0 /work/forge)" >&2
    exit 2
fi
mkdir -p "$1"
FORGE_DIR="$(cd "$1" && pwd)"
FORGE_VENV="${FORGE_VENV:-$(dirname "$FORGE_DIR")/forge-venv}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FORGE_GIT_DIR="${FORGE_GIT_DIR:-/work/.mirror/lllyasviel+stable-diffusion-webui-forge/repo}"
HFGUESS_GIT_DIR="${HFGUESS_GIT_DIR:-/work/.mirror/lllyasviel+huggingface_guess/repo}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"

log() { echo "[setup_forge] $*"; }

export_tree() {  # export_tree <bare git dir> <dest> <what>
    local git_dir="$1" dest="$2" what="$3"
    if [[ ! -d "$git_dir" ]]; then
        echo "[setup_forge] $what source not found: $git_dir is not a git dir." >&2
        echo "[setup_forge] Fetch a snapshot of github.com/$what and set ${4} to its git dir, or put a checkout at $dest." >&2
        exit 1
    fi
    mkdir -p "$dest"
    git --git-dir="$git_dir" archive HEAD | tar -x -C "$dest"
    log "exported $what $(git --git-dir="$git_dir" rev-parse --short HEAD) to $dest"
}

# 1. Source trees ---------------------------------------------------------------------------------------
if [[ ! -f "$FORGE_DIR/launch.py" ]]; then
    export_tree "$FORGE_GIT_DIR" "$FORGE_DIR" lllyasviel/stable-diffusion-webui-forge FORGE_GIT_DIR
else
    log "Forge tree present at $FORGE_DIR"
fi
if [[ ! -f "$FORGE_DIR/repositories/huggingface_guess/huggingface_guess/__init__.py" ]]; then
    export_tree "$HFGUESS_GIT_DIR" "$FORGE_DIR/repositories/huggingface_guess" lllyasviel/huggingface_guess HFGUESS_GIT_DIR
fi
mkdir -p "$FORGE_DIR/models/Stable-diffusion" "$FORGE_DIR/extensions"

# 2. venv -----------------------------------------------------------------------------------------------
if [[ ! -x "$FORGE_VENV/bin/python" ]]; then
    PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    log "creating venv $FORGE_VENV with $PY"
    "$PY" -m venv "$FORGE_VENV"
fi
VPY="$FORGE_VENV/bin/python"
pip_() { "$VPY" -m pip --disable-pip-version-check "$@"; }

# Without this constraints file pip backtracks through several ~530 MB CUDA torch wheels (HOSTS.md 6.2c).
CONSTRAINTS="$FORGE_VENV/lowbit-forge-constraints.txt"
printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" > "$CONSTRAINTS"

# requirements_versions.txt with (a) CRLF stripped and the bare `torch` line removed, (b) the
# setuptools==69.5.1 pin removed (torch 2.14.1 needs setuptools>=77).
REQS="$FORGE_VENV/lowbit-forge-requirements.txt"
tr -d '\r' < "$FORGE_DIR/requirements_versions.txt" \
    | grep -v -E '^[[:space:]]*torch[[:space:]]*$' \
    | grep -v -E '^[[:space:]]*setuptools[[:space:]]*==' > "$REQS"

STAMP="$FORGE_VENV/.lowbit-forge-setup-$(cat "$CONSTRAINTS" "$REQS" | sha256sum | cut -c1-16)"
if [[ ! -f "$STAMP" ]]; then
    log "installing $TORCH_PIN $TORCHVISION_PIN (from the on-disk wheels where pip finds them)"
    pip_ install -c "$CONSTRAINTS" "$TORCH_PIN" "$TORCHVISION_PIN"
    log "installing Forge requirements (about 3-5 min)"
    pip_ install -c "$CONSTRAINTS" -r "$REQS"
    # (d) pytorch_lightning 1.9.4 imports pkg_resources, which setuptools 81+ no longer ships.
    pip_ install -c "$CONSTRAINTS" "setuptools>=77,<81"
    # joblib: the built-in soft-inpainting script imports it (not listed by Forge).
    pip_ install -c "$CONSTRAINTS" safetensors peft joblib
    touch "$STAMP"
else
    log "requirements already installed ($STAMP)"
fi

# 3. LowBit itself, editable, without touching Forge's pinned packages ----------------------------------
if ! "$VPY" -c "import lowbit, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(lowbit.__file__), '$REPO_ROOT') else 1)" 2>/dev/null; then
    log "pip install -e $REPO_ROOT --no-deps"
    pip_ install -c "$CONSTRAINTS" --no-deps -e "$REPO_ROOT"
fi

"$VPY" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision", "gradio", "gradio_imageslider", "diffusers", "transformers", "safetensors", "peft", "setuptools", "lowbit"):
    try:
        print(f"[setup_forge] {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"[setup_forge] {name}: not installed")
EOF
log "done. Run: FORGE_DIR=$FORGE_DIR pytest tests/webui"
