"""Which weights a training run leaves in OUT (`--select-by`), and the validation ROUGE-L behind
the paper's choice.

The reference code picks every model it reports (SFT, KD, SeqKD and MiniLLM alike) as the
checkpoint with the best ROUGE-L on the validation set. `--select-by rougeL` does that inside the
run: at every validation (`--eval-every`, and after the last step) the trained model answers each
validation prompt once by `minillm evaluate`'s protocol, and OUT receives the weights whenever the
score beats every earlier one. `loss` does the same by validation loss (sft's default), `reverse-kl`
by MiniLLM's `valid_reverse_kl`, `last` keeps the final weights (distill's default).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from minillm_cli.errors import InputError  # (no torch at import: the CLI reads SELECT_BY)

# --select-by value -> (metrics.jsonl column, higher is better); `last` has no column
SELECT_BY = {"last": (None, None), "loss": ("valid_loss", False), "rougeL": ("valid_rougeL", True),
             "reverse-kl": ("valid_reverse_kl", False)}
_SPELLINGS = {"rouge-l": "rougeL", "rougel": "rougeL", "rouge_l": "rougeL", "valid-loss": "loss",
              "reverse_kl": "reverse-kl", "rkl": "reverse-kl", "final": "last"}


def canonical_select(name: str) -> str:
    """The --select-by value as SELECT_BY spells it; InputError for an unknown one."""
    known = {**{k.lower(): k for k in SELECT_BY}, **_SPELLINGS}  # (any letter case)
    found = known.get(str(name).strip().lower())
    if found is None:
        raise InputError(f"--select-by {str(name).strip()!r}: expected one of {', '.join(SELECT_BY)}")
    return found


@dataclass
class Best:
    """The best validation value so far of the selection metric, and its step (None: none yet)."""
    select_by: str
    value: float | None = None
    step: int | None = None

    @property
    def column(self) -> str | None:
        return SELECT_BY[self.select_by][0]

    @property
    def keeps_best(self) -> bool:
        return self.column is not None

    def improves(self, value: float | None) -> bool:
        """Whether `value` beats every earlier one (a tie keeps the earlier step)."""
        if not self.keeps_best or value is None or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if SELECT_BY[self.select_by][1] else value < self.value

    def record(self, value: float, step: int) -> None:
        self.value, self.step = float(value), step

    def state(self) -> dict:
        return {"select_by": self.select_by, "value": self.value, "step": self.step}

    @classmethod
    def from_state(cls, select_by: str, state: dict | None) -> "Best":
        """A checkpoint's record; one written before --select-by ({"valid_loss", "step"}) reads as
        selection by loss."""
        best = cls(select_by)
        if not isinstance(state, dict):
            return best
        if "select_by" not in state and "valid_loss" in state:
            state = {"select_by": "loss", "value": state["valid_loss"], "step": state.get("step")}
        if state.get("select_by") == select_by and state.get("step") is not None:
            v = state.get("value")
            best.value, best.step = (float(v) if v is not None else None), state["step"]
        return best

    # next to the weights in OUT: the record of the step they are (`mark`, `reconcile`)
    MARKER = "selected.json"

    def mark(self, out, *, pending: bool = False) -> None:
        """Say in OUT which step's weights are there (rank 0): with `pending` right before they are
        saved, then plainly right after, so that a run killed during the save is not mistaken for
        one whose weights are complete."""
        from minillm_cli.eval.results import atomic_write_text

        state = self.state()
        if pending:
            state["pending"] = True
        atomic_write_text(Path(out) / self.MARKER, json.dumps(state))

    def reconcile(self, out) -> str | None:
        """On --resume: OUT's weights are saved at each new best, the record reaches a checkpoint
        only at --save-every, so a run stopped in between leaves in OUT the weights of a step the
        resumed run recomputes (maybe differently) while its record names an older one. Then the
        record is dropped -- the next validation saves again -- and a note says so."""
        try:
            marked = json.loads((Path(out) / self.MARKER).read_text())
        except (OSError, ValueError):
            return None  # (nothing saved yet, or a folder from before the marker)
        if not self.keeps_best or not isinstance(marked, dict):
            return None
        if marked.get("pending"):
            what = f"a save of step {marked.get('step')}'s weights that did not finish"
        elif marked.get("step") != self.step:
            what = f"the weights of step {marked.get('step')}, saved after the checkpoint this run resumes from"
        else:
            return None
        self.value = self.step = None
        return f"note: --out holds {what}; the selection starts again with the next validation"

    def summary(self) -> dict:
        """The summary.json fields: what OUT holds and why."""
        kept = self.keeps_best and self.step is not None
        out = {"saved": "best" if kept else "final", "select_by": self.select_by, "best_step": self.step if kept else None}
        if self.column:
            out[f"best_{self.column}"] = self.value if kept else None
        return out


def validation_line(step: int, found: dict, kept: bool, select_by: str) -> str:
    """The log line of one validation: its figures, and whether --out received these weights."""
    figures = ", ".join(f"{k} {v:.4g}" for k, v in found.items() if isinstance(v, (int, float)))
    return f"validation at step {step}: {figures}" + (f" -- the best by {select_by} so far: saved to --out" if kept
                                                       else "")


# the validation answers' length: at most evaluate's default new tokens, within --max-length;
# and the least rows sampled together (the training micro-batch when larger)
VALID_NEW_TOKENS = 256
VALID_ROWS = 16


class ValidationRouge:
    """Mean ROUGE-L (x100) of one sampled answer per validation prompt, by `minillm evaluate`'s
    protocol: the run's template, temperature 1, top-k 0, top-p 1, no-repeat-ngram 6, each row's
    answer at most min(max_new_tokens, max_length - its prompt) tokens, cut at EOS. Prompt j (in the
    fixed longest-first order of the validation split) always draws from
    `example_generator(seed, VALID_STREAM, j)`: every validation of a run scores the same
    random streams (the differences between checkpoints are the models', not the draws'), and the
    score depends neither on the number of processes nor on which prompts run together.

    examples: validation examples; those without a reference answer or whose prompt is over
    max_prompt_length are left out (`counts` says how many)."""

    VALID_STREAM = 7_000_003

    def __init__(self, tokenizer, examples, *, template: str, max_prompt_length: int, max_length: int,
                 seed: int, max_new_tokens: int = VALID_NEW_TOKENS):
        from minillm_cli.data.template import answer_stops
        from minillm_cli.data.tokenize import encode_prompts
        from minillm_cli.eval.generate import row_budgets

        with_refs = [e for e in examples if e.references]
        prompts, kept, dropped = encode_prompts(tokenizer, with_refs, template, max_prompt_length)
        # longest first, so a chunk that does not fit in memory fails at once (and chunks pad little)
        order = sorted(range(len(prompts)), key=lambda j: (-len(prompts[j]), j))
        self.prompts = [prompts[j] for j in order]
        self.references = [with_refs[kept[j]].references for j in order]
        self.budgets = row_budgets([len(p) for p in self.prompts], max_new_tokens, max_length)
        self.tok, self.seed, self.template = tokenizer, seed, template
        self.stops = answer_stops(tokenizer, template)  # (EOS, or the chat template's end of turn and EOS)
        self.counts = {"scored": len(self.prompts), "no_reference": len(examples) - len(with_refs),
                       "too_long": dropped}
        self.max_new_tokens = max_new_tokens

    def __len__(self) -> int:
        return len(self.prompts)

    def left_out(self) -> str:
        """Which validation examples are not scored, and why ("" when none)."""
        c = self.counts
        return ", ".join(f"{c[k]} {what}" for k, what in (("no_reference", "without a reference answer"),
                                                           ("too_long", "over --max-prompt-length")) if c[k])

    def describe(self) -> str:
        n, left = self.counts["scored"], self.left_out()
        return (f"validation ROUGE-L on {n} prompt{'s' if n != 1 else ''}, one sampled answer each"
                + (f" ({left} left out)" if left else ""))

    def check(self) -> None:
        """InputError when no validation prompt is left to score."""
        if not len(self):
            raise InputError("--select-by rougeL: no validation prompt to score"
                             + (f" ({self.left_out()})" if self.left_out() else " (no validation example)"))

    def score(self, model, rt, *, rows: int, engine: str, vocab_size: int, autocast_dtype, note=None) -> float:
        """The mean ROUGE-L over every prompt, sampled `rows` at a time, the chunks shared out over
        processes (`rt.lockstep`); the per-prompt scores are gathered and averaged in one order.
        A chunk that runs out of device memory is sampled again in halves (not under FSDP), as
        rollouts are (rollout_batch.SplitOnOOM): the same answers, each on its own stream."""
        import torch

        from minillm_cli.data.tokenize import left_pad
        from minillm_cli.engine.rollout_batch import SplitOnOOM
        from minillm_cli.engine.runtime import autocast, example_generator
        from minillm_cli.engine.sampler import SamplingParams, cut_at_stop, release_engine, sample
        from minillm_cli.engine.train_utils import micro_batches
        from minillm_cli.eval.generate import cut_to_budgets
        from minillm_cli.eval.metrics import rouge_l

        tok = self.tok

        def scores_of(piece: list[int]) -> dict[int, float]:
            ids, att = left_pad([self.prompts[j] for j in piece], tok.pad_token_id)
            budgets = [self.budgets[j] for j in piece]
            # under FSDP every decode step is a collective: every process (its padding chunk
            # included) decodes for the longest budget of all; each row's kept tokens are the
            # same whatever the step count, its own budget cutting the rest below
            params = SamplingParams(max_new_tokens=max(self.budgets) if rt.fsdp else max(budgets),
                                    temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6,
                                    ngram_prompt=self.template != "chat")  # (evaluate's: see SamplingParams)
            with torch.no_grad(), autocast(rt.device, autocast_dtype):
                roll = sample(model, None, ids.to(rt.device), att.to(rt.device), params=params, alpha=0.0,
                              eos_id=self.stops, pad_id=tok.pad_token_id,
                              generators=[example_generator(self.seed, self.VALID_STREAM, j) for j in piece],
                              vocab_size=vocab_size, engine=engine, sync=rt.decode_sync)
            mask = cut_to_budgets(roll.response_mask, budgets)
            found = {}
            for row, j in enumerate(piece):
                toks = cut_at_stop(roll.response_ids[row][mask[row]].tolist(), self.stops)[0]
                found[j] = rouge_l(tok.decode(toks, skip_special_tokens=True), self.references[j])
            return found

        oom = SplitOnOOM(allowed=not rt.fsdp, release=lambda: release_engine(engine),
                         note=lambda line: note(f"validation ROUGE-L: {line}") if note else None)
        mine: dict[int, float] = {}
        try:
            for _, chunk, real in rt.lockstep(micro_batches(list(range(len(self))), max(1, rows))):
                found = oom.run(chunk, scores_of, lambda parts: {j: v for part in parts for j, v in part.items()})
                if real:  # (FSDP lockstep padding: the collectives ran, the answers are discarded)
                    mine.update(found)
        finally:
            release_engine(engine)  # free the static caches before the updates need the memory
        if rt.distributed:
            parts = [None] * rt.world_size
            torch.distributed.all_gather_object(parts, mine)
            for p in parts:
                mine.update(p)
        return statistics.fmean(mine[j] for j in range(len(self)))
