"""Data layer: every field layout, the template, splits, the loss mask, bad input."""
from __future__ import annotations

import json
import re

import pytest

from conftest import write_jsonl
from minillm_cli.data.examples import load_examples
from minillm_cli.data.splits import split_examples
from minillm_cli.data.template import DOLLY_NO_INPUT, DOLLY_WITH_INPUT, render_prompt
from minillm_cli.data.tokenize import collate_sft, encode_prompts, encode_sft, left_pad
from minillm_cli.errors import InputError


@pytest.mark.parametrize("row, instruction, inp, refs", [
    ({"instruction": "I", "context": "C", "response": "R", "category": "x"}, "I", "C", ["R"]),  # Dolly
    ({"instruction": "I", "input": "C", "output": "R"}, "I", "C", ["R"]),  # Alpaca
    ({"instruction": "I", "input": "", "output": ["R1", "R2"]}, "I", "", ["R1", "R2"]),  # MiniLLM, several outputs
    ({"prompt": "P", "output": ["R"]}, "P", "", ["R"]),  # MiniLLM prompt/output
    ({"prompt": "P", "response": "R"}, "P", "", ["R"]),  # prompt/response
    ({"prompt": "P", "completion": "R"}, "P", "", ["R"]),
    ({"question_id": 1, "category": "generic", "turns": ["Q"]}, "Q", "", []),  # Vicuna
])
def test_layouts(tmp_path, row, instruction, inp, refs):
    ex = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert len(ex) == 1
    assert (ex[0].instruction, ex[0].input, ex[0].references) == (instruction, inp, refs)


SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("row, instruction, refs, history", [
    # OpenAI / Hugging Face chat data (ultrachat_200k's record: a `prompt` beside the messages)
    ({"prompt": "Hi", "prompt_id": "x", "messages": [SYSTEM, {"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello."},
                                                     {"role": "user", "content": "Name a fruit."},
                                                     {"role": "assistant", "content": "A pear."}]},
     "Name a fruit.", ["A pear."], [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
                   {"role": "assistant", "content": "4"}]}, "What is 2+2?", ["4"], []),  # OpenAI's content parts
    ({"messages": [SYSTEM, {"role": "user", "content": "Q"}]}, "Q", [], [SYSTEM]),  # a prompt without a reference
    # ShareGPT
    ({"id": 1, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q1"},
                                 {"from": "gpt", "value": "A1"}]}, "Q1", ["A1"], [SYSTEM]),
    ({"conversation": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "Q", ["A"], []),
    # TRL's conversational prompt/completion
    ({"prompt": [SYSTEM, {"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
     "Q", ["A"], [SYSTEM]),
])
def test_conversation_layouts(tmp_path, row, instruction, refs, history):
    """One example per conversation: its last assistant message is the answer, the user message
    before it the instruction, everything earlier the history it is asked in."""
    (ex,) = load_examples(str(write_jsonl(tmp_path / "c.jsonl", [row])))
    assert (ex.instruction, ex.input, ex.references, ex.history) == (instruction, "", refs, history)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "Q"}, {"role": "tool", "content": "x"}],
     r"messages\[1\] has role 'tool'; expected user, assistant or system"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}],
     r"messages: the message before the last answer is the assistant's, expected the user's \(an answer replies "
     r"to a user message\)$"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, SYSTEM],
     "messages: the last message is the system's, expected the user's or the assistant's$"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\] is a part of type 'image_url'; only text parts are supported"),
    ([{"speaker": "user", "text": "Q"}], r"messages\[0\] has no 'role' \(or ShareGPT 'from'\); found: speaker, text"),
    (["Q"], r"messages\[0\] is a str, expected a message object"),
    ([{"role": "user", "content": {"text": "Q"}}], r"field 'messages\[0\]\.content' is an object"),
    # OpenAI's tool call: content null, the call beside it (not an empty answer without a reference)
    ([{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}],
     r"messages\[1\] is a tool call \('tool_calls'\); tool calls are not supported"),
    ([{"role": "user", "value": "Q"}, {"role": "assistant", "value": "A"}],
     r"messages\[0\] has no 'content' beside 'role'; found: role, value"),
    ([{"from": "human", "content": "Q"}], r"messages\[0\] has no 'value' beside 'from'; found: content, from"),
])
def test_a_malformed_conversation_is_refused_naming_the_record(tmp_path, messages, message):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:1: {message}"):
        load_examples(str(p))


