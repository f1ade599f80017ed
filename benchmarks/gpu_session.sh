#!/usr/bin/env bash
# One GPU session (about 8.5 minutes), run ONCE on a lent H100/H200 from the repository root:
#   (a) the reproduction grid's GPU tier (experiments/reproduce.py --scale gpu), time-boxed;
#   (b) the memory phase of benchmarks/gpu_measure.py (the product's current defaults), time-boxed;
# then one archive, $OUT/gpu_session.tar.gz, of every result (no checkpoints or model files).
#
# Nothing is installed: it runs the working tree with `PYTHONPATH=src python3`. Data come from a
# folder carried with the tree (default .gpu_data/, or $GPU_DATA_DIR) holding cifar10_jpeg.npz and
# input.txt (copies of ../shared/data/cifar10-jpeg/cifar10_jpeg.npz and tinyshakespeare/input.txt).
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh                      # on the GPU
#   OUT=/tmp/gs SUBNETDP_GPU_SMOKE=1 bash benchmarks/gpu_session.sh   # CPU smoke test: same steps, tiny
#   OUT=... bash benchmarks/gpu_session.sh --coverages 0.5 --seeds 0 1 2   # arguments go to reproduce.py
#
# Budgets (seconds, overridable): REPRO_MINUTES (4.8) for the grid, MEASURE_SECONDS (150) for (b);
# MEASURE_ARGS adds arguments to gpu_measure.py (e.g. "--batches 64" to measure batch 64 and the LLaMA only).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
DATA=${GPU_DATA_DIR:-.gpu_data}
SMOKE=${SUBNETDP_GPU_SMOKE:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
mkdir -p "$OUT" "$WORK/session"
export PYTHONPATH="$PWD/src" SUBNETDP_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$WORK/session/session.log"

pack() {  # always leave one archive behind, whatever failed
    tar -czf "$OUT/gpu_session.tar.gz" -C "$WORK" --exclude=checkpoints --exclude='*.safetensors' \
        --exclude=tensorboard --exclude=cache --exclude='*.tmp' . 2>>"$LOG"
    ls -l "$OUT" | tee -a "$LOG"
}
trap pack EXIT

for f in cifar10_jpeg.npz input.txt; do
    [ -f "$DATA/$f" ] || { echo "missing $DATA/$f: carry it with the tree (or set GPU_DATA_DIR)" | tee -a "$LOG"; exit 2; }
done

if [ "$SMOKE" = "1" ]; then
    REPRO_MINUTES=${REPRO_MINUTES:-1.5}; MEASURE_SECONDS=${MEASURE_SECONDS:-120}
    REPRO_EXTRA=(--shrink --device cpu --min-run-seconds 5); MEASURE_EXTRA=(--small --device cpu)
else
    REPRO_MINUTES=${REPRO_MINUTES:-4.8}; MEASURE_SECONDS=${MEASURE_SECONDS:-150}
    REPRO_EXTRA=(); MEASURE_EXTRA=()
fi

{
    echo "== $(date -u +%FT%TZ) gpu_session (smoke=$SMOKE) at $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version(), 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

# (a) the reproduction grid; --minutes stops it cleanly, the outer timeout only guards a hang
echo "== (a) reproduction grid, ${REPRO_MINUTES} min" | tee -a "$LOG"
REPRO_LIMIT=$(awk "BEGIN {print int($REPRO_MINUTES * 60 + 40)}")
timeout -s INT -k 20 "$REPRO_LIMIT" $PY experiments/reproduce.py --scale gpu --minutes "$REPRO_MINUTES" \
    --data-dir "$DATA" --out "$WORK/repro" "${REPRO_EXTRA[@]}" "$@" 2>&1 | tee -a "$LOG"
echo "reproduce.py exit ${PIPESTATUS[0]}" | tee -a "$LOG"

# (b) memory phase of gpu_measure (it writes its JSON after every workload, so a cut keeps what it has)
echo "== (b) gpu_measure memory phase, ${MEASURE_SECONDS} s" | tee -a "$LOG"
timeout -s INT -k 10 "$MEASURE_SECONDS" $PY benchmarks/gpu_measure.py --out "$WORK/gpu_measure" \
    --skip-planner --skip-alignment --budget-minutes "$(awk "BEGIN {print ($MEASURE_SECONDS - 30) / 60}")" \
    "${MEASURE_EXTRA[@]}" ${MEASURE_ARGS:-} 2>&1 | tee -a "$LOG"
echo "gpu_measure.py exit ${PIPESTATUS[0]}" | tee -a "$LOG"
echo "== $(date -u +%FT%TZ) done" | tee -a "$LOG"
