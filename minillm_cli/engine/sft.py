"""Supervised fine-tuning: loss on response tokens only, one linear loop.

batch (global) → micro-batches (fixed composition; k-th runs on rank k % world) → CE summed over
response tokens / global response-token count → backward → all-reduce → clip → step → log →
validate / checkpoint. The same loop trains SeqKD students on teacher generations.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from minillm_cli.config import (SFTConfig, check_resume, check_resumed_answer_end, prepare_out_dir, resumed_lora,
                                save_run_config)
from minillm_cli.data.tokenize import Encoded, collate_sft, encode_sft
from minillm_cli.engine import checkpoint as ckpt
from minillm_cli.engine.losses import lm_loss
from minillm_cli.engine.recompute import recompute_blocks
from minillm_cli.engine.sampler import model_kwargs
from minillm_cli.engine.runtime import (Runtime, autocast, init_runtime, resolved_settings, run_entry,
                                        scaling_warnings, seed_everything)
from minillm_cli.engine.train_utils import (StopSignal, batches_for_step, check_finite, clip_and_step,
                                            make_optimizer, make_scheduler, micro_batches, micro_seed)
from minillm_cli.errors import InputError, RunError
from minillm_cli.eval.results import clean_json
from minillm_cli.progress import MetricsWriter, Progress


def response_ce_sum(model, batch: dict, vocab_size: int, device) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens (and EOS) of a collated batch, and their count."""
    ids = batch["input_ids"].to(device)
    att = batch["attention_mask"].to(device)
    mask = batch["loss_mask"].to(device)[:, 1:]
    logits = model(input_ids=ids, attention_mask=att, **model_kwargs(model, use_cache=False)).logits[:, :-1]
    # fused, chunked over positions: no float32 copy of the [B, T, V] logits (losses.vocab_terms)
    ce = lm_loss(logits, ids[:, 1:], mask, 1.0, vocab_size)
    return ce, int(mask.sum())


