#!/usr/bin/env bash
# One GPU check (about 8-10 minutes on one H100/H200; run 1 on an H200 took 5.3 min with
# iteration.py cut off by a shorter limit): the rollout benchmark at batch 64 and 256,
# the train step, one MiniLLM iteration at the paper's settings, the GPU tests, and the CLI on the
# GPU (benchmarks/gpu_cli_check.sh). JSON lines and a log go to $OUT (or ./gpu-results/).
#   bash benchmarks/gpu_check.sh            (from the repository root; runs from a checkout:
#                                            PYTHONPATH is set, no install needed)
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-./gpu-results}"
mkdir -p "$RES"
export OUT="$RES" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
LOG="$RES/gpu_check.log"
log() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$RES/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$RES/gpu.txt"
run 120 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
run 60  "$PY" benchmarks/train_step.py
run 240 "$PY" benchmarks/iteration.py
run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
run 150 env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
log "fallbacks: $(grep -c 'fast sampler unavailable\|CUDA graph capture failed' "$LOG")"
log done
