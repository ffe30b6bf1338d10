"""`minillm evaluate`: sample responses by the paper's protocol and score them.

Protocol (METHOD.md, each setting a field of `EvaluateConfig` and recorded in the result's
"protocol"): the Dolly template; prompts over 256 tokens dropped and counted; sampling with
temperature 1, top-k 0, top-p 1, no-repeat-ngram 6; prompt + response at most 512 tokens; outputs
cut at EOS; 5 seeds, seed s of example i drawing from `example_generator(seed + s, i)`.

Metrics (names and directions in `eval.metrics`):
- rougeL, exact-match, dist4, validity: scored on the sampled text of each seed.
- lm-loss: cross-entropy per token of the first reference (+ EOS) under the model, teacher
  forced. It does not depend on the seed, so its "per_seed" holds one value.
- reverse-kl / forward-kl (need a teacher): at every position of the student's own samples, the
  exact KL over the vocabulary between the models' unfiltered next-token distributions,
  sum_v q (log q - log p) and sum_v p (log p - log q), averaged over all response tokens (EOS
  included) of a seed.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from minillm_cli.data.examples import Example
from minillm_cli.errors import InputError, RunError, require

GENERATION_METRICS = ("rougeL", "exact-match", "dist4", "validity")
KL_METRICS = ("reverse-kl", "forward-kl")
MODEL_CHUNK_ROWS = 8  # rows per scoring forward: bounds the [rows, T, V] logits in memory


def trained_template(model: str) -> tuple[str, str | None]:
    """The prompt template a run folder's model was trained with (its run_config.json, written by
    sft and distill), and where that was read; ("dolly", None) for any other model."""
    from minillm_cli.config import saved_config

    data = saved_config(model).get("data")
    template = data.get("template") if isinstance(data, dict) else None
    return (template, "its run_config.json") if template in ("dolly", "chat", "raw") else ("dolly", None)


def trained_turns(model: str) -> tuple[str, str | None]:
    """The --turns a run folder's model was trained with (its run_config.json), and where that was
    read; ("last", None) for any other model. --split valid/test are the parts that run held out
    only when the data is read into the same examples: under --turns last a run trained with
    --turns all would be evaluated on conversations it trained on."""
    from minillm_cli.config import saved_config

    data = saved_config(model).get("data")
    turns = data.get("turns") if isinstance(data, dict) else None
    return (turns, "its run_config.json") if turns in ("last", "all") else ("last", None)


SPLIT_DEFAULTS = {"valid_size": 0.05, "test_size": 0.0, "split_seed": 1234}  # as sft's and distill's


def trained_split(model: str, data: str) -> dict | None:
    """How a run folder's model split DATA (its run_config.json's valid_size, test_size,
    split_seed, limit and valid_data), when that run was trained on this DATA; None otherwise.
    --split valid/test are the parts that run held out only when cut the same way."""
    from minillm_cli.config import same_path, saved_record

    saved = saved_record(model) or {}
    opts = (saved.get("config") or {}).get("data")
    if not isinstance(opts, dict) or not same_path(opts.get("data"), data, saved.get("cwd")):
        return None
    return {k: opts.get(k) for k in (*SPLIT_DEFAULTS, "limit", "valid_data")}


@dataclass
class EvaluateConfig:
    model: str
    data: str
    metrics: Optional[list[str]] = None  # None: rougeL when the data has references, else dist4
    teacher: Optional[str] = None
    seeds: int = 5
    seed: int = 0  # seed s of the run is seed + s
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    max_length: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    greedy: bool = False  # exact argmax decoding, as top-k 1 (every seed then gives the same text)
    batch_size: int = 32
    limit: Optional[int] = None
    template: Optional[str] = None  # None: the one MODEL was trained with (`trained_template`)
    turns: Optional[str] = None  # a conversation's last assistant turn, or "all" of them; None: MODEL's (`trained_turns`)
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    input_field: Optional[str] = None
    split: str = "all"
    # None: as MODEL's run split DATA under --split valid/test (`trained_split`), else SPLIT_DEFAULTS
    valid_size: Optional[float] = None
    test_size: Optional[float] = None
    split_seed: Optional[int] = None
    out: Optional[str] = None
    predictions: Optional[str] = None  # default: next to `out`, with .jsonl
    by_length: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    sampler: str = "auto"  # generation engine: auto | eager (reference) | static | graph | compile
    quiet: bool = False
    # Oracle of the "validity" metric (the quickstart's synthetic task): (example, prediction) -> ok.
    validity: Optional[Callable[[Example, str], bool]] = field(default=None, repr=False)
    template_source: Optional[str] = field(default=None, init=False)  # where a template not given came from
    turns_source: Optional[str] = field(default=None, init=False)  # where --turns not given came from
    split_source: Optional[str] = field(default=None, init=False)  # the split settings a run folder gave

    def __post_init__(self):
        if self.template is None:
            self.template, self.template_source = trained_template(self.model)
        if self.turns is None:
            self.turns, self.turns_source = trained_turns(self.model)
        require(self.sampler in ("auto", "eager", "static", "graph", "compile"),
                f"--sampler {self.sampler!r}: expected auto, eager, static, graph or compile")
        from minillm_cli.data.splits import SPLITS
        from minillm_cli.eval.metrics import METRICS, validate_metric_names

        require(self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.max_prompt_length >= 1, f"--max-prompt-length must be >= 1, got {self.max_prompt_length}")
        require(self.max_length > self.max_prompt_length,
                f"--max-length ({self.max_length}) must exceed --max-prompt-length ({self.max_prompt_length})")
        require(0 < self.temperature < math.inf, f"--temperature must be a finite number > 0, got {self.temperature}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, got {self.no_repeat_ngram_size}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}")
        require(self.template in ("dolly", "chat", "raw"), f"--template {self.template!r}: expected dolly, chat or raw")
        require(self.turns in ("last", "all"), f"--turns {self.turns!r}: expected last or all")
        require(self.split in SPLITS, f"--split {self.split!r}: expected one of {', '.join(SPLITS)}")
        self._resolve_split()
        require(self.valid_size >= 0 and self.test_size >= 0, "--valid-size/--test-size must be >= 0")
        for flag, v in (("--valid-size", self.valid_size), ("--test-size", self.test_size)):
            require(v < 1 or float(v).is_integer(),
                    f"{flag} {v}: a fraction below 1, or a whole number of examples")
        if self.metrics is not None:
            names = [n for raw in self.metrics for n in str(raw).split(",") if n.strip()]
            require(bool(names), "--metric: no metric named")
            self.metrics = validate_metric_names(names)
            for m in self.metrics:
                require(not METRICS[m].needs_teacher or self.teacher is not None, f"metric {m} needs --teacher MODEL")
                require(m != "validity" or self.validity is not None,
                        "metric validity needs the task's oracle (EvaluateConfig.validity); it has none here")
        if self.out is not None:
            require(not Path(self.out).is_dir(), f"--out {self.out}: is a folder; give a FILE.json")
            require(Path(self.out).suffix != ".jsonl", f"--out {self.out}: the result is JSON; predictions go to --predictions")
        if self.predictions is not None:
            require(not Path(self.predictions).is_dir(), f"--predictions {self.predictions}: is a folder; give a FILE.jsonl")
            require(self.out is None or Path(self.predictions).resolve() != Path(self.out).resolve(),
                    "--predictions and --out name the same file")

    # -- derived settings ---------------------------------------------------------------------
    def sampling_params(self):
        from minillm_cli.engine.sampler import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=1 if self.greedy else self.top_k, top_p=self.top_p,
                              no_repeat_ngram_size=self.no_repeat_ngram_size,
                              ngram_prompt=self.template != "chat")  # (see SamplingParams)

    def _resolve_split(self) -> None:
        """--valid-size/--test-size/--split-seed (and --limit) not given: under --split
        valid/test, those MODEL's run split this DATA with (the part it held out), else the
        training commands' defaults."""
        run = trained_split(self.model, self.data) if self.split != "all" else None
        taken = []
        for k, default in SPLIT_DEFAULTS.items():
            if getattr(self, k) is None:
                value = run.get(k) if run else None
                if k == "valid_size" and run and run.get("valid_data"):
                    value = 0  # (the run validated on another file: DATA was not split for validation)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    taken.append(f"--{k.replace('_', '-')} {value}")
                else:
                    value = default
                setattr(self, k, value)
        if self.limit is None and run and isinstance(run.get("limit"), int):
            self.limit = run["limit"]
            taken.append(f"--limit {self.limit}")
        if taken:
            self.split_source = " ".join(taken)
        if run and run.get("valid_data") and self.split == "valid":
            raise InputError(f"--split valid: {self.model} was validated on --valid-data {run['valid_data']}, not on "
                             f"a part of {self.data}: evaluate --data {run['valid_data']} (--split all)")

    def seed_list(self) -> list[int]:
        return [self.seed + s for s in range(self.seeds)]

    def predictions_file(self) -> Optional[Path]:
        if self.predictions:
            return Path(self.predictions)
        return Path(self.out).with_suffix(".jsonl") if self.out else None

    def protocol(self, n_read: int, n_dropped: int) -> dict:
        p = self.sampling_params()
        return {"template": self.template, "turns": self.turns, "split": self.split, "valid_size": self.valid_size,
                "test_size": self.test_size, "split_seed": self.split_seed, "limit": self.limit,
                "examples_read": n_read, "max_prompt_length": self.max_prompt_length,
                "prompts_dropped": n_dropped, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy" if self.greedy else "sampling",
                "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                "no_repeat_ngram_size": p.no_repeat_ngram_size,
                "no_repeat_ngram_over": "prompt and answer" if p.ngram_prompt else "answer", "cut_at_eos": True,
                "seeds": self.seed_list(), "teacher": self.teacher, "dtype": self.dtype}


