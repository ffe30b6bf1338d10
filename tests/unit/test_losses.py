"""losses.py against brute-force float64 references; chunked == unchunked; memory bounded."""
from __future__ import annotations

import math

import pytest
import torch

from minillm_cli.engine import losses as L

B, T, V, VPAD = 3, 7, 11, 13  # logits are wider than the vocabulary (padded embeddings)


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, VPAD, generator=g, dtype=dtype) * 2).requires_grad_()
    t = torch.randn(B, T, VPAD, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = [7, 4, 1]  # right padded, EOS included in the counted positions
    mask = torch.tensor([[i < n for i in range(T)] for n in lengths])
    targets[~mask] = V + 1  # a padding id outside the vocabulary: must never matter
    weights = torch.rand(B, T, generator=g, dtype=dtype) * 2
    return s, t, targets, mask, weights


def _logsoftmax_ref(row):  # list of floats -> list, pure python float64
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def _ref_token_logprobs(logits, targets):
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            ls = _logsoftmax_ref(logits[b, t, :V].tolist())
            out[b, t] = ls[min(int(targets[b, t]), V - 1)]
    return out


def _ref_kl(a, b_):  # KL(softmax a || softmax b) over the vocabulary, per position
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            la, lb = _logsoftmax_ref(a[b, t, :V].tolist()), _logsoftmax_ref(b_[b, t, :V].tolist())
            out[b, t] = sum(math.exp(x) * (x - y) for x, y in zip(la, lb))
    return out


def test_token_logprobs_matches_reference_and_chunking():
    s, _, targets, mask, _ = _inputs()
    ref = _ref_token_logprobs(s.detach(), targets)
    for chunk in (None, 1, 3, 100):
        got = L.token_logprobs(s, targets, V, chunk_size=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-12)
    g1, = torch.autograd.grad(L.token_logprobs(s, targets, V, None)[mask].sum(), s)
    g2, = torch.autograd.grad(L.token_logprobs(s, targets, V, 2)[mask].sum(), s)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    assert g1[..., V:].abs().max() == 0  # padded logits columns never enter


def test_token_logprobs_low_precision_computes_in_float32():
    s, _, targets, mask, _ = _inputs()
    got = L.token_logprobs(s.detach().to(torch.bfloat16), targets, V, chunk_size=2)
    assert got.dtype == torch.float32
    ref = _ref_token_logprobs(s.detach().to(torch.bfloat16).double(), targets)
    torch.testing.assert_close(got.double()[mask], ref[mask], rtol=0, atol=1e-5)


def test_lm_loss_sum_over_mask_divided_by_normalizer():
    s, _, targets, mask, _ = _inputs()
    ref = -_ref_token_logprobs(s.detach(), targets)[mask].sum() / 5.0
    got = L.lm_loss(s, targets, mask, 5.0, V, chunk_size=3)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # padding positions never count: scrambling their logits changes nothing
    s2 = s.detach().clone()
    s2[~mask] = 1e3 * torch.randn_like(s2[~mask])
    torch.testing.assert_close(L.lm_loss(s2, targets, mask, 5.0, V), got.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_weights", [False, True])
def test_reverse_kl_matches_reference(use_weights):
    s, t, _, mask, w = _inputs(1)
    weights = w if use_weights else None
    kl = _ref_kl(s.detach(), t)
    coef = mask.double() * (w if use_weights else 1.0)
    ref = (kl * coef).sum() / 4.0
    for chunk in (None, 1, 2, 5):
        got = L.reverse_kl(s, t, mask, 4.0, V, weights=weights, chunk_size=chunk)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_reverse_kl_gradient_chunked_equals_unchunked_and_brute_force():
    s, t, _, mask, w = _inputs(2)
    t = t.clone().requires_grad_()
    g_full = torch.autograd.grad(L.reverse_kl(s, t, mask, 3.0, V, weights=w, chunk_size=None),
                                 [s], retain_graph=False)[0]
    loss_c = L.reverse_kl(s, t, mask, 3.0, V, weights=w, chunk_size=2)
    g_chunk, = torch.autograd.grad(loss_c, [s])
    torch.testing.assert_close(g_full, g_chunk, rtol=0, atol=1e-12)
    # brute force: direct float64 formula, autograd
    q = torch.log_softmax(s[..., :V], -1)
    p = torch.log_softmax(t.detach()[..., :V], -1)
    direct = ((q.exp() * (q - p)).sum(-1) * mask * w).sum() / 3.0
    g_ref, = torch.autograd.grad(direct, [s])
    torch.testing.assert_close(g_chunk, g_ref, rtol=0, atol=1e-12)


def test_teacher_never_receives_gradient():
    s, t, targets, mask, _ = _inputs(3)
    t = t.clone().requires_grad_()
    for fn in (lambda: L.reverse_kl(s, t, mask, 1.0, V, chunk_size=2),
               lambda: L.forward_kl(s, t, mask, 1.0, V, chunk_size=2),
               lambda: L.kd_loss(s, t, targets, mask, 1.0, V, kd_ratio=0.5, chunk_size=2)):
        grads = torch.autograd.grad(fn(), [s, t], allow_unused=True)
        assert grads[0] is not None and grads[1] is None


def test_forward_kl_and_kd_loss():
    s, t, targets, mask, _ = _inputs(4)
    fkl_ref = (_ref_kl(t, s.detach()) * mask).sum() / 6.0
    for chunk in (None, 3):
        torch.testing.assert_close(L.forward_kl(s, t, mask, 6.0, V, chunk_size=chunk), fkl_ref,
                                   rtol=0, atol=1e-12)
    ce_ref = -_ref_token_logprobs(s.detach(), targets)[mask].sum() / 6.0
    for ratio in (0.0, 0.3, 1.0):
        got = L.kd_loss(s, t, targets, mask, 6.0, V, kd_ratio=ratio, chunk_size=2)
        torch.testing.assert_close(got, (1 - ratio) * ce_ref + ratio * fkl_ref, rtol=0, atol=1e-12)
    # KL of a distribution with itself is 0 (both directions), and only the vocabulary counts
    same = t.clone()
    same[..., V:] = 50.0
    assert abs(float(L.forward_kl(t, same, mask, 1.0, V))) < 1e-12
    assert abs(float(L.reverse_kl(t, same, mask, 1.0, V))) < 1e-12


def _ref_pg(new, old, adv, w, mask, eps, normalizer):
    total, hits = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = math.exp(new[b][t] - old[b][t]) * w[b][t]
            un = -adv[b][t] * rho
            if eps:
                cl = -adv[b][t] * min(max(rho, 1 - eps), 1 + eps)
                total += max(un, cl)
                hits += cl > un
            else:
                total += un
    return total / normalizer, hits / int(mask.sum())


@pytest.mark.parametrize("eps", [0.2, None])
def test_policy_gradient_loss_matches_reference(eps):
    g = torch.Generator().manual_seed(5)
    new = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old = new.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    _, _, _, mask, _ = _inputs()
    new_pad = new.detach().clone()
    new_pad[~mask] = 80.0  # exp(80 - old) would overflow a sum if padding were not masked first
    new2 = new_pad.requires_grad_()
    loss, stats = L.policy_gradient_loss(new2, old, adv, w, mask, eps, 7.0)
    ref, clip_frac = _ref_pg(new.detach().tolist(), old.tolist(), adv.tolist(), w.tolist(), mask,
                             eps, 7.0)
    assert math.isfinite(float(loss.detach()))
    assert abs(float(loss.detach()) - ref) < 1e-12
    assert abs(float(stats["clip_frac"]) - clip_frac) < 1e-12
    if eps:
        assert 0 < clip_frac < 1  # the test data exercises both branches
    grad, = torch.autograd.grad(loss, [new2])
    assert grad[~mask].abs().max() == 0
    rho = (new.detach() - old).exp() * w
    expected = -adv * rho / 7.0 * mask
    if eps:  # where the clipped branch is taken the gradient is 0
        cl = -adv * rho.clamp(1 - eps, 1 + eps)
        expected = torch.where(cl > -adv * rho, torch.zeros_like(expected), expected)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_policy_gradient_first_step_gradient_is_weighted_score_function():
    """At logp_new == logp_old and w inside [1-eps, 1+eps]: grad = -A w grad(logp) / normalizer."""
    _, _, _, mask, _ = _inputs()
    logp = torch.randn(B, T, dtype=torch.float64).requires_grad_()
    adv = torch.randn(B, T, dtype=torch.float64)
    w = 1 + 0.1 * torch.rand(B, T, dtype=torch.float64)
    loss, stats = L.policy_gradient_loss(logp, logp.detach(), adv, w, mask, 0.2, 2.0)
    grad, = torch.autograd.grad(loss, [logp])
    torch.testing.assert_close(grad, -adv * w * mask / 2.0, rtol=0, atol=1e-14)
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_frac"]) == 0.0


def _new_allocations(fn) -> list[int]:
    """numel of every tensor an aten op newly allocates while fn() runs (forward and backward):
    outputs that share no storage with the op's inputs (views and in-place results do)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs))
                    if isinstance(x, torch.Tensor)}
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                    sizes.append(o.numel())
            return out

    with Record():
        fn()
    return sizes


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_vocab_terms_bounds_memory_by_block(kind):
    """Apart from the logits' gradient, no step allocates more than one block (chunk_size
    positions x V) at a time: the [B, T, V] float32 log-softmaxes never exist. Unchunked, the
    same measure sees them (the test can fail)."""
    Bm, Tm, Vm, chunk = 2, 64, 500, 8
    leaf = torch.randn(Bm, Tm + 1, Vm, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(Bm, Tm, Vm, dtype=torch.bfloat16)
    targets = torch.randint(0, Vm, (Bm, Tm))
    full = Bm * Tm * Vm

    def step(chunk_size):
        leaf.grad = None
        lp, kl = L.vocab_terms(leaf[:, :-1], Vm, targets=targets, other=t, kind=kind,
                               chunk_size=chunk_size)
        (lp.sum() + kl.sum()).backward()

    big = [n for n in _new_allocations(lambda: step(chunk)) if n > chunk * Vm]
    assert sum(big) <= 2 * leaf.numel()  # the gradient of the view and of the leaf, nothing else
    unchunked = [n for n in _new_allocations(lambda: step(None)) if n > chunk * Vm]
    assert sum(unchunked) >= 6 * full


def test_vocab_terms_autograd_keeps_only_the_inputs():
    Bm, Tm, Vm = 2, 64, 500
    s = torch.randn(Bm, Tm, Vm, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(Bm, Tm, Vm, dtype=torch.bfloat16)
    targets = torch.randint(0, Vm, (Bm, Tm))
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        L.vocab_terms(s, Vm, targets=targets, other=t, chunk_size=8)
    assert sum(saved) <= 2 * s.numel() + 2 * Bm * Tm  # logits, teacher logits, targets, kl


@pytest.mark.parametrize("kind", ["reverse", "forward"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 5, 8, 14, 100])  # 14: two rows a block, last alone
def test_vocab_terms_values_and_gradient_match_autograd_of_the_formula(kind, chunk):
    """Both outputs at once, weighted by arbitrary upstream gradients, against float64 autograd
    of the plain formula; some logits are -inf (banned tokens: 0 probability, no 0 * inf)."""
    s, t, targets, mask, w = _inputs(6)
    s = s.detach().clone()
    t = t.clone()
    s[0, 1, 2] = float("-inf")
    s[1, :, 4] = float("-inf")
    both = (s[..., :V] == float("-inf"))
    t[..., :V][both] = float("-inf")  # where the student has 0 probability the teacher may too
    s.requires_grad_()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    lp, kl = L.vocab_terms(s, V, targets=targets, other=t, kind=kind, chunk_size=chunk)
    grad, = torch.autograd.grad((a * lp + b * kl).sum(), [s])

    # reference: -inf replaced by -1e4 (exp underflows to exactly 0 in float64, and autograd of
    # the plain formula stays finite)
    finite = lambda x: torch.where(torch.isneginf(x), torch.full_like(x, -1e4), x)  # noqa: E731
    ls = torch.log_softmax(finite(s[..., :V]), -1)
    lt = torch.log_softmax(finite(t[..., :V]), -1)
    ref_lp = ls.gather(-1, targets.clamp(0, V - 1)[..., None]).squeeze(-1)
    ref_kl = (ls.exp() * (ls - lt) if kind == "reverse" else lt.exp() * (lt - ls)).sum(-1)
    ref_grad, = torch.autograd.grad((a * ref_lp + b * ref_kl).sum(), [s])
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=0, atol=1e-12)
    assert torch.isfinite(grad[..., :V][~torch.isneginf(s[..., :V])]).all()
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    assert grad[..., V:].abs().max() == 0


def test_vocab_terms_bf16_gradient_close_to_float64():
    s, t, targets, _, _ = _inputs(8)
    s16 = s.detach().to(torch.bfloat16).requires_grad_()
    t16 = t.to(torch.bfloat16)
    lp, kl = L.vocab_terms(s16, V, targets=targets, other=t16, chunk_size=4)
    assert lp.dtype == kl.dtype == torch.float32
    (lp.sum() - 0.5 * kl.sum()).backward()
    assert s16.grad.dtype == torch.bfloat16
    s64 = s16.detach().double().requires_grad_()
    lp64, kl64 = L.vocab_terms(s64, V, targets=targets, other=t16.double(), chunk_size=None)
    (lp64.sum() - 0.5 * kl64.sum()).backward()
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl64, rtol=0, atol=1e-5)
    torch.testing.assert_close(s16.grad.double(), s64.grad, rtol=1e-2, atol=1e-2)


def test_blocks_cover_every_position_once():
    for B, T in ((5, 3), (3, 7), (2, 257), (1, 1)):
        for rows in (None, 0, 1, 2, 4, 6, 7, 14, 128, 256, 1000):
            seen = torch.zeros(B, T, dtype=torch.long)
            for bs, ts in L._blocks(B, T, rows):
                seen[bs, ts] += 1
                if rows:
                    assert seen[bs, ts].numel() <= max(rows, 1)
            assert (seen == 1).all(), (B, T, rows)
    assert [ts.stop - ts.start for _, ts in L._blocks(1, 257, 256)] == [129, 128]


def test_missing_teacher_logits_is_an_error_not_a_zero_kl():
    s, _, targets, mask, _ = _inputs()
    for fn in (lambda: L.reverse_kl(s, None, mask, 1.0, V), lambda: L.forward_kl(s, None, mask, 1.0, V),
               lambda: L.kd_loss(s, None, targets, mask, 1.0, V, kd_ratio=0.5),
               lambda: L.vocab_terms(s, V)):
        with pytest.raises(ValueError):
            fn()
    L.kd_loss(s, None, targets, mask, 1.0, V, kd_ratio=0.0)  # plain CE needs no teacher


def test_padding_never_counts_even_when_not_finite():
    """A teacher that gives a padding position's tokens zero probability (-inf logits) makes that
    position's KL infinite: selected out, it changes neither the loss nor the gradient."""
    s, t, targets, mask, w = _inputs(9)
    bad = t.clone()
    bad[~mask] = float("-inf")
    bad[~mask, 0] = 0.0  # one token left possible: a valid, degenerate distribution
    for fn in (lambda tt: L.reverse_kl(s, tt, mask, 2.0, V, weights=w), lambda tt: L.forward_kl(s, tt, mask, 2.0, V),
               lambda tt: L.kd_loss(s, tt, targets, mask, 2.0, V, kd_ratio=0.5)):
        want, = torch.autograd.grad(fn(t), [s])
        got_loss = fn(bad)
        got, = torch.autograd.grad(got_loss, [s])
        assert torch.isfinite(got_loss)
        torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-12)
        assert torch.isfinite(got).all() and got[~mask].abs().max() == 0
