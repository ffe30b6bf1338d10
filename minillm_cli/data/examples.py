"""Instruction data from wherever users keep it, normalised to `Example`s.

DATA is a local .jsonl/.json/.csv/.parquet file, a Hub dataset id, or an alias. Field layouts are
detected from the first record (Dolly, Alpaca/MiniLLM, Self-Instruct, Vicuna, prompt/response);
`--prompt-field/--response-field/--input-field` override detection.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from minillm_cli.errors import InputError
from minillm_cli.textfiles import read_lines, read_utf8

# Aliases: the paper's training set (Dolly) and its evaluation sets as the MiniLLM authors publish them.
ALIASES = {
    "dolly": "databricks/databricks-dolly-15k",
    "self-inst": "MiniLLM/self-inst",
    "vicuna": "MiniLLM/Vicuna",
    "sni": "MiniLLM/sinst",
    "unni": "MiniLLM/uinst",
}

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Example:
    """One instruction. `references` is empty when the data has no gold answer (Vicuna)."""

    instruction: str
    input: str = ""
    references: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0] if self.references else ""


# ---------------------------------------------------------------------------------------------
# Layouts: (name, required fields, how to build Examples from one record)
# ---------------------------------------------------------------------------------------------
def _as_refs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v).strip() != ""]
    s = str(value)
    return [s] if s.strip() != "" else []


def _dolly(r):
    return [Example(str(r["instruction"]), str(r.get("context") or ""), _as_refs(r.get("response")))]


def _alpaca(r):
    return [Example(str(r["instruction"]), str(r.get("input") or ""), _as_refs(r.get("output")))]


def _prompt_output(r):
    return [Example(str(r["prompt"]), "", _as_refs(r.get("output")))]


def _prompt_response(r):
    key = next((k for k in ("response", "completion", "answer") if k in r), None)  # (a row may lack it)
    return [Example(str(r["prompt"]), "", _as_refs(r.get(key)) if key else [])]


def _self_instruct(r):
    out = []
    for inst in r.get("instances") or [{}]:
        out.append(Example(str(r["instruction"]), str(inst.get("input") or ""), _as_refs(inst.get("output"))))
    return out


def _vicuna(r):
    turns = r.get("turns") or []
    if not turns:
        return []
    refs = _as_refs(r.get("reference")) if r.get("reference") else []
    return [Example(str(turns[0]), "", refs)]


LAYOUTS = [
    ("dolly", ("instruction", "context", "response"), _dolly),
    ("self-instruct", ("instruction", "instances"), _self_instruct),
    ("alpaca", ("instruction", "output"), _alpaca),
    ("dolly-no-context", ("instruction", "response"), _dolly),
    ("prompt/output", ("prompt", "output"), _prompt_output),
    ("prompt/response", ("prompt",), None),  # response|completion|answer, checked below
    ("vicuna", ("turns",), _vicuna),
]


def _detect(keys: set[str]) -> tuple[str, Any] | None:
    for name, required, fn in LAYOUTS:
        if all(k in keys for k in required):
            if name == "prompt/response":
                if any(k in keys for k in ("response", "completion", "answer")):
                    return name, _prompt_response
                continue
            return name, fn
    return None


def _layout_hint() -> str:
    return ("known layouts: instruction/context/response (Dolly), instruction/input/output (Alpaca), "
            "prompt/output, prompt/response, instruction/instances (Self-Instruct), turns (Vicuna); "
            "or name them with --prompt-field/--response-field")


# ---------------------------------------------------------------------------------------------
# Readers: yield (where, record) so that errors can say file and line.
# ---------------------------------------------------------------------------------------------
# read_utf8: a byte-order mark (Windows / spreadsheet exports) is skipped, plain UTF-8 read as is,
# and a byte that is not UTF-8 is reported by line and column
def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object per line, got {type(rec).__name__}")
        yield f"{path}:{i}", rec


def _looks_like_json_lines(text: str) -> bool:
    """The first two non-blank lines are JSON objects each (a JSON document that is merely
    broken is not)."""
    lines = [line for line in text.splitlines()[:1000] if line.strip()][:2]
    try:
        return len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    text = read_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _looks_like_json_lines(text):
            # one object per line under a .json name (what `datasets.Dataset.to_json` writes): read
            # as JSON Lines, whose errors then name the line
            yield from _read_jsonl(path)
            return
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        for key in ("data", "examples", "rows", "train"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise InputError(f"{path}: expected a JSON list of records (or an object with a 'data' list)")
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            raise InputError(f"{path}: record {i} is {type(rec).__name__}, expected an object")
        yield f"{path} record {i}", rec


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    for rec in reader:
        yield f"{path}:{reader.line_num}", rec


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: cannot read parquet ({e})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path} row {i}", rec


def _read_hub(name: str, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    from minillm_cli import hub

    hub.check_reachable()  # (offline mode when not: the local cache, or one line at once)
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, no such split: all one message for the user
        offline = hub.offline("datasets")
        why = "the Hugging Face Hub is unreachable (offline)" if offline else str(e).splitlines()[0]
        raise InputError(f"data {name!r}: not a local file and could not be loaded from the Hub: {why}; "
                         f"pass a local .jsonl/.json/.csv/.parquet file") from None
    for i, rec in enumerate(ds):
        yield f"{name}[{i}]", rec


def iter_records(spec: str, split: str | None = None) -> Iterator[tuple[str, dict]]:
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
            if not files:
                raise InputError(f"{path}: a folder with no .jsonl/.json/.csv/.parquet files")
            for f in files:
                yield from iter_records(str(f))
            return
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}.get(
            path.suffix.lower())
        if reader is None:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        yield from reader(path)
        return
    if path.suffix.lower() in SUFFIXES or spec.startswith((".", "/", "~")):
        raise InputError(f"{spec}: no such file")
    name = ALIASES.get(spec.lower(), spec)
    if "/" not in name:
        raise InputError(f"data {spec!r}: no such file, and not a known alias ({', '.join(ALIASES)}) or Hub id (org/name)")
    yield from _read_hub(name, split)


def load_examples(spec: str, *, prompt_field: str | None = None, response_field: str | None = None,
                  input_field: str | None = None, limit: int | None = None,
                  split: str | None = None) -> list[Example]:
    """Read DATA into Examples. Raises InputError for missing files, malformed records, unknown
    layouts (naming the fields found), and data with no usable example."""
    examples: list[Example] = []
    builder = None
    layout = None
    for where, rec in iter_records(spec, split):
        if builder is None:
            layout, builder = _choose_builder(where, rec, prompt_field, response_field, input_field)
        try:
            built = builder(rec)
        except KeyError as e:
            raise InputError(f"{where}: missing field {e.args[0]!r} (layout {layout}; found: "
                             f"{', '.join(sorted(rec)) or 'none'})") from None
        for e in built:
            e.meta["where"] = where  # file:line (or record n), for messages about this example
        examples.extend(built)
        if limit is not None and len(examples) >= limit:
            examples = examples[:limit]
            break
    examples = [e for e in examples if e.instruction.strip()]
    if not examples:
        raise InputError(f"{spec}: no examples (the file is empty or every record has an empty instruction)")
    for e in examples:
        e.meta.setdefault("layout", layout)
    return examples


def _choose_builder(where: str, rec: dict, prompt_field, response_field, input_field):
    keys = set(rec)
    if prompt_field or response_field:
        pf = prompt_field or "instruction"
        missing = [f for f in (pf, response_field) if f and f not in keys]
        if missing:
            raise InputError(f"{where}: field(s) {', '.join(missing)} not found; found: {', '.join(sorted(keys))}")
        inf = input_field

        def build(r):
            return [Example(str(r[pf]), str(r.get(inf) or "") if inf else "",
                            _as_refs(r[response_field]) if response_field else [])]

        return f"fields {pf}/{response_field or '-'}", build
    found = _detect(keys)
    if found is None:
        raise InputError(f"{where}: no known field layout; found fields: {', '.join(sorted(keys)) or 'none'}; "
                         + _layout_hint())
    name, fn = found
    if input_field:
        base = fn

        def build(r):
            exs = base(r)
            for e in exs:
                e.input = str(r.get(input_field) or "")
            return exs

        return name, build
    return name, fn


def has_references(examples: Iterable[Example]) -> bool:
    return any(e.references for e in examples)
