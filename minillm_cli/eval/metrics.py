"""Generation metrics of the MiniLLM evaluation protocol, and the registry of every metric name.

Pure Python (no torch): ROUGE-L comes from the `rouge_score` package with stemming, F1 x 100, max
over references, exactly as the paper and its reference code score it; exact match uses the usual
SQuAD normalisation; distinct-4 is the paper's diversity measure over all generations of a seed.
Model metrics (lm-loss, reverse-kl, forward-kl) are computed by `evaluate` with the models loaded;
they are listed here so that names are validated, and compare knows which way is better, in one place.
"""
from __future__ import annotations

import math
import statistics
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Optional, Sequence

from minillm_cli.errors import InputError


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "generation": scored on sampled text; "model": computed from the models' logits
    needs_references: bool
    higher_is_better: bool
    needs_teacher: bool = False
    description: str = ""


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in [
        MetricSpec("rougeL", "generation", True, True,
                   description="ROUGE-L F1 x100 (rouge_score, stemmed), max over references"),
        MetricSpec("exact-match", "generation", True, True,
                   description="normalised exact match x100, max over references"),
        MetricSpec("dist4", "generation", False, True,
                   description="distinct 4-grams / all 4-grams x100 over a seed's generations"),
        MetricSpec("validity", "generation", False, True,
                   description="share of generations the task's oracle accepts x100 (toy task)"),
        MetricSpec("lm-loss", "model", True, False,
                   description="token-level cross-entropy of the reference responses"),
        MetricSpec("reverse-kl", "model", False, False, needs_teacher=True,
                   description="KL(student || teacher) per token on the student's own samples"),
        MetricSpec("forward-kl", "model", False, False, needs_teacher=True,
                   description="KL(teacher || student) per token on the student's own samples"),
        # Not computed by evaluate: compare adds it when an LLM judge is asked for (judge.py).
        MetricSpec("judge", "judge", False, True,
                   description="LLM-judge score of the candidate relative to a reference model x100"),
    ]
}

# Spellings users type for the same metric; names are canonicalised before anything else.
ALIASES = {
    "rouge-l": "rougeL", "rougel": "rougeL", "rouge_l": "rougeL",
    "em": "exact-match", "exact_match": "exact-match", "exactmatch": "exact-match",
    "distinct-4": "dist4", "dist-4": "dist4", "distinct4": "dist4",
    "lm_loss": "lm-loss", "loss": "lm-loss",
    "reverse_kl": "reverse-kl", "rkl": "reverse-kl", "forward_kl": "forward-kl", "fkl": "forward-kl",
}


def canonical_name(name: str) -> str:
    name = name.strip()
    return name if name in METRICS else ALIASES.get(name.lower(), name)


def validate_metric_names(names: Iterable[str]) -> list[str]:
    """Canonical names in the order given (duplicates dropped); InputError names the unknown one."""
    out: list[str] = []
    for raw in names:
        name = canonical_name(raw)
        if name not in METRICS or METRICS[name].kind == "judge":
            known = ", ".join(n for n, m in METRICS.items() if m.kind != "judge")
            raise InputError(f"unknown metric {raw!r}; known metrics: {known}")
        if name not in out:
            out.append(name)
    return out


def needs_references(name: str) -> bool:
    return METRICS[canonical_name(name)].needs_references


def higher_is_better(name: str) -> Optional[bool]:
    """Direction of a metric for compare: the registry first, then a guess from the name of a
    training-log key (losses and divergences go down, rewards and scores go up), else None."""
    base = name.split(".", 1)[1] if name.startswith("train.") else name
    if canonical_name(base) in METRICS:
        return METRICS[canonical_name(base)].higher_is_better
    low = base.lower()
    if any(k in low for k in ("loss", "kl", "ppl", "perplexity", "entropy_gap")):
        return False
    if any(k in low for k in ("reward", "rouge", "acc", "valid", "dist", "score", "judge")):
        return True
    return None


# ---------------------------------------------------------------------------- per-example scores
@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported lazily: pulls in nltk's stemmer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_refs(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not a string")
    if not references:
        raise ValueError("no reference answer to score against (this metric needs references)")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 x100, the max over references (the reference code's `rouge` scoring)."""
    _check_refs(references)
    scorer = _rouge_scorer()
    # rouge_score.score(target, prediction): the reference comes first.
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references) * 100.0


