"""The two kinds of failure a user can meet, and how each becomes an exit code.

`InputError` is bad usage or bad input (exit 2): the message is one line that says what and where.
`RunError` is a run that started and failed (exit 1), e.g. a non-finite loss. Anything else is a
bug and keeps its traceback under `--debug`.
"""
from __future__ import annotations


class MiniLLMError(Exception):
    exit_code = 1
    everywhere = False  # raised alike on every process (a decision they shared): said once, by rank 0

    def __init__(self, message: str = "", *, everywhere: bool | None = None):
        super().__init__(message)
        if everywhere is not None:
            self.everywhere = everywhere


class InputError(MiniLLMError):
    """Bad usage or bad input: exit 2 with one line on stderr."""

    exit_code = 2
    everywhere = True  # (every process reads the same options and files)


class RunError(MiniLLMError):
    """The run started and could not finish (non-finite loss, full disk, ...): exit 1."""

    exit_code = 1


def require(condition: bool, message: str) -> None:
    """Raise `InputError(message)` unless `condition` holds (for config validation)."""
    if not condition:
        raise InputError(message)


class MiniLLMWarning(UserWarning):
    """A fallback the run takes by itself (a kernel, graph or engine it cannot use here; the run
    goes on): the commands print it as one `warning: ...` line on rank 0, under --quiet too."""
