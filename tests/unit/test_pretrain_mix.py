"""pretrain-mix: source parsing, weighted interleaving, packing that decodes back to the text,
the memory-mapped reader, and one-line errors for bad input. Tiny tokenizer, in-process workers
(one test uses real worker processes and must give the same bytes)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minillm_cli.data.pretrain_build import (
    PretrainMixConfig, build_mixture, pick_source, token_dtype,
)
from minillm_cli.data.pretrain_read import PretrainData, fingerprint, indices_for_step
from minillm_cli.data.pretrain_sources import parse_source
from minillm_cli.errors import InputError

WORDS = ("apple pear plum river stone cloud seven quick brown fox jumps over the lazy dog "
         "when where which response instruction sky blue").split()


def docs(n: int, seed: int, tag: str) -> list[str]:
    """ASCII documents of varied length (ASCII so a decoded token prefix is a text prefix)."""
    rng = np.random.default_rng(seed)
    return [f"{tag}{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))
            for i in range(n)]


def write_jsonl(path: Path, texts, field="text") -> str:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def write_txt_folder(folder: Path, texts) -> str:
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i:04d}.txt").write_text(t)
    return str(folder)


def cfg(tmp_path, sources, tok, **kw) -> PretrainMixConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("seq_len", 32)
    kw.setdefault("valid_fraction", 0.0)
    return PretrainMixConfig(sources=sources, tokenizer=str(tok.name_or_path), out=str(kw.pop("out", tmp_path / "pt")), **kw)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from minillm_cli.models import load_tokenizer

    return load_tokenizer(str(tiny_dir / "tokenizer"))


def stream_of(out: Path, source: int) -> np.ndarray:
    """One source's tokens in stream order (valid_fraction 0 keeps the file in build order)."""
    data = PretrainData(out)
    n = data.num_chunks("train")
    rows = np.asarray(data.batch(range(n)))
    return rows[data.sources_of(range(n)) == source].reshape(-1)


# -- parsing and interleaving ------------------------------------------------------------------
def test_parse_source_weights_and_colons():
    assert parse_source("a.txt:3") == parse_source("a.txt:3.0")
    assert parse_source("a.txt:3").name == "a.txt" and parse_source("a.txt:3").weight == 3.0
    assert parse_source("a.txt").weight == 1.0
    assert parse_source("/d/x:y/b.jsonl:0.5").name == "/d/x:y/b.jsonl"
    assert parse_source("/d/x:y/b.jsonl").name == "/d/x:y/b.jsonl"  # ':y/b.jsonl' is no number
    for bad in ("a.txt:0", "a.txt:-1", "a.txt:nan", "a.txt:inf"):
        with pytest.raises(InputError, match="weight must be a number > 0"):
            parse_source(bad)


def test_pick_source_tracks_weights_and_renormalises_after_exhaustion():
    weights, chunks, active = [3.0, 1.0, 2.0], [0, 0, 0], [True, True, True]
    for _ in range(600):
        chunks[pick_source(weights, chunks, active)] += 1
    assert chunks == [300, 100, 200]
    active[0] = False  # source 0 runs out: 1 and 2 go on at 1:2
    for _ in range(300):
        chunks[pick_source(weights, chunks, active)] += 1
    assert chunks == [300, 200, 400]
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# -- building ---------------------------------------------------------------------------------
def test_mix_3_to_1_and_decodes_back(tmp_path, tok):
    a_docs, b_docs = docs(400, 1, "A"), docs(200, 2, "B")
    a = write_jsonl(tmp_path / "a.jsonl", a_docs)
    b = write_txt_folder(tmp_path / "b", b_docs)  # one document per file
    meta = build_mixture(cfg(tmp_path, [f"{a}:3", f"{b}:1"], tok, max_tokens=8000))
    out = tmp_path / "pt"
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    ta, tb = (s["tokens"] for s in meta["sources"])
    assert abs(ta / tb - 3) / 3 <= 0.05
    assert ta + tb == meta["num_chunks"] * 32 == meta["total_tokens"] <= 8000
    assert [s["name"] for s in meta["sources"]] == [a, b] and meta["sources"][0]["weight"] == 3.0
    assert meta["dtype"] == "uint16" and meta["tokenizer_fingerprint"] == fingerprint(tok)
    eos = tok.eos_token
    for i, texts in enumerate((a_docs, b_docs)):
        ids = stream_of(out, i)
        expected = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                   for t in texts])
        assert np.array_equal(ids, expected[: len(ids)])
        text = tok.decode(ids.tolist())
        full = "".join(t + eos for t in texts)
        assert full.startswith(text) and text.count(eos) >= 10  # borders marked by EOS


