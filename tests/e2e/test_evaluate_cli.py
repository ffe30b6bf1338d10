"""`minillm evaluate` as users run it: the contract's files, --json, the table, and bad input
(exit 2 with one line, no traceback)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from minillm_cli.cli.app import app




def invoke(*args):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def one_error_line(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def vicuna_like(tmp_path_factory):
    rows = [{"question_id": i, "category": "generic", "turns": [f"How can I improve item {i}?"]} for i in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("v") / "vicuna.jsonl", rows)


def test_contract_files_json_and_table(tiny_dir, dolly_like, tmp_path):
    from rouge_score import rouge_scorer

    out = tmp_path / "eval" / "a.json"
    res = invoke("--model", tiny_dir / "student", "--data", dolly_like, "--metric", "rougeL", "--metric", "dist4,lm-loss",
                 "--seeds", 2, "--limit", 5, "--max-new-tokens", 10, "--batch-size", 2, "--out", out, "--json",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    saved = json.loads(out.read_text())
    assert printed["metrics"] == saved["metrics"]
    assert set(saved) >= {"model", "data", "n", "metrics", "protocol"} and saved["n"] == 5
    assert list(saved["metrics"]) == ["rougeL", "dist4", "lm-loss"]
    assert all(set(m) == {"mean", "std", "per_seed"} for m in saved["metrics"].values())
    assert "rougeL" in res.stderr and "dist4" in res.stderr  # the table goes to stderr
    rows = [json.loads(line) for line in open(out.with_suffix(".jsonl"))]
    assert len(rows) == 10 and all(isinstance(r["references"], list) for r in rows)
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    by = {}
    for r in rows:
        by.setdefault(r["seed"], []).append(max(sc.score(x, r["prediction"])["rougeL"].fmeasure for x in r["references"]) * 100)
    assert saved["metrics"]["rougeL"]["mean"] == pytest.approx(statistics.fmean(statistics.fmean(v) for v in by.values()))


def test_quiet_without_out_prints_only_json(tiny_dir, vicuna_like):
    res = invoke("--model", tiny_dir / "student", "--data", vicuna_like, "--seeds", 1, "--max-new-tokens", 6,
                 "--json", "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["metrics"]) == ["dist4"] and res.stderr.strip() == ""


def test_teacher_adds_both_kls_by_default(tiny_dir, dolly_like):
    res = invoke("--model", tiny_dir / "student", "--teacher", tiny_dir / "teacher", "--data", dolly_like, "--seeds", 1,
                 "--limit", 3, "--max-new-tokens", 6, "--json", "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["metrics"]) == ["rougeL", "reverse-kl", "forward-kl"]


def test_greedy_names_the_sampling_options_it_ignores(tiny_dir, vicuna_like):
    res = invoke("--model", tiny_dir / "student", "--data", vicuna_like, "--seeds", 1, "--max-new-tokens", 4,
                 "--greedy", "--temperature", 0.5, "--top-p", 0.9, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: --greedy takes the most likely token; --temperature, --top-p change nothing" in res.stderr
    res = invoke("--model", tiny_dir / "student", "--data", vicuna_like, "--seeds", 1, "--max-new-tokens", 4,
                 "--greedy", "--json", "--device", "cpu")
    assert "note:" not in res.stderr


def test_greedy_with_a_teacher_and_a_teacher_no_metric_uses(tiny_dir, dolly_like, tmp_path):
    res = invoke("--model", tiny_dir / "student", "--teacher", tiny_dir / "teacher", "--data", dolly_like, "--seeds", 1,
                 "--limit", 3, "--max-new-tokens", 4, "--greedy", "--json", "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["metrics"]) == ["rougeL", "reverse-kl", "forward-kl"]
    # a teacher no metric needs is not loaded (a missing folder would otherwise be an error)
    res = invoke("--model", tiny_dir / "student", "--teacher", tmp_path / "absent", "--metric", "rougeL",
                 "--data", dolly_like, "--seeds", 1, "--limit", 2, "--max-new-tokens", 4, "--device", "cpu")
    assert res.exit_code == 0 and "is unused by rougeL" in res.stderr, res.output


def test_an_out_that_cannot_be_written_is_refused_before_generating(tiny_dir, dolly_like, tmp_path):
    (tmp_path / "f").write_text("x")
    res = invoke("--model", tiny_dir / "student", "--data", dolly_like, "--out", tmp_path / "f" / "r.json",
                 "--seeds", 1, "--limit", 2, "--max-new-tokens", 4, "--device", "cpu")
    one_error_line(res, "--out", "cannot create its folder")
    if os.path.isdir("/proc/self"):  # a folder that exists and takes no files (whoever runs the test)
        res = invoke("--model", tiny_dir / "student", "--data", dolly_like, "--out", tmp_path / "r.json",
                     "--predictions", "/proc/p.jsonl", "--seeds", 1, "--limit", 2, "--max-new-tokens", 4)
        one_error_line(res, "--predictions", "cannot write in its folder")
        assert not (tmp_path / "r.json").exists()


def test_references_rouge_cannot_read_are_noted(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "ja.jsonl", [{"instruction": f"Say hello {i}", "response": r}
                                               for i, r in enumerate(["こんにちは", "Привет мир", "hello 1"])])
    res = invoke("--model", tiny_dir / "student", "--data", data, "--seeds", 1, "--max-new-tokens", 4, "--json",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: 2 of 3 examples have references without a word ROUGE-L can score" in res.stderr


def test_bad_input_is_one_line_and_exit_2(tiny_dir, dolly_like, vicuna_like, tmp_path):
    base = ["--model", tiny_dir / "student", "--max-new-tokens", 4, "--seeds", 1, "--limit", 2, "--device", "cpu"]
    one_error_line(invoke(*base, "--data", vicuna_like, "--metric", "rougeL"), "no reference answers")
    one_error_line(invoke(*base, "--data", dolly_like, "--metric", "bleu"), "unknown metric 'bleu'")
    one_error_line(invoke(*base, "--data", dolly_like, "--metric", "reverse-kl"), "needs --teacher")
    one_error_line(invoke(*base, "--data", tmp_path / "none.jsonl"), "no such file")
    one_error_line(invoke(*base, "--data", dolly_like, "--model", "nobody/nothing"), "nobody/nothing")
    one_error_line(invoke(*base, "--data", dolly_like, "--out", tmp_path), "is a folder")
    one_error_line(invoke(*base, "--data", dolly_like, "--max-prompt-length", 2), "longer than --max-prompt-length")
    # bad bytes, partly missing references and a non-finite temperature: file and line, exit 2
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d\xff"}\n')
    one_error_line(invoke(*base, "--data", bad), f"{bad}:2: not UTF-8 text", "column 36")
    part = write_jsonl(tmp_path / "part.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    one_error_line(invoke(*base, "--data", part, "--metric", "rougeL"), "1 of 2 examples", f"{part}:2")
    one_error_line(invoke(*base, "--data", dolly_like, "--temperature", "inf"), "--temperature must be a finite")


def test_paths_are_not_rich_markup(tiny_dir, dolly_like, tmp_path):
    odd = tmp_path / "[/old]" / "[v2]"
    odd.mkdir(parents=True)
    data = odd / "d.jsonl"
    data.write_bytes(Path(dolly_like).read_bytes())
    res = invoke("--model", tiny_dir / "student", "--data", data, "--seeds", 1, "--limit", 2, "--max-new-tokens", 4,
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert f"on {data}: 2 examples" in res.stderr


def test_a_sampler_fallback_is_one_warning_line_also_under_quiet(tiny_dir, dolly_like, tmp_path, monkeypatch):
    """The run's own fallbacks (here: the static sampler cannot serve this model) are one
    `warning:` line on stderr, under --quiet too, not Python's two lines naming a library frame."""
    from minillm_cli.engine import static_check, static_model

    monkeypatch.setattr(static_model, "SUPPORTED_ATTN", ())
    monkeypatch.setattr(static_check, "_CHECKED", type(static_check._CHECKED)())
    res = invoke("--model", tiny_dir / "student", "--data", dolly_like, "--metric", "dist4", "--seeds", 1,
                 "--limit", 2, "--max-new-tokens", 4, "--sampler", "static", "--out", tmp_path / "e.json",
                 "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if "fast sampler unavailable" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: fast sampler unavailable ("), res.stderr
    assert "Warning" not in res.stderr and ".py:" not in res.stderr, res.stderr
