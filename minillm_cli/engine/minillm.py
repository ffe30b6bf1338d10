"""MiniLLM for one rollout batch: score it once, then the update loss of one micro-batch.

    rollout (sampler.sample) --score_rollouts--> RolloutBatch --select--> micro-batch
        --minillm_loss--> single-step reverse KL + clipped long-term policy-gradient term

What is computed (q = student, p = teacher, p~ = mixed sampling distribution, METHOD.md):
    loss = sum_t ss_w_t KL(q_t || p_t)                                   (single step, exact over V)
         + sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 +- eps))             (long term)
    rho_t = q_theta(y_t) / q_old(y_t) * pg_w_t,   A_t = (normalised) return of the later rewards
all divided by the caller's normalizer. At the first update and alpha = 0 (or "sequence"
importance weights) its gradient is an unbiased estimate of grad KL(q || p) over sequences
(tests/unit/test_estimator.py checks this against exact enumeration).

Dropout: keep the student in eval mode during updates (as the reference code does), otherwise
q_theta != q_old at the first step and the PPO ratio is noise. `score_rollouts` switches the
models to eval itself; the update loop owns the student's mode during `minillm_loss`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from minillm_cli.engine.advantages import importance_weights, long_term_advantages, token_rewards
from minillm_cli.engine.losses import DEFAULT_CHUNK, masked_sum, policy_gradient_loss, token_logprobs, vocab_terms
from minillm_cli.engine.runtime import to_device
from minillm_cli.engine.sampler import Rollout, _hf_model, causal_allow, model_kwargs, positions_from_mask
from minillm_cli.errors import require


@dataclass
class MiniLLMOptions:
    """Paper defaults. The reference code's choices: gamma=0.95, include_current_reward=True,
    whiten=True, reward_scale=0.5 (rewards divided by it), reward_clip=100 (see METHOD.md)."""
    single_step: bool = True
    length_norm: bool = True
    gamma: float = 1.0
    include_current_reward: bool = False
    whiten: bool = False
    reward_scale: float = 1.0
    reward_clip: float | None = None
    clip_ratio: float | None = 0.2
    importance_weight: str = "token"  # "token" (paper) | "sequence" (exactly unbiased)
    chunk_size: int | None = DEFAULT_CHUNK
    # keep the teacher's response logits from score_rollouts (the teacher is frozen, so they are
    # the same in every PPO epoch) instead of a teacher forward per micro-batch per epoch:
    # N x T x V values of the teacher's dtype held for the whole buffer (bf16 gpt2-xl, 256 x 256:
    # 6.6 GB). Exact. `distill` turns it on where it fits (`teacher_logit_cache`).
    cache_teacher_logits: bool = False

    def __post_init__(self):
        require(self.importance_weight in ("token", "sequence"),
                f"importance weight must be 'token' or 'sequence', got {self.importance_weight!r}")
        require(0.0 < self.gamma <= 1.0, f"gamma must be in (0, 1], got {self.gamma}")
        require(self.clip_ratio is None or self.clip_ratio >= 0,
                f"clip ratio must be >= 0, got {self.clip_ratio}")

    @property
    def caches_teacher_logits(self) -> bool:
        """Only the single-step term reads the teacher's whole distribution."""
        return self.cache_teacher_logits and self.single_step

    @property
    def advantage_includes_current(self) -> bool:
        """Without the single-step term nothing else accounts for r_t, so the advantage must be
        the full return R_t (the plain policy gradient); with it, only the later rewards."""
        return self.include_current_reward or not self.single_step