@torch.no_grad()
def validation_loss(model, data: list[Encoded], rt: Runtime, *, micro_batch_size: int, pad_id: int,
                    vocab_size: int, dtype) -> float:
    """Mean CE per response token over `data`, sharded over processes and summed exactly."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _, chunk, real in rt.lockstep(micro_batches(list(range(len(data))), micro_batch_size)):
        with autocast(rt.device, dtype):
            ce, n = response_ce_sum(model, collate_sft([data[i] for i in chunk], pad_id), vocab_size, rt.device)
        if real:  # FSDP lockstep padding is computed and discarded
            total += float(ce)
            count += n
    total, count = rt.sum_scalar(total), rt.sum_scalar(count)
    model.train(was_training)
    return total / max(count, 1)


@run_entry
def train_sft(cfg: SFTConfig, *, responses: list[str] | None = None, train_examples=None,
              valid_examples=None, command: str = "sft", objective=None, record=None,
              setup=None) -> dict:
    """Run SFT as configured; returns the summary (also written to OUT/summary.json).

    The distillation baselines reuse this loop: `objective(model, batch, vocab_size, device) ->
    (summed loss, tokens)` replaces the response CE (kd, rkl); `train_examples`/`responses` train
    on teacher generations (seqkd); `record` is the config saved as run_config.json;
    `setup(runtime, tokenizer)` runs once the student's tokenizer is loaded (the baselines load
    their teacher there) and may return {"objective": ..., "responses": ...} to use instead.
    OUT holds the weights `cfg.run.select_by` picks (engine/selection.py): the best by validation
    loss (sft's default) or ROUGE-L, or the final ones (distill's default, where every method is
    compared at its last step)."""
    from minillm_cli.data.examples import CONVERSATION_LAYOUTS
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.data.template import end_of_answer_id
    from minillm_cli.models import (adapter_base, adapter_note, check_context, compute_dtype, end_generation_at,
                                    load_model, load_tokenizer, low_precision_warning, pick_dtype)

    from minillm_cli.engine import fsdp
    from minillm_cli.engine.selection import VALID_ROWS, Best, ValidationRouge, validation_line

    if cfg.run.fsdp or fsdp.fsdp_from_env():
        fsdp.check_supported(lora=cfg.model_opts.lora() is not None, save_adapter=cfg.model_opts.save_adapter,
                             adapter=cfg.model if adapter_base(cfg.model) else None, flag=cfg.run.fsdp)
    rt = init_runtime(cfg.run.device, fsdp=cfg.run.fsdp)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.out).expanduser()

    def claim_out() -> list[str]:  # rank 0 alone touches --out; every rank learns a refusal
        prepare_out_dir(cfg.run.out, overwrite=cfg.run.overwrite, resume=cfg.run.resume,
                        inputs=(record or cfg).inputs())
        return check_resume(record or cfg, out, command) if cfg.run.resume else []

    notes = rt.on_main(claim_out)
    progress = Progress(command, quiet=cfg.run.quiet, is_main=rt.is_main)

    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.model_opts.trust_remote_code, what="model")
    if cfg.run.resume:
        check_resumed_answer_end(out, tok, cfg.data.template)
    ends = None  # (seqkd: which teacher answers ended, see encode_sft)
    if setup is not None:
        prepared = setup(rt, tok) or {}
        objective = prepared.get("objective", objective)
        responses = prepared.get("responses", responses)
        ends = prepared.get("ends")
    objective = objective or response_ce_sum
    if train_examples is None:
        splits = rt.together(lambda: load_splits(cfg.data, note=progress.log, warn=progress.warn))
        train_examples, valid_examples = splits["train"], splits["valid"]
    # refuse before tokenising anything
    if responses is None:  # every example trains (and validates) on its reference response
        # --turns all: a conversation's closing user message (or an empty answer) is a turn with
        # nothing to train on beside those that have an answer: left out, not the whole data refused
        def answered(exs, what):
            bare = [e for e in exs if not e.references and "conversation" in e.meta]
            if bare:
                progress.log(f"note: {len(bare)} {what} turns of conversations have no answer to train on (a closing "
                             f"user message or an empty answer; the first: {bare[0].meta.get('where', '?')}): left out")
            return [e for e in exs if e.references or "conversation" not in e.meta] if bare else exs

        train_examples = answered(train_examples, "training")
        valid_examples = answered(valid_examples, "validation") if valid_examples else valid_examples
        for what, exs in (("training", train_examples), ("validation", valid_examples or [])):
            missing = [e for e in exs if not e.references]
            if missing:
                layout = missing[0].meta.get("layout", "?")
                # (a conversation's answer is its own last message: --response-field, refused with
                # --turns all, is no way to one)
                own = layout.split(",")[0] in CONVERSATION_LAYOUTS and "--response-field" not in layout
                fix = ("a conversation that ends with the user's message, or with an empty answer, has none: "
                       "leave such conversations out" if own
                       else "if the answers are in another field, name it with --response-field")
                raise InputError(f"{cfg.data.data if what == 'training' else cfg.data.valid_data or cfg.data.data}: "
                                 f"{len(missing)} of {len(exs)} {what} examples have no reference response (the "
                                 f"first: {missing[0].meta.get('where', '?')}; layout {layout}): each needs one; "
                                 f"{fix}")
    else:  # seqkd: the teacher answers the training prompts; validation needs gold answers
        unanswered = sum(not e.references for e in valid_examples or [])
        if unanswered:
            valid_examples = [e for e in valid_examples if e.references]
            progress.log(f"note: {unanswered} validation examples have no reference answer: validated without "
                         f"them" + ("" if valid_examples else " (no validation loss)"))
    train, dropped = encode_sft(tok, train_examples, cfg.data.template, cfg.data.max_prompt_length,
                                cfg.data.max_length, responses=responses, ends=ends)
    valid, vdropped = encode_sft(tok, valid_examples or [], cfg.data.template, cfg.data.max_prompt_length,
                                 cfg.data.max_length)
    if not train:
        raise InputError(f"{cfg.data.data}: no training example left after dropping {dropped} with prompts over "
                         f"--max-prompt-length {cfg.data.max_prompt_length}")
    progress.log(f"data: {len(train)} train, {len(valid)} valid examples; dropped {dropped + vdropped} "
                 f"over --max-prompt-length {cfg.data.max_prompt_length}")
    cut = sum(e.cut for e in train)
    if cut:  # (a long conversation's prompt fits, its answer not: said, as the dropped prompts are)
        progress.log(f"note: {cut} of {len(train)} training answers are cut at --max-length {cfg.data.max_length} "
                     f"(prompt + answer): trained without their end, so never taught to stop there")
    rouge = None
    if cfg.run.select_by == "rougeL":
        rouge = ValidationRouge(tok, valid_examples or [], template=cfg.data.template,
                                max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length,
                                seed=cfg.run.seed)
        rouge.check()
        progress.log(rouge.describe())
    if not valid and cfg.run.select_by != "last":
        progress.log(f"note: no validation example{' left' if valid_examples else ''}: --out keeps the final weights")
    if cfg.batch_size > len(train):
        progress.log(f"note: --batch-size {cfg.batch_size} is more than the {len(train)} training examples: "
                     f"every batch repeats examples")

    model = load_model(cfg.model, tokenizer=tok, device=rt.device,
                       dtype=pick_dtype(rt.device, cfg.model_opts.dtype, training=True),
                       lora=resumed_lora(cfg.model_opts.lora(), out, cfg.run.resume),
                       trust_remote_code=cfg.model_opts.trust_remote_code)
    check_context(model, cfg.data.max_length, "--max-length", "model" if command == "sft" else "student", progress.log)
    answer_end = end_of_answer_id(tok, cfg.data.template)  # (EOS, or the chat template's end of turn)
    end_generation_at(model, tok, answer_end)
    if line := adapter_note(model, cfg.model_opts.save_adapter):
        progress.log(line)
    if line := low_precision_warning(model, cfg.optim.lr):
        progress.warn(line)
    if cfg.model_opts.gradient_checkpointing:
        progress.log(f"gradient checkpointing: {recompute_blocks(model)} blocks recompute their activations")
    if rt.fsdp:
        fsdp.shard(model, rt, trainable=True)
        progress.log(f"FSDP: model sharded over {rt.world_size} process(es)")
    model.train()
    amp = compute_dtype(rt.device)
    vocab = len(tok)
    steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(train) / cfg.batch_size))
    opt = make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.adam_betas,
                         fused=rt.device.type == "cuda" and not rt.fsdp)
    sched = make_scheduler(opt, warmup_steps=cfg.optim.warmup_steps, total_steps=steps, schedule=cfg.optim.schedule)

    chosen, lowest = Best(cfg.run.select_by), Best("loss")  # what OUT keeps; the lowest validation loss
    start, loss = 0, float("nan")
    state = (ckpt.resume_run(out, model=model, optimizer=opt, scheduler=sched, steps=steps, is_main=rt.is_main)
             if cfg.run.resume else None)
    if cfg.run.resume and state is None:
        progress.log(f"note: no checkpoint in {out} yet: training starts at step 0")
        for line in notes:
            progress.log(line)
    if state is not None:
        start = state["step"]
        kept = state["extra"].get("best")
        if command != "sft" and isinstance(kept, dict) and "select_by" not in kept:
            # a distillation baseline's checkpoint from before --select-by: its run tracked the lowest
            # validation loss but left the final weights in OUT, so the record names no weights OUT holds
            kept = None
        chosen = Best.from_state(cfg.run.select_by, kept)
        lowest = Best.from_state("loss", state["extra"].get("lowest", state["extra"].get("best")))
        # a finished run resumed runs no step: its last logged loss stays the final one
        loss = next((float(r["loss"]) for r in reversed(state["logged"]) if isinstance(r.get("loss"), (int, float))),
                    loss)
        progress.log(f"resumed from {state['path'].name}")
        if line := chosen.reconcile(out):
            progress.log(line)
        for line in notes:  # (after the checkpoint: a refused resume says only why)
            progress.log(line)
    if rt.is_main:
        save_run_config(record or cfg, out, command, {"train_examples": len(train), "valid_examples": len(valid),
                                            "dropped_long_prompts": dropped + vdropped, "steps": steps,
                                                     "world_size": rt.world_size, "sharded": rt.fsdp,
                                                     "resolved": resolved_settings(rt, model, amp, end_of_answer=answer_end)})
    metrics = MetricsWriter(out / "metrics.jsonl" if rt.is_main else None)

    def evaluate_and_keep_best(step: int) -> dict:
        """The validation figures of this step; OUT receives the weights when they are the best
        by the selection metric (the same decision on every process: the figures are summed
        over all of them)."""
        if not valid:
            return {}
        vl = validation_loss(model, valid, rt, micro_batch_size=cfg.micro_batch_size, pad_id=tok.pad_token_id,
                             vocab_size=vocab, dtype=amp)
        check_finite(vl, step=step, term="validation loss")
        found = {"valid_loss": vl}
        if lowest.improves(vl):
            lowest.record(vl, step)
        if rouge is not None:
            found["valid_rougeL"] = rouge.score(model, rt, rows=max(cfg.micro_batch_size, VALID_ROWS),
                                                engine=rt.sampling_engine("auto"), vocab_size=vocab,
                                                autocast_dtype=amp, note=progress.log)
        value = found.get(chosen.column)
        kept = chosen.improves(value)
        if kept:
            chosen.record(value, step)
            if rt.is_main:
                chosen.mark(out, pending=True)
            fsdp.save_student(model, tok, out, rt, merge_lora=not cfg.model_opts.save_adapter,
                              trust_remote_code=cfg.model_opts.trust_remote_code)
            if rt.is_main:
                chosen.mark(out)
        progress.log(validation_line(step, found, kept, cfg.run.select_by))
        return found

    for line in scaling_warnings(rt.world_size, cfg.grad_accum, fsdp=rt.fsdp, batch_size=cfg.batch_size):
        progress.log(line)
    progress.start(steps)
    t0, tokens_seen = time.perf_counter(), 0
    step = start
    with StopSignal() as stop:
        for step in range(start + 1, steps + 1):
            idx = batches_for_step(len(train), cfg.batch_size, cfg.run.seed, step - 1)
            normalizer = sum(train[i].response_len for i in idx)  # global: every rank knows the batch
            loss_sum = 0.0
            for k, mb, real in rt.lockstep(micro_batches(idx, cfg.micro_batch_size)):
                torch.manual_seed(micro_seed(cfg.run.seed, step, k))  # dropout masks per micro-batch
                with autocast(rt.device, amp):
                    ce, _ = objective(model, collate_sft([train[i] for i in mb], tok.pad_token_id), vocab, rt.device)
                if not real:  # FSDP lockstep padding: the collectives run, the gradient is zero
                    (ce * 0.0).backward()
                    continue
                (ce / normalizer).backward()
                loss_sum += float(ce.detach())
            if not rt.fsdp:  # FSDP reduce-scatters (sums) the gradients in backward
                rt.reduce_gradients([p for p in model.parameters() if p.requires_grad])
            loss = rt.sum_scalar(loss_sum) / normalizer
            check_finite(loss, step=step, term="training loss")
            lr = opt.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on in clip_and_step)
            gnorm = clip_and_step(model, opt, sched, cfg.optim.max_grad_norm, step=step)
            tokens_seen += sum(len(train[i].input_ids) for i in idx)
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tokens_seen / max(time.perf_counter() - t0, 1e-9)}
            if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == steps:
                row.update(evaluate_and_keep_best(step))
            metrics.write(row)
            progress.update(step, loss=loss, **({"valid": row["valid_loss"]} if row.get("valid_loss") else {}),
                            **({"rougeL": row["valid_rougeL"]} if "valid_rougeL" in row else {}),
                            tok_s=round(row["tokens_per_s"]))
            stopping = stop.agreed(rt)
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == steps or stopping:
                ckpt.save_on_main(rt, out, step, model=model, optimizer=opt, scheduler=sched,
                                  extra={"best": chosen.state(), "lowest": lowest.state()})
            if stopping:
                progress.close()
                raise RunError(f"stopped by {stopping} after step {step}; checkpoint saved, continue with "
                               f"the same command plus --resume", everywhere=True)  # (the ranks agreed)
    progress.close()
    if chosen.step is None:  # the final weights are the result
        fsdp.save_student(model, tok, out, rt, merge_lora=not cfg.model_opts.save_adapter,
                          trust_remote_code=cfg.model_opts.trust_remote_code)
    # distill's baselines report as `distill` with their method, like MiniLLM runs
    name, _, method = command.partition("-")
    summary = {"command": name, **({"method": method} if method else {}), "out": str(out), "steps": steps,
               "final_loss": loss, **chosen.summary(),
               # (after the selection's fields: the lowest validation loss of the run, also where a
               # selection by loss kept other weights -- one reconciled after a stop, say)
               "best_valid_loss": lowest.value,
               "train_examples": len(train), "valid_examples": len(valid), "dropped": dropped + vdropped,
               "seconds": round(time.perf_counter() - t0, 2)}
    if rt.is_main:
        (out / "summary.json").write_text(json.dumps(clean_json(summary), indent=2))
    metrics.close()
    rt.barrier()
    return summary
