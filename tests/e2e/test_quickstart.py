"""`minillm quickstart --fast --ablation`: the whole pipeline offline through the real engine functions."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from minillm_cli.cli.app import app


def test_quickstart_fast_with_ablation(tmp_path):
    out = tmp_path / "qs"
    res = CliRunner().invoke(app, ["quickstart", "--fast", "--ablation", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for name in ("teacher", "start", "sft", "kd", "seqkd", "rkl", "minillm"):
        assert name in res.stdout
    assert "MiniLLM came out ahead" in res.stdout or "MiniLLM did NOT come out ahead" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings"]) >= {"sft_teacher", "sft_equal_budget", "distill_minillm", "evaluate", "ablation"}
    assert "| no-single-step |" in (out / "ablation.md").read_text()
    for png in ("comparison.png", "ablation.png"):
        assert (out / png).stat().st_size > 10_000
    for name in ("teacher", "start", "sft", "kd", "seqkd", "rkl", "minillm"):
        result = json.loads((out / "compare" / f"{name}.json").read_text())
        assert {"validity", "rougeL", "dist4"} <= set(result["metrics"])
        if name != "teacher":
            assert "reverse-kl" in result["metrics"]
    # the teacher is trained to be far better than chance on the exact checker
    teacher = json.loads((out / "compare" / "teacher.json").read_text())
    assert teacher["metrics"]["validity"]["mean"] > 40
    # each ablation switched its optimisation off
    for name, key, value in (("no-single-step", "single_step", False), ("no-teacher-mix", "teacher_mix_alpha", 0.0),
                             ("no-length-norm", "length_norm", False), ("no-pt-loss", "pt_data", None)):
        cfg = json.loads((out / "runs" / f"minillm-{name}" / "run_config.json").read_text())["config"]
        assert cfg[key] == value, name
    again = CliRunner().invoke(app, ["quickstart", "--fast", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_verdict_is_computed_from_the_numbers():
    from minillm_cli.toy.quickstart import verdict

    def res(mean, std=0.5):
        return {"metrics": {"validity": {"mean": mean, "std": std, "per_seed": [mean]}}}

    ahead = verdict({"teacher": res(90), "start": res(30), "sft": res(40), "kd": res(44), "seqkd": res(43),
                     "rkl": res(50), "minillm": res(46)})
    assert ahead.startswith("MiniLLM came out ahead") and "rkl (50.0) is above MiniLLM" in ahead
    assert "kd 44.0 (+2.0)" in ahead
    behind = verdict({"teacher": res(90), "start": res(30), "sft": res(40), "kd": res(47), "seqkd": res(43),
                      "rkl": res(41), "minillm": res(46.5)})
    assert behind.startswith("MiniLLM did NOT come out ahead") and "kd 47.0 (-0.5, within the seeds' spread)" in behind


def test_bare_quickstart_runs_instead_of_printing_help():
    """The README's main command is plain `minillm quickstart`: no required option, no help screen."""
    import typer

    cmds = typer.main.get_command(app).commands
    assert cmds["quickstart"].no_args_is_help is False
    assert cmds["sft"].no_args_is_help is True
