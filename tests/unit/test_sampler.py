"""sampler.py: the per-step mix/filter/sample against brute force, batch independence, modes,
EOS handling, no-repeat-ngram, and a statistical check that step-1 tokens follow p~."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import gpt2_numbers
from minillm_cli.data.tokenize import left_pad
from minillm_cli.engine.sampler import (
    NGramBlocker, SamplingParams, filtered_logprobs, mix_and_sample, positions_from_mask, sample)
from minillm_cli.errors import InputError

V = 11        # vocabulary; the models' logits are one wider (a padded embedding row)
PAD = 11      # the extra row: a pad id distinct from EOS
EOS = 0


def _gpt2(seed, n_layer=1):
    return gpt2_numbers(seed, vocab=V, pad=PAD, eos=EOS, n_layer=n_layer, n_positions=64)




@pytest.fixture(scope="module")
def models():
    return _gpt2(1, n_layer=2), _gpt2(2)  # student, teacher


def _left_pad(prompts):
    return left_pad(prompts, PAD)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# -- the pure step ------------------------------------------------------------------------------

def _ref_filter(row, params, banned=()):
    x = [(-math.inf if i in banned else v) / params.temperature for i, v in enumerate(row)]
    if 0 < params.top_k < len(x):
        kth = sorted(x, reverse=True)[params.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    z = sum(math.exp(v - m) for v in x)
    probs = [math.exp(v - m) / z for v in x]
    if params.top_p < 1:
        order = sorted(range(len(x)), key=lambda i: -probs[i])
        before, keep = 0.0, set()
        for i in order:
            if before < params.top_p or not keep:
                keep.add(i)
            before += probs[i]
        z = sum(probs[i] for i in keep)
        probs = [probs[i] / z if i in keep else 0.0 for i in range(len(x))]
    return probs


def _ref_sample(probs, u):
    total, acc = sum(probs), 0.0
    for i, p in enumerate(probs):
        acc += p
        if acc > u * total:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)


@pytest.mark.parametrize("params", [
    SamplingParams(1),
    SamplingParams(1, temperature=0.7, top_k=4),
    SamplingParams(1, temperature=1.3, top_p=0.8),
    SamplingParams(1, top_k=6, top_p=0.6),
])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mix_and_sample_matches_brute_force(params, alpha):
    g = torch.Generator().manual_seed(7)
    B = 64
    s = torch.randn(B, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, V, generator=g, dtype=torch.float64) * 2
    u = torch.rand(B, generator=g, dtype=torch.float64)
    banned = torch.zeros(B, V, dtype=torch.bool)
    banned[::3, 2] = True
    tok, lq, lm = mix_and_sample(s, t, alpha, params, u, banned)
    for b in range(B):
        ban = {2} if b % 3 == 0 else set()
        q = _ref_filter(s[b].tolist(), params, ban)
        p = _ref_filter(t[b].tolist(), params, ban)
        mix = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
        ref_tok = _ref_sample(mix, float(u[b]))
        assert int(tok[b]) == ref_tok
        assert math.isclose(float(lm[b]), math.log(mix[ref_tok]), abs_tol=1e-10)
        if alpha < 1:  # q' may be 0 where the teacher's filter kept a token the student's did not
            want = math.log(q[ref_tok]) if q[ref_tok] > 0 else -math.inf
            assert float(lq[b]) == want or math.isclose(float(lq[b]), want, abs_tol=1e-10)
    if alpha == 0:
        assert torch.equal(lq, lm)  # importance weights exactly 1 when sampling from q
    if alpha == 1:
        assert lq is None


def test_filtered_logprobs_only_ever_samples_kept_tokens():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(200, V, generator=g)
    params = SamplingParams(1, top_k=3, top_p=0.7)
    keep = filtered_logprobs(logits, params).isfinite()
    tok, _, _ = mix_and_sample(logits, None, 0.0, params, torch.rand(200, generator=g))
    assert keep.gather(1, tok[:, None]).all()
    assert (keep.sum(1) <= 3).all() and (keep.sum(1) >= 1).all()


def test_ngram_blocker_matches_transformers():
    from transformers import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(9)
    for n in (1, 2, 3, 6):
        seqs = [torch.randint(0, 4, (L,), generator=g).tolist() for L in (1, 5, 12, 30)]
        for seq in seqs:
            blocker = NGramBlocker(n, [seq[:1]])
            blocker.append([], [])  # no-op on an empty step list is harmless
            for tok in seq[1:]:
                blocker.append([tok], [True])
            ours = blocker.banned(V, [True], "cpu")[0]
            scores = torch.zeros(1, V)
            hf = NoRepeatNGramLogitsProcessor(n)(torch.tensor([seq]), scores.clone())
            assert torch.equal(ours, hf[0].isinf()), (n, seq)


# -- the loop -----------------------------------------------------------------------------------

PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 2], [5], [1, 2, 3, 4]]


def _run(student, teacher, prompts, seeds, alpha=0.3, **kw):
    ids, mask = _left_pad(prompts)
    params = SamplingParams(kw.pop("max_new_tokens", 12), **kw)
    return sample(student, teacher, ids, mask, params=params, alpha=alpha, eos_id=EOS,
                  pad_id=PAD, generators=_gens(seeds), vocab_size=V)


def test_same_seed_same_tokens_and_row_independent_of_batch(models):
    student, teacher = models
    seeds = [11, 12, 13, 14]
    r = _run(student, teacher, PROMPTS, seeds)
    assert torch.equal(r.response_ids, _run(student, teacher, PROMPTS, seeds).response_ids)
    assert not torch.equal(r.response_ids, _run(student, teacher, PROMPTS, [21, 22, 23, 24]).response_ids)
    for i, (p, sd) in enumerate(zip(PROMPTS, seeds)):
        alone = _run(student, teacher, [p], [sd])
        n = alone.response_ids.shape[1]
        assert torch.equal(alone.response_ids[0], r.response_ids[i, :n])
        assert not r.response_mask[i, n:].any()
        torch.testing.assert_close(alone.mix_logp[0], r.mix_logp[i, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(alone.student_logp[0], r.student_logp[i, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_sampling_builds_no_autograd_graph(models, engine):
    """Rollouts of a trainable student carry no autograd graph (it would keep every decode step's
    activations and caches alive): `sample` runs under no_grad whatever the caller's mode."""
    student, teacher = models
    assert any(p.requires_grad for p in student.parameters())
    ids, mask = _left_pad(PROMPTS)
    r = sample(student, teacher, ids, mask, params=SamplingParams(6), alpha=0.3, eos_id=EOS, pad_id=PAD,
               generators=_gens([1, 2, 3, 4]), vocab_size=V, engine=engine)
    assert not r.mix_logp.requires_grad and not r.student_logp.requires_grad


