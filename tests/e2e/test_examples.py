"""examples/gpt2-dolly.sh: its full-scale commands carry the paper's hyperparameters one for one,
and the very same script runs end to end at tiny scale, offline."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "gpt2-dolly.sh"


def _commands(env_extra: dict, tmp_path: Path) -> list[str]:
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "runs"), **env_extra)
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, check=True)
    return [l[2:] for l in out.stderr.splitlines() if l.startswith("+ ")]


def _flag(cmd: str, name: str) -> str:
    m = re.search(rf"(?:^| ){re.escape(name)} (\S+)", cmd)
    assert m, (name, cmd)
    return m.group(1)


def test_full_scale_commands_match_the_paper(tmp_path):
    cmds = _commands({}, tmp_path)
    sft_teacher, sft_student = [c for c in cmds if " sft " in c]
    assert _flag(sft_teacher, "--model") == "gpt2-xl" and _flag(sft_teacher, "--lr") == "5e-5"
    assert _flag(sft_teacher, "--epochs") == "10" and _flag(sft_teacher, "--data") == "dolly"
    assert _flag(sft_student, "--model") == "gpt2" and _flag(sft_student, "--lr") == "5e-4"
    pt = next(c for c in cmds if " pretrain-mix " in c)
    assert _flag(pt, "--source") == "openwebtext" and _flag(pt, "--seq-len") == "512"
    mini = next(c for c in cmds if "--method minillm" in c)
    paper = {"--lr": "5e-6", "--warmup-steps": "100", "--schedule": "constant", "--steps": "5000",
             "--ppo-epochs": "4", "--num-rollouts": "256", "--teacher-mix-alpha": "0.2", "--clip-ratio": "0.2",
             "--max-length": "512", "--max-prompt-length": "256", "--top-k": "0", "--top-p": "1.0",
             "--temperature": "1.0", "--pt-coef": "1.0", "--adam-betas": "0.9,0.95", "--weight-decay": "1e-6"}
    for flag, value in paper.items():
        assert _flag(mini, flag) == value, flag
    assert "--pt-data" in mini and "--no-single-step" not in mini and "--no-length-norm" not in mini
    kd = next(c for c in cmds if "--method kd" in c)
    assert _flag(kd, "--kd-ratio") == "0.5"
    assert any("--method seqkd" in c for c in cmds) and any("--method rkl" in c for c in cmds)
    trained = [c for c in cmds if " sft " in c or " distill " in c]
    assert len(trained) == 6  # each picked as the reference picks it, by validation ROUGE-L
    assert all(_flag(c, "--select-by") == "rougeL" and "--eval-every" in c for c in trained)
    evals = [c for c in cmds if " evaluate " in c]
    assert len(evals) == 6 * 5
    assert {_flag(c, "--data") for c in evals} == {"dolly", "self-inst", "vicuna", "sni", "unni"}
    for c in evals:
        assert _flag(c, "--seeds") == "5" and _flag(c, "--no-repeat-ngram-size") == "6"
        assert _flag(c, "--metric") == "rougeL" and _flag(c, "--max-prompt-length") == "256"


def test_tiny_scale_runs_end_to_end(tmp_path):
    env = dict(os.environ, TINY="1", OUT=str(tmp_path / "runs"), PYTHON=sys.executable,
               MINILLM=f"{sys.executable} -m minillm_cli", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs"
    for name in ("teacher-sft", "student-sft", "minillm", "kd", "seqkd", "rkl"):
        assert (runs / name / "config.json").is_file(), name
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["select_by"] == "rougeL" and summary["saved"] == "best", name
    assert len(list((runs / "eval").glob("*.json"))) == 30
    assert out.stdout.count("| ") > 10  # the markdown comparison tables