# ---------------------------------------------------------------------------- data
def load_eval_examples(cfg: EvaluateConfig, note=None) -> list[Example]:
    """The examples to evaluate: the whole file (`split="all"`) or the split sft/distill held out
    with the same --valid-size/--test-size/--split-seed (and --limit applied before splitting).
    `note`: the progress log, for what the data layer read and dropped."""
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.splits import split_examples
    from minillm_cli.data.template import check_template_fits

    examples = load_examples(cfg.data, prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                             input_field=cfg.input_field, limit=cfg.limit, note=note, turns=cfg.turns)
    check_template_fits(examples, cfg.template)
    if cfg.split == "all":
        return examples
    part = split_examples(examples, valid_size=cfg.valid_size, test_size=cfg.test_size,
                          seed=cfg.split_seed)[cfg.split]
    if not part:
        raise InputError(f"--split {cfg.split}: empty with --valid-size {cfg.valid_size} --test-size "
                         f"{cfg.test_size} on {len(examples)} examples of {cfg.data}")
    return part


def resolve_metrics(cfg: EvaluateConfig, examples: list[Example]) -> list[str]:
    """The metrics to compute; InputError when one needs references the data lacks."""
    from minillm_cli.eval.metrics import needs_references

    with_refs = sum(bool(e.references) for e in examples)
    metrics = cfg.metrics or (["rougeL"] if with_refs else ["dist4"])
    if cfg.metrics is None and cfg.teacher is not None:  # a teacher given: what it is for
        metrics = metrics + list(KL_METRICS)
    for m in metrics:
        if needs_references(m) and with_refs == 0:
            raise InputError(f"metric {m}: {cfg.data} has no reference answers (reference-free metrics: "
                             f"dist4, reverse-kl, forward-kl)")
        if needs_references(m) and with_refs < len(examples):
            i, first = next((i, e) for i, e in enumerate(examples) if not e.references)
            raise InputError(f"metric {m}: {len(examples) - with_refs} of {len(examples)} examples of {cfg.data} "
                             f"have no reference answer (the first: {first.meta.get('where') or f'example {i}'})")
    if cfg.by_length and with_refs < len(examples):
        raise InputError(f"--by-length groups examples by reference length; {cfg.data} lacks references")
    return metrics