def test_every_assistant_turn_an_example_with_turns_all(tmp_path):
    """--turns all: one example per assistant turn that answers a user message, each asked after
    the conversation before it (an opening greeting answers nothing); a final user message is a
    prompt without reference, as under --turns last. Layouts other than conversations: as before."""
    greet = {"role": "assistant", "content": "Hello, ask me."}
    u = [{"role": "user", "content": f"Q{i}"} for i in range(3)]
    a = [{"role": "assistant", "content": f"A{i}"} for i in range(3)]
    rows = [{"messages": [SYSTEM, greet, u[0], a[0], u[1], a[1]]}, {"messages": [u[0], a[0], u[1]]},
            {"instruction": "I", "input": "", "output": "R"}]
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", [r]) for i, r in enumerate(rows)]
    got = [[(e.instruction, e.references, e.history) for e in load_examples(str(p), turns="all")] for p in paths]
    assert got == [[("Q0", ["A0"], [SYSTEM, greet]), ("Q1", ["A1"], [SYSTEM, greet, u[0], a[0]])],
                   [("Q0", ["A0"], []), ("Q1", [], [u[0], a[0]])],
                   [("I", ["R"], [])]]
    assert [(e.instruction, e.references) for e in load_examples(str(paths[0]))] == [("Q1", ["A1"])]
    with pytest.raises(InputError, match="the last message is the system's"):  # (as under --turns last)
        load_examples(str(write_jsonl(tmp_path / "s.jsonl", [{"messages": [u[0], a[0], SYSTEM]}])), turns="all")
    # OpenAI's fine-tuning data: an assistant message of weight 0 is context, not a target; its
    # "developer" message is the system message
    weighted = [{"role": "developer", "content": "Be brief."}, u[0], {**a[0], "weight": 0}, u[1], {**a[1], "weight": 1}]
    (ex,) = load_examples(str(write_jsonl(tmp_path / "w.jsonl", [{"messages": weighted}])), turns="all")
    assert (ex.instruction, ex.references, ex.history) == ("Q1", ["A1"], [SYSTEM, u[0], a[0]])
    # a conversation whose every answer is of weight 0 has nothing to train on (not its last answer)
    context_only = [{"messages": [u[0], {**a[0], "weight": 0}]}, {"messages": [u[1], a[1]]}]
    assert [(e.instruction, e.references) for e in load_examples(
        str(write_jsonl(tmp_path / "w0.jsonl", context_only)), turns="all")] == [("Q1", ["A1"])]
    # a conversation without a question (only a system message, an assistant's greeting after it,
    # or none) is dropped and counted
    notes = []
    empty = write_jsonl(tmp_path / "e.jsonl", [{"messages": [SYSTEM]}, {"messages": []}, {"messages": [SYSTEM, greet]},
                                               rows[1]])
    for turns in ("last", "all"):
        assert [e.instruction for e in load_examples(str(empty), turns=turns, note=notes.append)] == (
            ["Q1"] if turns == "last" else ["Q0", "Q1"])
    assert notes == [f"note: 3 examples with an empty instruction dropped (the first: {empty}:1)"] * 2
    with pytest.raises(InputError, match="--turns 'first': expected last or all"):
        load_examples(str(paths[0]), turns="first")
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits

    with pytest.raises(InputError, match="--turns"):
        DataOptions(data="x", turns="first")
    assert len(load_splits(DataOptions(data=str(paths[0]), template="chat", valid_size=0, turns="all"))["train"]) == 2


