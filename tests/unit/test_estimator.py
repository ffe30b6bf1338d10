"""The engine computes MiniLLM's gradient: checked against exact enumeration.

Vocabulary of 4 tokens (EOS = 3; the models' logits are one wider, padding id 4), responses of
at most 3 tokens, two prompts of different lengths (so left padding is exercised): 40 possible
responses per prompt. The student is a real (tiny, float64) GPT-2 with ~1k parameters.

Exact: KL(q||p) = sum_x sum_y q(y|x) log(q(y|x)/p(y|x)) over every response, and its gradient by
autograd through the enumeration.
Estimator: what `score_rollouts` + `minillm_loss` produce for one rollout, at the first PPO step.
  * deterministic: E_{y~p~}[estimator(y)] = sum_y p~(y) grad(minillm_loss on y alone), exact.
    Must equal the exact gradient to ~1e-10 for alpha = 0, and for alpha = 0.2 with "sequence"
    importance weights; with the paper's "token" weights it is only an approximation.
  * Monte Carlo: rollouts from `sample` (thousands at once), one batched loss, one backward.
    Its mean must match the deterministic expectation within the exact Monte-Carlo error
    (the per-sequence estimator variance is known from the enumeration).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from minillm_cli.engine.minillm import MiniLLMOptions, RolloutBatch, minillm_loss, score_rollouts
from minillm_cli.engine.runtime import example_generator
from minillm_cli.engine.sampler import Rollout, SamplingParams, sample

V, EOS, PAD, TMAX = 4, 3, 4, 3
PROMPTS = [[1, 2, 0], [2]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)


def _gpt2(seed, n_embd):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=V + 1, n_positions=8,
                     initializer_range=0.7, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()


@pytest.fixture(scope="module")
def models():
    return _gpt2(3, 8), _gpt2(4, 12)


def _responses():
    """Every response: EOS at step 1, 2 or 3, or 3 non-EOS tokens (truncated). 40 in all."""
    out = []
    for n in range(1, TMAX + 1):
        for prefix in itertools.product(range(V - 1), repeat=n - 1):
            out.append(list(prefix) + [EOS])
    out += [list(p) for p in itertools.product(range(V - 1), repeat=TMAX)]
    return out


RESPONSES = _responses()


def _params(model):
    return [p for p in model.parameters()]


def _flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])


def _token_logps(model, prompt, responses):
    """Teacher-forced log-probs of each response token, no padding on the left.
    -> (logp [n, TMAX], mask [n, TMAX]); differentiable."""
    n = len(responses)
    ids = torch.full((n, len(prompt) + TMAX), PAD)
    att = torch.zeros_like(ids)
    mask = torch.zeros(n, TMAX, dtype=torch.bool)
    ids[:, : len(prompt)] = torch.tensor(prompt)
    att[:, : len(prompt)] = 1
    for i, y in enumerate(responses):
        ids[i, len(prompt) : len(prompt) + len(y)] = torch.tensor(y)
        att[i, len(prompt) : len(prompt) + len(y)] = 1
        mask[i, : len(y)] = True
    logits = model(input_ids=ids, attention_mask=att).logits[:, len(prompt) - 1 : -1, :V]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, len(prompt):].clamp(max=V - 1)[..., None])
    return lp.squeeze(-1) * mask, mask


def exact_kl_and_grad(student, teacher):
    params = _params(student)
    total = 0.0
    for x in PROMPTS:
        lq, _ = _token_logps(student, x, RESPONSES)
        with torch.no_grad():
            lp, _ = _token_logps(teacher, x, RESPONSES)
        seq_q, seq_p = lq.sum(1), lp.sum(1)
        assert abs(float(seq_q.detach().exp().sum()) - 1.0) < 1e-12  # the enumeration is complete
        total = total + (seq_q.exp() * (seq_q - seq_p)).sum()
    return float(total.detach()), _flat_grad(total, params)


def enumerated_rollout(student, teacher, alpha):
    """A Rollout holding every (prompt, response) pair, with the log-probs the sampler would
    record, and p~(y|x) for each row."""
    rows = [(x, y) for x in PROMPTS for y in RESPONSES]
    P = max(len(x) for x in PROMPTS)
    prompt_ids = torch.full((len(rows), P), PAD)
    prompt_mask = torch.zeros(len(rows), P, dtype=torch.bool)
    resp = torch.full((len(rows), TMAX), PAD)
    lq_all, lm_all, rmask = [], [], []
    with torch.no_grad():
        for x in PROMPTS:
            lq, m = _token_logps(student, x, RESPONSES)
            lp, _ = _token_logps(teacher, x, RESPONSES)
            lm = lq if alpha == 0 else torch.log(alpha * lp.exp() + (1 - alpha) * lq.exp()) * m
            lq_all.append(lq), lm_all.append(lm), rmask.append(m)
    for i, (x, y) in enumerate(rows):
        prompt_ids[i, P - len(x):] = torch.tensor(x)
        prompt_mask[i, P - len(x):] = True
        resp[i, : len(y)] = torch.tensor(y)
    mix_logp = torch.cat(lm_all)
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=resp,
                      response_mask=torch.cat(rmask), student_logp=torch.cat(lq_all),
                      mix_logp=mix_logp)
    return rollout, mix_logp.sum(1).exp()


def per_sequence_estimates(student, teacher, alpha, opts):
    """G [rows, D]: the engine's gradient for each enumerated (x, y) alone (normalizer 1)
    and p~(y|x) [rows]."""
    rollout, probs = enumerated_rollout(student, teacher, alpha)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    params = _params(student)
    G = torch.stack([_flat_grad(minillm_loss(student, teacher, batch.select([i]), opts, 1.0, V)[0],
                                params) for i in range(len(batch))])
    return G, probs


def expectation_and_variance(G, probs):
    """Sum over prompts of E_{p~}[G] and of Var_{p~}[G] (per coordinate)."""
    n = len(RESPONSES)
    E, var = 0.0, 0.0
    for k in range(len(PROMPTS)):
        g, p = G[k * n : (k + 1) * n], probs[k * n : (k + 1) * n]
        assert abs(float(p.sum()) - 1.0) < 1e-12
        e = (p[:, None] * g).sum(0)
        E = E + e
        var = var + (p[:, None] * (g - e) ** 2).sum(0)
    return E, var


def monte_carlo_estimate(student, teacher, alpha, opts, n_per_prompt, seed):
    """One batched pass: sample n rollouts per prompt, score, loss / n, backward."""
    prompts = [x for x in PROMPTS for _ in range(n_per_prompt)]
    P = max(len(x) for x in PROMPTS)
    ids = torch.full((len(prompts), P), PAD)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, P - len(x):] = torch.tensor(x)
        mask[i, P - len(x):] = 1
    gens = [example_generator(seed, 0, i) for i in range(len(prompts))]
    rollout = sample(student, teacher, ids, mask, params=SamplingParams(TMAX), alpha=alpha,
                     eos_id=EOS, pad_id=PAD, generators=gens, vocab_size=V)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    loss, stats = minillm_loss(student, teacher, batch, opts, float(n_per_prompt), V)
    return _flat_grad(loss, _params(student)), stats


def _opts(mode="token", single_step=True):
    # the unnormalised objective (length_norm off), first PPO step, paper defaults otherwise
    return MiniLLMOptions(length_norm=False, importance_weight=mode, single_step=single_step,
                          clip_ratio=0.2, chunk_size=2)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("alpha,mode,single_step", [
    (0.0, "token", True),       # on-policy MiniLLM: single-step + long-term
    (0.0, "token", False),      # plain policy gradient with the full return R_t
    (0.2, "sequence", True),    # teacher-mixed, exact prefix importance weights
    (0.2, "sequence", False),
])
def test_expected_estimator_equals_exact_gradient(models, alpha, mode, single_step):
    student, teacher = models
    kl, exact = exact_kl_and_grad(student, teacher)
    assert kl > 0.05 and exact.norm() > 1e-2  # a non-trivial problem
    G, probs = per_sequence_estimates(student, teacher, alpha, _opts(mode, single_step))
    E, _ = expectation_and_variance(G, probs)
    assert _rel(E, exact) < 1e-10, _rel(E, exact)


@pytest.mark.parametrize("single_step", [True, False])
def test_sequence_weights_are_unbiased_for_the_length_normalised_objective(models, monkeypatch, single_step):
    """With length_norm the term of token t is divided by T - t, a function of the whole response:
    E_{p~}[sequence-weighted estimator] must equal the on-policy (alpha = 0) expectation. Needs
    responses of up to 4 tokens: at 3, T is already fixed by y_<=2 and prefix weights pass too."""
    monkeypatch.setitem(globals(), "TMAX", 4)
    monkeypatch.setitem(globals(), "RESPONSES", _responses())
    student, teacher = models
    opts = MiniLLMOptions(length_norm=True, importance_weight="sequence", single_step=single_step,
                          clip_ratio=0.2, chunk_size=2)
    E_q, _ = expectation_and_variance(*per_sequence_estimates(student, teacher, 0.0, opts))
    E_mix, _ = expectation_and_variance(*per_sequence_estimates(student, teacher, 0.2, opts))
    assert E_q.norm() > 1e-2 and _rel(E_mix, E_q) < 1e-10, _rel(E_mix, E_q)


def test_token_weights_are_the_papers_approximation(models):
    """alpha = 0.2 with per-token weights: a biased estimator; the bias is measurable."""
    student, teacher = models
    _, exact = exact_kl_and_grad(student, teacher)
    G, probs = per_sequence_estimates(student, teacher, 0.2, _opts("token"))
    E, _ = expectation_and_variance(G, probs)
    gap = _rel(E, exact)
    cos = float(E @ exact / (E.norm() * exact.norm()))
    print(f"\ntoken-level importance weights, alpha=0.2: relative gap to the exact gradient "
          f"{gap:.4f}, cosine {cos:.4f}")
    assert 1e-3 < gap < 0.5 and cos > 0.9


@pytest.mark.parametrize("alpha,mode,target", [
    (0.0, "token", "exact"),
    (0.2, "sequence", "exact"),
    (0.2, "token", "expectation"),  # the paper's estimator: its own expectation, not the exact one
])
def test_monte_carlo_matches(models, alpha, mode, target):
    student, teacher = models
    opts = _opts(mode)
    G, probs = per_sequence_estimates(student, teacher, alpha, opts)
    E, var = expectation_and_variance(G, probs)
    if target == "exact":
        _, want = exact_kl_and_grad(student, teacher)
    else:
        want = E
    n = 3000
    est, stats = monte_carlo_estimate(student, teacher, alpha, opts, n, seed=17)
    se = (var / n).sqrt()
    live = se > 1e-9 * se.max()
    z = (est - want)[live] / se[live]
    noise = float((var.sum() / n).sqrt())
    err = float((est - want).norm())
    print(f"\nMC alpha={alpha} {mode}: max|z| {float(z.abs().max()):.2f} over {int(live.sum())} "
          f"coordinates, |err| {err:.3g} vs expected noise {noise:.3g}, |grad| {float(want.norm()):.3g}")
    assert float(z.abs().max()) < 5.0
    assert err < 3.0 * noise
    if alpha == 0:
        assert stats["w_mean"] == 1.0 and stats["w_max"] == 1.0
    else:
        assert stats["w_max"] <= 1 / (1 - alpha) + 1e-9  # q / (alpha p + (1 - alpha) q)


def test_micro_batches_sum_to_the_batch_loss(models):
    """Splitting a rollout batch into micro-batches (select trims padding columns) and summing
    their losses with the global normalizer gives the whole batch's loss and gradient."""
    student, teacher = models
    opts = MiniLLMOptions(importance_weight="sequence")  # length norm on: the paper's default
    rollout, _ = enumerated_rollout(student, teacher, 0.2)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    norm = float(batch.num_tokens())
    params = _params(student)
    whole, _ = minillm_loss(student, teacher, batch, opts, norm, V)
    parts = [minillm_loss(student, teacher, batch.select(idx), opts, norm, V)[0]
             for idx in ([0, 1, 2], list(range(3, 40)), list(range(41, 80)), [40])]
    assert abs(float(whole.detach() - sum(p.detach() for p in parts))) < 1e-12
    assert _rel(_flat_grad(sum(parts), params), _flat_grad(whole, params)) < 1e-10
    small = batch.select([40, 0])  # prompt 2 (1 token) and an EOS-first response
    assert small.input_ids.shape[1] < batch.input_ids.shape[1]
    aligned = small.aligned_mask()
    assert aligned.shape == (2, small.input_ids.shape[1] - 1)
    assert torch.equal(aligned[:, small.prompt_len - 1 :], small.response_mask)
    assert torch.equal(small.targets, small.input_ids[:, 1:][:, small.prompt_len - 1 :])


