"""engine/decode_attention.py: the decode step's attention kernel against brute-force float64
attention (run by Triton's interpreter on this CPU; tests/gpu runs it compiled), that it reads no
cache column past the last one written, its dispatch in place of transformers' sdpa attention,
and the fast sampler drawing the reference's tokens through it."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TOY_EOS, TOY_PAD, TOY_V, gpt2_numbers, llama_numbers, toy_sample_args
from minillm_cli.engine import decode_attention as da
from minillm_cli.engine import fast_sampler, static_check
from minillm_cli.engine.fast_sampler import fast_sample
from minillm_cli.engine.sampler import SamplingParams, sample

pytestmark = pytest.mark.skipif(not da.available("cpu"), reason="needs Triton (interpreter mode)")


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch):
    """A kernel failure in one test (recorded process-wide) must not switch it off for the next."""
    monkeypatch.setattr(da, "_BROKEN", [])
    monkeypatch.setattr(da, "_NO_FUSION", [])


def brute(q, k, v, allow, last, scale=None):
    """float64 softmax(q k^T * scale) v over the allowed columns <= last. allow: [B, L] bool."""
    B, H, _, D = q.shape
    g = H // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * (1 / math.sqrt(D) if scale is None else scale)
    ok = allow.clone()
    if last is not None:
        ok[:, last + 1:] = False
    s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)  # [B, 1, H, D]


def _mask(allow, kind):
    if kind is None:
        return None
    if kind == "bool":
        return allow[:, None, None, :]
    return torch.zeros(allow.shape, dtype=kind)[:, None, None, :].masked_fill(
        ~allow[:, None, None, :], torch.finfo(kind).min)


@pytest.mark.parametrize("B,H,Hk,D,L,parts,kind,last", [
    (3, 4, 4, 16, 40, 1, torch.float32, 20),     # one part; a prefix in use
    (2, 4, 2, 24, 130, 4, "bool", 100),          # GQA, D not a power of two, split columns
    (2, 2, 1, 64, 64, 2, None, None),            # no mask, every column; GQA 2:1
    (1, 3, 3, 8, 200, None, torch.bfloat16, 199),  # bf16 additive mask; parts chosen for the device
    (4, 2, 2, 16, 256, 4, torch.float32, 5),     # three of four parts have no column in use
    (2, 2, 2, 16, 200, 3, torch.float32, 150),   # a part count that is not a power of two
])
def test_kernel_matches_brute_force_attention(B, H, Hk, D, L, parts, kind, last):
    g = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    allow = torch.ones(B, L, dtype=torch.bool)
    if kind is not None:
        allow[0, :3] = False  # left padding in the first row
    lc = None if last is None else torch.tensor([last])
    got = da.decode_attention(q, k, v, _mask(allow, kind), lc, parts=parts)
    assert got.shape == (B, 1, H, D) and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), brute(q, k, v, allow, last), rtol=1e-5, atol=1e-5)


def test_columns_past_the_last_written_one_are_never_read():
    """NaN in every column after `last_col` (where SDPA over the whole cache would need the mask
    to hide them: NaN * 0 is NaN): the output is still the attention over the used prefix. The
    cache is a view of a wider one (the strides of a static cache), and the query a transposed
    tensor, as transformers hands them over; the scale is given."""
    g = torch.Generator().manual_seed(0)
    B, H, D, L, last = 2, 2, 16, 96, 37
    cache_k = torch.randn(B, H, L + 32, D, generator=g)
    cache_v = torch.randn(B, H, L + 32, D, generator=g)
    k, v = cache_k[:, :, :L], cache_v[:, :, :L]
    k[:, :, last + 1:] = float("nan")
    v[:, :, last + 1:] = float("nan")
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)
    allow = torch.ones(B, L, dtype=torch.bool)
    allow[1, :4] = False
    for parts in (1, 2):
        got = da.decode_attention(q, k, v, _mask(allow, torch.float32), torch.tensor([last]), 0.3, parts)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), brute(q, k.nan_to_num(), v.nan_to_num(), allow, last, 0.3),
                                   rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_and_bad_shapes():
    """bf16 queries over a float32 cache (a float32 model's cache under bf16 autocast) come out in
    the queries' dtype; shapes the kernel does not serve are refused."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 1, 16, generator=g).bfloat16()
    k, v = torch.randn(2, 2, 32, 16, generator=g), torch.randn(2, 2, 32, 16, generator=g)
    allow = torch.ones(2, 32, dtype=torch.bool)
    got = da.decode_attention(q, k, v, None, torch.tensor([31]))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), brute(q, k, v, allow, 31), rtol=0, atol=2e-2)
    with pytest.raises(ValueError):
        da.decode_attention(torch.randn(2, 2, 3, 16), k, v, None, None)  # three queries
    with pytest.raises(ValueError):
        da.decode_attention(q, k, v, torch.zeros(2, 2, 1, 32), None)  # a mask per head


