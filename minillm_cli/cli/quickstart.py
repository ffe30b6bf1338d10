"""Run the whole pipeline offline on a synthetic task with exactly known answers: SFT a teacher and a
small student, distil it with kd, seqkd, rkl and minillm, evaluate all of them and compare."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from minillm_cli.cli.common import Debug, Device, JsonOut, Quiet, Seed, emit, out_json, run_command


def command(
    out: Annotated[str, typer.Option("--out", help="Folder for everything the quickstart makes.")] = "minillm-quickstart",
    fast: Annotated[bool, typer.Option("--fast", help="A smoke run (about 1 minute on 2 CPU cores, one distillation seed; too small to judge the claim).")] = False,
    distill_seeds: Annotated[Optional[int], typer.Option("--distill-seeds", help="Seeds of each distillation (default 3; --fast 1).")] = None,
    ablation: Annotated[bool, typer.Option("--ablation", help="Also distil with each of MiniLLM's four optimisations switched off; plots the curves.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier quickstart folder.")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    def body():
        from minillm_cli.toy.quickstart import QuickstartConfig, run_quickstart

        summary = run_quickstart(QuickstartConfig(out=out, fast=fast, seed=seed, distill_seeds=distill_seeds,
                                                  ablation=ablation, overwrite=overwrite, device=device, quiet=quiet))
        if json_out:
            out_json(summary)
        else:
            emit(summary["table"] + "\n" + summary["verdict"] + "\n")
            typer.echo(f"quickstart done in {summary['seconds']:.0f} s -> {summary['out']} "
                       f"(comparison.md, comparison.png)", err=True)

    run_command(body, debug=debug)
