"""One full MiniLLM iteration (rollouts, scoring, PPO epochs): naive vs ours, same models and data.

    python benchmarks/iteration.py [--num-rollouts 256] [--rollout-batch 0] [--prompt-len 256]
        [--new-tokens 256] [--ppo-epochs 4] [--batch-size 64] [--micro-batch 8] [--device cuda] [--tiny]

Reference settings (METHOD.md): 256 rollouts of <= 256 new tokens after prompts of <= 256 tokens
(ragged, left padded), alpha 0.2, 4 PPO epochs. Random-weight models almost never emit EOS, so
every rollout runs the full 256 tokens (the worst case). Both sides sample in rollout batches of
the size `distill` picks by default on this machine (--rollout-batch-size 0: as many as the KV
caches fit in half the free memory, engine/rollout_batch.py), so the comparison is of engines,
not of batch sizes; --rollout-batch sets it.
naive: benchmarks/_common.naive_rollout; score_rollouts unchunked (one forward per rollout
batch); the updates through _common.naive_minillm_loss (full-vocabulary float32 log-softmaxes
through autograd, the teacher forward repeated in every PPO micro-batch); bf16 student weights.
ours: sampler.sample(engine="auto": static caches + CUDA graph on CUDA, the static loop on CPU);
scoring forwards of --batch-size rows (as distill), teacher logits kept from scoring
(cache_teacher_logits), the fused chunked vocabulary pass, float32 master weights with bf16
autocast, fused AdamW, gelu_new as one kernel (engine/fused.py), the LM heads over vocabulary
rows padded to a multiple of 64 (engine/aligned_head.py; the sampler's own padded copy while
sampling), the update micro-steps replayed from CUDA graphs captured per micro-batch shape during
the iteration (engine/captured_step.py, as distill; --eager-updates: eagerly). Each side first runs one untimed warm-up iteration over one rollout batch and
one PPO epoch (the same shapes), then one timed iteration; phases are timed separately.
"""
from __future__ import annotations

import time

