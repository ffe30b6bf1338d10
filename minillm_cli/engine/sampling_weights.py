"""Low-precision copies of a float32 model's matmul weights, installed only while sampling.

`distill` trains a float32 student under bf16/fp16 autocast. Autocast casts a float32 weight to
bf16 every time a matmul reads it (it caches the cast only for trainable leaf tensors, within one
autocast region). The fast sampler's decode step must not use that cache (a CUDA graph captured
over it reads freed memory once the autocast region exits, see `static_model.fresh_casts`), so
every decode step cast the whole model again: per matmul parameter it read 4 bytes and wrote 2
before the matmul read the copy (gpt2: ~0.75 GB and ~100 small kernels a step, one per weight and
bias; a 7B student: ~42 GB a step, more than its own bf16 weights).

Here the casts happen once per `fast_sample` call (`refresh`), into copies the decoder owns (a
captured graph reads them in every replay; refreshing writes them in place). The copies are the
values autocast would produce (the same rounding of the same float32 numbers), and autocast's own
cast of a tensor that already has its dtype is a no-op, so for the covered modules the sampled
tokens and log-probs are bitwise the same. Covered: modules whose forward is exactly
`nn.Linear.forward` (`linear`) or transformers' `Conv1D.forward` (`addmm`), so autocast casts
their weight and bias together; a subclass with its own forward (Falcon's `FalconLinear` adds its
bias outside the matmul, in float32) is not. LayerNorm / RMSNorm weights and embeddings stay
float32, because autocast keeps those ops in float32 (a bf16 copy would round them). A weight tied
to an embedding (GPT-2's LM head) gets its own copy for the head while the embedding keeps reading
the float32 master. Code around a covered module may still read its weight's dtype (peft's DoRA
does), so `fast_sampler` checks each model once: a forward with the copies must equal one without,
bit for bit, or the model samples without copies.

Cost: 2 bytes per covered parameter while the decoder is kept (until `fast_sampler.release()`,
which `distill` calls before its updates). For trainable weights the eager sampler's autocast cache
holds the same; for frozen float32 weights (a LoRA student's base, a float32 teacher) it is new
memory: autocast casts those afresh at every use and keeps nothing."""
from __future__ import annotations

import contextlib

import torch

from minillm_cli.engine.aligned_head import misaligned_head, padded_rows

LOW = (torch.bfloat16, torch.float16)


def _matmul_forwards() -> tuple:
    """The forwards that hand weight and bias to one autocast matmul op (linear / addmm)."""
    forwards: tuple = (torch.nn.Linear.forward,)
    try:
        from transformers.pytorch_utils import Conv1D

        forwards += (Conv1D.forward,)
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    return forwards


class SamplingWeights:
    """`dtype` copies of `model`'s float32 matmul parameters. `refresh()` casts the current master
    values into them in place (allocating them on the first call, so a model found unsuited
    before that costs nothing); `installed()` makes the modules read the copies."""

    def __init__(self, model, dtype: torch.dtype, skip: tuple = ()):
        if dtype not in LOW:
            raise ValueError(f"sampling weights are a low-precision copy, got {dtype}")
        forwards = _matmul_forwards()
        self.dtype = dtype
        self.slots: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self.masters: dict[int, torch.Tensor] = {}  # one copy per master, also where it is shared
        for mod in model.modules():
            # (a subclass with its own forward: not covered; `skip`: a module with a copy of its own)
            if type(mod).forward not in forwards or any(mod is m for m in skip):
                continue
            for name in ("weight", "bias"):
                p = mod._parameters.get(name)
                if p is not None and p.dtype == torch.float32:
                    self.slots.append((mod, name, p))
                    self.masters[id(p)] = p
        self.copies: dict[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.masters.values()) * torch.finfo(self.dtype).bits // 8

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the masters' current values (after any optimizer step) into the copies."""
        if self.copies is None:
            self.copies = {k: torch.empty_like(p, dtype=self.dtype, requires_grad=False)
                           for k, p in self.masters.items()}
        for k, p in self.masters.items():
            self.copies[k].copy_(p)

    @contextlib.contextmanager
    def installed(self):
        """The covered modules read the copies inside (after a `refresh`); the masters are back
        afterwards (also on errors). Set in `_parameters` directly: the copies are plain tensors,
        not Parameters."""
        assert self.copies is not None, "refresh() first"
        done = []
        try:
            for mod, name, p in self.slots:
                done.append((mod, name, mod._parameters[name]))  # put back what is there now
                mod._parameters[name] = self.copies[id(p)]
            yield
        finally:
            for mod, name, p in reversed(done):
                mod._parameters[name] = p


def sampling_weights(model, dtype, skip: tuple = ()) -> SamplingWeights | None:
    """Copies for `model` when it would be cast by autocast of `dtype` on every step (dtype is
    autocast's on the model's device, or None when autocast is off); None when there is nothing
    to copy. Modules in `skip` are left out."""
    if dtype not in LOW:
        return None
    w = SamplingWeights(model, dtype, skip)
    return w if len(w) else None


class PaddedHead:
    """The LM head's weight (and bias) with its rows -- one per vocabulary entry -- padded with
    zeros to a multiple of 64 (aligned_head.padded_rows), installed only while sampling; the
    sampler slices the logits back to the vocabulary, so the extra columns (logit 0) are never
    read.

    Why: with an odd vocabulary (GPT-2's 50,257) every row of the [batch, vocab] logits starts at
    an address that is not 16-byte aligned, so cuBLAS runs the head in its slow `align1` kernels:
    on the H200 (2026-11-28, batch 64, benchmarks/rollout_profile.py) 0.195 ms for gpt2-xl's head
    and 0.155 ms for gpt2's per decode step, 5-8x the time their weights take to read at the
    measured bandwidth (0.04 and 0.02 ms). The copy is in the dtype the matmul runs in (autocast's
    when on, else the weight's), so it also replaces the per-step cast a float32 head under
    autocast would need (SamplingWeights then skips the head).

    Not bitwise: a different GEMM kernel may sum in another order, so logits can differ in the last
    bit (the distribution is the same up to rounding, as with any kernel change; self_check
    compares the static path with its tolerance). Cost: one copy of the head while the decoder is
    kept (gpt2-xl: 161 MB in bf16)."""

    def __init__(self, head: torch.nn.Linear, dtype: torch.dtype):
        self.head, self.dtype = head, dtype
        self.rows = padded_rows(head.out_features)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        w, b, n = self.head.weight, self.head.bias, self.head.out_features
        if self.weight is None:  # zero rows past the vocabulary, written once
            self.weight = w.new_zeros((self.rows, w.shape[1]), dtype=self.dtype, requires_grad=False)
            if b is not None:
                self.bias = b.new_zeros((self.rows,), dtype=self.dtype, requires_grad=False)
        self.weight[:n].copy_(w)
        if b is not None:
            self.bias[:n].copy_(b)

    @contextlib.contextmanager
    def installed(self):
        assert self.weight is not None, "refresh() first"
        params = self.head._parameters
        old = {name: params[name] for name in ("weight", "bias") if name in params}
        try:
            params["weight"] = self.weight
            if self.bias is not None:
                params["bias"] = self.bias
            yield
        finally:
            params.update(old)


def padded_head(model, amp: torch.dtype | None) -> PaddedHead | None:
    """A PaddedHead for `model`'s LM head where `aligned_head.misaligned_head` finds one to pad
    (a plain nn.Linear with misaligned rows); None otherwise. `amp`: autocast's dtype on the
    model's device, or None."""
    head = misaligned_head(model)
    return None if head is None else PaddedHead(head, amp if amp is not None else head.weight.dtype)
