"""`--template chat` where the chat template closes the assistant's turn with a token of its own
(ChatML's `<|im_end|>` in a base model's tokenizer whose EOS is `<|endoftext|>`; Gemma's
`<end_of_turn>`): answers are trained to end with that token and sampling stops there."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from minillm_cli.cli.app import app

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_END = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n### end\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


def chat_tokenizer(out, template: str | None = CHATML, eos: str = "<|endoftext|>", pad: str = "<|pad|>"):
    """pad other than <|pad|>: a vocabulary without <|pad|> (Qwen's: pad <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    if pad != "<|pad|>":
        special.remove("<|pad|>")
    tok.train_from_iterator(["Name item number 3 of the list. Item 3 is an apple. A pear. user assistant"] * 4,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token="<|endoftext|>",
                                   pad_token=pad, additional_special_tokens=special[-2:])
    fast.chat_template = template
    fast.save_pretrained(str(out))
    return fast


def test_the_end_of_an_answer_is_the_templates_end_of_turn(tmp_path):
    from minillm_cli.data.examples import Example
    from minillm_cli.data.template import answer_stops, end_of_answer_id
    from minillm_cli.data.tokenize import encode_sft

    tok = chat_tokenizer(tmp_path / "t")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_answer_id(tok, "chat") == im_end != tok.eos_token_id
    assert end_of_answer_id(tok, "dolly") == end_of_answer_id(tok, "raw") == tok.eos_token_id
    # sampling stops at either: a model that ends its answers with EOS (trained before) stops too
    assert answer_stops(tok, "chat") == (im_end, tok.eos_token_id)
    assert answer_stops(tok, "dolly") == (tok.eos_token_id,)
    (enc,), _ = encode_sft(tok, [Example("Name item 3.", references=["A pear."])], "chat")
    assert enc.input_ids[-1] == im_end and tok.decode(enc.input_ids[enc.prompt_len:-1]) == "A pear."
    (enc,), _ = encode_sft(tok, [Example("Name item 3.", references=["A pear."])], "dolly")
    assert enc.input_ids[-1] == tok.eos_token_id
    # whitespace between the answer and the closing token: still the closing token
    for gap in ("\n", " ", "\n\n"):
        spaced = CHATML.replace("{{ m['content'] }}<|im_end|>", "{{ m['content'] }}" + gap + "<|im_end|>")
        assert end_of_answer_id(chat_tokenizer(tmp_path / "s", spaced), "chat") == im_end, repr(gap)
    # a template that closes turns with plain text, or has none: EOS as before
    assert end_of_answer_id(chat_tokenizer(tmp_path / "p", PLAIN_END), "chat") == tok.eos_token_id


def test_chat_sft_then_evaluate_stops_at_the_end_of_turn(tmp_path, dolly_like):
    """A student SFT'd with --template chat learns to close its turn; evaluate with the same
    template stops there (sampling only to EOS would run on past it to the token budget)."""
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=0)
    run = CliRunner().invoke(app, ["sft", "--model", str(tmp_path / "m"), "--data", str(dolly_like), "--out",
                                   str(tmp_path / "sft"), "--template", "chat", "--steps", "60", "--batch-size", "8",
                                   "--lr", "1e-2", "--schedule", "constant", "--eval-every", "0", "--device", "cpu",
                                   "--quiet"])
    assert run.exit_code == 0, run.output
    from transformers import GenerationConfig  # transformers' generate stops there too

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(tmp_path / "sft")).eos_token_id == [tok.eos_token_id, im_end]
    # (no --template: the run folder's own, from its run_config.json)
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "sft"), "--data", str(dolly_like),
                                   "--metric", "rougeL", "--seeds", "1", "--limit", "8", "--max-new-tokens", "40",
                                   "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "note: --template chat, the template" in res.stderr
    assert json.loads((tmp_path / "e.json").read_text())["protocol"]["template"] == "chat"
    rows = [json.loads(line) for line in open(tmp_path / "e.jsonl")]
    assert sum(r["ended"] for r in rows) >= 6, rows  # ended on <|im_end|>, not cut at 40 tokens
    assert all(r["response_tokens"] < 40 for r in rows if r["ended"])
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["rougeL"]["mean"] > 50
    # the same model as teacher and student: MiniLLM's rollouts and seqkd's answers end there too
    common = ["--teacher", str(tmp_path / "sft"), "--student", str(tmp_path / "sft"), "--data", str(dolly_like),
              "--template", "chat", "--max-new-tokens", "40", "--limit", "16", "--device", "cpu", "--quiet"]
    mini = CliRunner().invoke(app, ["distill", *common, "--out", str(tmp_path / "mini"), "--steps", "1",
                                    "--num-rollouts", "8", "--batch-size", "8", "--eval-prompts", "0"])
    assert mini.exit_code == 0, mini.output
    row = json.loads((tmp_path / "mini" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["response_len"] < 20, row
    seqkd = CliRunner().invoke(app, ["distill", *common, "--method", "seqkd", "--out", str(tmp_path / "seqkd"),
                                     "--steps", "1", "--batch-size", "2"])
    assert seqkd.exit_code == 0, seqkd.output
    answers = [json.loads(line) for line in open(tmp_path / "seqkd" / "seqkd_data.jsonl")]
    # (sampled to EOS they run on past the turn's end: "Item 39 is an apple.leA pear.3 is an")
    assert all(a["finished"] and a["response"].count(".") == 1 for a in answers), answers


def test_teacher_and_student_must_end_answers_alike_under_chat(tmp_path):
    """Under --template chat what must agree is how the two end an answer, not their EOS: an
    instruct teacher whose EOS is <|im_end|> and its base student whose EOS is <|endoftext|> share
    the ChatML turn's end; a teacher whose template closes turns otherwise is refused."""
    from minillm_cli.errors import InputError
    from minillm_cli.models import check_same_tokenizer

    base = chat_tokenizer(tmp_path / "base")
    instruct = chat_tokenizer(tmp_path / "instruct", eos="<|im_end|>")
    notes = []
    assert check_same_tokenizer(instruct, base, template="chat", note=notes.append) == len(base)
    assert notes == []  # (the same template renders the same prompts)
    with pytest.raises(InputError, match="different EOS ids"):
        check_same_tokenizer(instruct, base, template="dolly")
    with pytest.raises(InputError, match="ends an answer with"):
        check_same_tokenizer(chat_tokenizer(tmp_path / "plain", PLAIN_END), base, template="chat")
    spaced = chat_tokenizer(tmp_path / "sys", "{{ 'system: be brief' }}" + CHATML)
    check_same_tokenizer(spaced, base, template="chat", note=notes.append)
    assert len(notes) == 1 and "prompts are rendered with the student's" in notes[0]


def test_a_run_trained_to_end_with_eos_is_not_resumed_with_the_end_of_turn(tmp_path, dolly_like):
    """A --template chat run started by a release that ended answers with EOS (its record has no
    resolved `end_of_answer`) would switch targets mid-run: its resume is refused (exit 2); a run
    of this release resumes."""
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=0)
    out = tmp_path / "run"
    args = ["sft", "--model", str(tmp_path / "m"), "--data", str(dolly_like), "--out", str(out), "--template", "chat",
            "--batch-size", "4", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(app, [*args, "--steps", "1"]).exit_code == 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["resolved"]["end_of_answer"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert CliRunner().invoke(app, [*args, "--steps", "2", "--resume"]).exit_code == 0
    del record["resolved"]["end_of_answer"]  # (as an older release wrote it)
    (out / "run_config.json").write_text(json.dumps(record))
    res = CliRunner().invoke(app, [*args, "--steps", "3", "--resume"])
    assert res.exit_code == 2, res.output
    assert "trained to end answers with '<|endoftext|>'" in res.stderr and "'<|im_end|>'" in res.stderr
    # MiniLLM's own loop checks it too
    mini = tmp_path / "mini"
    margs = ["distill", "--teacher", str(tmp_path / "m"), "--student", str(tmp_path / "m"), "--data", str(dolly_like),
             "--out", str(mini), "--template", "chat", "--num-rollouts", "4", "--batch-size", "4",
             "--max-new-tokens", "8", "--eval-prompts", "0", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(app, [*margs, "--steps", "1"]).exit_code == 0
    record = json.loads((mini / "run_config.json").read_text())
    del record["resolved"]["end_of_answer"]
    (mini / "run_config.json").write_text(json.dumps(record))
    res = CliRunner().invoke(app, [*margs, "--steps", "2", "--resume"])
    assert res.exit_code == 2 and "trained to end answers with" in res.stderr, res.output


def test_a_base_teacher_without_a_chat_template_is_taken_under_chat(tmp_path):
    """A teacher whose tokenizer has no chat template (a base model; --teacher-peft's base, whose
    adapter's tokenizer is not read) ends at its EOS, where the samplers stop too: taken, with a
    note, when that EOS is one of the student's stops; refused otherwise."""
    from minillm_cli.errors import InputError
    from minillm_cli.models import check_same_tokenizer

    student = chat_tokenizer(tmp_path / "student")
    notes = []
    base = chat_tokenizer(tmp_path / "base", template=None)
    assert check_same_tokenizer(base, student, template="chat", note=notes.append) == len(student)
    assert len(notes) == 1 and "no chat template" in notes[0]
    odd = chat_tokenizer(tmp_path / "odd", template=None, eos="<|im_start|>")
    with pytest.raises(InputError, match="no chat template"):
        check_same_tokenizer(odd, student, template="chat")


def test_an_instruct_teacher_and_its_base_student_share_a_pad_token(tmp_path, dolly_like):
    """Qwen's tokenizers: the base one's pad is its EOS <|endoftext|> (load_tokenizer adds <|pad|>),
    the instruct one's EOS is <|im_end|> and its pad <|endoftext|> (kept): loaded for a teacher,
    the instruct one takes its student's pad, else the two differ by <|pad|> alone and are refused."""
    from minillm_cli.models import check_same_tokenizer, load_tokenizer
    from minillm_cli.toy.tiny import make_gpt2

    raw = {"base": chat_tokenizer(tmp_path / "base", pad="<|endoftext|>"),
           "instruct": chat_tokenizer(tmp_path / "instruct", eos="<|im_end|>", pad="<|endoftext|>")}
    student = load_tokenizer(str(tmp_path / "base"))
    teacher = load_tokenizer(str(tmp_path / "instruct"), pad=student.pad_token)
    assert student.pad_token == teacher.pad_token == "<|pad|>" and len(teacher) == len(student)
    assert check_same_tokenizer(teacher, student, template="chat") == len(student)
    for name, tok in raw.items():  # (the folders hold the tokenizers as published: no <|pad|>)
        make_gpt2(tok, tmp_path / f"m-{name}", n_layer=1, n_embd=32, n_head=2, seed=0)
    res = CliRunner().invoke(app, ["distill", "--method", "kd", "--teacher", str(tmp_path / "m-instruct"),
                                   "--student", str(tmp_path / "m-base"), "--data", str(dolly_like),
                                   "--out", str(tmp_path / "kd"), "--template", "chat", "--batch-size", "4",
                                   "--steps", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output


def test_chat_data_with_history_trains_and_evaluates_under_chat(tmp_path):
    """Chat data (`messages`, a system message and earlier turns): under --template chat every
    prompt is the whole conversation rendered by the tokenizer's template, and evaluate's
    predictions keep the history; under the paper's template the command refuses the data (exit 2,
    one line naming the record) before loading a model; a template that refuses a system message
    (Gemma's) is refused the same way."""
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.template import render_prompt
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=0)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name item 3."},
                          {"role": "assistant", "content": "Item 3 is an apple."},
                          {"role": "user", "content": f"Name item {i}."}, {"role": "assistant", "content": "A pear."}]}
            for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_examples(str(data))[0]
    assert render_prompt(ex, "chat", tok) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName item 3.<|im_end|>\n"
        "<|im_start|>assistant\nItem 3 is an apple.<|im_end|>\n<|im_start|>user\nName item 0.<|im_end|>\n"
        "<|im_start|>assistant\n")
    args = ["--model", str(tmp_path / "m"), "--data", str(data), "--device", "cpu"]
    run = CliRunner().invoke(app, ["sft", *args, "--out", str(tmp_path / "sft"), "--template", "chat", "--steps", "2",
                                   "--batch-size", "4", "--valid-size", "2", "--quiet"])
    assert run.exit_code == 0, run.output
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "sft"), "--data", str(data), "--seeds", "1",
                                   "--max-new-tokens", "4", "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    row = json.loads(open(tmp_path / "e.jsonl").readline())
    assert row["history"] == rows[0]["messages"][:3] and row["instruction"] == "Name item 0."
    assert row["prompt"] == render_prompt(ex, "chat", tok)
    # --turns all: both assistant turns of each conversation train (16 examples, 2 held out)
    run = CliRunner().invoke(app, ["sft", *args, "--out", str(tmp_path / "all"), "--template", "chat", "--turns", "all",
                                   "--steps", "1", "--batch-size", "4", "--valid-size", "2", "--json"])
    assert run.exit_code == 0, run.output
    assert (json.loads(run.stdout)["train_examples"], json.loads(run.stdout)["valid_examples"]) == (14, 2)
    assert json.loads((tmp_path / "all" / "run_config.json").read_text())["config"]["data"]["turns"] == "all"
    # evaluate --split valid on that run: its held-out turns, read with the run's --turns (under
    # --turns last the split is of other examples, some of them trained on); --turns overrides it
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits

    held = load_splits(DataOptions(data=str(data), template="chat", valid_size=2, turns="all"))["valid"]
    for turns, want in (([], "all"), (["--turns", "last"], "last")):
        res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "all"), "--data", str(data), "--split",
                                       "valid", "--valid-size", "2", "--seeds", "1", "--max-new-tokens", "2", *turns,
                                       "--out", str(tmp_path / f"v-{want}.json"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / f"v-{want}.json").read_text())["protocol"]["turns"] == want
        asked = [(r["instruction"], r.get("history")) for r in map(json.loads, open(tmp_path / f"v-{want}.jsonl"))]
        assert (asked == [(e.instruction, e.history or None) for e in held]) == (want == "all"), asked
    for cmd in (["sft", *args, "--out", str(tmp_path / "d")], ["evaluate", *args]):
        bad = CliRunner().invoke(app, cmd)
        assert bad.exit_code == 2, bad.output
        assert bad.stderr.strip().splitlines() == [
            f"error: {data}:1: 8 of 8 examples are conversations with a system message or earlier turns before the "
            f"last user message: --template dolly renders one instruction; use --template chat"], bad.stderr
    no_system = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}")
    chat_tokenizer(tmp_path / "m", no_system)
    bad = CliRunner().invoke(app, ["evaluate", *args, "--template", "chat"])
    assert bad.exit_code == 2, bad.output
    assert f"{data}:1: the tokenizer's chat template refuses this conversation: System role not supported" in bad.stderr


