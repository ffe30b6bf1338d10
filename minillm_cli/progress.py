"""Progress on rank 0 at a terminal (rich), silence elsewhere, and machine-readable metrics.

`Progress` is a small facade so engines never import rich themselves: `start(total)`,
`update(step, **fields)`, `log(line)`, `warn(line)`, `close()`. With `quiet=True`, off rank 0, or
when stderr is not a terminal, it prints nothing but occasional plain lines (`log`) when not quiet;
`warn` lines are printed on rank 0 even when quiet. `unit` names what `step` counts in the plain
lines ("step 120", or "10976896 tokens" for a count that is no step).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class Progress:
    def __init__(self, description: str, *, quiet: bool = False, is_main: bool = True, unit: str = "step"):
        self.is_main = is_main
        self.enabled = is_main and not quiet
        self.unit = unit
        self.interactive = self.enabled and sys.stderr.isatty()
        self.description = description
        self._bar = None
        self._task = None
        self._last_plain = 0.0

    def start(self, total: int) -> None:
        if not self.interactive:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
        from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total, info="")

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            now = time.perf_counter()
            if now - self._last_plain >= 10.0:  # plain logs: one line per 10 s at most
                self._last_plain = now
                count = f"step {step}" if self.unit == "step" else f"{step} {self.unit}"
                print(f"{self.description} {count}: {info}", file=sys.stderr, flush=True)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        """A `warning: ...` line on rank 0, under --quiet too: quiet hides progress, not what may
        be wrong with the run."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.console.print(f"warning: {line}", markup=False, highlight=False)
        else:
            print(f"warning: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4f}"
    return str(v)


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` (rank 0 only); flushes every write so a
    killed run keeps what it logged."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            return
        clean = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
