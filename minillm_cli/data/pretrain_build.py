"""Build a pre-training mixture: tokenise several sources in worker processes, pack each source's
documents (EOS after each) into `seq_len` chunks across document borders, interleave the chunks
by weight, and write one memory-mapped token file plus `meta.json`.

Mixing is per chunk: every chunk holds one source's text, so a long document is never cut by
another source's text without an EOS, and token counts track the weights to within one chunk.
Next chunk comes from the active source with the largest deficit share·(chunks+1) − own chunks;
a source that runs out is reported and the rest keep their relative weights. Each source's last
partial chunk is dropped (counted in meta as `dropped_tokens`).

The output is built in a hidden sibling folder and renamed at the end, so an interrupted build
never looks complete. Layout: `tokens.bin` (uint16 or uint32, train chunks then valid chunks),
`chunk_sources.npy` (source index of each chunk, same order), `meta.json`.
"""
from __future__ import annotations

import json
import os
from array import array
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from minillm_cli.data.pretrain_sources import Source, SourceSpec, parse_source
from minillm_cli.errors import InputError, RunError, require

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
    number of workers), served as `seq_len` chunks."""

    def __init__(self, source: Source, submit: Callable, seq_len: int, prefetch: int, dtype):
        self.source, self.submit, self.seq_len, self.prefetch = source, submit, seq_len, prefetch
        self.jobs = source.jobs()
        self.pending: deque = deque()
        self.buf = np.zeros(0, dtype=dtype)
        self.pos = 0
        self.done_reading = False
        self.documents = self.bytes = self.tokens_read = self.chunks = 0
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
            ids, docs, nbytes = self.pending.popleft().get()
            self._fill()
            self.documents += docs
            self.bytes += nbytes
            self.tokens_read += len(ids)
            self.buf = np.concatenate([self.buf[self.pos:], ids])
            self.pos = 0
        chunk = self.buf[self.pos:self.pos + self.seq_len]
        self.pos += self.seq_len
        self.chunks += 1
        return chunk


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
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(tmp: Path, cfg, tokenizer, sources, dtype, progress) -> dict:
    from minillm_cli.data.pretrain_read import fingerprint
    from minillm_cli.data.pretrain_work import encode_job, init_worker, tokenizer_payload

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
        pool = mp.get_context("spawn").Pool(cfg.workers, initializer=init_worker, initargs=init_args)
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
                    _show(progress, n * L, sum(s.bytes for s in streams), now - t0)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    if n == 0:
        raise InputError("the sources hold fewer than --seq-len tokens each: nothing to write")
    _append(tmp / TOKEN_FILE, tmp / "valid.part")
    order = np.concatenate([np.frombuffer(chunk_src[k], dtype=np.uint8 if code == "B" else np.uint32)
                            for k in ("train", "valid")])
    np.save(tmp / SOURCE_FILE, order)
    if progress is not None:
        _show(progress, n * L, sum(s.bytes for s in streams), seconds)
        progress.close()

    total_bytes = sum(s.bytes for s in streams)
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
            "tokens": s.chunks * L, "share": round(s.chunks / n, 6), "documents": s.documents,
            "text_bytes_read": s.bytes, "dropped_tokens": (s.tokens_read - s.chunks * L) if s.exhausted else 0,
            "exhausted": s.exhausted,
        } for s in streams],
        "build": {"workers": cfg.workers, "seconds": round(seconds, 3),
                  "tokens_per_s": round(n * L / max(seconds, 1e-9)),
                  "mb_per_s": round(total_bytes / 1e6 / max(seconds, 1e-9), 3)},
    }
    # meta.json last: a folder without it is never a finished build
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


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
