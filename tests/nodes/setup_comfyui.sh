#!/usr/bin/env bash
# Install a ComfyUI checkout + its own venv for the LowBit ComfyUI integration tests (CPU only). Idempotent.
#
#   bash tests/nodes/setup_comfyui.sh TARGET_DIR [--venv VENV_DIR] [--no-verify] [--no-fixture]
#   COMFYUI_DIR=TARGET_DIR python -m pytest tests/nodes/test_comfyui_integration.py -x -q
#
# TARGET_DIR   ComfyUI source tree to create (skipped if TARGET_DIR/main.py exists).
# VENV_DIR     default: TARGET_DIR/../comfy-venv (where tests/nodes/comfy_harness.py looks for COMFYUI_PYTHON).
#
# Where the ComfyUI source comes from (first that applies):
#   1. TARGET_DIR already holds a checkout (main.py)                       -> used as is.
#   2. COMFYUI_GIT_DIR=<git dir> or a snapshot under /work/.mirror/ (Comfy-Org+ComfyUI or comfyanonymous+ComfyUI).
#      Those bare git dirs are made by the agent sessions' `fetch` tool (`fetch github:Comfy-Org/ComfyUI`):
#      it is a session tool, not a shell command, so a script cannot call it. Snapshots lack files of 4 MiB
#      and more; such blobs are skipped (in v0.3.64 only comfy/text_encoders/llama_tokenizer/tokenizer.json,
#      not used by SD1.x).
#   3. COMFYUI_GIT_URL=<clone url> [COMFYUI_REF=<tag/branch>]            -> git clone --depth 1 (needs network).
# ComfyUI's code is never copied into the LowBit repository.
#
# Environment knobs: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default
# "torch==2.14.1 torchvision==0.29.1": on this kind of machine these wheels lie on disk and /etc/xdg/pip caps
# torch there; do not remove /etc/xdg/pip).
set -euo pipefail

usage() { sed -n '2,8p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
TARGET=""; VENV=""; VERIFY=1; FIXTURE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --no-verify) VERIFY=0; shift ;;
    --no-fixture) FIXTURE=0; shift ;;
    -h|--help) usage ;;
    *) [ -z "$TARGET" ] || usage; TARGET="$1"; shift ;;
  esac
done
[ -n "$TARGET" ] || usage
mkdir -p "$TARGET"
TARGET="$(cd "$TARGET" && pwd)"
VENV="${VENV:-$(dirname "$TARGET")/comfy-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
log() { printf '[setup_comfyui %(%H:%M:%S)T] %s\n' -1 "$*"; }
SECONDS=0

# ---------------------------------------------------------------------------------------------- 1. source
if [ -f "$TARGET/main.py" ]; then
  log "ComfyUI source present in $TARGET"
else
  GIT_DIR_SRC="${COMFYUI_GIT_DIR:-}"
  if [ -z "$GIT_DIR_SRC" ]; then
    for cand in /work/.mirror/Comfy-Org+ComfyUI/repo /work/.mirror/comfyanonymous+ComfyUI/repo; do
      if [ -d "$cand" ]; then GIT_DIR_SRC="$cand"; break; fi
    done
  fi
  if [ -n "$GIT_DIR_SRC" ]; then
    log "exporting ComfyUI $(git --git-dir="$GIT_DIR_SRC" describe --tags --always HEAD 2>/dev/null) from $GIT_DIR_SRC"
    # pathspecs excluding blobs that the snapshot lacks (git archive would stop at the first one)
    mapfile -t MISSING < <(git --git-dir="$GIT_DIR_SRC" ls-tree -r HEAD | awk '$2 == "blob" {print $3}' |
                           git --git-dir="$GIT_DIR_SRC" cat-file --batch-check | awk '$2 == "missing" {print $1}')
    EXCLUDES=()
    for h in "${MISSING[@]}"; do
      while IFS= read -r p; do
        log "  skipped (not in snapshot): $p"; EXCLUDES+=(":(exclude)$p")
      done < <(git --git-dir="$GIT_DIR_SRC" ls-tree -r HEAD | awk -v h="$h" '$3 == h {sub(/^[^\t]*\t/, ""); print}')
    done
    TMP_TAR="$(mktemp)"
    git --git-dir="$GIT_DIR_SRC" archive --format=tar HEAD -- . "${EXCLUDES[@]}" > "$TMP_TAR" 2>/dev/null
    tar -x -f "$TMP_TAR" -C "$TARGET"
    rm -f "$TMP_TAR"
  elif [ -n "${COMFYUI_GIT_URL:-}" ]; then
    log "cloning $COMFYUI_GIT_URL ${COMFYUI_REF:-}"
    git clone --depth 1 ${COMFYUI_REF:+--branch "$COMFYUI_REF"} "$COMFYUI_GIT_URL" "$TARGET.clone"
    cp -a "$TARGET.clone/." "$TARGET/" && rm -rf "$TARGET.clone"
  else
    echo "No ComfyUI source: put a checkout in $TARGET, set COMFYUI_GIT_DIR to a (fetched) git dir," >&2
    echo "or COMFYUI_GIT_URL to a clone URL." >&2
    exit 1
  fi
  [ -f "$TARGET/main.py" ] || { echo "export failed: no $TARGET/main.py" >&2; exit 1; }
