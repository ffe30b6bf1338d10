"""pretrain-mix on awkward input: overlapping sources and hidden copies, special-token text inside
documents, sources that give no chunk or run out (shares off the weights), meta.json's counts when
--max-tokens stops a source mid-way, error locations, and the plain progress line. Tiny tokenizer,
in-process workers unless a test says otherwise."""
from __future__ import annotations

import re

import numpy as np
import pytest

from minillm_cli.data.pretrain_build import build_mixture
from minillm_cli.data.pretrain_sources import list_files
from minillm_cli.errors import InputError
from test_pretrain_mix import cfg, docs, stream_of, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from minillm_cli.models import load_tokenizer

    return load_tokenizer(str(tiny_dir / "tokenizer"))


def ids_of(tok, texts) -> np.ndarray:
    """The stream a source of `texts` gives: each document's ids, special-token text as text, EOS after."""
    return np.concatenate([tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                           + [tok.eos_token_id] for t in texts])


# -- 1: each file read once --------------------------------------------------------------------
def test_overlapping_sources_are_refused_and_hidden_files_skipped(tmp_path, tok):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    for i, name in enumerate(("n1.txt", "n2.txt", "sub/n3.txt")):
        (notes / name).write_text(docs(1, i, "N")[0])
    for extra in (notes / "n1.txt", notes / "sub"):  # a file inside the folder, a folder inside it
        for order in ((notes, extra), (extra, notes)):
            with pytest.raises(InputError, match=r"is also read by --source .*read twice"):
                build_mixture(cfg(tmp_path, [str(order[0]), f"{order[1]}:2"], tok))
    (notes / "again.txt").symlink_to(notes / "n2.txt")  # the same file twice in one folder
    with pytest.raises(InputError, match=r"again\.txt and .*n2\.txt are the same file"):
        build_mixture(cfg(tmp_path, [str(notes)], tok))

    # hidden copies (a notebook's checkpoints, dot-files) are not part of a folder source
    books = tmp_path / "books"
    (books / ".ipynb_checkpoints").mkdir(parents=True)
    texts = docs(30, 3, "B")
    write_jsonl(books / "a.jsonl", texts)
    write_jsonl(books / ".ipynb_checkpoints" / "a-checkpoint.jsonl", texts)
    write_jsonl(books / ".a.jsonl", texts)
    assert list_files(str(books)) == [books / "a.jsonl"]
    meta = build_mixture(cfg(tmp_path, [str(books)], tok))
    assert meta["sources"][0]["tokens"] == len(ids_of(tok, texts)) // 32 * 32  # one copy only


# -- 2: special-token text in a document is text -------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])  # in this process, and in a spawned worker
def test_special_token_text_is_not_a_special_id(tmp_path, tok, workers):
    texts = [f"{d} <|pad|> and <|endoftext|> are {tok.pad_token} text here" for d in docs(40, 4, "S")]
    meta = build_mixture(cfg(tmp_path, [write_jsonl(tmp_path / "s.jsonl", texts)], tok, workers=workers))
    ids = stream_of(tmp_path / "pt", 0)
    assert np.array_equal(ids, ids_of(tok, texts)[: len(ids)]) and meta["sources"][0]["tokens"] == len(ids)
    assert tok.pad_token_id not in ids
    ends = np.cumsum([len(ids_of(tok, [t])) for t in texts])
    assert np.flatnonzero(ids == tok.eos_token_id).tolist() == [e - 1 for e in ends if e <= len(ids)]


def test_special_token_text_with_a_slow_tokenizer_payload(tok):
    """Slow tokenizers travel pickled and are called with split_special_tokens=True."""
    from minillm_cli.data import pretrain_work

    text = "a <|pad|> b <|endoftext|> c"
    for payload in (pretrain_work.tokenizer_payload(tok), ("slow", tok)):
        pretrain_work.init_worker(payload, tok.eos_token_id, "uint16")
        ids, lengths, nbytes = pretrain_work.encode_job(("texts", "x", [text]))
        assert ids.tolist() == ids_of(tok, [text]).tolist() and tok.pad_token_id not in ids.tolist()
        assert lengths.tolist() == [len(ids)] and nbytes.tolist() == [len(text)]