@pytest.mark.parametrize("B,H,Hk,D,L,parts,cache,new,kind,last", [
    (3, 4, 4, 16, 40, 1, torch.float32, torch.float32, torch.float32, 20),  # one part
    (2, 4, 2, 24, 130, 4, torch.float32, torch.float32, "bool", 100),  # GQA; written in part 1 of 4
    (2, 6, 2, 16, 200, 3, torch.float32, torch.bfloat16, torch.float32, 0),  # first column; 3:1
    (2, 2, 2, 16, 64, 2, torch.bfloat16, torch.bfloat16, torch.bfloat16, 63),  # the last column
])
def test_the_kernel_writes_the_new_column_and_attends_as_after_a_separate_write(
        B, H, Hk, D, L, parts, cache, new, kind, last):
    """new_kv: the cache afterwards is bit for bit the cache after `write_columns` (the new key and
    value rounded to the cache's dtype, every other column untouched), and the output is the
    kernel's output over that cache -- the same column values, read from registers. The column
    holds NaN before, so a program that attended over it before it was written would show."""
    g = torch.Generator().manual_seed(B * 100 + L + last)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hk, L, D, generator=g).to(cache)
    v = torch.randn(B, Hk, L, D, generator=g).to(cache)
    k[:, :, last], v[:, :, last] = float("nan"), float("nan")
    nk = torch.randn(B, Hk, 1, D, generator=g).to(new)
    nv = torch.randn(B, Hk, 4, D, generator=g).to(new)[:, :, 1:2]  # a strided view, as projections give
    allow = torch.ones(B, L, dtype=torch.bool)
    if kind is not None:
        allow[0, : min(3, last)] = False
    at = torch.tensor([last])
    want_k, want_v = k.clone(), v.clone()
    da.write_columns(want_k, want_v, at, nk, nv)
    want = da.decode_attention(q, want_k, want_v, _mask(allow, kind), at, parts=parts)
    got = da.decode_attention(q, k, v, _mask(allow, kind), at, parts=parts, new_kv=(nk, nv))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), brute(q, want_k.float(), want_v.float(), allow, last),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture
def reversed_grid(monkeypatch):
    """Triton's interpreter runs a grid's programs one by one in order, so the writer of a new
    column (the first head of its group, part 0) would always finish before its readers start:
    run them last to first instead, so a program that read the column from memory would read
    the NaN planted there."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    dims = {}
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_dim", lambda *d: (dims.update(d=d), set_dim(*d))[1])
    monkeypatch.setattr(builder, "set_grid_idx",
                        lambda *i: set_idx(*(n - 1 - x for n, x in zip(dims["d"], i))))


@pytest.mark.parametrize("H,Hk,parts", [(6, 2, 1), (2, 2, 4), (4, 1, 3)])
def test_no_program_reads_the_new_column_from_memory(reversed_grid, H, Hk, parts):
    g = torch.Generator().manual_seed(H * 10 + parts)
    B, D, L, last = 2, 16, 150, 140
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    want_k, want_v = k.clone(), v.clone()
    k[:, :, last], v[:, :, last] = float("nan"), float("nan")
    nk, nv = torch.randn(B, Hk, 1, D, generator=g), torch.randn(B, Hk, 1, D, generator=g)
    at = torch.tensor([last])
    da.write_columns(want_k, want_v, at, nk, nv)
    got = da.decode_attention(q, k, v, None, at, parts=parts, new_kv=(nk, nv))
    assert got.isfinite().all()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    torch.testing.assert_close(got, da.decode_attention(q, want_k, want_v, None, at, parts=parts),
                               rtol=1e-6, atol=1e-6)


def test_a_column_past_a_prefix_view_is_written_and_not_attended():
    """Attention over a view of the cache's first columns (fast_sampler.KV_BUCKETS): a new column
    beyond the view is still written (`cache_len`), as a separate write would, and not attended."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 1, 8, generator=g)
    k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    nk, nv = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    at = torch.tensor([10])
    want = da.decode_attention(q, k[:, :, :8], v[:, :, :8], None, at)
    got = da.decode_attention(q, k[:, :, :8], v[:, :, :8], None, at, new_kv=(nk, nv), cache_len=16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k[:, :, 10:11], nk) and torch.equal(v[:, :, 10:11], nv)


