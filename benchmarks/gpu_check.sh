#!/usr/bin/env bash
# One short GPU check (< 8 minutes on one H100): the GPU tests, then rollout at batch 64 and 256,
# the train step, and a reduced MiniLLM iteration. JSON lines go to $OUT (or ./gpu-results/).
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -u
cd "$(dirname "$0")/.."
RES="${OUT:-./gpu-results}"
mkdir -p "$RES"
export OUT="$RES" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
log() { echo "== $* ($(date +%T))" | tee -a "$RES/gpu_check.log"; }
run() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$RES/gpu_check.log"; echo "rc=${PIPESTATUS[0]}" | tee -a "$RES/gpu_check.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$RES/gpu.txt"
run 140 "$PY" -m pytest -q tests/gpu tests/unit/test_fast_sampler.py -rA --junitxml="$RES/gpu_tests.xml"
run 110 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
run 90  "$PY" benchmarks/train_step.py
run 120 "$PY" benchmarks/iteration.py --num-rollouts 64 --rollout-batch 64 --new-tokens 128 --ppo-epochs 4
log done
