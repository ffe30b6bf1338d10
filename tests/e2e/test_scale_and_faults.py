"""Processes and faults, end to end on tiny local models (CPU, gloo).

- 1 and 2 processes give the same student (distill and sft; the sft model has dropout on);
  only rank 0 writes files and logs.
- SIGTERM reaching one process of two: all stop after the same step, checkpoint, exit 1 with a
  resume hint; resuming with 1 process ends where an uninterrupted run ends.
- SIGINT (a real signal, in-process): same, with no --save-every (the signal writes the checkpoint);
  SIGTERM in sft (dropout on) likewise resumes to the uninterrupted weights.
- SIGKILL at seeded random moments, one of them while a checkpoint is being written: each time
  `--resume`; the final weights equal the uninterrupted run's and metrics.jsonl has each step once.
- A full disk while checkpointing: exit 1, one clear line, the previous checkpoint intact.
- A NaN in the loss: exit 1 naming the step and the term, the last good checkpoint kept.
- A teacher on another device goes through `TeacherOnDevice` and changes nothing.

Two-process runs use `torchrun` (subprocess); 1-process runs go through CliRunner in-process
(same arithmetic, no interpreter start-up) except where a process has to be killed.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minillm_cli.cli.app import app
from procs import files, finish, max_diff, spawn, tail, torchrun
from minillm_cli.engine import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc: Linux only")

runner = CliRunner()
STEPS = 8


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def distill_args(tiny_dir, data, steps=STEPS):
    # 4 rollout micro-batches and 2 update micro-batches per step: both ranks work in both phases.
    return ["distill", "--teacher", tiny_dir / "teacher", "--student", tiny_dir / "student", "--data", data,
            "--batch-size", 4, "--grad-accum", 2, "--num-rollouts", 8, "--rollout-batch-size", 2,
            "--max-new-tokens", 10, "--limit", 24, "--eval-prompts", 2, "--warmup-steps", 1, "--lr", 1e-3,
            "--device", "cpu", "--seed", 3, "--steps", steps]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def wait_until(cond, p: subprocess.Popen, timeout: float = 120, every: float = 0.01) -> bool:
    """Poll `cond` until it holds (True) or `p` exits (False)."""
    t0 = time.monotonic()
    while not cond():
        if p.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            finish(p, 0)
        time.sleep(every)
    return True


def ckpt_step(out: Path) -> int:
    last = ckpt.latest_checkpoint(out)
    return int(last.name.split("-")[1]) if last else 0


def partial_checkpoints(out: Path) -> list[str]:
    root = Path(out) / "checkpoints"
    return [p.name for p in root.glob(".step-*.tmp-*")] if root.is_dir() else []


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (children of `launcher`, RANK from their env)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir, dolly_like) -> Path:
    """The uninterrupted 1-process distill run every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    assert steps_logged(out) == list(range(1, STEPS + 1))
    return out