def test_new_columns_the_kernel_cannot_write_are_refused():
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    nk = torch.randn(2, 2, 1, 8)
    with pytest.raises(ValueError, match="column to write"):
        da.decode_attention(q, k, v, None, None, new_kv=(nk, nk))
    with pytest.raises(ValueError, match="new key"):
        da.decode_attention(q, k, v, None, torch.tensor([3]), new_kv=(torch.randn(2, 2, 2, 8), nk))
    with pytest.raises(ValueError, match="not contiguous"):
        da.decode_attention(q, k, v, None, torch.tensor([3]),
                            new_kv=(nk, torch.randn(2, 2, 1, 16)[..., ::2]))
    with pytest.raises(ValueError, match="caches"):  # rounding down to the cache's dtype: torch's
        da.decode_attention(q, k.bfloat16(), v.bfloat16(), None, torch.tensor([3]), new_kv=(nk, nk))
    with pytest.raises(ValueError, match="caches"):  # the value checked against the value cache
        da.decode_attention(q, k, v.bfloat16(), None, torch.tensor([3]), new_kv=(nk, nk))


def _writes(L=8):
    """A CacheWrites over a one-layer StaticCache-like object, its cache allocated."""
    from types import SimpleNamespace

    from minillm_cli.engine.static_cache import CacheWrites

    layer = SimpleNamespace(is_initialized=True, keys=torch.zeros(2, 2, L, 8),
                            values=torch.zeros(2, 2, L, 8))
    return CacheWrites(SimpleNamespace(layers=[layer], update=None)), layer


def test_deferred_writes_reach_the_kernel_or_are_written_before_the_original(monkeypatch):
    """CacheWrites with `defer`: a one-column write is left to the layer's attention call. Served
    by the kernel, it is handed over (`new_kv`) and lands in the cache; handed to the original
    (a mask the kernel cannot read), it is written before the original runs; a multi-column
    write (a prefill) is written at once."""
    writes, layer = _writes()
    q, nk, nv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    writes.at, writes.defer = torch.tensor([5]), True
    handed = []
    kernel = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: handed.append(kw.get("new_kv"))
                        or kernel(*a, **kw))
    with da.active(writes.at):
        fn = da._interface()["sdpa"]
        k, v = writes.update(nk, nv, 0)
        assert k.abs().sum() == 0 and len(da._PENDING) == 1  # not written yet
        out, _ = fn(torch.nn.Module(), q, k, v, None)
        assert handed[-1][0] is nk and not da._PENDING
        assert torch.equal(layer.keys[:, :, 5:6], nk) and torch.equal(layer.values[:, :, 5:6], nv)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, layer.keys, layer.values,
            attn_mask=(torch.arange(8) <= 5)[None, None, None, :]).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

        writes.at = torch.tensor([6])  # a new column, attended by the original (a per-head mask)
        with da.active(writes.at):
            k, v = writes.update(nk * 2, nv * 2, 0)
            per_head = torch.zeros(2, 2, 1, 8)
            per_head[..., 7:] = torch.finfo(torch.float32).min
            out, _ = da._interface()["sdpa"](torch.nn.Module(), q, k, v, per_head)
        assert torch.equal(layer.keys[:, :, 6:7], nk * 2) and not da._PENDING
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
            q, layer.keys, layer.values, attn_mask=per_head).transpose(1, 2))
    writes.defer = False
    writes.at = torch.tensor([0, 1])
    writes.update(torch.ones(2, 2, 2, 8), torch.ones(2, 2, 2, 8), 0)  # (no attention call needed)
    assert layer.keys[:, :, :2].eq(1).all() and not da._PENDING
    assert len(handed) == 1


@pytest.mark.parametrize("why", ["rounds", "other_column"])
def test_a_deferred_write_the_kernel_cannot_take_is_written_and_the_kernel_still_attends(monkeypatch, why):
    """A float32 value for a bf16 value cache (rounding is torch's), or a write filed for another
    column than the one the forward attends up to: written separately before the kernel runs,
    and the kernel is not switched off."""
    from types import SimpleNamespace

    from minillm_cli.engine.static_cache import CacheWrites

    layer = SimpleNamespace(is_initialized=True, keys=torch.zeros(2, 2, 8, 8),
                            values=torch.zeros(2, 2, 8, 8, dtype=torch.bfloat16 if why == "rounds" else None))
    writes = CacheWrites(SimpleNamespace(layers=[layer], update=None))
    handed = []
    kernel = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: handed.append(kw.get("new_kv"))
                        or kernel(*a, **kw))
    nk, nv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    writes.at, writes.defer = torch.tensor([4]), True
    with da.active(writes.at if why == "rounds" else torch.tensor([4])):
        k, v = writes.update(nk, nv, 0)
        out, _ = da._interface()["sdpa"](torch.nn.Module(), torch.randn(2, 2, 1, 8), k, v, None)
    assert handed == [None] and not da._BROKEN and not da._PENDING
    assert torch.equal(layer.keys[:, :, 4:5], nk) and torch.equal(layer.values[:, :, 4:5], nv.to(layer.values.dtype))
    assert out.isfinite().all()


