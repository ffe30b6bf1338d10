"""`minillm sft` end to end on a tiny local model, and the CLI contract (help, exit codes, bad input)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from minillm_cli.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_is_fast_and_lists_commands():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "minillm_cli", "--help"], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0
    for cmd in ("sft", "distill"):
        assert cmd in out.stdout
    assert elapsed < 3.0  # interpreter start included; the contract's < 1 s is for the command itself
    probe = subprocess.run([sys.executable, "-c", "import sys, minillm_cli.cli.app; "
                            "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.split() == ["False", "False"]


def test_version():
    from minillm_cli import __version__

    for args in (["--version"], ["--version", "sft"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        assert res.output.strip() == __version__


def test_every_command_help():
    from minillm_cli.cli.app import COMMANDS

    for _, name in COMMANDS:
        res = invoke(name, "--help")
        assert res.exit_code == 0, (name, res.output)
        assert "--quiet" in res.output or name == "compare"


def test_sft_end_to_end(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "run"
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 6,
                 "--batch-size", 4, "--lr", 1e-3, "--eval-every", 3, "--quiet", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["best_valid_loss"] is not None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id != tok.eos_token_id
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # the rate each step trained with (cosine from the peak, no warm-up)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert rows[2]["valid_loss"] is not None and rows[5]["valid_loss"] is not None
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["command"] == "sft" and "torch" in cfg["versions"] and cfg["config"]["optim"]["lr"] == 1e-3
    assert cfg["resolved"] == {"device": "cpu", "dtype": "float32", "autocast": "None",
                               "end_of_answer": 0}  # what "auto" became; EOS ends answers


def test_sft_lowers_validation_loss(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "run"
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 30,
                 "--batch-size", 8, "--lr", 3e-3, "--eval-every", 10, "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    vl = [json.loads(l)["valid_loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
          if json.loads(l).get("valid_loss") is not None]
    assert len(vl) == 3 and vl[-1] < vl[0] - 0.5


def test_sft_lora_saves_merged(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "lora"
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 2,
                 "--batch-size", 4, "--lora-r", 8, "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def _bad(tmp_path, tiny_dir, dolly_like):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{broken\n')
    fields = write_jsonl(tmp_path / "fields.jsonl", [{"question": "a", "answer_text": "b"}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "response": "x"}] * 3)
    listed = write_jsonl(tmp_path / "listed.jsonl", [{"instruction": ["a", "b"], "response": "x"}])
    m = tiny_dir / "student"
    return [
        (["--model", m, "--data", tmp_path / "missing.jsonl"], "no such file"),
        (["--model", m, "--data", bad], "bad.jsonl:2"),
        (["--model", m, "--data", fields], "found fields: answer_text, question"),
        (["--model", m, "--data", listed], "listed.jsonl:1: field 'instruction' is a list"),
        (["--model", m, "--data", dolly_like, "--input-field", "contxt"], "--input-field contxt not found in any"),
        (["--model", m, "--data", long, "--valid-size", 0], "no training example left"),
        (["--model", "no-such-org/no-such-model", "--data", dolly_like], "Hub is unreachable"),
        (["--model", m, "--data", dolly_like, "--lr", -1], "--lr must be > 0"),
        (["--model", m, "--data", dolly_like, "--batch-size", 0], "--batch-size must be > 0"),
        (["--model", m, "--data", dolly_like, "--dtype", "float16"], "AdamW cannot update float16 weights"),
        (["--model", m, "--data", dolly_like, "--lora-r", 2, "--lora-alpha", 0], "--lora-alpha must be a finite"),
        # (LoRA settings without --lora-r: a full fine-tuning, not the LoRA run they describe)
        (["--model", m, "--data", dolly_like, "--lora-targets", "c_attn"], "--lora-targets without --lora-r"),
        (["--model", m, "--data", dolly_like, "--lora-alpha", 32, "--lora-dropout", 0],
         "--lora-alpha, --lora-dropout without --lora-r"),
        (["--model", m, "--data", dolly_like, "--select-by", "reverse-kl"], "sft selects by last, loss or rougeL"),
        (["--model", m, "--data", dolly_like, "--select-by", "rougeL", "--valid-size", 0],
         "--select-by rougeL needs validation data"),
        (["--model", m, "--data", dolly_like, "--select-by", "loss", "--valid-size", 0],
         "--select-by loss needs validation data"),
    ]


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_dir, dolly_like):
    for args, needle in _bad(tmp_path, tiny_dir, dolly_like):
        res = invoke("sft", *args, "--out", tmp_path / "o", "--steps", 1)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output, (needle, res.output)
        assert "Traceback" not in res.output
        assert len([l for l in res.stderr.splitlines() if l.startswith("error:")]) == 1


def test_out_that_cannot_be_created_and_adapter_of_another_model(tmp_path, tiny_dir, dolly_like):
    (tmp_path / "file.txt").write_text("x")
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", tmp_path / "file.txt" / "run",
                 "--steps", 1)
    assert res.exit_code == 2 and "cannot create the folder" in res.output, res.output
    adapter = tmp_path / "adapter"
    assert invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", adapter, "--steps", 1,
                  "--lora-r", 2, "--save-adapter", "--quiet").exit_code == 0
    res = invoke("distill", "--method", "kd", "--teacher", tiny_dir / "teacher", "--teacher-peft", adapter,
                 "--student", tiny_dir / "student", "--data", dolly_like, "--out", tmp_path / "kd", "--steps", 1)
    assert res.exit_code == 2, res.output  # the student's adapter on the (wider) teacher
    assert f"--teacher-peft {adapter}: cannot load the adapter on teacher" in res.output
    assert "size mismatch" in res.output and "Traceback" not in res.output


def test_existing_out_refused_and_user_files_untouched(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 1)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--steps", 1, "--overwrite")
    assert res.exit_code == 2 and "not a minillm run folder" in res.output
    assert (out / "precious.txt").read_text() == "keep"


def test_overwrite_refuses_a_run_folder_that_holds_an_input(tmp_path, tiny_dir, dolly_like):
    """Training again in place (`--model run --out run --overwrite`) would clear the model before
    loading it: refused, and the folder is kept whole; the same for data kept in the run folder
    and for distill's student."""
    run = tmp_path / "run"
    common = ["--data", dolly_like, "--steps", 1, "--batch-size", 4, "--quiet"]
    assert invoke("sft", "--model", tiny_dir / "student", *common, "--out", run).exit_code == 0
    before = sorted(p.name for p in run.iterdir())
    res = invoke("sft", "--model", run, *common, "--out", run, "--overwrite")
    assert res.exit_code == 2 and f"--out {run}: holds --model {run}, which --overwrite would delete" in res.output
    kept = write_jsonl(run / "mine.jsonl", [{"instruction": "a", "response": "b"}] * 8)
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--valid-data", kept, "--steps", 1,
                 "--batch-size", 4, "--out", run, "--overwrite")
    assert res.exit_code == 2 and f"holds --valid-data {kept}" in res.output, res.output
    res = invoke("distill", "--method", "kd", "--teacher", tiny_dir / "teacher", "--student", run, *common,
                 "--out", run, "--overwrite")
    assert res.exit_code == 2 and f"holds --student {run}" in res.output, res.output
    adapter = tmp_path / "adapter"  # an adapter whose base model is the run
    assert invoke("sft", "--model", run, *common, "--out", adapter, "--lora-r", 2, "--save-adapter").exit_code == 0
    res = invoke("sft", "--model", adapter, *common, "--out", run, "--overwrite")
    assert res.exit_code == 2 and f"holds --model's base model {run}" in res.output, res.output
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "mine.jsonl"])
    res = invoke("sft", "--model", tiny_dir / "student", *common, "--out", run, "--overwrite")
    assert res.exit_code == 0 and not kept.exists()  # no input inside: the run is replaced, as before


