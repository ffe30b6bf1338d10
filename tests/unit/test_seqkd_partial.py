"""seqkd's partial answer files (engine/baselines.py): what a resumed generation takes from them."""
from __future__ import annotations

from minillm_cli.data.examples import Example
from minillm_cli.engine.baselines import _end_line, _partial_answers, _row, partial_paths


def test_a_torn_last_line_loses_no_row_appended_after_it(tmp_path):
    examples = [Example(instruction=f"q{i}") for i in range(4)]
    path, prompts = tmp_path / "seqkd_data.jsonl", {i: [1] for i in range(4)}
    rows = [_row(examples, i, f"a{i}", True) for i in range(4)]
    part = partial_paths(path, 0)
    for torn in (rows[1][:20], rows[1][:-1]):  # cut inside the row; cut before its newline
        part.write_text(rows[0] + torn)
        _end_line(part)
        with open(part, "a", encoding="utf-8") as fh:  # the resumed run's next chunk
            fh.write(rows[2] + rows[3])
        kept = _partial_answers(path, prompts, examples)
        assert {0, 2, 3} <= set(kept) and kept[2] == ("a2", True)


def test_rows_of_other_prompts_at_the_same_index_are_not_taken(tmp_path):
    """The data changed under the same path between the stop and the --resume."""
    old = [Example(instruction=f"q{i}") for i in range(3)]
    new = [Example(instruction=f"q{i}") for i in (2, 1, 0)]
    path = tmp_path / "seqkd_data.jsonl"
    partial_paths(path, 0).write_text("".join(_row(old, i, f"a{i}", True) for i in range(3)))
    assert set(_partial_answers(path, {i: [1] for i in range(3)}, new)) == {1}


def test_a_conversation_asked_after_other_turns_is_another_prompt(tmp_path):
    """The same last question after another history (the data changed) is not the answered one."""
    system = [{"role": "system", "content": "Be brief."}]
    old = [Example("q", history=system), Example("q", history=system)]
    new = [Example("q", history=system), Example("q", history=[{"role": "system", "content": "Be long."}])]
    path = tmp_path / "seqkd_data.jsonl"
    partial_paths(path, 0).write_text("".join(_row(old, i, f"a{i}", True) for i in range(2)))
    assert _partial_answers(path, {0: [1], 1: [1]}, new) == {0: ("a0", True)}
    partial_paths(path, 0).write_text(_row([Example("q")], 0, "a", True))  # (rows without history: plain prompts)
    assert _partial_answers(path, {0: [1]}, [Example("q")]) == {0: ("a", True)}
