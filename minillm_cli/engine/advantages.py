"""Pure functions for MiniLLM's long-term term: rewards, (normalised) returns, importance weights.

Shapes: `[B, T]` over response positions, right padded; `mask[b, t]` True for generated tokens up
to and including EOS (so the valid positions of a row are a prefix). Notation: q = student,
p = teacher, p~ = alpha p + (1 - alpha) q the sampling distribution, r_t = log p(y_t) - log q(y_t).

The gradient MiniLLM follows (METHOD.md):
    grad KL(q||p) = E_{y~q} sum_t [ grad KL(q_t || p_t)  -  R_{t+1} grad log q(y_t) ],
    R_{t+1} = sum_{t' > t} r_t'.
The first part is the single-step term (losses.reverse_kl), the second the long-term term whose
advantage A_t = R_{t+1} this module computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def token_rewards(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor
                  ) -> torch.Tensor:
    """r_t = (log p(y_t) - log q(y_t)) * mask.  [B, T] x3 -> [B, T] (0 at padding)."""
    r = teacher_logp - student_logp
    return torch.where(mask.bool(), r, torch.zeros_like(r))


def _discount_matrix(T: int, gamma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """D[t, t'] = gamma^(t' - t) for t' >= t, else 0:  (r @ D.T)[b, t] = sum_{t'>=t} gamma^(t'-t) r_t'."""
    idx = torch.arange(T, device=device)
    diff = (idx[None, :] - idx[:, None]).to(dtype)  # t' - t
    return torch.where(diff >= 0, torch.as_tensor(gamma, dtype=dtype, device=device) ** diff,
                       torch.zeros((), dtype=dtype, device=device))


def long_term_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, length_norm: bool = True,
                         gamma: float = 1.0, include_current: bool = False,
                         whiten: bool = False, scale: float = 1.0, clip: float | None = None,
                         reward_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage of the long-term policy-gradient term.  rewards, mask [B, T] -> A [B, T] (0 at padding).

    Steps, in order:
      1. r <- clip(r / scale, -clip, clip) (reference-code reward scaling/clipping, off by default:
         the reference divides, `rewards / reward_scaling`, so its 0.5 doubles the rewards),
         then r <- r * reward_weights (the per-reward importance weights of "sequence" mode).
      2. G_t = sum_{t' >= t, valid} gamma^(t'-t) r_t' (discounted return including r_t).
      3. include_current=False (paper, default): A_t = G_t - r_t = gamma * G_{t+1}, the return of
         the *later* rewards (r_t itself is covered exactly by the single-step term).
         include_current=True (reference code): A_t = G_t.
      4. length_norm: divide by the number of rewards summed, i.e. the remaining valid tokens:
         after t (T - t in the paper's 1-based terms; A = 0 at the last token) or from t on when
         include_current (as the reference code).
      5. whiten: (A - mean) / sqrt(var + 1e-8) with mean and (population) variance over *valid
         positions only*, as the reference code's `whiten` except that it counts padding too.
         Whitening uses statistics of the rows passed in, so it depends on their grouping.
    """
    m = mask.to(rewards.dtype)
    r = rewards / scale
    if clip is not None:
        r = r.clamp(-clip, clip)
    if reward_weights is not None:
        r = r * reward_weights.to(r.dtype)
    r = r * m
    B, T = r.shape
    G = r @ _discount_matrix(T, gamma, r.dtype, r.device).T  # [B, T]
    adv = G if include_current else G - r
    if length_norm:
        # remaining valid tokens from t on (including t): sum_{t'>=t} mask_t'
        remaining = m.flip(1).cumsum(1).flip(1)
        count = remaining if include_current else remaining - m
        adv = torch.where(count > 0, adv / count.clamp(min=1), torch.zeros_like(adv))
    adv = adv * m
    if whiten:
        n = m.sum().clamp(min=1)
        mean = adv.sum() / n
        var = (((adv - mean) * m) ** 2).sum() / n
        adv = (adv - mean) * torch.rsqrt(var + 1e-8) * m
    return adv


@dataclass
class ImportanceWeights:
    """Weights that make the estimator's expectation under p~ what it should be under q.

    ss [B, T]:     multiplies the single-step KL at position t.
    pg [B, T]:     multiplies the PPO ratio of token t (inside the clip).
    reward [B, T] or None: multiplies reward r_t before the returns are summed."""
    ss: torch.Tensor
    pg: torch.Tensor
    reward: torch.Tensor | None


def importance_weights(student_logp: torch.Tensor, mix_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str = "token", length_norm: bool = False) -> ImportanceWeights:
    """Importance weights for rollouts drawn from p~ instead of q.

    student_logp = log q(y_t), mix_logp = log p~(y_t) at sampling time, mask [B, T] -> ImportanceWeights.
    All detached; 0 at padding. Let w_t = q(y_t)/p~(y_t) and W_t = prod_{t' <= t} w_t'.

    "token" (the paper's and reference code's approximation): ss = 1, pg = w_t, reward = None.
        The single-step term is left unweighted and the long-term term of token t is weighted
        by its own ratio only. Biased; lower variance.

    "sequence" (exactly unbiased): E_q[f(y_<=s)] = E_p~[f(y_<=s) W_s] for anything that depends
        on the prefix up to s. The single-step KL at t depends on y_<t: weight W_{t-1}
        (ss_t = prod_{t' < t} w_t', 1 at t = 1; W_t would be unbiased too, since
        E_{y_t~p~}[w_t] = 1, but noisier). The long-term term pairs grad log q(y_t) with a
        later reward r_t'', which depends on y_<=t'': weight W_t''. So pg = 1 and every reward
        is pre-multiplied by W_t'' (reward = W), giving A_t = sum_{t''>t} W_t'' r_t''.
        Variance grows with length (products of ratios), which is why the paper avoids it.
        length_norm (the advantages divide by the remaining length T - t): then the long-term
        term of token t depends on the whole response through T, so every reward of a row takes
        the whole row's weight W_T (reward = W_T); the estimator stays unbiased for the
        length-normalised objective. (W_t'' would not be: T is not a function of y_<=t''.)
    """
    m = mask.bool()
    log_w = torch.where(m, student_logp - mix_logp, torch.zeros_like(student_logp)).detach()
    zeros = torch.zeros_like(log_w)
    if mode == "token":
        return ImportanceWeights(ss=m.to(log_w.dtype), pg=torch.where(m, log_w.exp(), zeros),
                                 reward=None)
    if mode == "sequence":
        # log W_t; log w = -inf when the student's filter excluded the token (q' = 0), so the
        # exclusive product is built by shifting, not as cum - log_w (which would be -inf + inf)
        cum = log_w.cumsum(1)
        cum_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
        W = torch.where(m, cum.exp(), zeros)
        W_prev = torch.where(m, cum_before.exp(), zeros)  # prod over t' < t
        if length_norm:  # W_T of each row (valid positions are a prefix: the row's sum)
            W = torch.where(m, log_w.sum(1, keepdim=True).exp(), zeros)
        return ImportanceWeights(ss=W_prev, pg=m.to(log_w.dtype), reward=W)
    raise ValueError(f"importance weight mode must be 'token' or 'sequence', got {mode!r}")
