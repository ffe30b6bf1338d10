"""How many prompts to sample together when `--rollout-batch-size` is 0 (the default, "auto").

A decode step reads every weight of both models once, whatever the batch, so on a GPU rollout
throughput grows almost with the batch until reading the KV caches dominates (H200, gpt2-xl
teacher + gpt2 student, 128 + 128 tokens, 2026-11-28, run 3: 1,942 tokens/s at batch 8, 10,290
at 64, 19,027 at 256). The old default, `--batch-size` (8 at the paper's settings), left most
of that unused.

Auto: as many rows as the KV caches of the models fit in ROLLOUT_SHARE of the memory free after
loading (less what the optimizer state, the sampler's weight copies and the teacher-logit cache
will hold by then), up to this process's share of `--num-rollouts`, in as few near-equal
micro-batches as that allows; never fewer than the old default. Every process takes the same
size (the least fit over processes). Under FSDP auto keeps `--batch-size`. Each row draws from
its own generator (seed, iteration, example), so the batch decides which rows run together, not
the tokens (beyond float rounding: matmuls of another shape). Only `--whiten` (advantages
whitened over each rollout micro-batch) makes the result depend on it: there auto keeps
`--batch-size`, so results do not depend on the machine's free memory.
"""
from __future__ import annotations

import gc
import math

import torch

from minillm_cli.engine.runtime import free_memory_bytes

# share of the free memory the sampler's KV caches (and its per-row buffers) may take; the rest
# is for prefill activations, scoring forwards, the kept teacher logits' join and the optimizer
ROLLOUT_SHARE = 1 / 2
# float32 [rows, vocab] buffers a decode step holds at once (log-softmaxes of both models, the
# mixture, filters, the sampled distribution): a rough upper count
_STEP_VOCAB_BUFFERS = 8