def test_turns_all_on_trl_prompt_completion_and_weights_that_are_not_zero(tmp_path):
    """TRL's conversational prompt/completion under --turns all: the prompt's answered turns are
    examples too, before the completion's, and all of them go to one part of the split. Only a
    weight of 0 leaves a turn untrained: false, null or 1 train it."""
    from minillm_cli.data.splits import split_examples

    u = [{"role": "user", "content": f"Q{i}"} for i in range(3)]
    a = [{"role": "assistant", "content": f"A{i}"} for i in range(3)]
    trl = [{"prompt": [SYSTEM, u[0], a[0], u[1], {**a[1], "weight": 0}, u[2]], "completion": [a[2]]},
           {"prompt": [u[0]], "completion": [a[0]]}]
    p = write_jsonl(tmp_path / "trl.jsonl", trl)
    got = [(e.instruction, e.references, e.history, e.meta.get("conversation")) for e in load_examples(str(p), turns="all")]
    assert got == [("Q0", ["A0"], [SYSTEM], f"{p}:1"), ("Q2", ["A2"], [SYSTEM, u[0], a[0], u[1], a[1]], f"{p}:1"),
                   ("Q0", ["A0"], [], None)]
    assert [e.instruction for e in load_examples(str(p))] == ["Q2", "Q0"]  # (--turns last: the completion's)
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": [u[0], a[0], u[1]], "completion": [a[1]]}] * 20)
    parts = split_examples(load_examples(str(many), turns="all"), valid_size=0.25, seed=3)
    for part in ("train", "valid"):
        assert [e.instruction for e in parts[part]] == ["Q0", "Q1"] * (len(parts[part]) // 2)
        assert len({e.meta["where"] for e in parts[part]}) == len(parts[part]) // 2
    for weight, trained in ((False, True), (None, True), (1, True), (0.0, False), (0, False)):
        row = {"messages": [u[0], {**a[0], "weight": weight}, u[1], a[1]]}
        got = [e.instruction for e in load_examples(str(write_jsonl(tmp_path / "w.jsonl", [row])), turns="all")]
        assert got == (["Q0", "Q1"] if trained else ["Q1"]), weight
        # --turns last: a last answer of weight 0 is not the target, the last trained one is
        row = {"messages": [SYSTEM, u[0], a[0], u[1], {**a[1], "weight": weight}]}
        got = [(e.instruction, e.references, e.history)
               for e in load_examples(str(write_jsonl(tmp_path / "w.jsonl", [row])))]
        assert got == ([("Q1", ["A1"], [SYSTEM, u[0], a[0]])] if trained else [("Q0", ["A0"], [SYSTEM])]), weight
    untrained = [{"messages": [u[0], {**a[0], "weight": 0}]}, {"messages": [u[1], a[1]]}]
    notes, path = [], write_jsonl(tmp_path / "u.jsonl", untrained)
    for turns in ("last", "all"):
        assert [e.instruction for e in load_examples(str(path), turns=turns, note=notes.append)] == ["Q1"]
    assert notes == [f"note: 1 conversation with every answer of weight 0 (the first: {path}:1) left out: "
                     f"nothing to train on"] * 2
    # an opening greeting answers nothing, also where the conversation ends with the user's message
    notes, opens = [], [{"messages": [{"role": "assistant", "content": "Hi!"}, u[0], a[0], u[1]]}]
    assert [(e.instruction, e.references) for e in load_examples(
        str(write_jsonl(tmp_path / "g.jsonl", opens)), turns="all", note=notes.append)] == [("Q0", ["A0"]), ("Q1", [])]
    assert notes == []
    with pytest.raises(InputError, match=r"no examples \(.*; 1 conversation with every answer of weight 0 \(the "
                                         rf"first: {re.escape(str(path))}:1\)\)$"):
        load_examples(str(write_jsonl(tmp_path / "u.jsonl", untrained[:1])))


def test_conversations_need_the_chat_template(tmp_path):
    """The paper's template has one instruction: a system message or earlier turns would be
    dropped without a word. Refused at load (before any model), counted, under dolly and raw;
    a conversation of one user message and its answer is an ordinary instruction."""
    from minillm_cli.config import DataOptions
    from minillm_cli.data.examples import Example
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.data.template import check_template_fits

    one_turn = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    with_system = {"messages": [SYSTEM, *one_turn["messages"]]}
    p = write_jsonl(tmp_path / "c.jsonl", [one_turn] * 8 + [with_system] * 2)
    for template in ("dolly", "raw"):
        with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:9: 2 of 10 examples are conversations with a "
                                             rf"system message .*--template {template} renders one instruction; "
                                             rf"use --template chat"):
            load_splits(DataOptions(data=str(p), template=template, valid_size=0))
    assert len(load_splits(DataOptions(data=str(p), template="chat", valid_size=0))["train"]) == 10
    plain = write_jsonl(tmp_path / "one.jsonl", [one_turn] * 4)
    (ex, *_) = load_splits(DataOptions(data=str(plain), valid_size=0))["train"]
    assert render_prompt(ex) == DOLLY_NO_INPUT.format(instruction="Q")
    with pytest.raises(InputError, match="a conversation with a system message"):
        render_prompt(Example("Q", history=[SYSTEM]), "dolly")  # (every renderer checks)
    check_template_fits([Example("Q", history=[SYSTEM])], "chat")
    # an empty system message (Orca's "no system message", in SlimOrca): nothing to drop
    blank = write_jsonl(tmp_path / "orca.jsonl", [{"conversations": [{"from": "system", "value": " "},
                                                                     {"from": "human", "value": "Q"},
                                                                     {"from": "gpt", "value": "A"}]}] * 4)
    (ex, *_) = load_splits(DataOptions(data=str(blank), valid_size=0))["train"]
    assert render_prompt(ex) == DOLLY_NO_INPUT.format(instruction="Q")


def test_conversations_differing_only_in_history_are_different_examples():
    """Validation overlap compares the whole prompt: the same last question asked after other
    turns is another example."""
    from minillm_cli.data.examples import Example
    from minillm_cli.data.prepare import overlap

    a, b = Example("Q", references=["A"]), Example("Q", references=["A"], history=[SYSTEM])
    assert overlap([a], [b]) == 0 and overlap([b], [Example("Q", references=["A"], history=[dict(SYSTEM)])]) == 1