def test_logps_match_teacher_forced_mixture(models):
    """The cached decode's log q and log p~ equal a teacher-forced recomputation."""
    student, teacher = models
    alpha = 0.3
    r = _run(student, teacher, PROMPTS, [1, 2, 3, 4], alpha=alpha)
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)
    att = torch.cat([r.prompt_mask, r.response_mask], 1).long()
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    with torch.no_grad():
        lq = [torch.log_softmax(m(input_ids=ids, attention_mask=att,
                                  position_ids=positions_from_mask(att)).logits[:, P - 1 : P + T - 1, :V].double(), -1)
              for m in (student, teacher)]
    tgt = r.response_ids.clamp(max=V - 1)[..., None]
    q = lq[0].gather(-1, tgt).squeeze(-1)
    mix = torch.log(alpha * lq[1].exp() + (1 - alpha) * lq[0].exp()).gather(-1, tgt).squeeze(-1)
    m = r.response_mask
    torch.testing.assert_close(r.student_logp[m].double(), q[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(r.mix_logp[m].double(), mix[m], rtol=0, atol=1e-5)


class _Forbidden(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("this model must not run")


def test_student_only_and_teacher_only_never_call_the_other(models):
    student, teacher = models
    ref = _run(student, None, PROMPTS, [5, 6, 7, 8])
    r0 = _run(student, _Forbidden(), PROMPTS, [5, 6, 7, 8], alpha=0.0)
    assert torch.equal(ref.response_ids, r0.response_ids)
    assert torch.equal(r0.student_logp, r0.mix_logp)
    t_only = _run(_Forbidden(), teacher, PROMPTS, [5, 6, 7, 8], alpha=1.0)
    t_none = _run(None, teacher, PROMPTS, [5, 6, 7, 8], alpha=0.3)
    assert torch.equal(t_only.response_ids, t_none.response_ids)
    assert t_only.student_logp is None


def test_eos_handling_and_early_stop(models):
    student, teacher = models
    prompts = [PROMPTS[i % 4] for i in range(32)]
    r = _run(student, teacher, prompts, range(32), max_new_tokens=20)
    ids, m = r.response_ids, r.response_mask
    lengths = []
    for b in range(len(prompts)):
        row = ids[b].tolist()
        n = row.index(EOS) + 1 if EOS in row else len(row)
        lengths.append(n)
        assert m[b, :n].all() and not m[b, n:].any()      # True up to and including EOS
        assert all(x == PAD for x in row[n:])              # pad after EOS
        assert (r.mix_logp[b, n:] == 0).all() and (r.student_logp[b, n:] == 0).all()
        assert (r.mix_logp[b, :n] < 0).all()
    assert EOS not in ids[~m].tolist()
    assert min(lengths) < max(lengths)  # the data exercise rows finishing at different steps
    # the loop stops at the last EOS (or at max_new_tokens)
    assert ids.shape[1] == max(lengths)
    assert r.lengths.tolist() == lengths


def test_no_repeat_ngram_in_rollouts(models):
    student, teacher = models
    n = 2
    r = _run(student, teacher, PROMPTS, [1, 2, 3, 4], max_new_tokens=15, no_repeat_ngram_size=n)
    for b, p in enumerate(PROMPTS):
        seq = p + r.response_ids[b][r.response_mask[b]].tolist()
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams))
    plain = _run(student, teacher, PROMPTS, [1, 2, 3, 4], max_new_tokens=15)
    assert not torch.equal(plain.response_ids, r.response_ids)  # the ban did something here


def test_no_repeat_ngram_over_the_answer_alone(models):
    """ngram_prompt=False (evaluate under --template chat): the answer repeats none of its own
    n-grams, and may repeat the prompt's (a chat prompt repeats its turn markers before every
    answer, so the prompt's n-grams ban the start an earlier answer had)."""
    student, teacher = models
    n, prompts = 2, [PROMPTS[i % 4] * 3 for i in range(16)]  # (full of bigrams the answers could repeat)
    own = _run(student, teacher, prompts, range(16), max_new_tokens=15, no_repeat_ngram_size=n, ngram_prompt=False)
    both = _run(student, teacher, prompts, range(16), max_new_tokens=15, no_repeat_ngram_size=n)
    reused = 0
    for b, p in enumerate(prompts):
        seq = own.response_ids[b][own.response_mask[b]].tolist()
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams))
        whole = p + seq  # (the bigrams across the prompt's end and in the answer, against the prompt's)
        prompt_grams = {tuple(p[i : i + n]) for i in range(len(p) - n + 1)}
        reused += sum(tuple(whole[i : i + n]) in prompt_grams for i in range(len(p) - n + 1, len(whole) - n + 1))
    assert reused > 0  # (the prompt's bigrams were not banned)
    assert not torch.equal(own.response_ids, both.response_ids)


