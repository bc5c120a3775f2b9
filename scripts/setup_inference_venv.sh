#!/usr/bin/env bash
# Set up the real inference backend used by the e2e tests: a separate venv with CPU torch +
# `transformers serve`, and a tiny random LLaVA model built locally (no Hugging Face Hub access).
#
#   scripts/setup_inference_venv.sh [VENV_DIR] [MODEL_DIR]
#
#   VENV_DIR   default: <repo>/.venvs/transformers-serve   (git-ignored)
#   MODEL_DIR  default: VENV_DIR/tiny-llava
#
# Idempotent: an up-to-date venv and an already built model are left alone.
# Environment knobs:
#   PYTHON=python3.11          interpreter for the venv (>= 3.10; default python3)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#                              extra index for torch, to get the small CPU-only wheel instead of PyPI's CUDA
#                              build (not needed where pip's find-links already holds torch-2.13.0+cpu)
#   FORCE_REINSTALL=1          run pip install even if the venv looks complete
# pip's own configuration (e.g. /etc/xdg/pip/pip.conf with its constraints file) is respected: pip is
# called without --isolated, so global find-links/constraints apply.
set -euo pipefail

# Versions verified together (transformers serve + tiny LLaVA, CPU): see docs/real-backend.md.
TORCH_REQ="torch==2.13.0"
PY_REQS=("transformers[serving]==5.24.0" "tokenizers==0.23.3" "pillow==13.0.0")

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venvs/transformers-serve}"
MODEL_DIR="${2:-$VENV/tiny-llava}"
PYTHON="${PYTHON:-python3}"
STAMP_NAME=".imageworks-inference-venv"
START=$SECONDS

log() { printf '[setup-inference] %s\n' "$*"; }
die() { printf '[setup-inference] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
case "$MODEL_DIR" in /*) ;; *) MODEL_DIR="$PWD/$MODEL_DIR" ;; esac

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (install python3 >= 3.10)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); transformers 5 needs Python >= 3.10"

if [ -f /etc/xdg/pip/constraints.txt ]; then
  log "pip constraints in effect (/etc/xdg/pip/constraints.txt): $(grep -v '^\s*#' /etc/xdg/pip/constraints.txt | tr '\n' ' ')"
fi

# --- 1. the venv ---------------------------------------------------------------------------------
make_venv() { "$PYTHON" -m venv "$VENV"; }
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  log "venv present: $VENV"
else
  rm -rf "$VENV"
  log "creating venv: $PYTHON -m venv $VENV"
  if ! make_venv 2>/tmp/setup-inference-venv.err; then
    rm -rf "$VENV"
    # Debian/Ubuntu ship venv/ensurepip separately (python3-venv / python3.X-venv).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      log "venv failed ($(tail -n1 /tmp/setup-inference-venv.err)); installing python3-venv with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq "python${pyver}-venv" >/dev/null 2>&1 || apt-get install -y -qq python3-venv >/dev/null
      make_venv || die "python3 -m venv still fails after installing python3-venv"
    else
      cat /tmp/setup-inference-venv.err >&2
      die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    fi
  fi
fi
PY="$VENV/bin/python"

# --- 2. packages ---------------------------------------------------------------------------------
VERSIONS='import torch, transformers, tokenizers, PIL, fastapi, uvicorn
print("[setup-inference] torch", torch.__version__, "(cuda:", str(torch.version.cuda) + ") transformers", transformers.__version__)'
WANT="$TORCH_REQ ${PY_REQS[*]} ${TORCH_INDEX_URL:-}"
installed_ok() {
  [ -f "$VENV/$STAMP_NAME" ] && [ "$(cat "$VENV/$STAMP_NAME")" = "$WANT" ] && [ -x "$VENV/bin/transformers" ] \
    && "$PY" -c "$VERSIONS" 2>/dev/null
}
if [ -z "${FORCE_REINSTALL:-}" ] && installed_ok; then
  log "packages already installed: $WANT"
else
  PIP=("$PY" -m pip install --no-input --progress-bar off --disable-pip-version-check)
  pip_help="$("$PY" -m pip install --help 2>/dev/null || true)"
  case "$pip_help" in *--root-user-action*) PIP+=(--root-user-action=ignore) ;; esac
  TORCH_EXTRA=()
  [ -n "${TORCH_INDEX_URL:-}" ] && TORCH_EXTRA=(--extra-index-url "$TORCH_INDEX_URL")
  log "pip install $TORCH_REQ ${TORCH_EXTRA[*]}"
  "${PIP[@]}" "${TORCH_EXTRA[@]}" "$TORCH_REQ" || die "pip install $TORCH_REQ failed"
  log "pip install ${PY_REQS[*]}"
  # torch is repeated so pip keeps the version just installed instead of resolving a different one.
  "${PIP[@]}" "$TORCH_REQ" "${PY_REQS[@]}" || die "pip install ${PY_REQS[*]} failed"
  [ -x "$VENV/bin/transformers" ] || die "$VENV/bin/transformers missing after install"
  "$PY" -c "$VERSIONS" || die "the venv cannot import torch/transformers/fastapi/uvicorn"
  printf '%s' "$WANT" > "$VENV/$STAMP_NAME"
fi

# --- 3. the tiny model ---------------------------------------------------------------------------
log "building tiny LLaVA (if missing): $MODEL_DIR"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  "$PY" "$REPO/scripts/build_tiny_llava.py" "$MODEL_DIR" || die "building the tiny model failed"

log "done in $((SECONDS - START))s"
log "  venv:   $VENV"
log "  model:  $MODEL_DIR"
log "  launch: HF_HUB_OFFLINE=1 $VENV/bin/transformers serve $MODEL_DIR --host 127.0.0.1 --port PORT --device cpu"