@dataclass
class RolloutBatch:
    """Scored rollouts, all on one device.

    input_ids, attention_mask [N, P+T]: left-padded prompt followed by the response (attention
        0 on padding on both sides). prompt_len = P.
    response_mask, old_logp, teacher_logp, rewards, advantages, pg_weights, ss_weights, w
        [N, T] over response positions (0 where masked). Response token t of row n is
        input_ids[n, P + t], predicted by the logits at position P + t - 1: in the aligned
        [N, P+T-1] view of DESIGN.md its column is P - 1 + t (see `aligned_mask`).
    w = q'(y_t) / p~'(y_t), the per-token sampling ratio (for logging)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    teacher_logp: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    pg_weights: torch.Tensor
    ss_weights: torch.Tensor
    w: torch.Tensor
    teacher_logits: torch.Tensor | None = None  # [N, T, V] when opts.cache_teacher_logits
    # whether some row has left padding (known on the host after `select`; None: read it from the
    # device when a forward needs it, see `forward_mask`)
    left_padded: bool | None = None

    _PER_TOKEN = ("response_mask", "old_logp", "teacher_logp", "rewards", "advantages",
                  "pg_weights", "ss_weights", "w")

    @property
    def targets(self) -> torch.Tensor:
        """[N, T] response tokens."""
        return self.input_ids[:, self.prompt_len :]

    def aligned_mask(self) -> torch.Tensor:
        """[N, P+T-1] mask aligned with `logits[:, :-1]` / `input_ids[:, 1:]`."""
        N = self.input_ids.shape[0]
        pad = torch.zeros(N, self.prompt_len - 1, dtype=torch.bool, device=self.input_ids.device)
        return torch.cat([pad, self.response_mask.bool()], dim=1)

    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def row_extents(self) -> tuple[list[int], list[int]]:
        """Per row, on the host: (first real prompt column, response length). Read from the device
        once per buffer and kept (not a dataclass field: `replace` and checkpoints leave it out),
        so that selecting micro-batches never waits for the device."""
        ext = getattr(self, "_extents", None)
        if ext is None:
            P = self.prompt_len
            real = self.attention_mask[:, :P].bool()
            first = torch.where(real.any(1), real.to(torch.uint8).argmax(1), torch.full_like(real[:, 0], P - 1,
                                                                                             dtype=torch.long))
            both = torch.stack([first.long(), self.response_mask.long().sum(1)]).tolist()
            ext = self._extents = (both[0], both[1])
        return ext

    def tokens_in(self, rows) -> int:
        """Response tokens in `rows` (host arithmetic, see `row_extents`)."""
        lengths = self.row_extents()[1]
        return sum(lengths[i] for i in rows)

    def select(self, idx, bucket: bool = False) -> "RolloutBatch":
        """Rows `idx` (list or tensor), with columns that are padding for all of them trimmed
        (left prompt padding, trailing response padding): same math, less compute. The trim
        comes from `row_extents` and the row indices reach the device without a blocking copy.
        The width is a multiple of WIDTH_BUCKET where the prompt columns allow; bucket: the
        response columns too (up to all T), so that micro-batches come in few shapes (one CUDA
        graph each: engine/captured_step.py); the extra columns are masked response padding."""
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else [int(i) for i in idx]
        first, lengths = self.row_extents()
        P, T = self.prompt_len, self.response_mask.shape[1]
        keep_T = max([1] + [lengths[i] for i in rows])
        if bucket:
            keep_T = min(T, -(-keep_T // WIDTH_BUCKET) * WIDTH_BUCKET)
        # >= 1 prompt column: it predicts response token 1
        lead = bucketed_start(min([first[i] for i in rows] + [P - 1]), P + keep_T)
        idx = to_device(torch.tensor(rows, dtype=torch.long), self.input_ids.device)
        cols = slice(lead, P + keep_T)
        per_token = {f: getattr(self, f)[idx][:, :keep_T] for f in self._PER_TOKEN}
        tl = None if self.teacher_logits is None else self.teacher_logits[idx][:, :keep_T]
        return replace(self, input_ids=self.input_ids[idx][:, cols], attention_mask=self.attention_mask[idx][:, cols],
                       prompt_len=P - lead, teacher_logits=tl, **per_token,
                       # (a row with no real prompt column has first = P - 1 too: counted as padded)
                       left_padded=any(first[i] > lead or first[i] == P - 1 for i in rows))


# Forwards over a selection of rows start this many columns' multiple before their end (more
# left padding, masked: exact up to float rounding), so that teacher-forced forwards come in few
# sequence lengths. Each new length costs attention (cuDNN) a new execution plan. H200 run 3
# (2026-11-28): an iteration's update micro-steps, of ragged widths, took 2.9 s more than the
# same number at one fixed width (train_step.py), on the naive side as on ours -- a per-shape
# cost, by that evidence. Run 4: 128 update micro-steps 5.97 s with exact widths, 4.83 s bucketed
# (3.96 s with `forward_mask`, which the bucketing made necessary).
WIDTH_BUCKET = 64


def bucketed_start(start: int, end: int) -> int:
    """The first column of a forward over columns [start, end): moved left (never below 0) so the
    width is a multiple of WIDTH_BUCKET."""
    width = -(-(end - start) // WIDTH_BUCKET) * WIDTH_BUCKET
    return max(0, min(start, end - width))


def forward_mask(model, attention_mask: torch.Tensor, left_padded: bool | None = None):
    """The attention mask a teacher-forced forward over [N, L] rows gets. Under a causal mask a
    left-padding query has no key at all, and attention kernels may give NaN for such a row: H200,
    2026-11-28, torch 2.11, one MiniLLM iteration with forwards widened to multiples of 64 columns
    (WIDTH_BUCKET) ended with NaN weights on both sides, and with exact widths it did not -- the
    row's NaN reaches every position through a later layer's 0 x NaN, in the backward at least.
    So where the model runs transformers' sdpa attention, every layer is plainly causal and some
    row is left-padded: a 4-D boolean mask in which each padding query sees itself
    (`causal_allow`), exact for real positions (a padding position is no other query's key).
    Otherwise the 2-D mask as is (`response_logits` then runs SDPA's causal kernel where the
    rows are known on the host to have no left padding: `_causal_only`).
    left_padded: known on the host, or None to read it (one host sync)."""
    if not _sdpa_plain_causal(model):
        return attention_mask
    if left_padded is None:
        left_padded = bool((attention_mask[:, 0] == 0).any())
    if not left_padded:
        return attention_mask
    return causal_allow(attention_mask.bool(), attention_mask.shape[1])


def _sdpa_plain_causal(model) -> bool:
    """A transformers model under its sdpa attention whose layers are all plainly causal."""
    cfg = getattr(_hf_model(model), "config", None)  # (None: not a transformers model)
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and _plain_causal(cfg)


def _plain_causal(cfg) -> bool:
    """Whether every layer attends causally over all earlier positions: a ready 4-D mask replaces
    transformers' own, so sliding-window or chunked layers would lose their pattern."""
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if getattr(cfg, "attention_chunk_size", None):
        return False
    types = getattr(cfg, "layer_types", None)
    if types:  # (Qwen2 keeps a `sliding_window` size it does not use: the layer types decide)
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "sliding_window", None)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int,
                    left_padded: bool | None = None) -> torch.Tensor:
    """Logits predicting the last T tokens of input_ids: [N, L] -> [N, T, V']. Only the last
    T + 1 positions go through the LM head when the model supports `logits_to_keep`.
    left_padded: see `forward_mask`. Rows known on the host to have no left padding, in a model
    whose layers are all plainly causal under transformers' sdpa attention, run SDPA's causal
    kernel (`_causal_only`): their only padding trails the real tokens, which causality hides
    from every real position already (exact), and transformers builds no mask, so no host read
    either (a CUDA graph could not capture one: engine/captured_step.py)."""
    mask = forward_mask(model, attention_mask, left_padded)
    causal = left_padded is False and mask is attention_mask and _sdpa_plain_causal(model)
    with _causal_only(causal), _autocast_off_for(model):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(attention_mask),
                    **model_kwargs(model, logits_to_keep=T + 1, use_cache=False))
    return out.logits[:, -(T + 1) : -1]


