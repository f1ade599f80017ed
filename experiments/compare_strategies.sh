#!/usr/bin/env bash
# DDP vs SDP block vs SDP neuron (C=0.5), K=4, reduced-width ResNet-18 on CIFAR-10 (JPEG), same
# steps and recipe, then a report. DDP runs as 4 real processes (gloo); SDP as 4 simulated workers
# (the same math as 4 processes, tested in tests/test_engine.py).
# Usage: bash experiments/compare_strategies.sh [OUT_DIR] [extra train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compare}
shift || true
COMMON=(--width 16 --epochs 4 --batch-size 128 --no-progress --seed 0 "$@")
.venv/bin/subnetdp train --strategy ddp --workers 4 --threads 1 "${COMMON[@]}" --out "$OUT/ddp"
.venv/bin/subnetdp train --simulate 4 --coverage 0.5 --level block "${COMMON[@]}" --out "$OUT/sdp-block"
.venv/bin/subnetdp train --simulate 4 --coverage 0.5 --level neuron "${COMMON[@]}" --out "$OUT/sdp-neuron"
.venv/bin/subnetdp report "$OUT/ddp" "$OUT/sdp-block" "$OUT/sdp-neuron" --out "$OUT/report"
