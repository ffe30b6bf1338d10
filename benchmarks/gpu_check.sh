#!/usr/bin/env bash
# The GPU check on one H100/H200, in parts that each fit one 10-minute device call (run 3 on an
# H200, 2026-11-28, ran most of part 1 and the GPU tests in 5.6 minutes):
#   part 1 (limits add up to 9 min): the issue's figures and what decides the defaults -- the
#          rollout benchmark at batch 64 and 256 (naive and graph), the decode step's kernel
#          profiles (SDPA, then the decode-attention kernel) and its switches (rollout_profile.py:
#          the Triton attention kernel forced on and off -- "base" lets the sampler choose -- and
#          the student on one stream instead of a second one; at batch 256 too), the train step
#          with its kernel profile,
#          then one MiniLLM iteration at the paper's settings (both sides sampling in the rollout
#          batch distill picks);
#   part 2 (9.75 min): the GPU tests (44 s in run 3), the vocabulary-wide loss on its own, the
#          CPU estimate of the train step's peaks (train_step.py --estimate-memory: fake tensors,
#          ~45 s on 2 cores) to set next to part 1's measured ones, the CLI on the GPU
#          (benchmarks/gpu_cli_check.sh), a float32 student's rollouts with and without the
#          sampler's bf16 weight copies and on one stream (rollout_profile.py), rollouts at
#          batch 8 (distill's old default), and our iteration with exact forward widths and with
#          the allocator's cache kept after sampling (what explains the update phase's excess);
#   part 3 (9.75 min): the decode step's matmuls alone, cuBLAS against a split-K Triton matmul
#          (skinny_matmul.py; first, as the quickest answer when a call is cut short), then the
#          experimental compile engine at batch 64 on its own (its compile time is unknown at
#          these shapes), then with inductor's matmul autotuning
#          (--compile-mode max-autotune-no-cudagraphs);
#   part 4 (8.5 min, not in "all": parts 1 and 2 hold it): the short check of the decode-attention
#          kernel -- its GPU tests, the rollout figures (where "auto" chooses), the step with the
#          kernel forced on and off, and the iteration.
#   part 6 (9 min of limits, ~6 by run 5's times -- the 30 GPU tests took 99 s there, the
#          rollouts 80 s -- plus the split-K matmul's Triton builds, ~20-40 of them at ~1-2 s
#          each in the tests, ~18 in the rollouts' first "auto" plan; not in "all"): the release
#          check after run 5 -- all GPU tests (the fused cache writes of the decode-attention
#          kernel and the split-K decode matmul among them), the rollout figures (where "auto"
#          now also plans the decode matmuls), the decode step's profiles and its time with
#          the matmuls on cuBLAS alone and with the kernel's cache writes separate, and the
#          train step's time and peak memory (capture included);
#   part 7 (5.25 min, not in "all"): what part 6 leaves for a second call -- the iteration
#          (152 s in run 5), then the decode step's matmuls alone (skinny_matmul.py, as in
#          part 3).
#   part 5 (8.8 min, not in "all"): the short check of the captured update micro-steps
#          (engine/captured_step.py) -- the update's GPU tests (graphs against eager steps), the
#          train step with and without the graphs and its kernel profile, the CLI check (distill
#          with and without --update-graphs), and the iteration.
# JSON lines and a log go to $OUT (or ./gpu-results/).
#   bash benchmarks/gpu_check.sh [1|2|3|4|5|6|7|all]   (from the repository root; runs from a checkout:
#                                            PYTHONPATH is set, no install needed; default all)
PART="${1:-all}"
LOGNAME_=gpu_check
source "$(dirname "$0")/_gpu_env.sh"
machine
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  run 120 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
  run 60  "$PY" benchmarks/rollout_profile.py --variants base,kernel_attn,sdpa_attn,one_stream
  run 60  "$PY" benchmarks/rollout_profile.py --batch 256 --variants base,sdpa_attn,one_stream
  run 60  "$PY" benchmarks/train_step.py --profile
  run 240 "$PY" benchmarks/iteration.py
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
  run 45  "$PY" benchmarks/vocab_loss.py
  run 60  "$PY" benchmarks/train_step.py --estimate-memory
  run 150 env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
  run 60  "$PY" benchmarks/rollout_profile.py --variants base,fp32_student,fp32_student+per_step_casts,fp32_student+one_stream
  run 60  "$PY" benchmarks/rollout.py --batches 8 --engines naive,graph
  run 60  "$PY" benchmarks/iteration.py --sides ours --width-bucket 1
  run 60  "$PY" benchmarks/iteration.py --sides ours --keep-allocator-cache
fi
if [ "$PART" = 3 ] || [ "$PART" = all ]; then
  run 135 "$PY" benchmarks/skinny_matmul.py
  run 150 "$PY" benchmarks/rollout.py --batches 64 --engines compile
  run 300 "$PY" benchmarks/rollout.py --batches 64 --engines compile --compile-mode max-autotune-no-cudagraphs
fi
if [ "$PART" = 4 ]; then
  run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_attention.py -rA -s
  run 120 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
  run 60  "$PY" benchmarks/rollout_profile.py --variants base,kernel_attn,sdpa_attn
  run 240 "$PY" benchmarks/iteration.py
fi
if [ "$PART" = 5 ]; then
  run 90  "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_update.py -rA -s
  run 90  "$PY" benchmarks/train_step.py --profile --variants naive,ours,ours+eager,ours+cached,ours+cached+eager
  run 150 env PYTHON="$PY" bash benchmarks/gpu_cli_check.sh
  run 200 "$PY" benchmarks/iteration.py
fi
if [ "$PART" = 6 ]; then
  run 210 "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rA --junitxml="$RES/gpu_tests.xml"
  run 180 "$PY" benchmarks/rollout.py --batches 64,256 --engines naive,graph
  run 90  "$PY" benchmarks/rollout_profile.py --variants base,cublas_mm,separate_writes
  run 60  "$PY" benchmarks/train_step.py --variants naive,ours
fi
if [ "$PART" = 7 ]; then
  run 180 "$PY" benchmarks/iteration.py
  run 135 "$PY" benchmarks/skinny_matmul.py
fi
fallbacks
log done
