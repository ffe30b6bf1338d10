"""Compare evaluate results and run folders side by side; gate CI on them.

RESULT is an evaluate FILE.json or an sft/distill run folder (its eval.json or eval/*.json results
plus the training-log values of the step whose weights it keeps as train.<key>, that step as
train.kept_step). Prints metrics x runs as "mean ± std" with the
best run per metric marked (higher or lower is better per metric).

--fail-if 'rougeL < 20' exits 1 when ANY compared result meets the condition (and prints which).
Comparisons are METRIC OP NUMBER with < <= > >= == !=, joined by 'and'/'or' and parentheses;
METRIC.std tests the spread across seeds. A result without the metric never meets it; a metric
that no compared result has is an error (exit 2), so a misspelt gate cannot pass silently.

LLM judge (the paper's GPT-4 score): --judge-url URL --judge-model M --judge-reference NAME asks an
OpenAI-compatible chat endpoint to score, prompt by prompt, the reference result's answer and each
other result's answer; the 'judge' metric is 100 x candidate total / reference total. Answers come
from each result's predictions file (the one named in the result, else FILE.jsonl next to
FILE.json). The key is read from $OPENAI_API_KEY, or from the variable --judge-key-env names.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from minillm_cli.cli.common import Debug, Device, Quiet, Seed, emit, render_rich, run_command, stdout_is_terminal

FORMATS = ("table", "markdown", "csv", "json")


def command(
    results: Annotated[List[Path], typer.Argument(metavar="RESULT...", help="Evaluate result files or run folders.")],
    format: Annotated[str, typer.Option("--format", "-f", help="table | markdown | csv | json (stdout).")] = "table",
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Show deltas against this result (name or path).")] = None,
    fail_if: Annotated[Optional[str], typer.Option("--fail-if", help="Exit 1 when any result meets EXPR, e.g. 'rougeL < 20'.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write bar charts (and training curves) to FILE.png.")] = None,
    names: Annotated[Optional[str], typer.Option("--names", help="Comma-separated display names, one per result.")] = None,
    judge_url: Annotated[Optional[str], typer.Option("--judge-url", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1.")] = None,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="Judge model name, e.g. gpt-4.")] = None,
    judge_reference: Annotated[Optional[str], typer.Option("--judge-reference", help="The result the others are scored against (name or path).")] = None,
    judge_key_env: Annotated[Optional[str], typer.Option("--judge-key-env", help="Environment variable holding the API key [default: OPENAI_API_KEY, optional].")] = None,
    judge_limit: Annotated[Optional[int], typer.Option("--judge-limit", help="Judge at most N prompts per result.")] = None,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", help="Seconds per judge request.")] = 60.0,
    device: Device = "auto",  # accepted for the common contract; compare runs no model
    seed: Seed = 0,  # accepted for the common contract; compare draws no random numbers
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    def body() -> None:
        from minillm_cli.errors import InputError
        from minillm_cli.eval.compare import (check_gate, comparison, load_entries, parse_gate,
                                              protocol_differences, render_csv, render_json,
                                              render_markdown, resolve_gate, rich_table)

        fmt = format.lower()
        if fmt not in FORMATS:
            raise InputError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
        if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise InputError(f"--plot {plot}: use a .png, .pdf or .svg file name")
        if plot is not None:
            from minillm_cli.textfiles import check_writable

            check_writable("--plot", plot)
        gate = parse_gate(fail_if) if fail_if is not None else None  # syntax errors before any loading
        name_list = [n.strip() for n in names.split(",")] if names else None
        entries = load_entries(results, name_list)
        datas = sorted({os.path.abspath(e.data) if os.path.exists(e.data) else e.data for e in entries if e.data})
        if len(datas) > 1 and not quiet:  # a "best" across data sets means nothing
            print(f"note: these results are on {len(datas)} different data sets ({', '.join(datas)})",
                  file=sys.stderr)
        differ = protocol_differences(entries)
        if differ and not quiet:  # nor across evaluation settings: another split, length, decoding...
            print(f"note: these results were not evaluated alike: {'; '.join(differ)}", file=sys.stderr)
        if judge_url or judge_model or judge_reference:
            _run_judge(entries, quiet=quiet)
        if gate is not None:
            gate = resolve_gate(gate, entries)
        comp = comparison(entries, baseline)
        tripped = check_gate(gate, entries) if gate is not None else []

        if fmt == "json":
            extra = {"fail_if": {"expr": fail_if, "tripped": tripped}} if fail_if is not None else {}
            emit(render_json(comp, **extra))
        elif fmt == "csv":
            emit(render_csv(comp))
        elif fmt == "markdown":
            emit(render_markdown(comp))
        else:
            emit(render_rich(rich_table(comp), terminal=stdout_is_terminal()))
        if plot is not None:
            from minillm_cli.eval.plot import plot_comparison

            plot_comparison(entries, plot)
            if not quiet:
                print(f"plot written to {plot}", file=sys.stderr)
        if tripped:
            print(f"--fail-if '{fail_if}' met by {len(tripped)} of {len(entries)}:", file=sys.stderr)
            for line in tripped:
                print(f"  {line}", file=sys.stderr)
            raise typer.Exit(1)

    def _run_judge(entries, *, quiet: bool) -> None:
        from minillm_cli.errors import InputError
        from minillm_cli.eval.compare import find_entry
        from minillm_cli.eval.judge import judge_pairs, pair_predictions
        from minillm_cli.eval.results import read_predictions
        from minillm_cli.progress import Progress

        if not (judge_url and judge_model and judge_reference):
            raise InputError("the judge needs --judge-url, --judge-model and --judge-reference together")
        key_var = judge_key_env or "OPENAI_API_KEY"
        key = os.environ.get(key_var)
        if judge_key_env and not key:  # asked for by name: its absence is a mistake, not "no key"
            raise InputError(f"--judge-key-env {judge_key_env}: that environment variable is not set")
        ref = find_entry(entries, judge_reference, "--judge-reference")

        def rows_of(e):
            if e.predictions is None:
                raise InputError(f"{e.source}: no predictions file for the judge (run evaluate with "
                                 "--predictions, or put FILE.jsonl next to FILE.json)")
            return read_predictions(e.predictions)

        ref_rows = rows_of(ref)
        for e in entries:
            if e is ref:
                continue
            pairs = pair_predictions(ref_rows, rows_of(e))[: judge_limit or None]
            prog = Progress(f"judge {e.name}", quiet=quiet)
            prog.start(len(pairs))
            try:
                res = judge_pairs(pairs, url=judge_url, model=judge_model, key=key,
                                  timeout=judge_timeout, on_step=prog.update)
            finally:
                prog.close()
            e.metrics["judge"] = {"mean": res.score, "std": 0.0, "per_seed": [res.score],
                                  "n": res.n_scored}
            prog.log(f"judge {e.name} vs {ref.name}: {res.score:.1f} over {res.n_scored} prompts"
                     + (f" ({res.n_unparsed} unparsed replies dropped)" if res.n_unparsed else ""))

    run_command(body, debug=debug)