def test_a_failing_kernel_writes_the_deferred_column_before_sdpa(monkeypatch):
    """The kernel failing on a call that carries the step's key and value: SDPA attends over the
    cache with that column written."""
    writes, layer = _writes()

    def broken(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(da, "decode_attention", broken)
    q, nk, nv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    writes.at, writes.defer = torch.tensor([2]), True
    allow = (torch.arange(8) <= 2)[None, None, None, :]
    mask = torch.zeros(1, 1, 1, 8).masked_fill(~allow, torch.finfo(torch.float32).min).expand(2, 1, 1, 8)
    with da.active(writes.at):
        k, v = writes.update(nk, nv, 0)
        with pytest.warns(UserWarning, match="no compiler"):
            out, _ = da._interface()["sdpa"](torch.nn.Module(), q, k, v, mask)
    assert torch.equal(layer.keys[:, :, 2:3], nk) and torch.equal(layer.values[:, :, 2:3], nv)
    want = torch.nn.functional.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2))
    assert not da._PENDING
    assert da._BROKEN and not da._NO_FUSION  # (it failed without the writes, too: SDPA from here on)


def _fails_with_writes(monkeypatch):
    """decode_attention failing whenever it is handed the step's key and value (a Triton that
    cannot build that variant), fine otherwise; returns the new_kv of each call."""
    handed = []
    kernel = da.decode_attention

    def flaky(*a, **kw):
        handed.append(kw.get("new_kv"))
        if kw.get("new_kv") is not None:
            raise RuntimeError("cannot build HAS_NEW")
        return kernel(*a, **kw)

    monkeypatch.setattr(da, "decode_attention", flaky)
    return handed


def test_a_kernel_that_fails_with_the_writes_keeps_attending_and_the_cache_is_written_separately(monkeypatch):
    """The variant with the cache writes failing: the column is written, the kernel attends
    without it (a warning; the kernel stays on), and later writes are not deferred."""
    handed = _fails_with_writes(monkeypatch)
    writes, layer = _writes()
    q, nk, nv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    writes.at, writes.defer = torch.tensor([2]), True
    with da.active(writes.at):
        k, v = writes.update(nk, nv, 0)
        with pytest.warns(UserWarning, match="writing the cache separately"):
            out, _ = da._interface()["sdpa"](torch.nn.Module(), q, k, v, None)
    assert torch.equal(layer.keys[:, :, 2:3], nk) and torch.equal(layer.values[:, :, 2:3], nv)
    torch.testing.assert_close(out.double(), brute(q, layer.keys, layer.values, torch.ones(2, 8, dtype=torch.bool), 2),
                               rtol=1e-5, atol=1e-5)
    assert handed[0] is not None and handed[1] is None
    assert da._NO_FUSION and not da._BROKEN and not da.fusion_ok()
    monkeypatch.setattr(fast_sampler, "ATTENTION_NOTES", {"teacher": (True, "forced")})
    assert fast_sampler.cache_writes() == "separate (the kernel with them failed: RuntimeError: cannot build HAS_NEW)"
    writes.at = torch.tensor([3])
    with da.active(writes.at):
        writes.update(nk * 2, nv * 2, 0)
        assert not da._PENDING and torch.equal(layer.keys[:, :, 3:4], nk * 2)  # written at once
        da._interface()["sdpa"](torch.nn.Module(), q, *writes.update(nk * 2, nv * 2, 0), None)
    assert handed[-1] is None


def test_a_deferred_write_no_attention_call_took_is_written_and_raises():
    """A layer whose attention did not come through the dispatch would have attended without its
    new column: leaving `active` writes the column (the cache stays whole) and raises."""
    writes, layer = _writes()
    writes.at, writes.defer = torch.tensor([3]), True
    with pytest.raises(RuntimeError, match="not taken by an attention call"):
        with da.active(writes.at):
            writes.update(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8), 0)
    assert layer.keys[:, :, 3].eq(1).all() and layer.keys[:, :, 4].eq(0).all() and not da._PENDING


def test_a_row_with_no_allowed_column_gives_zeros_not_nan():
    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    allow = torch.ones(2, 64, dtype=torch.bool)
    allow[1] = False
    for parts in (1, 2):
        out = da.decode_attention(q, k, v, _mask(allow, "bool"), None, parts=parts)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1].double(), brute(q[:1], k[:1], v[:1], allow[:1], None),
                                   rtol=1e-5, atol=1e-5)


