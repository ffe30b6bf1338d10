"""Generate with a model by the paper's protocol (sampling, 5 seeds) and score it: ROUGE-L, exact match, distinct-4, reference LM loss, and KL to a teacher."""
from __future__ import annotations

import sys

from typing import Annotated, Optional

import typer

from minillm_cli.cli import options as o
from minillm_cli.cli.common import Debug, Device, JsonOut, Limit, Quiet, Seed, out_json, run_command

Metric = Annotated[Optional[list[str]], typer.Option(
    "--metric", help="rougeL, exact-match, dist4, lm-loss, reverse-kl, forward-kl (repeat or comma-separate). "
                     "Default: rougeL (dist4 when the data has no references), plus both KLs with --teacher.")]


def command(
    model: Annotated[str, typer.Option("--model", help="MODEL to evaluate: Hub id, local folder or LoRA adapter folder.")],
    data: o.Data,
    metric: Metric = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Teacher MODEL for reverse-kl/forward-kl (same tokenizer).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Sampling seeds (--seed, --seed+1, ...); metrics are mean/std over them.")] = 5,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens (also capped by --max-length).")] = 256,
    limit: Limit = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Write the result FILE.json.")] = None,
    predictions: Annotated[Optional[str], typer.Option("--predictions", help="Write the generations FILE.jsonl (default: next to --out).")] = None,
    json_out: JsonOut = False,
    by_length: Annotated[bool, typer.Option("--by-length", help="Also split per-example metrics by reference length (<=5, 6-20, >20 tokens).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts sampled together (results do not depend on it).")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k filter (0: off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Top-p filter (1: off).")] = 1.0,
    no_repeat_ngram_size: Annotated[int, typer.Option("--no-repeat-ngram-size", help="Ban repeated n-grams of this size (0: off).")] = 6,
    greedy: Annotated[bool, typer.Option("--greedy", help="Argmax decoding (exact, as top-k 1) instead of sampling.")] = False,
    sampler: Annotated[str, typer.Option("--sampler", help="Generation engine: auto (static KV cache + CUDA graph on GPUs, the eager loop on CPUs) | eager (the reference loop) | static | graph | compile (experimental).")] = "auto",
    max_prompt_length: o.MaxPrompt = 256,
    max_length: o.MaxLength = 512,
    template: Annotated[Optional[str], typer.Option("--template", help="Prompt template: dolly (the paper's), chat (tokenizer's chat template), raw. Default: the one MODEL was trained with (a run folder's run_config.json), else dolly.")] = None,
    turns: Annotated[Optional[str], typer.Option("--turns", help="Chat data: last (one example per conversation, its last assistant turn) | all (one per assistant turn, each after the conversation before it). Default: the one MODEL was trained with (a run folder's run_config.json), else last.")] = None,
    prompt_field: o.PromptField = None,
    response_field: o.ResponseField = None,
    input_field: o.InputField = None,
    split: Annotated[str, typer.Option("--split", help="all (the data as given) | train | valid | test, split as sft/distill split it.")] = "all",
    valid_size: Annotated[Optional[float], typer.Option("--valid-size", help="Validation split: a count, or a fraction if < 1. Default under --split valid/test: as MODEL's run split DATA (a run folder's run_config.json), else 0.05.")] = None,
    test_size: Annotated[Optional[float], typer.Option("--test-size", help="Test split held out: a count, or a fraction if < 1. Default: as MODEL's run split DATA, else 0.")] = None,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the train/valid/test split. Default: as MODEL's run split DATA, else 1234.")] = None,
    trust_remote_code: o.TrustRemote = False,
    dtype: o.Dtype = "auto",
    device: Device = "auto",
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    def body():
        from minillm_cli.eval.evaluate import EvaluateConfig, run_evaluate

        cfg = EvaluateConfig(
            model=model, data=data, metrics=metric, teacher=teacher, seeds=seeds, seed=seed,
            max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length, max_length=max_length,
            temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size,
            greedy=greedy, sampler=sampler, batch_size=batch_size, limit=limit, template=template, turns=turns, prompt_field=prompt_field,
            response_field=response_field, input_field=input_field, split=split, valid_size=valid_size,
            test_size=test_size, split_seed=split_seed, out=out, predictions=predictions, by_length=by_length,
            device=device, dtype=dtype, trust_remote_code=trust_remote_code, quiet=quiet)
        result = run_evaluate(cfg)
        if json_out:
            out_json(result)
        if not quiet:
            _print_table(result)

    run_command(body, debug=debug)


def _print_table(result: dict) -> None:
    """A short table of the metrics on stderr (stdout stays for --json)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # The heading as plain text on its own line: paths are not markup ('[v2]') and stay unbroken.
    heading = Text(f"{result['model']} on {result['data']}: {result['n']} examples, "
                   f"{len(result['protocol']['seeds'])} seed(s)")
    table = Table()
    for col in ("metric", "mean", "std", "per seed"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in result["metrics"].items():
        table.add_row(name, f"{m['mean']:.4g}", f"{m['std']:.2g}", " ".join(f"{v:.4g}" for v in m["per_seed"]))
    for name, buckets in (result.get("by_length") or {}).items():
        for b, m in buckets.items():
            table.add_row(f"  {name} [{b}] (n={m['n']})", f"{m['mean']:.4g}", f"{m['std']:.2g}", "")
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 240)  # (no 80-column cut in logs)
    console.print(heading, soft_wrap=True)
    console.print(table)
