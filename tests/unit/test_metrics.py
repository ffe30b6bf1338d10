"""Generation metrics on hand-worked examples, the registry, aggregation and length buckets."""
from __future__ import annotations

import math
import statistics

import pytest
from rouge_score import rouge_scorer

from minillm_cli.errors import InputError
from minillm_cli.eval import metrics as M


def test_rouge_l_matches_rouge_score_and_takes_max_over_references():
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred = "the cat sat on the mat today"
    refs = ["a dog lay on a rug", "the cat was sitting on the mat"]
    direct = [sc.score(r, pred)["rougeL"].fmeasure * 100 for r in refs]
    assert direct[1] > direct[0] > 0  # the example really exercises the max
    assert M.rouge_l(pred, refs) == pytest.approx(max(direct))
    # LCS by hand for the second reference: "the cat on the mat" = 5 tokens; stemmed
    # "sitting"->"sit" but "sat" stays, so P = 5/7, R = 5/7, F = 5/7.
    assert M.rouge_l(pred, refs[1:]) == pytest.approx(100 * 5 / 7)


def test_rouge_l_uses_stemming():
    assert M.rouge_l("cats running", ["cat runs"]) == pytest.approx(100.0)


def test_rouge_l_without_references_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        M.rouge_l("anything", [])
    with pytest.raises(TypeError):
        M.rouge_l("anything", "a plain string is not a list of references")


@pytest.mark.parametrize("pred, refs, expected", [
    ("The Apple!", ["the apple"], 100.0),
    ("  an   apple. ", ["An Apple"], 100.0),
    ("The Apple!", ["apple"], 0.0),  # articles count, as in S-NI's and the reference code's normalisation
    ("apples", ["apple"], 0.0),
    ("Paris", ["London", "paris,"], 100.0),
    ("?!", [""], 100.0),  # both normalise to the empty string
])
def test_exact_match_normalisation(pred, refs, expected):
    assert M.exact_match(pred, refs) == expected


def test_distinct_n_on_crafted_strings():
    # 4-grams: (a b c d), (b c d e) from the first; (a b c d) again from the second: 2 of 3 distinct.
    assert M.distinct_n(["a b c d e", "a b c d"], 4) == pytest.approx(200 / 3)
    assert M.distinct_n(["a b c d e f"], 4) == pytest.approx(100.0)
    assert M.distinct_n(["x x x x x x"], 4) == pytest.approx(100 / 3)  # one distinct of three
    # n-grams never span two generations: two 3-token outputs hold no 4-gram at all.
    assert M.distinct_n(["a b c", "d e f"], 4) == 0.0
    assert M.distinct_n(["a b", "a b"], 1) == pytest.approx(50.0)


def test_score_generations_per_seed_values():
    preds = ["the cat", "a dog barked"]
    refs = [["the cat"], ["dog"]]
    expected = (M.rouge_l(preds[0], refs[0]) + M.rouge_l(preds[1], refs[1])) / 2
    assert M.score_generations("rougeL", preds, refs) == pytest.approx(expected)
    assert M.score_generations("exact-match", preds, refs) == pytest.approx(50.0)
    assert M.score_generations("dist4", ["a b c d e"]) == pytest.approx(100.0)
    ok = M.score_generations("validity", ["4", "5", "6"], prompts=["2+2", "2+2", "3+3"],
                             validity=lambda q, p: {"2+2": "4", "3+3": "6"}[q] == p)
    assert ok == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        M.score_generations("rougeL", preds, None)
    with pytest.raises(ValueError):
        M.score_generations("validity", preds)


def test_registry_validation_and_aliases():
    assert M.validate_metric_names(["rouge-l", "dist-4", "rougeL", "reverse_kl"]) == \
        ["rougeL", "dist4", "reverse-kl"]
    with pytest.raises(InputError) as e:
        M.validate_metric_names(["rougeL", "bleu"])
    assert "bleu" in str(e.value) and "rougeL" in str(e.value) and "dist4" in str(e.value)
    with pytest.raises(InputError):
        M.validate_metric_names(["judge"])  # compare's metric, not something evaluate computes
    assert M.needs_references("rougeL") and M.needs_references("exact-match")
    assert not M.needs_references("dist4") and not M.needs_references("validity")
    assert M.METRICS["reverse-kl"].needs_teacher and not M.METRICS["lm-loss"].needs_teacher


@pytest.mark.parametrize("name, up", [
    ("rougeL", True), ("dist4", True), ("lm-loss", False), ("reverse-kl", False),
    ("train.valid_loss", False), ("train.reverse_kl", False), ("train.reward", True),
    ("train.grad_norm", None),
])
def test_direction(name, up):
    assert M.higher_is_better(name) is up


def test_aggregate_uses_sample_std():
    agg = M.aggregate([1.0, 2.0, 3.0])
    assert agg["mean"] == pytest.approx(2.0)
    assert agg["std"] == pytest.approx(1.0)  # ddof=1; the population std would be 0.816
    assert agg["per_seed"] == [1.0, 2.0, 3.0]
    assert M.aggregate([7.0]) == {"mean": 7.0, "std": 0.0, "per_seed": [7.0]}
    with pytest.raises(ValueError):
        M.aggregate([])
    with pytest.raises(ValueError):
        M.aggregate([1.0, math.nan])


def test_length_buckets_and_by_length():
    assert M.length_buckets([0, 5, 6, 20, 21, 300]) == ["<=5", "<=5", "6-20", "6-20", ">20", ">20"]
    buckets = M.length_buckets([3, 10, 4])
    seeds = [[10.0, 50.0, 30.0], [20.0, 70.0, 40.0]]  # two seeds, three examples
    out = M.aggregate_by_length(seeds, buckets)
    assert set(out) == {"<=5", "6-20"}  # empty buckets are left out
    assert out["<=5"]["n"] == 2 and out["<=5"]["per_seed"] == [20.0, 30.0]
    assert out["<=5"]["std"] == pytest.approx(statistics.stdev([20.0, 30.0]))
    assert out["6-20"]["per_seed"] == [50.0, 70.0]


def test_rouge_l_is_not_rouge_lsum():
    """The paper's rougeL ignores newlines (one LCS over the whole text): LCS(a b c d, c d a b) = 2,
    F = 50; rougeLsum (per line) would give 100 on these multi-line answers."""
    assert M.rouge_l("a b\nc d", ["c d\na b"]) == pytest.approx(50.0)


def test_distinct_n_is_case_sensitive():
    assert M.distinct_n(["A b c d", "a b c d"], 4) == pytest.approx(100.0)