def test_generator_count_must_match_rows(models):
    student, teacher = models
    ids, mask = _left_pad(PROMPTS)
    with pytest.raises(InputError):
        sample(student, teacher, ids, mask, params=SamplingParams(3), alpha=0.2, eos_id=EOS,
               pad_id=PAD, generators=_gens([1]), vocab_size=V)


def test_step_one_frequencies_follow_the_mixture(models):
    """Chi-square of step-1 token counts against p~' (and, for power, against q')."""
    student, teacher = models
    N, alpha = 6000, 0.5
    params = dict(max_new_tokens=1, temperature=1.3, top_k=8)
    r = _run(student, teacher, [PROMPTS[0]] * N, range(N), alpha=alpha, **params)
    counts = torch.bincount(r.response_ids[:, 0], minlength=V + 1)[:V].double()
    ids, mask = _left_pad([PROMPTS[0]])
    with torch.no_grad():
        s_logits = student(input_ids=ids, attention_mask=mask).logits[:, -1, :V].double()
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, -1, :V].double()
    sp = SamplingParams(**params)
    q = filtered_logprobs(s_logits, sp).exp()[0]
    mix = alpha * filtered_logprobs(t_logits, sp).exp()[0] + (1 - alpha) * q

    def chi2(probs):
        keep = probs > 0
        assert counts[~keep].sum() == 0 or probs is q  # never a filtered-out token
        exp = N * probs[keep]
        return float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1

    stat, dof = chi2(mix)
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)  # p ~ 1e-6 under the null
    stat_q, _ = chi2(q)
    assert stat_q > 10 * (dof + 6 * math.sqrt(2 * dof))  # the test can tell p~ from q