from _common import (base_parser, build_pair, decode_step_fields, emit, low_dtype, machine, naive_minillm_loss, naive_rollout,
                     random_prompts, setup, sync, table)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--num-rollouts", type=int, default=None)
    ap.add_argument("--rollout-batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--ppo-epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--sides", default="naive,ours")
    ap.add_argument("--width-bucket", type=int, default=None,
                    help="minillm.WIDTH_BUCKET for the teacher-forced forwards (default 64; 1: the exact widths)")
    ap.add_argument("--keep-allocator-cache", action="store_true",
                    help="fast_sampler.release() without torch.cuda.empty_cache()")
    ap.add_argument("--eager-updates", action="store_true",
                    help="ours: the update micro-steps eagerly instead of from CUDA graphs (distill --no-update-graphs)")
    args = setup(ap.parse_args(), "iteration")
    import torch

    from minillm_cli.engine import fast_sampler, minillm
    from minillm_cli.engine.aligned_head import aligned_heads
    from minillm_cli.engine.captured_step import CapturedSteps
    from minillm_cli.engine.fused import fused_activations
    from minillm_cli.engine.losses import DEFAULT_CHUNK
    from minillm_cli.engine.minillm import MiniLLMOptions, minillm_loss, score_rollouts
    from minillm_cli.engine.rollouts import concat_batches
    from minillm_cli.engine.runtime import autocast
    from minillm_cli.engine.sampler import Rollout, SamplingParams, sample

    if args.width_bucket:
        minillm.WIDTH_BUCKET = args.width_bucket
    if args.keep_allocator_cache:
        fast_sampler.EMPTY_CACHE_ON_RELEASE = False
    tiny, cuda = args.tiny, args.device.type == "cuda"
    N = args.num_rollouts or (8 if tiny else 256)
    RB = args.rollout_batch or 0  # 0: what distill picks (below, once the models are built)
    P = args.prompt_len or (8 if tiny else 256)
    T = args.new_tokens or (8 if tiny else 256)
    E = args.ppo_epochs or (2 if tiny else 4)
    MB = args.batch_size or (4 if tiny else 64)  # the reference's mini-batch, distill's default (run 5 used 32)
    mu = args.micro_batch or (2 if tiny else 8)
    low = low_dtype(args)
    info = machine(args)
    student0, teacher, spec = build_pair(args, student_dtype=torch.float32)
    V = spec["vocab"]
    if not RB:
        from minillm_cli.engine.minillm import teacher_logit_bytes
        from minillm_cli.engine.rollout_batch import minillm_rows_that_fit, rollout_batch_size
        from minillm_cli.engine.runtime import free_memory_bytes

        fit = minillm_rows_that_fit(student0, teacher, device=args.device, max_prompt_length=P, max_new_tokens=T,
                                    vocab_size=V, free_bytes=free_memory_bytes(args.device),
                                    kept_logit_bytes=teacher_logit_bytes(N, T, V, next(teacher.parameters()).dtype))
        RB, why = rollout_batch_size(0, batch_size=MB, rollouts=N, processes=1, whiten=False, fit=fit)
        print(why, flush=True)
    emit(args, {"kind": "machine", **info, "num_rollouts": N, "rollout_batch": RB, "prompt": P, "new_tokens": T,
                "ppo_epochs": E, "batch_size": MB, "micro_batch": mu, "width_bucket": minillm.WIDTH_BUCKET,
                "empty_cache_on_release": fast_sampler.EMPTY_CACHE_ON_RELEASE})
    eos = V - 1
    ids_all, mask_all = random_prompts(N, P, V, args.device, args.seed, ragged=True)
    params = SamplingParams(T)

    def one_iteration(side: str, student, opt, n_rows: int, epochs: int, micro_step=None) -> dict:
        naive = side == "naive"
        if micro_step is not None:
            micro_step.release()  # as distill does before each rollout phase: captures are timed
        opts = MiniLLMOptions(chunk_size=None if naive else DEFAULT_CHUNK, cache_teacher_logits=not naive)
        amp = (lambda: autocast(args.device, low)) if not naive else (lambda: autocast(args.device, None))
        times = {}
        sync(args.device)
        t0 = time.perf_counter()
        parts, n_tok = [], 0
        t_roll = 0.0
        for s in range(0, n_rows, RB):
            ids, mask = ids_all[s : s + RB], mask_all[s : s + RB]
            sync(args.device)
            r0 = time.perf_counter()
            with torch.no_grad(), amp():
                if naive:
                    toks, _ = naive_rollout(student, teacher, ids, mask, T, args.alpha, eos, V)
                    m = torch.ones_like(toks, dtype=torch.bool)
                    z = torch.zeros(toks.shape, device=toks.device)
                    roll = Rollout(ids, mask.bool(), toks, m, z, z)
                else:
                    gens = [torch.Generator().manual_seed(args.seed * 7919 + s + b) for b in range(ids.shape[0])]
                    roll = sample(student, teacher, ids, mask, params=params, alpha=args.alpha, eos_id=eos,
                                  pad_id=eos, generators=gens, vocab_size=V, engine="auto" if cuda else "static")
                sync(args.device)
                t_roll += time.perf_counter() - r0
                if s == 0:  # the first batch of an iteration builds (captures) the decoder
                    times["first_rollout_batch_s"] = time.perf_counter() - r0
                parts.append(score_rollouts(student, teacher, roll, opts, V, rows_per_forward=None if naive else MB))
            n_tok += int(roll.response_mask.sum())
        if not naive:
            fast_sampler.release()
        buffer = concat_batches(parts)  # (carries the cached teacher logits, as in the engine)
        del parts
        sync(args.device)
        times["rollout_s"] = t_roll
        times["score_s"] = time.perf_counter() - t0 - t_roll
        t1 = time.perf_counter()
        steps = 0
        g = torch.Generator().manual_seed(args.seed)
        for _ in range(epochs):
            order = torch.randperm(n_rows, generator=g).tolist()
            for i in range(0, n_rows - MB + 1, MB):
                rows = order[i : i + MB]
                opt.zero_grad(set_to_none=True)
                # ours: host arithmetic, as distill (one device read per buffer: row_extents)
                norm = float(buffer.response_mask[rows].sum()) if naive else float(buffer.tokens_in(rows))
                for j in range(0, MB, mu):
                    if not naive:  # the engine's micro-step (distill's MiniLLMRun.update)
                        micro_step(buffer.select(rows[j : j + mu], bucket=micro_step.enabled), norm)
                        continue
                    with amp():
                        loss = naive_minillm_loss(student, teacher, buffer.select(rows[j : j + mu]), norm, V)
                    loss.backward()
                opt.step()
                steps += 1
        sync(args.device)
        times["update_s"] = time.perf_counter() - t1
        times["total_s"] = time.perf_counter() - t0
        times["optimizer_steps"] = steps
        times["rollout_tokens"] = n_tok
        times["rollout_tokens_per_s"] = n_tok / max(t_roll, 1e-9)
        n_batches = -(-n_rows // RB)
        if n_batches > 1:  # what a batch costs once the decoder exists, to see the capture's share
            times["later_rollout_batch_s"] = (t_roll - times["first_rollout_batch_s"]) / (n_batches - 1)
        return times

    rows = []
    for side in args.sides.split(","):
        naive = side == "naive"
        student = student0 if not naive else None
        if naive:
            import copy
            student = copy.deepcopy(student0).to(low)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-6, **({"fused": True} if cuda and not naive else {}))
        student.eval()  # dropout off during updates, as the engine does
        micro_step = None
        if not naive:  # opts as one_iteration's for ours
            opts = MiniLLMOptions(chunk_size=DEFAULT_CHUNK, cache_teacher_logits=True)

            def fn(batch, norm, student=student, opts=opts):
                with autocast(args.device, low, cache=False):
                    loss, _ = minillm_loss(student, teacher, batch, opts, norm, V)
                loss.backward()
                return loss.detach()

            micro_step = CapturedSteps(fn, list(student.parameters()), args.device,
                                       enabled=cuda and not args.eager_updates)
        try:
            # ours: gelu_new as one kernel and the LM heads over aligned rows, as the engine loads
            # models on CUDA (engine/fused.py, engine/aligned_head.py)
            with fused_activations([] if naive else [student, teacher]), \
                    aligned_heads([] if naive else [student, teacher]):
                # warm-up: same shapes, less work; then the weights it was given back, so the timed
                # iteration samples from them (the naive side's updates, over left padding with the
                # plain mask as the reference code runs them, end with NaN weights on the H200:
                # 2026-11-28, see minillm.forward_mask)
                given = {k: v.clone() for k, v in student.state_dict().items()}
                one_iteration(side, student, opt, min(N, max(MB, RB)), 1, micro_step)
                with torch.no_grad():
                    student.load_state_dict(given)
                del given
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                rec = one_iteration(side, student, opt, N, E, micro_step)
        except torch.cuda.OutOfMemoryError as e:
            emit(args, {"kind": "iteration", "side": side, "error": f"OOM: {e}"[:200]})
            torch.cuda.empty_cache()
            continue
        rec = {"kind": "iteration", "side": side, **rec,
               "weights_finite_after": all(bool(torch.isfinite(p).all()) for p in student.parameters()),
               "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
               "device": info.get("gpu", info["device"])}
        if not naive:  # which attention and matmuls the decode steps ran (fast_sampler.DECODE_*)
            rec.update(decode_step_fields())
            rec["update_micro_steps"] = micro_step.summary  # (captures and replays, both iterations)
        emit(args, rec)
        rows.append(rec)
        del opt
        if naive:
            del student
        if cuda:
            torch.cuda.empty_cache()
    print()
    table(rows, [("side", "side", ""), ("rollout_s", "rollout s", "{:.2f}"), ("score_s", "score s", "{:.2f}"),
                 ("update_s", "update s", "{:.2f}"), ("total_s", "total s", "{:.2f}"),
                 ("rollout_tokens_per_s", "roll tok/s", "{:,.0f}"), ("peak_gib", "peak GiB", "{:.2f}")])
    if len(rows) == 2:
        print(f"speedup (total): {rows[0]['total_s'] / rows[1]['total_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