def test_an_empty_system_message_is_no_system_message(tmp_path):
    """SlimOrca's conversations open with an empty system message (Orca's "no system message"):
    under --template chat it is not rendered either, as under the paper's template. It was: a
    chat template without a system role (Gemma's) refused the data, and one with a default system
    message (Qwen's) had it replaced by an empty one."""
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.template import render_prompt

    no_system = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}")
    tok = chat_tokenizer(tmp_path / "tok", no_system)
    orca = {"conversations": [{"from": "system", "value": "", "weight": None},
                              {"from": "human", "value": "Name item 3.", "weight": 0.0},
                              {"from": "gpt", "value": "A pear.", "weight": 1.0}]}
    data = tmp_path / "orca.jsonl"
    data.write_text(json.dumps(orca) + "\n")
    for turns in ("last", "all"):
        (ex,) = load_examples(str(data), turns=turns)
        assert ex.history == []
        assert render_prompt(ex, "chat", tok) == "<|im_start|>user\nName item 3.<|im_end|>\n<|im_start|>assistant\n"


def test_a_later_turn_may_start_and_end_as_an_earlier_answer_did(tmp_path):
    """evaluate's no-repeat-ngram ban (6, the paper's) under --template chat counts the answer's own
    n-grams: over the prompt too, as transformers does, the turn markers before every answer
    ("<|im_end|>\\n<|im_start|>assistant\\n") made an earlier answer's first token a banned start
    for every later turn (and its last tokens a banned end): "Item 10 is an apple." came out as
    " is an apple."."""
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=2)
    rows = [{"messages": [{"role": "user", "content": f"Name item {i}."},
                          {"role": "assistant", "content": f"Item {i} is an apple."},
                          {"role": "user", "content": f"Name item {i + 1}."},
                          {"role": "assistant", "content": f"Item {i + 1} is an apple."}]} for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = CliRunner().invoke(app, ["sft", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                                   str(tmp_path / "sft"), "--template", "chat", "--turns", "all", "--steps", "80",
                                   "--batch-size", "8", "--lr", "1e-2", "--schedule", "constant", "--eval-every", "0",
                                   "--device", "cpu", "--quiet"])
    assert run.exit_code == 0, run.output
    res = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "sft"), "--data", str(data), "--split",
                                   "valid", "--seeds", "1", "--greedy", "--max-new-tokens", "20", "--out",
                                   str(tmp_path / "e.json"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in open(tmp_path / "e.jsonl")]
    later = [r for r in rows if r.get("history")]
    assert later and all(r["prediction"].startswith("Item ") and r["ended"] for r in later), rows
    protocol = json.loads((tmp_path / "e.json").read_text())["protocol"]
    assert (protocol["no_repeat_ngram_size"], protocol["no_repeat_ngram_over"]) == (6, "answer")


