"""Where DATA's records come from: a local .jsonl/.json/.csv/.parquet file, a folder of them
(subfolders included), a Hub dataset (org/name[/folder][#config][:split]) or an alias. Readers
yield (where, record), where being file:line (or record/row n), so that errors can name it."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from minillm_cli.errors import InputError
from minillm_cli.textfiles import files_under, read_lines, read_utf8

# Aliases: the paper's training set (Dolly) and its evaluation sets as the MiniLLM authors publish them.
ALIASES = {
    "dolly": "databricks/databricks-dolly-15k",
    "self-inst": "MiniLLM/self-inst",
    "vicuna": "MiniLLM/Vicuna",
    # S-NI and UnNI: the reference evaluates only their 11_ folders (reference answers of 11 tokens
    # or more), and UnNI's first 10,000 examples (--limit 10000)
    "sni": "MiniLLM/sinst/11_",
    "unni": "MiniLLM/uinst/11_",
}

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# read_utf8: a byte-order mark (Windows / spreadsheet exports) is skipped, plain UTF-8 read as is,
# and a byte that is not UTF-8 is reported by line and column
def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.rstrip("\r\n"))  # (with its newline, an error at the end says column 1)
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
    """A Hub dataset's records (name: org/name[/folder][#config]): `split`, else its train split,
    else its only split."""
    import datasets

    from minillm_cli import hub

    label = f"{name}:{split}" if split else name
    hub.check_reachable()  # (offline mode when not: the local cache, or one line at once)
    path, _, config = name.partition("#")
    pieces = path.split("/")
    repo, folder = "/".join(pieces[:2]), "/".join(pieces[2:])
    where = {"data_dir": folder} if folder else {}  # org/name/folder: the files of that folder only
    if config:
        where["name"] = config
    try:
        try:
            ds = datasets.load_dataset(repo, split=split or "train", **where)
        except ValueError as e:
            # an evaluation set published with one split only (MiniLLM's: "validation", from
            # valid.jsonl): with no split named, that one split is the data
            if split or "Unknown split" not in str(e):
                raise
            splits = datasets.load_dataset(repo, **where)
            if len(splits) != 1:
                raise InputError(f"data {name!r}: no train split, and several others ({', '.join(splits)}): "
                                 f"name one after a colon ({name}:{next(iter(splits))})") from None
            ds = next(iter(splits.values()))
    except InputError:
        raise
    except Exception as e:  # offline, unknown id, no such split: all one message for the user
        # (a split or configuration the dataset lacks is that, also offline: the cached dataset answered)
        unknown, no_config = "Unknown split" in str(e), "Config name is missing" in str(e)
        bad_config = str(e).startswith("BuilderConfig ") and "not found" in str(e)  # (org/name#typo)
        offline = hub.offline("datasets") and not (unknown or no_config or bad_config)
        why = "the Hugging Face Hub is unreachable (offline)" if offline else str(e).splitlines()[0].rstrip(".")
        fix = "pass a local .jsonl/.json/.csv/.parquet file"
        if unknown:  # (not: download the data)
            fix = f"name one of them after the colon ({name}:SPLIT)"
        elif no_config:  # (the configurations are on its second line)
            why = " ".join(str(e).splitlines()[:2])
            fix = f"name one after a '#' ({name}#CONFIG)"
        elif bad_config:  # (the configurations it has are on the same line)
            fix = f"name one of them after the '#' ({path}#CONFIG)"
        raise InputError(f"data {label!r}: not a local file and could not be loaded from the Hub: {why}; "
                         f"{fix}") from None
    for i, rec in enumerate(ds):
        yield f"{label}[{i}]", rec


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def data_files(folder: Path) -> list[Path]:
    """The data files in a DATA folder: subfolders included, suffixes in any case (B.JSONL), names
    starting with '.' skipped (.git, editors' and notebooks' copies), sorted by their path in the
    folder so every run and every process reads them in one order. A linked folder is followed
    once (a link back up would loop)."""
    return files_under(folder, SUFFIXES, follow_links=True)


def sources(spec: str, split: str | None = None) -> Iterator[tuple[str, Iterator[tuple[str, dict]]]]:
    """(name, its records) per source of DATA: the file, each file of a folder, or the Hub dataset.
    Each source gets its own layout (a folder may mix Dolly and Alpaca files)."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            files = data_files(path)
            if not files:
                raise InputError(f"{path}: a folder with no .jsonl/.json/.csv/.parquet files (subfolders "
                                 f"included, hidden ones skipped)")
            for f in files:
                yield str(f), _READERS[f.suffix.lower()](f)
            return
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        yield str(path), reader(path)
        return
    if path.suffix.lower() in SUFFIXES or spec.startswith((".", "/", "~")):
        raise InputError(f"{spec}: no such file")
    # a Hub dataset's split after a colon and its configuration after a '#' (a Hub id has
    # neither; pretrain-mix's sources name a configuration so too): HuggingFaceTB/smoltalk#all:train
    base, colon, named_split = spec.partition(":")
    if colon and not (named_split and base):
        raise InputError(f"data {spec!r}: expected a Hub id or alias with a split after the colon (org/name:split)")
    base, hash_, config = base.partition("#")
    if hash_ and not (config and base):
        raise InputError(f"data {spec!r}: expected a Hub id or alias with a configuration after the '#' "
                         f"(org/name#config)")
    name = ALIASES.get(base.lower(), base) + (f"#{config}" if config else "")
    if "/" not in name:
        raise InputError(f"data {spec!r}: no such file, and not a known alias ({', '.join(ALIASES)}) or Hub id (org/name)")
    yield name, _read_hub(name, named_split or split)