def test_inputs_the_kernel_does_not_serve_go_to_sdpa_without_turning_it_off(monkeypatch):
    """A mask the kernel cannot read (one per head) or a non-contiguous head dimension: that call
    goes to the original sdpa function, and the kernel stays on for the next."""
    monkeypatch.setattr(da, "_BROKEN", [])
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    with da.active(torch.tensor([3])):
        fn = da._interface()["sdpa"]
        per_head = torch.zeros(2, 2, 1, 4)
        out, _ = fn(torch.nn.Module(), q, k, v, per_head)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=per_head).transpose(1, 2))
        fn(torch.nn.Module(), q, k.transpose(2, 3).contiguous().transpose(2, 3), v, None)
        assert not da._BROKEN
        out, _ = fn(torch.nn.Module(), q, k, v, None)  # served by the kernel
        torch.testing.assert_close(out.double(), brute(q, k, v, torch.ones(2, 4, dtype=torch.bool), 3))


def test_dispatch_only_inside_active_and_only_for_one_query(monkeypatch):
    """Inside `active`, transformers' sdpa entry sends single-query calls to the kernel and
    everything else (a prefill) to the original; outside, and after an error, the entry is the
    original again."""
    mapping = da._interface()
    original = mapping["sdpa"]
    calls = []
    monkeypatch.setattr(da, "decode_attention", lambda *a, **k: calls.append(a[4]) or torch.zeros(1))
    last = torch.tensor([3])
    mod = torch.nn.Module()
    with da.active(last):
        fn = mapping["sdpa"]
        assert fn is not original
        fn(mod, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), None)
        out, _ = fn(mod, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), None)
        assert out.shape == (1, 4, 2, 8)  # the original's result
        out, _ = fn(mod, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                    None, sliding_window=2)  # an argument the kernel does not serve: the original
        assert out.shape == (1, 1, 2, 8)
    assert calls == [last]  # the one-query call, with the active column
    assert mapping["sdpa"] is original
    with pytest.raises(RuntimeError):
        with da.active(last):
            raise RuntimeError("boom")
    assert mapping["sdpa"] is original


def test_a_failing_kernel_hands_over_to_sdpa_for_good(monkeypatch):
    """A kernel error inside a forward (Triton failing to compile a new specialisation, say) warns
    once and gives the original's result, then and in every later call."""
    monkeypatch.setattr(da, "_BROKEN", [])
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(da, "decode_attention", broken)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    with da.active(torch.tensor([3])):
        with pytest.warns(UserWarning, match="no compiler"):
            out, _ = da._interface()["sdpa"](torch.nn.Module(), q, k, v, None)
        again, _ = da._interface()["sdpa"](torch.nn.Module(), q, k, v, None)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(again, want)
    assert calls == [1]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t_ours,wrong,use", [(0.8, False, True), (0.95, False, False), (0.5, True, False)])
def test_choice_needs_the_same_output_and_a_tenth_less_time(monkeypatch, t_ours, wrong, use, fused):
    """`_measure` (what "auto" runs on CUDA; here on CPU tensors with the timer faked): every
    config's output is checked against SDPA's (grouped heads packed as transformers packs them),
    and the kernel is chosen only at <= 90% of SDPA's time, with its fastest config. With fused
    writes the kernel is handed the step's key and value and SDPA's side writes them first."""
    speed = {(64, 2): t_ours, (32, 1): t_ours + 0.01}
    timed = []

    def fake_time(fn, copies):
        fn(0)  # (runs)
        timed.append(fn)
        return 1.0 if fn.__name__ == "sdpa" else speed.get(fn.config, 2.0)

    monkeypatch.setattr(da, "_time", fake_time)
    kernel = da.decode_attention

    handed = []

    def tagged(q, k, v, mask, last, config=None, new_kv=None):
        handed.append(new_kv is not None)
        out = kernel(q, k, v, mask, last, config=config, new_kv=new_kv)
        return out * 1.1 if wrong else out

    monkeypatch.setattr(da, "decode_attention", tagged)
    got, why, config = da._measure(4, 4, 2, 16, 64, 40, torch.float32, torch.float32, torch.float32,
                                   torch.device("cpu"), fused)
    assert handed and set(handed) == {fused}
    assert got is use
    assert ("differs from SDPA" in why) is wrong
    if not wrong:
        assert config == (64, 2) and len(timed) == len(da.CONFIGS) + 1
    assert da.choose(None, 4, 64, 40, torch.float32, torch.float32, torch.float32, "cpu") == (
        False, "needs CUDA and Triton", None)


