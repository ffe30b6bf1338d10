#!/usr/bin/env bash
# Second GPU check (about 6 minutes on one H200): GPU tests, the CLI on the GPU, where a decode
# step's time goes (rollout_profile.py), one MiniLLM iteration of ours at the paper's settings,
# and the "compile" rollout engine. Outputs to $OUT (or ./gpu-results/), like gpu_check.sh.
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-./gpu-results}"
mkdir -p "$RES"
export OUT="$RES" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
LOG="$RES/gpu_diag.log"
log() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
run 60  env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
run 90  "$PY" benchmarks/rollout_profile.py
run 110 "$PY" benchmarks/iteration.py --sides ours
run 100 "$PY" benchmarks/rollout.py --batches 64,256 --engines compile
log "fallbacks: $(grep -c 'fast sampler unavailable\|CUDA graph capture failed' "$LOG")"
log done