def test_a_saved_adapter_names_its_base_by_absolute_path(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """peft records the base as the user named it; a relative folder is made absolute, so the
    adapter loads from any working directory (not as a Hub id)."""
    from minillm_cli.models import adapter_base

    monkeypatch.chdir(tiny_dir)
    out = tmp_path / "adapter"
    res = invoke("sft", "--model", "student", "--data", dolly_like, "--out", out, "--steps", 1, "--batch-size", 4,
                 "--lora-r", 2, "--save-adapter", "--quiet")
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    assert adapter_base(str(out)) == str((tiny_dir / "student").resolve())
    res = invoke("evaluate", "--model", out, "--data", dolly_like, "--metric", "lm-loss", "--limit", 2, "--quiet")
    assert res.exit_code == 0, res.output


def test_an_adapter_over_a_grown_vocabulary_loads_with_peft(tmp_path, dolly_like):
    """A tokenizer without a pad token (GPT-2's) gains ours, so the saved adapter carries the grown
    embeddings: the run says how to load it, peft's warning stays off stderr, and
    AutoPeftModelForCausalLM loads the same model minillm does."""
    import torch
    from peft import AutoPeftModelForCausalLM

    from conftest import CORPUS
    from minillm_cli.models import load_model, load_tokenizer
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, tmp_path / "nopad", vocab_size=300, pad=False)
    make_gpt2(tok, tmp_path / "nopad", n_layer=1, n_embd=32, n_head=2, seed=3)
    out = tmp_path / "adapter"
    with warnings.catch_warnings(record=True) as caught:  # (peft's would reach the user's stderr)
        warnings.simplefilter("always")
        res = invoke("sft", "--model", tmp_path / "nopad", "--data", dolly_like, "--out", out, "--steps", 2,
                     "--batch-size", 4, "--lr", 1e-2, "--lora-r", 2, "--save-adapter")
    assert res.exit_code == 0, res.output
    assert "load the saved adapter with peft's AutoPeftModelForCausalLM" in res.output
    assert not [w for w in caught if "save_embedding_layers" in str(w.message)]
    ids = torch.tensor([[5, 17, 42, 7]])
    mine = load_model(str(out), tokenizer=load_tokenizer(str(out)), device=torch.device("cpu"), trainable=False)
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert theirs.get_input_embeddings().weight.shape[0] == len(tok) + 1
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, mine(ids).logits)
    merged = tmp_path / "merged"  # no note where the folder is an ordinary model
    res = invoke("sft", "--model", tmp_path / "nopad", "--data", dolly_like, "--out", merged, "--steps", 1,
                 "--batch-size", 4, "--lora-r", 2)
    assert res.exit_code == 0 and "AutoPeftModelForCausalLM" not in res.output, res.output


