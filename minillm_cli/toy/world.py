"""The synthetic world on disk: data splits, a tokenizer trained on them, freshly initialised
teacher and student, and plain text for the PT loss — everything `quickstart` and the tiny mode of
`examples/gpt2-dolly.sh` need, made locally in seconds.

    python -m minillm_cli.toy.world OUT [--seed 0] [--fast]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorldSize:
    n_train: int
    n_valid: int
    n_test: int
    n_pt_docs: int
    vocab_size: int
    teacher: tuple  # (n_layer, n_embd, n_head)
    student: tuple


# The student is much smaller than the teacher (about 1/20 of its non-embedding parameters) so that
# it cannot copy every mode of the teacher: the regime where forward and reverse KL part ways.
FULL = WorldSize(n_train=4000, n_valid=100, n_test=300, n_pt_docs=1500, vocab_size=768,
                 teacher=(4, 128, 4), student=(1, 48, 2))
FAST = WorldSize(n_train=2000, n_valid=60, n_test=150, n_pt_docs=600, vocab_size=768,
                 teacher=(3, 96, 4), student=(1, 48, 2))


def build_world(out: str | Path, *, seed: int = 0, size: WorldSize = FULL) -> dict[str, str]:
    """Write the world to `out` and return its paths (also saved as out/world.json)."""
    from minillm_cli.toy.task import corpus_texts, make_task, pretraining_text, write_jsonl
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_task(seed, size.n_train, size.n_valid, size.n_test)
    paths = {}
    for name, rows in splits.items():
        paths[name] = str(write_jsonl(rows, out / "data" / f"{name}.jsonl"))
    docs = pretraining_text(seed, size.n_pt_docs)
    pt = out / "data" / "pretrain.txt"
    pt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    paths["pretrain_text"] = str(pt)
    tok = train_bpe_tokenizer(corpus_texts(splits["train"] + splits["valid"]) + docs, out / "tokenizer",
                              vocab_size=size.vocab_size)
    for role, (L, E, H) in (("teacher", size.teacher), ("student", size.student)):
        make_gpt2(tok, out / f"{role}-init", n_layer=L, n_embd=E, n_head=H, n_positions=256,
                  seed=seed + (1 if role == "teacher" else 2))
        paths[f"{role}_init"] = str(out / f"{role}-init")
    paths["tokenizer"] = str(out / "tokenizer")
    (out / "world.json").write_text(json.dumps({"seed": seed, "size": size.__dict__, "paths": paths}, indent=2))
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true")
    a = ap.parse_args(argv)
    paths = build_world(a.out, seed=a.seed, size=FAST if a.fast else FULL)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