def cache_length(max_prompt_length: int, max_new_tokens: int) -> int:
    """Positions the sampler allocates per row at most: the prompt left-padded to a multiple of
    64 (graph engines share graphs across prompt lengths) plus the new tokens, rounded up to 16
    (fast_sampler.sample)."""
    return -(-(-(-max_prompt_length // 64) * 64 + max_new_tokens) // 16) * 16


def attention_dims(model) -> tuple[int, int, int, int] | None:
    """(layers, query heads, key/value heads, head dimension) from `model`'s config; None when
    the config does not say."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    return layers, heads, kv_heads, head_dim


def kv_bytes_per_token(model, dtype: torch.dtype | None) -> int | None:
    """Bytes of keys and values one token takes in `model`'s cache (all layers), with the cache in
    `dtype` (autocast's; None: the weights' dtype). None when the config does not say."""
    dims = attention_dims(model)
    if dims is None:
        return None
    layers, _, kv_heads, head_dim = dims
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _key(device) -> tuple[str, int]:
    device = torch.device(device)
    return device.type, device.index or 0


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()  # (an FSDP shard: this process's part)


def held_while_sampling(student, models, device: torch.device) -> int:
    """Bytes not yet allocated when the batch is chosen (after loading) that will be while later
    rollouts are sampled: AdamW's two states per trainable student parameter (created by the
    first update, kept for the run), and the sampler's copies on `device`: half-precision copies
    of float32 matmul weights (counted as 2 bytes per float32 parameter, an upper bound) and each
    LM head padded to aligned rows."""
    total = sum(2 * _local_numel(p) * p.element_size() for p in student.parameters() if p.requires_grad)
    for model in models:
        if model is None or _key(next(model.parameters()).device) != _key(device):
            continue
        total += sum(2 * _local_numel(p) for p in model.parameters() if p.dtype == torch.float32)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            total += 2 * _local_numel(head.weight)
    return total


def rows_that_fit(models, *, device: torch.device, cache_len: int, vocab_size: int,
                  free_bytes: int | None) -> int | None:
    """Rows whose sampling state fits in ROLLOUT_SHARE of the free memory: on `device` (the
    rollout's; `free_bytes` free there) the KV caches of the models that live there plus the
    decode step's vocabulary-wide buffers; on any other device a model lives on (--teacher-device),
    its KV cache against what is free there. Caches are counted in the weights' dtype: a float32
    model under autocast may keep float32 keys (rotary models do), so its bf16 cache would be
    the exception, not the rule. None when a cache size or a free amount is unknown."""
    need = {_key(device): _STEP_VOCAB_BUFFERS * vocab_size * 4}
    for model in models:
        if model is None:
            continue
        per_token = kv_bytes_per_token(model, None)
        if per_token is None:
            return None
        where = _key(next(model.parameters()).device)
        need[where] = need.get(where, 0) + cache_len * per_token
    fit = None
    for where, n in need.items():
        free = free_bytes if where == _key(device) else free_memory_bytes(torch.device(*where))
        if free is None:
            return None
        fit = min(fit if fit is not None else math.inf, int(ROLLOUT_SHARE * free // n))
    return fit


def minillm_rows_that_fit(student, teacher, *, device: torch.device, max_prompt_length: int, max_new_tokens: int,
                          vocab_size: int, free_bytes: int | None, kept_logit_bytes: int = 0) -> int | None:
    """rows_that_fit for a MiniLLM run's rollouts: both models' caches against the memory free
    now (`free_bytes`, after loading) less what the next rollouts will find taken
    (held_while_sampling, and `kept_logit_bytes` of teacher logits kept from scoring)."""
    if free_bytes is not None:
        later = held_while_sampling(student, (student, teacher), device) + kept_logit_bytes
        free_bytes = max(free_bytes - later, 0)
    return rows_that_fit((student, teacher), device=device, vocab_size=vocab_size, free_bytes=free_bytes,
                         cache_len=cache_length(max_prompt_length, max_new_tokens))


def rollout_batch_size(requested: int, *, batch_size: int, rollouts: int, processes: int, whiten: bool,
                       fit: int | None, sharded: bool = False, micro_batch: int | None = None
                       ) -> tuple[int, str | None]:
    """(rows sampled together, a note saying why when decided here). requested > 0 is kept as is.
    rollouts: prompts one sampling phase draws over all processes (each gets its share);
    fit: rows_that_fit, the same on every process (None: unknown); sharded: under FSDP, where
    scoring runs one forward per rollout batch (every process must run as many), auto keeps the
    update's micro-batch (`micro_batch`, default --batch-size), as when nothing is known or too
    little fits. --whiten keeps --batch-size itself: the advantages are whitened per rollout batch."""
    if requested > 0:
        return requested, None
    if whiten:
        old = max(1, min(batch_size, rollouts))
        return old, (f"rollouts sampled {old} at a time (--batch-size): --whiten whitens advantages over each "
                     f"rollout micro-batch (--rollout-batch-size sets it)")
    old = max(1, min(micro_batch or batch_size, rollouts))
    keep = ("under --fsdp scoring runs one forward per rollout micro-batch" if sharded else
            "the KV cache size or the free memory is unknown" if fit is None else None)
    if keep:
        return old, (f"rollouts sampled {old} at a time (the update's micro-batch): {keep} "
                     f"(--rollout-batch-size sets it)")
    share = math.ceil(rollouts / processes)
    rows = max(1, min(share, fit))
    rows = math.ceil(share / math.ceil(share / rows))  # as few micro-batches as fit, near-equal in size
    if rows < min(old, share):
        return old, (f"rollouts sampled {old} at a time (the update's micro-batch, the least auto takes; about "
                     f"{fit} fit in the memory free for KV caches; --rollout-batch-size sets it)")
    return rows, (f"rollouts sampled {rows} at a time ({fit} would fit in the memory free for KV caches; "
                  f"--rollout-batch-size sets it)")


class SplitOnOOM:
    """Runs work over a list of rows in `pieces` near-equal parts (1 at first) and joins the
    results; when the device runs out of memory, frees the sampler's caches and runs the rows
    again in twice as many parts, and keeps that many for later calls. The estimate behind the
    auto batch counts the KV caches, not every transient a model's forward allocates, and a GPU
    may be shared. Exact: each row samples from its own generator, recreated for the retry, so
    only which rows run together changes. allowed=False (--whiten, whose advantages depend on
    what is scored together; FSDP, where every process must run as many forwards) re-raises."""

    def __init__(self, *, allowed: bool, release, note):
        self.pieces, self.allowed, self.release, self.note = 1, allowed, release, note

    def run(self, rows: list, work, join):
        while True:
            size = -(-len(rows) // self.pieces)
            try:
                parts = [work(rows[a : a + size]) for a in range(0, len(rows), size)]
            except torch.cuda.OutOfMemoryError:
                if not self.allowed or size <= 1:
                    raise
            else:
                return join(parts)  # (outside the try: joining would not use less memory in pieces)
            # (outside the except block: its traceback no longer holds the failed attempt's tensors)
            self.release()
            gc.collect()  # (what reference cycles still hold of the failed attempt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.pieces *= 2
            self.note(f"out of device memory with {size} rollouts sampled together: {-(-size // 2)} at a time "
                      f"from now on (results do not depend on it; --rollout-batch-size sets the batch)")
