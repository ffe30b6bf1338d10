"""Sources of pre-training text for `pretrain-mix`: parsing `SRC[:WEIGHT]`, checking each source
before any work starts, and streaming it as small *jobs* that a worker turns into token ids.

A job is a plain tuple so it pickles cheaply to a worker process:
  ("texts", where, [doc, ...])                      documents already read (txt, parquet, Hub)
  ("jsonl", path, first_line_no, [raw_line, ...], field)   JSON parsing happens in the worker
Reading stays in the main process (it is I/O); everything CPU-bound (JSON, tokenising) is in
`pretrain_work.encode_job`, so the main process only reads, packs and writes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from minillm_cli.errors import InputError

EXTENSIONS = (".txt", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(#[\w.-]+)?$")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # a run of blank lines


@dataclass(frozen=True)
class SourceSpec:
    name: str  # the source as the user gave it, without the weight
    weight: float


def parse_source(text: str) -> SourceSpec:
    """`SRC[:WEIGHT]` -> SourceSpec. Only a trailing `:number` is a weight, so paths that contain
    ':' elsewhere (or end in a non-numeric ':part') stay whole."""
    name, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            name = head
        except ValueError:  # a path with ':' in it -- or a typo in the weight of an existing file
            if Path(head).expanduser().exists() and not Path(text).expanduser().exists():
                raise InputError(f"--source {text!r}: weight must be a number > 0, got {tail!r}") from None
    if not name:
        raise InputError(f"--source {text!r}: empty source")
    if not math.isfinite(weight) or weight <= 0:
        raise InputError(f"--source {text!r}: weight must be a number > 0, got {tail!r}")
    return SourceSpec(name=name, weight=weight)


def list_files(name: str) -> list[Path] | None:
    """Local files behind a source name (a file, or a folder searched recursively), or None when
    the name is not a local path (then it may be a Hub dataset id). A folder's hidden files and
    folders (names starting with '.') are skipped: they hold copies (`.ipynb_checkpoints/`,
    editors' backups) and tools' state (`.git/`), never more of the corpus."""
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix.lower() not in EXTENSIONS:
            raise InputError(f"{name}: unsupported file type {p.suffix!r} (use {', '.join(EXTENSIONS)})")
        return [p]
    if p.is_dir():
        from minillm_cli.textfiles import files_under

        files = files_under(p, EXTENSIONS, follow_links=False)  # (linked folders not entered, as rglob did)
        if not files:
            raise InputError(f"{name}: folder holds no {'/'.join(EXTENSIONS)} files")
        return files
    # Hub ids look like `name` or `owner/name`; anything else was meant as a local path
    looks_local = (name.startswith(("/", ".", "~")) or not _HUB_ID.match(name)
                   or Path(name.partition("#")[0]).suffix.lower() in EXTENSIONS + (".json",))
    if looks_local:
        raise InputError(f"{name}: no such file or folder")
    return None


def check_overlap(sources: list["Source"]) -> None:
    """InputError when one file would be read twice: a file inside a folder source, a folder
    inside another, or a symlink to a file that is read already (in the same folder or not)."""
    seen: dict[Path, tuple[str, Path]] = {}
    for s in sources:
        for f in s.files or ():
            real = f.resolve()
            if real in seen:
                name, first = seen[real]
                what = (f"{first} and {f} are the same file" if name == s.spec.name
                        else f"{'it' if f == Path(s.spec.name).expanduser() else f} is also read by --source {name}")
                raise InputError(f"--source {s.spec.name}: {what} (its documents would be read twice); "
                                 f"give each file once")
            seen[real] = (s.spec.name, f)


class Source:
    """One source: its files (or Hub id) and how to turn it into jobs. `check()` reads just enough
    to fail early on unreadable, empty or wrongly-fielded input."""

    def __init__(self, spec: SourceSpec, *, text_field: str = "text", split_blank_lines: bool = False,
                 job_bytes: int = 1 << 18):
        self.spec = spec
        self.text_field = text_field
        self.split_blank_lines = split_blank_lines
        self.job_bytes = job_bytes
        self.files = list_files(spec.name)
        self.kind = "hub" if self.files is None else "files"

    # -- up-front checks -------------------------------------------------------------------
    def check(self) -> None:
        """Raise InputError unless the source yields at least one non-empty document."""
        if self.files is None:
            rows = self._hub_rows()
            first = next(iter(rows), None)
            if first is None:
                raise InputError(f"{self.spec.name}: the Hub dataset is empty")
            if self.text_field not in first:
                raise InputError(f"{self.spec.name}: no field {self.text_field!r} "
                                 f"(fields: {', '.join(first)}); pass --text-field")
            return
        for path in self.files:
            for job in self._file_jobs(path, probe=True):
                from minillm_cli.data.pretrain_work import job_texts

                if any(t for t in job_texts(job)):
                    return
        raise InputError(f"{self.spec.name}: empty source (no non-empty documents)")

    # -- streaming -----------------------------------------------------------------------------
    def jobs(self) -> Iterator[tuple]:
        if self.files is None:
            yield from self._hub_jobs()
            return
        for path in self.files:
            yield from self._file_jobs(path)

    def _file_jobs(self, path: Path, probe: bool = False) -> Iterator[tuple]:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from self._txt_jobs(path)
        elif suffix == ".jsonl":
            yield from self._jsonl_jobs(path, probe)
        else:
            yield from self._parquet_jobs(path, probe)

    def _txt_jobs(self, path: Path) -> Iterator[tuple]:
        from minillm_cli.textfiles import read_utf8

        try:
            text = read_utf8(path)  # (a byte-order mark dropped; a bad byte named by line and column)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        if "\r" in text:  # universal newlines, as the text-mode read before read_utf8 gave them
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.split_blank_lines:
            docs = [d for d in _BLANK_LINES.split(text) if d.strip()]
        else:
            docs = [text]
        yield from _group(("texts", str(path)), docs, self.job_bytes)

    def _jsonl_jobs(self, path: Path, probe: bool) -> Iterator[tuple]:
        try:
            fh = open(path, "rb")
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        with fh:
            lines, size, first = [], 0, 1
            for n, line in enumerate(fh, start=1):
                lines.append(line)
                size += len(line)
                # a probe only needs the first few records: it is there to catch a wrong field
                if size >= self.job_bytes or (probe and len(lines) >= 16):
                    yield ("jsonl", str(path), first, lines, self.text_field)
                    lines, size, first = [], 0, n + 1
            if lines:
                yield ("jsonl", str(path), first, lines, self.text_field)

    def _parquet_jobs(self, path: Path, probe: bool) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged or foreign file
            raise InputError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise InputError(f"{path}: no column {self.text_field!r} (columns: {', '.join(names)}); "
                             "pass --text-field")
        rows, row = (64 if probe else 1024), 0
        for batch in pf.iter_batches(batch_size=rows, columns=[self.text_field]):
            values = batch.column(0).to_pylist()
            texts = _texts(values, self.text_field, lambda i: f"{path}: row {row + i + 1}")
            row += len(values)
            yield from _group(("texts", str(path)), texts, self.job_bytes)

    def _hub_rows(self):
        import datasets

        from minillm_cli import hub

        name, _, config = self.spec.name.partition("#")
        hub.check_reachable()  # (offline mode when not: the local cache, or one line at once)
        try:
            return datasets.load_dataset(name, config or None, split="train", streaming=True)
        except Exception as e:  # offline, unknown id, gated: all are bad input from here
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{self.spec.name}: not a local file or folder, and the Hub dataset "
                             f"could not be opened ({first[:200]})") from None

    def _hub_jobs(self) -> Iterator[tuple]:
        def texts():
            for n, row in enumerate(self._hub_rows(), start=1):
                yield from _texts([row.get(self.text_field)], self.text_field, lambda i: f"{self.spec.name}: row {n}")
        yield from _group(("texts", self.spec.name), texts(), self.job_bytes)


def _texts(values: list, field: str, where: Callable[[int], str]) -> list[str]:
    """The texts among records' `field` values (None: no text, skipped). Anything else is bad
    input, said as .jsonl says it: skipped in silence, a number column made the source look empty.
    `where(i)`: where value i is, for the message."""
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise InputError(f"{where(i)}: field {field!r} is {type(v).__name__}, not text")
    return [v for v in values if v is not None]


def _group(head: tuple, docs, job_bytes: int) -> Iterator[tuple]:
    """Bundle documents into jobs of about `job_bytes` characters (big enough that process
    hand-off costs little, small enough that the sources interleave without long waits)."""
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= job_bytes:
            yield (*head, batch)
            batch, size = [], 0
    if batch:
        yield (*head, batch)
