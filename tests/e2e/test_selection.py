"""--select-by: which weights a run leaves in --out (engine/selection.py), through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from minillm_cli.cli.app import app
from minillm_cli.engine.selection import Best, ValidationRouge, canonical_select
from minillm_cli.errors import InputError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_weights(out) -> dict:
    from transformers import AutoModelForCausalLM

    return weights(AutoModelForCausalLM.from_pretrained(str(out)))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scripted_scores(monkeypatch, values: list) -> dict:
    """Validation ROUGE-L returns `values` in turn; the dict returned maps each value to the
    weights the model had when it was scored."""
    scores, seen = iter(values), {}

    def scripted(self, model, rt, **kw):
        value = next(scores)
        seen[value] = weights(model)
        return value

    monkeypatch.setattr(ValidationRouge, "score", scripted)
    return seen


# -- the record ---------------------------------------------------------------------------------
def test_best_follows_the_metric_direction_and_keeps_the_earlier_of_a_tie():
    up, down, last = Best("rougeL"), Best("loss"), Best("last")
    for value, step in ((3.0, 1), (5.0, 2), (5.0, 3), (4.0, 4)):
        if up.improves(value):
            up.record(value, step)
        if down.improves(value):
            down.record(value, step)
        assert not last.improves(value)
    assert (up.value, up.step) == (5.0, 2) and (down.value, down.step) == (3.0, 1)
    assert not up.improves(float("nan")) and not up.improves(None)
    assert up.summary() == {"saved": "best", "select_by": "rougeL", "best_step": 2, "best_valid_rougeL": 5.0}
    assert last.summary() == {"saved": "final", "select_by": "last", "best_step": None}
    # a checkpoint's record comes back; one from before --select-by reads as selection by loss
    assert Best.from_state("rougeL", up.state()) == up
    old = Best.from_state("loss", {"valid_loss": 2.5, "step": 7})
    assert (old.value, old.step) == (2.5, 7)
    assert Best.from_state("rougeL", {"valid_loss": 2.5, "step": 7}).step is None  # another metric's best
    assert canonical_select("ROUGE-L") == "rougeL" and canonical_select("final") == "last"
    assert canonical_select("LOSS") == "loss" and canonical_select(" Reverse-KL ") == "reverse-kl"
    with pytest.raises(InputError, match="expected one of last, loss, rougeL, reverse-kl"):
        canonical_select("bleu")


# -- sft: the real validation ROUGE-L ----------------------------------------------------------
def test_sft_keeps_the_weights_whose_validation_rouge_was_best(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "run"
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 4,
                 "--batch-size", 4, "--lr", 3e-2, "--eval-every", 1, "--valid-size", 6, "--select-by", "rougeL",
                 "--max-length", 160, "--max-prompt-length", 128, "--device", "cpu", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    logged = [(r["step"], r["valid_rougeL"]) for r in rows(out)]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    best_step, best = max(logged, key=lambda sv: (sv[1], -sv[0]))  # the first of the highest
    assert (summary["saved"], summary["select_by"]) == ("best", "rougeL")
    assert (summary["best_step"], summary["best_valid_rougeL"]) == (best_step, best)
    assert summary["best_valid_loss"] == min(r["valid_loss"] for r in rows(out))
    # the weights in --out score that value again: they are that step's, whatever came after
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.config import DataOptions
    from minillm_cli.engine.runtime import Runtime
    from minillm_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(out))
    model = load_model(str(out), tokenizer=tok, device=torch.device("cpu"), trainable=False)
    valid = load_splits(DataOptions(data=str(dolly_like), valid_size=6, max_length=160, max_prompt_length=128))["valid"]
    rouge = ValidationRouge(tok, valid, template="dolly", max_prompt_length=128, max_length=160, max_new_tokens=256,
                            seed=0)
    again = rouge.score(model, Runtime(torch.device("cpu")), rows=16, engine="eager", vocab_size=len(tok),
                        autocast_dtype=torch.float32)
    assert again == pytest.approx(best, abs=1e-9)


# -- distill: the best step survives --resume, and --out keeps its weights -----------------------
def test_minillm_keeps_the_best_step_through_a_resume(tmp_path, tiny_dir, dolly_like, monkeypatch):
    seen = scripted_scores(monkeypatch, [1.0, 5.0, 3.0, 4.0])
    out = tmp_path / "run"
    base = ["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", dolly_like,
            "--out", out, "--batch-size", 2, "--num-rollouts", 4, "--max-new-tokens", 8, "--limit", 24,
            "--device", "cpu", "--eval-prompts", 0, "--lr", 1e-2, "--eval-every", 1, "--select-by", "rougeL",
            "--quiet", "--json"]
    res = invoke(*base, "--steps", 2)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["best_step"] == 2
    # (--select-by left out: a resume takes the run's own)
    res = invoke(*[a for a in base if a not in ("--select-by", "rougeL")], "--steps", 4, "--resume")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["saved"], summary["best_step"], summary["best_valid_rougeL"]) == ("best", 2, 5.0)
    assert [r.get("valid_rougeL") for r in rows(out)] == [1.0, 5.0, 3.0, 4.0]
    assert not same(seen[5.0], seen[4.0])  # the student moved on after step 2
    assert same(saved_weights(out), seen[5.0])


def test_distill_keeps_the_final_weights_by_default(tmp_path, tiny_dir, dolly_like, monkeypatch):
    called = []
    monkeypatch.setattr(ValidationRouge, "score", lambda *a, **k: called.append(1) or 0.0)
    out = tmp_path / "run"
    res = invoke("distill", "--method", "kd", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student",
                 "--data", dolly_like, "--out", out, "--batch-size", 2, "--steps", 3, "--limit", 24, "--lr", 1e-2,
                 "--eval-every", 1, "--device", "cpu", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["saved"], summary["select_by"], summary["best_step"]) == ("final", "last", None)
    assert not called and "valid_rougeL" not in rows(out)[-1]
    assert json.loads((out / "run_config.json").read_text())["config"]["run"]["select_by"] == "last"


def test_rouge_selection_without_a_prompt_to_score_is_refused_before_training(tmp_path, tiny_dir, dolly_like):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"instruction": "word " * 200, "response": "x"}) + "\n" for _ in range(3)))
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--valid-data", long, "--out",
                 tmp_path / "run", "--steps", 1, "--select-by", "rougeL", "--device", "cpu", "--max-length", 160,
                 "--max-prompt-length", 128)
    assert res.exit_code == 2, res.output
    assert "--select-by rougeL: no validation prompt to score" in res.output and "3 over --max-prompt-length" in res.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    res = invoke("distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", dolly_like,
                 "--valid-data", long, "--out", tmp_path / "rkl", "--steps", 1, "--select-by", "reverse-kl",
                 "--device", "cpu", "--max-length", 160, "--max-prompt-length", 128, "--max-new-tokens", 8)
    assert res.exit_code == 2 and "--select-by reverse-kl: no validation prompt (3 read, 3 over" in res.output, res.output


def test_a_baselines_checkpoint_from_before_select_by_names_no_weights_in_out(tmp_path, tiny_dir, dolly_like):
    """Before --select-by, kd/rkl/seqkd checkpoints recorded their lowest validation loss
    ({"valid_loss", "step"}) but OUT held the final weights: resumed with --select-by loss, that
    record must not be taken for weights OUT holds."""
    out = tmp_path / "kd"
    args = ["distill", "--method", "kd", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student",
            "--data", dolly_like, "--batch-size", 4, "--lr", 1e-3, "--warmup-steps", 0, "--valid-size", 6,
            "--max-length", 160, "--max-prompt-length", 128, "--eval-every", 1, "--device", "cpu", "--quiet",
            "--out", out]
    assert invoke(*args, "--steps", 2).exit_code == 0
    # as the previous release wrote them: the old record, and no select_by in run_config.json
    ckpt = out / "checkpoints" / "step-00000002" / "state.pt"
    state = torch.load(ckpt, weights_only=False)
    state["extra"] = {"best": {"valid_loss": 0.0, "step": 1}}
    torch.save(state, ckpt)
    record = json.loads((out / "run_config.json").read_text())
    del record["config"]["run"]["select_by"]
    (out / "run_config.json").write_text(json.dumps(record))
    res = invoke(*args, "--steps", 3, "--resume", "--select-by", "loss", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["saved"], summary["best_step"]) == ("best", 3)  # not step 1, whose weights OUT never held
    assert json.loads((out / "run_config.json").read_text())["config"]["method"] == "kd"  # the run's own record


def test_weights_saved_after_the_last_checkpoint_are_not_taken_for_the_records(tmp_path, tiny_dir, dolly_like,
                                                                               monkeypatch):
    """OUT receives the weights at each new best, the record reaches a checkpoint only at
    --save-every: a run stopped in between leaves OUT ahead of its checkpoint. The resumed run
    must not report the checkpoint's older best for weights OUT no longer holds."""
    import shutil

    seen = scripted_scores(monkeypatch, [1.0, 5.0, 9.0, 2.0, 3.0])
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--lr", 1e-2, "--schedule", "constant", "--eval-every", 1, "--save-every", 2, "--select-by", "rougeL",
            "--valid-size", 6, "--max-length", 160, "--max-prompt-length", 128, "--device", "cpu", "--quiet", "--json"]
    assert invoke(*args, "--steps", 3).exit_code == 0
    assert json.loads((out / "selected.json").read_text())["step"] == 3
    # stopped right after step 3's validation saved its weights, before the step-3 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "LATEST").write_text("step-00000002")
    res = invoke(*[a for a in args if a != "--quiet"], "--steps", 4, "--resume")
    assert res.exit_code == 0, res.output
    assert "--out holds the weights of step 3, saved after the checkpoint" in res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["best_step"], summary["best_valid_rougeL"]) == (4, 3.0)  # not step 2's 5.0
    assert same(saved_weights(out), seen[3.0])