@contextlib.contextmanager
def _causal_only(active: bool):
    """Inside (when active), transformers' "sdpa" mask builder returns no mask, so its attention
    passes `is_causal=True` to SDPA. Left to itself transformers reads the 2-D mask on the host to
    decide whether it may skip the mask (`fast_all`: a synchronisation), and while a CUDA graph
    captures it never skips (transformers 5.17 treats capture as tracing), so the captured
    forwards ran SDPA's masked kernel over every key block (H200, 2026-11-28: the train step's
    attention forwards 3.90 ms captured against 1.75 ms eager). Only for rows with no left
    padding in models whose layers are all plainly causal (`response_logits`)."""
    mapping = None
    if active:
        try:
            from transformers.masking_utils import AttentionMaskInterface

            mapping = AttentionMaskInterface._global_mapping
        except (ImportError, AttributeError):  # another transformers: its own mask, still exact
            mapping = None
    if mapping is None or "sdpa" not in mapping:
        yield
        return
    original = mapping["sdpa"]
    mapping["sdpa"] = _no_mask
    try:
        yield
    finally:
        mapping["sdpa"] = original


def _no_mask(*args, **kwargs):
    return None


# Model types whose forwards run no op that autocast would lift to float32 other than layer_norm
# (their RMSNorms cast to float32 themselves, their rotary code turns autocast off, their
# activations are single kernels -- GPT-2's composed `gelu_new` once engine/fused.py replaces it).
_AUTOCAST_NEUTRAL = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "opt"})


