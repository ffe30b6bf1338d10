"""`--template chat` where the chat template closes the assistant's turn with a token of its own
(ChatML's `<|im_end|>` in a base model's tokenizer whose EOS is `<|endoftext|>`; Gemma's
`<end_of_turn>`): answers are trained to end with that token and sampling stops there."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from minillm_cli.cli.app import app

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_END = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n### end\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


def chat_tokenizer(out, template: str = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(["Name item number 3 of the list. Item 3 is an apple. A pear. user assistant"] * 4,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=special[2:])
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
