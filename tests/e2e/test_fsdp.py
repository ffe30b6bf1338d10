"""FSDP2 (`--fsdp`) end to end on tiny local models (CPU, gloo).

- 2 processes with FSDP (student and teacher sharded) give the same student as 1 process without
  it, for MiniLLM distill and for sft. The settings leave the work uneven on purpose (3 rollout
  chunks, 3 update micro-batches, 3 validation prompts for 2 processes), so the lockstep padding
  (a discarded copy of a micro-batch) and the shared decode-stop decision are exercised.
- A checkpoint of the 2-process FSDP run resumes with 1 process under FSDP (turned on by
  accelerate's ACCELERATE_USE_FSDP environment, world size 1) and with 1 process without FSDP;
  a checkpoint written without FSDP resumes under 2-process FSDP. All end on the uninterrupted
  weights.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minillm_cli.cli.app import app
from procs import ENV, files, max_diff, run, torchrun

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun subprocesses: Linux only")

runner = CliRunner()


def distill_args(tiny_dir, data):
    return ["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", data,
            "--batch-size", 3, "--grad-accum", 3, "--num-rollouts", 6, "--rollout-batch-size", 2,
            "--max-new-tokens", 10, "--limit", 24, "--eval-prompts", 3, "--warmup-steps", 1, "--lr", 1e-3,
            "--device", "cpu", "--seed", 3, "--steps", 4, "--save-every", 2, "--quiet"]


def one_vs_two_fsdp(args: list, one: Path, two: Path, log: Path, what: str) -> None:
    """`args` in this process without FSDP into `one`, with 2 FSDP processes into `two`: same weights, same files."""
    res = runner.invoke(app, [str(a) for a in [*args, "--out", one]])
    assert res.exit_code == 0, res.output
    run(torchrun(2, *args, "--fsdp", "--out", two), log)
    d = max_diff(one, two)
    assert d <= 1e-5, f"{what}: 2-process FSDP vs 1 process: {d}"
    assert files(two) == files(one)


def back_to_step_2(src: Path, dst: Path) -> Path:
    """A copy of a finished run as if it had been stopped right after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-00000004")
    (dst / "checkpoints" / "LATEST").write_text("step-00000002")
    (dst / "model.safetensors").unlink()
    return dst


def test_fsdp_distill_two_processes_equal_one_and_resume_anywhere(tmp_path, tiny_dir, dolly_like):
    args = distill_args(tiny_dir, dolly_like)
    ref, two = tmp_path / "ref", tmp_path / "two"
    one_vs_two_fsdp(args, ref, two, tmp_path / "two.log", "distill")
    state = torch.load(two / "checkpoints" / "step-00000002" / "state.pt", weights_only=False)
    assert state["optimizer_keys"] == "names"  # full state, keyed by parameter name
    assert json.loads((two / "run_config.json").read_text())["sharded"] is True

    # FSDP checkpoint -> 1 process under FSDP (from accelerate's environment: world size 1)
    one_fsdp = back_to_step_2(two, tmp_path / "one_fsdp")
    run([sys.executable, "-m", "minillm_cli", *args, "--resume", "--out", one_fsdp], tmp_path / "one_fsdp.log",
        env=dict(ENV, ACCELERATE_USE_FSDP="true"))
    assert json.loads((one_fsdp / "run_config.json").read_text())["sharded"] is True
    assert max_diff(ref, one_fsdp) <= 1e-5
    # FSDP checkpoint -> 1 process without FSDP (in-process)
    one_plain = back_to_step_2(two, tmp_path / "one_plain")
    res = runner.invoke(app, [str(a) for a in [*args, "--resume", "--out", one_plain]])
    assert res.exit_code == 0, res.output
    assert max_diff(ref, one_plain) <= 1e-5
    # checkpoint written without FSDP -> 2 processes with FSDP
    two_from_plain = back_to_step_2(ref, tmp_path / "two_from_plain")
    run(torchrun(2, *args, "--fsdp", "--resume", "--out", two_from_plain), tmp_path / "two_from_plain.log")
    assert max_diff(ref, two_from_plain) <= 1e-5