def test_a_run_killed_between_saving_the_weights_and_naming_them_is_not_taken_for_its_record(
        tmp_path, tiny_dir, dolly_like, monkeypatch):
    """The weights are saved, then `selected.json` names their step: a run that dies in between
    leaves OUT with step 3's weights while the marker and the checkpoint still agree on step 2.
    The marker says `pending` across the save, so the resumed run starts the selection again."""
    seen = scripted_scores(monkeypatch, [1.0, 5.0, 9.0, 2.0, 3.0])
    plain_mark = Best.mark

    def dies_after_saving_step_3(self, out, *, pending=False):
        if self.step == 3 and not pending:
            raise RuntimeError("killed")
        plain_mark(self, out, **({"pending": True} if pending else {}))

    monkeypatch.setattr(Best, "mark", dies_after_saving_step_3)
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--lr", 1e-2, "--schedule", "constant", "--eval-every", 1, "--save-every", 2, "--select-by", "rougeL",
            "--valid-size", 6, "--max-length", 160, "--max-prompt-length", 128, "--device", "cpu", "--quiet", "--json"]
    assert invoke(*args, "--steps", 3).exit_code != 0
    assert same(saved_weights(out), seen[9.0])  # step 3's weights, the last checkpoint step 2's
    monkeypatch.setattr(Best, "mark", plain_mark)
    res = invoke(*[a for a in args if a != "--quiet"], "--steps", 4, "--resume")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["best_step"], summary["best_valid_rougeL"]) == (4, 3.0)  # not step 2's 5.0
    assert same(saved_weights(out), seen[3.0])
    assert "a save of step 3's weights that did not finish" in res.output
    assert json.loads((out / "selected.json").read_text()) == {"select_by": "rougeL", "value": 3.0, "step": 4}


def test_validation_rouge_out_of_memory_samples_in_halves_to_the_same_score(tiny_dir, dolly_like, monkeypatch):
    import minillm_cli.engine.sampler as sampler
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.engine.runtime import Runtime
    from minillm_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "student"))
    model = load_model(str(tiny_dir / "student"), tokenizer=tok, device=torch.device("cpu"), trainable=False)
    valid = load_splits(DataOptions(data=str(dolly_like), valid_size=8, max_length=160, max_prompt_length=128))["valid"]
    rouge = ValidationRouge(tok, valid, template="dolly", max_prompt_length=128, max_length=160, seed=0)
    kw = dict(rows=8, engine="eager", vocab_size=len(tok), autocast_dtype=torch.float32)
    whole = rouge.score(model, Runtime(torch.device("cpu")), **kw)
    real, notes = sampler.sample, []

    def small_device(*a, **k):
        if a[2].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*a, **k)

    monkeypatch.setattr(sampler, "sample", small_device)
    assert len(rouge) > 2
    assert rouge.score(model, Runtime(torch.device("cpu")), note=notes.append, **kw) == whole
    assert notes and notes[0].startswith("validation ROUGE-L: out of device memory")