def _host_reads(fn) -> list[str]:
    """aten ops run by fn() that make the host wait for the device: reading a value
    (`.item()`, `float()`, `int()`, `.tolist()` all dispatch to _local_scalar_dense), nonzero,
    and boolean-mask indexing (its output size is data-dependent). Reads made inside
    transformers are left out: its mask code reads the padding mask once per forward (to choose
    the attention kernel), which is the model's, not ours."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if any("/transformers/" in f.filename for f in traceback.extract_stack()):
                return func(*args, **(kwargs or {}))
            if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"):
                seen.append(name)
            elif name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else [])):
                seen.append("aten.index[bool]")
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_an_update_micro_step_never_waits_for_the_device(models):
    """select + minillm_loss + backward: no host read (on a GPU each one would stall the queue
    between forward and backward). The buffer's row extents are read once, beforehand."""
    student, teacher = models
    opts = MiniLLMOptions(cache_teacher_logits=True)
    rollout, _ = enumerated_rollout(student, teacher, 0.2)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    assert _host_reads(lambda: batch.num_tokens()) != []  # the recorder sees a host read
    batch.row_extents()

    def micro_step():
        loss, stats = minillm_loss(student, teacher, batch.select([3, 41, 0]), opts, 5.0, V)
        loss.backward()

    assert _host_reads(micro_step) == []
    assert batch.tokens_in([3, 41, 0]) == int(batch.response_mask[[3, 41, 0]].sum())


