"""One MiniLLM update step: the naive step vs ours, same models and batch (8 x 512 by default).

    python benchmarks/train_step.py [--batch 8] [--prompt-len 256] [--response-len 256]
                                    [--repeats 5] [--device cuda] [--tiny]

naive: bf16 student weights, AdamW; _common.naive_minillm_loss: teacher forward (no grad) and
student forward/backward over the whole sequence, full-vocabulary float32 log-softmax of both
through autograd, single-step reverse KL + clipped long-term term over the response (what
PERFORMANCE.md measured).
ours: float32 master weights with bf16 autocast, fused AdamW, engine/minillm.minillm_loss (only
the response positions reach the LM head; the vocabulary-wide terms in one fused float32 pass
over blocks of positions with a closed-form backward, losses.vocab_terms). ours+cached: the same with the teacher logits kept from
score_rollouts (opts.cache_teacher_logits), i.e. no teacher forward in the PPO epochs. "ours"
variants run GPT-2's gelu_new as one fused kernel, as the engine does on CUDA (engine/fused.py);
a "+gelu_new" suffix keeps the composed activation (what was measured on 2026-11-28), a "+ckpt"
suffix checkpoints the student's blocks (`--gradient-checkpointing`; the MFU formula does not
count the recomputed forward).
Reports seconds/step, tokens/s (batch x length), peak GiB and MFU = (6 N_s + 2 N_t) tokens/s over
the dense matmul FLOP/s measured in this run (the formula counts the teacher forward even for
ours+cached, so that row's MFU is "useful work per second", above the hardware's true MFU, which
is printed as "hw MFU": the FLOPs the step really runs).
"""
from __future__ import annotations

from _common import (base_parser, build_gpt2, emit, low_dtype, machine, measure_matmul_flops, n_params,
                     naive_minillm_loss, setup, sync, table, timed, REAL, TINY)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", default="naive,ours,ours+cached,ours+cached+gelu_new,ours+cached+ckpt")
    args = setup(ap.parse_args(), "train_step")
    import torch

    from minillm_cli.engine.fused import fused_activations
    from minillm_cli.engine.recompute import recompute_blocks
    from minillm_cli.engine.minillm import MiniLLMOptions, RolloutBatch, minillm_loss, response_logits
    from minillm_cli.engine.runtime import autocast

    cuda = args.device.type == "cuda"
    B = args.batch or (2 if args.tiny else 8)
    P = args.prompt_len or (16 if args.tiny else 256)
    T = args.response_len or (16 if args.tiny else 256)
    reps = args.repeats or (5 if cuda else 2)
    spec = TINY if args.tiny else REAL
    V = spec["vocab"]
    low = low_dtype(args)
    peak_flops = measure_matmul_flops(args.device, low)
    info = machine(args)
    emit(args, {"kind": "machine", **info, "matmul_flops": peak_flops, "batch": B, "length": P + T})
    teacher = build_gpt2(spec["teacher"], V, args.device, low, args.seed + 1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    N_t = n_params(teacher)

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, V, (B, P + T), generator=g).to(args.device)
    att = torch.ones(B, P + T, dtype=torch.long, device=args.device)
    resp = torch.ones(B, T, dtype=torch.bool, device=args.device)
    rnd = lambda: torch.randn(B, T, generator=g).to(args.device)  # noqa: E731
    batch = RolloutBatch(input_ids=ids, attention_mask=att, prompt_len=P, response_mask=resp,
                         old_logp=-rnd().abs() - 3.0, teacher_logp=torch.zeros(B, T, device=args.device),
                         rewards=torch.zeros(B, T, device=args.device), advantages=rnd(),
                         pg_weights=torch.ones(B, T, device=args.device),
                         ss_weights=torch.ones(B, T, device=args.device), w=torch.ones(B, T, device=args.device))
    normalizer = float(B * T)
    rows = []
    for variant in args.variants.split(","):
        naive = variant == "naive"
        student = build_gpt2(spec["student"], V, args.device, low if naive else torch.float32, args.seed + 2)
        student.train()
        for mod in student.modules():  # dropout is already 0; eval-style numerics as in the engine
            mod.training = False
        N_s = n_params(student)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-6,
                                **({"fused": True} if (cuda and not naive) else {}))
        cached = variant.startswith("ours+cached")
        if "ckpt" in variant:  # --gradient-checkpointing: the student's blocks recompute in the backward
            recompute_blocks(student)
        opts = MiniLLMOptions(cache_teacher_logits=cached)
        b = batch
        if cached:
            with torch.no_grad(), autocast(args.device, low):
                tl = response_logits(teacher, ids, att, T)[..., :V]
            b = RolloutBatch(**{**{f: getattr(batch, f) for f in batch.__dataclass_fields__}, "teacher_logits": tl})

        def naive_step():
            opt.zero_grad(set_to_none=True)
            loss = naive_minillm_loss(student, teacher, b, normalizer, V)
            loss.backward()
            opt.step()
            return loss.detach()

        def our_step():
            opt.zero_grad(set_to_none=True)
            with autocast(args.device, low):
                loss, _ = minillm_loss(student, teacher, b, opts, normalizer, V)
            loss.backward()
            opt.step()
            return loss.detach()

        step = naive_step if naive else our_step
        try:
            with fused_activations([student, teacher] if not naive and "gelu_new" not in variant else []):
                for _ in range(2):
                    step()
                sync(args.device)
                _, secs, peak = timed(step, args.device, repeats=reps)
        except torch.cuda.OutOfMemoryError as e:
            emit(args, {"kind": "train_step", "variant": variant, "error": f"OOM: {e}"[:200]})
            del student, opt
            torch.cuda.empty_cache()
            continue
        tokens = B * (P + T)
        flops_per_token = 6 * N_s + 2 * N_t
        run_flops = 6 * N_s + (0 if cached else 2 * N_t)  # what this step really computes
        rec = {"kind": "train_step", "variant": variant, "batch": B, "length": P + T, "seconds": secs,
               "tokens_per_s": tokens / secs, "peak_gib": peak, "mfu_pct": 100 * flops_per_token * tokens / secs / peak_flops,
               "hw_mfu_pct": 100 * run_flops * tokens / secs / peak_flops,
               "N_s": N_s, "N_t": N_t, "device": info.get("gpu", info["device"])}
        emit(args, rec)
        rows.append(rec)
        del student, opt, b
        if cuda:
            torch.cuda.empty_cache()
    print()
    table(rows, [("variant", "variant", ""), ("seconds", "s/step", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                 ("peak_gib", "peak GiB", "{:.2f}"), ("mfu_pct", "MFU %", "{:.1f}"), ("hw_mfu_pct", "hw MFU %", "{:.1f}")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
