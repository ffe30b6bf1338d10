"""Deterministic train/valid/test splits for data that comes as one file.

The permutation depends only on the number of examples and `seed`, so every command (sft,
distill, evaluate) that names the same data and split seed sees the same split."""
from __future__ import annotations

import random

from minillm_cli.errors import InputError

SPLITS = ("train", "valid", "test", "all")


def resolve_size(size: float, n: int, name: str) -> int:
    """A size given as a count (>= 1) or a fraction of n (0 <= size < 1)."""
    if size < 0:
        raise InputError(f"--{name}-size must be >= 0, got {size}")
    k = int(round(size * n)) if size < 1 else int(size)
    return min(k, n)


def split_examples(examples: list, *, valid_size: float = 0.05, test_size: float = 0.0,
                   seed: int = 1234) -> dict[str, list]:
    """train/valid/test of `examples`, sizes in examples. The turns of one conversation
    (`--turns all`: examples whose meta holds the same "conversation") go to one part together,
    whole conversations filling each part up to at least its size: a later turn's history holds
    the answers of the earlier ones, so a held-out turn with its conversation in training would be
    trained on as context, and a held-out conversation's earlier answers trained on as targets.
    Every other example is a part of its own, shuffled as before."""
    n = len(examples)
    nv, nt = resolve_size(valid_size, n, "valid"), resolve_size(test_size, n, "test")
    if nv + nt >= n:
        raise InputError(f"valid ({nv}) + test ({nt}) examples leave nothing to train on out of {n}")
    groups: dict = {}  # conversation (or the example's index) -> its examples' indices, in data order
    for i, e in enumerate(examples):
        key = getattr(e, "meta", {}).get("conversation")
        groups.setdefault(("#", i) if key is None else key, []).append(i)
    members = list(groups.values())
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)  # (one example per group: the permutation of the examples, as before)
    parts: dict[str, list[int]] = {"test": [], "valid": [], "train": []}
    for g in order:
        part = "test" if len(parts["test"]) < nt else "valid" if len(parts["valid"]) < nv else "train"
        parts[part] += members[g]
    if not parts["train"]:
        raise InputError(f"valid ({nv}) + test ({nt}) examples, in whole conversations, leave nothing to train on "
                         f"out of {n} ({len(members)} conversations)")
    out = {k: [examples[i] for i in sorted(v)] for k, v in parts.items()}
    return {**out, "all": list(examples)}
