#!/usr/bin/env bash
# The product's own path on a GPU, tiny models: `distill` (MiniLLM, --sampler auto: static caches +
# CUDA graph), the same under FSDP2 on one process (torchrun), and `evaluate` with the student.
# Prints each command's JSON summary; exit 1 on the first failure.
#   bash benchmarks/gpu_cli_check.sh [workdir]      (from the repository root; DEVICE=cpu to try it here)
set -eu
W="${1:-$(mktemp -d)}"; DEV="${DEVICE:-cuda}"; PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - "$W" <<'PYEOF'
import json, sys
from pathlib import Path
from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer
w = Path(sys.argv[1])
rows = [{"instruction": f"Name item number {i} of the list.", "context": "apple, pear, plum." if i % 3 == 0 else "",
         "response": f"Item {i} is an apple." if i % 2 else "A pear.", "category": "open_qa"} for i in range(64)]
(w / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
tok = train_bpe_tokenizer([r["instruction"] + " " + r["response"] for r in rows] * 4, w / "tok", vocab_size=384)
make_gpt2(tok, w / "teacher", n_layer=4, n_embd=128, n_head=4, seed=1)
make_gpt2(tok, w / "student", n_layer=2, n_embd=64, n_head=2, seed=2)
PYEOF
COMMON=(--teacher "$W/teacher" --student "$W/student" --data "$W/data.jsonl" --batch-size 8 --num-rollouts 16
        --max-new-tokens 24 --limit 48 --steps 3 --eval-prompts 8 --quiet --json --device "$DEV")
echo "-- distill --sampler auto --no-cache-teacher-logits --select-by rougeL (validation ROUGE-L each step)"
"$PY" -m minillm_cli distill "${COMMON[@]}" --sampler auto --no-cache-teacher-logits --select-by rougeL --eval-every 1 \
    --out "$W/plain"
echo "-- distill --sampler auto --cache-teacher-logits"
"$PY" -m minillm_cli distill "${COMMON[@]}" --sampler auto --cache-teacher-logits --out "$W/cached"
echo "-- distill --sampler auto --cache-teacher-logits --no-update-graphs (the eager micro-steps)"
"$PY" -m minillm_cli distill "${COMMON[@]}" --sampler auto --cache-teacher-logits --no-update-graphs --out "$W/eager"
echo "-- distill --fsdp (torchrun, 1 process)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m minillm_cli distill "${COMMON[@]}" --fsdp --out "$W/fsdp"
echo "-- evaluate --sampler auto"
"$PY" -m minillm_cli evaluate --model "$W/plain" --data "$W/data.jsonl" --limit 32 --metric exact-match \
    --metric lm-loss --seeds 2 --sampler auto --device "$DEV" --json --out "$W/eval.json"
echo "-- cli check ok"
