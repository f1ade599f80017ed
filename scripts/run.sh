#!/usr/bin/env bash
# Set up (if needed) and run the main job: SDP (block level, C=0.5) with 4 simulated workers on
# CIFAR-10 (JPEG) from ../shared/data, a reduced-width ResNet-18, a few minutes on 2 CPU cores.
# Extra arguments are passed to `subnetdp train` (e.g. --level neuron, --epochs 10, --width 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh run
exec .venv/bin/subnetdp train --simulate 4 --coverage 0.5 --level block --width 16 \
  --train-subset 20000 --epochs 3 --batch-size 128 --out "runs/main-$(date +%Y%m%d-%H%M%S)" "$@"
