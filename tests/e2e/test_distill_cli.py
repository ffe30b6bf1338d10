"""`minillm distill` end to end on tiny local models: every method, resume, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from minillm_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def common(tiny_dir, data):
    return ["--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", data,
            "--batch-size", 2, "--num-rollouts", 4, "--max-new-tokens", 8, "--limit", 24, "--quiet",
            "--device", "cpu", "--eval-prompts", 2, "--warmup-steps", 1, "--lr", 1e-3]


def rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("method", ["minillm", "kd", "seqkd", "rkl"])
def test_each_method_runs_and_saves_a_loadable_student(tmp_path, tiny_dir, dolly_like, method):
    out = tmp_path / method
    res = invoke("distill", *common(tiny_dir, dolly_like), "--method", method, "--out", out, "--steps", 2, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["command"], summary["method"]) == ("distill", method)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2]
    # the rate each step trained with: warm-up 1 step of 2 (lr / 2), then the peak
    assert [x["lr"] for x in r] == pytest.approx([5e-4, 1e-3])
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"]["method"] == method
    if method == "minillm":
        assert cfg["resolved"]["sampler"] == "eager" and cfg["resolved"]["device"] == "cpu"  # --sampler auto on CPU
        assert cfg["resolved"]["cache_teacher_logits"] is True  # unset: kept where they fit (here: tiny)
        assert cfg["resolved"]["rollout_batch_size"] == 4  # unset: all --num-rollouts at once (they fit)
        for key in ("reverse_kl", "single_step", "pg", "clip_frac", "w_mean", "w_max", "reward_mean",
                    "rollout_tokens_per_s", "update_tokens_per_s", "response_len"):
            assert key in r[0] or key in r[-1], key
        assert "valid_reverse_kl" in r[-1]
    if method == "seqkd":
        gen = (out / "seqkd_data.jsonl").read_text().splitlines()
        assert gen and all("response" in json.loads(l) for l in gen)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_dir, dolly_like):
    args = [*common(tiny_dir, dolly_like), "--save-every", 1, "--eval-prompts", 0]
    full, part = tmp_path / "full", tmp_path / "part"
    assert invoke("distill", *args, "--out", full, "--steps", 6).exit_code == 0
    assert invoke("distill", *args, "--out", part, "--steps", 3).exit_code == 0
    res = invoke("distill", *args, "--out", part, "--steps", 6, "--resume")
    assert res.exit_code == 0, res.output
    a, b = rows(full), rows(part)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for k in ("pg", "single_step", "reverse_kl", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)


def test_resume_refuses_other_settings_and_a_finished_count(tmp_path, tiny_dir, dolly_like):
    """--resume continues the run run_config.json describes: another learning rate, method or
    rollout setting is refused (exit 2, naming each), nothing is rewritten; the step count, the
    sampler engine, the teacher-logit cache, evaluation and logging may change; asking for fewer
    steps than the checkpoint has is an error, not a silent no-op."""
    args = [*common(tiny_dir, dolly_like), "--save-every", 1, "--eval-prompts", 0]
    out = tmp_path / "run"
    assert invoke("distill", *args, "--out", out, "--steps", 2, "--no-cache-teacher-logits").exit_code == 0
    before = (out / "run_config.json").read_text()
    assert json.loads(before)["resolved"]["cache_teacher_logits"] is False
    for extra, needles in ((["--lr", 5e-3], ["--lr 0.001 -> 0.005"]),
                           (["--num-rollouts", 6, "--teacher-mix-alpha", 0.5],
                            ["--num-rollouts 4 -> 6", "--teacher-mix-alpha 0.2 -> 0.5"]),
                           (["--method", "kd"], ["'distill' run, this is 'distill-kd'"])):
        res = invoke("distill", *args, *extra, "--out", out, "--steps", 3, "--resume")
        assert res.exit_code == 2, (extra, res.output)
        assert all(n in res.output for n in needles), res.output
        assert (out / "run_config.json").read_text() == before and len(rows(out)) == 2
    res = invoke("distill", *args, "--out", out, "--steps", 1, "--resume")
    assert res.exit_code == 2 and "at step 2 already" in res.output, res.output
    res = invoke("distill", *args, "--out", out, "--steps", 3, "--resume", "--sampler", "static",
                 "--cache-teacher-logits", "--eval-every", 5)
    assert res.exit_code == 0, res.output
    assert [x["step"] for x in rows(out)] == [1, 2, 3]
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"]["sampler"] == "static" and cfg["resolved"]["cache_teacher_logits"] is True
    # a finished run resumed runs no step, and its summary keeps the last step's figures
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["reverse_kl"], float)
    res = invoke("distill", *args, "--out", out, "--steps", 3, "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["reverse_kl"] == summary["reverse_kl"]
    assert json.loads((out / "summary.json").read_text())["reverse_kl"] == summary["reverse_kl"]


def test_sft_resume_refuses_another_batch_size(tmp_path, tiny_dir, dolly_like, monkeypatch):
    base = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--lr", 1e-3, "--quiet", "--device", "cpu",
            "--save-every", 1, "--out", tmp_path / "s"]
    assert invoke(*base, "--steps", 2, "--batch-size", 4).exit_code == 0
    res = invoke(*base, "--steps", 3, "--batch-size", 2, "--resume")
    assert res.exit_code == 2 and "--batch-size 4 -> 2" in res.output, res.output
    res = invoke(*[a for a in base if a != "--quiet"], "--steps", 1, "--batch-size", 4, "--resume")
    assert res.exit_code == 2 and "at step 2 already" in res.output, res.output
    assert "laid out again" not in res.output  # a refused resume says only why
    # --grad-accum changes how a batch is split, not the result; the schedule is laid out again
    # over the new length and the first resumed step trains at the new curve's rate
    res = invoke(*[a for a in base if a != "--quiet"], "--steps", 4, "--batch-size", 4, "--grad-accum", 2, "--resume")
    assert res.exit_code == 0, res.output
    assert "cosine learning-rate schedule is laid out again" in res.output
    lr = [json.loads(l)["lr"] for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert lr[2:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (2, 3)])
    # the same files from another directory: relative paths are read against where the run started
    monkeypatch.chdir(tmp_path)
    rel = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--lr", 1e-3, "--quiet", "--device", "cpu",
           "--save-every", 1, "--batch-size", 4]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.jsonl").write_text(Path(dolly_like).read_text())
    monkeypatch.chdir(tmp_path / "d")
    assert invoke(*rel, "--data", "data.jsonl", "--out", "../r", "--steps", 1).exit_code == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(Path(dolly_like).read_text())  # the same name, another file
    res = invoke(*rel, "--data", "data.jsonl", "--out", "r", "--steps", 2, "--resume")
    assert res.exit_code == 2 and "--data 'data.jsonl' -> 'data.jsonl'" in res.output, res.output
    res = invoke(*rel, "--data", "d/data.jsonl", "--out", "r", "--steps", 2, "--resume")
    assert res.exit_code == 0, res.output


def test_options_a_method_ignores_are_named(tmp_path, tiny_dir, dolly_like):
    args = [a for a in common(tiny_dir, dolly_like) if a != "--quiet"]
    res = invoke("distill", *args, "--method", "kd", "--teacher-mix-alpha", 0.5, "--no-single-step", "--ppo-epochs", 2,
                 "--out", tmp_path / "kd", "--steps", 1)
    assert res.exit_code == 0, res.output
    # (common() sets --num-rollouts, --max-new-tokens and --eval-prompts too)
    assert "note: --method kd does not use --num-rollouts, --ppo-epochs, --max-new-tokens, --teacher-mix-alpha, " \
           "--no-single-step, --eval-prompts\n" in res.output
    res = invoke("distill", *args, "--kd-ratio", 0.3, "--pt-kd-ratio", 0.5, "--out", tmp_path / "m", "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "note: --method minillm does not use --pt-kd-ratio (no --pt-data), --kd-ratio" in res.output, res.output
    res = invoke("distill", *args, "--out", tmp_path / "plain", "--steps", 1)
    assert "does not use" not in res.output
    # what the unset --cache-teacher-logits became, and why (4 rollouts x 8 tokens of the tiny vocabulary)
    assert "teacher logits kept from scoring for the PPO epochs: up to " in res.output, res.output
    res = invoke("distill", *args, "--method", "kd", "--no-cache-teacher-logits", "--out", tmp_path / "kdc", "--steps", 1)
    assert res.exit_code == 0 and "--no-cache-teacher-logits" in res.output, res.output
    # seqkd generates in --rollout-batch-size chunks; a baseline may take a batch over --num-rollouts
    res = invoke("distill", *args, "--method", "seqkd", "--rollout-batch-size", 3, "--out", tmp_path / "sq", "--steps", 1)
    assert res.exit_code == 0 and "--rollout-batch-size" not in res.output.split("note:")[-1].split("\n")[0]
    res = invoke("distill", *args, "--method", "kd", "--batch-size", 6, "--out", tmp_path / "kd6", "--steps", 1)
    assert res.exit_code == 0, res.output


def test_seqkd_file_holds_the_generated_answers_only(tmp_path, tiny_dir):
    """Prompts over --max-prompt-length get no teacher answer: seqkd_data.jsonl must not hold
    empty answers for them (someone reusing the file would train on empty responses); the
    progress count ends at the number generated; --resume reuses the file."""
    from conftest import write_jsonl

    rows = [{"instruction": ("Describe everything about item %d. " % i) * (20 if i % 3 == 0 else 1),
             "context": "", "response": f"Item {i}."} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = [*[a for a in common(tiny_dir, data) if a != "--quiet"], "--method", "seqkd", "--max-prompt-length", 120,
            "--valid-size", 0, "--save-every", 1, "--out", tmp_path / "s"]
    res = invoke("distill", *args, "--steps", 1)
    assert res.exit_code == 0, res.output
    gen = [json.loads(l) for l in (tmp_path / "s" / "seqkd_data.jsonl").read_text().splitlines()]
    assert 0 < len(gen) < 30 and all("index" in g for g in gen)
    assert all(rows[g["index"]]["instruction"] == g["instruction"] for g in gen)
    assert all(g["index"] % 3 != 0 for g in gen)  # the long prompts have no row
    assert f"seqkd: teacher generated {len(gen)}/{len(gen)}" in res.output
    res = invoke("distill", *args, "--steps", 2, "--resume")
    assert res.exit_code == 0, res.output
    assert "teacher generated" not in res.output  # answers reused
    # answers cut at --max-new-tokens are marked, and trained without EOS (the teacher never ended them)
    from minillm_cli.data.examples import Example
    from minillm_cli.data.tokenize import encode_sft
    from minillm_cli.models import load_tokenizer

    assert all(isinstance(g["finished"], bool) for g in gen) and not all(g["finished"] for g in gen)
    tok = load_tokenizer(str(tiny_dir / "student"))
    ex = [Example("say a", "", ["a"])] * 2
    enc, _ = encode_sft(tok, ex, responses=["a b", "a b"], ends=[True, False])
    assert enc[0].input_ids[-1] == tok.eos_token_id and enc[1].input_ids == enc[0].input_ids[:-1]


def test_seqkd_generation_stopped_halfway_resumes_where_it_stopped(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """A run stopped during the teacher's generation keeps the answers of every chunk finished
    (per-process partial files) and --resume generates only the others; the answers and the
    trained student are the uninterrupted run's."""
    from procs import max_diff

    import minillm_cli.engine.sampler as sampler

    args = [*[a for a in common(tiny_dir, dolly_like) if a != "--quiet"], "--method", "seqkd",
            "--rollout-batch-size", 3, "--steps", 2]
    whole = tmp_path / "whole"
    assert invoke("distill", *args, "--out", whole).exit_code == 0
    real, calls = sampler.sample, []

    def stops_on_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return real(*a, **k)

    monkeypatch.setattr(sampler, "sample", stops_on_the_third_chunk)
    cut = tmp_path / "cut"
    res = invoke("distill", *args, "--out", cut)
    assert res.exit_code == 1 and "the machine went away" in res.output, res.output
    assert not (cut / "seqkd_data.jsonl").exists() and (cut / "run_config.json").is_file()
    kept = (cut / "seqkd_data.partial.0.jsonl").read_text().splitlines()
    assert len(kept) == 6  # two chunks of 3
    monkeypatch.setattr(sampler, "sample", real)
    res = invoke("distill", *args, "--out", cut, "--resume")
    assert res.exit_code == 0, res.output
    total = len((whole / "seqkd_data.jsonl").read_text().splitlines())
    assert f"seqkd: 6 answers kept from the interrupted generation, {total - 6} to go" in res.output
    assert "no checkpoint in" in res.output and "training starts at step 0" in res.output
    assert (cut / "seqkd_data.jsonl").read_text() == (whole / "seqkd_data.jsonl").read_text()
    assert not list(cut.glob("seqkd_data.partial.*"))
    assert max_diff(whole, cut) == 0.0
    assert [r["step"] for r in rows(cut)] == [1, 2]


