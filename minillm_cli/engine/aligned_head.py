"""The LM head computed over vocabulary rows padded to a multiple of 64 (training, scoring, any
forward), the model and its saved folders unchanged.

GPT-2's vocabulary has 50,257 rows (50,258 with the pad token we add). With an odd row count the
[tokens, vocab] logits rows start at addresses that are not 16-byte aligned, and cuBLAS falls
back to slow `align1` kernels for the head's forward and both backward GEMMs. The sampler's decode
step measured this on the H200 (2026-11-28): 0.195 ms for gpt2-xl's head per step, 5x the time its
weight takes to read; nanoGPT pads GPT-2's vocabulary to 50,304 for the same reason in training.
Here the head multiplies by a zero-padded copy of its weight (cast to autocast's dtype first,
the cast autocast would make anyway, so the pad copies half the bytes) and returns the logits
sliced back to the real rows: a view with the same shape, values and gradients as the plain head.
Cost per forward: one copy of the head weight (gpt2: 77 MB in bf16), and in the backward one
copy of the logits' gradient into the padded layout.

Installed by `models.load_model` on CUDA (with the fused activations), as a `forward` attribute of
the head module only: parameters, ties, state dicts and `save_pretrained` folders are untouched,
and `type(head).forward` is still nn.Linear's (engine/sampling_weights.py relies on that). The
sampler's own padded copy (`sampling_weights.PaddedHead`) already has aligned rows, so the
head then runs unpadded. Removed before FSDP shards a model (engine/fsdp.py): FSDP swaps the
parameters around the forward, and that combination is untested. A head replaced after loading
(`resize_token_embeddings` of an untied head builds a new module) runs plain again.

In an eager decode loop on a GPU (`--sampler eager`, the fast sampler's fallback) the pad costs a
copy of the head per step (a float32 head under autocast: cast and pad, ~0.4 GB for gpt2's head,
where the plain head reuses autocast's cached cast), about what the `align1` kernels cost there;
the fast sampler's decode steps read its own padded copy instead."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

ALIGN = 64


def _aligned(rows: int) -> bool:
    return rows % 8 == 0  # 16 bytes in a 2-byte dtype


def padded_rows(rows: int) -> int:
    return -(-rows // ALIGN) * ALIGN


def padded_linear(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` computed over rows padded to a multiple of ALIGN; [..., out_features] (a view)."""
    w, b = head.weight, head.bias
    n = w.shape[0]
    if _aligned(n):  # e.g. the sampler's padded copy is installed
        return F.linear(x, w, b)
    dev = w.device.type
    if torch.is_autocast_enabled(dev) and w.dtype == torch.float32:
        dtype = torch.get_autocast_dtype(dev)  # autocast's own cast (same rounding), before the pad
        w = w.to(dtype)
        b = b.to(dtype) if b is not None else None
    pad = padded_rows(n) - n
    w = F.pad(w, (0, 0, 0, pad))
    b = F.pad(b, (0, pad)) if b is not None else None
    return F.linear(x, w, b)[..., :n]


def _head(model):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def misaligned_head(model) -> torch.nn.Linear | None:
    """`model`'s LM head when padding its rows is what to do: a plain nn.Linear (a peft layer on
    the head has its own forward) of floating-point weights whose row count leaves the logits'
    rows misaligned; None otherwise. (The sampler's padded copy, sampling_weights.PaddedHead,
    asks the same.)"""
    head = _head(model)
    if (head is None or type(head).forward is not torch.nn.Linear.forward or _aligned(head.out_features)
            or not head.weight.is_floating_point()):
        return None
    return head


def align_head(model) -> bool:
    """Make `model`'s LM head compute over aligned rows (see the module docstring). False when
    there is nothing to do (`misaligned_head` is None), or a forward is set on the head already
    (ours, or another library's hook: left alone)."""
    head = misaligned_head(model)
    if head is None or "forward" in head.__dict__:
        return False
    # functools.partial of a module-level function: copy.deepcopy binds the copy to the copied head,
    # and the model still pickles
    head.forward = functools.partial(padded_linear, head)
    return True


def _ours(head) -> bool:
    fwd = head.__dict__.get("forward")  # (another library's hook may be a partial too: accelerate's)
    return isinstance(fwd, functools.partial) and fwd.func is padded_linear and fwd.args[0] is head


def unalign_head(model) -> None:
    head = _head(model)
    if head is not None and _ours(head):
        del head.__dict__["forward"]


def is_aligned(model) -> bool:
    head = _head(model)
    return head is not None and _ours(head)


@contextlib.contextmanager
def aligned_heads(models):
    """The models' heads aligned inside (those this call aligned are plain again afterwards)."""
    done = [m for m in models if m is not None and align_head(m)]
    try:
        yield
    finally:
        for m in done:
            unalign_head(m)
