"""The synthetic task: deterministic, exact checker, intended answer distributions, tokenizable."""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest

from minillm_cli.errors import InputError
from minillm_cli.toy import task as T
from minillm_cli.toy import words as W

# chi-square critical values at p = 0.001 for 1..16 degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
            9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25}


@pytest.fixture(scope="module")
def big():
    return T.make_task(7, 40000, 300, 300)


def chi2(counts: Counter, probs: dict[str, float]) -> float:
    n = sum(counts.values())
    return sum((counts.get(a, 0) - n * p) ** 2 / (n * p) for a, p in probs.items())


def test_deterministic_and_seeded():
    a = T.make_task(3, 50, 20, 20)
    assert a == T.make_task(3, 50, 20, 20)
    assert a["train"] != T.make_task(4, 50, 20, 20)["train"]
    # splits draw from their own streams: resizing one leaves the others untouched
    b = T.make_task(3, 50, 5, 40)
    assert b["train"] == a["train"] and b["test"][:20] == a["test"] and b["valid"] == a["valid"][:5]
    # ... and the streams differ: test is not a copy of valid, nor valid of the start of train
    assert [r["instruction"] for r in a["valid"]] != [r["instruction"] for r in a["test"]]
    assert [r["instruction"] for r in a["valid"][:3]] != [r["instruction"] for r in a["train"][:3]]


def test_sizes_and_layout():
    d = T.make_task(0, 37, 11, 13)
    assert {k: len(v) for k, v in d.items()} == {"train": 37, "valid": 11, "test": 13}
    for split, rows in d.items():
        for r in rows:
            assert set(r) == {"instruction", "input", "output", "kind", "task_id"}
            assert r["input"] == "" and r["kind"] in T.KINDS
            assert isinstance(r["output"], str if split == "train" else list)
    assert T.make_task(0, 0, 0, 0) == {"train": [], "valid": [], "test": []}
    for bad in [(-1, 1, 1), (1, 1.5, 1), (1, 1, True)]:
        with pytest.raises(InputError):
            T.make_task(0, *bad)


def test_all_kinds_and_families_appear(big):
    rows = big["train"]
    assert {r["kind"] for r in rows} == set(T.KINDS)
    ids = {r["task_id"] for r in rows}
    assert {t for t, *_ in W.MULTIMODAL} | {t for t, *_ in W.COMPOSITIONAL} | set(T.UNIMODAL_FAMILIES) == ids
    # phrasing varies: every template of every family shows up
    instructions = {r["instruction"] for r in rows}
    for _, np, _ in W.MULTIMODAL:
        assert {t.format(np=np) for t in W.MULTIMODAL_TEMPLATES} <= instructions
    for _, phrasings, _ in W.COMPOSITIONAL:
        assert set(phrasings) <= instructions
    share = Counter(r["kind"] for r in rows)
    for kind, w in zip(T.KINDS, T.KIND_WEIGHTS):
        assert abs(share[kind] / len(rows) - w) < 0.02


def test_every_reference_and_train_answer_is_valid(big):
    for r in big["train"]:
        assert T.is_valid(r, r["output"]), r
    for r in big["valid"] + big["test"]:
        assert r["output"] == T.reference_answers(r)
        assert all(T.is_valid(r["instruction"], a) for a in r["output"]), r
    for inst in T._finite_table().values():
        assert all(T.is_valid(inst.instruction, a) for a in inst.answers)


def test_compositional_mixups_are_invalid():
    n_checked = 0
    for task_id, phrasings, parts in W.COMPOSITIONAL:
        # each later part is a function of the first, so the first part names the mode
        assert len({p[0] for p in parts}) == len(parts)
        for p, q in itertools.permutations(parts, 2):
            for k in range(1, len(p)):
                mix = " ".join(p[:k] + q[k:])
                for phrase in phrasings:
                    assert not T.is_valid(phrase, mix), (phrase, mix)
                    n_checked += 1
            assert not T.is_valid(phrasings[0], " ".join(reversed(p)))  # order matters
            assert not T.is_valid(phrasings[0], p[0])  # a part alone is not an answer
    assert n_checked > 500


def test_multimodal_blends_are_invalid():
    for _, np, answers in W.MULTIMODAL:
        instruction = W.MULTIMODAL_TEMPLATES[0].format(np=np)
        for a, b in itertools.permutations(answers, 2):
            assert not T.is_valid(instruction, f"{a} {b}")
            wa, wb = a.split(), b.split()
            if len(wa) == 2 and len(wb) == 2:
                assert not T.is_valid(instruction, f"{wa[0]} {wb[1]}")  # "apple cake"
    assert not T.is_valid("Name a dessert.", "apple cake")
    assert not T.is_valid("Name a hot drink.", "hot tea")


