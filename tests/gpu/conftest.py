"""GPU tests: the decode matmuls on cuBLAS, except in test_gpu_matmul.py.

`fast_sampler.DECODE_MATMUL = "auto"` plans the split-K matmul for every new decoder shape, which
on a fresh machine means Triton builds per batch size (row tile) and config: ~1 s each, more than
the device call has to spare for tests that check other things. Some of those also compare bits
between runs whose matmul shapes differ (the student's bf16 weight copies on and off), where the
kernel and cuBLAS sum in other orders. test_gpu_matmul.py tests the kernel, "kernel" and "auto"."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _decode_matmuls_on_cublas(request, monkeypatch):
    if request.module.__name__.rsplit(".", 1)[-1] == "test_gpu_matmul":
        return
    from minillm_cli.engine import fast_sampler

    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "cublas")
