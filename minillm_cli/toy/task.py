"""The synthetic instruction task behind `minillm quickstart`: MiniLLM's claim in miniature.

Three kinds of prompt, each with an exact checker (the world is closed: `words.py`):
- multimodal: "Name a red fruit." -> apple / strawberry / cherry / raspberry. Training answers are
  drawn with Zipf probabilities (rank r gets weight 1/r), so the teacher learns several modes of
  uneven mass. Prompts overlap ("a red fruit", "a red vegetable", "a yellow fruit", "a fruit"), so
  a small student that spreads mass (forward KL) lands on a neighbour's answer ("tomato") or a
  blend ("apple cake"); one that seeks modes (reverse KL) can stay on "apple".
- compositional: "Name a country and its capital." -> "france paris". Every later part is fixed by
  the first, so a part from one mode followed by a part from another ("france rome") is invalid:
  the failure that mass-covering invites and mode-seeking avoids.
- unimodal: arithmetic, capitals, reversing letters, copying words: one right answer.

Rows follow the MiniLLM/Alpaca layout. Train rows carry ONE sampled answer (a string) so SFT learns
the uneven distribution; valid/test rows carry the list of every valid answer (the references for
ROUGE-L), most probable first. The instruction alone decides validity, so the checker needs only
the instruction. Prompts repeat across splits by design (the families are closed): evaluation
measures how a student reproduces the teacher's answer distribution, not generalisation.

Validity rule (the model's raw decoded response): cut at the first EOS marker and keep the first
non-empty line (a response is one line; what follows a newline is junk after the answer), lower-case
it, turn the punctuation . , ; : ! ? " ' into spaces, collapse whitespace; the answer is valid iff
the result equals one valid answer exactly. Extra words on the same line ("apple cherry") make it
invalid: a model must stop.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from minillm_cli.errors import InputError
from minillm_cli.toy import words as W

KINDS = ("multimodal", "compositional", "unimodal")
# The two multi-mode kinds carry the experiment; unimodal rows keep the student honest on tasks
# where mode-seeking cannot help.
KIND_WEIGHTS = (0.4, 0.3, 0.3)
UNIMODAL_FAMILIES = ("add", "subtract", "capital", "reverse", "copy")
EOS_MARKER = "<|endoftext|>"


@dataclass(frozen=True)
class Instance:
    """One prompt and its exact answer distribution (answers most probable first)."""

    kind: str
    task_id: str
    instruction: str
    answers: tuple[str, ...]
    probs: tuple[float, ...]


def zipf(n: int) -> tuple[float, ...]:
    """Probabilities of ranks 1..n proportional to 1/r: one major mode, a tail of minor ones."""
    weights = [1.0 / r for r in range(1, n + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


# ---------------------------------------------------------------- normalisation and lookup
_PUNCT = re.compile(r"[.,;:!?\"']")


def normalize_answer(text: str) -> str:
    """The canonical form the checker compares (see the module docstring)."""
    text = text.split(EOS_MARKER, 1)[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return " ".join(_PUNCT.sub(" ", first.lower()).split())


def _instruction_key(instruction: str) -> str:
    # Case, spacing and a trailing full stop or question mark do not change which prompt it is.
    return " ".join(instruction.lower().split()).rstrip(".?!").rstrip()


def _finite_instances() -> list[Instance]:
    out: list[Instance] = []
    for task_id, np, answers in W.MULTIMODAL:
        probs = zipf(len(answers))
        for t in W.MULTIMODAL_TEMPLATES:
            out.append(Instance("multimodal", task_id, t.format(np=np), tuple(answers), probs))
    for task_id, phrasings, parts in W.COMPOSITIONAL:
        answers = tuple(" ".join(p) for p in parts)
        for phrase in phrasings:
            out.append(Instance("compositional", task_id, phrase, answers, zipf(len(answers))))
    for a in range(W.MAX_OPERAND + 1):
        for b in range(W.MAX_OPERAND + 1):
            for t in W.ADD_TEMPLATES:
                out.append(Instance("unimodal", "add", t.format(a=a, b=b), (str(a + b),), (1.0,)))
            if a >= b:
                for t in W.SUB_TEMPLATES:
                    out.append(Instance("unimodal", "subtract", t.format(a=a, b=b), (str(a - b),), (1.0,)))
    for country, capital, _ in W.COUNTRIES:
        for t in W.CAPITAL_TEMPLATES:
            out.append(Instance("unimodal", "capital", t.format(country=country), (capital,), (1.0,)))
    return out


@lru_cache(maxsize=1)
def _finite_table() -> dict[str, Instance]:
    table: dict[str, Instance] = {}
    for inst in _finite_instances():
        key = _instruction_key(inst.instruction)
        # Two prompts that normalise alike but want different answers would make the checker lie.
        if key in table and table[key].answers != inst.answers:
            raise AssertionError(f"ambiguous toy instruction: {inst.instruction!r}")
        table[key] = inst
    return table


def _sequence_patterns():
    """(regex over the instruction key, task_id, answer from the parsed sequence) for open families."""
    def pat(templates):
        heads = "|".join(re.escape(_instruction_key(t.split("{seq}")[0])) for t in templates)
        return re.compile(rf"^(?:{heads})\s*(.+)$")
    return [
        (pat(W.REVERSE_TEMPLATES), "reverse", lambda seq: " ".join(reversed(seq.split()))),
        (pat(W.COPY_TEMPLATES), "copy", lambda seq: " ".join(seq.split())),
    ]


_SEQ_PATTERNS = _sequence_patterns()


def lookup(row_or_instruction) -> Instance:
    """The instance an instruction (or a row with an "instruction") belongs to; InputError if none."""
    instruction = (row_or_instruction["instruction"] if isinstance(row_or_instruction, dict)
                   else row_or_instruction)
    if not isinstance(instruction, str):
        raise InputError(f"toy task: instruction must be a string, got {type(instruction).__name__}")
    key = _instruction_key(instruction)
    inst = _finite_table().get(key)
    if inst is not None:
        return inst
    for regex, task_id, answer in _SEQ_PATTERNS:
        m = regex.match(" ".join(instruction.lower().split()))
        if m:
            # the sequence goes through the answer normaliser so "Repeat: Red cat." wants "red cat"
            return Instance("unimodal", task_id, instruction, (answer(normalize_answer(m.group(1))),), (1.0,))
    raise InputError(f"toy task: instruction {instruction!r} is not one of the synthetic task's prompts")


def reference_answers(row_or_instruction) -> list[str]:
    """Every valid answer, most probable first."""
    return list(lookup(row_or_instruction).answers)


def answer_distribution(row_or_instruction) -> dict[str, float]:
    """The exact answer distribution training answers are drawn from."""
    inst = lookup(row_or_instruction)
    return dict(zip(inst.answers, inst.probs))


def is_valid(row_or_instruction, answer: str) -> bool:
    """True iff the normalised `answer` equals one valid answer of the instruction exactly."""
    return normalize_answer(answer) in lookup(row_or_instruction).answers


def _check_pairs(instructions: Sequence, predictions: Sequence[str]) -> None:
    if len(instructions) != len(predictions):
        raise InputError(f"toy task: {len(instructions)} instructions but {len(predictions)} predictions")
    if not instructions:
        raise InputError("toy task: no predictions to score")


def validity_rate(instructions: Sequence, predictions: Sequence[str]) -> float:
    """Percentage (0-100) of predictions that are valid answers to their instruction (or row)."""
    _check_pairs(instructions, predictions)
    hits = sum(is_valid(i, p) for i, p in zip(instructions, predictions))
    return 100.0 * hits / len(predictions)


def validity_by_kind(instructions: Sequence, predictions: Sequence[str]) -> dict[str, float]:
    """Validity rate per kind present (the effect should show in multimodal/compositional only)."""
    _check_pairs(instructions, predictions)
    hits: dict[str, list[int]] = {}
    for i, p in zip(instructions, predictions):
        hits.setdefault(lookup(i).kind, []).append(int(is_valid(i, p)))
    return {k: 100.0 * sum(v) / len(v) for k, v in hits.items()}


# ---------------------------------------------------------------- sampling
def _pick(rng: random.Random, items: Sequence, probs: Sequence[float]):
    return rng.choices(items, weights=probs, k=1)[0]


_MULTIMODAL = {task_id: (np, answers) for task_id, np, answers in W.MULTIMODAL}
_COMPOSITIONAL = {task_id: (phrasings, parts) for task_id, phrasings, parts in W.COMPOSITIONAL}
FAMILIES = {"multimodal": tuple(_MULTIMODAL), "compositional": tuple(_COMPOSITIONAL),
            "unimodal": UNIMODAL_FAMILIES}


def _allowed(families: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    if families is None:
        return FAMILIES
    known = {f for fams in FAMILIES.values() for f in fams}
    unknown = sorted(set(families) - known)
    if unknown or not families:
        raise InputError(f"toy task: unknown families {unknown} (known: {sorted(known)})"
                         if unknown else "toy task: families must name at least one family")
    return {k: tuple(f for f in fams if f in set(families)) for k, fams in FAMILIES.items()}


def sample_instance(rng: random.Random, families: Sequence[str] | None = None) -> Instance:
    """Draw one prompt: a kind by KIND_WEIGHTS (renormalised over the kinds `families` leaves),
    a family uniformly within it, then its free slots."""
    allowed = _allowed(families)
    kinds = [k for k in KINDS if allowed[k]]
    kind = _pick(rng, kinds, [KIND_WEIGHTS[KINDS.index(k)] for k in kinds])
    family = rng.choice(allowed[kind])
    if kind == "multimodal":
        instruction = rng.choice(W.MULTIMODAL_TEMPLATES).format(np=_MULTIMODAL[family][0])
    elif kind == "compositional":
        instruction = rng.choice(_COMPOSITIONAL[family][0])
    elif family == "add":
        instruction = rng.choice(W.ADD_TEMPLATES).format(a=rng.randint(0, W.MAX_OPERAND),
                                                     b=rng.randint(0, W.MAX_OPERAND))
    elif family == "subtract":
        a = rng.randint(0, W.MAX_OPERAND)
        instruction = rng.choice(W.SUB_TEMPLATES).format(a=a, b=rng.randrange(a + 1))
    elif family == "capital":
        instruction = rng.choice(W.CAPITAL_TEMPLATES).format(country=rng.choice(W.COUNTRIES)[0])
    elif family == "reverse":
        seq = " ".join(rng.sample(W.LETTERS, rng.randint(*W.REVERSE_LENGTHS)))
        instruction = rng.choice(W.REVERSE_TEMPLATES).format(seq=seq)
    else:
        seq = " ".join(rng.choice(W.COPY_WORDS) for _ in range(rng.randint(*W.COPY_LENGTHS)))
        instruction = rng.choice(W.COPY_TEMPLATES).format(seq=seq)
    return lookup(instruction)


def _row(inst: Instance, output) -> dict:
    return {"instruction": inst.instruction, "input": "", "output": output,
            "kind": inst.kind, "task_id": inst.task_id}


def make_task(seed: int, n_train: int, n_valid: int, n_test: int, *,
              families: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """{"train", "valid", "test"} rows. Each split has its own random stream, so changing one
    size never changes the rows of another split. `families` (task ids, see FAMILIES) keeps only
    those families, e.g. the multi-mode ones for a faster run; None keeps all."""
    _allowed(families)  # fail on a bad list even when every size is 0
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InputError(f"toy task: {name} must be a non-negative integer, got {n!r}")
    out: dict[str, list[dict]] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        rng = random.Random(f"minillm-toy/{seed}/{split}")
        rows = []
        for _ in range(n):
            inst = sample_instance(rng, families)
            if split == "train":
                rows.append(_row(inst, _pick(rng, inst.answers, inst.probs)))
            else:
                rows.append(_row(inst, list(inst.answers)))
        out[split] = rows
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line, UTF-8; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- text for tokenizer and PT loss
_PARTS = {task_id: parts for task_id, _, parts in W.COMPOSITIONAL}


def _facts(rng: random.Random) -> str:
    """One sentence stating a fact of the closed world."""
    family = rng.randrange(7)
    if family == 0:
        _, np, answers = rng.choice(W.MULTIMODAL)
        return f"{rng.choice(answers)} is {np}."
    if family == 1:
        country, capital, language = rng.choice(W.COUNTRIES)
        return rng.choice([f"{capital} is the capital of {country}.",
                           f"people in {country} speak {language}."])
    if family == 2:
        colour, obj = rng.choice(_PARTS["colour_object"])
        return f"the {obj} is {colour}."
    if family == 3:
        animal, sound = rng.choice(_PARTS["animal_sound"])
        return f"the {animal} says {sound}."
    if family == 4:
        a, b = rng.randint(0, W.MAX_OPERAND), rng.randint(0, W.MAX_OPERAND)
        return f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else \
            f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}."
    if family == 5:
        seq = rng.sample(W.LETTERS, rng.randint(*W.REVERSE_LENGTHS))
        return f"{' '.join(seq)} backwards is {' '.join(reversed(seq))}."
    seq = " ".join(rng.choice(W.COPY_WORDS) for _ in range(rng.randint(*W.COPY_LENGTHS)))
    return f"{seq} said again is {seq}."


def pretraining_text(seed: int, n_docs: int) -> list[str]:
    """`n_docs` short documents (3-8 fact sentences) of "general text" for the PT loss."""
    if not isinstance(n_docs, int) or n_docs < 0:
        raise InputError(f"toy task: n_docs must be a non-negative integer, got {n_docs!r}")
    rng = random.Random(f"minillm-toy/{seed}/pretrain")
    return [" ".join(_facts(rng) for _ in range(rng.randint(3, 8))) for _ in range(n_docs)]


def corpus_texts(rows: Iterable[dict]) -> list[str]:
    """Texts to train the tokenizer on: each row as the model will see it (Dolly prompt and answer),
    then every answer of the closed world once, so rare tail answers still get their merges."""
    texts = []
    for r in rows:
        output = r["output"] if isinstance(r["output"], str) else "\n".join(r["output"])
        texts.append(f"{W.DOLLY_HEADER}{r['instruction']}{W.DOLLY_RESPONSE}{output}")
    texts.extend("\n".join(answers) for _, _, answers in W.MULTIMODAL)
    texts.extend("\n".join(" ".join(p) for p in parts) for parts in _PARTS.values())
    return texts