def test_exhausted_source_is_reported_and_the_rest_keep_their_weights(tmp_path, tok):
    small = write_jsonl(tmp_path / "s.jsonl", docs(15, 3, "S"))
    b = write_jsonl(tmp_path / "b.jsonl", docs(300, 4, "B"))
    c = write_jsonl(tmp_path / "c.jsonl", docs(300, 5, "C"))
    meta = build_mixture(cfg(tmp_path, [f"{small}:5", f"{b}:1", f"{c}:2"], tok, max_tokens=9600))
    s, mb, mc = meta["sources"]
    assert s["exhausted"] and not mb["exhausted"] and not mc["exhausted"]
    assert 0 <= s["dropped_tokens"] < 32 and s["tokens"] > 0
    assert abs(mc["tokens"] / mb["tokens"] - 2) <= 2 * 32 / mb["tokens"] + 1e-9  # within a chunk
    assert meta["total_tokens"] == 9600


def test_workers_give_identical_bytes_and_valid_split_moves_chunks(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs(300, 6, "A"))
    b = write_txt_folder(tmp_path / "b", docs(100, 7, "B"))
    base = build_mixture(cfg(tmp_path, [f"{a}:2", b], tok, out=tmp_path / "w0"))
    build_mixture(cfg(tmp_path, [f"{a}:2", b], tok, out=tmp_path / "w2", workers=2))
    assert (tmp_path / "w0/tokens.bin").read_bytes() == (tmp_path / "w2/tokens.bin").read_bytes()
    assert all(s["exhausted"] for s in base["sources"])  # no cap: both read to the end

    meta = build_mixture(cfg(tmp_path, [f"{a}:2", b], tok, out=tmp_path / "v", valid_fraction=0.1))
    n = base["num_chunks"]
    assert meta["num_chunks"] == n and meta["splits"]["valid"] in (n // 10, n // 10 + 1)
    assert meta["splits"]["train"] + meta["splits"]["valid"] == n
    rows = lambda d: Counter(map(bytes, np.asarray(PretrainData(d).tokens)))  # noqa: E731
    assert rows(tmp_path / "v") == rows(tmp_path / "w0")  # same chunks, some held out


def test_txt_blank_line_documents_and_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = docs(40, 8, "P")
    (tmp_path / "t.txt").write_text("\n\n  \n".join(paras))
    pq.write_table(pa.table({"body": docs(60, 9, "Q")}), tmp_path / "q.parquet")
    meta = build_mixture(cfg(tmp_path, [str(tmp_path / "t.txt"), str(tmp_path / "q.parquet")], tok,
                             split_blank_lines=True, text_field="body"))
    t, q = meta["sources"]
    assert t["documents"] == 40 and q["documents"] == 60
    expected = np.concatenate([tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                               for p in paras])
    ids = stream_of(tmp_path / "pt", 0)
    assert np.array_equal(ids, expected[: len(ids)])


def test_byte_order_marks_are_not_text(tmp_path, tok):
    """A UTF-8 byte-order mark opening a .jsonl (json refuses it) or a .txt (it would become the
    first document's first token) is skipped."""
    a, b = docs(5, 10, "A"), docs(5, 11, "B")
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf\n" + "".join(json.dumps({"text": t}) + "\n" for t in a).encode())
    (tmp_path / "b.txt").write_text("\ufeff" + b[0], encoding="utf-8")
    build_mixture(cfg(tmp_path, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tok))
    for source, texts in ((0, a), (1, b[:1])):
        expected = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts])
        ids = stream_of(tmp_path / "pt", source)
        assert np.array_equal(ids, expected[: len(ids)]) and len(ids) > 0


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("missing", r"no such file or folder"),
    ("empty", r"empty source"),
    ("field", r"a\.jsonl:1: no field 'text' \(fields: body, id\); pass --text-field"),
    ("badjson", r"a\.jsonl:3: not valid JSON"),
    ("binary", r"not UTF-8 text"),
    ("parquet", r"cannot read as Parquet"),
    ("ext", r"unsupported file type '\.csv'"),
])
def test_bad_sources_are_one_line_input_errors(tmp_path, tok, case, pattern):
    p = tmp_path / "a.jsonl"
    if case == "empty":
        p = tmp_path / "empty"
        p.mkdir()
        (p / "x.txt").write_text("")
        (p / "y.jsonl").write_text("\n")
    elif case == "field":
        write_jsonl(p, ["hi"], field="body")
    elif case == "badjson":
        p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    elif case == "binary":
        p = tmp_path / "a.txt"
        p.write_bytes(b"\xff\xfe\x00bad")
    elif case == "parquet":
        p = tmp_path / "a.parquet"
        p.write_text("not parquet")
    elif case == "ext":
        p = tmp_path / "a.csv"
        p.write_text("text\nhi\n")
    with pytest.raises(InputError, match=pattern) as e:
        build_mixture(cfg(tmp_path, [str(p)], tok))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pt").exists()