def test_select_trims_exactly_the_all_padding_columns(models, monkeypatch):
    from minillm_cli.engine import minillm

    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 1)  # (the bucketing: test_select_widths_come_in_buckets)
    student, teacher = models
    rollout, _ = enumerated_rollout(student, teacher, 0.2)
    batch = score_rollouts(student, teacher, rollout, MiniLLMOptions(), vocab_size=V)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = torch.randperm(len(batch), generator=g)[: int(torch.randint(1, 6, (1,), generator=g))].tolist()
        got = batch.select(rows)
        P = batch.prompt_len
        real = batch.attention_mask[rows, :P].bool().any(0).nonzero()
        lead = min(int(real[0]) if len(real) else P - 1, P - 1)
        keep = max(1, int(batch.response_mask[rows].sum(1).max()))
        assert torch.equal(got.input_ids, batch.input_ids[rows][:, lead : P + keep])
        assert torch.equal(got.attention_mask, batch.attention_mask[rows][:, lead : P + keep])
        assert got.prompt_len == P - lead
        assert torch.equal(got.advantages, batch.advantages[rows][:, :keep])


def test_step_statistics_of_micro_batches_equal_the_whole_batch(models):
    """StatsSum over micro-batches (what distill's update logs) gives the whole mini-batch's
    per-token means, its maximum sampling ratio and its per-row reverse KL estimate."""
    from minillm_cli.engine.minillm import StatsSum

    student, teacher = models
    opts = MiniLLMOptions(clip_ratio=0.01)  # clipping happens at the first step only via w
    rollout, _ = enumerated_rollout(student, teacher, 0.5)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    rows = list(range(0, 80, 3))
    n_tok = batch.tokens_in(rows)
    _, whole = minillm_loss(student, teacher, batch.select(rows), opts, float(n_tok), V)
    acc = StatsSum(torch.device("cpu"))
    for part in (rows[:2], rows[2:11], rows[11:]):
        _, st = minillm_loss(student, teacher, batch.select(part), opts, float(n_tok), V)
        acc.add(st, len(part))
    sums, w_max = acc.read()
    for key in StatsSum.TOKEN_MEANS:
        assert abs(sums[key] / n_tok - float(whole[key])) < 1e-9, key
    assert float(whole["clip_frac"]) > 0  # the weighting is exercised on a non-trivial value
    assert abs(sums["rkl_seq"] / len(rows) - float(whole["rkl_seq"])) < 1e-9
    assert abs(sums["pg"] - float(whole["pg"])) < 1e-9 and abs(sums["single_step"] - float(whole["single_step"])) < 1e-9
    assert w_max == float(whole["w_max"]) > 1.0


