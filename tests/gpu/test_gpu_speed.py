"""GPU checks of the fast sampler (skipped without CUDA): the captured/compiled engines draw the
reference sampler's distribution on the device, the static path passes its self-check on this
transformers version without falling back, and a CUDA graph step beats the eager loop."""
from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from minillm_cli.engine import fast_sampler  # noqa: E402
from minillm_cli.engine.sampler import SamplingParams, filtered_logprobs, sample  # noqa: E402

EOS = 0


def _fail_on_fallback():
    for msg in ("fast sampler unavailable", "CUDA graph capture failed"):
        warnings.filterwarnings("error", message=msg)


def _gpt2(seed, vocab, dtype=torch.float32, **shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab + 1, n_positions=512, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=vocab,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, **shape)
    with torch.device("cuda"):
        return GPT2LMHeadModel(cfg).to(dtype).eval()


def _args(B, P, V, T, alpha, seed0=0, **kw):
    g = torch.Generator().manual_seed(seed0)
    ids = torch.randint(1, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b in range(B):
        mask[b, : b % P] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, V))
    return dict(prompt_ids=ids.cuda(), prompt_mask=mask.cuda(), params=SamplingParams(T, **kw), alpha=alpha,
                eos_id=EOS, pad_id=V, generators=[torch.Generator().manual_seed(seed0 * 1000 + b) for b in range(B)],
                vocab_size=V)


def _assert_fast_matches_reference(s, t, V, alpha, engine="graph", T=24, **kw):
    """The fast sampler's rollout (no fallback) against the reference's on 48 rows: >= 95% of
    rows token for token (float32 kernels differ, so a row may rarely flip a token), their
    log-probs within 1e-4."""
    ref = sample(s, t, **_args(48, 10, V, T, alpha, **kw))
    with warnings.catch_warnings():
        _fail_on_fallback()
        got = fast_sampler.fast_sample(s, t, engine=engine, **_args(48, 10, V, T, alpha, **kw))
    fast_sampler.release()
    same = (ref.response_ids.shape == got.response_ids.shape
            and (ref.response_ids == got.response_ids).all(1).float().mean().item())
    assert same and same >= 0.95, same
    rows = (ref.response_ids == got.response_ids).all(1)
    torch.testing.assert_close(got.mix_logp[rows], ref.mix_logp[rows], rtol=0, atol=1e-4)


def _bf16_graph_rollout():
    """A captured rollout of a bf16 gpt2-like pair at batch 64 (where "auto" measures its kernels)."""
    V = 50
    student = _gpt2(3, V, torch.bfloat16, n_layer=2, n_embd=256, n_head=4)
    teacher = _gpt2(4, V, torch.bfloat16, n_layer=2, n_embd=1024, n_head=16)
    with warnings.catch_warnings():
        _fail_on_fallback()
        out = sample(student, teacher, engine="graph", **_args(64, 64, V, T=32, alpha=0.2))
    fast_sampler.release()
    assert out.response_ids.shape[0] == 64


@pytest.fixture(scope="module")
def tiny():
    V = 13
    return _gpt2(1, V, n_layer=2, n_embd=64, n_head=2), _gpt2(2, V, n_layer=2, n_embd=64, n_head=4), V


@pytest.mark.parametrize("engine,alpha", [(e, a) for e in ("static", "graph") for a in (0.0, 0.3, 1.0)]
                         + [("compile", 0.3)])
def test_fast_engines_match_the_reference_on_cuda(tiny, engine, alpha):
    student, teacher, V = tiny
    s, t = (student, None) if alpha == 0 else ((None, teacher) if alpha == 1 else (student, teacher))
    _assert_fast_matches_reference(s, t, V, alpha, engine=engine, T=24 if engine != "compile" else 8,
                                   no_repeat_ngram_size=3, top_k=8)


def test_graph_step_one_frequencies_follow_the_mixture(tiny):
    student, teacher, V = tiny
    N, alpha = 4000, 0.5
    a = _args(N, 6, V, T=1, alpha=alpha, temperature=1.3, top_k=8)
    a["prompt_ids"] = a["prompt_ids"][:1].expand(N, -1).contiguous()
    a["prompt_mask"] = a["prompt_mask"][:1].expand(N, -1).contiguous()
    r = fast_sampler.fast_sample(student, teacher, engine="graph", **a)
    counts = torch.bincount(r.response_ids[:, 0].cpu(), minlength=V + 1)[:V].double()
    with torch.no_grad():
        ids, m = a["prompt_ids"][:1], a["prompt_mask"][:1]
        sl = student(input_ids=ids, attention_mask=m).logits[:, -1, :V].double()
        tl = teacher(input_ids=ids, attention_mask=m).logits[:, -1, :V].double()
    mix = (alpha * filtered_logprobs(tl, a["params"]).exp() + (1 - alpha) * filtered_logprobs(sl, a["params"]).exp())[0].cpu()
    keep = mix > 0
    assert counts[~keep].sum() == 0
    exp = N * mix[keep]
    stat, dof = float(((counts[keep] - exp) ** 2 / exp).sum()), int(keep.sum()) - 1
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)