def test_fsdp_sft_two_processes_equal_one(tmp_path, tiny_dir, dolly_like):
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--steps", 3, "--batch-size", 3,
            "--grad-accum", 3, "--limit", 24, "--max-length", 160, "--max-prompt-length", 128, "--lr", 1e-3,
            "--valid-size", 0.2, "--device", "cpu", "--seed", 5, "--quiet",
            # validation ROUGE-L: one chunk of prompts, so rank 1 decodes a lockstep copy in step with rank 0
            "--select-by", "rougeL", "--eval-every", 1]
    one_vs_two_fsdp(args, tmp_path / "one", tmp_path / "two", tmp_path / "two.log", "sft")
    scores = [[json.loads(l)["valid_rougeL"] for l in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (tmp_path / "one", tmp_path / "two")]
    assert scores[0] == scores[1] and len(scores[0]) == 3


def test_fsdp_validation_rouge_over_several_chunks_of_unequal_budgets(tmp_path, tiny_dir, dolly_like):
    """sft's validation ROUGE-L samples each chunk for its longest budget (min(256, --max-length -
    prompt)); under FSDP every process must decode as many steps, or the collectives of one
    process's forwards meet another's decode-stop vote (gloo: a size mismatch, an abort)."""
    from conftest import write_jsonl

    valid = write_jsonl(tmp_path / "valid.jsonl", [
        {"instruction": f"Name fruit {i}" + " please" * (i % 5), "response": f"Fruit {i}."} for i in range(24)])
    # 24 prompts of 62..83 tokens: 2 chunks of 16 rows whose longest budgets differ (78 vs 98)
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--valid-data", valid, "--steps", 2,
            "--batch-size", 2, "--limit", 24, "--max-length", 160, "--max-prompt-length", 128, "--lr", 1e-3,
            "--device", "cpu", "--seed", 5, "--quiet", "--select-by", "rougeL", "--eval-every", 1]
    one_vs_two_fsdp(args, tmp_path / "one", tmp_path / "two", tmp_path / "two.log", "sft")
    scores = [[json.loads(l)["valid_rougeL"] for l in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (tmp_path / "one", tmp_path / "two")]
    assert scores[0] == scores[1] and len(scores[0]) == 2


def test_fsdp_rejects_lora_and_teacher_device(tmp_path, tiny_dir, dolly_like):
    res = runner.invoke(app, ["sft", "--model", str(tiny_dir / "student"), "--data", str(dolly_like), "--fsdp",
                              "--lora-r", "4", "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert res.exit_code == 2 and "--fsdp with --lora-r" in res.output
    res = runner.invoke(app, [str(a) for a in [*distill_args(tiny_dir, dolly_like), "--fsdp", "--teacher-device",
                                                "cpu", "--out", tmp_path / "y"]])
    assert res.exit_code == 2 and "--fsdp with --teacher-device" in res.output


def test_blocks_are_found_generically():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from minillm_cli.engine.fsdp import blocks_of

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert blocks_of(gpt2) is gpt2.transformer.h
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    assert blocks_of(llama) is llama.model.layers


def test_runs_share_one_process_group_and_leave_it_at_exit(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """A process exiting with a live gloo group can abort at exit (SIGABRT: seen in CI as a
    finished 2-process run reported failed). Runs in one process share the group init_runtime
    created (re-creating one against a launcher's store was flaky); the process leaves it at exit."""
    import torch.distributed as dist

    from minillm_cli.engine import runtime

    created = []
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: created.append(1) or real_init(*a, **k))
    assert not dist.is_initialized()
    try:
        res = runner.invoke(app, ["sft", "--model", str(tiny_dir / "student"), "--data", str(dolly_like), "--fsdp",
                                  "--steps", "1", "--batch-size", "2", "--limit", "8", "--valid-size", "0.25",
                                  "--device", "cpu", "--quiet", "--out", str(tmp_path / "sft")])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, [str(a) for a in [*distill_args(tiny_dir, dolly_like), "--fsdp", "--steps", 1,
                                                    "--out", tmp_path / "distill"]])
        assert res.exit_code == 0, res.output
        assert dist.is_initialized() and len(created) == 1
        assert runtime._last_run_clean
    finally:
        runtime._leave_at_exit()  # what the exit hook runs
    assert not dist.is_initialized()


EXIT_PROBE = """
import sys, torch.distributed as dist
from minillm_cli.engine import runtime
real = dist.destroy_process_group
dist.destroy_process_group = lambda *a, **k: (print("destroyed", flush=True), real(*a, **k))
mode = sys.argv[1]
if mode.startswith("nccl"):  # what the exit hook sees of an NCCL group (the group itself is gloo)
    dist.get_backend = lambda *a, **k: "nccl"

@runtime.run_entry
def run(fail):
    runtime.init_runtime("cpu", fsdp=True)
    if fail:
        raise RuntimeError("boom")

if mode == "own":  # the caller's own group is left alone
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    run(mode.endswith("fail"))
except RuntimeError:
    pass
if mode == "replaced":  # ours destroyed by the caller, who then makes its own: not ours to destroy
    real()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
print("end of script", flush=True)
"""


@pytest.mark.parametrize("mode,destroyed", [("ok", True), ("fail", True), ("nccl_ok", True), ("nccl_fail", False),
                                            ("own", False), ("replaced", False)])
def test_the_process_group_is_left_at_exit(mode, destroyed):
    """The exit hook destroys the group init_runtime created (after a run that returned, and, for
    gloo, after one that raised; an NCCL group is left alone then: its destroy flushes collectives
    a failing rank's peers may never join), and never a group the caller created, even one that
    replaced ours."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, mode], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert ("destroyed" in lines) == destroyed, out.stdout
    if destroyed:
        assert out.stdout.index("end of script") < out.stdout.index("destroyed")  # at exit, not before


def test_fsdp_with_gradient_checkpointing_equals_plain_one_process(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """Checkpointed blocks under FSDP2: the wrapper survives sharding (counted in-process, FSDP at
    world size 1), the recompute in the backward finds its weights gathered (FSDP's hooks stay
    outside the checkpoint), and 2 sharded processes give the plain run's student."""
    import torch.distributed as dist

    import minillm_cli.engine.recompute as recompute
    from minillm_cli.engine import runtime

    args = distill_args(tiny_dir, dolly_like)
    args[args.index("--steps") + 1] = 2
    ref = tmp_path / "ref"
    res = runner.invoke(app, [str(a) for a in [*args, "--out", ref]])
    assert res.exit_code == 0, res.output
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert not dist.is_initialized()
    try:
        one = tmp_path / "one"
        res = runner.invoke(app, [str(a) for a in [*args, "--fsdp", "--gradient-checkpointing", "--out", one]])
        assert res.exit_code == 0, res.output
    finally:
        runtime._leave_at_exit()  # what the exit hook runs
    assert calls and max_diff(ref, one) <= 1e-5
    two = tmp_path / "two"
    run(torchrun(2, *args, "--fsdp", "--gradient-checkpointing", "--out", two), tmp_path / "two.log")
    assert max_diff(ref, two) <= 1e-5
