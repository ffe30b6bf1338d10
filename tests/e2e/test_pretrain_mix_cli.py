"""`minillm pretrain-mix` as users run it: the Dolly sample and a text file mixed 3:1 (as in the
shared trial), JSON summary, the reader on its output, and one-line errors with exit 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minillm_cli.cli.app import app

DOLLY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dolly-sample.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    a = root / "a.jsonl"
    if DOLLY.is_file():  # the trial's data when the shared folder is there
        rows = [json.loads(line) for line in DOLLY.read_text().splitlines()]
        texts = [f"{r['context']} {r['response']}" for r in rows]
    else:
        texts = [f"Document {i}: the river runs past stone {i} under a blue sky." * 3 for i in range(600)]
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    b = root / "b.txt"
    b.write_text("\n\n".join(f"Paragraph {i} of a long licence text: you may copy and share it." * 4
                             for i in range(400)))
    return {"a": a, "b": b, "root": root}


def run(*args):
    return CliRunner().invoke(app, ["pretrain-mix", *map(str, args)])


def test_mix_3_to_1_json_summary_and_reader(sources, tiny_dir, tmp_path):
    out = tmp_path / "pt"
    r = run("--source", f"{sources['a']}:3", "--source", f"{sources['b']}:1",
            "--tokenizer", tiny_dir / "student", "--seq-len", 64, "--max-tokens", 40000,
            "--out", out, "--json", "--quiet", "--workers", 1)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    meta = json.loads((out / "meta.json").read_text())
    assert summary["sources"] == meta["sources"] and meta["num_chunks"] == 625
    t = {Path(s["name"]).name: s["tokens"] for s in meta["sources"]}
    assert abs(t["a.jsonl"] / t["b.txt"] - 3) / 3 <= 0.05
    assert meta["splits"]["valid"] > 0 and meta["tokenizer"] == str(tiny_dir / "student")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt"]  # no partial folder left over

    from minillm_cli.data.pretrain_read import PretrainData
    from minillm_cli.models import load_tokenizer

    data = PretrainData(out)
    data.check_tokenizer(load_tokenizer(str(tiny_dir / "student")))
    batch = data.batch(data.indices_for_step(0, 4, seed=1))
    assert tuple(batch.shape) == (4, 64) and int(batch.max()) < meta["vocab_size"]

    again = run("--source", sources["a"], "--tokenizer", tiny_dir / "student", "--out", out, "--quiet")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("source, extra, pattern", [
    ("{a}:0", [], "weight must be a number > 0"),
    ("{root}/missing.jsonl", [], "no such file or folder"),
    ("{a}", ["--text-field", "body"], "a.jsonl:1: no field 'body' (fields: text)"),
    ("{empty}", [], "empty source"),
    ("openwebtext", [], "Hub dataset could not be opened"),
    ("{tiny}", ["--workers", 0], "tiny.txt: fewer than --seq-len (512) tokens"),
])
def test_bad_input_is_one_line_exit_2(sources, tiny_dir, tmp_path, source, extra, pattern):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "tiny.txt").write_text("hello")
    src = source.format(a=sources["a"], root=sources["root"], empty=empty, tiny=tmp_path / "tiny.txt")
    r = run("--source", src, "--tokenizer", tiny_dir / "student", "--out", tmp_path / "pt", "--quiet", *extra)
    assert r.exit_code == 2, r.output
    assert pattern in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "pt").exists()


def test_shares_warning_survives_quiet_and_progress_counts_tokens(sources, tiny_dir, tmp_path):
    """Without --max-tokens every source is used whole: weights 3:1 give other shares, which one
    warning line says even under --quiet. The plain progress line counts tokens, not steps."""
    args = ["--source", f"{sources['a']}:3", "--source", f"{sources['b']}:1", "--tokenizer", tiny_dir / "student",
            "--seq-len", 64, "--workers", 0]
    r = run(*args, "--out", tmp_path / "q", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("warning: the weights ask for ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "without --max-tokens every source is used whole" in r.stderr
    r = run(*args, "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert re.search(r"^pretrain-mix \d+ tokens: tok/s ", r.stderr, re.M) and " step " not in r.stderr, r.stderr


def test_command_module_imports_no_heavy_libraries():
    code = ("import sys, minillm_cli.cli.pretrain_mix; "
            "bad = [m for m in ('torch', 'transformers', 'numpy', 'datasets') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
