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
and multiply the LM heads over vocabulary rows padded to a multiple of 64, as the engine does on
CUDA (engine/aligned_head.py; a "+plain_head" suffix keeps the odd-row heads);
a "+gelu_new" suffix keeps the composed activation (what was measured on 2026-11-28), a "+ckpt"
suffix checkpoints the student's blocks (`--gradient-checkpointing`; the MFU formula does not
count the recomputed forward). "ours" variants replay the micro-step (forward, loss, backward)
from a CUDA graph, as distill does on one GPU (engine/captured_step.py; captured in the first
warm-up step); a "+eager" suffix runs it eagerly (`--no-update-graphs`), as "+ckpt" must.
--profile: after each variant's timing, the top kernels of one more step (torch.profiler).
Reports seconds/step, tokens/s (batch x length), peak GiB (allocated, warm-up steps included:
a captured step allocates its activations once, into the graph's pool, at capture; before
2026-11-28's run 5 was recorded only the timed steps counted, which left that pool out) and MFU = (6 N_s + 2 N_t) tokens/s over
the dense matmul FLOP/s measured in this run (the formula counts the teacher forward even for
ours+cached, so that row's MFU is "useful work per second", above the hardware's true MFU, which
is printed as "hw MFU": the FLOPs the step really runs).

--estimate-memory (no GPU needed): runs each variant once on the CPU over fake tensors (no
arithmetic, shapes and dtypes only; torch's FakeTensorMode) under CPU bf16 autocast and reports the
peak of live tensor bytes by category (parameters, gradients, optimizer state, activations,
temporaries; torch.distributed._tools.MemTracker) at the real shapes in seconds. An estimate of
what the GPU's caching allocator will report, not a measurement: CPU autocast's op lists differ
from CUDA's (CUDA runs `pow`, i.e. the composed `gelu_new`, in float32), and the allocator adds
rounding, fragmentation and the cuBLAS workspace. Calibrate with the naive variant, which runs no
autocast: its H200 peak (9.30 GiB, 2026-11-28) against its estimate.
"""
from __future__ import annotations

from _common import (base_parser, build_gpt2, emit, kernel_profile, low_dtype, machine, measure_matmul_flops,
                     n_params, naive_minillm_loss, setup, table, timed, Peak, REAL, TINY)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--response-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", default="naive,ours,ours+eager,ours+cached,ours+cached+eager,"
                                           "ours+cached+plain_head,ours+cached+gelu_new,ours+cached+ckpt")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, the top kernels of one step of each variant (CUDA)")
    ap.add_argument("--estimate-memory", action="store_true",
                    help="peak memory of each variant from fake tensors on the CPU (see above)")
    args = ap.parse_args()
    if args.estimate_memory:
        args.device = "cpu"
    args = setup(args, "train_step")
    import contextlib

    import torch

    from minillm_cli.engine.minillm import RolloutBatch

    estimate = args.estimate_memory
    cuda = args.device.type == "cuda"
    B = args.batch or (2 if args.tiny else 8)
    P = args.prompt_len or (16 if args.tiny else 256)
    T = args.response_len or (16 if args.tiny else 256)
    reps = args.repeats or (5 if cuda else 2)
    spec = TINY if args.tiny else REAL
    V = spec["vocab"]
    low = torch.bfloat16 if estimate else low_dtype(args)
    fake = contextlib.nullcontext()
    if estimate:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode()
    info = machine(args)
    with fake:
        peak_flops = None if estimate else measure_matmul_flops(args.device, low)
        emit(args, {"kind": "machine", **info, "matmul_flops": peak_flops, "batch": B, "length": P + T,
                    "estimate_memory": estimate})
        teacher = build_gpt2(spec["teacher"], V, args.device, low, args.seed + 1)
        for p in teacher.parameters():  # (MemTracker hooks every parameter it meets; no_grad runs it)
            p.requires_grad_(estimate)
        N_t = n_params(teacher)

        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, V, (B, P + T), generator=g).to(args.device)
        att = torch.ones(B, P + T, dtype=torch.long, device=args.device)
        resp = torch.ones(B, T, dtype=torch.bool, device=args.device)
        rnd = lambda: torch.randn(B, T, generator=g).to(args.device)  # noqa: E731
        zeros = lambda: torch.zeros(B, T, device=args.device)  # noqa: E731
        batch = RolloutBatch(input_ids=ids, attention_mask=att, prompt_len=P, response_mask=resp,
                             old_logp=-rnd().abs() - 3.0, teacher_logp=zeros(), rewards=zeros(), advantages=rnd(),
                             pg_weights=zeros() + 1, ss_weights=zeros() + 1, w=zeros() + 1,
                             left_padded=False)  # (as `select` tells the engine's micro-batches: no host read)
        rows = []
        for variant in args.variants.split(","):
            rec = run_variant(variant, args, teacher, batch, V, spec, low, B, T, reps, estimate)
            if cuda:  # (the variant's student, optimizer and batch are gone with its frame)
                torch.cuda.empty_cache()
            if rec is None:
                continue
            N_s = rec.pop("N_s")
            tokens = B * (P + T)
            rec.update({"kind": "memory_estimate" if estimate else "train_step", "variant": variant, "batch": B,
                        "length": P + T, "N_s": N_s, "N_t": N_t, "device": info.get("gpu", info["device"])})
            if not estimate:
                flops_per_token = 6 * N_s + 2 * N_t
                run_flops = 6 * N_s + (0 if variant.startswith("ours+cached") else 2 * N_t)  # what the step computes
                rec.update({"tokens_per_s": tokens / rec["seconds"],
                            "mfu_pct": 100 * flops_per_token * tokens / rec["seconds"] / peak_flops,
                            "hw_mfu_pct": 100 * run_flops * tokens / rec["seconds"] / peak_flops})
            emit(args, rec)
            rows.append(rec)
    print()
    if estimate:
        table(rows, [("variant", "variant", ""), ("peak_gib", "est. peak GiB", "{:.2f}"),
                     ("parameters_gib", "params", "{:.2f}"), ("gradients_gib", "grads", "{:.2f}"),
                     ("optimizer_gib", "optim", "{:.2f}"), ("activations_gib", "activations", "{:.2f}"),
                     ("temporaries_gib", "temp", "{:.2f}"), ("other_gib", "inputs etc.", "{:.2f}")])
        return 0
    table(rows, [("variant", "variant", ""), ("seconds", "s/step", "{:.4f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                 ("peak_gib", "peak GiB", "{:.2f}"), ("mfu_pct", "MFU %", "{:.1f}"), ("hw_mfu_pct", "hw MFU %", "{:.1f}")])
    return 0


def run_variant(variant, args, teacher, batch, V, spec, low, B, T, reps, estimate) -> dict | None:
    """Build the student and optimizer of `variant`, run it; {seconds, peak_gib, N_s} (timed), or
    {peak_gib by category, N_s} (estimate). None after an OOM (reported)."""
    import torch

    from minillm_cli.engine.aligned_head import aligned_heads
    from minillm_cli.engine.captured_step import CapturedSteps
    from minillm_cli.engine.fused import fused_activations
    from minillm_cli.engine.minillm import MiniLLMOptions, RolloutBatch, minillm_loss, response_logits
    from minillm_cli.engine.recompute import recompute_blocks
    from minillm_cli.engine.runtime import autocast

    cuda = args.device.type == "cuda"
    naive = variant == "naive"
    amp = (lambda: torch.autocast("cpu", dtype=low)) if estimate else (lambda: autocast(args.device, low))
    student = build_gpt2(spec["student"], V, args.device, low if naive else torch.float32, args.seed + 2)
    student.train()
    for mod in student.modules():  # dropout is already 0; eval-style numerics as in the engine
        mod.training = False
    N_s = n_params(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, **({"fused": True} if (cuda and not naive) else {}))
    cached = variant.startswith("ours+cached")
    if "ckpt" in variant:  # --gradient-checkpointing: the student's blocks recompute in the backward
        recompute_blocks(student)
    opts = MiniLLMOptions(cache_teacher_logits=cached)
    b = batch
    if cached:
        with torch.no_grad(), amp():
            tl = response_logits(teacher, batch.input_ids, batch.attention_mask, T, batch.left_padded)[..., :V]
        b = RolloutBatch(**{**{f: getattr(batch, f) for f in batch.__dataclass_fields__}, "teacher_logits": tl})
    normalizer = float(B * T)

    def naive_step():
        opt.zero_grad(set_to_none=True)
        loss = naive_minillm_loss(student, teacher, b, normalizer, V)
        loss.backward()
        opt.step()
        return loss.detach()

    def micro(batch, norm):  # distill's MiniLLMRun.micro_step
        with (torch.autocast("cpu", dtype=low) if estimate else autocast(args.device, low, cache=False)):
            loss, _ = minillm_loss(student, teacher, batch, opts, norm, V)
        loss.backward()
        return loss.detach()

    # as distill: replayed from a CUDA graph, except with checkpointed blocks (and "+eager")
    captured = CapturedSteps(micro, list(student.parameters()), args.device,
                             enabled=cuda and "eager" not in variant and "ckpt" not in variant)

    def our_step():
        opt.zero_grad(set_to_none=True)
        loss = captured(b, normalizer)
        opt.step()
        return loss

    step = naive_step if naive else our_step
    with fused_activations([student, teacher] if not naive and "gelu_new" not in variant else []), \
            aligned_heads([student, teacher] if not naive and "plain_head" not in variant else []):
        if estimate:
            from torch.distributed._tools.mem_tracker import MemTracker

            step()  # the optimizer state exists from here on, as in the timed steps
            mt = MemTracker()
            inputs = [getattr(b, f) for f in b.__dataclass_fields__ if isinstance(getattr(b, f), torch.Tensor)]
            mt.track_external(student, opt, teacher, *inputs)  # (what exists before the step counts too)
            with mt:
                step()
            by = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
            gib = {str(getattr(k, "value", k)).lower(): v / 2 ** 30 for k, v in by.items()}
            return {"peak_gib": gib.pop("total"), "parameters_gib": gib.get("parameter", 0.0),
                    "gradients_gib": gib.get("gradient", 0.0), "optimizer_gib": gib.get("optstate", 0.0),
                    "activations_gib": gib.get("activation", 0.0), "temporaries_gib": gib.get("temp", 0.0),
                    "other_gib": gib.get("other", 0.0),
                    "N_s": N_s}
        try:
            # the warm-up's peak counts too: it is where a captured step's activations are
            # allocated (into the graph's private pool, which replays reuse without allocating)
            with Peak(args.device) as warm:
                for _ in range(2):
                    step()
            _, secs, peak = timed(step, args.device, repeats=reps)
            if peak is not None:
                peak = max(peak, warm.gib)
            if args.profile:
                emit(args, {"kind": "profile", "variant": variant, **kernel_profile(step, 1, args.device)})
        except torch.cuda.OutOfMemoryError as e:
            emit(args, {"kind": "train_step", "variant": variant, "error": f"OOM: {e}"[:200]})
            return None
    return {"seconds": secs, "peak_gib": peak, "N_s": N_s}


if __name__ == "__main__":
    raise SystemExit(main())