def test_config_validation(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="weight must be"):
        cfg(tmp_path, [f"{tmp_path}/a.txt:0"], tok)
    with pytest.raises(InputError, match="weight must be a number > 0, got 'abc'"):  # not "no such file"
        cfg(tmp_path, [f"{tmp_path}/a.txt:abc"], tok)
    with pytest.raises(InputError, match="given more than once"):
        cfg(tmp_path, [f"{tmp_path}/a.txt", f"{tmp_path}/./a.txt:2"], tok)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot create the folder"):
        build_mixture(cfg(tmp_path, [f"{tmp_path}/a.txt"], tok, out=tmp_path / "file" / "pt"))
    with pytest.raises(InputError, match="--max-tokens"):
        cfg(tmp_path, [f"{tmp_path}/a.txt"], tok, max_tokens=10)
    with pytest.raises(InputError, match="--valid-fraction"):
        cfg(tmp_path, [f"{tmp_path}/a.txt"], tok, valid_fraction=0.7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        cfg(tmp_path, [f"{tmp_path}/a.txt"], tok, out=tmp_path / "full")
    with pytest.raises(InputError, match="fewer than --seq-len"):
        build_mixture(cfg(tmp_path, [f"{tmp_path}/a.txt"], tok))  # 'hello' is < 32 tokens


def test_overwrite_replaces_only_a_mixture_that_holds_no_input(tmp_path, tok):
    """--overwrite replaces the whole --out folder: not a folder this command did not write (a
    home directory given by mistake), nor a mixture that holds a source."""
    good = write_jsonl(tmp_path / "g.jsonl", docs(100, 10, "G"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not a pretrain-mix folder"):
        cfg(tmp_path, [good], tok, out=mine, overwrite=True)
    build_mixture(cfg(tmp_path, [good], tok))
    inner = write_jsonl(tmp_path / "pt" / "more.jsonl", docs(50, 11, "M"))
    with pytest.raises(InputError, match=r"holds --source .*more\.jsonl, which --overwrite would delete"):
        cfg(tmp_path, [good, inner], tok, overwrite=True)
    (tmp_path / "pt" / "more.jsonl").unlink()
    build_mixture(cfg(tmp_path, [good], tok, overwrite=True, seq_len=16))  # ours, no input inside: replaced
    assert json.loads((tmp_path / "pt" / "meta.json").read_text())["seq_len"] == 16
    assert (mine / "notes.txt").read_text() == "keep"


def test_failed_build_leaves_no_folder_and_keeps_the_old_one(tmp_path, tok):
    good = write_jsonl(tmp_path / "g.jsonl", docs(100, 10, "G"))
    build_mixture(cfg(tmp_path, [good], tok))
    before = (tmp_path / "pt" / "tokens.bin").read_bytes()
    # fails mid-stream: the first records are fine, so the up-front check passes
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, docs(3000, 11, "X"))
    with open(bad, "a") as f:
        f.write("{broken\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:3001: not valid JSON"):
        build_mixture(cfg(tmp_path, [str(bad)], tok, overwrite=True))
    assert (tmp_path / "pt" / "tokens.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "g.jsonl", "pt"]  # no partial


# -- reading ------------------------------------------------------------------------------------
def test_reader_batches_checks_and_sampler(tmp_path, tok, tiny_dir):
    a = write_jsonl(tmp_path / "a.jsonl", docs(200, 12, "A"))
    build_mixture(cfg(tmp_path, [a], tok, valid_fraction=0.2))
    data = PretrainData(tmp_path / "pt")
    raw = np.fromfile(tmp_path / "pt" / "tokens.bin", dtype=np.uint16).reshape(-1, 32)
    n_train, n_valid = data.num_chunks("train"), data.num_chunks("valid")
    assert n_train + n_valid == len(raw) and n_valid > 0
    x = data.batch([2, 0], "train")
    assert str(x.dtype) == "torch.int64" and tuple(x.shape) == (2, 32)
    assert np.array_equal(x.numpy(), raw[[2, 0]])
    assert np.array_equal(data.batch([0], "valid").numpy(), raw[[n_train]])
    with pytest.raises(IndexError):
        data.batch([n_valid], "valid")

    data.check_tokenizer(tok)
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    other = train_bpe_tokenizer(docs(50, 13, "O"), tmp_path / "other", vocab_size=300)
    with pytest.raises(InputError, match="fingerprint"):
        data.check_tokenizer(other)
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))  # same vocabulary, reloaded
    assert fingerprint(plain) == fingerprint(tok)

    # sampler: a permutation per epoch, same for the same seed, different for another
    steps = [indices_for_step(s, 4, seed=7, num_chunks=10) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert steps == [indices_for_step(s, 4, 7, 10) for s in range(5)]  # recomputed: same
    assert flat != [i for s in range(5) for i in indices_for_step(s, 4, 8, 10)]
    assert data.indices_for_step(3, 2, 0) == indices_for_step(3, 2, 0, n_train)


def test_reader_refuses_unfinished_or_damaged_folders(tmp_path, tok):
    with pytest.raises(InputError, match="no such folder"):
        PretrainData(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokens.bin").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="not a finished pretrain-mix folder"):
        PretrainData(tmp_path / "half")
    a = write_jsonl(tmp_path / "a.jsonl", docs(50, 14, "A"))
    build_mixture(cfg(tmp_path, [a], tok))
    with open(tmp_path / "pt" / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="meta.json says"):
        PretrainData(tmp_path / "pt")