fi
log "ComfyUI version: $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$TARGET/comfyui_version.py" 2>/dev/null || echo '?')"

# ------------------------------------------------------------------------------------------------ 2. venv
[ -x "$VENV/bin/python" ] || { log "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# torch first (ComfyUI's core imports torchvision; torchaudio is not needed: only the audio nodes fail)
if ! "$VENV/bin/python" - "$TORCH_SPEC" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
for req in sys.argv[1].split():
    name, _, ver = req.partition("==")
    assert md.version(name).split("+")[0] == ver or not ver, req
import torch, torchvision  # noqa: F401
EOF
then
  log "pip install $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" $TORCH_SPEC
fi

# ComfyUI's requirements without torch/torchvision/torchaudio (would pull other torch builds), + requests
# (imported by app/frontend_management.py but not listed), + LowBit's dependencies, + LowBit itself (editable).
REQS="$(mktemp)"
grep -viE '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=~!;].*)?$' "$TARGET/requirements.txt" > "$REQS"
STAMP="$VENV/.lowbit-comfyui-setup"
WANT="$( (cat "$REQS"; echo "requests diffusers peft safetensors"; echo "$REPO") | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "pip install ComfyUI requirements (+ requests)"
  "${PIP[@]}" -r "$REQS" requests
  log "pip install LowBit dependencies + editable LowBit ($REPO)"
  "${PIP[@]}" diffusers peft safetensors
  "${PIP[@]}" -e "$REPO" --no-deps
  echo "$WANT" > "$STAMP"
else
  log "venv packages up to date ($STAMP)"
fi
rm -f "$REQS"
"$VENV/bin/python" -c "import torch, torchvision, aiohttp, comfyui_frontend_package, diffusers, peft, safetensors; print('torch', torch.__version__)"

# --------------------------------------------------------------------------------------- 3. fixture + check
if [ "$FIXTURE" = 1 ]; then
  log "building/reusing the random SD1.5 fixture checkpoint"
  "$VENV/bin/python" "$REPO/tests/nodes/make_fixture.py" --comfyui-dir "$TARGET"
fi
if [ "$VERIFY" = 1 ]; then
  log "verifying that ComfyUI starts with the pack and answers /object_info"
  COMFYUI_PYTHON="$VENV/bin/python" "$VENV/bin/python" - "$TARGET" "$REPO/tests/nodes" <<'EOF'
import sys
sys.path.insert(0, sys.argv[2])
from comfy_harness import ComfyServer
with ComfyServer.start(sys.argv[1]) as client:
    n = len(client.object_info())
    print(f"ComfyUI answered /object_info with {n} nodes after {client.server.start_seconds:.1f}s; "
          f"pack import: {client.server.pack_import_status()}")
EOF
fi
log "done in ${SECONDS}s. Run: COMFYUI_DIR=$TARGET python -m pytest $REPO/tests/nodes -q"