def test_bfloat16_trained_weights_are_warned_about(tmp_path, tiny_dir, dolly_like):
    """AdamW in bfloat16 rounds most small updates away: a warning --quiet keeps; LoRA (float32
    adapters on the bfloat16 base) and auto say nothing."""
    base = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--steps", 1, "--batch-size", 4, "--quiet"]
    res = invoke(*base, "--dtype", "bfloat16", "--out", tmp_path / "bf16")
    assert res.exit_code == 0, res.output
    assert "warning: the trained weights are bfloat16" in res.stderr, res.stderr
    for extra in (["--dtype", "bfloat16", "--lora-r", 2], []):
        res = invoke(*base, *extra, "--out", tmp_path / f"r{len(extra)}")
        assert res.exit_code == 0 and "warning" not in res.stderr, res.stderr


def test_exit_code_subprocess(tmp_path, tiny_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "minillm_cli", "sft", "--model", str(tiny_dir / "student"),
                          "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,line", [
    (["sft", "--model", "m"], "error: Missing option '--data'. (see 'python -m minillm_cli sft --help')"),
    (["evaluate", "--model", "m", "--data", "d", "--seeds", "abc"], "error: Invalid value for '--seeds': "),
    (["nosuch"], "error: No such command 'nosuch'. (see 'python -m minillm_cli --help')"),
])
def test_usage_errors_are_one_line_exit_2(args, line):
    """Click's usage errors through the console script: one stderr line (its own block is four)."""
    out = subprocess.run([sys.executable, "-m", "minillm_cli", *args], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(line), out.stderr
    bare = subprocess.run([sys.executable, "-m", "minillm_cli", args[0]], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if args[0] == "sft":  # a bare command still shows its help
        assert bare.returncode == 2 and "Usage:" in bare.stdout + bare.stderr and "--data" in bare.stdout + bare.stderr


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, tiny_dir):
    """--debug is for diagnostics: scripts that switch it on still read 2 for bad input."""
    res = invoke("sft", "--model", tiny_dir / "student", "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o",
                 "--debug")
    assert res.exit_code == 2, res.output
    assert "Traceback" in res.stderr and res.stderr.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_signal_outside_a_training_loop_exits_1_with_one_line(capsys, stop):
    """evaluate, pretrain-mix and compare (and sft / distill before their loop) stopped by a
    signal: exit 1 with one line, as the README has it, and SIGTERM's handler put back."""
    import signal

    import typer

    from minillm_cli.cli.common import run_command

    before = signal.getsignal(signal.SIGTERM)

    def body():
        if stop == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not stop the command")

    with pytest.raises(typer.Exit) as e:
        run_command(body, debug=False)
    assert e.value.exit_code == 1
    assert capsys.readouterr().err == f"error: stopped by {stop} before the command finished\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_under_torchrun_sigterm_keeps_its_default_action(monkeypatch):
    """A rank may wait in a collective (C code, where no Python handler runs): torchrun's SIGTERM
    must end it at once, so with several processes the CLI installs no handler."""
    import signal

    from minillm_cli.cli.common import run_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    run_command(lambda: seen.append(signal.getsignal(signal.SIGTERM)), debug=False)
    assert seen == [signal.getsignal(signal.SIGTERM)] and seen[0] == signal.SIG_DFL


def test_a_training_loops_second_sigterm_is_the_default_one():
    """sft / distill finish their step on the first signal; a second SIGTERM must kill a run stuck
    in C (the CLI's outer handler only raises an exception), so the loop's handler restores the
    default one, not the CLI's."""
    import signal

    from minillm_cli.engine.train_utils import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM" and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is before


def test_sft_refuses_data_without_responses(tmp_path, tiny_dir):
    vicuna = write_jsonl(tmp_path / "v.jsonl", [{"question_id": i, "turns": [f"Question {i}?"]} for i in range(10)])
    res = invoke("sft", "--model", tiny_dir / "student", "--data", vicuna, "--out", tmp_path / "o", "--steps", 1)
    assert res.exit_code == 2 and "have no reference response" in res.output and "--response-field" in res.output
    # one empty answer: the message says where it is
    rows = [{"instruction": f"Q{i}", "context": "", "response": "" if i == 7 else f"A{i}"} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    res = invoke("sft", "--model", tiny_dir / "student", "--data", data, "--out", tmp_path / "p", "--steps", 1,
                 "--valid-size", 0)
    assert res.exit_code == 2 and f"the first: {data}:8" in res.output, res.output
    # validation data without answers (Vicuna) would rank checkpoints by the EOS token alone
    good = write_jsonl(tmp_path / "g.jsonl", [{"instruction": f"Q{i}", "response": f"A{i}"} for i in range(30)])
    res = invoke("sft", "--model", tiny_dir / "student", "--data", good, "--valid-data", vicuna,
                 "--out", tmp_path / "q", "--steps", 1)
    assert res.exit_code == 2, res.output
    assert f"{vicuna}: 10 of 10 validation examples have no reference response" in res.output
    # a conversation that ends with the user's message: its answer is in no other field (and
    # --response-field, which the message named, is refused with --turns all)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}"}] + (
        [{"role": "assistant", "content": f"A{i}"}] if i != 7 else [])} for i in range(30)])
    res = invoke("sft", "--model", tiny_dir / "student", "--data", chat, "--out", tmp_path / "c-last",
                 "--steps", 1, "--valid-size", 0)
    assert res.exit_code == 2 and f"the first: {chat}:8; layout messages" in res.output, res.output
    assert "a conversation that ends with the user's message" in res.output and "--response-field" not in res.output


