"""fast_sampler.py: the static-cache engine draws exactly the reference sampler's tokens on CPU
(same uniforms, same mix_and_sample), for teacher-mixed, student-only and teacher-only rollouts,
with left padding, EOS, filters and the n-gram ban; plus the self-check, the fallback, the kept
decoder, and the teacher-logit cache of minillm.score_rollouts."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from conftest import gpt2_numbers
from minillm_cli.data.tokenize import left_pad
from minillm_cli.engine import decode_loop, fast_sampler, static_check, static_model
from minillm_cli.engine.fast_sampler import fast_sample, resolve_engine, self_check
from minillm_cli.engine.fused import FusedGELU
from minillm_cli.engine.sampler import SamplingParams, sample
from minillm_cli.errors import InputError
from torch.utils._python_dispatch import TorchDispatchMode

V, PAD, EOS = 11, 11, 0
PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 2], [5], [1, 2, 3, 4]]


def _gpt2(seed, n_layer=1, attn="sdpa"):
    return gpt2_numbers(seed, vocab=V, pad=PAD, eos=EOS, n_layer=n_layer, attn=attn)


@pytest.fixture(scope="module", autouse=True)
def _release_static_caches():
    yield
    fast_sampler.release()


@pytest.fixture(scope="module")
def models():
    return _gpt2(1, n_layer=2), _gpt2(2)  # student, teacher


def _left_pad(prompts):
    return left_pad(prompts, PAD)


def _args(prompts, seeds, alpha, **kw):
    ids, mask = _left_pad(prompts)
    params = SamplingParams(kw.pop("max_new_tokens", 12), **kw)
    return dict(prompt_ids=ids, prompt_mask=mask, params=params, alpha=alpha, eos_id=EOS,
                pad_id=PAD, generators=[torch.Generator().manual_seed(s) for s in seeds],
                vocab_size=V)


def _both(student, teacher, prompts, seeds, alpha=0.3, fast_kw=None, fallback=False, **kw):
    ref = sample(student, teacher, **_args(prompts, seeds, alpha, **kw))
    with warnings.catch_warnings():  # the static path itself, not its fallback to the reference
        if not fallback:
            warnings.filterwarnings("error", message="fast sampler unavailable")
        got = fast_sample(student, teacher, engine="static", **(fast_kw or {}),
                          **_args(prompts, seeds, alpha, **kw))
    return ref, got


def _assert_same(ref, got):
    assert torch.equal(ref.response_ids, got.response_ids)
    assert torch.equal(ref.response_mask, got.response_mask)
    torch.testing.assert_close(got.mix_logp, ref.mix_logp, rtol=0, atol=1e-5)
    if ref.student_logp is None:
        assert got.student_logp is None
    else:
        torch.testing.assert_close(got.student_logp, ref.student_logp, rtol=0, atol=1e-5)


PROMPTS32 = [PROMPTS[i % 4] for i in range(32)]


@pytest.mark.parametrize("mode", ["mixed", "student", "teacher"])
def test_same_tokens_as_reference_with_padding_and_eos(models, mode):
    student, teacher = models
    s, t, alpha = {"mixed": (student, teacher, 0.3), "student": (student, None, 0.0),
                   "teacher": (None, teacher, 1.0)}[mode]
    ref, got = _both(s, t, PROMPTS32, range(32), alpha, max_new_tokens=20)
    _assert_same(ref, got)
    lengths = ref.lengths
    assert lengths.min() < lengths.max()              # rows finished at different steps
    assert (~ref.response_mask).any()                 # EOS happened and was masked after


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_k=4),
    dict(temperature=1.3, top_p=0.8),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1, max_new_tokens=8),
    dict(no_repeat_ngram_size=3, top_k=6, top_p=0.9, max_new_tokens=25),
    dict(no_repeat_ngram_size=2, ngram_prompt=False),  # (evaluate's under --template chat)
])
def test_same_tokens_with_filters_and_ngram_ban(models, kw):
    student, teacher = models
    kw.setdefault("max_new_tokens", 15)
    ref, got = _both(student, teacher, PROMPTS32, range(100, 132), 0.4, **kw)
    _assert_same(ref, got)


def test_no_eos_runs_all_steps(models):
    student, teacher = models
    ref, got = _both(student, teacher, PROMPTS, [1, 2, 3, 4], 0.2, max_new_tokens=3)
    _assert_same(ref, got)
    ref1, got1 = _both(student, teacher, PROMPTS, [1, 2, 3, 4], 0.2, max_new_tokens=1)
    _assert_same(ref1, got1)


def test_graph_mode_bookkeeping_on_cpu(models):
    """What the CUDA modes change besides the capture: prompts left-padded to a bucket, the host
    checking for 'all finished' only every few steps, a kept decoder reused (static buffers
    refilled in place) -- none of it may change a token."""
    student, teacher = models
    kw = dict(max_new_tokens=20, no_repeat_ngram_size=3)
    ref = sample(student, teacher, **_args(PROMPTS32, range(32), 0.3, **kw))
    fk = dict(engine="static", prompt_bucket=8, check_every=5, keep=True)
    first = fast_sample(student, teacher, **fk, **_args(PROMPTS32, range(32), 0.3, **kw))
    _assert_same(ref, first)
    assert len(fast_sampler._KEPT) == 1
    # same shape, other seeds: the kept decoder is reused and still exact
    ref2 = sample(student, teacher, **_args(PROMPTS32, range(50, 82), 0.3, **kw))
    again = fast_sample(student, teacher, **fk, **_args(PROMPTS32, range(50, 82), 0.3, **kw))
    assert len(fast_sampler._KEPT) == 1
    _assert_same(ref2, again)
    fast_sampler.release()
    assert not fast_sampler._KEPT


def test_eager_attention_models(models):
    student = _gpt2(3, attn="eager")
    teacher = models[1]
    ref, got = _both(student, teacher, PROMPTS32, range(32), 0.5, max_new_tokens=10)
    _assert_same(ref, got)


def test_dispatch_through_sampler_and_engine_resolution(models):
    student, teacher = models
    ref = sample(student, teacher, **_args(PROMPTS, [7, 8, 9, 10], 0.3))
    via = sample(student, teacher, engine="static", **_args(PROMPTS, [7, 8, 9, 10], 0.3))
    _assert_same(ref, via)
    auto = sample(student, teacher, engine="auto", **_args(PROMPTS, [7, 8, 9, 10], 0.3))
    _assert_same(ref, auto)
    assert resolve_engine("auto", "cpu") == "eager"
    assert resolve_engine("graph", "cpu") == "static"
    assert resolve_engine("compile", "cpu") == "static"
    with pytest.raises(InputError):
        resolve_engine("warp", "cpu")


def test_self_check_passes_and_fallback_is_the_reference(models, monkeypatch):
    student, teacher = models
    assert self_check(student, V, "cpu", EOS) is None
    assert self_check(teacher, V, "cpu", EOS) is None
    monkeypatch.setattr(static_model, "SUPPORTED_ATTN", ())
    monkeypatch.setattr(static_check, "_CHECKED", type(static_check._CHECKED)())
    seen = []
    hook = student.transformer.h[0].mlp.register_forward_pre_hook(lambda mod, a: seen.append(type(mod.act).__name__))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref, got = _both(student, teacher, PROMPTS, [1, 2, 3, 4], 0.3, fallback=True)
    hook.remove()
    assert any("fast sampler unavailable" in str(x.message) for x in w)
    _assert_same(ref, got)
    assert set(seen) == {"NewGELUActivation"}  # the fallback ran the model's own modules


def test_an_error_in_the_static_path_falls_back_to_the_reference(models, monkeypatch):
    """An error the static path raises while checking itself (e.g. attention refusing the mask's
    dtype: a teacher on another device under the student's autocast did on a GPU) falls back to
    the reference sampler with a warning instead of stopping the run."""
    student, teacher = models
    monkeypatch.setattr(static_check, "_CHECKED", type(static_check._CHECKED)())

    def refused(self, allow):
        raise RuntimeError("Expected attn_mask dtype to be bool or float or to match query dtype")

    monkeypatch.setattr(static_model.StaticModel, "mask", refused)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref, got = _both(student, teacher, PROMPTS, [1, 2, 3, 4], 0.3, fallback=True)
    assert any("fast sampler unavailable" in str(x.message) and "attn_mask dtype" in str(x.message) for x in w)
    _assert_same(ref, got)


def test_mask_dtype_follows_where_each_model_runs(models, monkeypatch):
    """The additive mask is in the dtype attention runs in: autocast's on the device the model's
    weights are on, else the weights' dtype. A teacher behind TeacherOnDevice on another device
    runs outside the sampling device's autocast: its mask must not take that autocast's dtype."""
    from minillm_cli.engine.teacher import TeacherOnDevice

    student, teacher = models
    elsewhere = torch.device("meta")  # stands for the teacher's own device (one CPU here)
    autocast_on = {torch.device("cpu"): torch.bfloat16}  # the sampling device's autocast
    monkeypatch.setattr(static_model, "autocast_dtype", lambda device: autocast_on.get(torch.device(device)))
    wrapped = TeacherOnDevice(teacher, torch.device("cpu"))
    monkeypatch.setattr(static_model, "param_device", lambda m: elsewhere if m is wrapped else torch.device("cpu"))
    assert fast_sampler.make_model(wrapped, V, 2, 16, "cpu").mask_dtype == torch.float32
    assert fast_sampler.make_model(student, V, 2, 16, "cpu").mask_dtype == torch.bfloat16
    monkeypatch.setattr(static_model, "autocast_dtype", lambda device: None)
    sm = fast_sampler.make_model(student.to(torch.float64), V, 2, 16, "cpu")
    student.float()
    allow = torch.tensor([[True, False]])
    assert sm.mask(allow).dtype == torch.float64 and sm.mask(allow)[0, 1] == torch.finfo(torch.float64).min


def test_models_restored_to_their_mode(models):
    student, teacher = models
    student.train()
    try:
        fast_sample(student, teacher, engine="static", **_args(PROMPTS, [1, 2, 3, 4], 0.3))
        assert student.training and not teacher.training
    finally:
        student.eval()


# -- teacher logits kept once per rollout batch (engine/minillm.py, opts.cache_teacher_logits) --

class _Forbidden(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the teacher must not run in the update when its logits are cached")


def test_cached_teacher_logits_give_the_same_loss_and_gradient(models):
    from minillm_cli.engine.minillm import MiniLLMOptions, minillm_loss, score_rollouts

    student, teacher = models
    roll = sample(student, teacher, **_args(PROMPTS32[:8], range(8), 0.3, max_new_tokens=10))
    results = []
    for cache in (False, True):
        opts = MiniLLMOptions(cache_teacher_logits=cache, chunk_size=4)
        batch = score_rollouts(student, teacher, roll, opts, V)
        assert (batch.teacher_logits is not None) == cache
        micro = batch.select([5, 1, 2])
        student.zero_grad()
        loss, stats = minillm_loss(student, _Forbidden() if cache else teacher, micro, opts,
                                   normalizer=17.0, vocab_size=V)
        loss.backward()
        results.append((float(loss.detach()), stats["single_step"],
                        [p.grad.clone() for p in student.parameters()]))
    student.zero_grad()
    (l0, ss0, g0), (l1, ss1, g1) = results
    assert ss0 != 0.0
    assert abs(l0 - l1) < 1e-5 and abs(ss0 - ss1) < 1e-5
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_under_autocast_a_float32_student_decodes_without_autocasts_weight_cache(models):
    """The product's GPU path: float32 master weights sampled under bf16 autocast. The decode step
    (what a CUDA graph captures) must cast the weights itself: a graph captured over autocast's
    cached copies reads freed memory once the autocast region exits (NaN losses on an H200,
    2026-11-28). The prefill may use the cache; every decode-step forward must not. The static
    engine still draws the eager sampler's tokens under autocast, and passes its self-check."""
    student, teacher = models
    seen = []
    hook = student.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["input_ids"].shape[1], torch.is_autocast_cache_enabled())),
        with_kwargs=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.filterwarnings("error", message="fast sampler unavailable")
            ref = sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=10))
            assert self_check(student, V, "cpu", EOS) is None and self_check(teacher, V, "cpu", EOS) is None
            seen.clear()
            got = fast_sample(student, teacher, engine="static", keep=False,
                              **_args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=10))
    finally:
        hook.remove()
    decode = [cached for q, cached in seen if q == 1]
    assert len(decode) >= 9 and not any(decode), seen
    assert any(cached for q, cached in seen if q > 1)  # the prefill keeps autocast's cache
    assert torch.equal(ref.response_ids, got.response_ids)
    torch.testing.assert_close(got.mix_logp, ref.mix_logp, rtol=0, atol=2e-2)


