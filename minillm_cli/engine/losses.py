"""Pure loss functions on *aligned* inputs (see docs/DESIGN.md).

`logits[:, t]` is the distribution of `targets[:, t]`; `mask[:, t]` is True where that target
counts (response tokens, EOS included; padding never). Logits may be wider than the vocabulary
(padded embeddings), so every function slices `logits[..., :vocab_size]`. Every loss returns
`sum / normalizer`, with the normalizer chosen by the caller (a global token or sequence count),
so gradient accumulation and padding never change the result.

Vocabulary-wide work goes through one fused autograd function, `vocab_terms`: per position the
log-probability of the target and a KL divergence to a second model, computed in float32 (float64
inputs stay float64, for the tests) over blocks of `chunk_size` positions of the flattened
[B, T] grid. Autograd keeps only its inputs (the logits, which exist anyway); the backward
recomputes each block's log-softmaxes and writes the gradient from its closed form
(d/dz log q_y = onehot_y - q;  d/dz KL(q||p) = q (log q - log p - KL);  d/dz KL(p||q) = q - p).
So besides the logits' own gradient, a step holds a few float32 blocks of chunk_size x V, never
a [B, T, V] float32 tensor, and the student's log-softmax is shared by the policy-gradient term
and the KL term (one pass each way instead of one per term, with no checkpoint re-run of
autograd's intermediates).
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 256  # positions per block: 256 x 50,257 float32 = 51 MB per block buffer


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits, float64 for float64 logits (tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _blocks(B: int, T: int, rows: int | None):
    """(batch slice, position slice) blocks of at most `rows` positions covering [B, T]: whole
    rows grouped when they fit, else each row cut into near-equal pieces (T = 257 with rows = 256
    gives 129 + 128, not 256 + 1)."""
    if rows is None or rows <= 0 or rows >= B * T:
        yield slice(0, B), slice(0, T)
    elif rows >= T:
        nb = rows // T
        for b in range(0, B, nb):
            yield slice(b, min(b + nb, B)), slice(0, T)
    else:
        pieces = -(-T // rows)
        size = -(-T // pieces)
        for b in range(B):
            for t in range(0, T, size):
                yield slice(b, b + 1), slice(t, min(t + size, T))


def _log_softmax(x: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.log_softmax(x[..., :vocab_size], dim=-1, dtype=dtype)  # always a new tensor


def _block_kl(lq: torch.Tensor, other: torch.Tensor, kind: str, vocab_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One block's divergence: (aux, kl, q) with kl [*, t], aux the buffer backward turns into
    the gradient (reverse: q (log q - log p); forward: p) and q = exp(lq) where it was needed
    (reverse) else None. In-place steps keep it to three block buffers. A zero-probability term
    contributes 0, never 0 * inf: masked explicitly."""
    lp = _log_softmax(other, vocab_size, lq.dtype)
    if kind == "reverse":  # KL(q || p) = sum q (log q - log p)
        q = lq.exp()
        d = torch.sub(lq, lp, out=lp).masked_fill_(torch.isneginf(lq), 0.0).mul_(q)
        return d, d.sum(-1), q
    zero = torch.isneginf(lp)  # forward: KL(p || q) = sum p (log p - log q)
    p = lp.exp()
    return p, lp.sub_(lq).masked_fill_(zero, 0.0).mul_(p).sum(-1), None