def test_the_choice_times_separate_writes_where_the_variant_with_them_does_not_build(monkeypatch):
    """The kernel with the writes failing while `choose` measures: it is timed without them and
    chosen on that, and the process stops deferring writes."""
    handed = _fails_with_writes(monkeypatch)
    monkeypatch.setattr(da, "_time", lambda fn, copies: (fn(0), 0.5 if fn.__name__ == "run" else 1.0)[1])
    use, why, config = da._measure(2, 2, 2, 16, 64, 40, torch.float32, torch.float32, torch.float32,
                                   torch.device("cpu"), True)
    assert use and config is not None, why
    assert handed[0] is not None and all(h is None for h in handed[1:]) and len(handed) > 1
    assert not da.fusion_ok() and not da._BROKEN


def test_a_config_that_does_not_build_is_left_out_of_the_choice(monkeypatch):
    kernel = da.decode_attention

    def picky(*a, config=None, **kw):
        if config == da.CONFIGS[0]:
            raise RuntimeError("out of shared memory")
        return kernel(*a, config=config, **kw)

    monkeypatch.setattr(da, "decode_attention", picky)
    monkeypatch.setattr(da, "_time", lambda fn, copies: (fn(0), 1.0 if fn.__name__ == "sdpa" else 0.5)[1])
    use, why, config = da._measure(2, 2, 2, 16, 64, 40, torch.float32, torch.float32, torch.float32,
                                   torch.device("cpu"), True)
    assert use and config is not None and config != da.CONFIGS[0], why
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no Triton")))
    use, why, config = da._measure(2, 2, 2, 16, 64, 40, torch.float32, torch.float32, torch.float32,
                                   torch.device("cpu"), False)
    assert not use and "no Triton" in why and config is None


def test_the_choice_times_separate_writes_where_the_kernel_cannot_take_them(monkeypatch):
    """A bf16 cache fed float32 keys: the step writes them separately whatever attends, so the
    kernel is timed without them -- not refused for it."""
    handed = []
    monkeypatch.setattr(da, "_time", lambda fn, copies: (fn(0), 0.5 if fn.__name__ == "run" else 1.0)[1])
    kernel = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: handed.append(kw.get("new_kv"))
                        or kernel(*a, **kw))
    use, why, config = da._measure(2, 2, 2, 16, 64, 40, torch.float32, torch.bfloat16, torch.float32,
                                   torch.device("cpu"), True)
    assert use and config is not None, why
    assert handed and all(h is None for h in handed)


# -- the sampler through the kernel --------------------------------------------------------------

V, PAD, EOS = TOY_V, TOY_PAD, TOY_EOS
_args = toy_sample_args


@pytest.mark.parametrize("buckets,fused", [(1, True), (3, True), (1, False)])
def test_sampler_through_the_kernel_draws_the_reference_tokens(monkeypatch, buckets, fused):
    """DECODE_ATTENTION = "kernel": every decode step's attention (each layer of both models) runs
    the kernel, reading up to the step's write column and (FUSED_CACHE_WRITES) writing the step's
    key and value there itself; the tokens and log-probs are the reference sampler's, with left
    padding, EOS and an n-gram ban, also over bucketed cache views."""
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    monkeypatch.setattr(fast_sampler, "KV_BUCKETS", buckets)
    monkeypatch.setattr(fast_sampler, "FUSED_CACHE_WRITES", fused)
    student = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    teacher = gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    seen = []
    kernel = da.decode_attention

    def counted(q, k, v, mask, last_col, *a, **kw):
        seen.append((k.shape[2], int(last_col)))
        assert (kw.get("new_kv") is not None) is fused
        return kernel(q, k, v, mask, last_col, *a, **kw)

    monkeypatch.setattr(da, "decode_attention", counted)
    kw = dict(max_new_tokens=24, no_repeat_ngram_size=3)
    ref = sample(student, teacher, **_args(range(4), 0.3, **kw))
    got = fast_sample(student, teacher, engine="static", **_args(range(4), 0.3, **kw))
    fast_sampler.release()
    assert torch.equal(ref.response_ids, got.response_ids)
    assert torch.equal(ref.response_mask, got.response_mask)
    torch.testing.assert_close(got.mix_logp, ref.mix_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.student_logp, ref.student_logp, rtol=0, atol=1e-5)
    steps = got.response_ids.shape[1] - 1
    assert steps > 3 and len(seen) == 3 * steps  # 2 + 1 layers per decode step, no prefill
    P = 6
    for i, (width, last) in enumerate(seen):
        s = i // 3 + 1  # step s feeds column P + s - 1
        assert last == P + s - 1 and width > last
    assert fast_sampler.ATTENTION_NOTES == {"student": (True, "forced (DECODE_ATTENTION)"),
                                            "teacher": (True, "forced (DECODE_ATTENTION)")}
    assert fast_sampler.attention_summary().startswith("decode attention: student Triton kernel")
    assert fast_sampler.attention_summary().endswith(
        "cache writes in the kernel" if fused else "cache writes separate (FUSED_CACHE_WRITES off)")
    fast_sample(student, teacher, engine="eager", **_args(range(4), 0.3, **kw))  # nothing to report
    assert fast_sampler.ATTENTION_NOTES == {} and fast_sampler.attention_summary() is None


