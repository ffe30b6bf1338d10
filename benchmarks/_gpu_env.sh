# Sourced by gpu_check.sh / gpu_diag.sh: results folder, environment, the Python to use, and
# `run LIMIT CMD...` (logged, time-limited, exit status recorded). Expects LOGNAME_ set.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RES="${OUT:-./gpu-results}"
mkdir -p "$RES"
export OUT="$RES" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
LOG="$RES/$LOGNAME_.log"
log() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }
machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$RES/gpu.txt"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$RES/gpu.txt"
}
fallbacks() { log "fallbacks: $(grep -c 'fast sampler unavailable\|CUDA graph capture failed' "$LOG")"; }
