"""The README's commands name flags the commands have: every `minillm CMD ...` line of its bash
blocks uses CMD's own options, and every --flag the prose mentions is some command's (or
another tool's, listed here). A flag renamed or removed without the README following fails here."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
OTHER_TOOLS = {"--help", "--nproc_per_node", "--config_file"}  # (click's own; torchrun's; accelerate's)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    import typer

    from minillm_cli.cli.app import app

    group = typer.main.get_command(app)
    flags = lambda c: {o for p in c.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}  # noqa: E731
    return {"": flags(group), **{name: flags(sub) for name, sub in group.commands.items()}}  # ("": minillm's own)


def _invocations(text: str) -> list[tuple[str, str]]:
    """(command, its line with continuations joined) for each `minillm CMD` in the bash blocks."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    out = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        line = line.split("  #")[0]  # (a comment after the command)
        for part in re.split(r"&&|\||;", line):
            m = re.search(r"(?:^|\s|/)minillm\s+([a-z-]+)(.*)", part)
            if m:
                out.append((m.group(1), m.group(2)))
    return out


def test_readme_commands_use_their_own_flags(options):
    calls = _invocations(README.read_text())
    assert {cmd for cmd, _ in calls} >= {"quickstart", "sft", "distill", "pretrain-mix", "evaluate", "compare"}
    wrong = [(cmd, flag) for cmd, rest in calls for flag in FLAG.findall(rest)
             if cmd not in options or flag not in options[cmd]]
    assert not wrong, wrong


def test_every_flag_the_readme_mentions_exists(options):
    known = set().union(*options.values()) | OTHER_TOOLS
    unknown = sorted(set(FLAG.findall(README.read_text())) - known)
    assert not unknown, unknown


def test_the_check_reads_a_wrong_flag():
    """(the parser above finds a flag in a continued line and after `&&`)"""
    text = "```bash\nx && minillm sft --model m \\\n    --nope 1   # --ignored\n```\n"
    assert [(cmd, FLAG.findall(rest)) for cmd, rest in _invocations(text)] == [("sft", ["--model", "--nope"])]