def test_attribute_neighbours_are_invalid():
    # "a red fruit": every other-coloured fruit and every red non-fruit is a near miss
    n_checked = 0
    for cls, things in W.THINGS.items():
        for task_id, np, answers in W.MULTIMODAL:
            if not task_id.endswith("_" + cls):
                continue
            colour = task_id[: -len(cls) - 1]
            instruction = W.MULTIMODAL_TEMPLATES[1].format(np=np)
            assert set(answers) == {n for n, c in things if c == colour}
            for other_cls, other in W.THINGS.items():
                for name, c in other:
                    assert T.is_valid(instruction, name) == (other_cls == cls and c == colour), (instruction, name)
                    n_checked += 1
        # the class prompt accepts exactly the class
        everything = {n for other in W.THINGS.values() for n, _ in other}
        for name in everything:
            assert T.is_valid(f"Name a {cls}.", name) == (name in {n for n, _ in things})
    assert not T.is_valid("Name a red fruit.", "tomato") and T.is_valid("Name a red vegetable.", "tomato")
    assert n_checked > 500
    assert not T.is_valid("Name a hot drink.", "hot tea")


def test_train_answers_follow_the_intended_uneven_distribution(big):
    by_task: dict[str, Counter] = {}
    first: dict[str, dict] = {}
    for r in big["train"]:
        if r["kind"] != "unimodal":
            by_task.setdefault(r["task_id"], Counter())[r["output"]] += 1
            first.setdefault(r["task_id"], r)
    assert len(by_task) == len(W.MULTIMODAL) + len(W.COMPOSITIONAL)
    for task_id, counts in by_task.items():
        probs = T.answer_distribution(first[task_id])
        assert sum(counts.values()) > 200
        assert chi2(counts, probs) < CHI2_999[len(probs) - 1], (task_id, counts)
        # the bound has power: the same counts are far from a uniform distribution
        uniform = {a: 1 / len(probs) for a in probs}
        assert chi2(counts, uniform) > CHI2_999[len(probs) - 1], task_id
        # uneven modes: strictly decreasing probabilities, the top one the most common answer
        p = list(probs.values())
        assert abs(sum(p) - 1) < 1e-12 and all(x > y for x, y in zip(p, p[1:]))
        assert counts.most_common(1)[0][0] == next(iter(probs))


def test_unimodal_answers_are_right(big):
    capitals = {c: cap for c, cap, _ in W.COUNTRIES}
    seen = Counter()
    for r in big["train"] + [dict(r, output=r["output"][0]) for r in big["test"]]:
        ins, out = r["instruction"], r["output"]
        nums = [int(x) for x in re.findall(r"\d+", ins)]
        if r["task_id"] == "add":
            assert int(out) == nums[0] + nums[1]
        elif r["task_id"] == "subtract":
            a, b = (nums[1], nums[0]) if ins.startswith("Subtract") else nums
            assert int(out) == a - b >= 0
        elif r["task_id"] == "capital":
            assert out == capitals[re.search(r"of (\w+)", ins).group(1)]
        elif r["task_id"] == "reverse":
            assert out.split() == ins.split(":")[1].split()[::-1]
        elif r["task_id"] == "copy":
            assert out == ins.split(":")[1].strip()
        else:
            continue
        seen[r["task_id"]] += 1
    assert set(seen) == set(T.UNIMODAL_FAMILIES) and min(seen.values()) > 100
    assert T.reference_answers("What is 3 plus 4?") == ["7"]
    assert T.reference_answers("Subtract 2 from 6.") == ["4"]
    assert T.reference_answers("Compute 6 - 6.") == ["0"]
    assert T.reference_answers("Reverse: j a") == ["a j"]


