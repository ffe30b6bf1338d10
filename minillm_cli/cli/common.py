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


class Stopped(BaseException):
    """SIGTERM outside a training loop's own handling (sft and distill finish their step and
    checkpoint): a BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""


def run_command(body: Callable[[], object], *, debug: bool) -> None:
    """Run a command body; turn known failures into one stderr line and an exit code.

    InputError -> 2, RunError -> 1, SIGINT / SIGTERM -> 1 (README: "the run failed ... stopped by
    a signal"). Unknown exceptions are bugs: one line plus a hint to rerun with --debug. --debug
    prints the traceback before that line and keeps the exit code (scripts may switch it on).
    """
    import signal

    from minillm_cli.errors import MiniLLMError

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one kills, even a process stuck in C
        raise Stopped(signal.Signals(signum).name)

    old_term = None
    # One process only: under torchrun a rank may wait in a collective (C code, where a Python
    # handler never runs) and torchrun's SIGTERM must end it at once, as by default.
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        try:
            old_term = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread (a test runner's): the default stays
            pass
    where = "" if rank() == 0 else f" [rank {rank()}]"
    try:
        quiet_libraries()
        body()
    except MiniLLMError as e:
        _traceback(debug)
        # Bad input and agreed stops are the same on every process: say it once (rank 0).
        if rank() == 0 or not e.everywhere:
            _say(f"error{where}: {e}")
        raise typer.Exit(e.exit_code)
    except (KeyboardInterrupt, Stopped) as e:
        _traceback(debug)
        name = e.args[0] if isinstance(e, Stopped) and e.args else "SIGINT"
        _say(f"error{where}: stopped by {name} before the command finished")
        raise typer.Exit(1)
    except typer.Exit:
        raise
    except BrokenPipeError:  # the log's reader went away (`2>&1 | head`): stop quietly, as on SIGPIPE
        try:
            _traceback(debug)
        except OSError:
            pass
        for stream in (sys.stdout, sys.stderr):
            _to_devnull(stream)
        raise typer.Exit(1)
    except Exception as e:  # a bug or an environment failure we did not anticipate
        _traceback(debug)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if type(e).__name__ == "OutOfMemoryError":  # (torch's, without importing torch here)
            msg += " -- lower the batch sizes (see --help) or raise --grad-accum; docs/SCALING.md, 'Memory'"
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _say(f"error{where}: {type(e).__name__}: {msg}{hint}")
        raise typer.Exit(1)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _traceback(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def emit(text: str) -> None:
    """Output for pipelines, on stdout. A reader that went away (`| head -1`, `| true`, a closed
    stdout) is not the command's failure: the rest of the output is dropped and the command ends
    with its own exit code (a tripped --fail-if still exits 1, its lines still on stderr)."""
    global _STDOUT_GONE
    if _STDOUT_GONE or sys.stdout is None:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _STDOUT_GONE = True
        _to_devnull(sys.stdout)


_STDOUT_GONE = False


def _to_devnull(stream) -> None:
    """What is still buffered for `stream` (and what follows) goes nowhere, at interpreter exit too."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (AttributeError, OSError, ValueError):  # (None, or a stream without a descriptor)
        pass


def out_json(obj) -> None:
    """One JSON document on stdout: strict JSON (NaN and infinities become null, as in files)."""
    import json

    from minillm_cli.eval.results import clean_json

    emit(json.dumps(clean_json(obj)) + "\n")


def stdout_is_terminal() -> bool:
    return sys.stdout is not None and not _STDOUT_GONE and sys.stdout.isatty()


def render_rich(renderable, *, terminal: bool) -> str:
    """A rich renderable as text: styled for a terminal; plain and 240 columns wide otherwise
    (off a terminal rich assumes 80 columns and would wrap cells)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, force_terminal=terminal, width=None if terminal else 240,
            color_system="auto" if terminal else None).print(renderable)
    return buf.getvalue()


def echo_main(line: str) -> None:
    """A closing human line on stderr, from rank 0 only."""
    if rank() == 0:
        _say(line)


def kept_weights(summary: dict) -> str:
    """The done line's word on which weights --out holds, when not the final ones."""
    from minillm_cli.engine.selection import SELECT_BY  # (no torch)

    if summary.get("saved") != "best":
        return ""
    column = SELECT_BY[summary["select_by"]][0]
    value = summary.get(f"best_{column}")
    return (f"; --out holds step {summary['best_step']}, the best by {summary['select_by']}"
            + (f" ({value:.4g})" if isinstance(value, (int, float)) else ""))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Our own progress display is the only one: silence transformers/datasets bars and chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    if not getattr(warnings.showwarning, "plain_lines", False):
        warnings.showwarning = _plain_line_for_ours(warnings.showwarning)
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"


def _plain_line_for_ours(show):
    """warnings.showwarning that prints our own fallbacks (MiniLLMWarning: an engine or kernel the
    run cannot use here) as one `warning: ...` line on rank 0, not Python's two lines naming
    whichever library frame warned; other libraries' warnings keep their form."""
    from minillm_cli.errors import MiniLLMWarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, MiniLLMWarning):
            return show(message, category, filename, lineno, file, line)
        if rank() == 0:
            _say(f"warning: {message}")

    showwarning.plain_lines = True
    return showwarning
