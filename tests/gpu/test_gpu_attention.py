"""GPU checks of the decode-attention kernel (engine/decode_attention.py; skipped without CUDA):
compiled by Triton at gpt2-xl's decode shapes it gives SDPA's output, inside a CUDA graph it reads
the column set before each replay, the graph engine samples the reference's tokens through it, and
"auto" measures it against SDPA without an error."""
from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from minillm_cli.engine import decode_attention as da  # noqa: E402
from minillm_cli.engine import fast_sampler  # noqa: E402

from test_gpu_speed import _assert_fast_matches_reference, _bf16_graph_rollout, _gpt2  # noqa: E402

needs_triton = pytest.mark.skipif(not da.available("cuda"), reason="needs Triton")


@pytest.fixture(autouse=True)
def _kernel_must_not_fail(monkeypatch):
    """A kernel error would hand the calls to SDPA with a warning (and the tokens would still
    match): here it fails the test."""
    monkeypatch.setattr(da, "_BROKEN", [])
    monkeypatch.setattr(da, "_NO_FUSION", [])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="decode-attention kernel failed")
        yield
    assert not da._BROKEN and not da._NO_FUSION


def _sdpa(q, k, v, allow):
    mask = torch.zeros(allow.shape, dtype=q.dtype, device=q.device).masked_fill(~allow, torch.finfo(q.dtype).min)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2)


@needs_triton
@pytest.mark.parametrize("B", [64, 4])  # one part per (row, head); columns split across parts
def test_kernel_in_a_cuda_graph_reads_the_column_set_before_each_replay(B):
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, L = 25, 64, 256
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, H, L, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, H, L, D, device="cuda", generator=g).bfloat16()
    allow = torch.ones(B, L, dtype=torch.bool, device="cuda")
    allow[::2, :40] = False  # left padding
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bfloat16, device="cuda").masked_fill(
        ~allow[:, None, None, :], torch.finfo(torch.bfloat16).min)
    last = torch.tensor([127], device="cuda")
    out = da.decode_attention(q, k, v, mask, last)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, mask, last)
    for col in (130, 200, 255):
        last.fill_(col)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, da.decode_attention(q, k, v, mask, last))
        used = allow & (torch.arange(L, device="cuda") <= col)
        torch.testing.assert_close(out.float(), _sdpa(q, k, v, used).float(), rtol=0, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("B,H,Hk", [(64, 25, 25), (4, 32, 8)])  # gpt2-xl's heads; split GQA columns
def test_fused_cache_writes_in_a_cuda_graph_match_a_separate_write(B, H, Hk):
    """new_kv, replayed from a graph as the decode step runs it: each replay writes the step's key
    and value at the column set before it (bit for bit what `write_columns` writes, nothing else
    touched) and attends as after a separate write: exactly as the same kernel over a cache
    written beforehand (the column it takes from registers holds the same numbers; a program
    that read the column while it was being written would differ), and within bf16 rounding of
    the kernel without new_kv (a separately compiled variant)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    D, L = 64, 256
    q = torch.randn(B, H, 1, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, Hk, L, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, Hk, L, D, device="cuda", generator=g).bfloat16()
    nk = torch.randn(B, Hk, 1, D, device="cuda", generator=g).bfloat16()
    nv = torch.randn(B, Hk, 1, D, device="cuda", generator=g).bfloat16()
    allow = torch.ones(B, L, dtype=torch.bool, device="cuda")
    allow[::2, :40] = False
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bfloat16, device="cuda").masked_fill(
        ~allow[:, None, None, :], torch.finfo(torch.bfloat16).min)
    last = torch.tensor([127], device="cuda")
    out = da.decode_attention(q, k, v, mask, last, new_kv=(nk, nv))  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k, v, mask, last, new_kv=(nk, nv))
    for col in (130, 200, 255):
        k_ref, v_ref = k.clone(), v.clone()
        k[:, :, col], v[:, :, col] = float("nan"), float("nan")
        last.fill_(col)
        graph.replay()
        da.write_columns(k_ref, v_ref, last, nk, nv)
        same = da.decode_attention(q, k_ref.clone(), v_ref.clone(), mask, last, new_kv=(nk, nv))
        separate = da.decode_attention(q, k_ref, v_ref, mask, last)
        torch.cuda.synchronize()
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert torch.equal(out, same)
        torch.testing.assert_close(out.float(), separate.float(), rtol=0, atol=1e-2)
        nk.mul_(-1)  # (a different new column for the next replay)


@needs_triton
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_graph_engine_through_the_kernel_matches_the_reference(monkeypatch, alpha):
    V = 13
    student = _gpt2(1, V, n_layer=2, n_embd=64, n_head=2)
    teacher = _gpt2(2, V, n_layer=2, n_embd=64, n_head=4)
    s, t = (student, None) if alpha == 0 else ((None, teacher) if alpha == 1 else (student, teacher))
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "kernel")
    _assert_fast_matches_reference(s, t, V, alpha, no_repeat_ngram_size=3, top_k=8)
    want = {"student"} if alpha == 0 else ({"teacher"} if alpha == 1 else {"student", "teacher"})
    assert set(fast_sampler.ATTENTION_NOTES) == want
    assert all(used for used, _ in fast_sampler.ATTENTION_NOTES.values())


@needs_triton
def test_auto_measures_the_kernel_against_sdpa(monkeypatch):
    """"auto" on a captured bf16 decoder: both models get a measured verdict (not an error, not a
    mismatch), and the rollout comes out whichever wins."""
    monkeypatch.setattr(fast_sampler, "DECODE_ATTENTION", "auto")
    _bf16_graph_rollout()
    notes = fast_sampler.ATTENTION_NOTES
    print(notes)
    assert set(notes) == {"student", "teacher"}
    assert all("vs SDPA" in why for _, why in notes.values()), notes
