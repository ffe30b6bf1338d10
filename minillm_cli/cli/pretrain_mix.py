"""Build a pre-training mixture for the PT loss (`distill --pt-data DIR`).

Each --source SRC[:WEIGHT] is a local .txt/.jsonl/.parquet file or folder, or a Hub dataset id
(streamed; NAME#CONFIG picks a configuration). Documents are tokenised with EOS after each one,
packed into --seq-len chunks across document borders, and the sources interleaved by weight.
DIR gets tokens.bin (memory-mapped chunks, a held-out validation slice at the end) and meta.json.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import typer

from minillm_cli.cli.common import Debug, Device, JsonOut, Quiet, Seed, out_json, run_command


def command(
    source: List[str] = typer.Option(..., "--source", "-s", help="SRC[:WEIGHT]; repeat for several sources (weight 1 by default)."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer (Hub id or local folder): the student's."),
    out: str = typer.Option(..., "--out", help="Output folder."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per chunk."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens in all."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in .jsonl/.parquet/Hub sources."),
    split_blank_lines: bool = typer.Option(False, "--split-blank-lines", help="In .txt files, each blank-line-separated block is a document (default: each file)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokeniser processes (default: one per core, at most 16; 0: none)."),
    valid_fraction: float = typer.Option(0.01, "--valid-fraction", help="Share of chunks held out for validation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier pretrain-mix folder (its meta.json) that holds none of the sources or the tokenizer."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom tokenizer code from the Hub."),
    seed: Seed = 0,
    device: Device = "auto",  # accepted for the common contract; tokenisation runs on CPU workers
    json_out: JsonOut = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    def body():
        from minillm_cli.data.pretrain_build import PretrainMixConfig, build_mixture
        from minillm_cli.progress import Progress

        cfg = PretrainMixConfig(
            sources=list(source), tokenizer=tokenizer, out=out, seq_len=seq_len,
            max_tokens=max_tokens, text_field=text_field, split_blank_lines=split_blank_lines,
            workers=workers, valid_fraction=valid_fraction, seed=seed, overwrite=overwrite,
            trust_remote_code=trust_remote_code,
        )
        meta = build_mixture(cfg, progress=Progress("pretrain-mix", quiet=quiet, unit="tokens"))
        if json_out:
            out_json({"out": out, **{k: meta[k] for k in (
                "num_chunks", "splits", "seq_len", "total_tokens", "sources", "build")}})
        elif not quiet:
            shares = ", ".join(f"{s['name']} {s['tokens']} tokens ({100 * s['share']:.1f}%"
                               f"{', ran out' if s['exhausted'] else ''})" for s in meta["sources"])
            b = meta["build"]
            print(f"wrote {meta['num_chunks']} chunks of {meta['seq_len']} tokens "
                  f"({meta['splits']['valid']} for validation) to {out}: {shares}; "
                  f"{b['mb_per_s']} MB/s, {b['tokens_per_s']} tokens/s", file=sys.stderr)

    run_command(body, debug=debug)
