"""The fast sampler's decode loop: static buffers and the step function for one rollout shape.

A `Decoder` owns one `StaticModel` per model (engine/static_model.py) and every tensor a step
touches -- fed tokens, the step counter, finished flags, the uniforms, the output buffers --
updated in place, so a step (both models' forwards, the n-gram ban, `mix_and_sample`, the writes)
has fixed shapes and no host synchronisation and can be captured in a CUDA graph once and
replayed for every later step of the same bucket of cache columns. engine/fast_sampler.py builds
it (with its switches), chooses the decode kernels, and runs the loop.
"""
from __future__ import annotations

import warnings

import torch

from minillm_cli.engine.sampler import (SamplingParams, causal_allow, is_stop, mix_and_sample, positions_from_mask,
                                       stop_tuple)
from minillm_cli.engine.static_cache import rewind
from minillm_cli.engine.static_model import fresh_casts, round_up
from minillm_cli.errors import MiniLLMWarning


class Decoder:
    """Static buffers + the step function for one shape (B, P, L, T) and one set of settings.
    All state the step touches lives in tensors updated in place, so the step can be captured."""

    def __init__(self, models: dict, *, B: int, P: int, T: int, L: int, alpha: float,
                 params: SamplingParams, eos_id: int | tuple[int, ...], pad_id: int, vocab_size: int, device,
                 kv_buckets: int = 1, parallel: bool = True, timed_attention: bool = False,
                 timed_matmuls: bool = False, position_cap: int | None = None):
        """kv_buckets, parallel: fast_sampler's KV_BUCKETS and PARALLEL_MODELS. timed_attention /
        timed_matmuls: the decode kernels are chosen by timing replayed steps (fast_sampler's
        DECODE_ATTENTION / DECODE_MATMUL "auto"), so a decoder that cannot capture drops them."""
        self.models = models  # name -> StaticModel ("student" / "teacher")
        self.position_cap = position_cap  # (sampler.position_cap: None where no position can pass the table)
        self.B, self.P, self.T, self.L = B, P, T, L
        self.alpha, self.params, self.pad, self.V = alpha, params, pad_id, vocab_size
        self.stops = stop_tuple(eos_id)  # (any of them ends a row; the first is fed after it)
        self.eos = self.stops[0]
        self.n = params.no_repeat_ngram_size
        self.device = device
        dev = device
        self.ar = torch.arange(L, device=dev)
        self.key_valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.prompt_real = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.uniforms = torch.zeros(B, T, dtype=torch.float32, device=dev)
        self.seq = torch.zeros(B, L, dtype=torch.long, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.fed = torch.zeros(B, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        self.alive = torch.zeros(B, T, dtype=torch.bool, device=dev)
        self.lq = self.lm = None  # allocated at step 0 (dtype of mix_and_sample's output)
        # kv_len -> captured step (None: capture tried, not possible); graphs share one memory pool
        self.graphs: dict = {}
        self.pool = None
        self.capturing = False  # set by fast_sample for the graph / compile engines
        self.compiled = False  # the models decode through torch.compile'd forwards
        self.capture_error: Exception | None = None
        self.attention_notes: dict = {}  # name -> (kernel used?, why): fast_sampler._choose_attention
        self.matmul_notes: dict = {}  # name -> (kernel used for any shape?, why): fast_sampler._choose_matmuls
        # the width of a bucket of cache columns attention reads (None: the whole cache)
        bucketed = kv_buckets > 1 and all(m.writes is not None for m in models.values())
        self.width = round_up(-(-T // kv_buckets), 16) if bucketed else None
        self.timed_attention, self.timed_matmuls = timed_attention, timed_matmuls
        parallel = parallel and torch.device(device).type == "cuda" and len(models) == 2
        self.side = torch.cuda.Stream(device) if parallel else None  # the student's stream

    # state in, prefill, step 0 ---------------------------------------------------------------
    def load(self, prompt_ids, prompt_mask, uniforms):
        P = self.P
        pm = prompt_mask.bool()
        self.key_valid.zero_()
        self.key_valid[:, :P] = pm
        self.key_valid[:, P:] = True
        self.prompt_real.zero_()
        self.prompt_real[:, :P] = pm
        self.next_pos.copy_(pm.long().sum(-1))
        self.uniforms.copy_(uniforms)
        self.seq.zero_()
        self.seq[:, :P] = prompt_ids
        self.t.zero_()
        self.finished.zero_()
        for m in self.models.values():
            rewind(m.cache, 0)
        allow = causal_allow(self.key_valid, P)
        pos = positions_from_mask(pm.long())
        cp = torch.arange(P, device=self.device)
        logits = {name: m.forward(prompt_ids, allow, pos, cp) for name, m in self.models.items()}
        self._sample_and_record(logits)

    # the step -----------------------------------------------------------------------------------
    def _ngram_banned(self) -> torch.Tensor:
        n, t, P = self.n, self.t, self.P
        answer = (self.ar >= P) & (self.ar < P + t)
        # (the prompt's n-grams too, or the answer's own only: SamplingParams.ngram_prompt)
        real = self.prompt_real | answer if self.params.ngram_prompt else answer.expand_as(self.prompt_real)
        win = self.seq.unfold(1, n, 1)                      # [B, W, n]
        win_real = real.unfold(1, n, 1).all(-1)             # [B, W]
        last_idx = (P + t - (n - 1) + torch.arange(n - 1, device=self.device)).clamp(min=0)
        last = self.seq.index_select(1, last_idx)           # [B, n-1]
        match = (win[:, :, : n - 1] == last[:, None, :]).all(-1) & win_real
        match &= ((self.next_pos + t) >= n - 1)[:, None]    # the row has n-1 tokens already
        nxt = win[:, :, n - 1]
        col = torch.where(match & (nxt < self.V), nxt, torch.full_like(nxt, self.V))
        banned = torch.zeros(self.B, self.V + 1, dtype=torch.bool, device=self.device)
        banned.scatter_(1, col, True)
        return banned[:, : self.V]

    def _sample_and_record(self, logits: dict) -> None:
        t = self.t
        banned = self._ngram_banned() if self.n > 0 else None
        u = self.uniforms.index_select(1, t).squeeze(1)
        tok, lq, lm = mix_and_sample(logits.get("student"), logits.get("teacher"), self.alpha,
                                     self.params, u, banned, never=self.pad)
        if self.lm is None:  # step 0 runs eagerly: allocate with the dtypes the step produces
            self.lm = torch.zeros(self.B, self.T, dtype=lm.dtype, device=self.device)
            if lq is not None:
                self.lq = torch.zeros(self.B, self.T, dtype=lq.dtype, device=self.device)
        alive = ~self.finished
        tok = torch.where(alive, tok, torch.full_like(tok, self.pad))
        self.tokens.index_copy_(1, t, tok[:, None])
        self.alive.index_copy_(1, t, alive[:, None])
        self.lm.index_copy_(1, t, torch.where(alive, lm, torch.zeros_like(lm))[:, None])
        if lq is not None:
            self.lq.index_copy_(1, t, torch.where(alive, lq, torch.zeros_like(lq))[:, None])
        self.finished.logical_or_(alive & is_stop(tok, self.stops))
        # finished rows keep decoding EOS (the pad id need not have an embedding row)
        self.fed.copy_(torch.where(alive, tok, torch.full_like(tok, self.eos)))
        if self.n > 0:
            self.seq.index_copy_(1, self.P + t, tok[:, None])
        self.t.add_(1)

    def kv_len(self, s: int) -> int | None:
        """The cache columns step `s` (sampling token s; it feeds column P + s - 1) attends over:
        the first P + s at least, rounded up to the bucket's end; None: all."""
        if self.width is None:
            return None
        return min(self.L, self.P + round_up(s, self.width))

    def step(self, kv_len: int | None = None) -> None:
        """Feed the last token (cache column P + t - 1), run the models, sample token t."""
        with fresh_casts(self.device):
            self._step(kv_len)

    def _step(self, kv_len: int | None) -> None:
        t = self.t
        col = self.P + t - 1
        allow = (self.key_valid[:, :kv_len] & (self.ar[:kv_len] <= col))[:, None, None, :]
        pos = (self.next_pos + t - 1)[:, None]
        if self.position_cap is not None:  # rows decoding past their own budget (sampler.position_cap)
            pos = pos.clamp(max=self.position_cap)
        ids = self.fed[:, None]
        if self.side is None:
            logits = {name: m.decode(ids, allow, pos, col, kv_len) for name, m in self.models.items()}
        else:
            logits = self._decode_in_parallel(ids, allow, pos, col, kv_len)
        self._sample_and_record(logits)

    def _decode_in_parallel(self, *args) -> dict:
        """The student on the side stream, the teacher on the current one; joined before sampling.
        The student's outputs are allocated on the side stream and read on the current one after
        the join; their memory can be handed out again only to side-stream work, which starts
        only after the next step's fork has waited for everything queued on the current stream
        (the readers included), so no `record_stream` is needed."""
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # the fed tokens, mask and positions are written on `main`
        with torch.cuda.stream(self.side):
            student = self.models["student"].decode(*args)
        teacher = self.models["teacher"].decode(*args)
        main.wait_stream(self.side)
        return {"student": student, "teacher": teacher}

    # capture ----------------------------------------------------------------------------------
    def _snapshot(self):
        return self.t.clone(), self.finished.clone(), self.fed.clone()

    def _restore(self, snap) -> None:
        t, finished, fed = snap
        self.t.copy_(t)
        self.finished.copy_(finished)
        self.fed.copy_(fed)
        for m in self.models.values():
            rewind(m.cache, self.P + int(t) - 1)

    def capture(self, kv_len: int | None = None) -> None:
        """Record `step(kv_len)` in a CUDA graph (after two warm-up steps on a side stream,
        undone); the graphs of one decoder share a memory pool (they never run at once)."""
        snap = self._snapshot()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step(kv_len)
            torch.cuda.current_stream().wait_stream(stream)
            self._restore(snap)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(kv_len)
            self.graphs[kv_len] = graph
            self.pool = graph.pool()
        finally:
            torch.cuda.synchronize()
            self._restore(snap)  # capture records without running; undo the warm-up steps

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile each model's decode forward (inductor fuses the layer norms, residual adds,
        biases and activations between the matmuls into few kernels); `capture` then records the
        step -- compiled forwards, eager sampling -- in our own CUDA graph, as for "graph"."""
        for m in self.models.values():
            m.compile_decode(backend)
        self.compiled = True

    def uncompile(self) -> None:
        """Decode with the plain forwards from now on (graphs captured already keep their kernels:
        replaying one calls no compiler)."""
        for m in self.models.values():
            m.__dict__.pop("decode", None)  # back to the class's eager decode
        self.compiled = False

    def _give_up_capture(self, e: Exception) -> None:
        warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly", MiniLLMWarning, stacklevel=4)
        self.capture_error, self.capturing = e, False
        self.uncompile()  # else each step would call the failing compiler again
        if self.timed_attention:  # its choice was for replayed steps (no launch overhead)
            for name, m in self.models.items():
                if m.decode_kernel:
                    m.decode_kernel = False
                    self.attention_notes[name] = (False, "SDPA: the step is not captured")
        if self.timed_matmuls:  # (likewise)
            for name, m in self.models.items():
                if m.matmul_table:
                    m.matmul_table = None
                    self.matmul_notes[name] = (False, "cuBLAS: the step is not captured")

    def run_step(self, s: int) -> None:
        """Step `s` (1 <= s < T): its bucket's graph, captured when first needed, or eagerly.
        Capture's two warm-up steps write token columns s and s + 1, so a bucket first reached at
        the last step runs eagerly (with T = 2, s + 1 = T would index past the buffers: a
        device-side assert on CUDA)."""
        n = self.kv_len(s)
        if n not in self.graphs and self.capturing and s + 1 < self.T:
            try:
                self.capture(n)  # (for "compile": the warm-up steps compile)
            except torch.cuda.OutOfMemoryError:
                raise  # transient, not a property of the step: must not switch capture off for good
            except Exception as e:  # not capturable, or (compile) the compiler failed
                self._give_up_capture(e)
            self.graphs.setdefault(n, None)
        graph = self.graphs.get(n)
        if graph is not None:
            graph.replay()
        elif not self.compiled:
            self.step(n)
        else:  # an eager step through the compiled forwards (a bucket first reached at the last step)
            snap = self._snapshot()
            try:
                self.step(n)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # the compiler failed here: undo, and the plain step
                self._restore(snap)
                self._give_up_capture(e)
                self.step(n)

