#!/usr/bin/env bash
# Create .venv and install subnetdp (idempotent). `setup.sh` installs the package with its [plots]
# extra (matplotlib: the main job's report and bench plots); `setup.sh test` adds the test
# dependencies and the [hf] extras (transformers, timm, tokenizers), which only the tests and users'
# own Hugging Face/timm models need.
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
case "${1:-run}" in
  run)
    pip_quiet install --quiet -e '.[plots]'
    check="import subnetdp, torch, torchvision, matplotlib" ;;
  test)
    pip_quiet install --quiet -e '.[plots,test,hf]'
    check="import subnetdp, torch, torchvision, matplotlib, pytest, transformers, timm" ;;
  *)
    echo "setup: unknown argument '$1': use 'run' (the package and [plots]) or 'test' (with test and [hf] extras)" >&2
    exit 2 ;;
esac
rm -f "$log"
.venv/bin/python -c "$check; print('subnetdp', subnetdp.__version__, 'torch', torch.__version__)"