def test_rkl_seq_is_the_mean_sequence_log_ratio(models):
    """The logged reverse-KL estimate: sum over each response of log q_old - log p, mean over rows."""
    student, teacher = models
    rollout, _ = enumerated_rollout(student, teacher, 0.5)
    batch = score_rollouts(student, teacher, rollout, MiniLLMOptions(), vocab_size=V)
    rows = list(range(0, 80, 3))
    part = batch.select(rows)
    _, st = minillm_loss(student, teacher, part, MiniLLMOptions(), float(batch.tokens_in(rows)), V)
    want = ((part.old_logp - part.teacher_logp) * part.response_mask).sum(1).mean()
    assert abs(float(st["rkl_seq"]) - float(want)) < 1e-9 and abs(float(want)) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_importance_weights_use_the_filtered_sampling_distributions(models, alpha):
    """Under --temperature/--top-k the weights are q'/p~' of the filtered distributions the tokens
    were drawn from (the sampler's log-probs), not the unfiltered teacher-forced q_old: at alpha 0
    exactly 1."""
    student, teacher = models
    ids = torch.tensor([[1, 2, 0], [PAD, PAD, 2]] * 4)
    mask = (ids != PAD).long()
    rollout = sample(student, teacher, ids, mask, params=SamplingParams(TMAX, temperature=0.7, top_k=2),
                     alpha=alpha, eos_id=EOS, pad_id=PAD, vocab_size=V,
                     generators=[torch.Generator().manual_seed(i) for i in range(8)])
    batch = score_rollouts(student, teacher, rollout, MiniLLMOptions(), vocab_size=V)
    m = batch.response_mask.bool()
    want = (rollout.student_logp - rollout.mix_logp).double().exp()
    torch.testing.assert_close(batch.pg_weights[m].double(), want[m], rtol=0, atol=1e-9)
    if alpha == 0.0:
        assert torch.equal(batch.pg_weights[m], torch.ones_like(batch.pg_weights[m]))
    else:  # (the unfiltered q_old would give other weights)
        assert not torch.allclose(batch.pg_weights[m].double(),
                                  (batch.old_logp - rollout.mix_logp.double()).exp()[m], atol=1e-3)


