"""Options shared by every command, and the one place where exceptions become exit codes."""
from __future__ import annotations

import os
import sys
from typing import Annotated, Callable, Optional

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use at most N examples.")]


def run_command(body: Callable[[], object], *, debug: bool) -> None:
    """Run a command body; turn known failures into one stderr line and an exit code.

    InputError -> 2, RunError -> 1, KeyboardInterrupt -> 130. Unknown exceptions are bugs: one
    line plus a hint to rerun with --debug (or the traceback when --debug is given).
    """
    from minillm_cli.errors import MiniLLMError

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        quiet_libraries()
        body()
    except MiniLLMError as e:
        if debug:
            raise
        # Bad input and agreed stops are the same on every process: say it once (rank 0).
        if rank() == 0 or e.exit_code != 2:
            _say(f"error: {e}" if rank() == 0 else f"error [rank {rank()}]: {e}")
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _say("interrupted")
        raise typer.Exit(130)
    except typer.Exit:
        raise
    except Exception as e:  # a bug or an environment failure we did not anticipate
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = "" if rank() == 0 else f" [rank {rank()}]"
        if type(e).__name__ == "OutOfMemoryError":  # (torch's, without importing torch here)
            msg += " -- lower the batch sizes (see --help) or raise --grad-accum; docs/SCALING.md, 'Memory'"
        _say(f"error{where}: {type(e).__name__}: {msg} (rerun with --debug for the traceback)")
        raise typer.Exit(1)


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def echo_main(line: str) -> None:
    """A closing human line on stderr, from rank 0 only."""
    if rank() == 0:
        _say(line)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Our own progress display is the only one: silence transformers/datasets bars and chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"
