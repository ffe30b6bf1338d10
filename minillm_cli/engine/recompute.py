"""Activation recomputation (gradient checkpointing) for the trained model, by transformer block.

`recompute_blocks(model)` makes every decoder block keep only its inputs for the backward and run
its forward again when the backward reaches it: the activation memory of the student's update
step falls from all blocks' intermediates to one block's plus the residual stream at each block
boundary, for about one more forward of compute. Wanted when the batch or the model no longer
fits (a larger student, longer sequences, or fewer `--grad-accum` micro-batches for speed).

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

import torch
from torch.utils.checkpoint import checkpoint

from minillm_cli.errors import InputError


class _Recompute:
    """A block's `forward` that runs its class's forward under checkpoint when gradients are on.
    An object (not a closure) so that `copy.deepcopy` binds the copy to the copied block and
    pickling works; it calls `type(block).forward`, which FSDP2's class swap keeps."""

    def __init__(self, block: torch.nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        forward = type(self.block).forward
        if torch.is_grad_enabled():
            return checkpoint(forward, self.block, *args, use_reentrant=False, **kwargs)
        return forward(self.block, *args, **kwargs)


def _blocks(model) -> list[torch.nn.Module]:
    """The model's decoder blocks: transformers' outermost checkpointable layers (every
    decoder-only architecture in transformers 5), else the ModuleList holding the most parameters
    (the rule FSDP sharding uses, `fsdp.blocks_of`; not the longest list, which in a
    mixture-of-experts model would be one layer's experts)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    found = [(n, m) for n, m in model.named_modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    outer = [m for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
    if outer:
        return outer
    from minillm_cli.engine.fsdp import blocks_of

    best = blocks_of(model)
    return list(best) if best is not None else []


def recompute_blocks(model) -> int:
    """Checkpoint each decoder block of `model` in place; returns how many (idempotent). Raises
    InputError when the model has no recognisable blocks, rather than silently saving nothing."""
    blocks = _blocks(model)
    if not blocks:
        raise InputError(f"--gradient-checkpointing: no transformer blocks found in a {type(model).__name__}")
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), _Recompute):
            block.forward = _Recompute(block)
    return len(blocks)
