#!/usr/bin/env bash
# The paper's GPT-2 recipe end to end (MiniLLM, Gu et al., ICLR 2024; hyperparameters from
# ../shared/reference/METHOD.md, restated next to each command):
#   1. SFT the gpt2-xl teacher on Dolly        (lr 5e-5, 10 epochs)
#   2. SFT the gpt2 student on Dolly           (lr 5e-4, 10 epochs)
#   3. pretrain-mix OpenWebText                (512-token chunks across document borders)
#   4. distil: MiniLLM (lr 5e-6 constant after 100 warm-up steps, 5000 iterations, 4 PPO epochs,
#      256 rollouts, alpha 0.2, clip 0.2, length 512 with prompts <= 256, top-k 0, top-p 1, T 1,
#      PT loss) and the baselines KD (kd ratio 0.5), SeqKD, RKL (trained like the student SFT)
#   5. evaluate on Dolly, SelfInst, Vicuna, S-NI and UnNI (ROUGE-L, 5 sampling seeds)
#   6. compare
#
#   examples/gpt2-dolly.sh                 # GPUs and the Hub
#   TINY=1 examples/gpt2-dolly.sh          # the very same commands at tiny scale, offline
#   DRY_RUN=1 examples/gpt2-dolly.sh       # print the commands only
# Only sizes change with TINY=1 (models, data, steps, rollouts, lengths); every hyperparameter
# flag below is the paper's in both modes.
set -euo pipefail
OUT=${OUT:-runs/gpt2-dolly}
TINY=${TINY:-0}
DRY_RUN=${DRY_RUN:-0}
MINILLM=${MINILLM:-minillm}
PY=${PYTHON:-python}

run() {
  echo "+ $*" >&2
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

if [ "$TINY" = 1 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  if [ "$DRY_RUN" != 1 ]; then "$PY" -m minillm_cli.toy.world "$OUT/world" --fast >/dev/null; fi
  TEACHER_BASE=$OUT/world/teacher-init
  STUDENT_BASE=$OUT/world/student-init
  DATA=$OUT/world/data/train.jsonl
  PT_SOURCE=$OUT/world/data/pretrain.txt
  PT_TOKENIZER=$OUT/world/tokenizer
  declare -A TESTS=([dolly]=$OUT/world/data/test.jsonl [self-inst]=$OUT/world/data/valid.jsonl
                    [vicuna]=$OUT/world/data/valid.jsonl [sni]=$OUT/world/data/test.jsonl
                    [unni]=$OUT/world/data/valid.jsonl)
  # sizes
  SFT_LEN=(--steps 2 --batch-size 4 --limit 64)
  PT_SIZE=(--seq-len 32 --max-tokens 4096 --split-blank-lines)
  DISTILL_LEN=(--steps 2 --batch-size 4 --num-rollouts 8 --max-new-tokens 8 --limit 64)
  BASELINE_LEN=(--steps 2 --batch-size 4 --max-new-tokens 8 --limit 64)
  LENGTHS=(--max-length 64 --max-prompt-length 48)
  EVAL_SIZE=(--limit 8 --max-new-tokens 8 --max-length 64 --max-prompt-length 48)
else
  TEACHER_BASE=gpt2-xl
  STUDENT_BASE=gpt2
  DATA=dolly
  PT_SOURCE=openwebtext
  PT_TOKENIZER=gpt2
  declare -A TESTS=([dolly]=dolly [self-inst]=self-inst [vicuna]=vicuna [sni]=sni [unni]=unni)
  SFT_LEN=(--epochs 10 --batch-size 32)
  PT_SIZE=(--seq-len 512 --max-tokens 1000000000)
  DISTILL_LEN=(--steps 5000 --batch-size 64 --num-rollouts 256 --max-new-tokens 256)
  BASELINE_LEN=(--epochs 10 --batch-size 32 --max-new-tokens 256)
  LENGTHS=(--max-length 512 --max-prompt-length 256)
  EVAL_SIZE=(--max-new-tokens 256 --max-length 512 --max-prompt-length 256)
fi
# The paper's Dolly split: ~12.5K train, 500 validation, 1000 test (the same seed everywhere).
SPLIT=(--valid-size 500 --test-size 1000 --split-seed 1234)
[ "$TINY" = 1 ] && SPLIT=(--valid-size 8 --test-size 0 --split-seed 1234)

# 1-2. SFT teacher and student
run $MINILLM sft --model "$TEACHER_BASE" --data "$DATA" --out "$OUT/teacher-sft" --lr 5e-5 "${SFT_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
run $MINILLM sft --model "$STUDENT_BASE" --data "$DATA" --out "$OUT/student-sft" --lr 5e-4 "${SFT_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
# 3. the PT corpus
run $MINILLM pretrain-mix --source "$PT_SOURCE" --tokenizer "$PT_TOKENIZER" --out "$OUT/pt" "${PT_SIZE[@]}" --overwrite --quiet
# 4. MiniLLM and the baselines, all from the SFT student
T=$OUT/teacher-sft; S=$OUT/student-sft
run $MINILLM distill --method minillm --teacher "$T" --student "$S" --data "$DATA" --out "$OUT/minillm" \
    --lr 5e-6 --warmup-steps 100 --schedule constant --ppo-epochs 4 --teacher-mix-alpha 0.2 --clip-ratio 0.2 \
    --top-k 0 --top-p 1.0 --temperature 1.0 --pt-data "$OUT/pt" --pt-coef 1.0 \
    "${DISTILL_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
run $MINILLM distill --method kd --kd-ratio 0.5 --teacher "$T" --student "$S" --data "$DATA" --out "$OUT/kd" \
    --lr 5e-4 --warmup-steps 0 --schedule cosine "${BASELINE_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
run $MINILLM distill --method seqkd --teacher "$T" --student "$S" --data "$DATA" --out "$OUT/seqkd" \
    --lr 5e-4 --warmup-steps 0 --schedule cosine --top-k 0 --top-p 1.0 --temperature 1.0 \
    "${BASELINE_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
run $MINILLM distill --method rkl --teacher "$T" --student "$S" --data "$DATA" --out "$OUT/rkl" \
    --lr 5e-4 --warmup-steps 0 --schedule cosine "${BASELINE_LEN[@]}" "${LENGTHS[@]}" "${SPLIT[@]}" --overwrite --quiet
# 5. evaluate every model on the five test sets: ROUGE-L over 5 sampling seeds, the paper's decoding
results=()
for model in teacher-sft student-sft kd seqkd rkl minillm; do
  for test in dolly self-inst vicuna sni unni; do
    split=()
    # Dolly's test split is cut from the training file by the same seeded split as SFT used.
    [ "$test" = dolly ] && [ "$TINY" != 1 ] && split=(--split test "${SPLIT[@]}")
    run $MINILLM evaluate --model "$OUT/$model" --data "${TESTS[$test]}" "${split[@]}" --metric rougeL --seeds 5 \
        --top-k 0 --top-p 1.0 --temperature 1.0 --no-repeat-ngram-size 6 "${EVAL_SIZE[@]}" \
        --out "$OUT/eval/$model-$test.json" --quiet
    results+=("$OUT/eval/$model-$test.json")
  done
done
# 6. compare (one table per test set)
for test in dolly self-inst vicuna sni unni; do
  run $MINILLM compare "$OUT"/eval/*-"$test".json --format markdown --baseline student-sft-$test
done
