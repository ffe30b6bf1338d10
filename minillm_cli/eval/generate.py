"""Batched sampling for evaluation, with the project's own sampler (KV cache, per-row randomness).

Prompts are sorted by length and cut into batches of `batch_size`, so a batch carries little left
padding. Row b of a batch draws its randomness from `example_generator(seed, index_b)`, where
index_b is the example's index in the evaluated list: a prediction therefore depends only on its
prompt, the model and (seed, index), never on the batch size, the sort or the other rows.

Length budget per row (the paper's protocol): at most `max_new_tokens`, and prompt + response at
most `max_length` tokens. The sampler runs one budget per batch (the largest of its rows); each row
is then cut at its own budget. That cut is exact because a row's first k tokens depend only on the
first k uniforms of its generator, and `torch.rand(T)` of a CPU generator is prefix-stable in T.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from minillm_cli.data.tokenize import left_pad
from minillm_cli.engine.runtime import example_generator
from minillm_cli.engine.sampler import SamplingParams, cut_at_stop, is_stop, release_engine, sample, stop_tuple


@dataclass
class GeneratedBatch:
    """One batch of samples. `rows` are indices into the prompt list given to `generate_batches`.

    prompt_ids, prompt_mask [B, P] left padded; response_ids [B, T] (pad after the end);
    response_mask [B, T] True on response tokens, EOS included, within the row's budget."""
    rows: list[int]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    eos_id: int | tuple[int, ...]  # (several: any of them ends a row, sampler.stop_tuple)

    def token_lists(self) -> list[list[int]]:
        """Each row's response tokens, cut at EOS (EOS itself excluded)."""
        out, stops = [], stop_tuple(self.eos_id)
        for ids, m in zip(self.response_ids.tolist(), self.response_mask.tolist()):
            out.append(cut_at_stop([t for t, keep in zip(ids, m) if keep], stops)[0])
        return out

    def ended(self) -> list[bool]:
        """Whether each row stopped on EOS (False: cut by its length budget)."""
        last = (self.response_mask.sum(1) - 1).clamp(min=0)
        hit = is_stop(self.response_ids.gather(1, last[:, None]).squeeze(1), stop_tuple(self.eos_id))
        return (hit & self.response_mask.any(1)).tolist()


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length, longest first (so a batch that does
    not fit in memory fails at once, not at the end). Ties keep the original order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def row_budgets(lengths: list[int], max_new_tokens: int, max_length: int) -> list[int]:
    """New-token budget of each prompt: min(max_new_tokens, max_length - prompt length), >= 0."""
    return [max(0, min(max_new_tokens, max_length - n)) for n in lengths]


def cut_to_budgets(response_mask: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """response_mask [B, T] with positions >= budgets[b] cleared in row b."""
    T = response_mask.shape[1]
    limit = torch.tensor(budgets, device=response_mask.device)[:, None]
    return response_mask & (torch.arange(T, device=response_mask.device)[None, :] < limit)


def generate_batches(model, prompts: list[list[int]], *, params: SamplingParams, seed: int,
                     example_ids: Optional[list[int]] = None, eos_id: int | tuple[int, ...], pad_id: int,
                     vocab_size: int, device: torch.device, batch_size: int, max_length: int,
                     engine: str = "eager") -> Iterator[GeneratedBatch]:
    """Sample one response per prompt, batch by batch (see the module docstring).

    prompts: token lists (each shorter than max_length); example_ids: the key of each prompt's
    generator (default: its position), so that dropping other examples never changes it.
    `params.max_new_tokens` is the cap; rows get less when their prompt is long."""
    if example_ids is None:
        example_ids = list(range(len(prompts)))
    if len(example_ids) != len(prompts):
        raise ValueError("need one example id per prompt")
    lengths = [len(p) for p in prompts]
    budgets = row_budgets(lengths, params.max_new_tokens, max_length)
    if any(b < 1 for b in budgets):
        raise ValueError(f"a prompt leaves no room for a response within max_length={max_length}")
    try:
        for rows in plan_batches(lengths, batch_size):
            ids, mask = left_pad([prompts[i] for i in rows], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            row_budget = [budgets[i] for i in rows]
            batch_params = replace(params, max_new_tokens=max(row_budget))
            gens = [example_generator(seed, example_ids[i]) for i in rows]
            ro = sample(model, None, ids, mask, params=batch_params, alpha=0.0, eos_id=eos_id,
                        pad_id=pad_id, generators=gens, vocab_size=vocab_size, engine=engine)
            resp_mask = cut_to_budgets(ro.response_mask, row_budget)
            resp_ids = torch.where(resp_mask, ro.response_ids, torch.full_like(ro.response_ids, pad_id))
            # Trim trailing columns no row uses any more (after the per-row cut).
            keep = max(1, int(resp_mask.sum(1).max()))
            yield GeneratedBatch(rows=list(rows), prompt_ids=ids, prompt_mask=mask.bool(),
                                 response_ids=resp_ids[:, :keep], response_mask=resp_mask[:, :keep],
                                 eos_id=eos_id)
    finally:  # also when the consumer stops early (the generator is closed)
        release_engine(engine)