# -- 3: sources that give nothing, shares off the weights ---------------------------------------
def test_a_source_that_gives_no_chunk_is_an_error(tmp_path, tok):
    big = write_jsonl(tmp_path / "big.jsonl", docs(200, 5, "B"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello")  # < 32 tokens: nothing of it would be in the mixture
    with pytest.raises(InputError, match=r"--source .*tiny\.txt: fewer than --seq-len \(32\) tokens"):
        build_mixture(cfg(tmp_path, [big, str(tiny)], tok))
    with pytest.raises(InputError, match=r"--source .*tiny\.txt: fewer than --seq-len"):
        build_mixture(cfg(tmp_path, [str(tiny)], tok))
    rare = write_jsonl(tmp_path / "rare.jsonl", docs(200, 6, "R"))  # never its turn in 10 chunks
    with pytest.raises(InputError, match=r"--source .*rare\.jsonl: no chunk of it is in the first "
                                         r"--max-tokens \(320\): weight 0\.01 of 1\.01"):
        build_mixture(cfg(tmp_path, [big, f"{rare}:0.01"], tok, max_tokens=320))
    assert not (tmp_path / "pt").exists()


def test_shares_off_the_weights_warn_once(tmp_path, tok, capsys):
    small = write_jsonl(tmp_path / "s.jsonl", docs(15, 7, "S"))
    big = write_jsonl(tmp_path / "b.jsonl", docs(300, 8, "B"))
    meta = build_mixture(cfg(tmp_path, [f"{small}:3", big], tok, max_tokens=6400))  # no progress: as --quiet
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the weights ask for ")
    s, b = meta["sources"]
    assert lines[0] == f"warning: the weights ask for {small} 75.0% (weight 3), {big} 25.0% (weight 1); the mixture " \
                       f"holds {100 * s['share']:.1f}%, {100 * b['share']:.1f}%: {small} ran out after " \
                       f"{s['tokens']} tokens before --max-tokens (6400)"

    build_mixture(cfg(tmp_path, [f"{small}:3", big], tok, out=tmp_path / "whole"))  # no --max-tokens
    assert re.fullmatch(r"warning: .*: without --max-tokens every source is used whole.*\n",
                        capsys.readouterr().err)
    for sources in ([small, big], [f"{big}:3", f"{small}:1"]):  # equal weights; shares as asked
        build_mixture(cfg(tmp_path, sources, tok, max_tokens=640, out=tmp_path / "ok", overwrite=True))
        assert capsys.readouterr().err == ""


# -- 4: meta.json counts what is in the mixture -------------------------------------------------
@pytest.mark.parametrize("max_tokens", [480, None])
def test_meta_counts_the_documents_in_the_mixture(tmp_path, tok, max_tokens):
    texts = docs(270, 9, "M")
    build = build_mixture(cfg(tmp_path, [write_jsonl(tmp_path / "m.jsonl", texts)], tok, max_tokens=max_tokens))
    src = build["sources"][0]
    lengths = np.array([len(ids_of(tok, [t])) for t in texts])
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends - lengths, src["tokens"]))  # documents that start inside the mixture
    assert src["documents"] == k and (k < 30 if max_tokens else k <= 270)
    assert src["text_bytes"] == sum(len(t.encode()) for t in texts[:k])
    assert src["dropped_tokens"] == (ends[-1] if src["exhausted"] else ends[k - 1]) - src["tokens"]
    assert 0 <= src["dropped_tokens"] and "text_bytes_read" not in src


# -- 5: where bad input is -------------------------------------------------------------------------
def test_error_locations(tmp_path, tok, monkeypatch):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nthe caf\u00e9 is open\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.txt:2: not UTF-8 text: byte 0xe9 at column 8"):
        build_mixture(cfg(tmp_path, [str(latin)], tok))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n\.parquet: row 1: field 'text' is int, not text"):
        build_mixture(cfg(tmp_path, [str(tmp_path / "n.parquet")], tok))
    pq.write_table(pa.table({"text": [None] * 100 + [7.5]}), tmp_path / "late.parquet")  # rows past a batch
    with pytest.raises(InputError, match=r"late\.parquet: row 101: field 'text' is float, not text"):
        build_mixture(cfg(tmp_path, [str(tmp_path / "late.parquet")], tok))

    from minillm_cli.data.pretrain_sources import Source

    monkeypatch.setattr(Source, "_hub_rows", lambda self: iter([{"text": "x " * 40}, {"text": 3}]))
    with pytest.raises(InputError, match=r"org/set: row 2: field 'text' is int, not text"):
        build_mixture(cfg(tmp_path, ["org/set"], tok))


