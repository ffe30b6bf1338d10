"""Teacher-mixed rollout throughput: the naive loop vs the fast sampler, same models, batch, lengths.

    python benchmarks/rollout.py [--batches 8,64,256] [--prompt-len 128] [--new-tokens 128]
                                 [--alpha 0.2] [--engines naive,graph] [--device cuda] [--tiny]

Default shapes are PERFORMANCE.md's: gpt2-xl teacher + gpt2 student (random weights, bf16),
prompt 128, 128 new tokens, alpha 0.2. Every engine runs each shape once untimed (warm-up; for
"graph" this includes the capture, reported as first_call_s), then timed. A random model almost
never samples EOS, so every row decodes all new tokens on both sides. The memory-bound limit of a
step = (both models' weight bytes + batch x mean context x KV bytes per token of the pair) /
device-to-device bandwidth measured in this run; mean context = prompt + new/2.
Engines: naive (benchmarks/_common.naive_rollout), eager (sampler.sample: the package's reference
loop), static / graph / compile (engine/fast_sampler.py; --compile-mode max-autotune-no-cudagraphs
lets inductor time Triton matmuls against cuBLAS at the decoder's shapes).
"""
from __future__ import annotations

import time

from _common import (base_parser, build_pair, decode_step_fields, emit, low_dtype, machine,
                     measure_bandwidth, naive_rollout, random_prompts, setup, sync, table, timed,
                     weight_bytes)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batches", default=None, help="comma list (default 8,64,256; tiny 4,8)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--engines", default=None,
                    help="comma list of naive,eager,static,graph,compile (default naive,graph on CUDA, "
                         "naive,eager,static on CPU)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compile engine (fast_sampler.COMPILE_MODE): "
                         "default or max-autotune-no-cudagraphs")
    args = setup(ap.parse_args(), "rollout")
    import torch

    from minillm_cli.engine import fast_sampler
    fast_sampler.COMPILE_MODE = args.compile_mode
    from minillm_cli.engine.rollout_batch import kv_bytes_per_token
    from minillm_cli.engine.sampler import SamplingParams, sample

    cuda = args.device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("4,8" if args.tiny else "8,64,256")).split(",")]
    P = args.prompt_len or (16 if args.tiny else 128)
    T = args.new_tokens or (16 if args.tiny else 128)
    engines = (args.engines or ("naive,graph" if cuda else "naive,eager,static")).split(",")
    student, teacher, spec = build_pair(args)
    V = spec["vocab"]
    eos = V - 1
    dt_low = low_dtype(args)
    bw = measure_bandwidth(args.device)
    wbytes = weight_bytes(student) + weight_bytes(teacher)
    kv_tok = kv_bytes_per_token(student, dt_low) + kv_bytes_per_token(teacher, dt_low)
    info = machine(args)
    emit(args, {"kind": "machine", **info, "bandwidth_Bps": bw, "weight_bytes": wbytes,
                "kv_bytes_per_token": kv_tok, "prompt": P, "new_tokens": T, "alpha": args.alpha,
                "compile_mode": args.compile_mode})
    print(f"bandwidth (d2d copy, read+written) {bw / 1e9:.1f} GB/s; weights {wbytes / 1e9:.2f} GB; "
          f"KV {kv_tok / 1e3:.0f} KB/token for the pair")

    if any(e in ("static", "graph", "compile") for e in engines):  # a failed check means fallback
        for name, model in (("student", student), ("teacher", teacher)):
            reason = fast_sampler.self_check(model, V, args.device, eos)
            emit(args, {"kind": "self_check", "model": name, "ok": reason is None, "reason": reason})

    params = SamplingParams(T)
    rows = []
    for B in batches:
        ids, mask = random_prompts(B, P, V, args.device, args.seed)
        limit_s = (wbytes + B * (P + T / 2) * kv_tok) / bw
        for eng in engines:
            torch.manual_seed(args.seed)

            def run():
                if eng == "naive":
                    return naive_rollout(student, teacher, ids, mask, T, args.alpha, eos, V)[1]
                gens = [torch.Generator().manual_seed(args.seed * 100003 + b) for b in range(B)]
                r = sample(student, teacher, ids, mask, params=params, alpha=args.alpha, eos_id=eos,
                           pad_id=eos, generators=gens, vocab_size=V, engine=eng)
                return r.response_ids.shape[1]

            try:
                sync(args.device)
                t0 = time.perf_counter()
                run()  # warm-up: same shapes (and the CUDA graph capture for "graph")
                sync(args.device)
                first = time.perf_counter() - t0
                steps, secs, peak = timed(run, args.device)
            except torch.cuda.OutOfMemoryError as e:  # report and go on
                emit(args, {"kind": "rollout", "engine": eng, "batch": B, "error": f"OOM: {e}"[:200]})
                torch.cuda.empty_cache()
                continue
            ms = 1e3 * secs / steps
            rec = {"kind": "rollout", "engine": eng, "batch": B, "prompt": P, "new_tokens": T, "steps": steps,
                   "ms_per_step": ms, "tokens_per_s": B * steps / secs, "seconds": secs, "first_call_s": first,
                   "peak_gib": peak, "limit_ms_per_step": 1e3 * limit_s, "limit_tokens_per_s": B / limit_s,
                   "pct_of_limit": 100 * limit_s * 1e3 / ms, "device": info.get("gpu", info["device"])}
            if eng != "naive":  # which attention and matmuls the decode step ran (fast_sampler.DECODE_*)
                rec.update(decode_step_fields())
            emit(args, rec)
            rows.append(rec)
        fast_sampler.release()
    print()
    table(rows, [("engine", "engine", ""), ("batch", "batch", ""), ("ms_per_step", "ms/step", "{:.2f}"),
                 ("tokens_per_s", "tokens/s", "{:,.0f}"), ("peak_gib", "peak GiB", "{:.2f}"),
                 ("limit_ms_per_step", "limit ms", "{:.2f}"), ("pct_of_limit", "% limit", "{:.1f}"),
                 ("first_call_s", "first s", "{:.2f}")])
    for B in batches:
        by = {r["engine"]: r for r in rows if r["batch"] == B}
        if "naive" in by:
            for e, r in by.items():
                if e != "naive":
                    print(f"batch {B}: {e} is {by['naive']['ms_per_step'] / r['ms_per_step']:.2f}x naive")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
