"""The files evaluation writes and compare reads: evaluate results, predictions, and run folders.

An evaluate result (FILE.json) is the contract of CLI.md plus provenance:

    {"kind": "minillm-evaluate", "version": 1, "model": ..., "data": ..., "n": N,
     "protocol": {decoding settings and seeds}, "metrics": {name: {"mean", "std", "per_seed"}},
     "by_length": {metric: {bucket: {"n", "mean", "std", "per_seed"}}}   (optional, --by-length)
     "predictions": "FILE.jsonl"   (optional; relative to the result's folder)
     "created": ISO-8601 UTC, "versions": {package: version}}

Predictions (FILE.jsonl): one object per example and seed with at least "prompt", "prediction",
"references" (list of str) and "seed". A run folder (output of sft/distill) holds
`run_config.json`, `metrics.jsonl` (one training-log row per line, with "step") and possibly
evaluate results in `eval.json` or `eval/*.json`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from minillm_cli.errors import InputError
from minillm_cli.textfiles import read_lines, read_utf8

RESULT_KIND = "minillm-evaluate"
RESULT_VERSION = 1
PREDICTION_KEYS = ("prompt", "prediction", "references", "seed")


# ---------------------------------------------------------------------------- writing
def package_versions() -> dict[str, str]:
    """Versions that decide the numbers, read from package metadata (no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("minillm-cli", "torch", "transformers", "rouge-score"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def make_result(*, model: str, data: str, n: int, protocol: dict, metrics: dict,
                by_length: Optional[dict] = None, predictions: Optional[str] = None,
                **extra: Any) -> dict:
    result = {"kind": RESULT_KIND, "version": RESULT_VERSION, "model": model, "data": data,
              "n": int(n), "protocol": protocol, "metrics": metrics}
    if by_length:
        result["by_length"] = by_length
    if predictions:
        result["predictions"] = predictions
    result.update(extra)
    result["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result["versions"] = package_versions()
    return result


def clean_json(obj: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and a reader should see 'no value'."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write next to the target then rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); a result file gets the mode any new file would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: Path, result: dict) -> None:
    check_result(result, str(path))
    atomic_write_text(Path(path), json.dumps(clean_json(result), indent=2, allow_nan=False) + "\n")


def write_predictions(path: Path, rows: Iterable[dict]) -> None:
    lines = []
    for i, row in enumerate(rows):
        missing = [k for k in PREDICTION_KEYS if k not in row]
        if missing:
            raise ValueError(f"prediction row {i} lacks {missing}")
        lines.append(json.dumps(clean_json(row), ensure_ascii=False, allow_nan=False))
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str = "a minillm evaluate result") -> Any:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    text = read_utf8(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not {what} (not JSON: line {e.lineno}: {e.msg})") from None


def check_result(result: Any, where: str) -> dict:
    """Raise InputError unless `result` has the shape compare relies on."""
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise InputError(f"{where} is not a minillm evaluate result (no 'metrics' object)")
    kind = result.get("kind", RESULT_KIND)
    if kind != RESULT_KIND:
        raise InputError(f"{where} is a {kind!r} file, not a minillm evaluate result")
    version = result.get("version", RESULT_VERSION)  # (CLI.md's minimal form has none: read as this one)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{where}: 'version' {version!r} is not a result format version (a whole number >= 1)")
    if version > RESULT_VERSION:  # its fields may mean what this version cannot know
        raise InputError(f"{where}: written by a newer minillm (result format version {version}; this one "
                         f"reads up to {RESULT_VERSION}): upgrade minillm-cli to read it")
    for name, m in result["metrics"].items():
        if not isinstance(m, dict) or not _is_number_or_none(m.get("mean")):
            raise InputError(f"{where}: metric {name!r} has no numeric 'mean'")
        if not _is_number_or_none(m.get("std", 0.0)):
            raise InputError(f"{where}: metric {name!r} has a non-numeric 'std'")
        per_seed = m.get("per_seed") or []
        if not isinstance(per_seed, list) or not all(map(_is_number_or_none, per_seed)):
            raise InputError(f"{where}: metric {name!r} has a 'per_seed' that is not a list of numbers")
    return result


def _is_number_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def load_result(path: Path) -> dict:
    """An evaluate result, validated; InputError with a one-line reason otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an evaluate result file")
    return check_result(_read_json(path), str(path))


def predictions_path(result_path: Path, result: dict) -> Optional[Path]:
    """The predictions file of a result: the one it names, else FILE.jsonl next to FILE.json."""
    result_path = Path(result_path)
    named = result.get("predictions")
    if isinstance(named, str) and named:
        p = Path(named)
        p = p if p.is_absolute() else result_path.parent / p
        if p.exists():
            return p
    sibling = result_path.with_suffix(".jsonl")
    return sibling if sibling.exists() else None


def read_jsonl(path: Path, *, tolerate_truncated_tail: bool = False) -> list[dict]:
    """Objects of a JSON-lines file; InputError names file and line of a bad one. A killed run can
    leave half a last line in its log, which `tolerate_truncated_tail` skips."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    lines = read_lines(path)
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_truncated_tail and i == len(lines):
                break
            raise InputError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def read_predictions(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("prompt", "prediction") if k not in row]
        if missing:
            raise InputError(f"{path}:{i}: prediction row lacks {', '.join(missing)}")
    return rows


# ---------------------------------------------------------------------------- run folders
@dataclass
class RunSummary:
    name: str
    path: Path
    config: dict
    curve: list[dict]  # metrics.jsonl rows, in order
    final: dict[str, float]  # last logged value of each numeric key, up to the kept step (kept_step)
    best: dict[str, float]  # best logged value of each key with a known direction
    results: list[tuple[str, Path, dict]] = field(default_factory=list)  # (stem, path, evaluate result)
    # the step whose weights the folder holds when a --select-by kept an earlier one than the last
    kept_step: Optional[int] = None


def is_run_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "metrics.jsonl").exists() or (path / "run_config.json").exists())


# Keys of a training log that are bookkeeping, not a quality measure.
_NOT_METRICS = {"step", "epoch", "time", "elapsed", "elapsed_s", "lr", "tokens", "samples",
                "iteration", "wall_s", "tokens_per_s", "samples_per_s"}


def load_run(path: Path) -> RunSummary:
    from minillm_cli.eval.metrics import higher_is_better

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder")
    if not is_run_folder(path):
        raise InputError(f"{path} is not a run folder (no metrics.jsonl or run_config.json)")
    config = {}
    if (path / "run_config.json").exists():
        config = _read_json(path / "run_config.json", "a run configuration")
        if not isinstance(config, dict):
            raise InputError(f"{path / 'run_config.json'}: expected a JSON object")
    curve = []
    if (path / "metrics.jsonl").exists():
        curve = read_jsonl(path / "metrics.jsonl", tolerate_truncated_tail=True)
    kept_step = _kept_step(path)
    final: dict[str, float] = {}
    best: dict[str, float] = {}
    for row in curve:
        # the figures of the weights the folder holds: those logged up to the kept step
        kept = kept_step is None or not isinstance(row.get("step"), int) or row["step"] <= kept_step
        for k, v in row.items():
            if k in _NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                continue
            if kept:
                final[k] = float(v)
            up = higher_is_better(k)
            if up is not None and (k not in best or (v > best[k] if up else v < best[k])):
                best[k] = float(v)
    results = []
    candidates = [path / "eval.json"]
    if (path / "eval").is_dir():
        candidates += sorted((path / "eval").glob("*.json"))
    for p in candidates:
        if p.exists():
            results.append((p.stem, p, load_result(p)))
    name = path.name if path.name not in ("", "..") else path.resolve().name  # ('.' has no name; a symlink keeps its own)
    return RunSummary(name=name, path=path, config=config, curve=curve, final=final,
                      best=best, results=results, kept_step=kept_step)


def _kept_step(path: Path) -> Optional[int]:
    """The step of the weights a run folder holds, from its summary.json, where a --select-by
    kept the best ones (None: the final ones, or no readable summary)."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("saved") != "best":
        return None
    step = summary.get("best_step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None
