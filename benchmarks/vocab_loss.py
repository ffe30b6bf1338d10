"""The vocabulary-wide half of a MiniLLM update step on its own: naive vs ours, time and memory.

    python benchmarks/vocab_loss.py [--batch 8] [--response-len 256] [--vocab 50257]
                                    [--variants naive,ours] [--repeats 3] [--device cuda]

Inputs are what the update step hands the loss: the student's response logits (a [B, T, V] view
of a [B, T+1, V] leaf that requires grad, in the autocast dtype: bf16 on CUDA), the teacher's
cached response logits [B, T, V] (same dtype), the sampled tokens, and per-token advantages,
old log-probs and weights. One step = the MiniLLM loss on them (token log-probs of the samples for
the clipped policy-gradient term, plus the single-step reverse KL) and its backward.

naive: full-vocabulary float32 log-softmax of both models through autograd (what a direct
implementation, and the naive train step of benchmarks/train_step.py, does).
ours: engine/minillm.minillm_terms (losses.vocab_terms), the code the engine runs.

Memory: on CUDA the peak allocated above what the inputs hold; on a CPU each variant runs in a
subprocess and the figure is the growth of the peak resident set over the inputs (glibc told to
map every block over 64 KiB, so freed tensors leave the resident set). Both count the gradient
of the logits, which every variant must produce.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from _common import base_parser, emit, machine, setup, sync, table


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def _inputs(args, torch):
    B, T, V = args.batch, args.response_len, args.vocab
    dt = torch.bfloat16 if args.device.type == "cuda" else torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(args.seed)
    leaf = (torch.randn(B, T + 1, V, generator=g) * 2).to(args.device, dt).requires_grad_(True)
    t_logits = (torch.randn(B, T, V, generator=g) * 2).to(args.device, dt)
    targets = torch.randint(0, V, (B, T), generator=g).to(args.device)
    mask = torch.ones(B, T, dtype=torch.bool, device=args.device)
    mask[:, T - T // 8 :] = False  # some finished rows' padding
    per_tok = lambda: torch.randn(B, T, generator=g).to(args.device)  # noqa: E731
    return leaf, t_logits, targets, mask, -per_tok().abs() - 3.0, per_tok(), per_tok().abs()


def _naive_loss(s, t, targets, mask, old_logp, adv, w, normalizer, V, torch):
    from minillm_cli.engine.losses import policy_gradient_loss
    s_lp = s[..., :V].float().log_softmax(-1)
    t_lp = t[..., :V].float().log_softmax(-1)
    new = s_lp.gather(-1, targets[..., None]).squeeze(-1)
    pg, _ = policy_gradient_loss(new, old_logp, adv, None, mask, 0.2, normalizer)
    kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    return pg + (kl * w * mask).sum() / normalizer


def _our_loss(s, t, targets, mask, old_logp, adv, w, normalizer, V, torch):
    from minillm_cli.engine.minillm import MiniLLMOptions, RolloutBatch, minillm_terms
    B, T = targets.shape
    ones = torch.ones_like(old_logp)
    batch = RolloutBatch(input_ids=torch.cat([targets[:, :1], targets], 1), attention_mask=torch.ones_like(targets),
                         prompt_len=1, response_mask=mask, old_logp=old_logp, teacher_logp=ones, rewards=ones,
                         advantages=adv, pg_weights=ones, ss_weights=w, w=ones)
    pg, ss, _ = minillm_terms(s, t, batch, MiniLLMOptions(), normalizer, V)
    return pg + ss


def run_variant(args, variant: str) -> dict:
    import torch
    leaf, t_logits, targets, mask, old_logp, adv, w = _inputs(args, torch)
    fn = {"naive": _naive_loss, "ours": _our_loss}[variant]
    normalizer = float(mask.sum())
    cuda = args.device.type == "cuda"

    def step():
        leaf.grad = None
        loss = fn(leaf[:, :-1], t_logits, targets, mask, old_logp, adv, w, normalizer, args.vocab, torch)
        loss.backward()
        return loss.detach()

    step()  # warm-up (and the first allocation of the gradient)
    sync(args.device)
    leaf.grad = None
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
    else:
        base = _rss_gib()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        loss = step()
    sync(args.device)
    secs = (time.perf_counter() - t0) / args.repeats
    if cuda:
        extra = (torch.cuda.max_memory_allocated(args.device) - base) / 2 ** 30
    else:  # ru_maxrss is KiB on Linux; the peak so far includes the warm-up (same shapes)
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - base
    inputs = sum(x.numel() * x.element_size() for x in (leaf, t_logits)) / 2 ** 30
    return {"kind": "vocab_loss", "variant": variant, "batch": args.batch, "response_len": args.response_len,
            "vocab": args.vocab, "dtype": str(leaf.dtype), "seconds": secs, "extra_gib": extra,
            "inputs_gib": inputs, "loss": float(loss), "device": machine(args).get("gpu", str(args.device))}


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="naive,ours")
    ap.add_argument("--one", default=None, help="(internal) run one variant in this process")
    args = setup(ap.parse_args(), "vocab_loss")
    if args.tiny:
        args.batch, args.response_len, args.vocab = 2, 16, 512
    if args.one:
        rec = run_variant(args, args.one)
        emit(args, rec)
        return 0
    emit(args, {"kind": "machine", **machine(args)})
    rows = []
    for variant in args.variants.split(","):
        if args.device.type == "cuda":
            rec = run_variant(args, variant)
            emit(args, rec)
        else:  # a fresh process per variant: the resident-set peak is per process
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            cmd = [sys.executable, __file__, "--one", variant, "--device", "cpu", "--batch", str(args.batch),
                   "--response-len", str(args.response_len), "--vocab", str(args.vocab),
                   "--repeats", str(args.repeats), "--dtype", args.dtype, "--seed", str(args.seed)]
            if args.json_out:
                cmd += ["--json-out", args.json_out]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rec = json.loads(next(ln[5:] for ln in out.splitlines() if ln.startswith("JSON ")))
            print(out, end="")
        rows.append(rec)
    print()
    table(rows, [("variant", "variant", ""), ("seconds", "s/step", "{:.3f}"), ("extra_gib", "extra GiB", "{:.2f}"),
                 ("inputs_gib", "inputs GiB", "{:.2f}"), ("loss", "loss", "{:.6f}")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