class _VocabTerms(torch.autograd.Function):
    """(logits, targets, other) -> (logp, kl); see `vocab_terms`."""

    @staticmethod
    def forward(ctx, logits, targets, other, kind, vocab_size, chunk_size):
        B, T = logits.shape[:2]
        dtype = _compute_dtype(logits) if other is None else torch.promote_types(
            _compute_dtype(logits), _compute_dtype(other))
        logp = logits.new_zeros((B, T), dtype=dtype)
        kl = logits.new_zeros((B, T), dtype=dtype)
        with torch.autocast(logits.device.type, enabled=False):
            for bs, ts in _blocks(B, T, chunk_size):
                lq = _log_softmax(logits[bs, ts], vocab_size, dtype)
                if targets is not None:
                    logp[bs, ts] = lq.gather(-1, targets[bs, ts, None]).squeeze(-1)
                if other is not None:
                    kl[bs, ts] = _block_kl(lq, other[bs, ts], kind, vocab_size)[1]
                del lq
        ctx.save_for_backward(logits, targets, other, kl)
        ctx.kind, ctx.vocab_size, ctx.chunk_size = kind, vocab_size, chunk_size
        return logp, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_kl):
        logits, targets, other, kl = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        V, dtype = ctx.vocab_size, kl.dtype
        B, T = logits.shape[:2]
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if grad.shape[-1] > V:
            grad[..., V:].zero_()  # padded logits columns never enter the loss
        with torch.autocast(logits.device.type, enabled=False):
            for bs, ts in _blocks(B, T, ctx.chunk_size):
                lq = _log_softmax(logits[bs, ts], V, dtype)
                gl = None if targets is None else g_logp[bs, ts, None].to(dtype)
                if other is None:
                    g = lq.exp_().mul_(-gl)  # d/dz log q_y = onehot_y - q
                else:
                    gk = g_kl[bs, ts, None].to(dtype)
                    g, _, q = _block_kl(lq, other[bs, ts], ctx.kind, V)
                    q = lq.exp_() if q is None else q
                    if ctx.kind == "reverse":  # d/dz KL(q||p) = q (log q - log p) - q KL
                        # rows without a gradient (padding) are zeroed, not inf * 0: there the
                        # teacher may give a sampled token zero probability (KL = inf)
                        g.addcmul_(q, kl[bs, ts, None], value=-1.0).mul_(gk).masked_fill_(gk == 0, 0.0)
                    else:  # d/dz KL(p||q) = q - p
                        g.neg_().add_(q).mul_(gk)
                    if gl is not None:
                        g.addcmul_(q, gl, value=-1.0)
                    del q
                if gl is not None:
                    g.scatter_add_(-1, targets[bs, ts, None], gl)
                grad[bs, ts, :V] = g
                del lq, g
        return grad, None, None, None, None, None