def test_bf16_gpt2_shapes_self_check_and_speed():
    """gpt2-shaped bf16 teacher and student: no fallback, and the graph engine is faster than the
    eager loop at batch 16 (a loose bound; benchmarks/rollout.py has the real figures)."""
    V = 50257
    student = _gpt2(3, V, torch.bfloat16, n_layer=12, n_embd=768, n_head=12)
    teacher = _gpt2(4, V, torch.bfloat16, n_layer=12, n_embd=768, n_head=12)
    assert fast_sampler.self_check(student, V, "cuda", EOS) is None
    assert fast_sampler.self_check(teacher, V, "cuda", EOS) is None
    times = {}
    for engine in ("eager", "graph", "graph"):
        a = _args(16, 64, V, T=64, alpha=0.2)
        a["eos_id"] = V  # never sampled (pad row is outside the vocabulary): all 64 steps run
        with warnings.catch_warnings():
            _fail_on_fallback()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = sample(student, teacher, engine=engine, **a)
            torch.cuda.synchronize()
        times[engine] = time.perf_counter() - t0  # second "graph" run: captured graph reused
        assert r.response_ids.shape == (16, 64)
    fast_sampler.release()
    assert times["graph"] < times["eager"] / 1.5, times


def test_graph_under_autocast_across_regions_matches_eager():
    """The distill path: a float32 student under bf16 autocast, the captured graph kept and replayed
    in a later autocast region (rollout micro-batch 2) after memory was reused in between. Before
    the decode step cast weights itself, the graph read autocast's freed cast copies: NaN losses."""
    V = 50
    student = _gpt2(5, V, torch.float32, n_layer=2, n_embd=64, n_head=2)
    teacher = _gpt2(6, V, torch.bfloat16, n_layer=2, n_embd=128, n_head=4)
    for p in student.parameters():
        p.requires_grad_(True)  # master weights: what autocast caches casts of
    outs = {}
    for engine in ("eager", "graph"):
        outs[engine], junk = [], []
        for call in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
                _fail_on_fallback()
                r = sample(student, teacher, engine=engine, **_args(32, 12, V, T=16, alpha=0.2, seed0=call))
            # occupy the blocks autocast's cast copies lived in (same sizes) with NaN, and keep
            # them occupied through the next call, so its own casts cannot land there again
            junk = [torch.full_like(p, float("nan"), dtype=torch.bfloat16) for p in student.parameters()]
            outs[engine].append(r)
        del junk
    fast_sampler.release()
    for ref, got in zip(outs["eager"], outs["graph"]):
        assert torch.isfinite(got.mix_logp).all() and torch.isfinite(got.student_logp).all()
        same = (ref.response_ids == got.response_ids).all(1).float().mean().item()
        assert same >= 0.5, same  # bf16 rounding may flip a token now and then; garbage flips all


def test_graph_weight_copies_are_the_per_step_casts_and_follow_updates(monkeypatch):
    """A float32 student under bf16 autocast samples through bf16 copies of its matmul weights
    (engine/sampling_weights.py) captured in the graph: the same tokens and log-probs as casting
    in every step, and a kept graph replays the weights of a later (in-place) optimizer step."""
    V = 50
    student = _gpt2(7, V, torch.float32, n_layer=2, n_embd=64, n_head=2)
    teacher = _gpt2(8, V, torch.bfloat16, n_layer=2, n_embd=128, n_head=4)

    def run(seed0):
        with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
            _fail_on_fallback()
            return sample(student, teacher, engine="graph", **_args(16, 12, V, T=16, alpha=0.2, seed0=seed0))

    outs = {}
    for copies in (True, False):
        monkeypatch.setattr(fast_sampler, "SAMPLING_WEIGHTS", copies)
        fast_sampler.release()
        first = run(0)
        (dec,) = fast_sampler._KEPT.values()
        assert (dec.models["student"].weights is not None) == copies  # (the exactness check passed on CUDA)
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(-1.0)  # an "optimizer step" between two calls of the kept graph
        outs[copies] = (first, run(1))
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(-1.0)
    fast_sampler.release()
    for a, b in zip(outs[True], outs[False]):  # bitwise: the same kernels on the same bf16 values
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.mix_logp, b.mix_logp) and torch.equal(a.student_logp, b.student_logp)


