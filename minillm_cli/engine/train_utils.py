"""Pieces every training loop shares: optimizer, schedule, finiteness checks, gradient steps,
micro-batch plans with global normalisation, and signal handling for a clean stop."""
from __future__ import annotations

import math
import signal

import torch

from minillm_cli.errors import RunError


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), fused: bool = False):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: identical update arithmetic whatever the parameter grouping (1 vs N processes,
    # sharded or not). fused (one process's whole parameters on CUDA, the same on every process):
    # one kernel over all tensors instead of ~10 per tensor (for GPT-2 some 1,500 launches a step).
    if fused:
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, foreach=False)


def make_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(value: torch.Tensor | float, *, step: int, term: str) -> None:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise RunError(f"non-finite {term} ({v}) at step {step}; stopping (checkpoints saved before this step are kept)")


def clip_and_step(model, optimizer, scheduler, max_grad_norm: float, *, step: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)) if params else torch.tensor(0.0)
    if hasattr(norm, "full_tensor"):  # FSDP: DTensor gradients, the norm is over all shards
        norm = norm.full_tensor()
    check_finite(norm, step=step, term="gradient norm")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    """Cut a global batch into micro-batches of fixed composition (independent of process count)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed for the dropout masks of one micro-batch: a function of what it is, not where it runs."""
    return (seed * 1_000_003 + step * 10_007 + micro) % (2**31 - 1)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits. A second
    signal restores the default behaviour (so a stuck run can still be killed)."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        for sig, old in self._old.items():
            # SIGTERM's default kills even a process stuck in C (the CLI's own handler, the one
            # outside, raises an exception that such a process never reaches)
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else old)

    def agreed(self, rt) -> str | None:
        """The signal every process acts on after this step (None: carry on). A collective: call it
        at the same point of every step on every process."""
        mine = int(signal.Signals[self.requested]) if self.requested else 0
        code = rt.agree_stop(mine)
        return signal.Signals(code).name if code else None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except ValueError:
                pass
        return False


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_for_step(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of global batch `step`, walking seeded per-epoch permutations."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    order = shuffled_order(n, seed, epoch)
    if n < batch_size:  # tiny data: sample with wrap-around
        return [order[(k * batch_size + i) % n] for i in range(batch_size)]
    return order[k * batch_size : (k + 1) * batch_size]