def test_self_instruct_one_example_per_instance(tmp_path):
    row = {"id": "t", "instruction": "I", "instances": [{"input": "a", "output": "A"}, {"input": "b", "output": "B"}]}
    ex = load_examples(str(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert [(e.input, e.references) for e in ex] == [("a", ["A"]), ("b", ["B"])]


def test_json_csv_parquet(tmp_path):
    rows = [{"instruction": f"I{i}", "context": "", "response": f"R{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("json", "csv", "parquet"):
        ex = load_examples(str(tmp_path / f"d.{suffix}"))
        assert [e.instruction for e in ex] == ["I0", "I1", "I2"], suffix
        assert ex[2].references == ["R2"]


def test_byte_order_mark_and_json_lines_named_json(tmp_path):
    """Exports users bring: a UTF-8 byte-order mark (Windows, spreadsheets) in .jsonl/.json/.csv,
    and one object per line under a .json name (`datasets.Dataset.to_json`'s default)."""
    rows = [{"instruction": f"I{i} é", "context": "", "response": f"R{i}"} for i in range(3)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps(rows), encoding="utf-8")
    (tmp_path / "bom.csv").write_text("\ufeffinstruction,context,response\n" +
                                      "".join(f"I{i} é,,R{i}\n" for i in range(3)), encoding="utf-8")
    (tmp_path / "lines.json").write_text(lines, encoding="utf-8")
    for name in ("bom.jsonl", "bom.json", "bom.csv", "lines.json"):
        ex = load_examples(str(tmp_path / name))
        assert [e.instruction for e in ex] == ["I0 é", "I1 é", "I2 é"], name
        assert ex[2].references == ["R2"], name
    (tmp_path / "broken.json").write_text(lines + "{oops\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.json:4: malformed JSON line"):
        load_examples(str(tmp_path / "broken.json"))
    (tmp_path / "cut.jsonl").write_text(lines + '{"instruction": "x", \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"cut\.jsonl:4: malformed JSON line \(.* at column 22\)"):
        load_examples(str(tmp_path / "cut.jsonl"))  # (where the line ends, not column 1 of a next one)
    (tmp_path / "extra.json").write_text('{"data": [{"instruction": "a", "response": "b"}]}\n}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"extra\.json:2: malformed JSON \(Extra data"):  # not a layout error
        load_examples(str(tmp_path / "extra.json"))
    (tmp_path / "bad.json").write_text('[{"instruction": "a"}] [1]', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.json:1: malformed JSON \(Extra data"):
        load_examples(str(tmp_path / "bad.json"))
    # old Mac line ends (\r alone) and Windows ones, as text-mode files read them
    for name, end in (("cr.jsonl", "\r"), ("crlf.jsonl", "\r\n")):
        (tmp_path / name).write_bytes(lines.replace("\n", end).encode("utf-8"))
        assert [e.references for e in load_examples(str(tmp_path / name))] == [["R0"], ["R1"], ["R2"]], name
    # a byte that is not UTF-8: line and column in characters, as an editor shows them
    (tmp_path / "latin1.jsonl").write_bytes((lines + '{"instruction": "ééé ').encode("utf-8") + b'\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1\.jsonl:4: not UTF-8 text: byte 0xe9 at column 22;"):
        load_examples(str(tmp_path / "latin1.jsonl"))


def test_field_overrides(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "answer_text": "A", "ctx": "C"}])
    ex = load_examples(str(p), prompt_field="question", response_field="answer_text", input_field="ctx")
    assert (ex[0].instruction, ex[0].input, ex[0].references) == ("Q", "C", ["A"])


def test_limit(tmp_path, dolly_like):
    assert len(load_examples(str(dolly_like), limit=5)) == 5


@pytest.mark.parametrize("content, pattern", [
    ('{"instruction": "a", "response": "b"}\n{broken\n', r"d\.jsonl:2: malformed JSON"),
    ('{"question": "a", "answer_text": "b"}\n', r"found fields: answer_text, question.*--prompt-field"),
    ("", r"no examples"),
    ('[1, 2]\n', r"d\.jsonl:1: expected a JSON object"),
])
def test_bad_files(tmp_path, content, pattern):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=pattern):
        load_examples(str(p))


def test_missing_file_and_unknown_alias(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="not a known alias"):
        load_examples("nonsense")


def test_override_naming_a_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q"}])
    with pytest.raises(InputError, match="answer not found; found: question"):
        load_examples(str(p), prompt_field="question", response_field="answer")


def test_an_override_keeps_the_layouts_other_fields(tmp_path):
    """Naming one field replaces that field only: the detected layout's input (Dolly's context,
    Alpaca's input) stays in every prompt, and its answer stays when only the prompt is named."""
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "I", "context": "C", "response": "R", "alt": "A"}])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "I", "input": "C", "output": "R", "q": "Q"}])
    for path, fields, want in [
        (dolly, dict(response_field="response"), ("I", "C", ["R"])),
        (dolly, dict(response_field="alt"), ("I", "C", ["A"])),
        (dolly, dict(prompt_field="alt"), ("A", "C", ["R"])),
        (alpaca, dict(prompt_field="q"), ("Q", "C", ["R"])),
        (alpaca, dict(response_field="q", input_field="instruction"), ("I", "I", ["Q"])),
    ]:
        ex = load_examples(str(path), **fields)
        assert (ex[0].instruction, ex[0].input, ex[0].references) == want, (path.name, fields)
    assert load_examples(str(dolly), response_field="response")[0].meta["layout"] == "dolly, --response-field response"
    # no layout detected: the fields not named are still found by their usual names
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q", "context": "C", "answer": "A"}])
    ex = load_examples(str(q), prompt_field="question")
    assert (ex[0].instruction, ex[0].input, ex[0].references) == ("Q", "C", ["A"])


