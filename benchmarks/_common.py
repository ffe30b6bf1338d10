"""Shared benchmark helpers: models, the naive rollout baseline, bandwidth / FLOP probes, timing,
memory, JSON output. Not part of the package (benchmarks only).

Shapes: by default the ones in /work/shared/reference/PERFORMANCE.md -- random-weight GPT-2
configurations, teacher gpt2-xl (48 x 1600, 25 heads), student gpt2 (12 x 768, 12 heads),
vocabulary 50257 -- built directly on the device (`with torch.device(...)`). `--tiny` shrinks
everything (2-layer/1-layer models, vocabulary 512) so the same code runs on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REAL = {"teacher": dict(n_layer=48, n_embd=1600, n_head=25), "student": dict(n_layer=12, n_embd=768, n_head=12),
        "vocab": 50257}
TINY = {"teacher": dict(n_layer=2, n_embd=64, n_head=2), "student": dict(n_layer=1, n_embd=32, n_head=2),
        "vocab": 512}


def base_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="weights of frozen models / autocast dtype on CUDA (CPU always runs fp32)")
    ap.add_argument("--json-out", default=None,
                    help="append JSON lines here (default: $OUT/<name>.jsonl when $OUT is set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    return ap


def setup(args, name: str):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.json_out is None and os.environ.get("OUT"):
        args.json_out = str(Path(os.environ["OUT"]) / f"{name}.jsonl")
    args.bench = name
    return args


def low_dtype(args) -> torch.dtype:
    if args.device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]


def machine(args) -> dict:
    d = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": str(args.device),
         "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import transformers
        d["transformers"] = transformers.__version__
    except Exception:
        pass
    if args.device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(args.device)
    return d


def emit(args, record: dict) -> None:
    record = {"bench": args.bench, **record}
    line = json.dumps(record, sort_keys=False, default=str)
    print("JSON " + line, flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format)."""
    widths = [max(len(h), 10) for _, h, _ in cols]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths)))
    for r in rows:
        cells = []
        for (k, _, fmt), w in zip(cols, widths):
            v = r.get(k)
            cells.append(("-" if v is None else (fmt.format(v) if fmt else str(v))).rjust(w))
        print("  ".join(cells))


# -- models -----------------------------------------------------------------------------------

def build_gpt2(shape: dict, vocab: int, device, dtype, seed: int, n_positions: int = 1024):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    # initialised in `dtype` on the device (no float32 copy first; works over fake tensors too,
    # where .to(dtype) cannot swap the tied embedding)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT2LMHeadModel(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_pair(args, *, student_dtype=None, teacher_dtype=None):
    """(student, teacher, spec): random-weight GPT-2 pair on args.device."""
    spec = TINY if args.tiny else REAL
    low = low_dtype(args)
    t0 = time.perf_counter()
    teacher = build_gpt2(spec["teacher"], spec["vocab"], args.device, teacher_dtype or low, args.seed + 1)
    student = build_gpt2(spec["student"], spec["vocab"], args.device, student_dtype or low, args.seed + 2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    print(f"models built in {time.perf_counter() - t0:.1f}s: teacher {n_params(teacher):,} params, "
          f"student {n_params(student):,} params, vocab {spec['vocab']}, attention "
          f"{teacher.config._attn_implementation}", flush=True)
    return student, teacher, spec


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- probes -----------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (as
    PERFORMANCE.md does)."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    dt = time.perf_counter() - t0
    del a, b
    return 2 * nbytes * reps / dt


def measure_matmul_flops(device, dtype) -> float:
    """Dense matmul FLOP/s (8192^3 on CUDA in `dtype`, 1024^3 fp32 on CPU)."""
    device = torch.device(device)
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class Peak:
    """Peak allocated GiB of a region on CUDA (None on CPU)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.gib = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30


def timed(fn, device, repeats: int = 1):
    """(result of the last call, mean seconds, peak GiB). Synchronises around the region."""
    with Peak(device) as pk:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        sync(device)
        dt = (time.perf_counter() - t0) / repeats
    return out, dt, pk.gib


def random_prompts(B: int, P: int, vocab: int, device, seed: int, ragged: bool = False):
    """Left-padded random prompts [B, P] (ragged: lengths P/2..P), mask [B, P] long. Token ids
    avoid vocab-1 (the EOS of the benchmark models)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    if ragged:
        lens = torch.randint(P // 2, P + 1, (B,), generator=g)
        for b in range(B):
            mask[b, : P - int(lens[b])] = 0
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, vocab - 1))
    return ids.to(device), mask.to(device)


# -- the naive rollout (what the reference implementation does) -------------------------------

