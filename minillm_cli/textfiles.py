"""Users' files. Text is read as UTF-8, and a byte that is not says file, line and column (exit 2)
instead of a UnicodeDecodeError with a byte offset. An output file's folder is checked before
the work that fills it, not after."""
from __future__ import annotations

import codecs
import io
import os
import tempfile
from pathlib import Path

from minillm_cli.errors import InputError


def read_utf8(path: Path, what: str = "") -> str:
    """The text of `path` (a leading byte-order mark dropped, as spreadsheet exports write it).
    `what`: how the message names the file's role (e.g. "a minillm evaluate result")."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[start:e.start].decode("utf-8", errors="replace")) + 1  # characters, as editors count
        role = f" ({what})" if what else ""
        raise InputError(f"{path}:{line}: not UTF-8 text{role}: byte 0x{data[e.start]:02x} at column {column}; "
                         f"save the file as UTF-8") from None


def files_under(folder: Path, suffixes, *, follow_links: bool) -> list[Path]:
    """The files under `folder` (subfolders included) whose suffix, in any case (B.JSONL), is one of
    `suffixes`; names starting with '.' skipped, files and folders (.git, editors' backups,
    `.ipynb_checkpoints/` copies); sorted by their path in the folder, so every run and every
    process reads them in one order. follow_links: linked folders are entered, each once (a link
    back up would loop)."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=follow_links):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in names if not f.startswith(".") and Path(f).suffix.lower() in suffixes
                  and os.path.isfile(os.path.join(root, f))]
    return sorted(found, key=lambda f: f.relative_to(folder).parts)


def read_lines(path: Path) -> list[str]:
    """`read_utf8`'s text in lines, as a text-mode file reads them: split at \\n, \\r\\n or \\r
    only (not at U+2028 and the like, which JSON strings may hold as they are)."""
    return list(io.StringIO(read_utf8(path), newline=None))


def check_writable(flag: str, target) -> None:
    """InputError unless a file can be written where `target` goes (its folder is created)."""
    folder = Path(target).expanduser().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {target}: cannot create its folder ({e.strerror or e})") from None
    try:  # (a folder that exists may still refuse files: read-only, /proc)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise InputError(f"{flag} {target}: cannot write in its folder ({e.strerror or e})") from None
