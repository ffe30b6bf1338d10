"""GPU checks of the decode step's split-K matmul (engine/decode_matmul.py; skipped without CUDA):
compiled by Triton at gpt2-xl's and gpt2's decode shapes in bf16 it gives cuBLAS's result in
every config `plan` may pick, a CUDA graph replays it bit for bit, the graph engine samples the
reference's tokens with every decode matmul through it, and "auto" plans without an error."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from minillm_cli.engine import decode_matmul as dm  # noqa: E402
from minillm_cli.engine import fast_sampler  # noqa: E402

from test_gpu_speed import _assert_fast_matches_reference, _bf16_graph_rollout, _gpt2  # noqa: E402

needs_triton = pytest.mark.skipif(not dm.available("cuda"), reason="needs Triton")


@pytest.fixture(autouse=True)
def _kernel_must_not_fail(monkeypatch):
    """A kernel error would hand the calls to cuBLAS with a warning (and the results would still
    match): here it fails the test."""
    monkeypatch.setattr(dm, "_BROKEN", [])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="split-K matmul kernel failed")
        yield
    assert not dm._BROKEN


@needs_triton
@pytest.mark.parametrize("M", [64, 256])  # (one row tile of 64 for both: the device call's Triton builds
# are counted; smaller row tiles are checked through the interpreter in tests/unit)
def test_kernel_gives_cublas_result_at_the_decode_shapes(M):
    g = torch.Generator(device="cuda").manual_seed(M)
    shapes = [(1600, 4800, True), (6400, 1600, True), (768, 768, True), (1600, 1600, False)]
    for K, N, k_major in shapes:
        w = torch.randn(*((K, N) if k_major else (N, K)), device="cuda", generator=g).bfloat16() / K ** 0.5
        bias = torch.randn(N, device="cuda", generator=g).bfloat16()
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        want = (torch.addmm(bias, x, w) if k_major else F.linear(x, w, bias)).float()
        for block_n, block_k in dm.CONFIGS:
            for split in dm.splits_for(M, N, K, block_n, block_k, "cuda"):
                out = dm.splitk_matmul(x, w, bias, (block_n, block_k, split), k_major=k_major)
                err = float((out.float() - want).abs().max())
                assert err <= 2e-2 * max(1.0, float(want.abs().max())), (K, N, block_n, block_k, split, err)


@needs_triton
def test_a_cuda_graph_replays_the_split_kernel_bit_for_bit():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 1600, device="cuda", generator=g).bfloat16()
    w = torch.randn(1600, 4800, device="cuda", generator=g).bfloat16() / 40
    bias = torch.randn(4800, device="cuda", generator=g).bfloat16()
    config = (64, 64, 8)
    eager = dm.splitk_matmul(x, w, bias, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dm.splitk_matmul(x, w, bias, config)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)  # (a fixed order of the partial sums)
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, dm.splitk_matmul(x, w, bias, config))


@needs_triton
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_graph_engine_through_the_split_k_kernel_matches_the_reference(monkeypatch, alpha):
    V = 13
    student = _gpt2(1, V, n_layer=2, n_embd=64, n_head=2)
    teacher = _gpt2(2, V, n_layer=2, n_embd=256, n_head=4)
    s = None if alpha == 1 else student
    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "kernel")
    _assert_fast_matches_reference(s, teacher, V, alpha, no_repeat_ngram_size=3, top_k=8)
    assert set(fast_sampler.MATMUL_NOTES) == ({"teacher"} if alpha == 1 else {"student", "teacher"})
    assert all(used for used, _ in fast_sampler.MATMUL_NOTES.values())


@needs_triton
def test_auto_plans_the_decode_matmuls(monkeypatch):
    """"auto" on a captured bf16 decoder: both models get a measured verdict (not an error, not a
    mismatch), and the rollout comes out whichever wins."""
    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "auto")
    _bf16_graph_rollout()
    notes = fast_sampler.MATMUL_NOTES
    print(notes)
    assert set(notes) == {"student", "teacher"}
    assert all(why.startswith("split-K for ") and "differs" not in why for _, why in notes.values()), notes