def test_sequences_longer_than_the_model_are_refused(tmp_path, tiny_dir, dolly_like):
    """A model with fewer positions than --max-length (GPT-2's learned position table) failed deep
    inside with an IndexError and exit 1; every command now says which flag and which model (exit 2)."""
    from minillm_cli.models import load_tokenizer
    from minillm_cli.toy.tiny import make_gpt2

    short = tmp_path / "short"
    make_gpt2(load_tokenizer(str(tiny_dir / "tokenizer")), short, n_layer=1, n_embd=32, n_head=2, n_positions=128)
    res = invoke("sft", "--model", short, "--data", dolly_like, "--out", tmp_path / "a", "--steps", 1, "--quiet")
    assert res.exit_code == 2, res.output
    assert "--max-length (512 tokens) exceeds the model's context of 128 positions (config.n_positions)" in res.output
    res = invoke("sft", "--model", short, "--data", dolly_like, "--out", tmp_path / "b", "--steps", 1, "--quiet",
                 "--max-length", 128, "--max-prompt-length", 96, "--batch-size", 2)
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", "--model", short, "--data", dolly_like, "--limit", 2, "--seeds", 1, "--quiet")
    assert res.exit_code == 2 and "the model's context of 128" in res.output, res.output
    res = invoke("distill", "--teacher", short, "--student", tiny_dir / "student", "--data", dolly_like,
                 "--out", tmp_path / "c", "--steps", 1, "--quiet", "--max-new-tokens", 16)
    assert res.exit_code == 2, res.output
    assert "--max-prompt-length + --max-new-tokens (272 tokens) exceeds the teacher's context of 128" in res.output
    res = invoke("distill", "--method", "kd", "--teacher", short, "--student", tiny_dir / "student",
                 "--data", dolly_like, "--out", tmp_path / "d", "--steps", 1, "--quiet")
    assert res.exit_code == 2 and "--max-length (512 tokens) exceeds the teacher's context of 128" in res.output
    assert "Traceback" not in res.output
    text = tmp_path / "pt.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    assert invoke("pretrain-mix", "--source", text, "--tokenizer", tiny_dir / "student", "--seq-len", 200,
                  "--split-blank-lines", "--out", tmp_path / "pt", "--quiet", "--workers", 0).exit_code == 0
    res = invoke("distill", "--teacher", tiny_dir / "teacher", "--student", short, "--data", dolly_like,
                 "--pt-data", tmp_path / "pt", "--max-prompt-length", 96, "--max-new-tokens", 16,
                 "--out", tmp_path / "e", "--steps", 1, "--quiet")
    assert res.exit_code == 2, res.output
    assert "--pt-data's sequence length (200 tokens) exceeds the student's context of 128" in res.output
    # a rotary model has no table to run out of: a note, not a refusal
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tiny_dir / "tokenizer"))
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(llama)
    tok.save_pretrained(llama)
    res = invoke("sft", "--model", llama, "--data", dolly_like, "--out", tmp_path / "f", "--steps", 1,
                 "--max-length", 160, "--max-prompt-length", 120, "--batch-size", 2, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: --max-length (160 tokens) exceeds the model's context of 128 positions " \
           "(config.max_position_embeddings); past it" in res.output


def test_valid_data_that_is_training_data_is_a_warning_under_quiet(tmp_path, tiny_dir, dolly_like):
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--valid-data", dolly_like,
                 "--out", tmp_path / "o", "--steps", 1, "--batch-size", 2, "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert [line for line in res.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: 40 of 40 validation examples (--valid-data {dolly_like}) are also training examples (same "
        f"prompt and response as one of --data {dolly_like}): validation is not on held-out data"]