def vocab_terms(logits: torch.Tensor, vocab_size: int, targets: torch.Tensor | None = None,
                other: torch.Tensor | None = None, kind: str = "reverse",
                chunk_size: int | None = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position vocabulary-wide terms of `q = softmax(logits[..., :V])`:

    logp[b, t] = log q(targets[b, t])                      (0 when targets is None)
    kl[b, t]   = KL(q || p) ("reverse") or KL(p || q) ("forward"), p = softmax(other[..., :V])
                                                           (0 when other is None)
    logits [B, T, V' >= V] (differentiable), targets [B, T] (ids < V after clamping; padding ids
    are fine, mask them later), other [B, T, V''] (detached: never receives a gradient)
    -> (logp, kl), each [B, T] in float32 (float64 for float64 inputs)."""
    if kind not in ("reverse", "forward"):
        raise ValueError(f"kind must be 'reverse' or 'forward', got {kind!r}")
    if targets is None and other is None:
        raise ValueError("vocab_terms needs targets, other logits, or both")
    if targets is not None:
        targets = targets.clamp(0, vocab_size - 1)
    if other is not None:
        other = other.detach()
    return _VocabTerms.apply(logits, targets, other, kind, vocab_size, chunk_size)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits[..., :V])[targets].

    logits [B, T, V'>=V], targets [B, T] (any id < V; padding ids are fine, mask them later)
    -> [B, T] in float32 (float64 for float64 logits). Differentiable w.r.t. logits."""
    return vocab_terms(logits, vocab_size, targets=targets, chunk_size=chunk_size)[0]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum over mask of values (* detached weights). Selects rather than multiplies, so a
    non-finite value at a padding position (e.g. an inf KL where the teacher gives a padding
    token zero probability) never reaches the sum or the gradient."""
    if weights is not None:
        values = values * weights.detach().to(values.dtype)
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def _require_teacher(teacher_logits, what: str) -> None:
    if teacher_logits is None:  # vocab_terms would silently return a zero KL
        raise ValueError(f"{what} needs teacher logits")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, normalizer: float,
            vocab_size: int, chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy  -sum_{b,t} mask * log q(targets) / normalizer.

    logits [B, T, V'], targets [B, T], mask [B, T] bool -> scalar."""
    lp = token_logprobs(logits, targets, vocab_size, chunk_size)
    return -masked_sum(lp, mask) / normalizer


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               normalizer: float, vocab_size: int, weights: torch.Tensor | None = None,
               chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Token-level reverse KL,  sum_{b,t} w_bt * mask_bt * KL(q_bt || p_bt) / normalizer,
    KL(q||p) = sum_v q_v (log q_v - log p_v), q = student, p = teacher.

    This is MiniLLM's single-step term (its gradient is exactly E_{y_t~q}[-r_t grad log q(y_t)]
    at that position) and also the `rkl` baseline. The teacher is detached: no gradient reaches it.
    student_logits [B, T, V'], teacher_logits [B, T, V''], mask [B, T], weights [B, T] or None
    (detached per-position weights, e.g. importance weights) -> scalar."""
    _require_teacher(teacher_logits, "reverse_kl")
    kl = vocab_terms(student_logits, vocab_size, other=teacher_logits, kind="reverse",
                     chunk_size=chunk_size)[1]
    return masked_sum(kl, mask, weights) / normalizer


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               normalizer: float, vocab_size: int, chunk_size: int | None = DEFAULT_CHUNK
               ) -> torch.Tensor:
    """Token-level forward KL (word-level KD),  sum_{b,t} mask * sum_v p_v (log p_v - log q_v)
    / normalizer, teacher detached. Same shapes as `reverse_kl`. (Differs from the reference
    code's -sum p log q by the teacher entropy, a constant: same gradient, but 0 at q = p.)"""
    _require_teacher(teacher_logits, "forward_kl")
    kl = vocab_terms(student_logits, vocab_size, other=teacher_logits, kind="forward",
                     chunk_size=chunk_size)[1]
    return masked_sum(kl, mask) / normalizer


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            mask: torch.Tensor, normalizer: float, vocab_size: int, kd_ratio: float = 0.5,
            chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """(1 - kd_ratio) * CE(targets) + kd_ratio * forward KL, both / normalizer: the reference
    code's KD baseline and its pre-training-loss mixing. Shapes as in `lm_loss`/`forward_kl`."""
    if kd_ratio > 0.0:
        _require_teacher(teacher_logits, "kd_loss with kd_ratio > 0")
    logp, kl = vocab_terms(student_logits, vocab_size,
                           targets=targets if kd_ratio < 1.0 else None,
                           other=teacher_logits if kd_ratio > 0.0 else None, kind="forward",
                           chunk_size=chunk_size)  # one pass over the vocabulary for both terms
    return masked_sum((kd_ratio - 1.0) * logp + kd_ratio * kl, mask) / normalizer


def policy_gradient_loss(logp_new: torch.Tensor, logp_old: torch.Tensor,
                         advantages: torch.Tensor, weights: torch.Tensor | None,
                         mask: torch.Tensor, clip_ratio: float | None, normalizer: float
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped policy-gradient term (MiniLLM's long-term part).

    rho = exp(logp_new - logp_old) * w  (w sits inside the clip, as in the reference code);
    loss = sum_{b,t} mask * max(-A rho, -A clip(rho, 1-eps, 1+eps)) / normalizer.
    At the first update (logp_new == logp_old) its gradient is -sum mask A w grad log q / normalizer.
    clip_ratio None or 0 disables clipping (loss = -sum mask A rho / normalizer).

    logp_new [B, T] (with grad), logp_old, advantages, weights [B, T] (detached), mask [B, T]
    -> (scalar loss, stats) with stats (detached 0-dim tensors, over masked tokens of this call):
    `clip_frac` (share of tokens where the clipped branch is taken and carries no gradient),
    `ratio_mean` (mean of exp(logp_new - logp_old), without w), `tokens` (count)."""
    m = mask.to(logp_new.dtype)
    log_ratio = (logp_new - logp_old.detach().to(logp_new.dtype)) * m  # 0 at padding: no inf
    ratio = log_ratio.exp()
    rho = ratio if weights is None else ratio * weights.detach().to(ratio.dtype)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * rho
    if clip_ratio:
        clipped = -adv * rho.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        per_token = torch.maximum(unclipped, clipped)
        clip_hits = (clipped > unclipped) & mask.bool()
    else:
        per_token = unclipped
        clip_hits = torch.zeros_like(mask, dtype=torch.bool)
    loss = (per_token * m).sum() / normalizer
    n = m.sum().detach()
    denom = n.clamp(min=1.0)
    stats = {
        "clip_frac": clip_hits.to(m.dtype).sum().detach() / denom,
        "ratio_mean": (ratio.detach() * m).sum() / denom,
        "tokens": n,
    }
    return loss, stats
