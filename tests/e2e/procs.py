"""Helpers for the multi-process tests (torchrun subprocesses on CPU/gloo) and weight comparisons."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="1")
ENV.pop("ACCELERATE_USE_FSDP", None)


def torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "minillm_cli", *[str(a) for a in args]]


def spawn(cmd: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (so a hung launcher and its workers can be killed together)."""
    fh = open(log, "w")
    return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env or ENV,
                            start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 180) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # our own session: the launcher and its workers
        p.wait()
        pytest.fail(f"process {p.args[:6]} did not finish in {timeout}s (ranks deadlocked?)")


def tail(log_or_text, n: int = 3000) -> str:
    """The end of the workers' own output: torchrun's report (its log lines and its closing
    traceback, which name only exit codes) is dropped, so a failure message shows what the
    workers printed, whatever they printed after the launcher began tearing down."""
    text = Path(log_or_text).read_text() if isinstance(log_or_text, Path) else str(log_or_text)
    last_tb = text.rfind("Traceback (most recent call last):")
    if last_tb >= 0 and "torch/distributed/run.py" in text[last_tb:]:
        text = text[:last_tb]
    return "".join(l for l in text.splitlines(keepends=True) if "torch/distributed/elastic/" not in l)[-n:]


def run(cmd: list, log: Path, env: dict | None = None, timeout: float = 180) -> None:
    """Run to completion and require exit 0 (the workers' last lines are the failure message)."""
    rc = finish(spawn(cmd, log, env), timeout)
    assert rc == 0, tail(log)


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())
