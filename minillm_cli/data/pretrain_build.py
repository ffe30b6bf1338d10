"""Build a pre-training mixture: tokenise several sources in worker processes, pack each source's
documents (EOS after each) into `seq_len` chunks across document borders, interleave the chunks
by weight, and write one memory-mapped token file plus `meta.json`.

Mixing is per chunk: every chunk holds one source's text, so a long document is never cut by
another source's text without an EOS, and token counts track the weights to within one chunk.
Next chunk comes from the active source with the largest deficit share·(chunks+1) − own chunks;
a source that runs out is reported and the rest keep their relative weights (a warning when the
shares then end up off the weights). A source that gives no chunk at all is an error. Each
source's last partial chunk is dropped (counted in meta as `dropped_tokens`, with the cut-off
rest of the last document when --max-tokens stops a source mid-document).

The output is built in a hidden sibling folder and renamed at the end, so an interrupted build
never looks complete. Layout: `tokens.bin` (uint16 or uint32, train chunks then valid chunks),
`chunk_sources.npy` (source index of each chunk, same order), `meta.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from minillm_cli.data.pretrain_sources import Source, SourceSpec, check_overlap, parse_source
from minillm_cli.errors import InputError, RunError, require
from minillm_cli.progress import Progress

FORMAT = "minillm-pretrain-mix"
VERSION = 1
TOKEN_FILE = "tokens.bin"
SOURCE_FILE = "chunk_sources.npy"


@dataclass
class PretrainMixConfig:
    sources: list[str]
    tokenizer: str
    out: str
    seq_len: int = 512
    max_tokens: Optional[int] = None
    text_field: str = "text"
    split_blank_lines: bool = False
    workers: Optional[int] = None  # None: one per core; 0: tokenise in this process
    valid_fraction: float = 0.01
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False
    specs: list[SourceSpec] = field(init=False)

    def __post_init__(self):
        require(len(self.sources) > 0, "--source: give at least one source")
        self.specs = [parse_source(s) for s in self.sources]
        names = [str(Path(spec.name).expanduser().resolve()) if Path(spec.name).expanduser().exists() else spec.name
                 for spec in self.specs]
        twice = sorted({spec.name for spec, n in zip(self.specs, names) if names.count(n) > 1})
        require(not twice, f"--source {', '.join(twice)}: given more than once (its documents would be read "
                           f"twice); give it once, with a weight")
        require(self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}")
        require(self.max_tokens is None or self.max_tokens >= self.seq_len,
                f"--max-tokens ({self.max_tokens}) must be at least --seq-len ({self.seq_len})")
        require(0.0 <= self.valid_fraction < 0.5,
                f"--valid-fraction must be in [0, 0.5), got {self.valid_fraction}")
        if self.workers is None:
            self.workers = min(os.cpu_count() or 1, 16)
        require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        require(bool(self.text_field), "--text-field must not be empty")
        out = Path(self.out).expanduser()
        require(not out.exists() or out.is_dir(), f"--out {self.out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            # --overwrite replaces the whole folder: only one this command wrote, holding no input
            require(self.overwrite, f"--out {self.out}: folder is not empty (pass --overwrite to replace it)")
            require(_is_mixture(out), f"--out {self.out}: not a pretrain-mix folder (no meta.json of ours); "
                                      f"refusing to replace it even with --overwrite")
            from minillm_cli.config import inputs_inside

            inside = inputs_inside(out, [*(("--source", spec.name) for spec in self.specs),
                                         ("--tokenizer", self.tokenizer)])
            require(not inside, f"--out {self.out}: holds {', '.join(inside)}, which --overwrite would delete; "
                                f"write the mixture to another folder")


def _is_mixture(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class _Stream:
    """One source's tokens, arriving from the pool in job order (so output never depends on the
    number of workers), served as `seq_len` chunks. It keeps each document's place in the token
    stream for the jobs the buffer still holds, so meta.json counts the documents (and bytes)
    that are in the mixture, not all that were tokenised."""

    def __init__(self, source: Source, submit: Callable, seq_len: int, prefetch: int, dtype):
        self.source, self.submit, self.seq_len, self.prefetch = source, submit, seq_len, prefetch
        self.jobs = source.jobs()
        self.pending: deque = deque()
        self.buf = np.zeros(0, dtype=dtype)
        self.pos = 0
        self.done_reading = False
        self.bytes_read = self.tokens_read = self.chunks = 0
        self.docs: deque = deque()  # (first token, document ends, document bytes) per job not yet in chunks
        self.documents = self.text_bytes = 0  # documents wholly in chunks (jobs folded out of `docs`)
        self.exhausted = False
        self._fill()

    def _fill(self) -> None:
        while not self.done_reading and len(self.pending) < self.prefetch:
            job = next(self.jobs, None)
            if job is None:
                self.done_reading = True
            else:
                self.pending.append(self.submit(job))

    def next_chunk(self) -> Optional[np.ndarray]:
        while len(self.buf) - self.pos < self.seq_len:
            if not self.pending:
                self.exhausted = True
                return None
            ids, lengths, nbytes = self.pending.popleft().get()
            self._fill()
            if len(lengths):
                self.docs.append((self.tokens_read, self.tokens_read + np.cumsum(lengths), nbytes))
            self.bytes_read += int(nbytes.sum())
            self.tokens_read += len(ids)
            self.buf = np.concatenate([self.buf[self.pos:], ids])
            self.pos = 0
        chunk = self.buf[self.pos:self.pos + self.seq_len]
        self.pos += self.seq_len
        self.chunks += 1
        while self.docs and self.docs[0][1][-1] <= self.chunks * self.seq_len:  # a job wholly in chunks
            _, ends, nbytes = self.docs.popleft()
            self.documents += len(ends)
            self.text_bytes += int(nbytes.sum())
        return chunk

    def in_mixture(self) -> tuple[int, int, int]:
        """(documents with at least one token in the chunks, their UTF-8 bytes, tokens cut off at
        the end: for a source read to the end its last partial chunk, else the rest of its last
        document, which the chunks hold only in part)."""
        used = self.chunks * self.seq_len
        documents, text_bytes, cut_end = self.documents, self.text_bytes, used
        for first, ends, nbytes in self.docs:
            k = int(np.searchsorted(np.concatenate(([first], ends[:-1])), used))  # documents starting before `used`
            documents += k
            text_bytes += int(nbytes[:k].sum())
            if k:
                cut_end = max(cut_end, int(ends[k - 1]))
        return documents, text_bytes, (self.tokens_read if self.exhausted else cut_end) - used


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache of uint32), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def pick_source(weights: list[float], chunks: list[int], active: list[bool]) -> int:
    """Index of the active source furthest behind its share of the active sources' chunks
    (ties go to the earlier source)."""
    total_w = sum(w for w, a in zip(weights, active) if a)
    total_c = sum(c for c, a in zip(chunks, active) if a)
    best, best_deficit = -1, -float("inf")
    for i, (w, c, a) in enumerate(zip(weights, chunks, active)):
        if a:
            deficit = w / total_w * (total_c + 1) - c
            if deficit > best_deficit + 1e-12:
                best, best_deficit = i, deficit
    return best


def build_mixture(cfg: PretrainMixConfig, *, progress=None) -> dict:
    """Build the mixture described by `cfg` into `cfg.out`; return meta.json's content."""
    from minillm_cli.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    eos = tokenizer.eos_token_id
    require(eos is not None, f"--tokenizer {cfg.tokenizer}: has no EOS token to mark document borders")
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1))
    sources = [Source(s, text_field=cfg.text_field, split_blank_lines=cfg.split_blank_lines)
               for s in cfg.specs]
    check_overlap(sources)
    for s in sources:
        s.check()

    out = Path(cfg.out).expanduser().resolve()  # (the folder the config checked)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise InputError(f"--out {cfg.out}: cannot create the folder ({e.strerror or e})") from None
    try:
        meta = _build_into(tmp, cfg, tokenizer, sources, dtype, progress)
        if out.exists():
            shutil.rmtree(out)  # only reached with --overwrite or an empty folder (config checks)
        os.rename(tmp, out)
        line = share_warning(meta)
        if line:  # (a warning --quiet keeps: the result is not what the weights say)
            (progress or Progress("pretrain-mix")).warn(line)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(tmp: Path, cfg, tokenizer, sources, dtype, progress) -> dict:
    from minillm_cli.data.pretrain_read import fingerprint
    from minillm_cli.data.pretrain_work import encode_job, init_pool_worker, init_worker, tokenizer_payload

    L = cfg.seq_len
    max_chunks = None if cfg.max_tokens is None else cfg.max_tokens // L
    # one valid chunk at a seeded position in every block of `every` chunks: exact, spread out
    every = 0 if cfg.valid_fraction == 0 else max(2, round(1 / cfg.valid_fraction))
    if every and max_chunks is not None:
        every = max(2, min(every, max_chunks))
    rng = np.random.default_rng(cfg.seed)
    init_args = (tokenizer_payload(tokenizer), tokenizer.eos_token_id, dtype.name)

    pool = None
    if cfg.workers > 0:
        import multiprocessing as mp

        # spawn: the parent may hold Rust/torch thread pools that a fork would copy mid-flight
        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=init_pool_worker, initargs=init_args)
        submit = lambda job: pool.apply_async(encode_job, (job,))
    else:
        init_worker(*init_args)
        submit = lambda job: _Done(encode_job(job))
    prefetch = max(2, 2 * cfg.workers)

    t0 = time.perf_counter()
    weights = [s.spec.weight for s in sources]
    code = "B" if len(sources) < 256 else "I"  # compact: one byte per chunk for <256 sources
    chunk_src = {"train": array(code), "valid": array(code)}
    n, valid_at, last_shown = 0, 0, 0.0
    if progress is not None:
        progress.start(max_chunks * L if max_chunks else None)
    try:
        streams = [_Stream(s, submit, L, prefetch, dtype) for s in sources]
        active = [True] * len(streams)
        with open(tmp / TOKEN_FILE, "wb", buffering=1 << 22) as ftrain, \
                open(tmp / "valid.part", "wb", buffering=1 << 22) as fvalid:
            while any(active) and (max_chunks is None or n < max_chunks):
                i = pick_source(weights, [s.chunks for s in streams], active)
                chunk = streams[i].next_chunk()
                if chunk is None:
                    active[i] = False
                    # (said now, before the rest is tokenised: the result would lack a source asked for)
                    require(streams[i].chunks > 0,
                            f"--source {sources[i].spec.name}: fewer than --seq-len ({L}) tokens "
                            f"({streams[i].tokens_read}, an EOS after each document): none of it would be "
                            f"in the mixture; lower --seq-len or leave the source out")
                    if progress is not None:
                        rest = "; the others keep their relative weights" if any(active) else ""
                        progress.log(f"source {sources[i].spec.name} ran out after "
                                     f"{streams[i].chunks * L} tokens{rest}")
                    continue
                if every and n % every == 0:
                    valid_at = n + int(rng.integers(every))
                split = "valid" if every and n == valid_at else "train"
                (fvalid if split == "valid" else ftrain).write(chunk.tobytes())
                chunk_src[split].append(i)
                n += 1
                now = time.perf_counter()
                if progress is not None and now - last_shown > 0.2:
                    last_shown = now
                    _show(progress, n * L, sum(s.bytes_read for s in streams), now - t0)
    finally:
        if pool is not None:
            stop_pool(pool)
    seconds = time.perf_counter() - t0
    # (every source that ran out gave a chunk, or we stopped above: so n > 0 here)
    for s in streams:
        require(s.chunks > 0, f"--source {s.source.spec.name}: no chunk of it is in the first --max-tokens "
                              f"({cfg.max_tokens}): weight {s.source.spec.weight:g} of {sum(weights):g} is too "
                              f"small a share of {n} chunks for one of them; raise its weight or --max-tokens")
    _append(tmp / TOKEN_FILE, tmp / "valid.part")
    order = np.concatenate([np.frombuffer(chunk_src[k], dtype=np.uint8 if code == "B" else np.uint32)
                            for k in ("train", "valid")])
    np.save(tmp / SOURCE_FILE, order)
    if progress is not None:
        _show(progress, n * L, sum(s.bytes_read for s in streams), seconds)
        progress.close()

    total_bytes = sum(s.bytes_read for s in streams)  # (what was read and tokenised: the speed)
    counts = [s.in_mixture() for s in streams]
    meta = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": cfg.tokenizer, "tokenizer_fingerprint": fingerprint(tokenizer),
        "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype.name, "seq_len": L,
        "num_chunks": n, "splits": {k: len(v) for k, v in chunk_src.items()},
        "total_tokens": n * L, "max_tokens": cfg.max_tokens,
        "valid_fraction": cfg.valid_fraction, "seed": cfg.seed,
        "token_file": TOKEN_FILE, "chunk_source_file": SOURCE_FILE,
        "sources": [{
            "name": s.source.spec.name, "kind": s.source.kind, "weight": s.source.spec.weight,
            "tokens": s.chunks * L, "share": round(s.chunks / n, 6), "documents": docs,
            "text_bytes": nbytes, "dropped_tokens": dropped, "exhausted": s.exhausted,
        } for s, (docs, nbytes, dropped) in zip(streams, counts)],
        "build": {"workers": cfg.workers, "seconds": round(seconds, 3),
                  "tokens_per_s": round(n * L / max(seconds, 1e-9)),
                  "mb_per_s": round(total_bytes / 1e6 / max(seconds, 1e-9), 3)},
    }
    # meta.json last: a folder without it is never a finished build
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def share_warning(meta: dict) -> Optional[str]:
    """A warning line when the weights differ and a source's share of the chunks is more than
    two chunks off its weight's share: a source ran out first, or there was no --max-tokens."""
    rows, n = meta["sources"], meta["num_chunks"]
    weights = [r["weight"] for r in rows]
    if len(set(weights)) < 2:
        return None
    target = [w / sum(weights) for w in weights]
    if all(abs(r["tokens"] // meta["seq_len"] - t * n) <= 2 for r, t in zip(rows, target)):
        return None
    ran_out = ", ".join(f"{r['name']} ran out after {r['tokens']} tokens" for r in rows if r["exhausted"])
    if meta["max_tokens"] is None:
        why = "without --max-tokens every source is used whole and the weights only set the order"
    else:
        why = f"{ran_out or 'a source ran out'} before --max-tokens ({meta['max_tokens']})"
    asked = ", ".join(f"{r['name']} {100 * t:.1f}% (weight {r['weight']:g})" for r, t in zip(rows, target))
    got = ", ".join(f"{100 * r['share']:.1f}%" for r in rows)
    return f"the weights ask for {asked}; the mixture holds {got}: {why}"


def stop_pool(pool, wait: float = 5.0) -> None:
    """`pool.terminate()` that cannot hang the command. A worker killed while it sends a result
    (jobs are still in flight when --max-tokens is reached, on Ctrl-C, or when another job fails)
    leaves the pool's result thread waiting for the rest of that message, and terminate() joins
    that thread for ever. The workers are killed before that join, so after `wait` seconds it is
    left to itself (a daemon thread: it does not keep the process alive)."""
    import threading

    stopper = threading.Thread(target=pool.terminate, name="pretrain-mix pool stop", daemon=True)
    stopper.start()
    stopper.join(wait)


class _Done:
    """In-process stand-in for an AsyncResult (--workers 0)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _append(dst: Path, part: Path) -> None:
    with open(dst, "ab") as out, open(part, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 22)
    part.unlink()
    try:
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise RunError(f"{dst}: could not flush to disk ({e.strerror})") from None


def _show(progress, tokens: int, nbytes: int, seconds: float) -> None:
    s = max(seconds, 1e-9)
    progress.update(tokens, **{"tok/s": f"{tokens / s:,.0f}", "MB/s": f"{nbytes / 1e6 / s:.2f}"})