def test_padded_head_draws_what_the_plain_head_draws(tiny, monkeypatch):
    """The LM head padded to 64 rows (sampling_weights.PaddedHead, on by default on CUDA) runs
    another GEMM shape: the same tokens, log-probs equal up to rounding."""
    student, teacher, V = tiny
    outs = {}
    for pad in (True, False):
        monkeypatch.setattr(fast_sampler, "PAD_HEAD_DEVICES", ("cuda",) if pad else ())
        fast_sampler.release()
        with warnings.catch_warnings():
            _fail_on_fallback()
            outs[pad] = sample(student, teacher, engine="graph", **_args(32, 10, V, T=20, alpha=0.3, seed0=3))
        (dec,) = fast_sampler._KEPT.values()
        assert all((m.head is not None) == pad for m in dec.models.values())
    fast_sampler.release()
    a, b = outs[True], outs[False]
    same = (a.response_ids == b.response_ids).all(1).float().mean().item()
    assert same >= 0.95, same
    rows = (a.response_ids == b.response_ids).all(1)
    torch.testing.assert_close(a.mix_logp[rows], b.mix_logp[rows], rtol=0, atol=1e-4)


def test_parallel_streams_draw_bitwise_what_one_stream_draws(monkeypatch):
    """fast_sampler.PARALLEL_MODELS: the student's forward on a side stream inside the captured
    step: the same kernels on the same inputs, so the same bits; and a kept graph replays it."""
    V = 50
    student = _gpt2(7, V, torch.float32, n_layer=2, n_embd=64, n_head=2)
    teacher = _gpt2(8, V, torch.bfloat16, n_layer=3, n_embd=128, n_head=4)
    outs = {}
    for parallel in (True, False):
        monkeypatch.setattr(fast_sampler, "PARALLEL_MODELS", parallel)
        fast_sampler.release()
        runs = []
        for seed0 in (0, 1):  # the second replays the kept graph
            with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings():
                _fail_on_fallback()
                runs.append(sample(student, teacher, engine="graph", **_args(16, 12, V, T=16, alpha=0.2, seed0=seed0)))
        (dec,) = fast_sampler._KEPT.values()
        assert (dec.side is not None) == parallel and dec.graphs.get(None) is not None
        outs[parallel] = runs
    fast_sampler.release()
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.mix_logp, b.mix_logp) and torch.equal(a.student_logp, b.student_logp)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_bucketed_graphs_match_the_reference_on_cuda(tiny, monkeypatch, alpha):
    """fast_sampler.KV_BUCKETS: one captured graph per bucket of cache columns, each attending over
    its prefix of the cache (views, static_cache.CacheWrites); the reference's tokens, and the
    kept decoder holds one graph per bucket reached."""
    student, teacher, V = tiny
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", 4)
    s, t = (student, None) if alpha == 0 else ((None, teacher) if alpha == 1 else (student, teacher))
    kw = dict(no_repeat_ngram_size=3, top_k=8)
    ref = sample(s, t, **_args(48, 10, V, 64, alpha, **kw))
    fast_sampler.release()
    with warnings.catch_warnings():
        _fail_on_fallback()
        got = fast_sampler.fast_sample(s, t, engine="graph", check_every=1000, **_args(48, 10, V, 64, alpha, **kw))
    (dec,) = fast_sampler._KEPT.values()
    assert dec.width == 16 and sorted(k for k, g in dec.graphs.items() if g is not None) == [80, 96, 112, 128]
    with warnings.catch_warnings():  # the kept decoder's graphs, replayed for a second call
        _fail_on_fallback()
        again = fast_sampler.fast_sample(s, t, engine="graph", check_every=1000, **_args(48, 10, V, 64, alpha, **kw))
    fast_sampler.release()
    for out in (got, again):
        same = (ref.response_ids == out.response_ids).all(1).float().mean().item()
        assert same >= 0.95, same
        rows = (ref.response_ids == out.response_ids).all(1)
        torch.testing.assert_close(out.mix_logp[rows], ref.mix_logp[rows], rtol=0, atol=1e-4)


@pytest.mark.parametrize("engine", ["static", "graph"])
def test_a_teacher_on_another_device_samples_on_the_static_path(tiny, engine):
    """--teacher-device: the teacher (here on the CPU, behind TeacherOnDevice) gets its cache
    positions on its own device (static_cache.CacheWrites writes there), so the static engine
    serves it without falling back; the graph engine captures nothing (the teacher's work would
    not be in the graph) and decodes with the static steps, without a failed capture."""
    import copy

    from minillm_cli.engine.teacher import TeacherOnDevice

    student, teacher, V = tiny
    far = TeacherOnDevice(copy.deepcopy(teacher).cpu(), torch.device("cuda"))
    ref = sample(student, teacher, **_args(16, 10, V, 12, 0.3))
    with warnings.catch_warnings():
        _fail_on_fallback()
        got = fast_sampler.fast_sample(student, far, engine=engine, keep=True, **_args(16, 10, V, 12, 0.3))
    (dec,) = fast_sampler._KEPT.values()
    assert not any(g is not None for g in dec.graphs.values())
    fast_sampler.release()
    same = (ref.response_ids == got.response_ids).all(1).float().mean().item()
    assert same >= 0.9, same
