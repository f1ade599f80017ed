#!/usr/bin/env bash
# Create .venv and install subnetdp with its test dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=$(mktemp)
pip_quiet() {  # pip's output only on failure (less the local-index notices of this machine)
  if ! .venv/bin/python -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2 || true
    echo "setup: pip $* failed" >&2
    exit 1
  fi
}
pip_quiet install --quiet --upgrade pip
pip_quiet install --quiet -e '.[test,hf]'
rm -f "$log"
.venv/bin/python -c "import subnetdp, torch, torchvision, pytest, transformers, timm; print('subnetdp', subnetdp.__version__, 'torch', torch.__version__)"
