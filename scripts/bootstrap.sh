#!/usr/bin/env bash
# Create the virtual environment and install pdserve (+ dev tools) when missing or stale.
# Sourced by scripts/serve.sh and scripts/test.sh; safe to run repeatedly.
#   PYTHON=python3.12          interpreter used to create the venv (default python3)
#   PDSERVE_VENV=/path/venv    venv location (default .venv in the repository)
#   PDSERVE_TORCH_INDEX=URL    where torch comes from (e.g. https://download.pytorch.org/whl/cpu);
#                              by default `pip install torch==2.13.0`, the CPU build on this
#                              project's machines.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PDSERVE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "pdserve: creating virtual environment in $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.pdserve-install-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "pdserve: installing dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Install torch first and pinned, so the range in pyproject.toml never pulls a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" \
      ${PDSERVE_TORCH_INDEX:+--index-url "$PDSERVE_TORCH_INDEX"} 2>&1 | grep -v "is ignored" >&2 || true
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v -e "is ignored" -e "BuildBackendWarning" >&2 || true
  "$VENV/bin/python" -c "import torch, ray, grpc, transformers, pdserve.engine" \
    || { echo "pdserve: dependency installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