def test_an_input_field_that_no_record_has_is_refused(tmp_path):
    """A typo in --input-field would blank every input (as one in --prompt-field is refused); a
    field that only some records have is fine (an input is optional)."""
    rows = [{"instruction": "I0", "context": "", "response": "R"}, {"instruction": "I1", "response": "R", "ctx": "C"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=rf"^{re.escape(str(p))}: --input-field contxt not found in any record; "
                                         r"found: context, ctx, instruction, response$"):
        load_examples(str(p), input_field="contxt")
    assert [e.input for e in load_examples(str(p), input_field="ctx")] == ["", "C"]


def test_a_folder_is_read_whole_file_by_file(tmp_path):
    """Subfolders and upper-case suffixes are read, hidden names skipped, in sorted order; each
    file gets its own layout; the progress log says how many files were read."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / ".cache").mkdir()
    write_jsonl(d / "a.jsonl", [{"instruction": "A", "context": "", "response": "RA"}])
    write_jsonl(d / "b.JSONL", [{"instruction": "B", "context": "CB", "response": "RB"}])
    write_jsonl(d / "sub" / "c.jsonl", [{"instruction": "C", "input": "CC", "output": "RC"}])  # Alpaca
    write_jsonl(d / ".cache" / "x.jsonl", [{"instruction": "hidden", "context": "", "response": "x"}])
    write_jsonl(d / ".y.jsonl", [{"instruction": "hidden", "context": "", "response": "y"}])
    (d / "notes.txt").write_text("not data\n")
    ex = load_examples(str(d))
    assert [(e.instruction, e.input, e.references) for e in ex] == [
        ("A", "", ["RA"]), ("B", "CB", ["RB"]), ("C", "CC", ["RC"])]
    assert [e.meta["layout"] for e in ex] == ["dolly", "dolly", "alpaca"]
    notes = []
    load_examples(str(d), note=notes.append)
    assert notes == [f"data: 3 files read from {d} (2 dolly, 1 alpaca)"]
    # a file in no known layout is named itself (not judged by the first file's layout)
    write_jsonl(d / "sub" / "d.jsonl", [{"question": "Q", "answer_text": "A"}])
    with pytest.raises(InputError, match=r"sub/d\.jsonl:1: no known field layout; found fields: answer_text"):
        load_examples(str(d))


@pytest.mark.parametrize("row, message", [
    ({"instruction": ["a", "b"], "context": "", "response": "R"}, "field 'instruction' is a list"),
    ({"instruction": "I", "context": {"k": "v"}, "response": "R"}, "field 'context' is an object"),
    ({"instruction": "I", "context": "", "response": {"text": "R"}}, "field 'response' is an object"),
    ({"instruction": True, "input": "", "output": "R"}, "field 'instruction' is true/false"),
    ({"instruction": "I", "input": "", "output": ["R", ["x"]]}, r"field 'output\[1\]' is a list"),
    ({"instruction": "I", "instances": [{"input": "", "output": {"a": 1}}]},
     r"field 'instances\[0\]\.output' is an object"),
    ({"turns": [["Q"]]}, r"field 'turns\[0\]' is a list"),
    ({"turns": "Q"}, "field 'turns' is a str, expected a list"),
])
def test_a_field_that_is_not_text_is_refused(tmp_path, row, message):
    """str() of a list or an object is Python's repr, which would become the prompt or answer."""
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:1: {message}"):
        load_examples(str(p))


def test_a_null_instruction_is_dropped_and_counted_as_an_empty_one(tmp_path):
    """null is an empty field (never the text "None"): an instruction is dropped and counted, an
    input is empty, an answer is no reference (which sft refuses and evaluate reports)."""
    rows = [{"instruction": "I0", "context": None, "response": None},
            {"instruction": None, "context": "", "response": "R1"},
            {"instruction": "", "context": "", "response": "R2"},
            {"instruction": "I3", "context": "C3", "response": 42}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    ex = load_examples(str(p))
    assert [(e.instruction, e.input, e.references) for e in ex] == [("I0", "", []), ("I3", "C3", ["42"])]
    notes = []
    load_examples(str(p), note=notes.append)
    assert notes == [f"note: 2 examples with an empty instruction dropped (the first: {p}:2)"]
    write_jsonl(p, [{"instruction": None, "response": "R"}])
    with pytest.raises(InputError, match="no examples"):
        load_examples(str(p))


def test_valid_data_that_is_training_data_is_warned_about(tmp_path, capsys):
    """--valid-data naming DATA, or holding some of its examples (same prompt and response): a
    warning line (on stderr unless the engine passes its own)."""
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits

    rows = [{"instruction": f"I{i}", "context": "", "response": f"R{i}"} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    other = [{**rows[2], "response": "other"}, {**rows[3], "context": "other"}, {**rows[4], "instruction": "I"}]
    valid = write_jsonl(tmp_path / "valid.jsonl", rows[:2] + other)  # 2 in train.jsonl, 3 differing in one field
    for data, vdata, want in [(train, train, "10 of 10"), (train, valid, "2 of 5"), (valid, train, "2 of 10")]:
        load_splits(DataOptions(data=str(data), valid_data=str(vdata)))
        warned = capsys.readouterr().err.splitlines()
        assert len(warned) == 1 and warned[0].startswith(
            f"warning: {want} validation examples (--valid-data {vdata}) are also training examples"), warned
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "new", "response": "R0"}])
    splits = load_splits(DataOptions(data=str(train), valid_data=str(held_out)))
    assert capsys.readouterr().err == "" and len(splits["train"]) == 10


