"""`--rollout-batch-size 0` (auto): how many prompts are sampled together."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from minillm_cli.engine.rollout_batch import (ROLLOUT_SHARE, cache_length, kv_bytes_per_token, rollout_batch_size,
                                              rows_that_fit)

GiB = 2 ** 30


def _config_only(**cfg):
    return SimpleNamespace(config=SimpleNamespace(**cfg))


def test_kv_bytes_per_token_from_the_config():
    """gpt2-xl + gpt2 in bf16: 344,064 bytes per cached token for the pair (the figure
    ../shared/reference/PERFORMANCE.md's limit is computed from); grouped-query attention counts
    the key/value heads; an explicit head_dim wins over hidden / heads; a float32 cache doubles it."""
    from transformers import GPT2Config, LlamaConfig

    xl = _config_only(**{k: getattr(GPT2Config(n_layer=48, n_embd=1600, n_head=25), k)
                         for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")})
    small = SimpleNamespace(config=GPT2Config(n_layer=12, n_embd=768, n_head=12))
    assert kv_bytes_per_token(xl, torch.bfloat16) + kv_bytes_per_token(small, torch.bfloat16) == 344_064
    assert kv_bytes_per_token(small, torch.float32) == 2 * 36_864
    llama = SimpleNamespace(config=LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                                               num_key_value_heads=2, head_dim=48))
    assert kv_bytes_per_token(llama, torch.bfloat16) == 2 * 4 * 2 * 48 * 2
    assert kv_bytes_per_token(_config_only(hidden_size=8), torch.bfloat16) is None  # unknown: no guess


def _gpt2(device="cpu", vocab=100, n_layer=2, n_embd=32, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device(device):
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab, n_positions=256,
                                          bos_token_id=1, eos_token_id=1, pad_token_id=0)).to(dtype).eval()


def _llama(vocab=100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=256, bos_token_id=1, eos_token_id=1,
                                        pad_token_id=0)).eval()


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_the_estimate_bounds_what_the_sampler_allocates(amp):
    """The fast sampler's caches for a float32 GPT-2 teacher and a float32 Llama student (grouped
    KV heads; under autocast its keys stay float32 after the rotary embedding): exactly
    cache_length positions per row with graph-style prompt buckets, and never more bytes than
    rows_that_fit counts for them (equal without autocast)."""
    import contextlib

    from minillm_cli.engine import fast_sampler
    from minillm_cli.engine.sampler import SamplingParams

    student, teacher = _llama(), _gpt2()
    B, P0, T = 3, 70, 9
    ids = torch.randint(2, 100, (B, P0))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    ctx = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    try:
        with ctx:
            fast_sampler.fast_sample(student, teacher, ids, mask, params=SamplingParams(max_new_tokens=T), alpha=0.3,
                                     eos_id=1, pad_id=0, generators=[torch.Generator().manual_seed(i) for i in range(B)],
                                     vocab_size=100, engine="static", prompt_bucket=64, keep=True)
        (dec,) = fast_sampler._KEPT.values()
        tensors = [t for m in dec.models.values() for layer in m.cache.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor) and t.ndim == 4]
        assert tensors and {t.shape[0] for t in tensors} == {B}
        assert {t.shape[-2] for t in tensors} == {cache_length(P0, T)}
        used = sum(t.numel() * t.element_size() for t in tensors)
    finally:
        fast_sampler.release()
    counted = B * cache_length(P0, T) * (kv_bytes_per_token(student, None) + kv_bytes_per_token(teacher, None))
    assert used == counted if amp is None else counted / 2 <= used <= counted


def test_cache_length_examples():
    assert cache_length(256, 256) == 512
    assert cache_length(100, 10) == 144  # prompt padded to 128, + 10, rounded up to 16
    assert cache_length(1, 1) == 80


def test_the_choice():
    """Explicit sizes are kept; --whiten and FSDP keep --batch-size (the result, resp. the
    collectives' count, depends on the batch); an unknown fit keeps --batch-size; otherwise as
    many as fit, up to this process's share, in near-equal micro-batches, never fewer than
    --batch-size."""
    kw = dict(batch_size=8, rollouts=256, processes=1, whiten=False)
    assert rollout_batch_size(5, **kw, fit=1000) == (5, None)
    rows, why = rollout_batch_size(0, **{**kw, "whiten": True}, fit=1000)
    assert rows == 8 and "--whiten" in why
    rows, why = rollout_batch_size(0, **kw, fit=1000, sharded=True)
    assert rows == 8 and "--fsdp" in why
    rows, why = rollout_batch_size(0, **kw, fit=None)
    assert rows == 8 and "unknown" in why
    rows, why = rollout_batch_size(0, **kw, fit=1000)
    assert rows == 256 and "256 at a time (1000 would fit" in why and "--rollout-batch-size" in why
    assert rollout_batch_size(0, **kw, fit=195)[0] == 128  # two equal batches, not 195 + 61
    assert rollout_batch_size(0, **kw, fit=56)[0] == 52  # five: 4 x 52 + 48
    rows, why = rollout_batch_size(0, **kw, fit=3)
    assert rows == 8 and "the least auto takes; about 3 fit" in why  # below --batch-size: the old default
    # a mini-batch in micro-batches (distill's default: 64 in 8 of 8): the micro-batch is what memory
    # was sized for, the least auto takes; --whiten keeps the whole --batch-size (its grouping)
    big = {**kw, "batch_size": 64, "micro_batch": 8}
    assert rollout_batch_size(0, **big, fit=3)[0] == 8 and rollout_batch_size(0, **big, fit=None)[0] == 8
    assert rollout_batch_size(0, **big, fit=1000, sharded=True)[0] == 8
    assert rollout_batch_size(0, **{**big, "whiten": True}, fit=1000)[0] == 64
    assert rollout_batch_size(0, **{**kw, "processes": 2}, fit=1000)[0] == 128  # each process's share
    assert rollout_batch_size(0, **{**kw, "processes": 3}, fit=50)[0] == 43  # ceil(256 / 3) = 86 in two
    assert rollout_batch_size(0, **{**kw, "rollouts": 4}, fit=1000)[0] == 4
    assert rollout_batch_size(0, **{**kw, "rollouts": 4, "batch_size": 8}, fit=0)[0] == 4


def test_rows_that_fit_counts_each_model_on_its_own_device(monkeypatch):
    """On the rollout device: both KV caches (in the weights' dtype) and the step's vocabulary
    buffers against the free memory given; a model elsewhere (--teacher-device) against what is
    free there; unknown anywhere: no decision."""
    from minillm_cli.engine import rollout_batch

    student, teacher = _gpt2(), _gpt2(dtype=torch.bfloat16)
    per_token = 2 * 2 * 32 * 4  # float32
    row = 64 * per_token + 64 * per_token // 2 + 8 * 100 * 4
    cpu = torch.device("cpu")
    kw = dict(device=cpu, cache_len=64, vocab_size=100)
    assert rows_that_fit((student, teacher), **kw, free_bytes=int(1000 * row / ROLLOUT_SHARE)) == 1000
    assert rows_that_fit((student, None), **kw, free_bytes=10 ** 6) == \
        int(ROLLOUT_SHARE * 10 ** 6 // (64 * per_token + 3200))
    assert rows_that_fit((student, teacher), **kw, free_bytes=None) is None
    elsewhere = _gpt2("meta")
    assert rows_that_fit((student, elsewhere), **kw, free_bytes=10 ** 9) is None  # (meta: free unknown)
    monkeypatch.setattr(rollout_batch, "free_memory_bytes", lambda d: 10 ** 6 if d.type == "meta" else None)
    there = int(ROLLOUT_SHARE * 10 ** 6 // (64 * per_token))
    assert rows_that_fit((student, elsewhere), **kw, free_bytes=10 ** 9) == there  # the smaller side decides
    assert rows_that_fit((student, elsewhere), **kw, free_bytes=10 ** 4) == int(ROLLOUT_SHARE * 10 ** 4 // (64 * per_token + 3200))


def test_memory_held_by_the_time_later_rollouts_run():
    """AdamW's two states per trainable parameter, 2 bytes per float32 parameter (the sampler's
    half-precision copies) and a padded copy of each LM head, for the models on the device."""
    from minillm_cli.engine.rollout_batch import held_while_sampling

    student, teacher = _gpt2(), _gpt2(dtype=torch.bfloat16, n_embd=64)
    n_s = sum(p.numel() for p in student.parameters())
    head_s, head_t = 100 * 32, 100 * 64
    cpu = torch.device("cpu")
    assert held_while_sampling(student, (student, teacher), cpu) == 2 * 4 * n_s + 2 * n_s + 2 * head_s + 2 * head_t
    for p in student.transformer.h.parameters():
        p.requires_grad_(False)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert held_while_sampling(student, (student, _gpt2("meta")), cpu) == 2 * 4 * n_train + 2 * n_s + 2 * head_s


def test_least_over_processes():
    from minillm_cli.engine.runtime import Runtime

    class Two(Runtime):  # another process measured `other`
        other = 0

        def max_scalar(self, x):
            return max(x, -float(-1 if self.other is None else self.other))

    rt = Two(torch.device("cpu"), rank=0, world_size=2)
    rt.other = 50
    assert rt.least(80) == 50 and rt.least(20) == 20 and rt.least(None) is None
    rt.other = None
    assert rt.least(80) is None
    assert Runtime(torch.device("cpu")).least(7) == 7 and Runtime(torch.device("cpu")).least(None) is None


@pytest.mark.parametrize("whiten", [False, True])
def test_scoring_in_row_chunks_is_scoring_at_once(whiten, monkeypatch):
    """score_rollouts(rows_per_forward=k) -- what distill does under a large rollout batch -- gives
    the same buffer as one forward per model: per-row log-probs (each chunk's forward starts at its
    own first prompt column), kept teacher logits, and advantages whitened over the whole batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minillm_cli.engine.minillm import MiniLLMOptions, score_rollouts
    from minillm_cli.engine.sampler import SamplingParams, sample

    torch.manual_seed(0)
    V = 40

    def gpt2(n_embd):
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=V, n_positions=64,
                                          bos_token_id=1, eos_token_id=1, pad_token_id=0)).double().eval()

    student, teacher = gpt2(16), gpt2(24)
    lengths = [3, 9, 1, 5, 12, 2, 7]  # rows 0-2 of a chunk of 3 start later than the batch's longest prompt
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(2, V, (n,))
        att[i, -n:] = 1
    roll = sample(student, teacher, ids, att, params=SamplingParams(max_new_tokens=12), alpha=0.3, eos_id=1, pad_id=0,
                  generators=[torch.Generator().manual_seed(i) for i in range(len(lengths))], vocab_size=V)
    ends = roll.response_mask.sum(1).tolist()
    assert len(set(ends)) > 2 and max(ends) == 12, ends  # responses of several lengths: chunks are cut on the right
    opts = MiniLLMOptions(whiten=whiten, cache_teacher_logits=True)
    whole = score_rollouts(student, teacher, roll, opts, V)
    valid = roll.response_mask.bool()
    from minillm_cli.engine import minillm

    widths, real = [], minillm.response_logits
    monkeypatch.setattr(minillm, "response_logits",
                        lambda m, i, a, t, *pad: widths.append(i.shape[1]) or real(m, i, a, t, *pad))
    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 1)
    score_rollouts(student, teacher, roll, opts, V, rows_per_forward=1)
    assert widths == [n + e for n, e in zip(lengths, ends)] * 2  # each row's own prompt and response only
    widths.clear()
    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 8)  # ... widened on the left to a multiple of 8 where it can
    score_rollouts(student, teacher, roll, opts, V, rows_per_forward=1)
    assert widths == [min(-(-(n + e) // 8) * 8, max(lengths) + e) for n, e in zip(lengths, ends)] * 2
    for k in (1, 3):
        part = score_rollouts(student, teacher, roll, opts, V, rows_per_forward=k)
        for name in ("old_logp", "teacher_logp", "rewards", "advantages", "pg_weights"):
            torch.testing.assert_close(getattr(part, name), getattr(whole, name), rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(part.teacher_logits[valid], whole.teacher_logits[valid], rtol=0, atol=1e-10)
        assert torch.equal(part.input_ids, whole.input_ids) and torch.equal(part.response_mask, whole.response_mask)
    assert whole.teacher_logits.shape == (len(lengths), roll.response_ids.shape[1], V)


def test_split_on_out_of_memory():
    """Rows that ran out of device memory together run again in twice as many pieces, which later
    calls keep; the joined result is the rows' own, in order. Not allowed (--whiten, FSDP) or a
    single row: the error is raised."""
    from minillm_cli.engine.rollout_batch import SplitOnOOM

    calls, released, notes = [], [], []

    def work(rows):
        calls.append(len(rows))
        if len(rows) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return [r * 10 for r in rows]

    join = lambda parts: [x for p in parts for x in p]  # noqa: E731
    split = SplitOnOOM(allowed=True, release=lambda: released.append(1), note=notes.append)
    assert split.run(list(range(10)), work, join) == [r * 10 for r in range(10)]
    assert calls == [10, 5, 3, 3, 3, 1] and split.pieces == 4 and len(released) == 2
    assert "with 10 rollouts sampled together: 5 at a time" in notes[0] and "with 5" in notes[1]
    calls.clear()
    assert split.run([7, 8, 9, 10, 11, 12], work, join) == [70, 80, 90, 100, 110, 120]
    assert calls == [2, 2, 2]  # later calls start from the pieces that worked
    with pytest.raises(torch.cuda.OutOfMemoryError):
        SplitOnOOM(allowed=False, release=lambda: None, note=notes.append).run(list(range(5)), work, join)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        SplitOnOOM(allowed=True, release=lambda: None, note=notes.append).run([1], lambda r: work(r * 4), join)


def test_release_frees_the_caches_without_a_garbage_collection():
    """fast_sampler.release() (after every sampling phase, and before a retry after an
    out-of-memory error) must free the static KV caches at once: a reference cycle through the
    cache would keep them until Python's next full collection, on a GPU as device memory."""
    import gc
    import weakref

    from minillm_cli.engine import fast_sampler
    from minillm_cli.engine.sampler import SamplingParams

    student, teacher = _llama(), _gpt2()
    ids = torch.randint(2, 100, (2, 5))
    gc.collect()
    gc.disable()
    try:
        fast_sampler.fast_sample(student, teacher, ids, torch.ones_like(ids), params=SamplingParams(max_new_tokens=4),
                                 alpha=0.3, eos_id=1, pad_id=0, vocab_size=100, engine="static", keep=True,
                                 generators=[torch.Generator().manual_seed(i) for i in range(2)])
        (dec,) = fast_sampler._KEPT.values()
        keys = [weakref.ref(layer.keys) for m in dec.models.values() for layer in m.cache.layers]
        del dec
        fast_sampler._KEPT.clear()  # dropped without a collection: only reference counts free it
        assert keys and all(k() is None for k in keys)
    finally:
        gc.enable()
        fast_sampler.release()


def test_scaling_advice_is_one_that_can_be_followed():
    from minillm_cli.engine.runtime import scaling_warnings

    assert scaling_warnings(2, 8) == [] and scaling_warnings(1, 3) == []
    (line,) = scaling_warnings(4, 2, batch_size=8)
    assert "2 process(es) idle" in line and "set --grad-accum to a multiple of 4" in line
    (line,) = scaling_warnings(3, 8, batch_size=64)  # no divisor of 64 is a multiple of 3
    assert "make --batch-size (64) a multiple of 3" in line