def rouge_scorable(text: str) -> bool:
    """Whether ROUGE-L sees any word in `text`: rouge_score's tokenizer (the paper's protocol)
    lowercases and keeps only a-z and 0-9, so Chinese, Japanese, Cyrillic... text scores 0."""
    from rouge_score import tokenize

    return bool(tokenize.tokenize(text, None))


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, squeeze whitespace: SQuAD's normalisation without its removal
    of English articles, as S-NI's evaluation and the MiniLLM reference code normalise ("an apple"
    and "apple" differ)."""
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 when the normalised prediction equals any normalised reference, else 0."""
    _check_refs(references)
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(r) for r in references) else 0.0


def distinct_n(predictions: Sequence[str], n: int = 4) -> float:
    """Distinct n-grams / total n-grams x100 over all generations of one seed (whitespace tokens).

    n-grams never cross generations. With no n-gram at all (every output shorter than n tokens)
    there is nothing to be diverse about and the value is 0.0 rather than undefined.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in predictions:
        toks = text.split()
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i:i + n]))
            total += 1
    return 100.0 * len(seen) / total if total else 0.0


def score_generations(
    name: str,
    predictions: Sequence[str],
    references: Optional[Sequence[Sequence[str]]] = None,
    *,
    prompts: Optional[Sequence[str]] = None,
    validity: Optional[Callable[[str, str], bool]] = None,
) -> float:
    """One seed's value of a generation metric over all examples.

    rougeL / exact-match: mean of per-example scores. dist4: corpus-level over the seed's outputs.
    validity: share x100 of (prompt, prediction) pairs the task's oracle `validity` accepts.
    """
    name = canonical_name(name)
    if not predictions:
        raise ValueError("no predictions to score")
    if name in ("rougeL", "exact-match"):
        if references is None or len(references) != len(predictions):
            raise ValueError(f"{name} needs one list of references per prediction")
        fn = rouge_l if name == "rougeL" else exact_match
        return statistics.fmean(fn(p, refs) for p, refs in zip(predictions, references))
    if name == "dist4":
        return distinct_n(predictions, 4)
    if name == "validity":
        if validity is None or prompts is None or len(prompts) != len(predictions):
            raise ValueError("validity needs the task's oracle and one prompt per prediction")
        return 100.0 * sum(bool(validity(q, p)) for q, p in zip(prompts, predictions)) / len(predictions)
    raise ValueError(f"{name} is not a generation metric")


# ---------------------------------------------------------------------------- across seeds
def aggregate(per_seed_values: Sequence[float]) -> dict:
    """{"mean", "std", "per_seed"}: std is the *sample* std (ddof=1) across seeds, 0.0 with one
    seed, so "mean ± std" over the paper's 5 seeds estimates the spread of a fresh seed."""
    vals = [float(v) for v in per_seed_values]
    if not vals:
        raise ValueError("no per-seed values to aggregate")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite per-seed value in {vals}")
    std = statistics.stdev(vals) if len(vals) >= 2 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "per_seed": vals}


# ---------------------------------------------------------------------------- length analysis
# The paper's analysis by golden-response length (S-NI/UnNI): short answers (<= 5 tokens) are where
# distillation methods differ most, so results are split at 5 and 20 tokens.
LENGTH_BUCKETS = ("<=5", "6-20", ">20")


def length_bucket(n_tokens: int) -> str:
    if n_tokens <= 5:
        return "<=5"
    return "6-20" if n_tokens <= 20 else ">20"


def length_buckets(reference_token_counts: Sequence[int]) -> list[str]:
    """The bucket of each example from the token count of its (first) reference answer."""
    return [length_bucket(int(c)) for c in reference_token_counts]


def aggregate_by_length(per_seed_scores: Sequence[Sequence[float]], buckets: Sequence[str]) -> dict:
    """Per-example scores of each seed (all seeds list the examples in one order) → for each
    non-empty bucket {"n", "mean", "std", "per_seed"} with the per-seed mean over its examples."""
    out: dict[str, dict] = {}
    for b in LENGTH_BUCKETS:
        idx = [i for i, x in enumerate(buckets) if x == b]
        if not idx:
            continue
        per_seed = []
        for scores in per_seed_scores:
            if len(scores) != len(buckets):
                raise ValueError("each seed needs one score per example")
            per_seed.append(statistics.fmean(scores[i] for i in idx))
        out[b] = {"n": len(idx), **aggregate(per_seed)}
    return out