def test_resume_of_a_folder_that_holds_no_run_is_refused_untouched(tmp_path, tiny_dir, dolly_like):
    """seqkd writes run_config.json before its teacher generates: --resume of a folder that is no
    run (say a model folder) must be refused before that, not taken for a run stopped early."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    args = [*common(tiny_dir, dolly_like), "--method", "seqkd", "--steps", 1, "--out", folder, "--resume"]
    res = invoke("distill", *args)
    assert res.exit_code == 2 and "holds no run to resume" in res.output, res.output
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tmp_path, tiny_dir, dolly_like):
    """A finished run whose checkpoints were deleted is not started again from step 0 (which
    would drop its metrics and replace its weights)."""
    import shutil

    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--steps", 2]
    assert invoke(*args).exit_code == 0
    shutil.rmtree(out / "checkpoints")
    logged = (out / "metrics.jsonl").read_text()
    res = invoke(*args, "--resume")
    assert res.exit_code == 2 and "finished (summary.json)" in res.output, res.output
    assert (out / "metrics.jsonl").read_text() == logged


def test_a_refused_seqkd_resume_leaves_run_config_as_it_was(tmp_path, tiny_dir, dolly_like):
    """seqkd writes run_config.json before its teacher generates, but only where the folder has
    none: a resume refused later (here: a finished run without checkpoints) must not replace it."""
    import shutil

    out = tmp_path / "run"
    args = [*common(tiny_dir, dolly_like), "--method", "seqkd", "--steps", 1, "--out", out]
    assert invoke("distill", *args).exit_code == 0
    record = (out / "run_config.json").read_text()
    shutil.rmtree(out / "checkpoints")
    res = invoke("distill", *args, "--resume")
    assert res.exit_code == 2 and "finished (summary.json)" in res.output, res.output
    assert (out / "run_config.json").read_text() == record


def test_seqkd_refuses_student_settings_before_the_teacher_generates(tmp_path, tiny_dir, dolly_like):
    """A student setting that loading would refuse (LoRA targets it lacks, too long a --max-length
    for its positions) is refused before hours of teacher generation, which leaves nothing behind."""
    args = [*[a for a in common(tiny_dir, dolly_like) if a != "--quiet"], "--method", "seqkd", "--steps", 1]
    for extra, needle in ((["--lora-r", 2, "--lora-targets", "nonexist"], "LoRA targets ['nonexist']"),
                          (["--max-length", 4096], "--max-length (4096 tokens) exceeds the student's context")):
        out = tmp_path / extra[0].strip("-")
        res = invoke("distill", *args, *extra, "--out", out)
        assert res.exit_code == 2 and needle in res.output, res.output
        assert "teacher generated" not in res.output and not (out / "seqkd_data.jsonl").exists()


def test_seqkd_on_prompts_without_answers(tmp_path, tiny_dir):
    """SeqKD needs prompts only (the teacher answers them); its validation loss needs gold answers,
    so reference-free validation examples are left out (a loss on EOS alone would mean nothing)."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "v.jsonl", [{"question_id": i, "turns": [f"How do I fix item {i}?"]}
                                              for i in range(30)])
    args = [a for a in common(tiny_dir, data) if a != "--quiet"]
    res = invoke("distill", *args, "--method", "seqkd", "--valid-size", 4, "--out", tmp_path / "s", "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "note: 4 validation examples have no reference answer: validated without them (no validation loss)" \
        in res.output
    assert all(r.get("valid_loss") is None for r in rows(tmp_path / "s"))


def test_ablation_switches_change_the_update(tmp_path, tiny_dir, dolly_like):
    base = [*common(tiny_dir, dolly_like), "--steps", 1, "--eval-prompts", 0]
    outs = {}
    for name, extra in {"paper": [], "no_ss": ["--no-single-step"], "no_ln": ["--no-length-norm"],
                        "alpha0": ["--teacher-mix-alpha", 0]}.items():
        out = tmp_path / name
        assert invoke("distill", *base, *extra, "--out", out).exit_code == 0
        outs[name] = rows(out)[0]
    assert outs["no_ss"]["single_step"] == 0.0 and outs["paper"]["single_step"] > 0
    assert outs["no_ln"]["pg"] != pytest.approx(outs["paper"]["pg"])
    assert outs["alpha0"]["w_mean"] == pytest.approx(1.0) and outs["paper"]["w_mean"] != pytest.approx(1.0)


@pytest.mark.parametrize("extra, needle", [
    (["--teacher-mix-alpha", 1.5], "--teacher-mix-alpha must be in [0, 1]"),
    (["--teacher-mix-alpha", -0.1], "--teacher-mix-alpha must be in [0, 1]"),
    (["--method", "nope"], "--method 'nope'"),
    (["--num-rollouts", 1], "--num-rollouts (1) must be at least --batch-size"),
    (["--max-length", 80, "--max-prompt-length", 60, "--max-new-tokens", 30],
     "--max-prompt-length 60 + --max-new-tokens 30 exceed --max-length 80"),
    (["--max-length", 80, "--max-prompt-length", 60, "--max-new-tokens", 30, "--method", "seqkd"],
     "--max-prompt-length 60 + --max-new-tokens 30 exceed --max-length 80 (the longest prompt + response the teacher"),
    (["--teacher-device", "gpu"], "--teacher-device 'gpu': expected auto"),
    (["--adam-betas", "0.9"], "--adam-betas 0.9: expected two numbers in [0, 1) as B1,B2"),
    (["--adam-betas", "0.9,1.5"], "--adam-betas 0.9,1.5: expected two numbers"),
    (["--select-by", "bleu"], "--select-by 'bleu': expected one of last, loss, rougeL, reverse-kl"),
    (["--select-by", "loss"], "--select-by loss: MiniLLM computes no validation loss"),
    (["--select-by", "reverse-kl", "--method", "kd"], "--select-by reverse-kl: only --method minillm"),
    (["--select-by", "reverse-kl", "--eval-prompts", 0], "--select-by reverse-kl needs --eval-prompts > 0"),
    (["--select-by", "rougeL", "--valid-size", 0], "--select-by rougeL needs validation data"),
    (["--select-by", "loss", "--method", "kd", "--valid-size", 0], "--select-by loss needs validation data"),
])
def test_bad_options(tmp_path, tiny_dir, dolly_like, extra, needle):
    res = invoke("distill", *common(tiny_dir, dolly_like), *extra, "--out", tmp_path / "x", "--steps", 1)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_default_mini_batch_is_the_reference_codes_in_micro_batches_of_eight(tmp_path, tiny_dir, dolly_like):
    from minillm_cli.config import auto_grad_accum

    assert [auto_grad_accum(b) for b in (64, 8, 12, 7, 1, 24, 9)] == [8, 1, 2, 1, 1, 3, 3]
    args = ["--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", dolly_like,
            "--max-new-tokens", 3, "--limit", 40, "--device", "cpu", "--eval-prompts", 0, "--steps", 1]
    res = invoke("distill", *args, "--num-rollouts", 64, "--out", tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert "1 steps of 64 rollouts (8 micro-batches)" in res.output
    cfg = json.loads((tmp_path / "m" / "run_config.json").read_text())
    assert json.dumps(cfg).count('"batch_size": 64') == 1 and json.dumps(cfg).count('"grad_accum": 8') == 1
    res = invoke("distill", *args, "--num-rollouts", 16, "--out", tmp_path / "few")
    assert res.exit_code == 2 and "--num-rollouts (16) must be at least --batch-size (64, minillm's default)" in res.output
    res = invoke("distill", *args, "--method", "kd", "--quiet", "--out", tmp_path / "kd")
    assert res.exit_code == 0, res.output
    cfg = json.dumps(json.loads((tmp_path / "kd" / "run_config.json").read_text()))
    assert '"batch_size": 8' in cfg and '"grad_accum": 1' in cfg
    # a run started when the default was 8 resumes with its own command (no --batch-size)
    old = tmp_path / "old"
    res = invoke("distill", *args, "--num-rollouts", 16, "--batch-size", 8, "--grad-accum", 1, "--quiet", "--out", old)
    assert res.exit_code == 0, res.output
    res = invoke("distill", *args[:-1], 2, "--num-rollouts", 16, "--quiet", "--resume",  # (--steps 2)
                 "--out", old)
    assert res.exit_code == 0, res.output
    # with several processes the auto micro-batches are a multiple of their number where one fits
    assert [auto_grad_accum(64, processes=w) for w in (1, 2, 3, 4, 16, 32)] == [8, 8, 8, 8, 16, 32]
    assert auto_grad_accum(8, processes=2) == 2


def test_missing_teacher_and_vocab_mismatch(tmp_path, tiny_dir, dolly_like):
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    args = common(tiny_dir, dolly_like)
    i = args.index("--teacher")
    bad = list(args)
    bad[i + 1] = tmp_path / "no-teacher"
    res = invoke("distill", *bad, "--out", tmp_path / "a", "--steps", 1)
    assert res.exit_code == 2 and "teacher" in res.output and "Traceback" not in res.output
    tok = train_bpe_tokenizer(["another corpus entirely, other merges"] * 10, tmp_path / "otok", vocab_size=300)
    make_gpt2(tok, tmp_path / "other", n_layer=1, n_embd=32, n_head=2)
    bad[i + 1] = tmp_path / "other"
    res = invoke("distill", *bad, "--out", tmp_path / "b", "--steps", 1)
    assert res.exit_code == 2 and "tokenizers differ" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_pt_data_trains_and_another_tokenizer_is_refused_before_training(tmp_path, tiny_dir, dolly_like):
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    text = tmp_path / "pt.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    assert invoke("pretrain-mix", "--source", text, "--tokenizer", tiny_dir / "student", "--seq-len", 16,
                  "--split-blank-lines", "--out", tmp_path / "pt", "--quiet", "--workers", 0).exit_code == 0
    out = tmp_path / "with-pt"
    res = invoke("distill", *common(tiny_dir, dolly_like), "--pt-data", tmp_path / "pt", "--out", out, "--steps", 2)
    assert res.exit_code == 0, res.output
    assert all(r["pt_loss"] > 0 for r in rows(out))
    train_bpe_tokenizer(["some other corpus altogether"] * 20, tmp_path / "other-tok", vocab_size=300)
    assert invoke("pretrain-mix", "--source", text, "--tokenizer", tmp_path / "other-tok", "--seq-len", 16,
                  "--split-blank-lines", "--out", tmp_path / "pt2", "--quiet", "--workers", 0).exit_code == 0
    res = invoke("distill", *common(tiny_dir, dolly_like), "--pt-data", tmp_path / "pt2", "--out", tmp_path / "bad",
                 "--steps", 2)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "tokenizer" in res.output.lower()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_sampler_engine_serves_rollouts_and_validation(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """--sampler static: the static-cache engine samples the rollouts (teacher-mixed) and the
    validation responses (student alone), frees its caches after each, and on CPU reproduces the
    eager run (same uniforms, same tokens; only float rounding differs)."""
    from minillm_cli.engine import fast_sampler

    calls, releases = [], []
    real_sample, real_release = fast_sampler.fast_sample, fast_sampler.release
    monkeypatch.setattr(fast_sampler, "fast_sample",
                        lambda *a, **k: calls.append((k["engine"], k["alpha"])) or real_sample(*a, **k))
    monkeypatch.setattr(fast_sampler, "release", lambda: releases.append(1) or real_release())
    args = [*common(tiny_dir, dolly_like), "--steps", 2]
    res = invoke("distill", *args, "--sampler", "static", "--out", tmp_path / "static")
    assert res.exit_code == 0, res.output
    assert ("static", 0.0) in calls, "validation samples did not use the --sampler engine"
    assert any(alpha > 0 for _, alpha in calls), "rollouts did not use the --sampler engine"
    assert len(releases) >= 2
    n_static = len(calls)
    res = invoke("distill", *args, "--sampler", "eager", "--out", tmp_path / "eager")
    assert res.exit_code == 0, res.output
    assert len(calls) == n_static, "--sampler eager went through the fast engine"
    seen = set()
    for x, y in zip(rows(tmp_path / "static"), rows(tmp_path / "eager"), strict=True):
        for key in ("reverse_kl", "response_len", "valid_reverse_kl"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-5), (x["step"], key)
                seen.add(key)
    assert seen == {"reverse_kl", "response_len", "valid_reverse_kl"}


def test_the_rollout_batch_changes_what_runs_together_not_the_result(tmp_path, tiny_dir, dolly_like):
    """--rollout-batch-size 0 (auto) samples every rollout of an iteration at once here (tiny
    models), and says so; one prompt at a time gives the same run (each rollout draws from its own
    generator; only float rounding differs). With --whiten (advantages whitened per rollout
    micro-batch) auto keeps --batch-size, so the result does not depend on free memory."""
    args = [a for a in common(tiny_dir, dolly_like) if a != "--quiet"] + ["--steps", 4, "--eval-prompts", 3]
    res = invoke("distill", *args, "--out", tmp_path / "auto")
    assert res.exit_code == 0, res.output
    assert "rollouts sampled 4 at a time (" in res.output, res.output
    res = invoke("distill", *args, "--rollout-batch-size", 1, "--out", tmp_path / "one")
    assert res.exit_code == 0 and "rollouts sampled" not in res.output, res.output
    a, b = rows(tmp_path / "auto"), rows(tmp_path / "one")
    assert [x["step"] for x in a] == [1, 2, 3, 4] and "valid_reverse_kl" in a[-1]
    for x, y in zip(a, b, strict=True):
        for key in ("pg", "single_step", "reverse_kl", "response_len", "grad_norm", "valid_reverse_kl"):
            if key in x or key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    res = invoke("distill", *args, "--whiten", "--out", tmp_path / "whiten")
    assert res.exit_code == 0, res.output
    assert "rollouts sampled 2 at a time (--batch-size): --whiten" in res.output, res.output
    assert json.loads((tmp_path / "whiten" / "run_config.json").read_text())["resolved"]["rollout_batch_size"] == 2


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_out_of_device_memory_while_sampling_splits_the_batch(tmp_path, tiny_dir, dolly_like, monkeypatch, engine):
    """An out-of-memory error while sampling (faked here for more than 2 prompts at once: before
    sampling with the eager loop; in the static engine's decode step, after its random draws and
    cache allocation) samples the same rollouts again in halves, with a note, and the run --
    validation included -- is the run at 2 prompts at a time; seqkd's teacher generations
    alike. With --whiten (advantages depend on what is scored together) it is an error, exit 1,
    with a hint at lowering the batch sizes."""
    import torch

    from minillm_cli.engine import decode_loop, distill, sampler

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    def guard(real):
        def sample(student, teacher, ids, *a, **k):
            if ids.shape[0] > 2:
                oom()
            return real(student, teacher, ids, *a, **k)
        return sample

    def install():
        if engine == "eager":
            monkeypatch.setattr(distill, "sample", guard(distill.sample))
            monkeypatch.setattr(sampler, "sample", guard(sampler.sample))
        else:
            real_step = decode_loop.Decoder.run_step
            monkeypatch.setattr(decode_loop.Decoder, "run_step",
                                lambda self, s: oom() if self.B > 2 else real_step(self, s))

    args = [a for a in common(tiny_dir, dolly_like) if a != "--quiet"]
    args += ["--steps", 2, "--eval-prompts", 3, "--eval-every", 1, "--sampler", engine]
    assert invoke("distill", *args, "--rollout-batch-size", 2, "--out", tmp_path / "two").exit_code == 0
    seqkd = [*args, "--method", "seqkd"]
    assert invoke("distill", *seqkd, "--rollout-batch-size", 2, "--out", tmp_path / "sq2").exit_code == 0
    install()
    res = invoke("distill", *args, "--out", tmp_path / "split")
    assert res.exit_code == 0, res.output
    assert "out of device memory with 4 rollouts sampled together: 2 at a time from now on" in res.output
    seen = set()
    for x, y in zip(rows(tmp_path / "split"), rows(tmp_path / "two"), strict=True):
        for key in ("pg", "single_step", "reverse_kl", "response_len", "grad_norm", "valid_reverse_kl"):
            if key in x or key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
                seen.add(key)
    assert "valid_reverse_kl" in seen and "response_len" in seen
    res = invoke("distill", *args, "--whiten", "--rollout-batch-size", 4, "--out", tmp_path / "whiten")
    assert res.exit_code == 1 and "OutOfMemoryError" in res.output and "lower the batch sizes" in res.output, \
        res.output
    res = invoke("distill", *seqkd, "--out", tmp_path / "sq")
    assert res.exit_code == 0 and "seqkd: out of device memory with" in res.output, res.output
    assert (tmp_path / "sq" / "seqkd_data.jsonl").read_text() == (tmp_path / "sq2" / "seqkd_data.jsonl").read_text()


def test_seqkd_frees_the_fast_engine_after_the_teacher_generates(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """seqkd's teacher generations go through --sampler, and the kept decoder (which also holds
    the teacher) is freed before the student's training starts."""
    from minillm_cli.engine import fast_sampler, sft

    events = []
    real_sample, real_release = fast_sampler.fast_sample, fast_sampler.release
    monkeypatch.setattr(fast_sampler, "fast_sample",
                        lambda *a, **k: events.append("sample") or real_sample(*a, **k))
    monkeypatch.setattr(fast_sampler, "release", lambda: events.append("release") or real_release())
    real_batches = sft.batches_for_step
    monkeypatch.setattr(sft, "batches_for_step", lambda *a, **k: events.append("train") or real_batches(*a, **k))
    res = invoke("distill", *common(tiny_dir, dolly_like), "--method", "seqkd", "--sampler", "static",
                 "--out", tmp_path / "seqkd", "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "sample" in events and "train" in events
    assert "release" in events[events.index("sample"):events.index("train")]



@pytest.mark.parametrize("method", ["minillm", "kd"])
def test_gradient_checkpointing_changes_memory_not_results(tmp_path, tiny_dir, dolly_like, method, monkeypatch):
    """--gradient-checkpointing (MiniLLM's updates run in eval mode, kd's through the sft loop):
    blocks really run under checkpoint, with the same losses and gradient norms as without it."""
    import minillm_cli.engine.recompute as recompute

    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = [*common(tiny_dir, dolly_like), "--method", method, "--steps", 2, "--eval-prompts", 0]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert invoke("distill", *args, "--out", plain).exit_code == 0
    assert not calls
    res = invoke("distill", *args, "--out", ckpt, "--gradient-checkpointing")
    assert res.exit_code == 0, res.output
    assert calls  # every student block of every training forward
    cfg = json.loads((ckpt / "run_config.json").read_text())
    assert cfg["config"]["model_opts"]["gradient_checkpointing"] is True
    a, b = rows(plain), rows(ckpt)
    assert len(a) == len(b) == 2
    timing = ("per_s", "_s", "seconds", "time")
    for x, y in zip(a, b):
        keys = [k for k in x if isinstance(x[k], float) and not any(t in k for t in timing)]
        assert "grad_norm" in keys and set(keys) <= set(y)
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)


def test_validation_takes_the_prompts_that_fit_and_says_when_none_do(tmp_path, tiny_dir, dolly_like):
    """--eval-prompts N: the first N validation prompts under --max-prompt-length (not the first N
    less the long ones); none at all is a warning that --quiet keeps (valid_reverse_kl is not logged)."""
    too_long = {"instruction": "word " * 200, "response": "x"}
    short = [{"instruction": f"say {w}", "response": w} for w in "abc"]
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", data)
             for name, data in (("long", [too_long] * 3), ("short", short), ("mixed", [too_long, too_long, *short]))}
    args = [*common(tiny_dir, dolly_like), "--steps", 1, "--max-prompt-length", 120, "--max-length", 128,
            "--eval-prompts", 3]
    res = invoke("distill", *args, "--valid-data", files["long"], "--out", tmp_path / "none")
    assert res.exit_code == 0, res.output
    assert "warning: no validation prompt (3 read, 3 over --max-prompt-length 120)" in res.stderr, res.stderr
    assert "valid_reverse_kl" not in rows(tmp_path / "none")[-1]
    kl = {}
    for name in ("short", "mixed"):  # the same three prompts validate
        assert invoke("distill", *args, "--valid-data", files[name], "--out", tmp_path / name).exit_code == 0
        kl[name] = rows(tmp_path / name)[-1]["valid_reverse_kl"]
    assert kl["mixed"] == kl["short"]
    res = invoke("distill", *[a for a in args if a != "--quiet"], "--valid-data", files["mixed"],
                 "--eval-prompts", 4, "--out", tmp_path / "four")
    assert "validation: 3 prompts, fewer than --eval-prompts 4 (5 read, 2 over --max-prompt-length)" in res.output