# ---------------------------------------------------------------------------- model scores
def _row_chunks(n: int, size: int = MODEL_CHUNK_ROWS):
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def kl_sums(student, teacher, batch, vocab_size: int) -> tuple[float, float, int]:
    """(sum of KL(q||p), sum of KL(p||q), token count) over the response tokens of a generated
    batch, q the student and p the teacher, exact over the vocabulary at each position."""
    import torch

    from minillm_cli.engine.losses import forward_kl, reverse_kl
    from minillm_cli.engine.minillm import response_logits

    rkl = fkl = 0.0
    n = 0
    with torch.no_grad():
        for rows in _row_chunks(len(batch.rows)):
            ids = torch.cat([batch.prompt_ids[rows], batch.response_ids[rows]], 1)
            att = torch.cat([batch.prompt_mask[rows], batch.response_mask[rows]], 1).long()
            mask = batch.response_mask[rows]
            T = mask.shape[1]
            s = response_logits(student, ids, att, T)
            t = response_logits(teacher, ids, att, T).to(s.device)
            rkl += float(reverse_kl(s, t, mask, 1.0, vocab_size))
            fkl += float(forward_kl(s, t, mask, 1.0, vocab_size))
            n += int(mask.sum())
    return rkl, fkl, n


def reference_lm_loss(model, tokenizer, examples: list[Example], cfg: EvaluateConfig, device,
                      vocab_size: int) -> float:
    """Cross-entropy per token of each example's first reference + EOS (teacher forced)."""
    import torch

    from minillm_cli.data.tokenize import collate_sft, encode_sft
    from minillm_cli.engine.losses import lm_loss
    from minillm_cli.eval.generate import plan_batches

    enc, _ = encode_sft(tokenizer, examples, cfg.template, cfg.max_prompt_length, cfg.max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in plan_batches([len(e.input_ids) for e in enc], min(cfg.batch_size, MODEL_CHUNK_ROWS)):
            b = collate_sft([enc[i] for i in rows], tokenizer.pad_token_id)
            ids, att = b["input_ids"].to(device), b["attention_mask"].to(device)
            mask = b["loss_mask"].to(device)[:, 1:]
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
            total += float(lm_loss(logits, ids[:, 1:], mask, 1.0, vocab_size))
            count += int(mask.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------- the run
def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Generate, score, write the result (and predictions) when asked; return the result dict."""
    from minillm_cli.data.template import answer_stops, render_prompt
    from minillm_cli.data.tokenize import encode_prompts
    from minillm_cli.engine.runtime import init_runtime
    from minillm_cli.eval.generate import generate_batches
    from minillm_cli.eval.metrics import aggregate, aggregate_by_length, length_buckets, score_generations
    from minillm_cli.eval.metrics import exact_match, rouge_l
    from minillm_cli.eval.results import make_result, write_predictions, write_result
    from minillm_cli.models import check_context, load_model, load_tokenizer, pick_dtype
    from minillm_cli.progress import Progress
    from minillm_cli.textfiles import check_writable

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("evaluate runs in one process; launch it without torchrun/accelerate")
    for flag, target in (("--out", cfg.out), ("--predictions", cfg.predictions_file())):
        if target is not None:  # before hours of generation, not after
            check_writable(flag, target)
    t0 = time.perf_counter()
    progress = Progress("evaluate", quiet=cfg.quiet, unit="generations")
    if cfg.template_source is not None and cfg.template != "dolly":
        progress.log(f"note: --template {cfg.template}, the template {cfg.model} was trained with "
                     f"({cfg.template_source})")
    if cfg.turns_source is not None and cfg.turns != "last":
        progress.log(f"note: --turns {cfg.turns}, as {cfg.model} was trained ({cfg.turns_source})")
    if cfg.split_source is not None:
        progress.log(f"note: --split {cfg.split} as {cfg.model}'s run split {cfg.data}: {cfg.split_source} (its "
                     f"run_config.json)")
    examples = load_eval_examples(cfg, note=progress.log)
    n_read = len(examples)
    metrics = resolve_metrics(cfg, examples)
    rt = init_runtime(cfg.device)
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, what="model")
    teacher = None
    if "rougeL" in metrics:
        from minillm_cli.eval.metrics import rouge_scorable

        blind = sum(not any(rouge_scorable(r) for r in e.references) for e in examples)
        if blind:
            progress.log(
                f"note: {blind} of {len(examples)} examples have references without a word ROUGE-L can score "
                f"(rouge_score keeps a-z and 0-9 only): their ROUGE-L is 0 whatever the answer")
    if cfg.greedy:
        moved = [f for f, v, d in (("--temperature", cfg.temperature, 1.0), ("--top-k", cfg.top_k, 0),
                                   ("--top-p", cfg.top_p, 1.0)) if v != d]
        if moved:
            progress.log(f"note: --greedy takes the most likely token; {', '.join(moved)} "
                         f"change{'s' if len(moved) == 1 else ''} nothing")
    if cfg.teacher is not None and not any(m in KL_METRICS for m in metrics):
        progress.log(f"note: --teacher {cfg.teacher} is unused by {', '.join(metrics)}")
    elif cfg.teacher is not None:
        from minillm_cli.engine.teacher import load_teacher

        teacher, _ = load_teacher(cfg.teacher, student_tokenizer=tok, device=rt.device,
                                  trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                                  context=(cfg.max_length, "--max-length"), template=cfg.template,
                                  note=progress.log)
    model = load_model(cfg.model, tokenizer=tok, device=rt.device, dtype=pick_dtype(rt.device, cfg.dtype),
                       trust_remote_code=cfg.trust_remote_code, trainable=False)
    check_context(model, cfg.max_length, "--max-length", "model", progress.log)
    V = len(tok)

    prompts, kept, n_dropped = encode_prompts(tok, examples, cfg.template, cfg.max_prompt_length)
    if not prompts:
        raise InputError(f"every prompt of {cfg.data} is longer than --max-prompt-length {cfg.max_prompt_length} tokens")
    evald = [examples[i] for i in kept]
    if n_dropped:
        progress.log(f"{n_dropped} of {n_read} prompts are longer than {cfg.max_prompt_length} tokens: dropped")
    want_kl = teacher is not None
    # Sampling is the costly part: run it for the metrics that need it, or when --predictions asks.
    want_gen = any(m in GENERATION_METRICS for m in metrics) or cfg.predictions is not None

    per_seed_text: list[list[str]] = []
    per_seed_info: list[list[tuple[int, bool]]] = []  # (response tokens, ended on EOS) per example
    kl_per_seed: dict[str, list[float]] = {m: [] for m in KL_METRICS}
    if want_gen or want_kl:
        progress.start(len(prompts) * cfg.seeds)
        done, t_gen = 0, time.perf_counter()
        stops = answer_stops(tok, cfg.template)  # (EOS, or the chat template's end of turn and EOS)
        for seed in cfg.seed_list():
            texts: list[str] = [""] * len(prompts)
            info: list[tuple[int, bool]] = [(0, False)] * len(prompts)
            rkl = fkl = 0.0
            ntok = 0
            for batch in generate_batches(model, prompts, params=cfg.sampling_params(), seed=seed, example_ids=kept,
                                          eos_id=stops, pad_id=tok.pad_token_id, vocab_size=V,
                                          device=rt.device, batch_size=cfg.batch_size, max_length=cfg.max_length, engine=cfg.sampler):
                toks = batch.token_lists()
                for r, ids, ended in zip(batch.rows, toks, batch.ended()):
                    texts[r] = tok.decode(ids, skip_special_tokens=True)
                    info[r] = (len(ids), ended)
                if want_kl:
                    a, b, n = kl_sums(model, teacher, batch, V)
                    rkl, fkl, ntok = rkl + a, fkl + b, ntok + n
                done += len(batch.rows)
                progress.update(done, seed=seed, ex_per_s=done / max(time.perf_counter() - t_gen, 1e-9))
            per_seed_text.append(texts)
            per_seed_info.append(info)
            if want_kl:
                kl_per_seed["reverse-kl"].append(rkl / max(ntok, 1))
                kl_per_seed["forward-kl"].append(fkl / max(ntok, 1))
        progress.close()

    refs = [e.references for e in evald]
    scores: dict[str, dict] = {}
    per_example: dict[str, list[list[float]]] = {}
    for m in metrics:
        if m in ("rougeL", "exact-match"):
            fn = rouge_l if m == "rougeL" else exact_match
            per_example[m] = [[fn(p, r) for p, r in zip(texts, refs)] for texts in per_seed_text]
            values = [statistics.fmean(s) for s in per_example[m]]
        elif m == "validity":
            per_example[m] = [[100.0 * bool(cfg.validity(e, p)) for e, p in zip(evald, texts)]
                              for texts in per_seed_text]
            values = [statistics.fmean(s) for s in per_example[m]]
        elif m == "dist4":
            values = [score_generations(m, texts) for texts in per_seed_text]
        elif m == "lm-loss":
            values = [reference_lm_loss(model, tok, evald, cfg, rt.device, V)]
        else:
            values = kl_per_seed[m]
        try:
            scores[m] = aggregate(values)
        except ValueError as e:
            raise RunError(f"metric {m}: {e}") from None

    by_length = None
    if cfg.by_length:
        counts = [len(tok(e.references[0], add_special_tokens=False)["input_ids"]) for e in evald]
        buckets = length_buckets(counts)
        by_length = {m: aggregate_by_length(per_example[m], buckets) for m in per_example}

    pred_path = cfg.predictions_file() if (want_gen or want_kl) else None
    result = make_result(
        model=cfg.model, data=cfg.data, n=len(evald), protocol=cfg.protocol(n_read, n_dropped), metrics=scores,
        by_length=by_length, predictions=_relative(pred_path, cfg.out) if pred_path else None,
        elapsed_s=round(time.perf_counter() - t0, 3))
    if pred_path is not None:
        rows = []
        for seed, texts, info in zip(cfg.seed_list(), per_seed_text, per_seed_info):
            for i, (e, text, (ntoks, ended)) in enumerate(zip(evald, texts, info)):
                rows.append({"index": kept[i], "seed": seed, "instruction": e.instruction, "input": e.input,
                             **({"history": e.history} if e.history else {}),
                             "prompt": render_prompt(e, cfg.template, tok), "prediction": text,
                             "references": list(e.references), "response_tokens": ntoks, "ended": ended})
        write_predictions(pred_path, rows)
    if cfg.out is not None:
        write_result(Path(cfg.out), result)
    return result


def _relative(pred: Path, out: Optional[str]) -> str:
    """The predictions path as the result should name it: relative to the result's folder."""
    if out is None:
        return str(pred)
    try:
        return os.path.relpath(pred.resolve(), Path(out).resolve().parent)
    except ValueError:  # another drive (Windows)
        return str(pred.resolve())
