"""Result files, run folders, the compare table and its renderers, the --fail-if parser, the plot."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from minillm_cli.errors import InputError
from minillm_cli.eval import compare as C
from minillm_cli.eval import results as R
from minillm_cli.eval.metrics import aggregate


def _result(rouge, dist=98.0, rkl=None, **kw):
    metrics = {"rougeL": aggregate(rouge), "dist4": aggregate([dist])}
    if rkl is not None:
        metrics["reverse-kl"] = aggregate([rkl])
    return R.make_result(model="m", data="d", n=4, protocol={"seeds": list(range(len(rouge)))},
                         metrics=metrics, **kw)


def _entry(name, **metrics):
    return C.Entry(name=name, source=C.Path(f"/x/{name}.json"), kind="result",
                   metrics={k: aggregate(v if isinstance(v, list) else [v]) for k, v in metrics.items()})


# ---------------------------------------------------------------------------- result files
def test_result_round_trip_and_non_finite_become_null(tmp_path):
    res = _result([20.0, 22.0])
    res["protocol"]["temperature"] = math.nan
    R.write_result(tmp_path / "a.json", res)
    back = R.load_result(tmp_path / "a.json")
    assert back["metrics"]["rougeL"] == {"mean": 21.0, "std": pytest.approx(math.sqrt(2)), "per_seed": [20.0, 22.0]}
    assert back["kind"] == "minillm-evaluate" and back["version"] == 1
    assert back["protocol"]["temperature"] is None and "created" in back and "python" in back["versions"]
    assert not list(tmp_path.glob(".a.json.*"))  # the temporary file of the atomic write is gone


@pytest.mark.parametrize("content, match", [
    ("not json at all", "is not a minillm evaluate result"),
    ('{"loss": 1.0}', "no 'metrics' object"),
    ("[1, 2]", "no 'metrics' object"),
    ('{"kind": "something-else", "metrics": {}}', "'something-else' file"),
    ('{"metrics": {"rougeL": {"mean": "high"}}}', "no numeric 'mean'"),
])
def test_load_result_refuses_other_files(tmp_path, content, match):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        R.load_result(p)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no such file"):
        R.load_result(tmp_path / "missing.json")


def test_predictions_file_next_to_or_named_by_result(tmp_path):
    rows = [{"prompt": "p", "prediction": "x", "references": ["y"], "seed": 1}]
    R.write_predictions(tmp_path / "a.jsonl", rows)
    assert R.read_predictions(tmp_path / "a.jsonl") == rows
    assert R.predictions_path(tmp_path / "a.json", {}) == tmp_path / "a.jsonl"
    R.write_predictions(tmp_path / "other.jsonl", rows)
    assert R.predictions_path(tmp_path / "a.json", {"predictions": "other.jsonl"}) == tmp_path / "other.jsonl"
    assert R.predictions_path(tmp_path / "b.json", {}) is None
    with pytest.raises(ValueError):
        R.write_predictions(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "prediction": "x"}\n{oops\n')
    with pytest.raises(InputError, match=r"broken.jsonl:2"):
        R.read_predictions(tmp_path / "broken.jsonl")


def test_load_run_folder(tmp_path):
    run = tmp_path / "distill-a"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"student": "gpt2", "data": "dolly"}))
    rows = [{"step": 0, "loss": 3.0, "reverse_kl": 1.0, "lr": 1e-5},
            {"step": 10, "loss": 2.0, "reverse_kl": 0.4, "valid_loss": 2.5},
            {"step": 20, "loss": 2.5, "reverse_kl": 0.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "lo')
    s = R.load_run(run)
    assert s.name == "distill-a" and len(s.curve) == 3  # the killed run's half line is skipped
    assert s.final == {"loss": 2.5, "reverse_kl": 0.6, "valid_loss": 2.5}  # "lr" is not a metric
    assert s.best == {"loss": 2.0, "reverse_kl": 0.4, "valid_loss": 2.5}
    assert s.results == []
    R.write_result(run / "eval.json", _result([20.0]))
    entries = C.load_entries([run])
    assert [e.name for e in entries] == ["distill-a"] and entries[0].kind == "run"
    assert entries[0].metrics["train.reverse_kl"]["mean"] == 0.6 and "rougeL" in entries[0].metrics
    (run / "metrics.jsonl").write_text('{"step": 0}\n{bad\n{"step": 2}\n')
    with pytest.raises(InputError, match="metrics.jsonl:2"):
        R.load_run(run)
    with pytest.raises(InputError, match="not a run folder"):
        C.load_entries([tmp_path / "distill-a" / ".."])


def test_a_run_folder_that_kept_an_earlier_step_reports_that_steps_figures(tmp_path):
    run = tmp_path / "sft-best"
    run.mkdir()
    rows = [{"step": 1, "loss": 3.0, "valid_rougeL": 10.0}, {"step": 2, "loss": 2.0, "valid_rougeL": 30.0},
            {"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0, "valid_rougeL": 20.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert R.load_run(run).final == {"loss": 1.0, "valid_rougeL": 20.0}  # no summary: the last values
    (run / "summary.json").write_text(json.dumps({"saved": "best", "select_by": "rougeL", "best_step": 2}))
    s = R.load_run(run)
    assert s.kept_step == 2 and s.final == {"loss": 2.0, "valid_rougeL": 30.0}  # the weights the folder holds
    assert s.best == {"loss": 1.0, "valid_rougeL": 30.0} and len(s.curve) == 4  # the curve stays whole
    metrics = C.load_entries([run])[0].metrics
    assert metrics["train.loss"]["mean"] == 2.0 and metrics["train.kept_step"]["mean"] == 2
    (run / "summary.json").write_text(json.dumps({"saved": "final", "select_by": "last", "best_step": None}))
    assert R.load_run(run).final == {"loss": 1.0, "valid_rougeL": 20.0}


def test_entry_names_are_unique_and_overridable(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        R.write_result(tmp_path / d / "result.json", _result([1.0]))
    entries = C.load_entries([tmp_path / "a" / "result.json", tmp_path / "b" / "result.json"])
    assert [e.name for e in entries] == ["a/result", "b/result"]
    entries = C.load_entries([tmp_path / "a" / "result.json"] * 2, names=["x", "y"])
    assert [e.name for e in entries] == ["x", "y"]
    with pytest.raises(InputError, match="--names gives 1 names for 2"):
        C.load_entries([tmp_path / "a" / "result.json"] * 2, names=["x"])


# ---------------------------------------------------------------------------- table
def test_best_respects_direction_and_baseline_deltas():
    es = [_entry("sft", rougeL=[20.0, 22.0], **{"reverse-kl": 0.9}),
          _entry("minillm", rougeL=[24.0, 25.0], **{"reverse-kl": 0.5}),
          _entry("kd", rougeL=[18.0, 19.0])]
    comp = C.comparison(es, baseline="sft")
    assert comp["metrics"]["rougeL"]["best"] == ["minillm"]
    assert comp["metrics"]["reverse-kl"]["best"] == ["minillm"]  # lower is better
    assert comp["metrics"]["rougeL"]["values"]["kd"]["delta"] == pytest.approx(18.5 - 21.0)
    assert "delta" not in comp["metrics"]["rougeL"]["values"]["sft"]
    assert "reverse-kl" not in {m for m, r in comp["metrics"].items() if "kd" in r["values"]}
    assert C.comparison(es, baseline="/x/sft.json")["baseline"] == "sft"  # by path too
    with pytest.raises(InputError, match="--baseline 'nope'"):
        C.comparison(es, baseline="nope")
    # one value only: no "best" to mark
    assert C.comparison(es[:1])["metrics"]["rougeL"]["best"] == []


def test_renderers_parse():
    es = [_entry("a", rougeL=[20.0, 22.0], dist4=99.0), _entry("b", rougeL=[25.0, 26.0])]
    comp = C.comparison(es, baseline="a")
    assert json.loads(C.render_json(comp))["metrics"]["rougeL"]["best"] == ["b"]
    rows = list(csv.DictReader(io.StringIO(C.render_csv(comp))))
    got = {(r["metric"], r["run"]): r for r in rows}
    assert float(got[("rougeL", "b")]["mean"]) == 25.5 and got[("rougeL", "b")]["best"] == "1"
    assert float(got[("rougeL", "b")]["delta"]) == pytest.approx(4.5) and got[("dist4", "a")]["delta"] == ""
    md = C.render_markdown(comp).splitlines()
    assert md[0] == "| metric | a | b |"
    assert md[2] == "| rougeL ↑ | 21.00 ± 1.41 | **25.50 ± 0.71 (+4.50)** |"
    from rich.console import Console

    con = Console(file=io.StringIO(), width=200)
    con.print(C.rich_table(comp))
    assert "25.50 ± 0.71 (+4.50) *" in con.file.getvalue()


@pytest.mark.parametrize("values, dec", [([23.2, 0.5], 2), ([0.81, 0.5], 3), ([0.012], 4),
                                         ([150.0], 1), ([0.0], 2)])
def test_row_decimals(values, dec):
    assert C.decimals_for(values) == dec


# ---------------------------------------------------------------------------- --fail-if
def test_parse_gate_precedence_and_forms():
    t = C.parse_gate("rougeL < 20 or dist4 < 90 and reverse-kl >= 1.5")
    assert t == ("or", [C.Cmp("rougeL", "mean", "<", 20.0),
                        ("and", [C.Cmp("dist4", "mean", "<", 90.0), C.Cmp("reverse-kl", "mean", ">=", 1.5)])])
    assert C.parse_gate("(rougeL<20 OR dist4<90) and rougeL.std > 2")[1][1] == C.Cmp("rougeL", "std", ">", 2.0)
    assert C.parse_gate("20 > rougeL") == C.Cmp("rougeL", "mean", "<", 20.0)  # number first: flipped
    assert C.parse_gate("train.valid_loss != -1e-3") == C.Cmp("train.valid_loss", "mean", "!=", -0.001)


@pytest.mark.parametrize("expr", ["", "rougeL", "rougeL <", "rougeL < x", "< 20", "rougeL = 20",
                                  "rougeL < 20 and", "(rougeL < 20", "rougeL < 20)", "rougeL < 20 dist4 < 3",
                                  "__import__('os') < 1", "rougeL < 20; rm"])
def test_parse_gate_refuses_malformed(expr):
    with pytest.raises(InputError) as e:
        C.parse_gate(expr)
    assert "--fail-if" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("expr, tripped", [
    ("rougeL < 20", []),
    ("rougeL < 21", ["a"]),        # a = 20.5
    ("rougeL <= 20.5", ["a"]),     # boundary: equal meets <=
    ("rougeL < 20.5", []),         # ... but not <
    ("rougeL > 25", ["b"]),
    ("rougeL >= 0", ["a", "b"]),
    ("rougeL == 30", ["b"]),
    ("rougeL != 30", ["a"]),
    ("rouge-l < 21", ["a"]),       # alias of the stored name
    ("rougeL > 1000", []),
    ("rougeL < 21 and dist4 < 50", []),
    ("rougeL < 21 or dist4 < 50", ["a"]),
    ("reverse-kl > 0", ["b"]),     # a lacks the metric: it never meets the condition
    ("rougeL.std > 1", ["a"]),     # a's seeds spread 19.5/21.5
])
def test_gate_trips_exactly_when_condition_holds(expr, tripped):
    es = [_entry("a", rougeL=[19.5, 21.5], dist4=95.0), _entry("b", rougeL=30.0, dist4=97.0, **{"reverse-kl": 0.3})]
    lines = C.check_gate(C.resolve_gate(C.parse_gate(expr), es), es)
    assert [ln.split(":")[0] for ln in lines] == tripped


def test_gate_names_unknown_metric():
    es = [_entry("a", rougeL=1.0)]
    with pytest.raises(InputError, match="no compared result has metric 'bleu'.*rougeL"):
        C.resolve_gate(C.parse_gate("bleu < 3"), es)
    es[0].metrics["train.valid_loss"] = aggregate([2.0])
    assert C.check_gate(C.resolve_gate(C.parse_gate("valid_loss > 1"), es), es) == ["a: train.valid_loss = 2 > 1"]


# ---------------------------------------------------------------------------- plot
def test_plot_writes_png(tmp_path):
    from minillm_cli.eval.plot import plot_comparison

    es = [_entry("sft", rougeL=[20.0, 22.0]), _entry("minillm", rougeL=[24.0, 25.0])]
    es[1].curve = [{"step": s, "reverse_kl": 1.0 / (1 + s), "loss": 2.0} for s in range(5)]
    out = plot_comparison(es, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(InputError, match="nothing to draw"):
        plot_comparison([C.Entry("x", C.Path("x"), "run", {})], tmp_path / "d.png")
    with pytest.raises(InputError, match=".png"):
        plot_comparison(es, tmp_path / "c.txt")


def test_odd_names_and_nan_values_render(tmp_path):
    from rich.console import Console

    es = [_entry("run[1]", rougeL=20.0), _entry("b", rougeL=21.0)]
    es[1].metrics["rougeL"]["std"] = math.nan  # a hand-made file may hold NaN
    comp = C.comparison(es)
    con = Console(file=io.StringIO(), width=200)
    con.print(C.rich_table(comp))
    assert "run[1]" in con.file.getvalue()  # not swallowed as rich markup
    assert json.loads(C.render_json(comp))["metrics"]["rougeL"]["values"]["b"]["std"] is None