def test_checker_normalises_and_rejects_near_misses():
    ok = [("Name a red fruit.", "apple"), ("name a red fruit", " Apple.\n"),
          ("Name a red fruit.", "\napple\n\n### Instruction:\nsomething"),
          ("Name a red fruit.", "apple<|endoftext|>cherry cherry"),
          ("Name a red fruit.", "raspberry"), ("What is 3 plus 4?", "7"),
          ("Reverse: a b c", "c b a"), ("Reverse the letters: a  b c", "C B A!"),
          ("Repeat: red cat", "red cat"), ("Repeat: Red cat.", "red cat"), ("Name a country and its capital.", "France, Paris."),
          ("Name a dessert.", "apple   pie"), ("Name an even number below ten.", "4")]
    bad = [("Name a red fruit.", "apples"), ("Name a red fruit.", "appl"),
           ("Name a red fruit.", "apple cherry"), ("Name a red fruit.", "banana"),
           ("Name a red fruit.", ""), ("Name a red fruit.", "   \n  "),
           ("Name a red fruit.", "the apple"), ("What is 3 plus 4?", "8"),
           ("What is 3 plus 4?", "7 7"), ("What is 3 plus 4?", "seven"),
           ("Reverse: a b c", "c a b"), ("Reverse: a b c", "a b c"), ("Reverse: a b c", "cba"),
           ("Repeat: red cat", "red"), ("Name a country and its capital.", "france rome"),
           ("Name a country and its capital.", "paris france"),
           ("Name a country and its capital.", "france"), ("Name an even number below ten.", "3"),
           ("Name an even number below ten.", "10")]
    for ins, ans in ok:
        assert T.is_valid(ins, ans), (ins, ans)
    for ins, ans in bad:
        assert not T.is_valid(ins, ans), (ins, ans)


def test_rates_and_errors():
    ins = ["Name a pet.", "What is 2 plus 2?", "Name a country and its language.", "Copy: sun moon"]
    preds = ["dog", "5", "japan japanese", "sun moon sun"]
    assert T.validity_rate(ins, preds) == 50.0
    assert T.validity_rate([{"instruction": i} for i in ins], preds) == 50.0
    assert T.validity_by_kind(ins, preds) == {"multimodal": 100.0, "unimodal": 0.0, "compositional": 100.0}
    with pytest.raises(InputError):
        T.validity_rate(ins, preds[:3])
    with pytest.raises(InputError):
        T.validity_rate([], [])
    with pytest.raises(InputError):
        T.is_valid("Summarise this article.", "ok")
    with pytest.raises(InputError):  # operands beyond the task's range are not its prompts
        T.is_valid(f"What is {W.MAX_OPERAND + 1} plus 1?", str(W.MAX_OPERAND + 2))


def test_write_jsonl_round_trip(tmp_path):
    rows = T.make_task(1, 5, 3, 0)
    path = T.write_jsonl(rows["train"] + rows["valid"], tmp_path / "sub" / "toy.jsonl")
    back = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert back == rows["train"] + rows["valid"]


def test_pretraining_text_is_deterministic_and_true():
    docs = T.pretraining_text(5, 200)
    assert docs == T.pretraining_text(5, 200) and docs != T.pretraining_text(6, 200)
    assert len(docs) == 200 and T.pretraining_text(5, 0) == []
    capitals = {cap: c for c, cap, _ in W.COUNTRIES}
    n_sums = 0
    for doc in docs:
        for s in doc.split(". "):
            m = re.fullmatch(r"(\d) plus (\d) is (\d+)\.?", s)
            if m:
                assert int(m[1]) + int(m[2]) == int(m[3])
                n_sums += 1
            m = re.fullmatch(r"(\w+) is the capital of (\w+)\.?", s)
            if m:
                assert capitals[m[1]] == m[2]
    assert n_sums > 20


def test_tokenizer_from_corpus_covers_everything(tmp_path):
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    d = T.make_task(2, 2000, 100, 100)
    tok = train_bpe_tokenizer(T.corpus_texts(d["train"]) + T.pretraining_text(2, 200),
                              tmp_path / "tok", vocab_size=768)
    answers = {a for r in d["test"] + d["valid"] for a in r["output"]}
    answers |= {a for _, _, ans in W.MULTIMODAL for a in ans}
    for r in d["train"] + d["test"]:
        text = f"{W.DOLLY_HEADER}{r['instruction']}{W.DOLLY_RESPONSE}"
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(tok(r["instruction"])["input_ids"]) <= 16  # prompts stay short
        assert len(ids) <= 48
    for a in answers:
        ids = tok(a)["input_ids"]
        assert tok.decode(ids) == a and len(ids) <= 12, a


def test_families_restrict_sampling():
    keep = ["red_fruit", "country_capital", "add"]
    d = T.make_task(0, 400, 50, 50, families=keep)
    assert {r["task_id"] for split in d.values() for r in split} == set(keep)
    only = T.make_task(0, 100, 0, 0, families=["dessert", "hot_drink"])["train"]
    assert {r["kind"] for r in only} == {"multimodal"} and len(only) == 100
    assert T.make_task(0, 30, 5, 5, families=None) == T.make_task(0, 30, 5, 5)
    for bad in (["no_such_family"], []):
        with pytest.raises(InputError):
            T.make_task(0, 0, 0, 0, families=bad)