@torch.no_grad()
def naive_rollout(student, teacher, ids, mask, max_new: int, alpha: float, eos_id: int, vocab: int):
    """Eager Hugging Face models, a DynamicCache per model, one student and one teacher forward
    per token, softmax-mix-multinomial in between, a host check per token for early stop.
    Returns (tokens [B, T], steps run)."""
    from minillm_cli.engine.sampler import model_kwargs, output_cache, positions_from_mask

    B = ids.shape[0]
    caches = {}
    mask = mask.long()
    pos = positions_from_mask(mask)
    nxt = mask.sum(-1)

    def fwd(name, model, x, m, p):
        out = model(input_ids=x, attention_mask=m, position_ids=p,
                    **model_kwargs(model, cache=caches.get(name), use_cache=True))
        caches[name] = output_cache(out)
        return out.logits[:, -1, :vocab].float()

    s_log = fwd("s", student, ids, mask, pos)
    t_log = fwd("t", teacher, ids, mask, pos)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    toks = []
    for t in range(max_new):
        probs = alpha * t_log.softmax(-1) + (1 - alpha) * s_log.softmax(-1)
        tok = torch.multinomial(probs, 1).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
        toks.append(tok)
        finished |= tok == eos_id
        if t == max_new - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
        p = (nxt + t)[:, None]
        s_log = fwd("s", student, tok[:, None], mask, p)
        t_log = fwd("t", teacher, tok[:, None], mask, p)
    return torch.stack(toks, 1), len(toks)


# -- the naive update (a direct implementation of the MiniLLM loss) ------------------------------

def naive_minillm_loss(student, teacher, batch, normalizer: float, vocab: int, clip: float = 0.2):
    """What a direct implementation does for one micro-batch (engine/minillm.RolloutBatch):
    full-sequence forwards of both models (the teacher again at every call), full-vocabulary
    float32 log-softmaxes through autograd, single-step reverse KL + clipped policy-gradient term
    over the response. Same value as engine/minillm.minillm_loss (its stats aside)."""
    from minillm_cli.engine.sampler import positions_from_mask

    ids, att, P = batch.input_ids, batch.attention_mask, batch.prompt_len
    pos = positions_from_mask(att)
    with torch.no_grad():
        t_lp = teacher(input_ids=ids, attention_mask=att, position_ids=pos).logits[..., :vocab].float().log_softmax(-1)
    s_lp = student(input_ids=ids, attention_mask=att, position_ids=pos).logits[..., :vocab].float().log_softmax(-1)
    s_r, t_r = s_lp[:, P - 1 : -1], t_lp[:, P - 1 : -1]
    mask = batch.response_mask.float()
    ss = (s_r.exp() * (s_r - t_r)).sum(-1) * batch.ss_weights
    new = s_r.gather(-1, batch.targets.clamp(0, vocab - 1)[..., None]).squeeze(-1)  # padding ids may be >= V
    rho = ((new - batch.old_logp) * mask).exp() * batch.pg_weights
    adv = batch.advantages
    pg = torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip))
    return ((ss + pg) * mask).sum() / normalizer


def decode_step_fields() -> dict:
    """What the newest fast-sampler call's decode steps ran, for a JSON record: each model's
    attention (kernel used?, why), who wrote the new KV columns, and each model's matmuls
    (split-K kernel for any shape?, why)."""
    from minillm_cli.engine import fast_sampler

    return {"attention": {k: list(v) for k, v in fast_sampler.ATTENTION_NOTES.items()},
            "cache_writes": fast_sampler.cache_writes(),
            "matmuls": {k: list(v) for k, v in fast_sampler.MATMUL_NOTES.items()}}


def kernel_profile(step, n: int, device, top: int = 25) -> dict:
    """torch.profiler over `n` calls of `step`: kernels per call, device milliseconds per call,
    the `top` kernels by device time (printed, and returned for JSON). On a CPU there are no
    kernel events: the counts are 0."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    evs = [e for e in prof.events() if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    dur = lambda e: e.time_range.elapsed_us()  # noqa: E731  (a kernel event's own duration)
    dev_us = sum(dur(e) for e in evs)
    by_name: dict = {}
    for e in evs:
        k = e.name[:90]
        c, t = by_name.get(k, (0, 0.0))
        by_name[k] = (c + 1, t + dur(e))
    best = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    print(f"\nprofile: {len(evs) / n:.0f} kernels per call, {dev_us / n / 1e3:.3f} ms of kernel time per call")
    for name, (c, t) in best:
        print(f"  {t / n / 1e3:8.3f} ms/call  {c / n:6.0f}x  {name}")
    if cuda and not evs:  # this torch keeps kernels elsewhere: print its own table
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top))
    return {"kernels_per_step": len(evs) / n, "kernel_ms_per_step": dev_us / n / 1e3,
            "top": [{"name": k, "per_step": c / n, "ms_per_step": t / n / 1e3} for k, (c, t) in best]}
