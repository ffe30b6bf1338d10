"""The baselines on the same data, models and loop: KD (word-level forward KL on gold data mixed
with CE), RKL (token-level reverse KL, teacher-forced on gold data), SeqKD (SFT on responses the
teacher generated once, kept in the run folder)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm_cli.engine.losses import kd_loss, reverse_kl
from minillm_cli.errors import InputError
from minillm_cli.engine.sampler import model_kwargs


def _aligned(model, batch, device):
    ids = batch["input_ids"].to(device)
    att = batch["attention_mask"].to(device)
    return ids, att, batch["loss_mask"].to(device)[:, 1:]


def teacher_forced_objective(teacher, method: str, kd_ratio: float):
    """objective(model, batch, vocab, device) -> (summed loss, tokens) for `kd` or `rkl`.

    The loop divides by the global token count: the functions below get normalizer 1."""

    def objective(model, batch, vocab, device):
        ids, att, mask = _aligned(model, batch, device)
        s_logits = model(input_ids=ids, attention_mask=att, **model_kwargs(model, use_cache=False)).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=att).logits[:, :-1]
        if method == "kd":
            loss = kd_loss(s_logits, t_logits, ids[:, 1:], mask, 1.0, vocab, kd_ratio=kd_ratio)
        else:
            loss = reverse_kl(s_logits, t_logits, mask, 1.0, vocab)
        return loss, int(mask.sum())

    return objective


def generate_seqkd_data(teacher, tokenizer, examples, *, cfg, rt, path: Path,
                        progress=None) -> tuple[list[str], list[bool]]:
    """Teacher-only generation for every training prompt (the paper's decoding settings), written
    once to `path` (jsonl: one row per generated answer, with the example's `index` and whether
    the teacher `finished` it with EOS; prompts over --max-prompt-length get no row and the answer
    "", which the SFT encoding drops anyway) and reused on --resume (whose settings check_resume
    holds to the first run's). Rows are sharded over processes and gathered. Returns the answers
    and whether each ended: one cut at --max-new-tokens is trained without EOS, so the student
    is not taught to stop where the teacher was only cut off.

    Resumable: each process appends every chunk it finishes to its own `partial_paths` file, and
    a run started again (--resume) generates only the answers none of them holds. An answer
    depends only on its prompt, the teacher and (seed, index), so the result is the uninterrupted
    run's. The partial files go once `path` is written."""
    from minillm_cli.data.template import answer_stops
    from minillm_cli.data.tokenize import encode_prompts, left_pad
    from minillm_cli.engine.rollout_batch import SplitOnOOM, cache_length, rollout_batch_size, rows_that_fit
    from minillm_cli.engine.runtime import example_generator, free_memory_bytes
    from minillm_cli.engine.sampler import SamplingParams, cut_at_stop, release_engine, sample
    from minillm_cli.engine.train_utils import micro_batches

    if path.is_file():
        if rt.is_main:  # (left where a run stopped between writing `path` and deleting them)
            for old in partial_paths(path):
                old.unlink(missing_ok=True)
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        if rows and all("index" in r for r in rows) and max(r["index"] for r in rows) < len(examples):
            out, ends = [""] * len(examples), [True] * len(examples)
            for r in rows:
                out[r["index"]], ends[r["index"]] = r["response"], r.get("finished", True)
            return out, ends
        if len(rows) == len(examples):  # (a file without indices: one row per example)
            return [r["response"] for r in rows], [r.get("finished", True) for r in rows]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p)
    encoded, kept, _ = encode_prompts(tokenizer, examples, cfg.data.template, cfg.data.max_prompt_length)
    prompts = dict(zip(kept, encoded))
    if not prompts:  # (before the teacher generates anything)
        raise InputError(f"{cfg.data.data}: no training example left after dropping {len(examples)} with prompts "
                         f"over --max-prompt-length {cfg.data.max_prompt_length}")
    # Prompts over the limit are dropped by the SFT encoding anyway: nothing to generate for them.
    mine: dict[int, tuple[str, bool]] = {i: ("", True) for i in range(len(examples)) if i not in prompts}
    # what an interrupted generation left (read on rank 0 before any process appends to it)
    earlier = rt.broadcast_object(_partial_answers(path, prompts, examples) if rt.is_main else None)
    mine.update(earlier)
    todo = [i for i in kept if i not in earlier]
    if earlier and progress is not None:
        progress.log(f"seqkd: {len(earlier)} answers kept from the interrupted generation, {len(todo)} to go")
    fit = rows_that_fit((teacher,), device=rt.device, vocab_size=len(tokenizer),
                        cache_len=cache_length(cfg.data.max_prompt_length, cfg.max_new_tokens),
                        free_bytes=free_memory_bytes(rt.device))
    size, why = rollout_batch_size(cfg.rollout_batch_size, batch_size=cfg.batch_size, rollouts=max(len(todo), 1),
                                   processes=rt.world_size, whiten=False, fit=rt.least(fit),
                                   micro_batch=cfg.micro_batch_size)
    if why and progress is not None:
        progress.log(f"seqkd: {why.replace('rollouts', 'prompts')}")
    chunks = micro_batches(todo, size)
    engine = rt.sampling_engine(cfg.sampler)
    work = rt.lockstep(chunks)  # FSDP: every process runs as many chunks
    total, done = sum(len(c) for _, c, real in work if real), 0

    stops = answer_stops(tokenizer, cfg.data.template)  # (EOS, or the chat template's end of turn and EOS)

    def answers(piece: list[int]) -> list[tuple[int, tuple[str, bool]]]:
        ids, att = left_pad([prompts[i] for i in piece], tokenizer.pad_token_id)
        roll = sample(None, teacher, ids.to(rt.device), att.to(rt.device), params=params, alpha=1.0,
                      eos_id=stops, pad_id=tokenizer.pad_token_id,
                      generators=[example_generator(cfg.run.seed, 0, i) for i in piece], vocab_size=len(tokenizer),
                      engine=engine, sync=rt.decode_sync)
        out = []
        for row, i in enumerate(piece):
            toks, finished = cut_at_stop(roll.response_ids[row][roll.response_mask[row]].tolist(), stops)
            out.append((i, (tokenizer.decode(toks, skip_special_tokens=True), finished)))
        return out

    # (in pieces after an out-of-memory error; not under FSDP, where decoding is a collective)
    log = progress.log if progress is not None else (lambda line: None)
    oom = SplitOnOOM(allowed=not rt.fsdp, release=lambda: release_engine(engine),
                     note=lambda line: log(f"seqkd: {line}"))
    partial = partial_paths(path, rt.rank)
    _end_line(partial)  # (a torn last line must not swallow the first row appended after it)
    for k, chunk, real in work:
        generated = oom.run(chunk, answers, lambda parts: [x for part in parts for x in part])
        if not real:
            continue
        with open(partial, "a", encoding="utf-8") as fh:  # (kept should the run stop before the end)
            fh.write("".join(_row(examples, i, *answer) for i, answer in generated))
        mine.update(generated)
        done += len(chunk)
        if progress is not None:
            progress.log(f"seqkd: teacher generated {done}/{total}"
                         + (f" (this process's share of {len(todo)})" if rt.distributed else ""))
    release_engine(engine)  # (the kept decoder holds the teacher, too)
    if rt.distributed:
        parts = [None] * rt.world_size
        torch.distributed.all_gather_object(parts, mine)
        for p in parts:
            mine.update(p)
    responses, ends = [mine[i][0] for i in range(len(examples))], [mine[i][1] for i in range(len(examples))]
    if rt.is_main:  # (after the gather: every process has written its partial file)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for i in sorted(prompts):  # the generated answers only: no empty rows to train on by mistake
                fh.write(_row(examples, i, responses[i], ends[i]))
        tmp.replace(path)
        for old in partial_paths(path):
            old.unlink(missing_ok=True)
    return responses, ends


def partial_paths(path: Path, rank: int | None = None):
    """The file process `rank` appends its finished answers to while generating (None: those of
    every process, of this run and of interrupted ones with other process counts)."""
    if rank is not None:
        return path.with_name(f"{path.stem}.partial.{rank}{path.suffix}")
    return sorted(path.parent.glob(f"{path.stem}.partial.*{path.suffix}"))


def _end_line(path: Path) -> None:
    """Ends `path`'s last line with a newline where a killed process left it open."""
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        if fh.seek(0, 2) == 0:  # (empty)
            return
        fh.seek(-1, 2)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def _row(examples, i: int, response: str, finished: bool) -> str:
    e = examples[i]
    return json.dumps({"index": i, "instruction": e.instruction, "input": e.input,
                       **({"history": e.history} if e.history else {}), "response": response,
                       "finished": finished}) + "\n"


def _asked(e) -> tuple:
    """What an example asks, as a partial row records it."""
    return e.instruction, e.input, e.history


def _partial_answers(path: Path, prompts: dict, examples) -> dict[int, tuple[str, bool]]:
    """index -> (answer, finished) from the partial files of an interrupted generation; a torn
    last line (a process killed while writing), rows for no current prompt and rows whose
    instruction or input is not that example's (the data changed under the same path) are skipped."""
    from minillm_cli.textfiles import read_lines

    found = {}
    for p in partial_paths(path):
        for line in read_lines(p):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (isinstance(r, dict) and r.get("index") in prompts and isinstance(r.get("response"), str)
                    and (r.get("instruction"), r.get("input"), r.get("history", [])) == _asked(examples[r["index"]])):
                found[r["index"]] = (r["response"], bool(r.get("finished", True)))
    return found