def test_gelu_new_runs_fused_while_sampling_and_is_put_back(models):
    """GPT-2's composed `gelu_new` is swapped for torch's one-kernel tanh GELU (the same function)
    only while the fast sampler runs; the model's own modules are back afterwards, also after a
    fallback, and the tokens are still the reference's."""
    student, teacher = models
    acts = lambda m: [type(x).__name__ for x in m.modules() if "GELU" in type(x).__name__]  # noqa: E731
    assert set(acts(student)) == {"NewGELUActivation"}
    seen = []
    hook = student.transformer.h[0].mlp.register_forward_pre_hook(lambda mod, a: seen.append(type(mod.act).__name__))
    try:
        ref, got = _both(student, teacher, PROMPTS, [5, 6, 7, 8], fast_kw={"keep": False})
    finally:
        hook.remove()
    assert "FusedGELU" in seen and "NewGELUActivation" in seen  # fast path fused, reference not
    _assert_same(ref, got)
    assert set(acts(student)) == set(acts(teacher)) == {"NewGELUActivation"}
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(FusedGELU()(x), student.transformer.h[0].mlp.act(x), rtol=0, atol=1e-12)


def _broken_compiler(monkeypatch) -> list:
    """The compile engine with a compiler that fails when the compiled forward is first called
    (as torch 2.11's inductor did at gpt2-xl shapes); returns the list of those calls."""
    calls = []

    def broken_compile_decode(self, backend="inductor"):
        def compiled(*args):
            calls.append(1)
            raise RuntimeError("inductor failed")
        self.decode = compiled

    monkeypatch.setattr(fast_sampler, "resolve_engine", lambda engine, device: "compile")
    monkeypatch.setattr(static_model.StaticModel, "compile_decode", broken_compile_decode)
    return calls