def _autocast_off_for(model):
    """A forward without gradients of a model whose floating weights are all in autocast's dtype
    runs without autocast: the matmuls are in that dtype either way, and autocast would only add
    float32 detours -- a layer norm's input, weight and bias cast up, its float32 output written
    and cast back before the next matmul, some 90 MB of traffic per layer norm at the train step's
    teacher shapes (~300 extra kernels a gpt2-xl forward; H200 run 5: with `_causal_only`, the
    captured train step went from 51.3 to 44.2 ms of kernel time). The same
    arithmetic: the norm computes in float32 either way and rounds its output once. Only for the
    model types in `_AUTOCAST_NEUTRAL` with no composed activation left (elsewhere an op such as
    `pow` in a composed GELU would run in bf16 instead of float32)."""
    # the cheap checks first: this runs before every teacher-forced forward (the scans below only
    # for a no-grad forward of a listed model type under autocast)
    first = next(iter(model.parameters()), None)
    if first is None or torch.is_grad_enabled():
        return contextlib.nullcontext()
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return contextlib.nullcontext()
    cfg = getattr(_hf_model(model), "config", None)
    if getattr(cfg, "model_type", None) not in _AUTOCAST_NEUTRAL:
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(dev)
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        return contextlib.nullcontext()
    from minillm_cli.engine.fused import _composed

    composed = _composed()
    if any(isinstance(m, composed) for m in model.modules()):
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False)


def _batch_logits(model, batch: RolloutBatch) -> torch.Tensor:
    return response_logits(model, batch.input_ids, batch.attention_mask,
                           batch.response_mask.shape[1], batch.left_padded)


def response_logits_in_chunks(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              response_mask: torch.Tensor, rows: int | None):
    """Yields (row slice, logits [r, t, V'], t) per chunk of `rows` rows (None: all rows in one
    forward, t = T): the logits predicting the chunk's first t response tokens, t its longest
    response. Each chunk's forward covers only its own columns, from its first real prompt
    column to its last response token (one rollout batch pads every prompt to its longest and
    every response to its longest); exact, since positions come from the mask and the model is
    causal. input_ids / attention_mask [N, P + T], response_mask [N, T]."""
    N, T = response_mask.shape
    P = input_ids.shape[1] - T
    step = rows or N
    if step >= N:
        yield slice(0, N), response_logits(model, input_ids, attention_mask, T), T
        return
    # one host read for the whole batch: each row's first real column and its response length
    starts, lengths = torch.stack([(attention_mask.cumsum(1) == 0).sum(1), response_mask.sum(1)]).tolist()
    for a in range(0, N, step):
        r = slice(a, a + step)
        t = max(1, max(lengths[r]))
        cut = bucketed_start(min(min(starts[r]), P - 1), P + t)
        yield r, response_logits(model, input_ids[r, cut : P + t], attention_mask[r, cut : P + t], t,
                                 max(starts[r]) > cut), t