def test_the_teacher_logit_cache_is_kept_where_it_fits():
    """distill's default (--cache-teacher-logits unset): kept when twice the buffer's logits (the
    scored parts and the buffer they are joined into) fit in a quarter of the memory free after
    loading, in a one-process run, with the single-step term (the only reader); a flag given
    either way wins; a note says what was decided and why."""
    import pytest

    from minillm_cli.engine.minillm import teacher_logit_cache
    from minillm_cli.engine.runtime import free_memory_bytes

    paper = dict(single_step=True, rollouts=256, max_new_tokens=256, vocab_size=50257, dtype=torch.bfloat16)
    need = 256 * 256 * 50257 * 2  # 6.1 GiB
    on, why = teacher_logit_cache(None, **paper, free_bytes=80 * 2 ** 30)
    assert on and "up to 6.1 GiB (twice that while a buffer is joined) of 80.0 GiB free" in why
    off, why = teacher_logit_cache(None, **paper, free_bytes=24 * 2 ** 30)
    assert not off and "6.1 GiB" in why and "--cache-teacher-logits" in why
    assert teacher_logit_cache(None, **paper, free_bytes=8 * need)[0]
    assert not teacher_logit_cache(None, **paper, free_bytes=8 * need - 1)[0]
    assert not teacher_logit_cache(None, **paper, free_bytes=None)[0]
    assert not teacher_logit_cache(None, **{**paper, "dtype": torch.float32}, free_bytes=8 * need)[0]
    assert teacher_logit_cache(True, **paper, free_bytes=1) == (True, None)
    assert teacher_logit_cache(False, **paper, free_bytes=2 ** 50) == (False, None)
    assert teacher_logit_cache(None, **{**paper, "single_step": False}, free_bytes=2 ** 50) == (False, None)
    off, why = teacher_logit_cache(None, **paper, free_bytes=2 ** 50, processes=2)
    assert not off and "several processes" in why
    tiny = teacher_logit_cache(None, **{**paper, "rollouts": 4, "max_new_tokens": 8, "vocab_size": 384,
                                        "dtype": torch.float32}, free_bytes=2 ** 34)[1]
    assert "up to 48.0 KiB" in tiny
    with pytest.raises(TypeError):
        teacher_logit_cache(None, **paper)  # the free memory must be said (None: unknown)
    assert 0 < free_memory_bytes(torch.device("cpu")) < 2 ** 50