@pytest.mark.parametrize("wrong", [False, True])
def test_self_check_runs_the_decode_steps_through_the_kernel_and_a_model_that_fails_keeps_sdpa(monkeypatch, wrong):
    """Where "auto" may choose the kernel (CUDA; here the CPU through the interpreter), self_check
    also decodes through it, with its cache writes, against a full forward. A kernel that gets a
    model wrong (here: its outputs scaled) leaves that model on SDPA -- even when forced -- and
    the tokens are still the reference's; one that gets it right is used."""
    monkeypatch.setattr(fast_sampler, "KERNEL_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    student = gpt2_numbers(5, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    teacher = gpt2_numbers(6, vocab=V, pad=PAD, eos=EOS)
    kernel = da.decode_attention
    calls = []

    def counted(*a, **kw):
        calls.append(kw.get("new_kv") is not None)
        out = kernel(*a, **kw)
        return out * 1.5 if wrong else out

    monkeypatch.setattr(da, "decode_attention", counted)
    ref = sample(student, teacher, **_args(range(4), 0.3, max_new_tokens=12))
    got = fast_sample(student, teacher, engine="static", **_args(range(4), 0.3, max_new_tokens=12))
    fast_sampler.release()
    assert torch.equal(ref.response_ids, got.response_ids)
    assert calls and all(calls)  # the self-checks' decode steps, with the cache writes
    for name, model in (("student", student), ("teacher", teacher)):
        unsafe = fast_sampler.kernel_unsafe(model, "cpu")
        assert (unsafe is not None) is wrong, unsafe
        used, why = fast_sampler.ATTENTION_NOTES[name]
        assert used is not wrong and (not wrong or "failed the self-check" in why), why


def test_self_check_keeps_sdpa_for_a_model_the_kernel_fails_on_without_turning_it_off_for_others(monkeypatch):
    """The kernel raising inside self_check's pass (a Triton that cannot build it for this model):
    that model is marked, and the process-wide switch-off the dispatch recorded is taken back."""
    monkeypatch.setattr(fast_sampler, "KERNEL_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    model = gpt2_numbers(7, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no build")))
    with pytest.warns(UserWarning, match="no build"):
        assert fast_sampler.self_check(model, V, "cpu", EOS) is None
    assert fast_sampler.kernel_unsafe(model, "cpu").startswith("the kernel failed: RuntimeError: no build")
    assert not da._BROKEN


def test_a_self_check_made_with_the_kernel_switched_off_does_not_stand_for_one_that_may_choose_it(monkeypatch):
    """A process that checked a model while DECODE_ATTENTION was "sdpa" (a benchmark's variant)
    and then lets the kernel be chosen checks the model through the kernel before using it."""
    monkeypatch.setattr(fast_sampler, "KERNEL_CHECK_DEVICES", ("cuda", "cpu"))
    model = gpt2_numbers(8, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    kernel, calls = da.decode_attention, []
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "sdpa")
    assert fast_sampler.self_check(model, V, "cpu", EOS) is None
    assert not calls and model not in static_check._KERNEL_UNSAFE
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "auto")
    assert fast_sampler.self_check(model, V, "cpu", EOS) is None
    assert calls and static_check._KERNEL_UNSAFE[model] == {None: None}  # checked, and passed
    n = len(calls)
    assert fast_sampler.self_check(model, V, "cpu", EOS) is None and len(calls) == n  # cached


def _checkable(sm, device) -> bool:
    """Whether self_check, with fast_sampler's switches as they are set now, decodes `sm` through
    the kernel."""
    return static_check.kernel_checkable(sm, device, fast_sampler._kernel_pass_on(device))


def test_self_check_goes_through_the_kernel_only_for_a_model_on_the_samplers_device(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(fast_sampler, "KERNEL_CHECK_DEVICES", ("cuda", "cpu"))
    sm = SimpleNamespace(impl="sdpa", writes=object(), device=torch.device("cpu"))
    assert _checkable(sm, "cpu")
    assert not _checkable(sm, "meta")  # (a teacher on another device)
    assert not _checkable(SimpleNamespace(impl="eager", writes=object(), device=sm.device), "cpu")
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "sdpa")
    assert not _checkable(sm, "cpu")