def test_dolly_template_exact():
    from minillm_cli.data.examples import Example

    assert render_prompt(Example("Do X.")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n")
    with_input = render_prompt(Example("Do X.", "Some context"))
    assert with_input == DOLLY_WITH_INPUT.format(instruction="Do X.", input="Some context")
    assert ", paired with an input that provides further context" in with_input
    assert "### Input:\nSome context\n\n### Response:\n" in with_input
    assert DOLLY_NO_INPUT.endswith("### Response:\n")


def test_splits_deterministic_disjoint_and_sized():
    items = list(range(100))
    a = split_examples(items, valid_size=0.1, test_size=5, seed=3)
    b = split_examples(items, valid_size=0.1, test_size=5, seed=3)
    c = split_examples(items, valid_size=0.1, test_size=5, seed=4)
    assert a == b and a["valid"] != c["valid"]
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (85, 10, 5)
    assert set(a["train"]) | set(a["valid"]) | set(a["test"]) == set(items)
    assert not (set(a["train"]) & set(a["valid"])) and not (set(a["valid"]) & set(a["test"]))
    import random  # (the split every earlier run made: a permutation of the examples)

    order = list(range(100))
    random.Random(3).shuffle(order)
    assert (a["test"], a["valid"]) == (sorted(order[:5]), sorted(order[5:15]))
    with pytest.raises(InputError):
        split_examples(items[:3], valid_size=2, test_size=1)


def test_turns_all_splits_whole_conversations(tmp_path):
    """--turns all: a conversation's turns go to one part (a held-out turn's answer is in the
    history of the conversation's later turns, and its history holds the earlier answers), in sft's
    split and evaluate's alike; the sizes are reached in whole conversations."""
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.eval.evaluate import EvaluateConfig, load_eval_examples

    rows = [{"messages": [m for j in range(3) for m in ({"role": "user", "content": f"Q{i}.{j}"},
                                                         {"role": "assistant", "content": f"A{i}.{j}"})]}
            for i in range(10)]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    s = load_splits(DataOptions(data=str(p), template="chat", valid_size=4, test_size=0.1, turns="all"))
    conv = {k: {e.instruction.split(".")[0] for e in s[k]} for k in ("train", "valid", "test")}
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == (21, 6, 3)
    assert not (conv["train"] & conv["valid"]) and not (conv["train"] & conv["test"]) and not (conv["valid"] & conv["test"])
    held = load_eval_examples(EvaluateConfig(model="m", data=str(p), template="chat", turns="all", split="valid",
                                             valid_size=4, test_size=0.1))
    assert [e.instruction for e in held] == [e.instruction for e in s["valid"]]
    with pytest.raises(InputError, match=r"in whole conversations, leave nothing to train on out of 6 \(2 conversations\)"):
        load_splits(DataOptions(data=str(write_jsonl(tmp_path / "two.jsonl", rows[:2])), template="chat",
                                valid_size=1, test_size=1, turns="all"))


def test_loss_mask_exact(tiny_dir):
    """Exactly the response tokens and EOS carry loss; prompt and padding never do; EOS != pad."""
    from minillm_cli.data.examples import Example
    from minillm_cli.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "student"))
    assert tok.pad_token_id != tok.eos_token_id
    exs = [Example("Name a red fruit.", "", ["Apple"]), Example("Say more words here please.", "ctx", ["A pear and a plum"])]
    enc, dropped = encode_sft(tok, exs, "dolly", 256, 512)
    assert dropped == 0
    batch = collate_sft(enc, tok.pad_token_id)
    for b, (e, ex) in enumerate(zip(enc, exs)):
        prompt = tok(render_prompt(ex))["input_ids"]
        response = tok(ex.references[0], add_special_tokens=False)["input_ids"]
        assert e.input_ids == prompt + response + [tok.eos_token_id]
        L = batch["input_ids"].shape[1]
        expected = [False] * len(prompt) + [True] * (len(response) + 1) + [False] * (L - len(e.input_ids))
        assert batch["loss_mask"][b].tolist() == expected
        assert batch["attention_mask"][b].tolist() == [1] * len(e.input_ids) + [0] * (L - len(e.input_ids))
        eos_pos = len(e.input_ids) - 1
        assert batch["input_ids"][b, eos_pos] == tok.eos_token_id and batch["loss_mask"][b, eos_pos]
        assert (batch["input_ids"][b, len(e.input_ids):] == tok.pad_token_id).all()


def test_long_prompts_dropped_and_truncation_loses_eos(tiny_dir):
    from minillm_cli.data.examples import Example
    from minillm_cli.models import load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "student"))
    exs = [Example("short"), Example("word " * 400)]
    exs[0].references = ["x " * 50]
    exs[1].references = ["y"]
    prompts, kept, dropped = encode_prompts(tok, exs, "dolly", 64)
    assert kept == [0] and dropped == 1
    enc, dropped = encode_sft(tok, exs, "dolly", 64, 70)
    assert dropped == 1 and len(enc[0].input_ids) == 70
    assert enc[0].input_ids[-1] != tok.eos_token_id  # cut text is not taught to stop


