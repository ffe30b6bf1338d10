"""`minillm distill`: MiniLLM's loop, and the dispatch to the baselines.

One linear loop: (when the buffer is spent) rollout → score → [per optimizer step] MiniLLM loss on
a PPO mini-batch + PT loss → backward → all-reduce → clip → step → log → eval → checkpoint.

Global-batch semantics: `--num-rollouts` and `--batch-size` count all processes together.
Rollouts are sampled in micro-batches of fixed composition (micro-batch k on rank k % world) with
per-rollout random streams, scored, and gathered so every process holds the whole buffer; each
mini-batch is cut into fixed micro-batches the same way and normalised by its global token count.
The number of processes therefore changes who computes what, never the result.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from minillm_cli.config import (DistillConfig, check_resume, check_resumed_answer_end, prepare_out_dir,
                                resumed_lora, save_run_config)
from minillm_cli.engine import checkpoint as ckpt
from minillm_cli.engine.captured_step import CapturedSteps
from minillm_cli.engine.minillm import (MiniLLMOptions, StatsSum, minillm_loss, score_rollouts, teacher_logit_bytes,
                                       teacher_logit_cache)
from minillm_cli.engine.rollout_batch import SplitOnOOM, minillm_rows_that_fit, rollout_batch_size
from minillm_cli.engine.recompute import recompute_blocks
from minillm_cli.engine.rollouts import (concat_batches, from_state, gather_parts, ppo_plan, prompts_for_iteration,
                                         to_state)
from minillm_cli.engine.runtime import (autocast, example_generator, free_memory_bytes, init_runtime,
                                        resolved_settings, run_entry, scaling_warnings, seed_everything, to_device)
from minillm_cli.engine.sampler import SamplingParams, model_kwargs, release_engine, sample
from minillm_cli.engine.selection import Best, validation_line
from minillm_cli.engine.train_utils import (StopSignal, check_finite, clip_and_step, make_optimizer,
                                            make_scheduler, micro_batches)
from minillm_cli.errors import InputError, RunError
from minillm_cli.eval.results import clean_json
from minillm_cli.progress import MetricsWriter, Progress


@run_entry
def run_distill(cfg: DistillConfig) -> dict:
    from minillm_cli.engine import fsdp

    if cfg.run.fsdp or fsdp.fsdp_from_env():
        from minillm_cli.models import adapter_base

        fsdp.check_supported(lora=cfg.model_opts.lora() is not None, teacher_device=cfg.teacher_device,
                             save_adapter=cfg.model_opts.save_adapter,
                             adapter=cfg.student if adapter_base(cfg.student) else None, flag=cfg.run.fsdp)
    unused = cfg.unused_options()
    if unused:  # (a PT loss or a teacher mix a baseline never applied must not look applied)
        Progress("distill", quiet=cfg.run.quiet, is_main=os.environ.get("RANK", "0") == "0").log(
            f"note: --method {cfg.method} does not use {', '.join(unused)}")
    if cfg.method in ("kd", "rkl"):
        return _run_teacher_forced(cfg)
    if cfg.method == "seqkd":
        return _run_seqkd(cfg)
    return MiniLLMRun(cfg).run()


# ---------------------------------------------------------------------------------------------
# Baselines: the SFT loop with another objective or other targets
# ---------------------------------------------------------------------------------------------
def _run_teacher_forced(cfg: DistillConfig) -> dict:
    from minillm_cli.engine.baselines import teacher_forced_objective
    from minillm_cli.engine.sft import train_sft
    from minillm_cli.engine.teacher import load_teacher

    def setup(rt, tok):
        teacher, _ = load_teacher(cfg.teacher, student_tokenizer=tok, device=rt.device,
                                  teacher_device=cfg.teacher_device, peft=cfg.teacher_peft,
                                  trust_remote_code=cfg.model_opts.trust_remote_code,
                                  context=(cfg.data.max_length, "--max-length"), template=cfg.data.template,
                                  note=Progress("distill", quiet=cfg.run.quiet, is_main=rt.is_main).log)
        if rt.fsdp:
            from minillm_cli.engine import fsdp

            fsdp.shard(teacher, rt, trainable=False)
        return {"objective": teacher_forced_objective(teacher, cfg.method, cfg.kd_ratio)}

    return train_sft(cfg.as_sft(cfg.student), command=f"distill-{cfg.method}", record=cfg, setup=setup)


def _run_seqkd(cfg: DistillConfig) -> dict:
    from minillm_cli.data.prepare import load_splits
    from minillm_cli.data.template import end_of_answer_id
    from minillm_cli.engine.baselines import generate_seqkd_data
    from minillm_cli.engine.sft import train_sft
    from minillm_cli.engine.teacher import load_teacher
    from minillm_cli.models import precheck_trained_model

    # (before the runtime exists: rank 0 by the launcher's RANK, as for the notes above)
    messages = Progress("distill", quiet=cfg.run.quiet, is_main=os.environ.get("RANK", "0") == "0")
    # (the runtime train_sft joins: every process must hear of a data error any one of them meets)
    splits = init_runtime(cfg.run.device, fsdp=cfg.run.fsdp).together(
        lambda: load_splits(cfg.data, note=messages.log, warn=messages.warn))

    def setup(rt, tok):
        # The teacher answers every training prompt once; then it is freed and the student is SFT'd
        # on those answers by the same loop as `sft`.
        if cfg.run.select_by == "rougeL":  # (refused now, as the SFT after the generation would)
            from minillm_cli.engine.selection import ValidationRouge

            ValidationRouge(tok, splits["valid"], template=cfg.data.template,
                            max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length,
                            seed=cfg.run.seed).check()
        run_config = Path(cfg.run.out).expanduser() / "run_config.json"
        # (now, not after the generation: a run stopped during it can then be resumed; not over a
        # resumed run's own, which a refused resume must leave as it was)
        if rt.is_main and not run_config.is_file():
            save_run_config(cfg, run_config.parent, "distill-seqkd", {
                "stage": "teacher generation", "resolved": {"end_of_answer": end_of_answer_id(tok, cfg.data.template)}})
        teacher, _ = load_teacher(cfg.teacher, student_tokenizer=tok, device=rt.device,
                                  teacher_device=cfg.teacher_device, peft=cfg.teacher_peft,
                                  trust_remote_code=cfg.model_opts.trust_remote_code,
                                  context=(cfg.data.max_prompt_length + cfg.max_new_tokens,
                                           "--max-prompt-length + --max-new-tokens"), template=cfg.data.template,
                                  note=Progress("distill", quiet=cfg.run.quiet, is_main=rt.is_main).log)
        if rt.fsdp:
            from minillm_cli.engine import fsdp

            fsdp.shard(teacher, rt, trainable=False)
        # what loading the student would refuse, before the teacher's generation rather than after
        precheck_trained_model(cfg.student, lora=cfg.model_opts.lora(), length=cfg.data.max_length,
                               flags="--max-length", who="student",
                               trust_remote_code=cfg.model_opts.trust_remote_code)
        progress = Progress("seqkd", quiet=cfg.run.quiet, is_main=rt.is_main)
        responses, ends = generate_seqkd_data(teacher, tok, splits["train"], cfg=cfg, rt=rt,
                                              path=Path(cfg.run.out) / "seqkd_data.jsonl", progress=progress)
        return {"responses": responses, "ends": ends}

    return train_sft(cfg.as_sft(cfg.student), command="distill-seqkd", record=cfg, setup=setup,
                     train_examples=splits["train"], valid_examples=splits["valid"])


# ---------------------------------------------------------------------------------------------
# MiniLLM
# ---------------------------------------------------------------------------------------------
class MiniLLMRun:
    """State of one MiniLLM run; `run()` is the loop. Methods are the loop's named steps."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.opts = MiniLLMOptions(
            single_step=cfg.single_step, length_norm=cfg.length_norm, gamma=cfg.gamma,
            include_current_reward=cfg.include_current_reward, whiten=cfg.whiten, reward_scale=cfg.reward_scale,
            reward_clip=cfg.reward_clip, clip_ratio=cfg.clip_ratio, importance_weight=cfg.importance_weight,
            cache_teacher_logits=bool(cfg.cache_teacher_logits))  # ("where it fits": decided in setup)
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p)

    # -- setup -------------------------------------------------------------------------------
    def setup(self, rt) -> None:
        from minillm_cli.data.prepare import load_splits
        from minillm_cli.data.template import answer_stops
        from minillm_cli.data.tokenize import encode_prompts
        from minillm_cli.engine.teacher import load_teacher
        from minillm_cli.models import (adapter_note, check_context, compute_dtype, end_generation_at, load_model,
                                        load_tokenizer, low_precision_warning, pick_dtype)

        cfg = self.cfg
        self.rt = rt
        seed_everything(cfg.run.seed)
        self.tok = tok = load_tokenizer(cfg.student, trust_remote_code=cfg.model_opts.trust_remote_code, what="student")
        if cfg.run.resume:
            check_resumed_answer_end(cfg.run.out, tok, cfg.data.template)
        rollout = (cfg.data.max_prompt_length + cfg.max_new_tokens, "--max-prompt-length + --max-new-tokens")
        messages = Progress("distill", quiet=cfg.run.quiet, is_main=rt.is_main)
        note, warn = messages.log, messages.warn
        self.teacher, self.vocab = load_teacher(cfg.teacher, student_tokenizer=tok, device=rt.device,
                                                teacher_device=cfg.teacher_device, peft=cfg.teacher_peft,
                                                trust_remote_code=cfg.model_opts.trust_remote_code, context=rollout,
                                                note=note, template=cfg.data.template)
        self.pt = None
        if cfg.pt_data:
            from minillm_cli.data.pretrain_read import PretrainData

            self.pt = PretrainData(cfg.pt_data)
            self.pt.check_tokenizer(tok)
            if cfg.pt_coef > 0 and cfg.pt_kd_ratio > 0:  # (the teacher sees PT chunks only for their KD term)
                check_context(self.teacher, self.pt.seq_len, "--pt-data's sequence length", "teacher", note)
        splits = rt.together(lambda: load_splits(cfg.data, note=note, warn=warn))
        self.prompts, _, dropped = encode_prompts(tok, splits["train"], cfg.data.template, cfg.data.max_prompt_length)
        self.stops = answer_stops(tok, cfg.data.template)  # where rollouts end: EOS, or the chat turn's end and EOS
        # the first --eval-prompts validation prompts that fit (not the first ones, less those that do not)
        valid, _, v_dropped = encode_prompts(tok, splits["valid"], cfg.data.template, cfg.data.max_prompt_length)
        self.valid_prompts = valid[: cfg.eval_prompts]
        if cfg.run.select_by == "reverse-kl" and not self.valid_prompts:
            raise InputError(f"--select-by reverse-kl: no validation prompt ({len(splits['valid'])} read, {v_dropped} "
                             f"over --max-prompt-length {cfg.data.max_prompt_length}) to compute valid_reverse_kl on")
        if cfg.eval_prompts and not self.valid_prompts:
            warn(f"no validation prompt ({len(splits['valid'])} read, {v_dropped} over --max-prompt-length "
                 f"{cfg.data.max_prompt_length}): valid_reverse_kl will not be logged")
        elif cfg.eval_prompts and v_dropped and len(self.valid_prompts) < cfg.eval_prompts:  # (lost to length)
            note(f"validation: {len(self.valid_prompts)} prompts, fewer than --eval-prompts {cfg.eval_prompts} "
                 f"({len(splits['valid'])} read, {v_dropped} over --max-prompt-length)")
        if not self.prompts:
            raise InputError(f"{cfg.data.data}: no training prompt left after dropping {dropped} over "
                             f"--max-prompt-length {cfg.data.max_prompt_length}")
        self.rouge = None
        if cfg.run.select_by == "rougeL":
            from minillm_cli.engine.selection import ValidationRouge

            self.rouge = ValidationRouge(tok, splits["valid"], template=cfg.data.template,
                                         max_prompt_length=cfg.data.max_prompt_length,
                                         max_length=cfg.data.max_length, seed=cfg.run.seed)
            self.rouge.check()
            note(self.rouge.describe())
        self.student = load_model(cfg.student, tokenizer=tok, device=rt.device,
                                  dtype=pick_dtype(rt.device, cfg.model_opts.dtype, training=True),
                                  lora=resumed_lora(cfg.model_opts.lora(), cfg.run.out, cfg.run.resume),
                                  trust_remote_code=cfg.model_opts.trust_remote_code,
                                  what="student")
        check_context(self.student, *rollout, "student", note)
        end_generation_at(self.student, tok, self.stops[0])
        if self.rouge is not None:  # (its answers run to --max-length, as evaluate's do)
            check_context(self.student, cfg.data.max_length, "--max-length", "student", note)
        if line := adapter_note(self.student, cfg.model_opts.save_adapter):
            note(line)
        if line := low_precision_warning(self.student, cfg.optim.lr):
            warn(line)
        if self.pt is not None and cfg.pt_coef > 0:
            check_context(self.student, self.pt.seq_len, "--pt-data's sequence length", "student", note)
        # Dropout off for the whole run (as the reference code): rollouts, scoring and updates
        # must see the same policy for the PPO ratio to mean anything.
        self.student.eval()
        # works in eval mode too (engine/recompute.py)
        self.recomputed = recompute_blocks(self.student) if cfg.model_opts.gradient_checkpointing else 0
        if rt.fsdp:  # before the optimizer: sharding replaces the parameters
            from minillm_cli.engine import fsdp

            fsdp.shard(self.teacher, rt, trainable=False)
            fsdp.shard(self.student, rt, trainable=True)
        self.amp = compute_dtype(rt.device)
        self.engine = rt.sampling_engine(cfg.sampler)
        free = free_memory_bytes(rt.device)
        t_dtype = next(self.teacher.parameters()).dtype
        cache, why = teacher_logit_cache(
            cfg.cache_teacher_logits, single_step=cfg.single_step, rollouts=cfg.num_rollouts,
            max_new_tokens=cfg.max_new_tokens, vocab_size=self.vocab, dtype=t_dtype,
            free_bytes=free, processes=rt.world_size)
        self.opts = replace(self.opts, cache_teacher_logits=cache)
        if why:
            note(why)
        kept = teacher_logit_bytes(cfg.num_rollouts, cfg.max_new_tokens, self.vocab, t_dtype) if cache else 0
        fit = minillm_rows_that_fit(
            self.student, self.teacher, device=rt.device, max_prompt_length=cfg.data.max_prompt_length,
            max_new_tokens=cfg.max_new_tokens, vocab_size=self.vocab, free_bytes=free, kept_logit_bytes=kept)
        self.rollout_batch, why = rollout_batch_size(
            cfg.rollout_batch_size, batch_size=cfg.batch_size, rollouts=cfg.num_rollouts, processes=rt.world_size,
            whiten=cfg.whiten, sharded=rt.fsdp, fit=rt.least(fit), micro_batch=cfg.micro_batch_size)
        if why:
            note(why)
        # scoring and the validation KL run their forwards on the update's micro-batch of rows at
        # a time (its memory is the one the user sized); under FSDP one forward per unit, as
        # every process must run as many forwards (each is a collective)
        self.forward_rows = None if rt.fsdp else cfg.micro_batch_size
        self.oom = SplitOnOOM(allowed=not (cfg.whiten or rt.fsdp), release=lambda: release_engine(self.engine),
                              note=note)
        per_iter = cfg.ppo_epochs * (cfg.num_rollouts // cfg.batch_size)
        if cfg.steps:
            self.steps = cfg.steps
        else:
            iters = max(1, math.ceil((cfg.epochs or 1.0) * len(self.prompts) / cfg.num_rollouts))
            self.steps = iters * per_iter
        self.opt = make_optimizer(self.student, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.adam_betas,
                                  fused=rt.device.type == "cuda" and not rt.fsdp)
        self.sched = make_scheduler(self.opt, warmup_steps=cfg.optim.warmup_steps, total_steps=self.steps,
                                    schedule=cfg.optim.schedule)
        self.dropped = dropped
        # The update's micro-steps replayed from CUDA graphs (engine/captured_step.py). Not under
        # FSDP (its collectives and lockstep padding), not with checkpointed blocks (they keep
        # random state on the host), and not with the teacher on another device (its forward
        # would run outside the capture).
        t_dev = next(self.teacher.parameters()).device
        self.micro = CapturedSteps(self.micro_step, list(self.student.parameters()), rt.device,
                                   enabled=cfg.update_graphs and not rt.fsdp and not self.recomputed
                                   and t_dev == rt.device)

    # -- rollouts ----------------------------------------------------------------------------
    def sample(self, ids, att, teacher, alpha: float, generators: list):
        """Responses of the current student (mixed with `teacher` by `alpha`) to left-padded prompts,
        by the --sampler engine (the eager loop under FSDP, where every forward is a collective)."""
        rt = self.rt
        return sample(self.student, teacher, ids.to(rt.device), att.to(rt.device), params=self.params, alpha=alpha,
                      eos_id=self.stops, pad_id=self.tok.pad_token_id, generators=generators,
                      vocab_size=self.vocab, engine=self.engine, sync=rt.decode_sync)

    @torch.no_grad()
    def collect(self, iteration: int):
        """Sample and score `num_rollouts` rollouts with the current student; returns the buffer
        (identical on every process) and rollout statistics."""
        from minillm_cli.data.tokenize import left_pad

        cfg, rt = self.cfg, self.rt
        t0 = time.perf_counter()
        self.micro.release()  # the update graphs' memory is the sampler's until the next update
        which = prompts_for_iteration(len(self.prompts), cfg.num_rollouts, cfg.run.seed, iteration)
        local, n_tok, scored = [], 0, None

        def sample_and_score(slots):
            ids, att = left_pad([self.prompts[which[j]] for j in slots], self.tok.pad_token_id)
            with autocast(rt.device, self.amp):
                roll = self.sample(ids, att, self.teacher, cfg.teacher_mix_alpha,
                                   [example_generator(cfg.run.seed, iteration, j) for j in slots])
                return score_rollouts(self.student, self.teacher, roll, self.opts, self.vocab,
                                      rows_per_forward=self.forward_rows)

        for k, slots, real in rt.lockstep(micro_batches(list(range(cfg.num_rollouts)), self.rollout_batch)):
            # (in pieces after an out-of-memory error: SplitOnOOM)
            scored = self.oom.run(slots, sample_and_score,
                                  lambda parts: parts[0] if len(parts) == 1 else concat_batches(parts))
            if not real:  # FSDP lockstep padding
                continue
            n_tok += int(scored.response_mask.sum())
            local.append((k, scored))
        release_engine(self.engine)  # free the static caches before the updates need the memory
        buffer = gather_parts(rt, local, rt.device)
        del local, scored  # the parts (their cached teacher logits) are in the buffer now
        secs = rt.sum_scalar(time.perf_counter() - t0) / rt.world_size
        lengths = buffer.response_mask.sum(1).float()
        return buffer, {"rollout_tokens_per_s": rt.sum_scalar(n_tok) / max(secs, 1e-9),
                        "response_len": float(lengths.mean()), "rollout_s": secs}

    # -- one optimizer step ------------------------------------------------------------------
    def update(self, buffer, rows: list[int], step: int) -> dict:
        cfg, rt = self.cfg, self.rt
        n_tok = float(buffer.tokens_in(rows))  # host arithmetic: no wait for the device
        normalizer = n_tok if cfg.loss_normalizer == "tokens" else float(len(rows))
        normalizer = max(normalizer, 1.0)
        step_stats = StatsSum(rt.device)  # summed on the device, read once below
        for k, micro, real in rt.lockstep(micro_batches(rows, cfg.micro_batch_size)):
            batch = buffer.select(micro, bucket=self.micro.enabled)  # (few shapes: few graphs)
            if not real:  # FSDP lockstep padding: the collectives run, the gradient is zero
                with autocast(rt.device, self.amp):
                    loss, _ = minillm_loss(self.student, self.teacher, batch, self.opts, normalizer, self.vocab)
                (loss * 0.0).backward()
                continue
            step_stats.add(self.micro(batch, normalizer), len(micro))  # (read before the next replay)
        pt_loss = self.pt_update(step) if self.pt is not None and cfg.pt_coef > 0 else None
        sums, w_max = step_stats.read()  # after all of the step's work is queued
        if pt_loss is not None:
            sums["pt_loss"] = pt_loss
        total = rt.sum_scalars(sums)  # one collective for every statistic
        row = {"single_step": total["single_step"], "pg": total["pg"],
               "clip_frac": total["clip_frac"] / max(n_tok, 1), "ratio_mean": total["ratio_mean"] / max(n_tok, 1),
               "w_mean": total["w_mean"] / max(n_tok, 1), "w_max": rt.max_scalar(w_max),
               "reward_mean": total["reward_mean"] / max(n_tok, 1), "reverse_kl": total["rkl_seq"] / len(rows)}
        for term in ("single_step", "pg"):
            check_finite(row[term], step=step, term=f"{term} loss")
        if "pt_loss" in total:
            row["pt_loss"] = total["pt_loss"]
            check_finite(row["pt_loss"], step=step, term="PT loss")
        row["update_tokens"] = n_tok
        return row

    def micro_step(self, batch, normalizer: torch.Tensor) -> dict:
        """One micro-batch's MiniLLM loss and backward; its statistics (what `self.micro`
        replays: no host reads, autocast casting afresh)."""
        with autocast(self.rt.device, self.amp, cache=False):
            loss, st = minillm_loss(self.student, self.teacher, batch, self.opts, normalizer, self.vocab)
        loss.backward()
        return st

    def pt_update(self, step: int) -> float:
        """Backward the PT loss for this step's pre-training chunks (this rank's micro-batches);
        returns this rank's share of the (normalised) CE, before `pt_coef`."""
        from minillm_cli.engine.losses import kd_loss

        cfg, rt = self.cfg, self.rt
        bs = cfg.pt_batch_size or cfg.batch_size
        idx = self.pt.indices_for_step(step, bs, cfg.run.seed)
        seq = self.pt.meta["seq_len"]
        normalizer = float(bs * (seq - 1))
        value = torch.zeros((), dtype=torch.float64, device=rt.device)  # read once, after the loop
        for k, micro, real in rt.lockstep(micro_batches(idx, cfg.micro_batch_size)):
            ids = to_device(self.pt.batch(micro), rt.device)
            mask = torch.ones(ids.shape[0], seq - 1, dtype=torch.bool, device=rt.device)
            with autocast(rt.device, self.amp):
                logits = self.student(input_ids=ids, **model_kwargs(self.student, use_cache=False)).logits[:, :-1]
                t_logits = None
                if cfg.pt_kd_ratio > 0:
                    with torch.no_grad():
                        t_logits = self.teacher(input_ids=ids).logits[:, :-1]
                loss = kd_loss(logits, t_logits, ids[:, 1:], mask, normalizer, self.vocab, kd_ratio=cfg.pt_kd_ratio)
            if not real:  # FSDP lockstep padding
                (loss * 0.0).backward()
                continue
            (cfg.pt_coef * loss).backward()
            value += loss.detach().to(value.dtype)
        return float(value)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The validation figures: `valid_reverse_kl` (on --eval-prompts prompts) and, under
        --select-by rougeL, `valid_rougeL` (engine/selection.py)."""
        found = self.valid_kl() if self.valid_prompts else {}
        if self.rouge is not None:
            found["valid_rougeL"] = self.rouge.score(self.student, self.rt, rows=self.rollout_batch, engine=self.engine,
                                                     vocab_size=self.vocab, autocast_dtype=self.amp,
                                                     note=self.oom.note)
        return found

    @torch.no_grad()
    def valid_kl(self) -> dict:
        """KL(q||p) of whole responses, estimated on student-only samples of the validation prompts
        as E_q sum_t KL(q_t || p_t): the exact per-position KL over the vocabulary (the
        single-step form), which is unbiased for the sequence-level KL and has far less variance
        than sum_t log q/p of the sampled tokens."""
        from minillm_cli.data.tokenize import left_pad
        from minillm_cli.engine.losses import reverse_kl
        from minillm_cli.engine.minillm import response_logits_in_chunks

        cfg, rt = self.cfg, self.rt

        def kl_of(piece: list[int]) -> tuple[float, int]:
            """(sum over the piece's rows of their responses' KL(q||p), response tokens)."""
            ids, att = left_pad([self.valid_prompts[j] for j in piece], self.tok.pad_token_id)
            kl = 0.0
            with autocast(rt.device, self.amp):
                roll = self.sample(ids, att, None, 0.0, [example_generator(cfg.run.seed + 1, 10**6, j) for j in piece])
                full = torch.cat([roll.prompt_ids, roll.response_ids], 1)
                mask = torch.cat([roll.prompt_mask.long(), roll.response_mask.long()], 1)
                # forwards of as many rows as in scoring; one chunk's logits at a time (a zip of the
                # two generators would keep the previous chunk's alive while the next is computed)
                teacher_chunks = response_logits_in_chunks(self.teacher, full, mask, roll.response_mask,
                                                           self.forward_rows)
                for r, s_logits, t in response_logits_in_chunks(self.student, full, mask, roll.response_mask,
                                                                self.forward_rows):
                    t_logits = next(teacher_chunks)[1]
                    kl += float(reverse_kl(s_logits, t_logits, roll.response_mask[r, :t], 1.0, self.vocab))
                    del s_logits, t_logits
            return kl, int(roll.response_mask.sum())

        total, n_seq, n_tok = 0.0, 0, 0
        slots = list(range(len(self.valid_prompts)))
        for k, chunk, real in rt.lockstep(micro_batches(slots, self.rollout_batch)):
            # (in pieces after an out-of-memory error, as the rollouts)
            kl, tokens = self.oom.run(chunk, kl_of, lambda parts: tuple(map(sum, zip(*parts))))
            if not real:  # FSDP lockstep padding
                continue
            total += kl
            n_seq += len(chunk)
            n_tok += tokens
        release_engine(self.engine)  # free the static caches before the updates need the memory
        total, n_seq, n_tok = rt.sum_scalar(total), rt.sum_scalar(n_seq), rt.sum_scalar(n_tok)
        return {"valid_reverse_kl": total / max(n_seq, 1), "valid_reverse_kl_per_token": total / max(n_tok, 1)}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from minillm_cli.engine import fsdp

        cfg = self.cfg  # (FSDP support was checked by run_distill)
        rt = init_runtime(cfg.run.device, fsdp=cfg.run.fsdp)
        out = Path(cfg.run.out).expanduser()

        def claim_out() -> list[str]:  # rank 0 alone touches --out; every rank learns a refusal
            prepare_out_dir(cfg.run.out, overwrite=cfg.run.overwrite, resume=cfg.run.resume, inputs=cfg.inputs())
            return check_resume(cfg, out, "distill") if cfg.run.resume else []

        notes = rt.on_main(claim_out)
        self.setup(rt)
        progress = Progress("distill", quiet=cfg.run.quiet, is_main=rt.is_main)
        progress.log(f"distill (minillm): {len(self.prompts)} training prompts ({self.dropped} dropped over "
                     f"--max-prompt-length), {self.steps} steps of {cfg.batch_size} rollouts ({cfg.grad_accum} "
                     f"micro-batches), {rt.world_size} process(es) on {rt.device}"
                     + (", student and teacher sharded (FSDP)" if rt.fsdp else ""))
        if self.recomputed:
            progress.log(f"gradient checkpointing: {self.recomputed} student blocks recompute their activations")
        for line in scaling_warnings(rt.world_size, cfg.grad_accum, fsdp=rt.fsdp, batch_size=cfg.batch_size):
            progress.log(line)
        step, iteration, plan_pos, buffer, plan, row = 0, 0, 0, None, [], {}
        chosen = Best(cfg.run.select_by)  # which weights OUT keeps (engine/selection.py)
        state = (ckpt.resume_run(out, model=self.student, optimizer=self.opt, scheduler=self.sched,
                                 steps=self.steps, is_main=rt.is_main) if cfg.run.resume else None)
        if cfg.run.resume and state is None:
            progress.log(f"note: no checkpoint in {out} yet: training starts at step 0")
            for line in notes:
                progress.log(line)
        if state is not None:
            step, extra = state["step"], state["extra"]
            iteration, plan_pos = extra["iteration"], extra["plan_pos"]
            chosen = Best.from_state(cfg.run.select_by, extra.get("best"))
            if extra.get("buffer") is not None:
                buffer = from_state(extra["buffer"], rt.device)
                plan = ppo_plan(cfg.num_rollouts, cfg.batch_size, cfg.ppo_epochs, cfg.run.seed, iteration - 1)
            progress.log(f"resumed from {state['path'].name} (step {step})")
            if line := chosen.reconcile(out):
                progress.log(line)
            for line in notes:  # (after the checkpoint: a refused resume says only why)
                progress.log(line)
            # a finished run resumed runs no step: its summary takes the last logged row's figures
            row = state["logged"][-1] if state["logged"] else {}
        if rt.is_main:
            from minillm_cli.engine.fast_sampler import resolve_engine

            save_run_config(cfg, out, "distill", {
                "steps": self.steps, "train_prompts": len(self.prompts), "world_size": rt.world_size,
                "sharded": rt.fsdp,
                "resolved": resolved_settings(rt, self.student, self.amp,
                                              sampler=resolve_engine(self.engine, rt.device),
                                              cache_teacher_logits=self.opts.caches_teacher_logits,
                                              rollout_batch_size=self.rollout_batch,
                                              end_of_answer=self.stops[0])})
        metrics = MetricsWriter(out / "metrics.jsonl" if rt.is_main else None)
        progress.start(self.steps)
        t0, roll_stats = time.perf_counter(), {}
        from minillm_cli.engine.fast_sampler import attention_summary, matmul_summary

        said = [None, None]  # the decode attention's and matmuls' lines last logged
        with StopSignal() as stop:
            while step < self.steps:
                if buffer is None or plan_pos >= len(plan):
                    buffer = None  # (its cached teacher logits must not live through the next collect)
                    buffer, roll_stats = self.collect(iteration)
                    # (timed per decoder shape: said when it changes)
                    for i, line in enumerate((attention_summary(), matmul_summary())):
                        if line and line != said[i]:
                            progress.log(line)
                            said[i] = line
                    plan = ppo_plan(cfg.num_rollouts, cfg.batch_size, cfg.ppo_epochs, cfg.run.seed, iteration)
                    iteration, plan_pos = iteration + 1, 0
                step += 1
                t_up = time.perf_counter()
                row = self.update(buffer, plan[plan_pos], step)
                plan_pos += 1
                lr = self.opt.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on)
                row["grad_norm"] = self.step_optimizer(step)
                row.update(step=step, iteration=iteration, lr=lr,
                           update_tokens_per_s=row.pop("update_tokens") / max(time.perf_counter() - t_up, 1e-9),
                           **roll_stats)
                roll_stats = {}
                if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == self.steps:
                    found = self.evaluate()
                    row.update(found)
                    kept = chosen.improves(row.get(chosen.column))  # (the same on every process)
                    if kept:
                        chosen.record(row[chosen.column], step)
                        if rt.is_main:
                            chosen.mark(out, pending=True)
                        fsdp.save_student(self.student, self.tok, out, rt, merge_lora=not cfg.model_opts.save_adapter,
                                          trust_remote_code=cfg.model_opts.trust_remote_code)
                        if rt.is_main:
                            chosen.mark(out)
                    if found:
                        progress.log(validation_line(step, found, kept, cfg.run.select_by))
                metrics.write(row)
                progress.update(step, rkl=row["reverse_kl"], pg=row["pg"], ss=row["single_step"],
                                **({"pt": row["pt_loss"]} if "pt_loss" in row else {}))
                stopping = stop.agreed(rt)
                if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == self.steps or stopping:
                    ckpt.save_on_main(rt, out, step, model=self.student, optimizer=self.opt, scheduler=self.sched,
                                      extra={"iteration": iteration, "plan_pos": plan_pos, "best": chosen.state(),
                                             "buffer": to_state(buffer) if plan_pos < len(plan) else None})
                if stopping:
                    progress.close()
                    raise RunError(f"stopped by {stopping} after step {step}; checkpoint saved, continue "
                                   f"with the same command plus --resume", everywhere=True)  # (the ranks agreed)
        progress.close()
        summary = {"command": "distill", "method": "minillm", "out": str(out), "steps": self.steps,
                   **chosen.summary(), "seconds": round(time.perf_counter() - t0, 2),
                   "update_micro_steps": self.micro.summary,
                   **{k: row.get(k) for k in ("reverse_kl", "valid_reverse_kl", "valid_rougeL", "pt_loss") if k in row}}
        if chosen.step is None:  # the final weights are the result
            fsdp.save_student(self.student, self.tok, out, rt, merge_lora=not cfg.model_opts.save_adapter,
                              trust_remote_code=cfg.model_opts.trust_remote_code)
        if rt.is_main:
            (out / "summary.json").write_text(json.dumps(clean_json(summary), indent=2))
        metrics.close()
        rt.barrier()
        return summary

    def step_optimizer(self, step: int) -> float:
        if not self.rt.fsdp:  # FSDP reduce-scatters (sums) the gradients in backward
            self.rt.reduce_gradients([p for p in self.student.parameters() if p.requires_grad])
        return clip_and_step(self.student, self.opt, self.sched, self.cfg.optim.max_grad_norm, step=step)