def test_failed_capture_of_a_compiled_step_decodes_eagerly(models, monkeypatch):
    """When the compiler fails inside capture (torch 2.11's inductor did at gpt2-xl shapes on an
    H200), the engine warns and decodes with the plain step: it must not call the failing
    compiler again on every step (it did: the run then hung in recompilation)."""
    student, teacher = models
    calls = _broken_compiler(monkeypatch)

    def capture(self, kv_len=None):  # what capture does first on a GPU: a warm-up step (undone) through the compiled step
        snap = self._snapshot()
        try:
            self.step(kv_len)
        finally:
            self._restore(snap)

    monkeypatch.setattr(decode_loop.Decoder, "capture", capture)
    monkeypatch.setattr(fast_sampler, "_COMPILE_FAILED", [])
    ref = sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fast_sample(student, teacher, engine="compile", keep=False, check_every=1,
                          **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    assert any("CUDA graph capture failed" in str(x.message) for x in w)
    assert len(calls) == 1
    _assert_same(ref, got)
    # a new decoder (another shape, or after release()) does not try the failing compiler again
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fast_sample(student, teacher, engine="compile", keep=False, check_every=1,
                          **_args(PROMPTS[:3], [1, 2, 3], 0.3))
    assert len(calls) == 1 and not w
    _assert_same(sample(student, teacher, **_args(PROMPTS[:3], [1, 2, 3], 0.3)), got)


def test_compile_engine_compiles_the_model_forwards_only(models, monkeypatch):
    """`compile`: each model's decode forward goes through torch.compile (here its "eager" backend:
    dynamo traces the forward over the static cache, without inductor's compile time); the prefill
    and the sampling stay eager, and the tokens are the reference's."""
    from torch._dynamo.utils import counters

    student, teacher = models
    real_compile = decode_loop.Decoder.compile
    traced = []
    monkeypatch.setattr(fast_sampler, "resolve_engine", lambda engine, device: "compile")
    monkeypatch.setattr(decode_loop.Decoder, "compile", lambda self: real_compile(self, backend="eager"))
    monkeypatch.setattr(decode_loop.Decoder, "capture", lambda self, kv_len=None: None)  # no CUDA here
    monkeypatch.setattr(static_model.StaticModel, "forward", _recording(static_model.StaticModel.forward, traced))
    torch._dynamo.reset()
    counters.clear()
    ref = sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    got = fast_sample(student, teacher, engine="compile", keep=False, check_every=1, **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    _assert_same(ref, got)
    assert counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's decode forward
    assert {q for q, compiling in traced if compiling} == {1}  # decode steps only
    assert any(q > 1 and not compiling for q, compiling in traced)  # the prefill ran eagerly
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compile_mode_reaches_torch_compile_and_modes_with_their_own_graphs_are_refused(models, monkeypatch, mode):
    """fast_sampler.COMPILE_MODE is handed to torch.compile (inductor); "reduce-overhead" would
    capture CUDA graphs inside the step we capture ourselves, so it is refused."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    monkeypatch.setattr(fast_sampler, "COMPILE_MODE", mode)
    sm = fast_sampler.make_model(models[0], V, 2, 16, "cpu")
    if mode == "reduce-overhead":
        with pytest.raises(InputError, match="compile mode"):
            sm.compile_decode()
        assert not seen
        return
    sm.compile_decode()
    assert seen == [{"backend": "inductor", "dynamic": False, **({"mode": mode} if mode else {})}]
    sm.compile_decode(backend="eager")  # (tests' backend: no mode)
    assert seen[-1] == {"backend": "eager", "dynamic": False}


def _recording(forward, seen):
    def wrapped(self, ids, *args):
        seen.append((ids.shape[1], torch.compiler.is_compiling()))
        return forward(self, ids, *args)
    return wrapped


def _fake_capture(monkeypatch) -> list:
    """The graph engine on the CPU: `capture` runs what it runs before recording on a GPU (two
    warm-up steps, undone) and records no graph, so the steps then run eagerly; returns the list
    of the buckets (kv_len) captured."""
    seen = []

    def capture(self, kv_len=None):
        snap = self._snapshot()
        try:
            for _ in range(2):
                self.step(kv_len)
        finally:
            self._restore(snap)
        seen.append(kv_len)

    monkeypatch.setattr(fast_sampler, "resolve_engine", lambda engine, device: "graph")
    monkeypatch.setattr(decode_loop.Decoder, "capture", capture)
    return seen


@pytest.mark.parametrize("T", [1, 2, 3])
def test_capture_warm_up_stays_inside_the_buffers(models, monkeypatch, T):
    """A captured engine's warm-up steps (what `capture` runs before recording, here on the CPU)
    must stay inside the [B, T] buffers: with T = 2 the second warm-up step indexed column 2 (a
    device-side assert on CUDA). Short rollouts decode without a graph instead."""
    student, teacher = models
    captured = _fake_capture(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "capture failed", no fallback
        got = fast_sample(student, teacher, engine="graph", keep=False, check_every=1,
                          **_args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=T))
    assert len(captured) == (T > 2)
    _assert_same(sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=T)), got)


class _FakeStreams:
    """Stands in for torch.cuda's stream calls on the CPU: records which stream is current when
    each model decodes, and the order of the fork / join waits."""

    def __init__(self):
        self.current, self.events = "main", []

    def stream_obj(self, name):
        fake = self

        class S:
            def wait_stream(self, other):
                fake.events.append(f"{name} waits {other.name}")
        s = S()
        s.name = name
        return s


def test_parallel_decode_runs_the_student_on_the_side_stream_between_fork_and_join(models, monkeypatch):
    """fast_sampler.PARALLEL_MODELS (CUDA only; tests/gpu compares its bits on a GPU): the logic
    on the CPU with the stream calls faked -- the student decodes on the side stream after the
    fork, the teacher on the current one, the join comes before sampling, and each model's
    logits go where they belong (the same tokens as one stream)."""
    import contextlib

    student, teacher = models
    kw = dict(max_new_tokens=12)
    ref = fast_sample(student, teacher, engine="static", keep=True, **_args(PROMPTS, [1, 2, 3, 4], 0.3, **kw))
    (dec,) = fast_sampler._KEPT.values()
    assert dec.side is None  # off by default, and never off CUDA
    fake = _FakeStreams()
    main, side = fake.stream_obj("main"), fake.stream_obj("side")
    dec.side = side

    @contextlib.contextmanager
    def on(stream):
        before, fake.current = fake.current, stream.name
        try:
            yield
        finally:
            fake.current = before

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    for name, m in dec.models.items():
        def decode(*a, _m=m, _name=name):
            fake.events.append(f"{_name} on {fake.current}")
            return type(_m).decode(_m, *a)
        monkeypatch.setattr(m, "decode", decode, raising=False)
    got = fast_sample(student, teacher, engine="static", keep=True, **_args(PROMPTS, [1, 2, 3, 4], 0.3, **kw))
    fast_sampler.release()
    _assert_same(ref, got)
    steps = got.response_ids.shape[1] - 1
    assert fake.events == ["side waits main", "student on side", "teacher on main", "main waits side"] * steps


@pytest.mark.parametrize("switch,value", [("KV_BUCKETS", 2), ("SAMPLING_WEIGHTS", False),
                                          ("DECODE_MATMUL", "cublas")])
def test_a_switch_set_between_calls_is_not_served_by_the_kept_decoder(models, monkeypatch, switch, value):
    """The switches are read when a decoder is built (engine/static_model.py, decode_loop.py take
    them as arguments): a benchmark's variant set after a kept decoder of the same shape gets a
    decoder built with it, not the kept one."""
    student, teacher = models
    args = lambda: _args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=8)  # noqa: E731
    ref = fast_sample(student, teacher, engine="static", keep=True, **args())
    (first,) = fast_sampler._KEPT.values()
    assert fast_sample(student, teacher, engine="static", keep=True, **args()).response_ids.equal(ref.response_ids)
    assert list(fast_sampler._KEPT.values()) == [first]  # same switches: kept
    monkeypatch.setattr(fast_sampler, switch, value)
    got = fast_sample(student, teacher, engine="static", keep=True, **args())
    (second,) = fast_sampler._KEPT.values()
    fast_sampler.release()
    assert second is not first
    if switch == "KV_BUCKETS":
        assert first.width is None and second.width == 16
    if switch == "SAMPLING_WEIGHTS":
        assert all(m.switches.weight_copies is False for m in second.models.values())
    _assert_same(ref, got)


# -- the sampler's own cache writes and prefix attention (engine/static_cache.py) ---------------

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.key_lens = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.append(name)
        if "scaled_dot_product" in name:
            self.key_lens.append(args[1].shape[-2])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("owned", [True, False])
def test_a_decode_step_writes_the_cache_without_per_layer_bookkeeping(models, monkeypatch, owned):
    """With the writes taken over, a layer's cache update is its two index_copy_ calls: no
    arange / add / add_ on StaticLayer's position counter (3 kernels a layer on a GPU)."""
    from minillm_cli.engine import static_cache

    if not owned:
        monkeypatch.setattr(static_model, "own_writes", lambda cache: None)
    student, teacher = models
    n_layers = student.config.n_layer + teacher.config.n_layer
    fast_sample(student, teacher, engine="static", keep=True, **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    (dec,) = fast_sampler._KEPT.values()
    assert all((m.writes is not None) == owned for m in dec.models.values())
    if owned:
        assert all(isinstance(m.cache.update.__self__, static_cache.CacheWrites) for m in dec.models.values())
    with torch.no_grad(), _Ops() as rec:
        dec.step()
    fast_sampler.release()
    assert rec.ops.count("aten.index_copy_") >= 2 * n_layers
    arange_adds = rec.ops.count("aten.arange") + rec.ops.count("aten.add_")
    if owned:
        assert arange_adds <= 2  # the decoder's own step counter and the like, not per layer
    else:
        assert arange_adds >= 2 * n_layers


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_bucketed_attention_reads_the_used_prefix_and_draws_the_same_tokens(models, monkeypatch, alpha):
    """KV_BUCKETS: each step attends over the cache columns up to its bucket's end (at least the
    prompt and the tokens so far); the tokens are the reference's, with padding, EOS and an
    n-gram ban, and again from a kept decoder."""
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", 3)
    student, teacher = models
    s, t = {0.0: (student, None), 0.3: (student, teacher), 1.0: (None, teacher)}[alpha]
    kw = dict(max_new_tokens=40, no_repeat_ngram_size=3)
    ref = sample(s, t, **_args(PROMPTS, [5, 6, 7, 8], alpha, **kw))
    got = fast_sample(s, t, engine="static", keep=True, **_args(PROMPTS, [5, 6, 7, 8], alpha, **kw))
    _assert_same(ref, got)
    (dec,) = fast_sampler._KEPT.values()
    assert (dec.P, dec.T, dec.L, dec.width) == (6, 40, 48, 16)  # ceil(40 / 3) = 14 -> 16 columns
    steps = got.response_ids.shape[1] - 1
    assert steps > 16  # the rollout reached the second bucket at least
    layers = sum(m.model.config.n_layer for m in dec.models.values())
    with _Ops() as rec:  # the same call again: the kept decoder, step by step
        again = fast_sample(s, t, engine="static", keep=True, **_args(PROMPTS, [5, 6, 7, 8], alpha, **kw))
    _assert_same(ref, again)
    prefill, decode = rec.key_lens[:layers], rec.key_lens[layers:]
    assert prefill == [48] * layers
    want = [min(48, 6 + -(-k // 16) * 16) for k in range(1, steps + 1)]  # 22, then 38, then 48
    assert decode == [n for n in want for _ in range(layers)]
    assert all(n >= 6 + k for k, n in enumerate(want, 1))  # never short of the used columns
    fast_sampler.release()


@pytest.mark.parametrize("T,captures", [(40, [80, 96, 112]), (18, [80])])
def test_each_bucket_is_captured_once_when_first_reached(models, monkeypatch, T, captures):
    """graph / compile engines with KV_BUCKETS: a bucket's step is captured (here: capture's
    warm-up, on the CPU) at the first step that needs it, once per kept decoder; a bucket first
    reached at the last step runs eagerly (capture's warm-up would write past the buffers)."""
    student, teacher = models
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", 3)
    seen = _fake_capture(monkeypatch)
    kw = dict(max_new_tokens=T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "capture failed", no fallback
        got = fast_sample(student, teacher, engine="graph", keep=True, check_every=1000,
                          **_args(PROMPTS, [1, 2, 3, 4], 0.3, **kw))
        (dec,) = fast_sampler._KEPT.values()
        assert (dec.P, dec.width, dec.L) == (64, 16, -(-(64 + T) // 16) * 16)
        assert seen == captures
        again = fast_sample(student, teacher, engine="graph", keep=True, check_every=1000,
                            **_args(PROMPTS, [1, 2, 3, 4], 0.3, **kw))
    assert seen == captures  # the kept decoder captures nothing again
    fast_sampler.release()
    ref = sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3, **kw))
    _assert_same(ref, got)
    _assert_same(ref, again)


class _FakeCuda:
    """torch.cuda's stream and graph calls faked on the CPU, so `Decoder.capture` and `run_step`
    run as on a GPU: capture records (does not run) the step, replay runs the recorded bucket's
    step. Records the captures (kv_len, pool passed) and every replay's kv_len."""

    def __init__(self, monkeypatch):
        self.captures, self.replays, self.recording = [], [], None
        fake = self

        class Stream:
            def __init__(self, *a, **k):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                self.kv_len, self.dec = "unset", None

            def pool(self):
                return ("pool", id(fake))

            def replay(self):
                fake.replays.append(self.kv_len)
                real_step(self.dec, self.kv_len)

        @contextlib.contextmanager
        def graph(g, pool=None):
            fake.recording = g
            try:
                yield
            finally:
                fake.recording = None
                fake.captures.append((g.kv_len, pool))

        real_step = decode_loop.Decoder.step

        def step(dec, kv_len=None):
            if fake.recording is not None:  # capture records the launches without running them
                fake.recording.kv_len, fake.recording.dec = kv_len, dec
                return
            real_step(dec, kv_len)

        for name, value in (("Stream", Stream), ("current_stream", lambda *a: Stream()),
                            ("stream", lambda s: contextlib.nullcontext()), ("synchronize", lambda *a: None),
                            ("CUDAGraph", Graph), ("graph", graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(decode_loop.Decoder, "step", step)
        monkeypatch.setattr(fast_sampler, "resolve_engine", lambda engine, device: "graph")


@pytest.mark.parametrize("owned", [True, False])
def test_capture_and_replay_per_bucket_with_cuda_faked(models, monkeypatch, owned):
    """The real capture / run_step code with torch.cuda's calls faked: one graph per bucket,
    captured at its first step and restored after (the warm-up steps undone, the caches rewound
    where transformers keeps the write position), later graphs in the first one's memory pool,
    each step replaying its own bucket's graph (a bucket first reached at the last step runs
    eagerly); the reference's tokens, again from the kept decoder."""
    if not owned:  # transformers' own cache update: its position counter must be rewound
        monkeypatch.setattr(static_model, "own_writes", lambda cache: None)
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", 3 if owned else 1)
    fast_sampler.release()
    cuda = _FakeCuda(monkeypatch)
    student, teacher = models
    kw = dict(max_new_tokens=34, no_repeat_ngram_size=2)
    ref = sample(student, teacher, **_args(PROMPTS, [3, 4, 5, 6], 0.3, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no failed capture
        got = fast_sample(student, teacher, engine="graph", keep=True, check_every=1000,
                          **_args(PROMPTS, [3, 4, 5, 6], 0.3, **kw))
        (dec,) = fast_sampler._KEPT.values()
        steps = 33  # every step runs (check_every: no early stop), whatever the response width
        want = [dec.kv_len(s) for s in range(1, steps + 1)]
        if owned:  # buckets of 16 columns after P = 64: 80, 96, and 112 (the cache's end) at s = 33
            assert dec.width == 16 and want == [80] * 16 + [96] * 16 + [112]
            assert [c[0] for c in cuda.captures] == [80, 96]
            assert cuda.replays == want[:32]  # step 33 is the last: its bucket runs eagerly
        else:
            assert [c[0] for c in cuda.captures] == [None] and cuda.replays == [None] * steps
        assert cuda.captures[0][1] is None and all(p == ("pool", id(cuda)) for _, p in cuda.captures[1:])
        _assert_same(ref, got)
        n_captures = len(cuda.captures)
        again = fast_sample(student, teacher, engine="graph", keep=True, check_every=1000,
                            **_args(PROMPTS, [3, 4, 5, 6], 0.3, **kw))
    assert len(cuda.captures) == n_captures
    fast_sampler.release()
    _assert_same(ref, again)


def test_sliding_window_layers_keep_their_own_cache_update(models, monkeypatch):
    """A sliding-window model's static cache (StaticSlidingWindowLayer) is not written by the
    sampler and gets no prefix views (its layers keep transformers' update): with a window
    covering the rollout it samples the reference's tokens on the static path (KV_BUCKETS on,
    then used by nobody); with a shorter window the static path is refused up front and the
    reference sampler runs (it raised mid-rollout: the step's mask did not fit the rolling cache)."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(window):
        torch.manual_seed(0)
        cfg = MistralConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=V + 1, max_position_embeddings=128,
                            sliding_window=window, initializer_range=0.4, bos_token_id=EOS, eos_token_id=EOS,
                            pad_token_id=PAD)
        cfg._attn_implementation = "sdpa"
        return MistralForCausalLM(cfg).eval()

    student, _ = models
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", 3)
    ref, got = _both(student, mistral(64), PROMPTS, [1, 2, 3, 4], 0.4, fast_kw=dict(keep=True), max_new_tokens=12)
    _assert_same(ref, got)
    (dec,) = fast_sampler._KEPT.values()
    assert dec.models["teacher"].writes is None and dec.models["student"].writes is not None
    assert dec.width is None  # prefix views need every model's cache written by the sampler
    fast_sampler.release()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref, got = _both(student, mistral(16), PROMPTS, [1, 2, 3, 4], 0.4, fallback=True, max_new_tokens=12)
    assert any("sliding-window cache of 16 positions" in str(x.message) for x in w)
    _assert_same(ref, got)


def test_compile_engine_short_rollouts_and_a_compiler_failure_in_an_eager_step(models, monkeypatch):
    """compile: with T <= 2 nothing is compiled (one decode step at most, run eagerly); a
    compiler failure in a step that runs eagerly through the compiled forwards (a bucket first
    reached at the last step, here: no graph captured) is undone, warned about once, and the
    step runs with the plain forwards."""
    student, teacher = models
    calls = _broken_compiler(monkeypatch)

    monkeypatch.setattr(decode_loop.Decoder, "capture", lambda self, kv_len=None: None)  # no graph
    monkeypatch.setattr(fast_sampler, "_COMPILE_FAILED", [])
    for T in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = fast_sample(student, teacher, engine="compile", keep=False, **_args(PROMPTS, [1, 2, 3, 4], 0.3,
                                                                                     max_new_tokens=T))
        _assert_same(sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3, max_new_tokens=T)), got)
    assert not calls
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fast_sample(student, teacher, engine="compile", keep=False, check_every=1,
                          **_args(PROMPTS, [1, 2, 3, 4], 0.3))
    assert len(calls) == 1 and sum("CUDA graph capture failed" in str(x.message) for x in w) == 1
    _assert_same(sample(student, teacher, **_args(PROMPTS, [1, 2, 3, 4], 0.3)), got)
    assert fast_sampler._COMPILE_FAILED


def test_several_stop_tokens_end_a_row_at_the_first_of_any_in_both_engines(models):
    """eos_id may name several stops (`--template chat`: the template's end of turn, then EOS):
    a row ends at the first of any; the static engine draws the reference's tokens."""
    student, teacher = models
    seeds = list(range(12))
    prompts = [PROMPTS[i % 4] for i in range(12)]
    plain = sample(student, teacher, **_args(prompts, seeds, 0.3, max_new_tokens=16))
    STOP = 5  # a token some rows draw before EOS (or never draw EOS)
    args = _args(prompts, seeds, 0.3, max_new_tokens=16)
    args["eos_id"] = (STOP, EOS)
    ref = sample(student, teacher, **args)
    args = _args(prompts, seeds, 0.3, max_new_tokens=16)
    args["eos_id"] = (STOP, EOS)
    got = fast_sample(student, teacher, engine="static", **args)
    _assert_same(ref, got)
    cut = 0
    for b in range(len(prompts)):
        toks = plain.response_ids[b][plain.response_mask[b]].tolist()
        first = next((i for i, t in enumerate(toks) if t in (STOP, EOS)), None)
        want = toks if first is None else toks[: first + 1]  # (same draws up to the first stop)
        assert ref.response_ids[b][ref.response_mask[b]].tolist() == want, b
        cut += first is not None and toks[first] == STOP and first < len(toks) - 1
    assert cut >= 2  # the extra stop did end rows early