def test_answers_a_long_history_leaves_no_room_for_are_counted(tmp_path):
    """A later turn's prompt (the conversation before it) may fit --max-prompt-length while its
    answer does not fit --max-length: the answer is cut and trained without its end of turn,
    which the run now says (it said only how many prompts were dropped)."""
    from minillm_cli.data.examples import Example
    from minillm_cli.data.tokenize import encode_sft
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    long, short = Example("Name item 3.", references=["Item 3 is an apple. " * 4]), Example("Hi.", references=["A pear."])
    (a, b), _ = encode_sft(tok, [long, short], "chat", max_prompt_length=16, max_length=24)
    assert (a.cut, b.cut) == (True, False) and b.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=0)
    rows = [{"messages": [{"role": "user", "content": f"Name item {i}."},
                          {"role": "assistant", "content": f"Item {i} is an apple."},
                          {"role": "user", "content": "And the list?"},
                          {"role": "assistant", "content": "The list is apple, pear, plum, apple, pear, plum."}]}
            for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [len(tok(tok.apply_chat_template(r["messages"][:3], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]) for r in rows]
    run = CliRunner().invoke(app, ["sft", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                                   str(tmp_path / "sft"), "--template", "chat", "--turns", "all", "--steps", "1",
                                   "--batch-size", "4", "--valid-size", "2", "--max-prompt-length", str(max(prompts)),
                                   "--max-length", str(max(prompts) + 4), "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert "data: 14 train, 2 valid examples; dropped 0 over --max-prompt-length" in run.stderr, run.stderr
    assert f"note: 7 of 14 training answers are cut at --max-length {max(prompts) + 4}" in run.stderr, run.stderr


def test_turns_all_leaves_out_a_closing_user_message_when_training(tmp_path):
    """sft --turns all: a conversation's closing user message is a turn with nothing to train on
    beside the turns that have an answer (lmsys-chat-1m's conversations may end so): left out and
    counted, in training and validation alike, not the whole data refused (under --turns last the
    conversation's one example has no answer: refused, as before)."""
    from minillm_cli.toy.tiny import make_gpt2

    tok = chat_tokenizer(tmp_path / "tok")
    make_gpt2(tok, tmp_path / "m", n_layer=1, n_embd=32, n_head=2, seed=2)
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"},
                          {"role": "user", "content": "And?"}]} for i in range(30)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", "--model", str(tmp_path / "m"), "--data", str(data), "--template", "chat", "--steps", "1",
            "--valid-size", "4", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "all"), "--turns", "all"])
    assert res.exit_code == 0, res.output
    assert (f"note: 28 training turns of conversations have no answer to train on (a closing user message or an "
            f"empty answer; the first: {data}:1): left out") in res.output
    assert "note: 2 validation turns of conversations" in res.output and "data: 28 train, 2 valid examples" in res.output
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "last")])
    assert res.exit_code == 2 and "examples have no reference response" in res.output, res.output