def test_batch_larger_than_the_data_is_noted(tmp_path, tiny_dir, dolly_like):
    res = invoke("sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", tmp_path / "o", "--steps", 1,
                 "--batch-size", 64, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "note: --batch-size 64 is more than the 38 training examples" in res.output


def test_an_adapter_as_the_model_keeps_its_adapter_or_is_refused(tmp_path, tiny_dir, dolly_like):
    """An adapter folder trains its own adapter (--lora-r 0), which --save-adapter saves on the same
    base; a new adapter on top (--lora-r) would sit on a merged model saved nowhere: refused, as
    is --fsdp (only the adapter trains). A resume that switches --save-adapter leaves one format."""
    from safetensors.torch import load_file

    from minillm_cli.models import adapter_base

    common = ["--data", dolly_like, "--batch-size", 4, "--lr", 1e-2, "--quiet", "--device", "cpu"]
    first = tmp_path / "first"
    assert invoke("sft", "--model", tiny_dir / "student", *common, "--steps", 1, "--lora-r", 2, "--save-adapter",
                  "--out", first).exit_code == 0
    res = invoke("sft", "--model", first, *common, "--steps", 1, "--lora-r", 2, "--save-adapter", "--out", tmp_path / "x")
    assert res.exit_code == 2 and f"--model {first} is an adapter, merged into" in res.output, res.output
    res = invoke("sft", "--model", first, *common, "--steps", 1, "--fsdp", "--out", tmp_path / "y")
    assert res.exit_code == 2 and f"{first} is a LoRA adapter folder" in res.output, res.output
    res = invoke("distill", "--method", "kd", "--teacher", tiny_dir / "teacher", "--student", first, *common,
                 "--steps", 1, "--lora-r", 2, "--save-adapter", "--out", tmp_path / "z")
    assert res.exit_code == 2 and f"--student {first} is an adapter" in res.output, res.output
    res = invoke("sft", "--model", tiny_dir / "student", *common, "--steps", 1, "--save-adapter", "--out", tmp_path / "w")
    assert res.exit_code == 2 and "--save-adapter needs --lora-r" in res.output
    res = invoke("distill", "--method", "kd", "--teacher", first, "--teacher-peft", first, "--student",
                 tiny_dir / "student", *common, "--steps", 1, "--out", tmp_path / "v")  # (applied twice)
    assert res.exit_code == 2 and "is the --teacher folder itself" in res.output, res.output
    # --lora-r 0: the same adapter trains on, and is saved as an adapter on the same base
    more = tmp_path / "more"
    res = invoke("sft", "--model", first, *common, "--steps", 2, "--save-every", 1, "--save-adapter", "--out", more)
    assert res.exit_code == 0, res.output
    assert adapter_base(str(more)) == adapter_base(str(first))
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(more / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any((a[k] - b[k]).abs().max() > 0 for k in a)  # it trained
    assert not (more / "model.safetensors").exists()
    # resumed without --save-adapter: merged weights alone, no stale adapter to load instead
    res = invoke("sft", "--model", first, *common, "--steps", 3, "--resume", "--out", more)
    assert res.exit_code == 0, res.output
    assert (more / "model.safetensors").exists() and not list(more.glob("adapter_*"))
    assert adapter_base(str(more)) is None


def test_resuming_a_finished_run_keeps_its_final_loss(tmp_path, tiny_dir, dolly_like):
    def strict(text):  # NaN is no JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    run = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--steps", 2, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--out", run]
    assert invoke(*args).exit_code == 0
    final = strict((run / "summary.json").read_text())["final_loss"]
    assert final > 0
    res = invoke(*args, "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert strict(res.stdout)["final_loss"] == final
    assert strict((run / "summary.json").read_text())["final_loss"] == final


def test_adam_betas_reach_the_optimizer_and_bind_a_resume(tmp_path, tiny_dir, dolly_like):
    import torch

    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--adam-betas", "0.9,0.95"]
    assert invoke(*args, "--steps", 1).exit_code == 0
    state = torch.load(out / "checkpoints" / "step-00000001" / "state.pt", weights_only=False)
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in state["optimizer"]["param_groups"])
    assert json.loads((out / "run_config.json").read_text())["config"]["optim"]["adam_betas"] == [0.9, 0.95]
    res = invoke(*[a for a in args if a != "0.9,0.95"][:-1], "--steps", 2, "--resume")  # the default betas
    assert res.exit_code == 2 and "--adam-betas [0.9, 0.95] -> [0.9, 0.999]" in res.output, res.output
    assert invoke(*args, "--steps", 2, "--resume").exit_code == 0


def test_lora_targets_named_as_detected_resume_and_others_are_refused(tmp_path, tiny_dir, dolly_like):
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--lora-r", 2]
    assert invoke(*args, "--steps", 1).exit_code == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["config"]["model_opts"]["lora_targets"] is None
    assert saved["resolved"]["lora_targets"] == ["c_attn", "c_fc", "c_proj"]
    res = invoke(*args, "--steps", 2, "--resume", "--lora-targets", "c_fc,c_attn")
    assert res.exit_code == 2 and "--lora-targets None -> ['c_fc', 'c_attn']" in res.output, res.output
    res = invoke(*args, "--steps", 2, "--resume", "--lora-targets", "c_proj,c_fc,c_attn")  # what was detected
    assert res.exit_code == 0, res.output


def test_lora_targets_named_then_left_out_on_resume_are_refused(tmp_path, tiny_dir, dolly_like):
    """Without --lora-targets the resumed run detects its own targets (all of GPT-2's), not the
    ones the first run named: refused (exit 2), not a failed optimizer load."""
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--lora-r", 2]
    assert invoke(*args, "--steps", 1, "--lora-targets", "c_attn").exit_code == 0
    res = invoke(*args, "--steps", 2, "--resume")
    assert res.exit_code == 2 and "--lora-targets ['c_attn'] -> None" in res.output, res.output


def test_a_run_without_validation_data_resumes(tmp_path, tiny_dir, dolly_like):
    """sft's default --select-by loss is recorded; a resume takes it as the run's own, not as an
    explicit choice that would need validation data."""
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--valid-size", 0, "--device", "cpu", "--quiet"]
    assert invoke(*args, "--steps", 1).exit_code == 0
    res = invoke(*args, "--steps", 2, "--resume")
    assert res.exit_code == 0, res.output


def test_a_resume_keeps_the_lora_targets_its_run_detected(tmp_path, tiny_dir, dolly_like, monkeypatch):
    """A release that detects other targets for the model (Phi-3's grew) must not change a resumed
    run's: without --lora-targets it takes run_config.json's recorded ones, whose adapter and
    optimizer state the checkpoint holds (a new detection failed to load the optimizer)."""
    import minillm_cli.models as models

    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir / "student", "--data", dolly_like, "--out", out, "--batch-size", 4,
            "--device", "cpu", "--quiet", "--lora-r", 2]
    monkeypatch.setitem(models.LORA_TARGETS, "gpt2", ["c_attn"])  # (what an older release detected)
    assert invoke(*args, "--steps", 1).exit_code == 0
    monkeypatch.setitem(models.LORA_TARGETS, "gpt2", ["c_attn", "c_proj", "c_fc"])
    res = invoke(*args, "--steps", 2, "--resume")
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["resolved"]["lora_targets"] == ["c_attn"] and saved["config"]["model_opts"]["lora_targets"] is None
    assert invoke(*args, "--steps", 3, "--resume").exit_code == 0  # (and again: the record still says detected)