# ---------------------------------------------------------------------------------------------
# 1 vs 2 processes
# ---------------------------------------------------------------------------------------------
def test_distill_two_processes_equal_one(tmp_path, tiny_dir, dolly_like, reference):
    out = tmp_path / "two"
    log = tmp_path / "two.log"
    # Not --quiet: rank 0 alone must log.
    rc = finish(spawn(torchrun(2, *distill_args(tiny_dir, dolly_like), "--out", out), log))
    text = log.read_text()
    assert rc == 0, tail(text)
    d = max_diff(reference, out)
    assert d <= 1e-5, f"1 vs 2 processes differ by {d}"
    assert text.count("distill (minillm): ") == 1 and "2 process(es)" in text, tail(text)
    assert "warning" not in text  # --grad-accum 2 keeps both processes busy
    # Rank 0 alone writes: the same files as the 1-process run, each metrics row once.
    assert files(out) == files(reference)
    assert steps_logged(out) == list(range(1, STEPS + 1))
    # The step statistics are summed over the processes (one collective) into the 1-process values.
    rows = {}
    for run in (reference, out):
        rows[run] = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    for one, two in zip(rows[reference], rows[out]):
        for key in ("single_step", "pg", "clip_frac", "ratio_mean", "w_mean", "w_max", "reward_mean",
                    "reverse_kl"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, tiny_dir) -> Path:
    """A tiny GPT-2 with dropout 0.1 everywhere (the tiny_dir models have none)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "student"))
    torch.manual_seed(4)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    out = tmp_path_factory.mktemp("dropout") / "model"
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def sft_args(model, data, steps=3):
    # 4 micro-batches per step: 2 on each of 2 ranks, each with its own dropout seed.
    return ["sft", "--model", model, "--data", data, "--steps", steps, "--batch-size", 4,
            "--grad-accum", 4, "--limit", 24, "--max-length", 160, "--max-prompt-length", 128, "--lr", 1e-3,
            "--valid-size", 0.2, "--device", "cpu", "--seed", 5, "--quiet"]


def test_sft_with_dropout_two_processes_equal_one(tmp_path, dropout_model, dolly_like):
    # validation ROUGE-L on each step: its prompts are shared out over the processes
    args = [*sft_args(dropout_model, dolly_like), "--select-by", "rougeL", "--eval-every", 1]
    one, two = tmp_path / "one", tmp_path / "two"
    res = invoke(*args, "--out", one)
    assert res.exit_code == 0, res.output
    rc = finish(spawn(torchrun(2, *args, "--out", two), tmp_path / "two.log"))
    assert rc == 0, tail(tmp_path / "two.log")
    d = max_diff(one, two)
    assert d <= 1e-5, f"sft: 1 vs 2 processes differ by {d}"
    assert files(one) == files(two)
    assert steps_logged(two) == [1, 2, 3]
    scores = {run: [json.loads(l)["valid_rougeL"] for l in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (one, two)}
    assert scores[one] == scores[two]  # gathered per prompt and averaged in one order: exactly equal
    assert json.loads((two / "summary.json").read_text())["best_step"] == \
        json.loads((one / "summary.json").read_text())["best_step"]
    cfg = json.loads((two / "config.json").read_text())  # dropout really was on
    assert cfg["resid_pdrop"] == 0.1


def _on_main_worker(rank: int, init: str, outcome: str) -> None:
    """One of two gloo processes: rank 0's result and rank 0's refusal reach both ranks."""
    import torch.distributed as dist

    from minillm_cli.engine.runtime import Runtime
    from minillm_cli.errors import InputError

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=2)
    ran, got = [], []

    def refuse():
        ran.append("refuse")
        raise InputError("--out x: refused")

    for fn in (lambda: ran.append("value") or ["from rank", rt.rank], refuse):
        try:
            got.append(rt.on_main(fn))
        except InputError as e:
            got.append(f"InputError: {e}")
    got.append(rt.sum_scalar(1))  # still in step: the next collective has both ranks
    Path(f"{outcome}.{rank}").write_text(json.dumps({"ran": ran, "got": got}))
    dist.destroy_process_group()


def test_a_refusal_on_rank_zero_stops_every_rank(tmp_path, dropout_model, dolly_like):
    import torch.multiprocessing as mp

    mp.spawn(_on_main_worker, args=(str(tmp_path / "init"), str(tmp_path / "outcome")), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"outcome.{r}").read_text()) for r in (0, 1))
    assert rank0["ran"] == ["value", "refuse"] and rank1["ran"] == []  # rank 0 alone runs it
    assert rank0["got"] == rank1["got"] == [["from rank", 0], "InputError: --out x: refused", 2.0]
    # End to end: sft into a non-empty --out under torchrun. Rank 0 refuses (exit 2, one line);
    # rank 1 learns it rather than failing in the next collective with its own confusing error.
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    log = tmp_path / "refused.log"
    rc = finish(spawn(torchrun(2, *sft_args(dropout_model, dolly_like), "--out", out), log))
    text = tail(log)
    assert rc != 0, text
    errors = [l for l in text.splitlines() if l.startswith("error")]
    assert errors == [f"error: --out {out}: folder exists and is not empty; pass --overwrite to replace it "
                      f"or --resume to continue it"], text
    assert "exitcode  : 2" in log.read_text() and "exitcode  : 1" not in log.read_text()
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _together_worker(rank: int, init: str, outcome: str) -> None:
    """One of two gloo processes: a data error rank 1 alone meets reaches both ranks."""
    import torch.distributed as dist

    from minillm_cli.engine.runtime import Runtime
    from minillm_cli.errors import InputError

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    rt = Runtime(torch.device("cpu"), rank=rank, world_size=2)

    def read():
        if rank == 1:  # (its own copy of the data, on another node)
            raise InputError("data.jsonl:7: not JSON")
        return "examples"

    got = []
    try:
        got.append(rt.together(read))
    except InputError as e:
        got.append(f"InputError: {e} (everywhere: {e.everywhere})")
    got.append(rt.together(lambda: rank))  # no error: each keeps its own result
    Path(f"{outcome}.{rank}").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_a_data_error_on_one_rank_stops_every_rank_with_its_line(tmp_path):
    """Every process reads the data; an error only one of them meets was said by none (an
    InputError is taken to be everyone's, so rank 1 kept quiet, and rank 0 was killed by the
    launcher): no line at all. Now every rank raises it and rank 0 says it (exit 2)."""
    import torch.multiprocessing as mp

    mp.spawn(_together_worker, args=(str(tmp_path / "init"), str(tmp_path / "outcome")), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"outcome.{r}").read_text()) for r in (0, 1))
    assert rank0[0] == rank1[0] == "InputError: data.jsonl:7: not JSON (everywhere: True)"
    assert (rank0[1], rank1[1]) == (0, 1)


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------
def test_sigterm_to_one_rank_stops_both_then_resume_with_one_process(tmp_path, tiny_dir, dolly_like, reference):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    p = spawn(torchrun(2, *distill_args(tiny_dir, dolly_like), "--quiet", "--out", out), log)
    # After rank 0 logged step 1, SIGTERM rank 1 only: rank 0 never sees the signal itself.
    assert wait_until(lambda: (out / "metrics.jsonl").is_file() and steps_logged(out), p), tail(log)
    ranks = worker_pids(p.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)
    rc = finish(p, timeout=120)  # a rank waiting alone in a collective would hang here
    text = log.read_text()
    assert rc != 0, tail(text)
    stopped = re.findall(r"stopped by SIGTERM after step (\d+); checkpoint saved, continue with the same command "
                         r"plus --resume", text)
    assert stopped, tail(text)
    k = int(stopped[0])
    assert len(stopped) == 1, tail(text)  # the ranks agreed on the step, and rank 0 alone says so
    assert 1 <= k < STEPS and ckpt_step(out) == k
    assert steps_logged(out) == list(range(1, k + 1))
    # Resume with a different number of processes (1).
    res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    d = max_diff(reference, out)
    assert d <= 1e-5, f"2 processes then 1 differ from 1 process by {d}"
    assert steps_logged(out) == list(range(1, STEPS + 1))


def test_sigint_finishes_the_step_checkpoints_and_resumes(tmp_path, tiny_dir, dolly_like, reference, monkeypatch):
    from minillm_cli.engine.distill import MiniLLMRun

    real = MiniLLMRun.step_optimizer

    def step_then_interrupt(self, step):
        norm = real(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, mid-step, caught by the loop's handler
        return norm

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where pytest runs as a background job)
    with monkeypatch.context() as m:
        m.setattr(MiniLLMRun, "step_optimizer", step_then_interrupt)
        res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--out", out)  # no --save-every
    assert res.exit_code == 1, res.output
    assert "stopped by SIGINT after step 3; checkpoint saved, continue with the same command plus --resume" \
        in res.output
    assert ckpt_step(out) == 3 and not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert max_diff(reference, out) <= 1e-6
    assert steps_logged(out) == list(range(1, STEPS + 1))


KILL_STEPS = 24


def test_sft_sigterm_checkpoints_and_resumes_with_dropout(tmp_path, dropout_model, dolly_like, monkeypatch):
    import minillm_cli.engine.sft as sft

    args = sft_args(dropout_model, dolly_like, steps=4)
    full, part = tmp_path / "full", tmp_path / "part"
    assert invoke(*args, "--out", full).exit_code == 0
    real = sft.clip_and_step

    def step_then_terminate(*a, step, **kw):
        norm = real(*a, step=step, **kw)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return norm

    with monkeypatch.context() as m:
        m.setattr(sft, "clip_and_step", step_then_terminate)
        res = invoke(*args, "--out", part)
    assert res.exit_code == 1, res.output
    assert "stopped by SIGTERM after step 2; checkpoint saved" in res.output and "--resume" in res.output
    assert ckpt_step(part) == 2
    res = invoke(*args, "--out", part, "--resume")
    assert res.exit_code == 0, res.output
    assert max_diff(full, part) <= 1e-6
    assert steps_logged(part) == [1, 2, 3, 4]


def test_sigkill_at_random_moments_resumes_to_the_same_weights(tmp_path, tiny_dir, dolly_like):
    """SIGKILL at seeded random moments: after a random checkpoint plus a random delay, while a
    checkpoint is being written, and at a random time after start (loading or early training);
    `--resume` after each; the end equals an uninterrupted run."""
    base = [*distill_args(tiny_dir, dolly_like, steps=KILL_STEPS), "--quiet", "--save-every", 1]
    ref = tmp_path / "ref"
    res = invoke(*base, "--out", ref)
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    args = [*base, "--out", out]
    rng = random.Random(20240607)
    t1, t2 = sorted(rng.sample(range(1, KILL_STEPS - 6), 2))
    plan = [("after-checkpoint", t1), ("mid-checkpoint", t2), ("after-start", None)]
    killed, torn = [], set()
    for i, (how, target) in enumerate(plan):
        cmd = [sys.executable, "-m", "minillm_cli", *args, *(["--resume"] if ckpt_step(out) else [])]
        p = spawn(cmd, tmp_path / f"launch{i}.log")
        if how == "after-start":
            time.sleep(rng.uniform(0.5, 4.0))
        elif not wait_until(lambda: ckpt_step(out) >= target, p):
            break
        elif how == "mid-checkpoint":
            if not wait_until(lambda: partial_checkpoints(out), p, every=0.0005):
                break
        else:
            time.sleep(rng.uniform(0.0, 0.2))
        if p.poll() is not None:
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed.append((how, ckpt_step(out)))
        torn.update(partial_checkpoints(out))  # a write cut short (seen in practice after mid-checkpoint)
    assert len(killed) == len(plan), f"the run ended before it could be killed: {killed}"
    log = tmp_path / "final.log"
    rc = finish(spawn([sys.executable, "-m", "minillm_cli", *args, "--resume"], log))
    assert rc == 0, tail(log)
    d = max_diff(ref, out)
    assert d <= 1e-6, f"killed at {killed} (partial checkpoints left: {torn}); final weights differ by {d}"
    assert steps_logged(out) == list(range(1, KILL_STEPS + 1))  # rows of steps redone after a kill: once
    assert not partial_checkpoints(out)  # leftovers of killed writes are cleaned


# ---------------------------------------------------------------------------------------------
# Full disk, NaN
# ---------------------------------------------------------------------------------------------
def test_full_disk_while_checkpointing(tmp_path, tiny_dir, dolly_like, reference, monkeypatch):
    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 3:
            f.write(b"\0" * 1024)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    out = tmp_path / "run"
    args = [*distill_args(tiny_dir, dolly_like), "--quiet", "--save-every", 1, "--out", out]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_full)
        res = invoke(*args)
    assert res.exit_code == 1, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full while writing checkpoint at step 3"), res.output
    assert "previous checkpoint intact: step-00000002" in lines[0] and "Traceback" not in res.output
    last = ckpt.latest_checkpoint(out)
    assert last is not None and last.name == "step-00000002"
    assert not partial_checkpoints(out) and not (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    from minillm_cli.engine.train_utils import make_optimizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "student"))
    state = ckpt.load_checkpoint(last, model=model, optimizer=make_optimizer(model, 1e-3, 0.0), scheduler=None)
    assert state["step"] == 2
    # Space freed: the run continues from step 2 and ends where the uninterrupted one ends.
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert max_diff(reference, out) <= 1e-6


def test_nan_loss_stops_naming_step_and_term(tmp_path, tiny_dir, dolly_like, monkeypatch):
    import minillm_cli.engine.distill as distill

    real, calls = distill.minillm_loss, [0]
    per_step = 2  # --grad-accum 2 in one process: two micro-batch losses per step

    def nan_at_step_3(*a, **kw):
        loss, st = real(*a, **kw)
        calls[0] += 1
        if (calls[0] - 1) // per_step + 1 == 3:
            return loss * float("nan"), {**st, "pg": st["pg"] * float("nan")}
        return loss, st

    out = tmp_path / "run"
    monkeypatch.setattr(distill, "minillm_loss", nan_at_step_3)
    res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--save-every", 1, "--out", out)
    assert res.exit_code == 1, res.output
    assert "non-finite pg loss (nan) at step 3" in res.output and "Traceback" not in res.output
    assert ckpt_step(out) == 2  # not overwritten by the NaN step
    payload = torch.load(ckpt.latest_checkpoint(out) / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    assert steps_logged(out) == [1, 2]
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Teacher on another device; small pieces
# ---------------------------------------------------------------------------------------------
def test_teacher_on_another_device_changes_nothing(tmp_path, tiny_dir, dolly_like, reference, monkeypatch):
    """`--teacher-device` different from the student's wraps the teacher in TeacherOnDevice
    (inputs moved there, logits moved back). On a CPU-only machine "another device" is cpu:0,
    which torch treats as distinct from cpu: the wrapper's whole path runs."""
    import minillm_cli.engine.teacher as teacher

    made = []
    real_init = teacher.TeacherOnDevice.__init__

    def spy(self, model, home):
        made.append(home)
        real_init(self, model, home)

    monkeypatch.setattr(teacher, "resolve_device", lambda name, local_rank=0, flag="--device": torch.device("cpu", 0))
    monkeypatch.setattr(teacher.TeacherOnDevice, "__init__", spy)
    out = tmp_path / "run"
    res = invoke(*distill_args(tiny_dir, dolly_like), "--quiet", "--teacher-device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    assert made == [torch.device("cpu")]
    assert max_diff(reference, out) <= 1e-6


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    ckpt.truncate_metrics(path, 2)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_scaling_warnings(monkeypatch):
    from minillm_cli.engine.runtime import scaling_warnings

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert scaling_warnings(1, 1) == [] and scaling_warnings(2, 2) == [] and scaling_warnings(2, 4) == []
    (w,) = scaling_warnings(4, 2)
    assert "2 process(es) idle" in w and "--grad-accum" in w
    (w,) = scaling_warnings(4, 2, fsdp=True)
    assert "discarded micro-batch (FSDP lockstep)" in w
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP is implemented: no warning about it
    assert scaling_warnings(1, 1) == []