def test_left_pad():
    ids, att = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_shared_data_files_load_without_flags():
    """The real files users bring (only when ../shared is present)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip("no ../shared/data in this checkout")
    dolly = load_examples(str(root / "dolly-sample.jsonl"))
    selfinst = load_examples(str(root / "selfinst-user-oriented.jsonl"))
    vicuna = load_examples(str(root / "vicuna-80.jsonl"))
    assert len(dolly) == 540 and all(e.references for e in dolly)
    assert len(selfinst) >= 252 and all(e.references for e in selfinst)
    assert len(vicuna) == 80 and not any(e.references for e in vicuna)


def test_chat_template_prompt_gets_no_second_bos():
    """A chat template writes its own BOS into the text: tokenising must not add another."""
    from minillm_cli.data.examples import Example
    from minillm_cli.data.tokenize import encode_prompts

    class Tok:
        chat_template = "x"
        calls = []

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>" + messages[0]["content"]

        def __call__(self, text, add_special_tokens):
            self.calls.append(add_special_tokens)
            return {"input_ids": [1] * len(text)}

    tok = Tok()
    encode_prompts(tok, [Example("hi")], "chat", 256)
    encode_prompts(tok, [Example("hi")], "dolly", 256)
    assert tok.calls == [False, True]


def test_sft_loss_is_the_cross_entropy_of_response_tokens(tiny_dir):
    """engine.sft.response_ce_sum (the fused chunked pass) equals torch's cross-entropy over
    exactly the loss-mask positions, value and gradient."""
    import torch
    import torch.nn.functional as F

    from minillm_cli.data.examples import Example
    from minillm_cli.engine.sft import response_ce_sum
    from minillm_cli.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_dir / "student"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "student")).double()
    exs = [Example("Name a red fruit.", "", ["Apple"]), Example("Say more words here please.", "ctx", ["A pear and a plum"])]
    batch = collate_sft(encode_sft(tok, exs, "dolly", 256, 512)[0], tok.pad_token_id)
    V = len(tok)
    ce, n = response_ce_sum(model, batch, V, torch.device("cpu"))
    g = torch.autograd.grad(ce, [model.lm_head.weight])[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    mask = batch["loss_mask"][:, 1:]
    ref = F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask], reduction="sum")
    g_ref = torch.autograd.grad(ref, [model.lm_head.weight])[0]
    assert n == int(mask.sum()) > 0
    torch.testing.assert_close(ce, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_split_sizes_are_fractions_or_counts():
    from minillm_cli.config import DataOptions

    assert DataOptions(data="x", valid_size=3).valid_size == 3
    with pytest.raises(InputError, match="--valid-size 2.5: a fraction below 1, or a whole number"):
        DataOptions(data="x", valid_size=2.5)


def test_hub_sets_with_one_split_and_a_folder(tmp_path, monkeypatch):
    """MiniLLM's evaluation sets on the Hub hold valid.jsonl only (a "validation" split), S-NI and
    UnNI in length folders of which the reference evaluates 11_: the aliases read that folder's
    one split. Hub repositories are played by local folders of the same layout."""
    import datasets

    from minillm_cli import hub

    for folder, name, prompt in (("MiniLLM/sinst/11_", "valid", "long"), ("MiniLLM/sinst/0_2", "valid", "short"),
                                 ("org/two", "valid", "v"), ("org/two", "test", "t")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / folder / f"{name}.jsonl", [{"prompt": prompt, "output": "x"}])
    real = datasets.load_dataset
    asked = []

    def local(repo, **kw):
        asked.append((repo, kw))
        return real(str(tmp_path / repo), **kw)

    monkeypatch.setattr(datasets, "load_dataset", local)
    monkeypatch.setattr(hub, "check_reachable", lambda: True)
    assert [e.instruction for e in load_examples("sni")] == ["long"]
    assert asked[0] == ("MiniLLM/sinst", {"split": "train", "data_dir": "11_"})
    assert sorted(e.instruction for e in load_examples("MiniLLM/sinst")) == ["long", "short"]
    with pytest.raises(InputError, match=r"no train split, and several others \((validation, test|test, validation)\): "
                                         r"name one after a colon \(org/two:(validation|test)\)"):
        load_examples("org/two")
    # a split named after a colon (HuggingFaceH4/ultrachat_200k:train_sft)
    assert [(e.instruction, e.meta["where"]) for e in load_examples("org/two:test")] == [("t", "org/two:test[0]")]
    assert asked[-1] == ("org/two", {"split": "test"})
    assert [e.instruction for e in load_examples("sni:validation")] == ["long"]
    with pytest.raises(InputError, match=r"data 'org/two:nope': not a local file and could not be loaded from the "
                                         r"Hub: Unknown split [^;]*\]; name one of them after the colon "
                                         r"\(org/two:SPLIT\)$"):
        load_examples("org/two:nope")
    # a configuration after a '#', as pretrain-mix's sources name one (HuggingFaceTB/smoltalk#all)
    for config in ("a", "b"):
        (tmp_path / "org/multi" / config).mkdir(parents=True)
        write_jsonl(tmp_path / "org/multi" / config / "train.jsonl", [{"prompt": f"p{config}", "output": "x"}])
    (tmp_path / "org/multi/README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/*.jsonl\n" for c in "ab") + "---\n")
    assert [(e.instruction, e.meta["where"]) for e in load_examples("org/multi#b")] == [("pb", "org/multi#b[0]")]
    assert asked[-1] == ("org/multi", {"split": "train", "name": "b"})
    assert [e.instruction for e in load_examples("org/multi#a:train")] == ["pa"]
    with pytest.raises(InputError, match=r"data 'org/multi': .*Config name is missing\. Please pick one among the "
                                         r"available configs: \['a', 'b'\]; name one after a '#' \(org/multi#CONFIG\)$"):
        load_examples("org/multi")
    # a configuration it lacks (a typo): its configurations named, also offline (the cached dataset
    # answered; it was reported as the Hub being unreachable)
    with pytest.raises(InputError, match=r"data 'org/multi#c:train': .*BuilderConfig 'c' not found\. Available: "
                                         r"\['a', 'b'\]; name one of them after the '#' \(org/multi#CONFIG\)$"):
        load_examples("org/multi#c:train")
    for bad, what in (("org/two:", "a split after the colon"), (":test", "a split after the colon"),
                      ("org/multi#", "a configuration after the '#'"), ("#a", "a configuration after the '#'")):
        with pytest.raises(InputError, match=f"with {what}"):
            load_examples(bad)
    named = tmp_path / "a:b.jsonl"  # (a local file's colon is its name's)
    write_jsonl(named, [{"prompt": "local", "output": "x"}])
    assert [e.instruction for e in load_examples(str(named))] == ["local"]


ULTRACHAT = {"prompt": "Q1", "prompt_id": "x", "messages": [
    {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}


@pytest.mark.parametrize("fields, expected", [
    (dict(response_field="prompt_id"), ("Q2", "", ["x"], ULTRACHAT["messages"][:2])),
    (dict(input_field="prompt_id"), ("Q2", "x", ["A2"], ULTRACHAT["messages"][:2])),
    (dict(response_field="messages"), ("Q2", "", ["A2"], ULTRACHAT["messages"][:2])),
    (dict(prompt_field="prompt", response_field="messages"), ("Q1", "", ["A2"], [])),
])
def test_named_fields_on_conversation_data(tmp_path, fields, expected):
    (ex,) = load_examples(str(write_jsonl(tmp_path / "c.jsonl", [ULTRACHAT])), **fields)
    assert (ex.instruction, ex.input, ex.references, ex.history) == expected


@pytest.mark.parametrize("fields, flag", [(dict(response_field="prompt_id"), "--response-field prompt_id"),
                                         (dict(response_field="messages"), "--response-field messages"),
                                         (dict(prompt_field="prompt", response_field="messages"), "--prompt-field prompt")])
def test_turns_all_refuses_a_named_field_that_makes_one_example_of_a_conversation(tmp_path, fields, flag):
    """(it fell back to the last turn alone, as if --turns all had not been asked for)"""
    p = write_jsonl(tmp_path / "c.jsonl", [ULTRACHAT])
    with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:1: --turns all makes an example of every assistant "
                                         rf"turn of 'messages'; {flag} makes one example of the whole conversation"):
        load_examples(str(p), turns="all", **fields)
    assert len(load_examples(str(p), turns="all", input_field="prompt_id")) == 2  # (an input goes with every turn)


def test_a_named_prompt_on_conversation_data_needs_a_named_answer(tmp_path):
    """--prompt-field replaces the conversation: its last answer (to its last user message, not
    to the named prompt) is not silently dropped -- evaluate would switch to a reference-free
    metric -- nor paired with another question: the answer is asked for."""
    p = write_jsonl(tmp_path / "c.jsonl", [ULTRACHAT])
    with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:1: --prompt-field prompt replaces the whole "
                                         rf"conversation \('messages'\), its answer too: name the answer with "
                                         rf"--response-field"):
        load_examples(str(p), prompt_field="prompt")


def test_roles_in_any_case_and_trl_conversations_that_do_not_end_where_expected(tmp_path):
    caps = {"messages": [{"role": "System", "content": "S"}, {"role": "USER", "content": "Q"},
                         {"from": "GPT", "value": "A"}]}
    (ex,) = load_examples(str(write_jsonl(tmp_path / "c.jsonl", [caps])))
    assert (ex.instruction, ex.references, ex.history) == ("Q", ["A"], [{"role": "system", "content": "S"}])
    user, answer = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    for row, message in (({"prompt": [user], "completion": [user]}, "completion: the last message is not the assistant's"),
                         ({"prompt": [user, answer], "completion": [answer]},
                          "prompt: the prompt's messages end with the assistant's; expected the user's")):
        p = write_jsonl(tmp_path / "t.jsonl", [row])
        with pytest.raises(InputError, match=rf"^{re.escape(str(p))}:1: {message}"):
            load_examples(str(p))


def test_valid_data_conversations_need_the_chat_template(tmp_path):
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits

    plain = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"I{i}", "context": "", "response": "R"}
                                                   for i in range(4)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": [SYSTEM, {"role": "user", "content": "Q"},
                                                                 {"role": "assistant", "content": "A"}]}] * 2)
    with pytest.raises(InputError, match=rf"^{re.escape(str(valid))}:1: 2 of 2 examples are conversations"):
        load_splits(DataOptions(data=str(plain), valid_data=str(valid)))
