"""`minillm compare` as users run it: formats, gates, baselines, plots, run folders, bad input."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minillm_cli.cli.app import app
from minillm_cli.eval.metrics import aggregate
from minillm_cli.eval.results import make_result, write_result


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name, rouge, rkl in (("sft", [23.0, 23.4], 0.9), ("minillm", [24.4, 24.8], 0.5)):
        p = tmp_path / f"{name}.json"
        write_result(p, make_result(model=name, data="dolly", n=16, protocol={"seeds": [1, 2]},
                                    metrics={"rougeL": aggregate(rouge), "reverse-kl": aggregate([rkl, rkl])}))
        out[name] = p
    run = tmp_path / "run-kd"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"method": "kd", "student": "gpt2"}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 - s / 10, "reverse_kl": 1.0 / (s + 1)}) + "\n" for s in range(6)))
    out["run"] = run
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    out["other"] = other
    return out


def invoke(*args):
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def one_error_line(res, code=2, *needles):
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_every_format_parses(files):
    res = invoke(files["sft"], files["minillm"], files["run"], "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["name"] for r in data["runs"]] == ["sft", "minillm", "run-kd"]
    assert data["metrics"]["rougeL"]["best"] == ["minillm"]
    assert data["metrics"]["train.reverse_kl"]["values"]["run-kd"]["mean"] == pytest.approx(1 / 6)

    rows = list(csv.DictReader(io.StringIO(invoke(files["sft"], files["minillm"], "-f", "csv").stdout)))
    assert {(r["metric"], r["run"]) for r in rows} == {("rougeL", "sft"), ("rougeL", "minillm"),
                                                        ("reverse-kl", "sft"), ("reverse-kl", "minillm")}
    md = invoke(files["sft"], files["minillm"], "--format", "markdown").stdout.splitlines()
    assert md[0] == "| metric | sft | minillm |" and md[1] == "|---|---:|---:|"
    assert "**24.60 ± 0.28**" in md[2]
    table = invoke(files["sft"], files["minillm"], "--names", "SFT,MiniLLM").stdout
    assert "SFT" in table and "MiniLLM" in table and "24.60 ± 0.28 *" in table


def test_results_on_different_data_are_noted(files, tmp_path):
    p = tmp_path / "selfinst.json"
    write_result(p, make_result(model="x", data="self-inst", n=8, protocol={"seeds": [1]},
                                metrics={"rougeL": aggregate([10.0])}))
    res = invoke(files["sft"], p)
    assert res.exit_code == 0 and "note: these results are on 2 different data sets (dolly, self-inst)" in res.stderr
    assert "note:" not in invoke(files["sft"], files["minillm"]).stderr


def test_results_evaluated_under_other_settings_are_noted(tmp_path):
    """A "best" between results of another split, answer length or decoding compares nothing:
    compare says so (the seeds drawn are not a setting: other seeds are the same protocol)."""
    def result(name, seeds, **settings):
        protocol = {"split": "test", "test_size": 100, "max_new_tokens": 256, "decoding": "sampling",
                    "seeds": seeds, **settings}
        write_result(tmp_path / f"{name}.json", make_result(model=name, data="dolly", n=8, protocol=protocol,
                                                            metrics={"rougeL": aggregate([20.0])}))
        return tmp_path / f"{name}.json"

    sft, kd = result("sft", [0, 1]), result("kd", [5, 6, 7])
    res = invoke(sft, kd, "--fail-if", "rougeL < 0")
    assert res.exit_code == 0 and res.stderr == ""
    short = result("short", [0, 1], max_new_tokens=64, split="all")
    res = invoke(sft, kd, short, "-f", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)["runs"]
    assert ("note: these results were not evaluated alike: split test (sft, kd) vs all (short); "
            "max_new_tokens 256 (sft, kd) vs 64 (short)") in res.stderr
    assert "note:" not in invoke(sft, short, "-q").stderr


def test_baseline_by_name_or_path(files):
    by_name = json.loads(invoke(files["sft"], files["minillm"], "--baseline", "sft", "-f", "json").stdout)
    by_path = json.loads(invoke(files["sft"], files["minillm"], "--baseline", files["sft"], "-f", "json").stdout)
    assert by_name["metrics"] == by_path["metrics"]
    assert by_name["metrics"]["rougeL"]["values"]["minillm"]["delta"] == pytest.approx(1.4)
    assert by_name["metrics"]["reverse-kl"]["values"]["minillm"]["delta"] == pytest.approx(-0.4)
    one_error_line(invoke(files["sft"], "--baseline", "teacher"), 2, "--baseline 'teacher'", "sft")


@pytest.mark.parametrize("expr, code, who", [
    ("rougeL > 1000", 0, []),
    ("rougeL >= 0", 1, ["sft", "minillm"]),
    ("rougeL < 24", 1, ["sft"]),
    ("rougeL < 23.2", 0, []),            # sft's mean is exactly 23.2
    ("rougeL <= 23.2", 1, ["sft"]),
    ("reverse-kl > 0.6 and rougeL < 20", 0, []),
    ("reverse-kl > 0.6 or rougeL < 20", 1, ["sft"]),
    ("rougeL.std > 0.1", 1, ["sft", "minillm"]),
])
def test_fail_if_exits_exactly_when_condition_holds(files, expr, code, who):
    res = invoke(files["sft"], files["minillm"], "--fail-if", expr)
    assert res.exit_code == code, res.output
    named = [ln.strip().split(":")[0] for ln in res.stderr.splitlines()[1:]]
    assert named == who
    if code == 0:
        assert res.stderr == ""
    # the table is printed either way, and --format json stays pure JSON with the verdict inside
    res = invoke(files["sft"], files["minillm"], "--fail-if", expr, "-f", "json")
    assert res.exit_code == code
    assert [t.split(":")[0] for t in json.loads(res.stdout)["fail_if"]["tripped"]] == who


def test_a_tripped_gate_names_only_what_met_it(files):
    # sft: rougeL 23.2 < 24 meets it; its reverse-kl 0.9 > 0.6 is true too, but its 'and' is not met
    res = invoke(files["sft"], files["minillm"], "--fail-if", "rougeL < 24 or reverse-kl > 0.6 and rougeL > 30")
    assert res.exit_code == 1
    assert res.stderr.splitlines()[1:] == ["  sft: rougeL = 23.2 < 24"]
    res = invoke(files["sft"], files["minillm"], "--fail-if", "(rougeL < 24 or rougeL > 99) and reverse-kl > 0.6")
    assert res.stderr.splitlines()[1:] == ["  sft: rougeL = 23.2 < 24, reverse-kl = 0.9 > 0.6"]


@pytest.mark.parametrize("args, needles", [
    (["{other}"], ["config.json", "is not a minillm evaluate result", "no 'metrics' object"]),
    (["{sft}", "{missing}"], ["missing.json", "no such file"]),
    (["{sft}", "--fail-if", "rougeL <"], ["--fail-if", "expected a number"]),
    (["{sft}", "--fail-if", "rougeL < 20 &&"], ["--fail-if", "cannot read"]),
    (["{sft}", "--fail-if", "bleu < 20"], ["no compared result has metric 'bleu'"]),
    (["{sft}", "--format", "yaml"], ["--format 'yaml'"]),
    (["{sft}", "{minillm}", "--names", "a"], ["--names gives 1 names for 2"]),
    (["{sft}", "--plot", "{dir}/p.jpeg"], ["--plot", ".png"]),
    (["{dir}"], ["not a run folder"]),
    (["{sft}", "--judge-url", "http://127.0.0.1:9"], ["--judge-model"]),
    (["{sft}", "{minillm}", "--names", "x,x"], ["--names: x given more than once"]),
    (["{sft}", "--plot", "/proc/cmp.png"], ["--plot /proc/cmp.png: cannot write"]),  # before the table
])
def test_bad_input_is_one_line_exit_2(files, args, needles):
    fmt = {"other": files["other"], "sft": files["sft"], "minillm": files["minillm"],
           "missing": files["sft"].parent / "missing.json", "dir": files["sft"].parent}
    one_error_line(invoke(*[a.format(**fmt) for a in args]), 2, *needles)


def test_plot_from_results_and_run_folder(files, tmp_path):
    out = tmp_path / "plots" / "cmp.png"
    res = invoke(files["sft"], files["minillm"], files["run"], "--plot", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "plot written" in res.stderr


def test_real_process_json_stdout_and_fast_help(files):
    """Through a real process: stdout is JSON only, a gate's exit code is 1, --help is quick."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "minillm_cli", "compare", str(files["sft"]), str(files["minillm"])]
    p = subprocess.run(cmd + ["--format", "json", "--fail-if", "rougeL >= 0"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["fail_if"]["tripped"]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "minillm_cli", "compare", "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0 and "--fail-if" in p.stdout and "--judge-url" in p.stdout
    assert time.perf_counter() - t0 < 5  # generous for a loaded CI box; torch is never imported
    p = subprocess.run([sys.executable, "-c", "import sys, minillm_cli.cli.compare, minillm_cli.eval.compare, "
                        "minillm_cli.eval.results; print('torch' in sys.modules, 'matplotlib' in sys.modules)"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.split() == ["False", "False"]


def test_names_baselines_and_gates_mean_one_thing(files, tmp_path, monkeypatch):
    # a run folder's result can be the baseline by the file's own path, not only the folder's
    run = tmp_path / "run-eval"
    shutil.copytree(files["run"], run)
    shutil.copy(files["sft"], run / "eval.json")
    res = invoke(files["minillm"], run, "--baseline", run / "eval.json", "-f", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["baseline"] == "run-eval"
    # '.' is named after the folder it is; a symlink keeps its own name
    monkeypatch.chdir(run)
    assert [r["name"] for r in json.loads(invoke(".", "-f", "json").stdout)["runs"]] == ["run-eval"]
    (tmp_path / "latest").symlink_to(run)
    assert [r["name"] for r in json.loads(invoke(tmp_path / "latest", "-f", "json").stdout)["runs"]] == ["latest"]
    # a name with '|' stays one markdown column
    md = invoke(files["sft"], files["minillm"], "--names", "a|b,c", "-f", "markdown").stdout.splitlines()
    assert md[0] == "| metric | a\\|b | c |"
    # 'loss' is an evaluate metric (lm-loss) and a training one (train.loss): refused, not guessed
    lm = tmp_path / "lm.json"
    write_result(lm, make_result(model="m", data="dolly", n=4, protocol={"seeds": [1]},
                                 metrics={"lm-loss": aggregate([5.9613])}))
    one_error_line(invoke(lm, files["run"], "--fail-if", "loss > 5"), 2, "'loss' could mean lm-loss or train.loss")
    res = invoke(lm, files["run"], "--fail-if", "lm-loss > 5.96")
    assert res.exit_code == 1 and "lm: lm-loss = 5.961 > 5.96" in res.stderr  # not '5.96 > 5.96'


@pytest.mark.parametrize("change, needle", [
    (lambda r: r["metrics"]["rougeL"].update(per_seed="abc"), "'per_seed' that is not a list of numbers"),
    (lambda r: r.update(version=2), "written by a newer minillm (result format version 2; this one reads up to 1)"),
    (lambda r: r.update(version="1"), "'version' '1' is not a result format version"),
])
def test_hand_made_results_are_checked(files, tmp_path, change, needle):
    result = json.loads(files["sft"].read_text())
    change(result)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(result))
    one_error_line(invoke(bad), 2, needle)
    run = tmp_path / "run-bad"
    shutil.copytree(files["run"], run)
    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": []}))
    one_error_line(invoke(run), 2, "'config' is not a JSON object")
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "note": "\xff"}\n')
    one_error_line(invoke(run), 2, "metrics.jsonl:2: not UTF-8 text")


def test_a_reader_that_goes_away_changes_no_exit_code(files):
    """`compare ... | true` (the reader gone before the table is written) and a closed stdout: the
    gate's exit code and its lines on stderr stay; no 'BrokenPipeError'."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = f"'{sys.executable}' -m minillm_cli compare '{files['sft']}' '{files['minillm']}'"
    for fmt in ("table", "csv", "json"):
        for gate, code in (("rougeL >= 0", 1), ("rougeL > 1000", 0)):
            for to in ("| true; exit ${PIPESTATUS[0]}", ">&-"):
                p = subprocess.run(["bash", "-c", f"{base} -f {fmt} --fail-if '{gate}' {to}"],
                                   capture_output=True, text=True, env=env, timeout=60)
                assert p.returncode == code, (fmt, gate, to, p.stderr)
                assert "error" not in p.stderr and "Broken" not in p.stderr, p.stderr
                assert ("met by 2 of 2" in p.stderr) == (code == 1), p.stderr