@torch.no_grad()
def score_rollouts(student, teacher, rollout: Rollout, opts: MiniLLMOptions, vocab_size: int,
                   rows_per_forward: int | None = None) -> RolloutBatch:
    """Teacher-forced, no-grad scoring of a rollout batch, done once before the PPO epochs.

    old_logp = log q_old(y_t) (unfiltered, temperature 1, the policy being trained),
    teacher_logp = log p(y_t), rewards r_t = log p - log q_old, importance weights from the
    sampling-time log-probs (importance_weights), then the advantages (long_term_advantages;
    r_t is included when opts.single_step is False, see MiniLLMOptions).
    rows_per_forward: the forwards run on this many rows at a time (None: all), so a large
    rollout batch does not need [N, T, V] logits of both models at once; the advantages (and
    their whitening) are computed over the whole rollout batch either way. Kept teacher logits
    past a row's chunk's longest response are zeros (masked positions, never used)."""
    require(rollout.student_logp is not None,
            "MiniLLM needs rollouts that ran the student (got a teacher-only rollout)")
    mask = rollout.response_mask.bool()
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask.long(), mask.long()], dim=1)
    N, T = mask.shape
    logps, kept = {}, None
    for name, model in (("student", student), ("teacher", teacher)):
        was_training = model.training
        model.eval()
        lp = None
        try:
            for rows, logits, t in response_logits_in_chunks(model, input_ids, attention, mask, rows_per_forward):
                part = token_logprobs(logits, rollout.response_ids[rows, :t], vocab_size, opts.chunk_size)
                if lp is None:
                    lp = part.new_zeros((N, T))
                lp[rows, :t] = part
                if name == "teacher" and opts.caches_teacher_logits:
                    # their own storage: a view would keep the whole forward's logits alive (padded
                    # vocabulary columns; all positions for a model without `logits_to_keep`)
                    if kept is None:
                        kept = logits.new_zeros((N, T, vocab_size))
                    kept[rows, :t] = logits[..., :vocab_size]
                del logits
        finally:
            model.train(was_training)
        logps[name] = torch.where(mask, lp, torch.zeros_like(lp))
    old_logp, teacher_logp = logps["student"], logps["teacher"]
    rewards = token_rewards(teacher_logp, old_logp, mask)
    iw = importance_weights(rollout.student_logp.to(old_logp.dtype),
                            rollout.mix_logp.to(old_logp.dtype), mask, opts.importance_weight,
                            length_norm=opts.length_norm)
    advantages = long_term_advantages(
        rewards, mask, length_norm=opts.length_norm, gamma=opts.gamma,
        include_current=opts.advantage_includes_current, whiten=opts.whiten,
        scale=opts.reward_scale, clip=opts.reward_clip, reward_weights=iw.reward)
    w = torch.where(mask, (rollout.student_logp - rollout.mix_logp).to(old_logp.dtype).exp(),
                    torch.zeros_like(old_logp))
    return RolloutBatch(input_ids=input_ids, attention_mask=attention,
                        prompt_len=rollout.prompt_ids.shape[1], response_mask=mask,
                        old_logp=old_logp, teacher_logp=teacher_logp, rewards=rewards,
                        advantages=advantages, pg_weights=iw.pg, ss_weights=iw.ss, w=w,
                        teacher_logits=kept)


def minillm_terms(s_logits: torch.Tensor, t_logits: torch.Tensor | None, batch: RolloutBatch,
                  opts: MiniLLMOptions, normalizer: float, vocab_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The two terms from the logits: (pg, single_step or None, pg stats), each `sum / normalizer`.

    s_logits [N, T, V'] (student, with grad), t_logits [N, T, V''] (teacher; None when
    opts.single_step is off), batch: the micro-batch they were computed on (T response positions).
    One pass over the vocabulary gives both the sampled tokens' log-probs (for the clipped term)
    and the per-position KL(q || p) (losses.vocab_terms)."""
    mask = batch.response_mask.bool()
    new_logp, kl = vocab_terms(s_logits, vocab_size, targets=batch.targets,
                               other=t_logits if opts.single_step else None, kind="reverse",
                               chunk_size=opts.chunk_size)
    pg, pg_stats = policy_gradient_loss(new_logp, batch.old_logp, batch.advantages,
                                        batch.pg_weights, mask, opts.clip_ratio, normalizer)
    if not opts.single_step:
        return pg, None, pg_stats
    return pg, masked_sum(kl, mask, batch.ss_weights) / normalizer, pg_stats


def minillm_loss(student, teacher, batch: RolloutBatch, opts: MiniLLMOptions, normalizer: float,
                 vocab_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MiniLLM loss of one micro-batch, `sum / normalizer` (pass the global token count of
    the mini-batch, or the number of sequences for a per-sequence objective).

    Student forward with grad; teacher forward without grad and only for the single-step term.
    Returns (loss, stats), stats as detached 0-dim tensors (no host sync): `single_step`, `pg`
    (the two terms of the loss), `clip_frac`, `ratio_mean`, `w_mean`/`w_max` (sampling ratio
    q'/p~'), `reward_mean` (per token), `rkl_seq` (mean over rows of sum_t log q_old - log p: the
    sequence-level reverse KL estimate, unbiased when alpha = 0), `tokens`."""
    s_logits = _batch_logits(student, batch)
    t_logits = None
    if opts.single_step:
        if batch.teacher_logits is not None:  # cached once per rollout batch (exact)
            t_logits = batch.teacher_logits.to(s_logits.device)
        else:
            with torch.no_grad():
                t_logits = _batch_logits(teacher, batch)
    pg, ss, pg_stats = minillm_terms(s_logits, t_logits, batch, opts, normalizer, vocab_size)
    loss = pg if ss is None else pg + ss
    # Statistics stay on the device: a host read here would stall the queue between the forward
    # and the backward of every micro-batch; callers read them once per optimizer step.
    m = batch.response_mask.to(pg_stats["tokens"].dtype)
    n_tok = pg_stats["tokens"]
    denom = n_tok.clamp(min=1.0)
    w = batch.w.detach().to(m.dtype) * m  # the sampling ratio is > 0 wherever it counts
    stats = {
        "single_step": pg.new_zeros(()) if ss is None else ss.detach(),
        "pg": pg.detach(),
        "clip_frac": pg_stats["clip_frac"],
        "ratio_mean": pg_stats["ratio_mean"],
        "w_mean": w.sum() / denom,
        "w_max": w.max() if w.numel() else w.new_zeros(()),
        "reward_mean": batch.rewards.to(m.dtype).sum() / denom,
        "rkl_seq": -batch.rewards.to(m.dtype).sum(1).mean(),
        "tokens": n_tok,
    }
    return loss, stats


class StatsSum:
    """The statistics of one optimizer step's micro-batches, summed on the device (`add` never
    waits for it); `read` is the step's one host read. Per-token means are summed weighted by
    each micro-batch's token count, `rkl_seq` by its row count, `w_max` as a maximum; the loss
    terms are plain sums (each micro-batch already divides by the step's normalizer)."""

    TOKEN_MEANS = ("clip_frac", "ratio_mean", "w_mean", "reward_mean")
    KEYS = ("single_step", "pg", *TOKEN_MEANS, "rkl_seq")

    def __init__(self, device):
        self.acc = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=device)  # + w_max

    def add(self, stats: dict[str, torch.Tensor], n_rows: int) -> None:
        parts = [stats["single_step"], stats["pg"]] + [stats[k] * stats["tokens"] for k in self.TOKEN_MEANS]
        parts.append(stats["rkl_seq"] * n_rows)
        self.acc[:-1] += torch.stack([p.to(self.acc.dtype) for p in parts])
        self.acc[-1] = torch.maximum(self.acc[-1], stats["w_max"].to(self.acc.dtype))

    def read(self) -> tuple[dict[str, float], float]:
        """(sums by key, w_max): divide the token means by the step's token count, `rkl_seq` by
        its row count, after summing over processes."""
        values = self.acc.tolist()
        return dict(zip(self.KEYS, values[:-1])), values[-1]