def test_select_widths_come_in_buckets(models, monkeypatch):
    """select keeps more left padding (masked) so the width is a multiple of WIDTH_BUCKET, where
    the buffer has the columns: few distinct sequence lengths for the update's forwards; the
    loss is the same up to float rounding."""
    from minillm_cli.engine import minillm

    student, teacher = models
    opts = MiniLLMOptions()
    rollout, _ = enumerated_rollout(student, teacher, 0.2)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    first, lengths = batch.row_extents()
    rows = [i for i in range(len(batch)) if first[i] == batch.prompt_len - 1 and lengths[i] <= 2][:3]
    assert len(rows) == 3  # the short prompt, responses of <= 2 tokens: 3 columns of the buffer's 6
    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 1)
    exact = batch.select(rows)
    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 4)
    wide = batch.select(rows)
    width = exact.input_ids.shape[1]
    assert wide.input_ids.shape[1] == min(-(-width // 4) * 4, batch.input_ids.shape[1]) > width
    assert wide.prompt_len - exact.prompt_len == wide.input_ids.shape[1] - width
    assert not wide.attention_mask[:, : wide.input_ids.shape[1] - width].any()  # only padding added
    a = minillm_loss(student, teacher, exact, opts, 5.0, V)[0].detach()
    b = minillm_loss(student, teacher, wide, opts, 5.0, V)[0].detach()
    assert abs(float(a) - float(b)) < 1e-10
    assert minillm.bucketed_start(10, 70) == 10 and minillm.bucketed_start(11, 70) == 10
    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 64)
    assert minillm.bucketed_start(10, 70) == 6 and minillm.bucketed_start(7, 70) == 6
    assert minillm.bucketed_start(6, 70) == 6 and minillm.bucketed_start(5, 70) == 0


def test_no_attention_row_is_empty_in_left_padded_forwards(models, monkeypatch):
    """A causal mask over left padding leaves a padding query no key; attention kernels may give
    NaN there (on the H200 the weights went NaN). The update's micro-batches (`select`, which knows
    on the host whether a row is left-padded) and the scoring chunks hand SDPA a mask in which every
    query row has a key, and the loss and its gradient are those of the plain 2-D mask (on this CPU
    the math kernel gives 0 for an empty row, so both are finite)."""
    import transformers.integrations.sdpa_attention as sdpa_mod

    from minillm_cli.engine import minillm

    student, teacher = models
    opts = MiniLLMOptions()
    rollout, _ = enumerated_rollout(student, teacher, 0.2)
    batch = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
    first, _ = batch.row_extents()
    padded = [i for i in range(len(batch)) if first[i] > 0][:2] + [i for i in range(len(batch)) if first[i] == 0][:1]
    assert len(padded) == 3
    seen = []
    real_sdpa = sdpa_mod.torch.nn.functional.scaled_dot_product_attention

    def strict(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min
            seen.append(bool(allowed.any(-1).all()))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def loss_and_grad(micro):
        student.zero_grad()
        loss = minillm_loss(student, teacher, micro, opts, 5.0, V)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    micro = batch.select(padded)
    assert micro.left_padded is True and batch.select(padded[2:]).left_padded is False
    monkeypatch.setattr(sdpa_mod.torch.nn.functional, "scaled_dot_product_attention", strict)
    got = loss_and_grad(micro)
    assert seen and all(seen)  # every forward's every query row had a key
    chunks = list(minillm.response_logits_in_chunks(student, batch.input_ids, batch.attention_mask,
                                                    batch.response_mask, rows=2))
    assert len(chunks) > 1 and all(seen)
    monkeypatch.setattr(minillm, "forward_mask", lambda model, mask, left_padded=None: mask)
    seen.clear()
    want = loss_and_grad(micro)
    assert not all(seen)  # the plain mask does leave rows empty: the check above can fail
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_left_padding_is_known_on_the_host_and_only_plain_causal_models_get_the_4d_mask():
    """`select` says whether a selection has a left-padded row without reading the device -- a row
    with no real prompt column counts -- and `forward_mask` leaves models with sliding-window
    layers their own masks."""
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    from minillm_cli.engine import minillm

    P, T = 3, 2
    att = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    z = torch.zeros(3, T)
    batch = RolloutBatch(input_ids=torch.zeros(3, P + T, dtype=torch.long), attention_mask=att, prompt_len=P,
                         response_mask=att[:, P:].bool(), old_logp=z, teacher_logp=z, rewards=z, advantages=z,
                         pg_weights=z, ss_weights=z, w=z)
    assert batch.select([0]).left_padded is True  # no prompt column at all
    assert batch.select([1]).left_padded is True and batch.select([2]).left_padded is False
    assert minillm._plain_causal(GPT2Config())
    assert not minillm._plain_causal(MistralConfig(sliding_window=16))
    assert minillm._plain_causal(Qwen2Config(sliding_window=16, use_sliding_window=False))
    assert not minillm._plain_causal(Qwen2Config(sliding_window=16, use_sliding_window=True, max_window_layers=1,
                                                 num_hidden_layers=2))
