"""Pure loss functions on *aligned* inputs (see docs/DESIGN.md).

`logits[:, t]` is the distribution of `targets[:, t]`; `mask[:, t]` is True where that target
counts (response tokens, EOS included; padding never). Logits may be wider than the vocabulary
(padded embeddings), so every function slices `logits[..., :vocab_size]`. Every loss returns
`sum / normalizer`, with the normalizer chosen by the caller (a global token or sequence count),
so gradient accumulation and padding never change the result.

Vocabulary-wide work runs `chunk_size` positions at a time in float32 (float64 inputs stay
float64, for the tests). When gradients are needed each chunk is wrapped in activation
checkpointing: autograd then keeps only the chunk's inputs (views of the logits that exist
anyway) and recomputes the float32 log-softmax in backward, so peak extra memory is one chunk of
B x chunk_size x V floats instead of the whole B x T x V for each model.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 128


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits, float64 for float64 logits (tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunked(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor | None], T: int,
             chunk_size: int | None) -> torch.Tensor:
    """Apply `fn` to slices [:, s:e] of every tensor (None passes through) and concatenate the
    [B, e-s] results along dim 1. Chunks are checkpointed when a gradient will flow through them."""
    if chunk_size is None or chunk_size <= 0 or chunk_size >= T:
        return fn(*tensors)
    outs = []
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    for s in range(0, T, chunk_size):
        part = [None if t is None else t[:, s : s + chunk_size] for t in tensors]
        if needs_grad:
            outs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outs.append(fn(*part))
    return torch.cat(outs, dim=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits[..., :V])[targets].

    logits [B, T, V'>=V], targets [B, T] (any id < V; padding ids are fine, mask them later)
    -> [B, T] in float32 (float64 for float64 logits). Differentiable w.r.t. logits."""
    dtype = _compute_dtype(logits)

    def fn(lg: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        lg = lg[..., :vocab_size].to(dtype)
        picked = lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(lg, dim=-1)

    return _chunked(fn, [logits, targets.clamp(0, vocab_size - 1)], logits.shape[1], chunk_size)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, normalizer: float,
            vocab_size: int, chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy  -sum_{b,t} mask * log q(targets) / normalizer.

    logits [B, T, V'], targets [B, T], mask [B, T] bool -> scalar."""
    lp = token_logprobs(logits, targets, vocab_size, chunk_size)
    return -(lp * mask.to(lp.dtype)).sum() / normalizer


def _kl_per_position(a_logits: torch.Tensor, b_logits: torch.Tensor, vocab_size: int
                     ) -> torch.Tensor:
    """sum_v a_v (log a_v - log b_v) with a = softmax(a_logits), b = softmax(b_logits).
    [B, t, V'] x [B, t, V''] -> [B, t]."""
    dtype = torch.promote_types(_compute_dtype(a_logits), _compute_dtype(b_logits))
    log_a = F.log_softmax(a_logits[..., :vocab_size].to(dtype), dim=-1)
    log_b = F.log_softmax(b_logits[..., :vocab_size].to(dtype), dim=-1)
    # a_v = 0 (a -inf logit) contributes 0, not 0 * nan: guard the product explicitly.
    diff = torch.where(torch.isneginf(log_a), torch.zeros_like(log_a), log_a - log_b)
    return (log_a.exp() * diff).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               normalizer: float, vocab_size: int, weights: torch.Tensor | None = None,
               chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Token-level reverse KL,  sum_{b,t} w_bt * mask_bt * KL(q_bt || p_bt) / normalizer,
    KL(q||p) = sum_v q_v (log q_v - log p_v), q = student, p = teacher.

    This is MiniLLM's single-step term (its gradient is exactly E_{y_t~q}[-r_t grad log q(y_t)]
    at that position) and also the `rkl` baseline. The teacher is detached: no gradient reaches it.
    student_logits [B, T, V'], teacher_logits [B, T, V''], mask [B, T], weights [B, T] or None
    (detached per-position weights, e.g. importance weights) -> scalar."""
    teacher_logits = teacher_logits.detach()
    kl = _chunked(lambda s, t: _kl_per_position(s, t, vocab_size),
                  [student_logits, teacher_logits], student_logits.shape[1], chunk_size)
    coef = mask.to(kl.dtype)
    if weights is not None:
        coef = coef * weights.detach().to(kl.dtype)
    return (kl * coef).sum() / normalizer


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               normalizer: float, vocab_size: int, chunk_size: int | None = DEFAULT_CHUNK
               ) -> torch.Tensor:
    """Token-level forward KL (word-level KD),  sum_{b,t} mask * sum_v p_v (log p_v - log q_v)
    / normalizer, teacher detached. Same shapes as `reverse_kl`. (Differs from the reference
    code's -sum p log q by the teacher entropy, a constant: same gradient, but 0 at q = p.)"""
    teacher_logits = teacher_logits.detach()
    kl = _chunked(lambda s, t: _kl_per_position(t, s, vocab_size),
                  [student_logits, teacher_logits], student_logits.shape[1], chunk_size)
    return (kl * mask.to(kl.dtype)).sum() / normalizer


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            mask: torch.Tensor, normalizer: float, vocab_size: int, kd_ratio: float = 0.5,
            chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """(1 - kd_ratio) * CE(targets) + kd_ratio * forward KL, both / normalizer: the reference
    code's KD baseline and its pre-training-loss mixing. Shapes as in `lm_loss`/`forward_kl`."""
    loss = student_logits.new_zeros((), dtype=_compute_dtype(student_logits))
    if kd_ratio < 1.0:
        loss = loss + (1.0 - kd_ratio) * lm_loss(student_logits, targets, mask, normalizer,
                                                 vocab_size, chunk_size)
    if kd_ratio > 0.0:
        loss = loss + kd_ratio * forward_kl(student_logits, teacher_logits, mask, normalizer,
                                            vocab_size, chunk_size)
    return loss


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
