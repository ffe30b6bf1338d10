#!/usr/bin/env bash
# One GPU check (about 8-10 minutes on one H100/H200; run 1 on an H200 took 5.3 min with
# iteration.py cut off by a shorter limit): the rollout benchmark at batch 64 and 256,
# the train step, one MiniLLM iteration at the paper's settings, the GPU tests, and the CLI on the
# GPU (benchmarks/gpu_cli_check.sh). JSON lines and a log go to $OUT (or ./gpu-results/).
#   bash benchmarks/gpu_check.sh            (from the repository root; runs from a checkout:
#                                            PYTHONPATH is set, no install needed)
LOGNAME_=gpu_check
source "$(dirname "$0")/_gpu_env.sh"
machine
run 120 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
run 60  "$PY" benchmarks/train_step.py
run 240 "$PY" benchmarks/iteration.py
run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
run 150 env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
fallbacks
log done
