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
    app()