# -- 6: the plain progress line counts tokens ---------------------------------------------------
def test_plain_progress_line_counts_tokens(tmp_path, tok, capsys):
    from minillm_cli.progress import Progress

    build_mixture(cfg(tmp_path, [write_jsonl(tmp_path / "p.jsonl", docs(50, 10, "P"))], tok, max_tokens=320),
                  progress=Progress("pretrain-mix", unit="tokens"))
    err = capsys.readouterr().err
    assert re.search(r"^pretrain-mix \d+ tokens: tok/s ", err, re.M) and " step " not in err, err


def test_txt_newlines_read_as_text_mode_read_them(tmp_path, tok):
    """.txt is read through read_utf8 (for the line and column of a bad byte): \r\n and \r still
    become \n, as the text-mode read before it gave them."""
    paras = docs(30, 11, "W")
    (tmp_path / "w.txt").write_bytes("\r\n\r\n".join(p.replace(" ", "\r", 1) for p in paras).encode())
    build_mixture(cfg(tmp_path, [str(tmp_path / "w.txt")], tok, split_blank_lines=True))
    ids = stream_of(tmp_path / "pt", 0)
    assert np.array_equal(ids, ids_of(tok, [p.replace(" ", "\n", 1) for p in paras])[: len(ids)])


# -- 7: stopping the worker pool ------------------------------------------------------------------
def _send_half_a_result(marker: str) -> None:
    """A pool task that starts sending a result and stops halfway, as a worker that terminate()
    kills mid-send does: the length header of a 1 MB message, then 10 bytes of it."""
    import os
    import struct
    import sys
    import time

    outqueue = sys._getframe(1).f_locals["outqueue"]  # (multiprocessing.pool.worker's)
    os.write(outqueue._writer.fileno(), struct.pack("!i", 1 << 20) + b"0123456789")
    open(marker, "w").close()
    time.sleep(120)


def test_stopping_the_pool_does_not_wait_for_a_half_sent_result(tmp_path):
    """A worker killed while it sends a result (on Ctrl-C, an error, or --max-tokens reached with
    jobs in flight) left Pool.terminate() joining the pool's result thread for ever: the command
    hung. And workers ignore SIGINT (a terminal's Ctrl-C reaches them too): the main process
    stops them, without a KeyboardInterrupt traceback from each."""
    import multiprocessing as mp
    import threading
    import time

    from minillm_cli.data.pretrain_build import stop_pool
    from minillm_cli.data.pretrain_work import init_pool_worker

    pool = mp.get_context("spawn").Pool(1, initializer=init_pool_worker, initargs=(("slow", None), 0, "uint16"))
    import signal

    assert pool.apply_async(signal.getsignal, (signal.SIGINT,)).get(60) == signal.SIG_IGN
    marker = tmp_path / "sent"
    pool.apply_async(_send_half_a_result, (str(marker),))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    stopper = threading.Thread(target=stop_pool, args=(pool, 1.0), daemon=True)
    stopper.start()
    stopper.join(15)
    assert not stopper.is_alive(), "stopping the pool hung on the half-sent result"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_lone_surrogate_escape_is_a_located_input_error(tmp_path, tok, workers):
    """JSON lets a record hold "\\ud800" (half a UTF-16 pair, a truncated emoji); no UTF-8 text
    has it. It stopped the build with `UnicodeEncodeError` (exit 1, no file or line)."""
    path = write_jsonl(tmp_path / "s.jsonl", docs(20, 12, "S"))
    with open(path, "a") as f:
        f.write('{"text": "cut emoji \\ud83d here"}\n')
    with pytest.raises(InputError, match=r"s\.jsonl:21: field 'text' holds '\\ud83d' at character 11, half of a "
                                         r"UTF-16 surrogate pair") as e:
        build_mixture(cfg(tmp_path, [path], tok, workers=workers))
    assert "\n" not in str(e.value) and not (tmp_path / "pt").exists()
