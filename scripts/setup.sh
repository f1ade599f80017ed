#!/usr/bin/env bash
# Create .venv and install subnetdp with its test dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install --quiet -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import subnetdp, torch, torchvision, pytest; print('subnetdp', subnetdp.__version__, 'torch', torch.__version__)"