# share of the memory free after loading the models that the teacher-logit cache may take at its
# peak (twice the buffer's logits: the scored parts and the buffer they are joined into); the
# optimizer state, the update step and the sampler's KV caches need the rest
CACHE_SHARE = 1 / 4


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2 ** k:
            return f"{n / 2 ** k:.1f} {unit}"
    return f"{n} B"


def teacher_logit_bytes(rollouts: int, max_new_tokens: int, vocab_size: int, dtype: torch.dtype) -> int:
    """Bytes the kept teacher logits of one iteration's buffer take at most."""
    return rollouts * max_new_tokens * vocab_size * torch.finfo(dtype).bits // 8


def teacher_logit_cache(requested: bool | None, *, single_step: bool, rollouts: int, max_new_tokens: int,
                        vocab_size: int, dtype: torch.dtype, free_bytes: int | None,
                        processes: int = 1) -> tuple[bool, str | None]:
    """Whether to keep the teacher's logits for the PPO epochs, and a note saying why when it was
    decided here. requested None: on when twice rollouts x max_new_tokens x vocab values of
    `dtype` (the most the buffer can hold -- every process holds the whole buffer -- and its
    scored parts while they are joined) fit in CACHE_SHARE of the memory free now, and only in a
    one-process run (with several, the buffer is gathered to every process through the host,
    logits included)."""
    if requested is not None:
        return requested, None
    if not single_step:
        return False, None  # (nothing would read it)
    if processes > 1:
        return False, ("teacher logits recomputed in every update: with several processes the rollout buffer "
                       "is gathered through the host (--cache-teacher-logits keeps them anyway)")
    need = teacher_logit_bytes(rollouts, max_new_tokens, vocab_size, dtype)
    if free_bytes is not None and 2 * need <= CACHE_SHARE * free_bytes:
        return True, (f"teacher logits kept from scoring for the PPO epochs: up to {_size(need)} (twice that "
                      f"while a buffer is joined) of {_size(free_bytes)} free (--no-cache-teacher-logits: a "
                      f"teacher forward per update)")
    have = "an unknown amount" if free_bytes is None else _size(free_bytes)
    return False, (f"teacher logits recomputed in every update: keeping them would take up to {_size(need)} "
                   f"(twice that while a buffer is joined) of {have} free (--cache-teacher-logits keeps them anyway)")

