#!/usr/bin/env bash
# The GPU check on one H100/H200, in two parts that each fit one 10-minute device call:
#   part 1 (limits add up to 8.75 min): the rollout benchmark at batch 64 and 256 (naive and
#          graph), the experimental compile engine at batch 64 on its own (its compile time is
#          unknown at these shapes), the vocabulary-wide loss on its own, the train step and, next
#          to its measured peaks, the CPU estimate of them (train_step.py --estimate-memory: fake
#          tensors, ~45 s on 2 cores), the GPU tests (62 s on the H200 in run 2);
#   part 2 (7.5 min): one MiniLLM iteration at the paper's settings, the CLI on the GPU
#          (benchmarks/gpu_cli_check.sh), a float32 student's rollouts with and without the
#          sampler's bf16 weight copies (rollout_profile.py).
# JSON lines and a log go to $OUT (or ./gpu-results/).
#   bash benchmarks/gpu_check.sh [1|2|all]   (from the repository root; runs from a checkout:
#                                            PYTHONPATH is set, no install needed; default all)
PART="${1:-all}"
LOGNAME_=gpu_check
source "$(dirname "$0")/_gpu_env.sh"
machine
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  run 120 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
  run 150 "$PY" benchmarks/rollout.py --batches 64 --engines compile
  run 45  "$PY" benchmarks/vocab_loss.py
  run 60  "$PY" benchmarks/train_step.py
  run 60  "$PY" benchmarks/train_step.py --estimate-memory
  run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  run 240 "$PY" benchmarks/iteration.py
  run 150 env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
  run 60  "$PY" benchmarks/rollout_profile.py --variants base,fp32_student,fp32_student+per_step_casts
fi
fallbacks
log done
