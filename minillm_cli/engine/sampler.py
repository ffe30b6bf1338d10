"""Rollouts: teacher-mixed sampling (MiniLLM), student-only and teacher-only generation.

No forked `transformers` and no `model.generate`: we prefill the left-padded prompts of both
models in one pass each, then run one decode step per token with each model's KV cache, and mix
the two next-token distributions ourselves. The per-step "filter + mix + sample" is the pure
function `mix_and_sample`, so it can be tested against brute force (and later replaced by a fused
GPU version without touching the loop).

Randomness: one uniform per (row, step), drawn up front from that row's own CPU generator and
consumed by inverse-CDF sampling. A row's tokens therefore depend only on its prompt, the models
and its generator, never on the other rows of the batch, the batch size or the process count.
"""
from __future__ import annotations

import functools
import math
import inspect
from dataclasses import dataclass

import torch

from minillm_cli.errors import require


@dataclass
class SamplingParams:
    """Sampling settings, applied identically to student and teacher before mixing (HF order:
    no-repeat-ngram ban, then temperature, top-k, top-p). top_k 0 and top_p 1 mean off.
    ngram_prompt: the n-grams banned are those of the prompt and the answer (transformers'
    no_repeat_ngram_size, the paper's protocol); False: the answer's own only -- under --template
    chat, whose turn markers repeat in every turn, the prompt's ban the start and the end of every
    answer an earlier turn of the conversation had."""
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    ngram_prompt: bool = True

    def __post_init__(self):
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(0 < self.temperature < math.inf, f"temperature must be a finite number > 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.no_repeat_ngram_size >= 0,
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


@dataclass
class Rollout:
    """A batch of sampled responses.

    prompt_ids, prompt_mask [B, P]: left padded prompts (mask True on real tokens).
    response_ids [B, T]: sampled tokens, pad_id after EOS; T = steps actually run.
    response_mask [B, T]: True up to and including EOS.
    student_logp [B, T] = log q'(y_t), mix_logp [B, T] = log p~'(y_t): log-probabilities of the
        filtered distributions the token was drawn with (0 where masked). student_logp is None
        for teacher-only rollouts (the student never ran)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    student_logp: torch.Tensor | None
    mix_logp: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of response tokens (EOS included)."""
        return self.response_mask.sum(1)


# -- the pure per-step function -------------------------------------------------------------

def filtered_logprobs(logits: torch.Tensor, params: SamplingParams,
                      banned: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities after the ban, temperature, top-k and top-p; -inf outside the kept set.

    logits [B, V] (already sliced to the vocabulary), banned [B, V] bool or None -> [B, V] in
    float32 (float64 for float64 logits). Semantics match transformers' warpers: top-k keeps
    every token tied with the k-th largest; top-p keeps the smallest top set whose mass reaches
    top_p (a token is dropped when the mass strictly above it is already >= top_p)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if banned is not None:
        x = x.masked_fill(banned, float("-inf"))
    if params.temperature != 1.0:
        x = x / params.temperature
    V = x.shape[-1]
    if 0 < params.top_k < V:
        kth = x.topk(params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False  # never drop the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.log_softmax(-1)


def mix_and_sample(student_logits: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                   alpha: float, params: SamplingParams, uniforms: torch.Tensor,
                   banned: torch.Tensor | None = None, never: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Filter both distributions, mix p~' = alpha p' + (1 - alpha) q', draw by inverse CDF.

    student_logits, teacher_logits [B, V] (either may be None: then the other model alone is
    sampled, whatever alpha), uniforms [B] in [0, 1), banned [B, V] bool or None
    -> tokens [B] long, logq [B] = log q'(token) (None without a student), logmix [B] = log p~'(token).
    With alpha = 0 logmix is exactly logq (so importance weights are exactly 1).
    `never` is a token id that is never drawn (the pad token: for GPT-2-style vocabularies it is a
    row we added, which no model was trained to avoid), removed from both distributions."""
    if never is not None and 0 <= never < (student_logits if student_logits is not None else teacher_logits).shape[-1]:
        student_logits = _without(student_logits, never)
        teacher_logits = _without(teacher_logits, never)
    if teacher_logits is None or (student_logits is not None and alpha <= 0.0):
        logq = filtered_logprobs(student_logits, params, banned)
        logmix = logq
    elif student_logits is None or alpha >= 1.0:
        logq = None
        logmix = filtered_logprobs(teacher_logits, params, banned)
    else:
        logq = filtered_logprobs(student_logits, params, banned)
        logp = filtered_logprobs(teacher_logits, params, banned).to(logq.dtype)
        logmix = torch.logaddexp(logp + torch.log(torch.tensor(alpha, dtype=logq.dtype)),
                                 logq + torch.log1p(torch.tensor(-alpha, dtype=logq.dtype)))
    probs = logmix.exp()
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to total: never step past the last token with non-zero probability
    V = probs.shape[-1]
    last_ok = torch.where(probs > 0, torch.arange(V, device=probs.device), 0).amax(-1)
    tokens = torch.minimum(tokens, last_ok)
    logmix_tok = logmix.gather(-1, tokens[:, None]).squeeze(-1)
    logq_tok = None if logq is None else logq.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logq_tok, logmix_tok


def _without(logits: torch.Tensor | None, token: int) -> torch.Tensor | None:
    if logits is None:
        return None
    out = logits.clone()
    out[..., token] = float("-inf")
    return out


# -- no-repeat-ngram ------------------------------------------------------------------------

class NGramBlocker:
    """transformers' no_repeat_ngram_size over each row's real tokens (prompt without padding,
    then the response): a token is banned when it would complete an n-gram already present.
    Per row, so left padding and the other rows never matter (unlike a padded input_ids)."""

    def __init__(self, n: int, prompts: list[list[int]]):
        self.n = n
        self.seqs = [list(p) for p in prompts]
        self.table: list[dict[tuple, set]] = [dict() for _ in prompts]
        for b, seq in enumerate(self.seqs):
            for i in range(len(seq) - n + 1):
                self.table[b].setdefault(tuple(seq[i : i + n - 1]), set()).add(seq[i + n - 1])

    def banned(self, vocab_size: int, alive: list[bool], device) -> torch.Tensor:
        mask = torch.zeros(len(self.seqs), vocab_size, dtype=torch.bool)
        for b, seq in enumerate(self.seqs):
            if not alive[b] or len(seq) + 1 < self.n:
                continue
            key = tuple(seq[len(seq) - self.n + 1 :]) if self.n > 1 else ()
            for tok in self.table[b].get(key, ()):
                if tok < vocab_size:
                    mask[b, tok] = True
        return mask.to(device)

    def append(self, tokens: list[int], alive: list[bool]) -> None:
        for b, tok in enumerate(tokens):
            if not alive[b]:
                continue
            seq = self.seqs[b]
            seq.append(tok)
            if len(seq) >= self.n:
                self.table[b].setdefault(tuple(seq[len(seq) - self.n : -1]), set()).add(tok)


# -- model calls ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def _hf_model(model):
    """The module whose forward signature tells us the argument names (PEFT wraps it)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def model_kwargs(model, *, cache=None, logits_to_keep: int | None = None, use_cache: bool) -> dict:
    """Version-proof keyword arguments: transformers >= 5.x names the KV cache `cache`
    (`past_key_values` is deprecated there), earlier versions `past_key_values`."""
    params = _forward_params(type(_hf_model(model)))
    kw: dict = {"use_cache": use_cache}
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    if logits_to_keep is not None and "logits_to_keep" in params:
        kw["logits_to_keep"] = logits_to_keep
    return kw


def output_cache(out):
    """The KV cache a forward returned (field `cache` in transformers 5, else `past_key_values`)."""
    for name in ("cache", "past_key_values"):
        if isinstance(out, dict) and out.get(name) is not None:
            return out[name]
    return getattr(out, "cache", None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """position_ids for left-padded rows: 0 at the first real token. [B, L] -> [B, L] long."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_allow(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, L] valid keys -> [B, 1, q_len, L] boolean attention mask for queries at columns
    0..q_len-1: query i sees valid keys <= i, and always itself, so a padding query never has an
    empty row (no NaN on any attention kernel, forward or backward); its output is never attended
    to (it is no other query's valid key)."""
    L = key_valid.shape[1]
    ar = torch.arange(L, device=key_valid.device)
    qi = torch.arange(q_len, device=key_valid.device)[:, None]
    allow = (ar[None, :] <= qi)[None] & (key_valid[:, None, :] | (ar[None, :] == qi)[None])
    return allow[:, None]


class _Stepper:
    """One model's prefill + cached decode, returning next-token logits [B, V] (sliced)."""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size, self.cache = model, vocab_size, None

    def prefill(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                         **model_kwargs(self.model, logits_to_keep=1, use_cache=True))
        self.cache = output_cache(out)
        return out.logits[:, -1, : self.vocab_size]

    def step(self, tokens, mask, positions):
        out = self.model(input_ids=tokens[:, None], attention_mask=mask,
                         position_ids=positions[:, None],
                         **model_kwargs(self.model, cache=self.cache, logits_to_keep=1,
                                        use_cache=True))
        new_cache = output_cache(out)  # (a Cache object may be falsy when empty: test None)
        if new_cache is not None:
            self.cache = new_cache
        return out.logits[:, -1, : self.vocab_size]


def position_cap(models, last: int) -> int | None:
    """The last position a decode step may feed to these models when positions run up to `last`
    (None: no cap, as none passes the models' position tables -- rollouts, whose prompt + new
    tokens fit the context, so they run no extra kernel). A batch decodes
    for as many steps as its longest row's budget, so a row with a long prompt and a smaller
    budget of its own (evaluate: min(max_new_tokens, max_length - prompt)) keeps decoding past
    it, and its positions may run past a learned position table (GPT-2's 1024): an index error.
    Those steps' tokens are discarded, and every kept token lies within the context (the
    commands' check_context refuses longer lengths for such models), so clamping the positions
    changes no kept token."""
    from minillm_cli.models import _learned_positions, context_limit

    caps = []
    for m in models:
        limit = context_limit(m) if m is not None else None
        # (the module scan only where the configured context is passed)
        if limit is not None and last > limit[0] - 1 and _learned_positions(m):
            caps.append(limit[0] - 1)
    return min(caps) if caps else None


def release_engine(engine: str) -> None:
    """Free what a fast engine keeps between calls (static KV caches, CUDA graph memory) once a
    phase of sampling is over, so the training that follows has the memory; no-op for "eager"."""
    if engine != "eager":
        from minillm_cli.engine.fast_sampler import release

        release()


def stop_tuple(eos_id) -> tuple[int, ...]:
    """The tokens that end a row, from a sampler's `eos_id`: one id, or several (`--template
    chat`: the template's end of turn, then EOS). The first is fed to rows that have ended."""
    stops = (int(eos_id),) if isinstance(eos_id, int) else tuple(int(i) for i in eos_id)
    if not stops:
        raise ValueError("eos_id: at least one stop token")
    return stops


def cut_at_stop(toks: list[int], stops: tuple[int, ...]) -> tuple[list[int], bool]:
    """A row's response tokens without the stop that ended it, and whether one did (False: the
    row was cut by its length budget)."""
    ended = bool(toks) and toks[-1] in stops
    return (toks[:-1] if ended else toks), ended


def is_stop(tok: torch.Tensor, stops: tuple[int, ...]) -> torch.Tensor:
    """tok == any of `stops` (elementwise; one comparison per stop, no host read)."""
    hit = tok == stops[0]
    for s in stops[1:]:
        hit = hit | (tok == s)
    return hit


@torch.no_grad()
def sample(student, teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
           params: SamplingParams, alpha: float, eos_id: int | tuple[int, ...], pad_id: int,
           generators: list[torch.Generator], vocab_size: int, engine: str = "eager", sync=None) -> Rollout:
    """Sample one response per prompt.

    prompt_ids, prompt_mask [B, P] left padded (on the models' device), generators: B CPU
    generators (row b draws its uniforms from generators[b]). Mode: teacher-mixed for
    0 < alpha < 1; student-only when teacher is None or alpha = 0 (the teacher never runs);
    teacher-only when student is None or alpha = 1 (the student never runs). Stops when every
    row has produced EOS (any of eos_id's tokens where it names several: `stop_tuple`) or after
    params.max_new_tokens. Models run in eval mode; their previous
    mode is restored afterwards.

    engine: "eager" (this loop, the reference) or one of fast_sampler.ENGINES ("auto": CUDA
    graph on CUDA, this loop elsewhere; "static", "graph", "compile"): the same distribution
    with static KV caches (engine/fast_sampler.py).

    sync: optional `sync(all_done_here: bool) -> bool` deciding together whether to stop (FSDP:
    every decode step is a collective, so all processes must run the same number of steps; rows
    of a process that finished early keep decoding as padding). None: stop when this batch is done."""
    if engine != "eager":
        from minillm_cli.engine.fast_sampler import fast_sample, resolve_engine

        if resolve_engine(engine, prompt_ids.device) != "eager":
            return fast_sample(student, teacher, prompt_ids, prompt_mask, params=params,
                               alpha=alpha, eos_id=eos_id, pad_id=pad_id, generators=generators,
                               vocab_size=vocab_size, engine=engine)
    require(0.0 <= alpha <= 1.0, f"teacher-mix alpha must be in [0, 1], got {alpha}")
    require(student is not None or teacher is not None, "sample() needs a student or a teacher")
    stops = stop_tuple(eos_id)
    if teacher is None:
        alpha = 0.0
    if student is None:
        alpha = 1.0
    B, P = prompt_ids.shape
    require(len(generators) == B, f"need one generator per row: {len(generators)} for {B} rows")
    device = prompt_ids.device
    T = params.max_new_tokens
    uniforms = torch.stack([torch.rand(T, generator=g) for g in generators]).to(device)

    steppers = {}
    if alpha < 1.0:
        steppers["student"] = _Stepper(student, vocab_size)
    if alpha > 0.0:
        steppers["teacher"] = _Stepper(teacher, vocab_size)
    modes = {name: s.model.training for name, s in steppers.items()}
    for s in steppers.values():
        s.model.eval()

    blocker = None
    if params.no_repeat_ngram_size > 0:
        prompts = [prompt_ids[b][prompt_mask[b].bool()].tolist() if params.ngram_prompt else [] for b in range(B)]
        blocker = NGramBlocker(params.no_repeat_ngram_size, prompts)

    try:
        mask = prompt_mask.to(torch.long)
        logits = {name: s.prefill(prompt_ids, mask) for name, s in steppers.items()}
        next_pos = mask.sum(-1)  # position of the first response token
        cap = position_cap((s.model for s in steppers.values()), P + T - 1)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        toks, alive_steps, lqs, lms = [], [], [], []
        for t in range(T):
            alive = ~finished
            banned = None
            if blocker is not None:
                banned = blocker.banned(vocab_size, alive.tolist(), device)
            tok, lq, lm = mix_and_sample(logits.get("student"), logits.get("teacher"), alpha,
                                         params, uniforms[:, t], banned, never=pad_id)
            tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
            toks.append(tok)
            alive_steps.append(alive)
            lms.append(torch.where(alive, lm, torch.zeros_like(lm)))
            if lq is not None:
                lqs.append(torch.where(alive, lq, torch.zeros_like(lq)))
            if blocker is not None:
                blocker.append(tok.tolist(), alive.tolist())
            finished = finished | (alive & is_stop(tok, stops))
            done = bool(finished.all())
            if sync is not None:
                done = sync(done)
            if t == T - 1 or done:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            # finished rows keep decoding (their outputs are discarded); feed EOS, not the pad id,
            # which need not have an embedding row
            fed = torch.where(alive, tok, torch.full_like(tok, stops[0]))
            pos = next_pos + t if cap is None else (next_pos + t).clamp(max=cap)  # (see position_cap)
            logits = {name: s.step(fed, mask, pos) for name, s in steppers.items()}
    finally:
        for name, s in steppers.items():
            s.model.train(modes[name])

    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(),
        response_ids=torch.stack(toks, 1), response_mask=torch.stack(alive_steps, 1),
        student_logp=torch.stack(lqs, 1) if lqs else None, mix_logp=torch.stack(lms, 1))
