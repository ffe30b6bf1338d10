"""The rollout buffer of one MiniLLM iteration: which prompts it holds, how the scored micro-batches
of all processes are joined into one buffer, the PPO mini-batch plan over it, and its
checkpointable state. Everything here is a function of (seed, iteration), never of the rank."""
from __future__ import annotations

import dataclasses

import torch

from minillm_cli.engine.minillm import RolloutBatch
from minillm_cli.engine.train_utils import shuffled_order

_PER_TOKEN = RolloutBatch._PER_TOKEN


def prompts_for_iteration(n_prompts: int, num_rollouts: int, seed: int, iteration: int) -> list[int]:
    """Prompt indices of rollout iteration `iteration`: consecutive slices of seeded per-epoch
    permutations of the training prompts (wrapping into the next epoch as needed)."""
    out, pos = [], iteration * num_rollouts
    while len(out) < num_rollouts:
        epoch, k = divmod(pos, n_prompts)
        order = shuffled_order(n_prompts, seed + 17, epoch)
        take = min(num_rollouts - len(out), n_prompts - k)
        out.extend(order[k : k + take])
        pos += take
    return out


def ppo_plan(num_rollouts: int, batch_size: int, ppo_epochs: int, seed: int, iteration: int) -> list[list[int]]:
    """Mini-batches (global, `batch_size` rows each) for all PPO epochs over one buffer; each epoch
    is a fresh seeded shuffle. A last partial mini-batch is dropped, as in the reference code."""
    plan = []
    for e in range(ppo_epochs):
        order = shuffled_order(num_rollouts, seed + 31, iteration * 1009 + e)
        for i in range(0, num_rollouts - batch_size + 1, batch_size):
            plan.append(order[i : i + batch_size])
    return plan


def concat_batches(parts: list[RolloutBatch]) -> RolloutBatch:
    """Join scored micro-batches (different prompt and response widths) into one buffer: prompts
    are left-padded to the widest, responses right-padded (masks 0 on all padding)."""
    P = max(b.prompt_len for b in parts)
    T = max(b.response_mask.shape[1] for b in parts)
    ids, att = [], []
    per = {f: [] for f in _PER_TOKEN}
    for b in parts:
        lp, rp = P - b.prompt_len, T - b.response_mask.shape[1]
        ids.append(torch.nn.functional.pad(b.input_ids, (lp, rp), value=0))  # masked out by attention)
        att.append(torch.nn.functional.pad(b.attention_mask, (lp, rp), value=0))
        for f in _PER_TOKEN:
            per[f].append(torch.nn.functional.pad(getattr(b, f), (0, rp), value=0))
    teacher_logits = None
    if all(b.teacher_logits is not None for b in parts):  # cached once per rollout batch (opt-in)
        teacher_logits = torch.cat([torch.nn.functional.pad(b.teacher_logits, (0, 0, 0, T - b.teacher_logits.shape[1]))
                                    for b in parts])
    return RolloutBatch(input_ids=torch.cat(ids), attention_mask=torch.cat(att), prompt_len=P,
                        teacher_logits=teacher_logits, **{f: torch.cat(v) for f, v in per.items()})


def to_state(batch: RolloutBatch, *, keep_teacher_logits: bool = False) -> dict:
    """CPU copy of a buffer. Cached teacher logits (N×T×V) are left out unless asked for: they are
    huge in checkpoints. After a resume the teacher computes them again per update micro-batch:
    the same logits to float rounding, not bit for bit (other batch shapes than the scoring's)."""
    state = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if f.name == "teacher_logits" and not keep_teacher_logits:
            v = None
        state[f.name] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return state


def from_state(state: dict, device) -> RolloutBatch:
    return RolloutBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})


def gather_parts(rt, local: list[tuple[int, RolloutBatch]], device) -> RolloutBatch:
    """All processes' scored micro-batches, in micro-batch order, as one buffer on `device`."""
    if not rt.distributed:  # nothing to exchange: join in place (no copy out and back)
        return concat_batches([b for _, b in sorted(local, key=lambda kb: kb[0])])
    items = [(k, to_state(b, keep_teacher_logits=True)) for k, b in local]
    if rt.distributed:
        everyone = [None] * rt.world_size
        torch.distributed.all_gather_object(everyone, items)
        items = [x for part in everyone for x in part]
    items.sort(key=lambda kv: kv[0])
    return concat_batches([from_state(s, device) for _, s in items])
