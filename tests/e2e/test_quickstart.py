"""`minillm quickstart --fast --ablation`: the whole pipeline offline through the real engine functions."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from minillm_cli.cli.app import app


def test_quickstart_fast_with_ablation(tmp_path):
    out = tmp_path / "qs"
    res = CliRunner().invoke(app, ["quickstart", "--fast", "--ablation", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for name in ("teacher", "sft", "kd", "seqkd", "rkl", "minillm"):
        assert name in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings"]) >= {"sft_teacher", "distill_minillm", "evaluate", "ablation"}
    for png in ("comparison.png", "ablation.png"):
        assert (out / png).stat().st_size > 10_000
    for name in ("teacher", "sft", "kd", "seqkd", "rkl", "minillm"):
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
