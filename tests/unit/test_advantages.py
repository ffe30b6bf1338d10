"""advantages.py against brute-force loops (float64), on right-padded rows of different lengths."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from minillm_cli.engine.advantages import importance_weights, long_term_advantages, token_rewards

LENGTHS = [5, 3, 1, 4]
T = 6


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])
    r = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 3
    r_padded = torch.where(mask, r, torch.full_like(r, 1e6))  # padding garbage must not leak
    return r, r_padded, mask


def _ref_advantages(r, lengths, *, length_norm, gamma, include_current, scale, clip, weights=None):
    out = torch.zeros(len(lengths), T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        rr = []
        for t in range(n):
            x = r[b][t] / scale
            if clip is not None:
                x = max(-clip, min(clip, x))
            if weights is not None:
                x *= weights[b][t]
            rr.append(x)
        for t in range(n):
            first = t if include_current else t + 1
            terms = [gamma ** (u - t) * rr[u] for u in range(first, n)]
            a = sum(terms)
            if length_norm:
                a = a / len(terms) if terms else 0.0
            out[b, t] = a
    return out


def test_token_rewards():
    g = torch.Generator().manual_seed(1)
    tl, sl = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    r = token_rewards(tl, sl, mask)
    assert torch.equal(r, torch.where(mask, tl - sl, torch.zeros_like(tl)))


@pytest.mark.parametrize("length_norm,gamma,include_current,scale,clip", [
    (False, 1.0, False, 1.0, None),   # R_{t+1}: the paper's unnormalised long-term return
    (True, 1.0, False, 1.0, None),    # the paper's default: mean of the later rewards
    (True, 0.95, True, 0.5, 2.0),     # the reference code: discounted, incl. r_t, scaled, clipped
    (False, 0.9, True, 1.0, None),
    (True, 0.8, False, 2.0, 1.0),
])
def test_long_term_advantages_match_brute_force(length_norm, gamma, include_current, scale, clip):
    r, r_padded, mask = _data()
    got = long_term_advantages(r_padded, mask, length_norm=length_norm, gamma=gamma,
                               include_current=include_current, scale=scale, clip=clip)
    ref = _ref_advantages(r.tolist(), LENGTHS, length_norm=length_norm, gamma=gamma,
                          include_current=include_current, scale=scale, clip=clip)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert got[~mask].abs().max() == 0


def test_paper_default_is_zero_at_last_token_and_mean_of_later_rewards():
    r, _, mask = _data(2)
    a = long_term_advantages(r, mask)  # length_norm, exclude current
    for b, n in enumerate(LENGTHS):
        assert a[b, n - 1] == 0.0
        if n >= 2:
            assert math.isclose(float(a[b, 0]), float(r[b, 1:n].mean()), abs_tol=1e-12)


def test_reward_scale_divides_as_the_reference_code():
    """LMOps minillm/sampler.py: `rewards = rewards / self.args.reward_scaling`, and its GPT-2
    scripts pass --reward-scaling 0.5: the rewards are doubled, then clipped."""
    r, r_padded, mask = _data(5)
    one = long_term_advantages(r_padded, mask, include_current=True)
    torch.testing.assert_close(long_term_advantages(r_padded, mask, include_current=True, scale=0.5), 2 * one,
                               rtol=0, atol=1e-12)
    clipped = long_term_advantages(r_padded, mask, include_current=True, length_norm=False, scale=0.5, clip=0.1)
    for b, n in enumerate(LENGTHS):  # the last token's advantage is its own reward, doubled then clipped
        assert math.isclose(float(clipped[b, n - 1]), max(-0.1, min(0.1, 2 * float(r[b, n - 1]))), abs_tol=1e-12)


def test_reward_weights_multiply_after_scale_and_clip():
    r, r_padded, mask = _data(3)
    w = torch.rand(len(LENGTHS), T, dtype=torch.float64) + 0.5
    got = long_term_advantages(r_padded, mask, length_norm=False, scale=0.5, clip=1.0,
                               reward_weights=w)
    ref = _ref_advantages(r.tolist(), LENGTHS, length_norm=False, gamma=1.0,
                          include_current=False, scale=0.5, clip=1.0, weights=w.tolist())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_whitening_uses_valid_positions_only():
    r, r_padded, mask = _data(4)
    a = long_term_advantages(r_padded, mask, whiten=True, include_current=True)
    valid = a[mask]
    assert abs(float(valid.mean())) < 1e-10
    assert abs(float((valid ** 2).mean()) - 1.0) < 1e-6  # population variance over valid tokens
    assert a[~mask].abs().max() == 0
    # more padding columns (a longer batch) change nothing
    wide_r = torch.cat([r_padded, torch.full((len(LENGTHS), 3), 5.0, dtype=torch.float64)], 1)
    wide_m = torch.cat([mask, torch.zeros(len(LENGTHS), 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(long_term_advantages(wide_r, wide_m, whiten=True,
                                                    include_current=True)[:, :T], a)


def test_importance_weights_token_and_sequence():
    g = torch.Generator().manual_seed(5)
    _, _, mask = _data()
    q = -torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2
    mix = -torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2
    tok = importance_weights(q, mix, mask, "token")
    seq = importance_weights(q, mix, mask, "sequence")
    for b, n in enumerate(LENGTHS):
        prefix = 1.0
        for t in range(T):
            w = math.exp(q[b, t] - mix[b, t])
            if t >= n:
                for x in (tok.ss, tok.pg, seq.ss, seq.pg, seq.reward):
                    assert x[b, t] == 0
                continue
            assert tok.ss[b, t] == 1.0 and math.isclose(tok.pg[b, t], w, rel_tol=1e-12)
            assert math.isclose(seq.ss[b, t], prefix, rel_tol=1e-12)  # prod over t' < t
            prefix *= w
            assert seq.pg[b, t] == 1.0
            assert math.isclose(seq.reward[b, t], prefix, rel_tol=1e-12)  # prod over t' <= t
    assert tok.reward is None
    # length_norm: each reward takes its whole row's weight W_T (1/(T - t) depends on all of y)
    seq_ln = importance_weights(q, mix, mask, "sequence", length_norm=True)
    for b, n in enumerate(LENGTHS):
        W_T = math.exp(float((q[b, :n] - mix[b, :n]).sum()))
        for t in range(T):
            assert (math.isclose(seq_ln.reward[b, t], W_T, rel_tol=1e-12) if t < n else seq_ln.reward[b, t] == 0)
    assert torch.equal(seq_ln.ss, seq.ss) and torch.equal(seq_ln.pg, seq.pg)
    # sampling from q itself (alpha = 0): every weight is exactly 1
    ones = importance_weights(q, q, mask, "sequence")
    assert torch.equal(ones.reward[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
    with pytest.raises(ValueError):
        importance_weights(q, mix, mask, "prefix")


def test_sequence_weights_make_mixture_expectations_unbiased():
    """E_{y~p~}[f(y_<=s) W_s] = E_{y~q}[f(y_<=s)] on a 2-step, 3-token toy, by enumeration."""
    g = torch.Generator().manual_seed(6)
    V, alpha = 3, 0.3
    q1 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    q2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64), 1)
    p1 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    p2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64), 1)
    f = torch.randn(V, V, generator=g, dtype=torch.float64)
    m1, m2 = alpha * p1 + (1 - alpha) * q1, alpha * p2 + (1 - alpha) * q2
    under_q = sum(q1[a] * q2[a, b] * f[a, b] for a, b in itertools.product(range(V), range(V)))
    under_mix = 0.0
    for a, b in itertools.product(range(V), range(V)):
        lq = torch.log(torch.stack([q1[a], q2[a, b]]))[None]
        lm = torch.log(torch.stack([m1[a], m2[a, b]]))[None]
        W = importance_weights(lq, lm, torch.ones(1, 2, dtype=torch.bool), "sequence").reward
        under_mix += m1[a] * m2[a, b] * f[a, b] * W[0, 1]
    assert abs(float(under_q - under_mix)) < 1e-12
