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
    n = len(examples)
    nv, nt = resolve_size(valid_size, n, "valid"), resolve_size(test_size, n, "test")
    if nv + nt >= n:
        raise InputError(f"valid ({nv}) + test ({nt}) examples leave nothing to train on out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = [examples[i] for i in sorted(order[:nt])]
    valid = [examples[i] for i in sorted(order[nt : nt + nv])]
    train = [examples[i] for i in sorted(order[nt + nv :])]
    return {"train": train, "valid": valid, "test": test, "all": list(examples)}
