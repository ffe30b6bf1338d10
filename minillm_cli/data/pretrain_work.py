"""The CPU-bound half of `pretrain-mix`, run in worker processes: parse a job's records and
tokenise its documents, EOS after each one, into one flat numpy array.

Imports stay light (json, numpy, tokenizers) because every spawned worker imports this module.
A fast tokenizer travels to the workers as its JSON serialisation and is used through the Rust
backend's `encode_batch_fast` (no offsets computed), which gives the same ids as
`tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`. Slow tokenizers travel
pickled. Special-token text inside a document (`<|endoftext|>` in a page about tokenizers) is
encoded as the plain text it is: as the special id it would put an EOS or a pad id mid-document,
and the PT loss would train on it. EOS goes in by id, after each document.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from minillm_cli.errors import InputError

_STATE: dict[str, Any] = {}


def tokenizer_payload(tokenizer) -> tuple[str, Any]:
    """What a worker needs to rebuild `tokenizer`: ("fast", backend JSON) or ("slow", tokenizer)."""
    if getattr(tokenizer, "is_fast", False):
        return ("fast", tokenizer.backend_tokenizer.to_str())
    return ("slow", tokenizer)


def init_worker(payload: tuple[str, Any], eos_id: int, dtype: str) -> None:
    """Pool initializer (also called in-process when --workers 0)."""
    # one process per core already: Rust-side threads would only fight over the same cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    kind, obj = payload
    if kind == "fast":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(obj)
        backend.encode_special_tokens = True  # (what split_special_tokens=True sets)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        _STATE["encode"] = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
    else:
        _STATE["encode"] = lambda texts: obj(texts, add_special_tokens=False,
                                             split_special_tokens=True)["input_ids"]
    _STATE["eos"] = eos_id
    _STATE["dtype"] = np.dtype(dtype)


def init_pool_worker(payload: tuple[str, Any], eos_id: int, dtype: str) -> None:
    """Pool initializer of a worker process: `init_worker`, with Ctrl-C left to the main process.
    A terminal's Ctrl-C reaches the whole process group: a worker that took it would print its
    own KeyboardInterrupt traceback, while the main process stops the pool anyway."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(payload, eos_id, dtype)


def job_texts(job: tuple) -> list[str]:
    """The documents of one job; JSON records are parsed here, with file:line on any error."""
    if job[0] == "texts":
        return job[2]
    _, path, first, lines, field = job
    texts = []
    for n, raw in enumerate(lines, start=first):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (spreadsheet exports)
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or field not in row:
            fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise InputError(f"{path}:{n}: no field {field!r} (fields: {fields}); pass --text-field")
        value = row[field]
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape ("\ud800"): JSON reads it, UTF-8 has no such text
                raise InputError(f"{path}:{n}: field {field!r} holds {value[e.start]!r} at character {e.start + 1}, "
                                 "half of a UTF-16 surrogate pair, which is no text") from None
            texts.append(value)
        elif value is not None:
            raise InputError(f"{path}:{n}: field {field!r} is {type(value).__name__}, not text")
    return texts


def encode_job(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (token ids with EOS after every document, each document's token count (its EOS
    included), each document's UTF-8 bytes): the counts let meta.json say how many documents,
    and which bytes, the mixture holds when it stops mid-source. Empty documents are skipped:
    they would only add a lone EOS."""
    texts = [t for t in job_texts(job) if t]
    n_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    if not texts:
        return np.zeros(0, dtype=_STATE["dtype"]), np.zeros(0, dtype=np.int64), n_bytes
    ids = _STATE["encode"](texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=_STATE["dtype"])
    ends = np.cumsum(lengths)
    pos = 0
    for seq, end in zip(ids, ends):
        out[pos:end - 1] = seq
        pos = int(end)
    out[ends - 1] = _STATE["eos"]
    return out, lengths, n_bytes
