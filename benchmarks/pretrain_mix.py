"""Throughput of `pretrain-mix` against the naive pipeline, in one run on the same text.

    python benchmarks/pretrain_mix.py [--mb 50] [--tokenizer DIR] [--workers N] [--seq-len 512]

Text: local files on this machine (Python sources and docs under sys.prefix and /usr/share/doc),
one document per file, written once to a .jsonl of at least --mb MB. Tokenizer: --tokenizer, or
a byte-level BPE (vocabulary 8192) trained here on the first 2 MB (no Hub access needed).
Ours: `build_mixture` end to end (read, tokenise in --workers processes, pack into --seq-len
chunks, write). Naive: `datasets.load_dataset("json")` → `.map(tokenizer, batched=True)` (special-
token text kept as text, as ours does) with EOS appended → concatenate all ids → cut into chunks. Both must give the same chunks; MB/s counts the
UTF-8 bytes of document text over wall time.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOTS = [Path(sys.prefix), Path(sys.base_prefix) / "lib", Path("/usr/share/doc"), Path("/usr/lib/python3")]
SUFFIXES = {".py", ".txt", ".md", ".rst"}


def make_corpus(path: Path, mb: float) -> tuple[int, int]:
    """Write local text files as {"text": ...} lines until `mb` MB of text; -> (docs, bytes)."""
    want, total, n, seen = int(mb * 1e6), 0, 0, set()
    with open(path, "w", encoding="utf-8") as out:
        for root in ROOTS:
            for f in sorted(root.rglob("*")) if root.is_dir() else []:
                if total >= want:
                    return n, total
                if f.suffix not in SUFFIXES or not f.is_file() or f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                try:
                    text = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    out.write(json.dumps({"text": text}) + "\n")
                    total += len(text.encode("utf-8"))
                    n += 1
    if total < want:
        sys.exit(f"only {total / 1e6:.1f} MB of local text found; pass a smaller --mb")
    return n, total


def train_tokenizer(corpus: Path, out: Path) -> None:
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    texts, size = [], 0
    for line in open(corpus, encoding="utf-8"):
        texts.append(json.loads(line)["text"])
        size += len(texts[-1])
        if size > 2e6:
            break
    train_bpe_tokenizer(texts, out, vocab_size=8192)


def naive(corpus: Path, tokenizer, seq_len: int, cache: Path) -> np.ndarray:
    import datasets

    eos = tokenizer.eos_token_id
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    # split_special_tokens: as ours, special-token text in a document (Python sources here hold
    # "<|endoftext|>") is text, not the special id
    ds = ds.map(lambda b: {"input_ids": [x + [eos] for x in tokenizer(b["text"], add_special_tokens=False,
                                                                       split_special_tokens=True)["input_ids"]]},
                batched=True, remove_columns=ds.column_names)
    ids = np.fromiter(itertools.chain.from_iterable(ds["input_ids"]), dtype=np.uint16)
    return ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from datasets.utils.logging import disable_progress_bar

    from minillm_cli.data.pretrain_build import PretrainMixConfig, build_mixture
    from minillm_cli.models import load_tokenizer

    disable_progress_bar()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-pretrain-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    n_docs, n_bytes = make_corpus(corpus, args.mb)
    tok_dir = args.tokenizer or str(work / "tokenizer")
    if args.tokenizer is None:
        train_tokenizer(corpus, work / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    assert len(tokenizer) <= 1 << 16, "the naive path here writes uint16"
    print(f"corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB; tokenizer {tok_dir} "
          f"(vocabulary {len(tokenizer)}); machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_implementation()} {platform.python_version()}", flush=True)

    t = time.perf_counter()
    cfg = PretrainMixConfig(sources=[str(corpus)], tokenizer=tok_dir, out=str(work / "ours"),
                            seq_len=args.seq_len, workers=args.workers, valid_fraction=0.0, overwrite=True)
    meta = build_mixture(cfg)
    ours_s = time.perf_counter() - t
    ours = np.memmap(work / "ours" / "tokens.bin", dtype=np.uint16, mode="r").reshape(-1, args.seq_len)

    t = time.perf_counter()
    base = naive(corpus, tokenizer, args.seq_len, work / "hf-cache")
    naive_s = time.perf_counter() - t

    same = base.shape == ours.shape and bool(np.array_equal(base, ours))
    mb = n_bytes / 1e6
    print(f"ours  (pretrain-mix, {args.workers} workers): {ours_s:7.2f} s  {mb / ours_s:7.2f} MB/s  "
          f"{meta['total_tokens'] / ours_s:,.0f} tokens/s")
    print(f"naive (datasets.map batched + concat):   {naive_s:7.2f} s  {mb / naive_s:7.2f} MB/s  "
          f"{base.size / naive_s:,.0f} tokens/s")
    print(f"speed-up {naive_s / ours_s:.2f}x; {meta['num_chunks']} chunks of {args.seq_len}; "
          f"identical chunks: {same}")
    if not same:
        sys.exit("the two pipelines disagree")


if __name__ == "__main__":
    main()
