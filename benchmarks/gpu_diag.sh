#!/usr/bin/env bash
# Second GPU check (about 6 minutes on one H200): GPU tests, the CLI on the GPU, where a decode
# step's time goes (rollout_profile.py), one MiniLLM iteration of ours at the paper's settings,
# and the "compile" rollout engine. Outputs to $OUT (or ./gpu-results/), like gpu_check.sh.
LOGNAME_=gpu_diag
source "$(dirname "$0")/_gpu_env.sh"
machine
run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
run 60  env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
run 90  "$PY" benchmarks/rollout_profile.py
run 110 "$PY" benchmarks/iteration.py --sides ours
run 100 "$PY" benchmarks/rollout.py --batches 64,256 --engines compile
fallbacks
log done
