"""Read a finished `pretrain-mix` folder for the PT loss, without loading it into memory.

    data = PretrainData(dir)              # InputError unless DIR is a finished build
    data.check_tokenizer(student_tok)     # InputError naming the mismatch
    idx = data.indices_for_step(step, batch_size, seed)   # the same on every process
    ids = data.batch(idx)                 # LongTensor [B, seq_len]

Chunks are read through `np.memmap`, so only the rows a batch touches are paged in.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from minillm_cli.errors import InputError

SPLITS = ("train", "valid")


def fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id, added tokens included) and the special tokens:
    equal fingerprints mean the ids in a token file mean the same strings to this tokenizer.
    The pad token is left out: `models.load_tokenizer` may add one, and pad never occurs in the
    packed chunks, so whether it was added must not make the same vocabulary look different."""
    pad = tokenizer.pad_token if tokenizer.pad_token != tokenizer.eos_token else None
    vocab = sorted(((t, i) for t, i in tokenizer.get_vocab().items() if t != pad),
                   key=lambda kv: (kv[1], kv[0]))
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items()) if k != "pad_token"}
    blob = json.dumps({"vocab": vocab, "special": special, "eos": tokenizer.eos_token_id},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def indices_for_step(step: int, batch_size: int, seed: int, num_chunks: int) -> list[int]:
    """Chunk indices of global batch `step`: consecutive slices of a seeded permutation of all
    chunks, a fresh permutation each epoch. Depends only on its arguments, so every process (and
    a resumed run) agrees; each process then takes its own micro-batches out of it."""
    if num_chunks <= 0:
        raise InputError("pretraining data has no chunks in this split")
    if batch_size <= 0 or step < 0:
        raise ValueError(f"need step >= 0 and batch_size > 0, got {step}, {batch_size}")
    start = step * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, k = divmod(pos, num_chunks)
        out.append(int(_permutation(seed, epoch, num_chunks)[k]))
    return out


@lru_cache(maxsize=2)  # the current epoch, and the next one at an epoch border
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm.astype(np.uint32 if n < 1 << 32 else np.int64)


class PretrainData:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not self.path.is_dir():
            raise InputError(f"--pt-data {path}: no such folder")
        if not meta_file.is_file():
            raise InputError(f"--pt-data {path}: not a finished pretrain-mix folder (no meta.json); "
                             "build one with `minillm pretrain-mix`")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{meta_file}: unreadable ({e})") from None
        from minillm_cli.data.pretrain_build import FORMAT

        m = self.meta
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise InputError(f"{meta_file}: not a pretrain-mix meta.json")
        self.seq_len = int(m["seq_len"])
        self.splits = {k: int(m["splits"][k]) for k in SPLITS}
        dtype = np.dtype(m["dtype"])
        token_file = self.path / m["token_file"]
        expected = m["num_chunks"] * self.seq_len * dtype.itemsize
        size = token_file.stat().st_size if token_file.is_file() else -1
        if size != expected:
            raise InputError(f"{token_file}: {size} bytes, meta.json says {expected}; rebuild it")
        self.tokens = np.memmap(token_file, dtype=dtype, mode="r",
                                shape=(m["num_chunks"], self.seq_len))

    def num_chunks(self, split: str = "train") -> int:
        return self.splits[_check_split(split)]

    def _rows(self, indices: Sequence[int], split: str) -> np.ndarray:
        n = self.num_chunks(split)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{split} chunk index out of range [0, {n})")
        return idx + (0 if split == "train" else self.splits["train"])

    def batch(self, indices: Sequence[int], split: str = "train"):
        """LongTensor [B, seq_len] of the given chunks of `split`."""
        import torch

        rows = self.tokens[self._rows(indices, split)]  # fancy indexing copies just these rows
        return torch.from_numpy(rows.astype(np.int64))

    def sources_of(self, indices: Sequence[int], split: str = "train") -> np.ndarray:
        """Source index (into meta["sources"]) of each given chunk."""
        src = np.load(self.path / self.meta["chunk_source_file"], mmap_mode="r")
        return np.asarray(src[self._rows(indices, split)])

    def indices_for_step(self, step: int, batch_size: int, seed: int, split: str = "train") -> list[int]:
        return indices_for_step(step, batch_size, seed, self.num_chunks(split))

    def check_tokenizer(self, tokenizer) -> None:
        """InputError unless `tokenizer` has the vocabulary the data was built with."""
        want, got = self.meta["tokenizer_fingerprint"], fingerprint(tokenizer)
        if want != got:
            raise InputError(
                f"--pt-data {self.path}: built with tokenizer {self.meta['tokenizer']} "
                f"(vocabulary {self.meta['vocab_size']}, fingerprint {want}), but this tokenizer has "
                f"vocabulary {len(tokenizer)}, fingerprint {got}; rebuild it with the student's tokenizer")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