def test_pad_token_is_never_sampled():
    """The pad row (added to GPT-2-style vocabularies, never trained) is never drawn, even when a
    model gives it most of the mass; the other tokens keep their relative probabilities."""
    logits = torch.zeros(4000, V)
    logits[:, PAD - 1] = 10.0  # a token we pretend is the pad, with almost all the mass
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=1)
    tok, lq, _ = mix_and_sample(logits, None, 0.0, params, u, never=PAD - 1)
    assert not (tok == PAD - 1).any()
    assert torch.allclose(lq, torch.full_like(lq, -math.log(V - 1)))
    tok, _, _ = mix_and_sample(logits, logits, 0.2, params, u, never=PAD - 1)
    assert not (tok == PAD - 1).any()


def test_top_p_ties_keep_what_transformers_keeps():
    """Four equal probabilities, top-p 0.5: the mass before each is 0, .25, .5, .75; two are kept,
    as transformers' TopPLogitsWarper keeps."""
    from transformers.generation.logits_process import TopPLogitsWarper

    lp = filtered_logprobs(torch.zeros(1, 4, dtype=torch.float64), SamplingParams(1, top_p=0.5))
    hf = TopPLogitsWarper(0.5)(None, torch.zeros(1, 4, dtype=torch.float64))
    assert int(lp.isfinite().sum()) == int(hf.isfinite().sum()) == 2


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_a_uniform_draw_at_either_end_never_picks_an_impossible_token(alpha):
    """u = 0 (float32 torch.rand returns it with probability 2^-24 per draw) with token 0 banned,
    and u that rounds up to the total mass with the last token banned: the token drawn has
    probability > 0 (a -inf log-prob would make the weights and rewards inf/NaN)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, V, generator=g)
    for u, bad in ((torch.zeros(8), 0), (torch.full((8,), 1.0 - 2.0 ** -40, dtype=torch.float64), V - 1)):
        banned = torch.zeros(8, V, dtype=torch.bool)
        banned[:, bad] = True
        tok, _, lm = mix_and_sample(logits, logits.flip(0), alpha, SamplingParams(1), u, banned)
        assert (tok != bad).all() and lm.isfinite().all(), (u[0], bad)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_rows_decoding_past_their_budget_stay_within_a_learned_position_table(engine):
    """A batch decodes for its longest budget; a long prompt whose own budget is smaller (its
    prompt + answer at most max_length = the model's 16 positions) keeps decoding past position
    15, which GPT-2's position table does not have (an index error before the cap). Its kept
    tokens are those it gets alone."""
    from minillm_cli.eval.generate import generate_batches

    model = gpt2_numbers(5, vocab=V, pad=PAD, eos=EOS, n_positions=16)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2], [3, 4, 5]]  # budgets 4 and 8

    def run(ps, ids, max_new):
        kw = dict(params=SamplingParams(max_new_tokens=max_new), seed=3, example_ids=ids, eos_id=EOS, pad_id=PAD,
                  vocab_size=V, device=torch.device("cpu"), batch_size=len(ps), max_length=16, engine=engine)
        return [toks for b in generate_batches(model, ps, **kw) for toks in b.token_lists()]

    together = run(prompts, [0, 1], 8)
    assert together[0] == run(prompts[:1], [0], 4)[0]
    assert together[1] == run(prompts[1:], [1], 8)[0]


def test_stop_tokens():
    """Several stops (`--template chat`: the end of turn, then EOS): any one ends a row; a row's
    answer is its tokens without that stop, and a row cut by its budget has none to drop."""
    from minillm_cli.engine.sampler import cut_at_stop, is_stop, stop_tuple

    assert stop_tuple(7) == (7,) and stop_tuple([7, 0]) == (7, 0)
    with pytest.raises(ValueError):
        stop_tuple(())
    assert is_stop(torch.tensor([7, 0, 3, 7]), (7, 0)).tolist() == [True, True, False, True]
    assert cut_at_stop([4, 5, 0], (7, 0)) == ([4, 5], True) and cut_at_stop([4, 7], (7, 0)) == ([4], True)
    assert cut_at_stop([4, 0, 5], (7, 0)) == ([4, 0, 5], False) and cut_at_stop([], (7,)) == ([], False)