def test_a_grouped_query_llama_through_the_kernel_draws_the_reference_tokens(monkeypatch):
    """A Llama student with 2 key/value heads for 4 query heads (query head h reads KV head
    h // 2), its rotary positions after left padding, teacher-mixed with a GPT-2."""
    llama = llama_numbers(3, vocab=V, pad=PAD, eos=EOS)
    teacher = gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    seen = []
    kernel = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda q, k, *a, **kw: seen.append((q.shape[1], k.shape[1]))
                        or kernel(q, k, *a, **kw))
    ref = sample(llama, teacher, **_args(range(4), 0.3, max_new_tokens=16))
    got = fast_sample(llama, teacher, engine="static", **_args(range(4), 0.3, max_new_tokens=16))
    fast_sampler.release()
    assert torch.equal(ref.response_ids, got.response_ids)
    torch.testing.assert_close(got.student_logp, ref.student_logp, rtol=0, atol=1e-5)
    assert (4, 2) in seen and (2, 2) in seen  # the Llama's grouped heads, the GPT-2's


def test_auto_keeps_sdpa_off_cuda_and_for_eager_attention(monkeypatch):
    """"auto" times the kernel only for captured CUDA decoders: on this CPU every model keeps SDPA
    (and the tokens are the reference's as ever); a model on eager attention is never offered the
    kernel, even when forced."""
    student = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS)
    eager = gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS, attn="eager")
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "auto")
    calls = []
    monkeypatch.setattr(da, "decode_attention", lambda *a, **k: calls.append(1))
    fast_sample(student, eager, engine="static", **_args(range(4), 0.3, max_new_tokens=6))
    assert fast_sampler.ATTENTION_NOTES == {} and calls == []
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    models = {"student": fast_sampler.make_model(student, V, 4, 16, "cpu"),
              "teacher": fast_sampler.make_model(eager, V, 4, 16, "cpu")}
    notes = fast_sampler._choose_attention(models, captured=True, B=4, P=6, T=8, L=16)
    assert set(notes) == {"student"} and not models["teacher"].decode_kernel
    fast_sampler.release()


def test_parts_fill_the_device():
    """Enough (row, head, part) programs for every SM, a power of two, at most one part per block
    of columns."""
    assert da.parts_for(64, 25, 256, "cpu") == 1      # 1,600 programs
    assert da.parts_for(1, 2, 256, "cpu") == 4        # 2 programs: 256 / 64 = 4 blocks at most
    assert da.parts_for(1, 2, 4096, "cpu") == 8       # ceil(16 / 2) = 8
    assert da.parts_for(2, 2, 40, "cpu") == 1         # one block of columns


def test_an_out_of_memory_measurement_says_sdpa_and_is_not_kept(monkeypatch):
    """Measuring needs memory after the caches took theirs: running out there must not cost the
    rollout its batch (the sampler's OOM handling would halve it), and is measured again later."""
    monkeypatch.setattr(da, "_measurable", lambda device: True)
    monkeypatch.setattr(da, "_CHOICES", {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS)

    def oom(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(da, "_measure", oom)
    use, why, config = da.choose(model, 4, 64, 40, torch.float32, torch.float32, torch.float32, "cpu")
    assert (use, config) == (False, None) and "out of memory" in why and da._CHOICES == {}
    monkeypatch.setattr(da, "_measure", lambda *a: (True, "measured", (64, 2)))
    again = da.choose(model, 4, 64, 40, torch.float32, torch.float32, torch.float32, "cpu")
    assert again == (True, "measured", (64, 2))
    assert len(da._CHOICES) == 1


def test_after_a_failed_capture_or_a_kernel_failure_auto_uses_sdpa(monkeypatch):
    """"auto" chose the kernel for replayed steps; a step that is not captured after all goes back
    to SDPA (Triton's Python launcher costs more per layer), and once the kernel has failed in this
    process no decoder is offered it."""
    student = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS)
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "auto")
    models = {"student": fast_sampler.make_model(student, V, 4, 16, "cpu")}
    dec = fast_sampler.make_decoder(models, B=4, P=6, T=8, L=16, alpha=0.0, params=SamplingParams(8), eos_id=EOS,
                                    pad_id=PAD, vocab_size=V, device="cpu")
    models["student"].decode_kernel = True
    dec.attention_notes = {"student": (True, "measured")}
    with pytest.warns(UserWarning, match="capture failed"):
        dec._give_up_capture(RuntimeError("no graph"))
    assert not models["student"].decode_kernel and dec.attention_notes["student"][0] is False
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    monkeypatch.setattr(da, "_BROKEN", ["RuntimeError: no compiler"])
    notes = fast_sampler._choose_attention(models, captured=True, B=4, P=6, T=8, L=16)
    assert notes["student"][0] is False and "failed earlier" in notes["student"][1]
    assert not models["student"].decode_kernel
    fast_sampler.release()
