"""The `minillm` Typer app. Command modules register themselves here; each imports only typer and
the standard library at module level so that `minillm --help` answers in well under a second."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="minillm",
    help="Distil large language models into small ones with MiniLLM (Gu et al., ICLR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# (module under minillm_cli.cli, command name). A command is listed only once it works.
COMMANDS = [
    ("quickstart", "quickstart"),
    ("sft", "sft"),
    ("distill", "distill"),
    ("evaluate", "evaluate"),
    ("pretrain_mix", "pretrain-mix"),
    ("compare", "compare"),
]

# Commands with required options show their help when called bare; `quickstart` needs nothing
# (the README's main command is plain `minillm quickstart`).
RUNS_BARE = {"quickstart"}

for _module, _name in COMMANDS:
    _mod = importlib.import_module(f"minillm_cli.cli.{_module}")
    app.command(name=_name, help=_mod.__doc__, no_args_is_help=_name not in RUNS_BARE)(_mod.command)


def _print_version(value: bool) -> None:
    if value:
        from minillm_cli import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    # eager, with its own callback: runs while parsing, before Click asks for a command
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    pass


def main() -> None:
    """The console script. Click's usage errors (a missing option, a value of the wrong type, an
    unknown command) become one stderr line and exit 2, as the command-line contract has every
    bad usage: Click's own block is four lines. A bare command still prints its help (exit 2)."""
    import sys

    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C while Click parses, before a command body runs
        print("error: stopped by SIGINT before the command finished", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:
        # Click's exceptions by name: typer vendors its own copy of Click in recent versions
        kinds = {c.__name__ for c in type(e).__mro__}
        if "UsageError" in kinds and "NoArgsIsHelpError" not in kinds:
            ctx = getattr(e, "ctx", None)
            path = ctx.command_path if ctx is not None else "minillm"
            print(f"error: {e.format_message()} (see '{path} --help')", file=sys.stderr, flush=True)
            sys.exit(2)
        if "ClickException" in kinds:  # a bare command's help, Click's other messages
            e.show()
            sys.exit(e.exit_code)
        raise
    if code == 130:  # (typer versions that vendor Click return Ctrl-C while parsing as 130)
        print("error: stopped by SIGINT before the command finished", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
