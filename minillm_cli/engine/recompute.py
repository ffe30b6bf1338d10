"""Activation recomputation (gradient checkpointing) for the trained model, by transformer block.

`recompute_blocks(model)` makes every decoder block keep only its inputs for the backward and run
its forward again when the backward reaches it: the activation memory of the student's update
step falls from all blocks' intermediates to one block's plus the residual stream at each block
boundary, for about one more forward of compute. Wanted when the batch or the model no longer
fits (e.g. a larger student, or `--micro-batch-size` raised for speed).

Why our own wrapper rather than transformers' `gradient_checkpointing_enable`: transformers
checkpoints only in training mode, while the MiniLLM update keeps the student in eval mode
(dropout off, so that the PPO ratio starts at 1); and its mechanism differs between the releases
we support. Here the block's `forward` (an instance attribute, so the class and the saved model
are untouched) runs under `torch.utils.checkpoint` (non-reentrant, random state preserved, so
dropout draws the same mask again) whenever gradients are enabled. Module hooks, e.g. FSDP2's,
stay outside the checkpoint: they run once per forward and unshard the weights before the
recompute in the backward. Forwards must not write a KV cache (`use_cache=False`), or the
recompute would write it twice; the engine's training forwards pass it.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _blocks(model) -> list[torch.nn.Module]:
    """The model's decoder blocks: transformers' checkpointable layers (every decoder-only
    architecture in transformers 5), else the modules of its longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        found = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
        outer = [m for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
        if outer:
            return outer
    except ImportError:  # pragma: no cover - older transformers
        pass
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def recompute_blocks(model) -> int:
    """Checkpoint each decoder block of `model` in place; returns how many. Idempotent."""
    blocks = _blocks(model)
    for block in blocks:
        if getattr(block, "_minillm_recompute", False):
            continue
        plain = block.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._minillm_recompute = True
    return len(blocks)
