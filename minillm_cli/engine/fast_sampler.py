"""Static-cache rollout engine: the same distribution as `sampler.sample`, built for the GPU.

`sampler.sample` is the reference: a DynamicCache per model that grows by concatenation, a new
attention mask every step, a host sync every step (to stop early) and a Python n-gram table. Here:

- both models get a transformers `StaticCache` preallocated for prompt + new tokens (rounded up to
  a multiple of 16), and prompts are prefilled in one pass each;
- every decode step has fixed shapes: the fed token [B, 1], an additive 4-D attention mask
  [B, 1, 1, L] computed on the device from a step counter held in a device tensor, the cache
  position, per-row positions. Finished rows keep decoding EOS (their outputs are masked), so no
  shape ever changes;
- the combined step (student forward, teacher forward, the n-gram ban, `mix_and_sample` -- the
  same function the reference calls -- and the writes of tokens / log-probs / finished flags into
  preallocated [B, T] buffers) is one function with no host synchronisation, so on CUDA it is
  captured once in a CUDA graph ("graph", the default on CUDA), or captured with the models'
  forwards compiled by torch.compile (inductor fuses the elementwise work: "compile"); a decode
  step is then one graph launch;
- the host checks "all rows finished?" only every `check_every` steps (every step on CPU); the
  response is cut to the same width the reference returns (the step of the last EOS, or T).

Randomness is the reference's: one uniform per (row, step) from that row's CPU generator, drawn
up front, consumed by inverse-CDF sampling in `mix_and_sample`. On the CPU ("static", eager) the
tokens are therefore the reference's token for token (the logits differ only by float rounding:
the attention runs over the padded static cache); tests/unit/test_fast_sampler.py checks it.

Engines: "eager" = `sampler.sample` itself; "static" = this loop run eagerly (any device);
"graph" = this loop with the step captured in a CUDA graph; "compile" = the models' decode
forwards compiled by torch.compile (default mode), the step then captured in our CUDA graph;
"auto" = "graph" on CUDA, "eager" elsewhere.
Anything the static path cannot serve (an attention implementation other than sdpa/eager, a
model without StaticCache support, a failed self-check) falls back to `sampler.sample` with a
warning, so the result is always the reference distribution.

Modules: engine/static_model.py (one model on its static cache), engine/static_check.py (the
self-check), engine/decode_loop.py (the step and its capture); this one holds the switches
(module attributes that benchmarks and tests set; read at each call and handed down), the
choice of decode kernels, and `fast_sample`.

transformers compatibility: the cache is passed through `sampler.model_kwargs` (`cache=` or
`past_key_values=` by the forward signature); `cache_position` is passed only when the forward
accepts it (<= 5.2x); StaticCache is built from the keyword arguments its constructor accepts;
layers that keep a device `cumulative_length` (5.2x) are rewound in place, never cropped.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from dataclasses import astuple

import torch

from minillm_cli.engine.sampler import Rollout, SamplingParams, position_cap, sample as eager_sample, stop_tuple
from minillm_cli.engine import decode_attention, decode_matmul, static_check
from minillm_cli.engine.decode_loop import Decoder
from minillm_cli.engine.fused import fused_activations
from minillm_cli.engine.static_model import (
    ModelSwitches, StaticModel, Unsupported, autocast_dtype, param_device, round_up)
from minillm_cli.errors import MiniLLMWarning, require

ENGINES = ("auto", "eager", "static", "graph", "compile")
# float32 weights under autocast are cast once per call into copies the decoder owns, not in
# every step (engine/sampling_weights.py); a switch for benchmarks/rollout_profile.py
SAMPLING_WEIGHTS = True
# device types on which the LM head reads a copy padded to aligned rows while sampling
# (sampling_weights.PaddedHead: a GPU kernel-selection matter, so CPUs keep the plain head); a
# switch for benchmarks and tests
PAD_HEAD_DEVICES: tuple = ("cuda",)
# On CUDA, run the student's decode forward on a second stream, concurrently with the teacher's
# (a captured graph keeps them as two branches). At batch 64 the teacher's matmuls fill about
# 75-100 tiles of 64 on a GPU with 132 SMs, so the student's kernels use the rest. Measured on an
# H200 (2026-11-28, run 3, benchmarks/rollout_profile.py, batch 64, gpt2-xl + gpt2 bf16): 6.28 ->
# 5.76 ms/step; not measured at batch 256. The tokens cannot change (the same kernels on the
# same inputs; tests/gpu compares the bits).
PARALLEL_MODELS = True
# Attention reads the cache's used prefix only, rounded up to one of this many buckets over the
# new tokens (one captured graph per bucket; static_cache.CacheWrites returns the views). A step
# then reads on average ~(1/2 + 1/(2 x buckets)) of the response's KV columns instead of all
# of them, for one graph capture per bucket. 1 = always the whole cache. Off until measured on
# a GPU (benchmarks/rollout_profile.py, variant "buckets"): the captures' cost (decoders are
# rebuilt per sampling phase in `distill`) against the attention's bytes saved is not known.
KV_BUCKETS = 1
# The decode step's attention (single query over the static cache): "auto" = our Triton kernel
# (engine/decode_attention.py: reads only the columns in use, one captured graph for every step)
# where a captured decoder's model runs transformers' sdpa attention on CUDA and
# `decode_attention.choose` finds it gives SDPA's output and takes <= 90% of SDPA's time at the
# decoder's own shapes, else SDPA; "kernel" = the kernel wherever it can run (benchmarks; tests
# on CPU through Triton's interpreter); "sdpa" = never. H200, 2026-11-28 (run 4,
# benchmarks/rollout_profile.py, batch 64, gpt2-xl + gpt2 bf16): auto 5.03 ms/step, the kernel
# forced at its default config 5.42, SDPA 5.75.
DECODE_ATTENTION = "auto"
# Where a decode step's attention runs the kernel, the kernel also writes the step's key and value
# into the cache (static_cache.CacheWrites.defer): two copy kernels a layer fewer, 120 a step for
# gpt2-xl + gpt2 (0.35 of 5.2 ms of kernel time in run 4's H200 profile at batch 64). Not yet
# measured on a GPU (benchmarks/rollout_profile.py, variant "separate_writes" turns it off).
FUSED_CACHE_WRITES = True
# The decode step's matmuls (rows = the batch): "auto" = engine/decode_matmul.py's split-K Triton
# kernel for each of a captured CUDA decoder's bf16/fp16 matmul shapes that `decode_matmul.plan`
# measures at <= 90% of cuBLAS's time (output checked against it), cuBLAS for the rest; "kernel"
# = every shape through the kernel wherever it can run (benchmarks; tests on CPU through
# Triton's interpreter); "cublas" = never. Not yet measured in a decode step on a GPU
# (benchmarks/rollout_profile.py, variant "cublas_mm" turns it off; skinny_matmul.py per shape).
DECODE_MATMUL = "auto"
DECODE_MATMULS = ("auto", "kernel", "cublas")
# torch.compile's mode for the compile engine's decode forwards: None (inductor's default) or
# "max-autotune-no-cudagraphs", where inductor also times its Triton matmul templates against
# cuBLAS at the decoder's own shapes -- the 64-row matmuls took 1.94 of the batch-64 step's 5.2 ms
# of kernel time in run 4's H200 profile, 1.7 TB/s for the weights they read -- at the price of
# autotuning on the first call. Not a mode with CUDA graphs of its own: the step is captured in
# ours. Untried on a GPU (benchmarks/rollout.py --compile-mode, in benchmarks/gpu_check.sh 3).
COMPILE_MODE: str | None = None
# device types on which self_check also runs the decode steps through decode_attention's kernel
# (where "auto" may choose it; tests add "cpu", where Triton's interpreter runs it)
KERNEL_CHECK_DEVICES: tuple = ("cuda",)


def resolve_engine(engine: str, device) -> str:
    """'auto' -> 'graph' on CUDA, 'eager' elsewhere; 'graph'/'compile' off CUDA -> 'static'."""
    require(engine in ENGINES, f"rollout engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device)
    if engine == "auto":
        return "graph" if dev.type == "cuda" else "eager"
    if engine in ("graph", "compile") and dev.type != "cuda":
        return "static"
    return engine


# -- the switches, handed down ---------------------------------------------------------------

def model_switches() -> ModelSwitches:
    """The switches a StaticModel is built with, as they are set now."""
    return ModelSwitches(weight_copies=SAMPLING_WEIGHTS, pad_head_devices=tuple(PAD_HEAD_DEVICES),
                         fused_cache_writes=FUSED_CACHE_WRITES, compile_mode=COMPILE_MODE)


def make_model(model, vocab_size: int, batch_size: int, max_len: int, device) -> StaticModel:
    """`model` on a static cache, built with the switches as they are set now."""
    return StaticModel(model, vocab_size, batch_size, max_len, device, model_switches())


def make_decoder(models: dict, **kw) -> Decoder:
    """A Decoder over `make_model`s (keywords: Decoder's shape and sampling ones), with the
    switches as they are set now."""
    return Decoder(models, kv_buckets=KV_BUCKETS, parallel=PARALLEL_MODELS,
                   timed_attention=DECODE_ATTENTION == "auto", timed_matmuls=DECODE_MATMUL == "auto", **kw)


def _kernel_pass_on(device) -> bool:
    """Whether the switches let self_check decode through the kernel on this device."""
    return DECODE_ATTENTION != "sdpa" and torch.device(device).type in KERNEL_CHECK_DEVICES


def self_check(model, vocab_size: int, device, eos_id: int = 0) -> str | None:
    """`static_check.self_check` with the switches as they are set now (see there)."""
    return static_check.self_check(model, vocab_size, device, eos_id, kernel_pass=_kernel_pass_on(device),
                                   switches=model_switches())


kernel_unsafe = static_check.kernel_unsafe


# -- the decode kernels ------------------------------------------------------------------------

def _choose_attention(models: dict, *, captured: bool, B: int, P: int, T: int, L: int) -> dict:
    """Set each model's `decode_kernel` (and config) by DECODE_ATTENTION, after the prefill
    allocated the caches (their dtype is what the kernel reads); returns name -> (used, why) for
    the models the kernel was considered for. "auto" times it only where the step is captured:
    replayed from a graph, the kernel costs no launch overhead, where Triton's Python launcher
    costs more than SDPA's per layer."""
    notes = {}
    for name, m in models.items():
        if (DECODE_ATTENTION == "sdpa" or m.impl != "sdpa" or m.writes is None
                or not decode_attention.available(m.device)):
            continue
        unsafe = kernel_unsafe(m.model, m.device)
        if decode_attention._BROKEN:  # (the dispatch would hand every call to SDPA anyway)
            failed = decode_attention._BROKEN[0][:120]
            use, why, config = False, f"SDPA: the kernel failed earlier ({failed})", None
        elif unsafe is not None:
            use, why, config = False, f"SDPA: through the kernel the model failed the self-check ({unsafe})", None
        elif DECODE_ATTENTION == "kernel":
            use, why, config = True, "forced (DECODE_ATTENTION)", None
        elif captured and m.device.type == "cuda":  # timed at the mean step's columns in use
            layers = getattr(m.cache, "layers", None) or [None]
            kv_dtype = getattr(getattr(layers[0], "keys", None), "dtype", None) or m.dtype
            use, why, config = decode_attention.choose(m.model, B, L, P + T // 2, m.mask_dtype,
                                                       kv_dtype, m.mask_dtype, m.device,
                                                       FUSED_CACHE_WRITES)
        else:
            continue
        m.decode_kernel, m.decode_config, notes[name] = use, config, (use, why)
    return notes


def _choose_matmuls(models: dict, *, captured: bool, B: int) -> dict:
    """Each model's `matmul_table` by DECODE_MATMUL (`decode_matmul.choose_tables`)."""
    require(DECODE_MATMUL in DECODE_MATMULS, f"DECODE_MATMUL must be one of {DECODE_MATMULS}, got {DECODE_MATMUL!r}")
    return decode_matmul.choose_tables(models, DECODE_MATMUL, captured=captured, rows=B)



# -- the public entry point -------------------------------------------------------------------

_KEPT: dict = {}
# the newest call's decode attention: model name -> (kernel used?, why) (benchmarks print it,
# distill logs it); empty where the call did not decode on the static path
ATTENTION_NOTES: dict = {}
# likewise its decode matmuls: model name -> (split-K kernel for any shape?, why)
MATMUL_NOTES: dict = {}


def attention_summary() -> str | None:
    """One line on the newest call's decode attention, or None."""
    if not ATTENTION_NOTES:
        return None
    parts = [f"{name} {'Triton kernel' if used else 'SDPA'} ({why})"
             for name, (used, why) in ATTENTION_NOTES.items()]
    line = "decode attention: " + "; ".join(parts)
    return line + f"; cache writes {cache_writes()}" if _kernel_used() else line


def matmul_summary() -> str | None:
    """One line on the newest call's decode matmuls, or None."""
    if not MATMUL_NOTES:
        return None
    return "decode matmuls: " + "; ".join(f"{name} {why}" for name, (_, why) in MATMUL_NOTES.items())


def _kernel_used() -> bool:
    return any(used for used, _ in ATTENTION_NOTES.values())


def cache_writes() -> str:
    """Who wrote the newest call's decode steps' new KV columns: "in the kernel", or "separate"
    (no model attended through the kernel, the switch is off, or the kernel's variant with the
    writes failed in this process)."""
    if not _kernel_used():
        return "separate (no model attended through the kernel)"
    if not FUSED_CACHE_WRITES:
        return "separate (FUSED_CACHE_WRITES off)"
    if not decode_attention.fusion_ok():
        return f"separate (the kernel with them failed: {decode_attention._NO_FUSION[0][:120]})"
    return "in the kernel"


_COMPILE_FAILED: list = []  # a failed compile: later decoders of this process use "graph" instead


# release() hands the freed memory back to the driver (torch.cuda.empty_cache): other processes
# see it, at the price of the next phase allocating its blocks again (a switch for
# benchmarks/iteration.py --keep-allocator-cache, which measures that price)
EMPTY_CACHE_ON_RELEASE = True


def release() -> None:
    """Drop the kept decoder (its static caches and CUDA graph memory)."""
    _drop_kept()
    if EMPTY_CACHE_ON_RELEASE and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _drop_kept() -> None:
    """Clear _KEPT and collect what only reference cycles kept alive (a compiled decode forward
    refers to its model wrapper, a kept capture error's traceback to the decoder): without it a
    dropped decoder's caches could outlive it until Python's next full collection."""
    if _KEPT:
        _KEPT.clear()
        gc.collect()


def _fallback(reason: str, states: list, **kw) -> Rollout:
    warnings.warn(f"fast sampler unavailable ({reason}); using the eager sampler", MiniLLMWarning, stacklevel=3)
    for g, st in zip(kw["generators"], states):  # the uniforms were drawn already: draw them again
        g.set_state(st)
    return eager_sample(**kw)


@torch.no_grad()
def fast_sample(student, teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                params: SamplingParams, alpha: float, eos_id: int | tuple[int, ...], pad_id: int,
                generators: list[torch.Generator], vocab_size: int, engine: str = "auto",
                check_every: int | None = None, prompt_bucket: int | None = None,
                keep: bool | None = None, check: bool = True) -> Rollout:
    """`sampler.sample` with static caches (see the module docstring); same arguments and
    result. engine: see ENGINES. check_every: host sync interval for early stop (default 1 on
    CPU, 8 on CUDA). prompt_bucket: left-pad prompts to a multiple of this (default 64 for
    graph/compile so micro-batches share a captured graph, 1 otherwise). keep: keep the decoder
    (caches + graph) for the next call of the same shape (default: True for graph/compile);
    `release()` frees it. check: run `self_check` once per model first."""
    require(0.0 <= alpha <= 1.0, f"teacher-mix alpha must be in [0, 1], got {alpha}")
    require(student is not None or teacher is not None, "sample() needs a student or a teacher")
    B, P0 = prompt_ids.shape
    require(len(generators) == B, f"need one generator per row: {len(generators)} for {B} rows")
    device = prompt_ids.device
    mode = resolve_engine(engine, device)
    stops = stop_tuple(eos_id)  # (eos_id: one id or several; the first fills and feeds)
    common = dict(student=student, teacher=teacher, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                  params=params, alpha=alpha, eos_id=eos_id, pad_id=pad_id,
                  generators=generators, vocab_size=vocab_size)
    ATTENTION_NOTES.clear()  # (filled again below where this call's decoder attends)
    MATMUL_NOTES.clear()
    if mode == "eager":
        return eager_sample(**common)
    if teacher is None:
        alpha = 0.0
    if student is None:
        alpha = 1.0
    T = params.max_new_tokens
    states = [g.get_state() for g in generators]
    uniforms = torch.stack([torch.rand(T, generator=g) for g in generators]).to(device)
    run = {}
    if alpha < 1.0:
        run["student"] = student
    if alpha > 0.0:
        run["teacher"] = teacher
    if mode == "compile" and _COMPILE_FAILED:  # do not pay for (and warn about) a failing compiler again
        mode = "graph"
    # a model on another device (--teacher-device) runs outside the capture: its kernels would
    # not be in the graph (a replay would reuse stale outputs), or its host copies break it
    captured = mode in ("graph", "compile") and all(param_device(m) == device for m in run.values())
    bucket = prompt_bucket or (64 if captured else 1)
    keep = captured if keep is None else keep
    P = round_up(P0, bucket)
    L = round_up(P + T, 16)
    ids, pm = prompt_ids, prompt_mask.bool()
    if P > P0:  # extra left padding (masked; EOS is a valid embedding row)
        ids = torch.cat([torch.full((B, P - P0), stops[0], dtype=ids.dtype, device=device), ids], 1)
        pm = torch.cat([torch.zeros(B, P - P0, dtype=torch.bool, device=device), pm], 1)

    modes = {name: m.training for name, m in run.items()}
    for m in run.values():
        m.eval()
    try:
        if check:  # with the model's own modules (the fallback, too, is the reference)
            for name, m in run.items():
                reason = self_check(m, vocab_size, device, stops[0])
                if reason is not None:
                    return _fallback(f"{name}: {reason}", states, **common)
        # a kept decoder (its captured graph, its weight copies) reads the parameters' storage:
        # a model whose parameters were replaced since (load_state_dict(assign=True), .to())
        # needs a new one; so does a switch set since (a benchmark's variant)
        key = (tuple((n, id(m), tuple(p.data_ptr() for p in m.parameters())) for n, m in run.items()),
               B, P, T, L, alpha, astuple(params),
               stops, pad_id, vocab_size, mode, str(device), autocast_dtype(device),
               model_switches(), KV_BUCKETS, PARALLEL_MODELS, DECODE_ATTENTION, DECODE_MATMUL)
        dec = _KEPT.get(key)
        fresh = dec is None
        if fresh:
            _drop_kept()  # at most one kept decoder: its caches can be large
            try:
                models = {n: make_model(m, vocab_size, B, L, device) for n, m in run.items()}
            except Unsupported as e:
                return _fallback(str(e), states, **common)
            dec = make_decoder(models, B=B, P=P, T=T, L=L, alpha=alpha, params=params, eos_id=stops,
                               pad_id=pad_id, vocab_size=vocab_size, device=device,
                               position_cap=position_cap(run.values(), P + T - 1))
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_activations(run.values()))  # gelu_new as one kernel (engine/fused.py)
            for m in dec.models.values():  # low-precision copies of float32 weights, padded heads
                m.refresh_copies()  # (sampling_weights.py; all before any is installed)
            for m in dec.models.values():
                stack.enter_context(m.installed_copies())
            dec.load(ids, pm, uniforms)
            if fresh and mode != "compile":  # (after the prefill: the caches exist. compile keeps
                # SDPA: dynamo would trace the kernel's switch)
                dec.attention_notes = _choose_attention(dec.models, captured=captured, B=B, P=P, T=T, L=L)
                dec.matmul_notes = _choose_matmuls(dec.models, captured=captured and T > 2, B=B)
            # each bucket's step is captured when first reached (run_step); with T <= 2 there is
            # at most one decode step, run eagerly: nothing to capture or to compile for
            if fresh and captured and T > 2:
                if mode == "compile":
                    dec.compile()
                dec.capturing = True
            if keep:
                _KEPT[key] = dec
            every = check_every or (8 if device.type == "cuda" else 1)
            steps = 1
            while steps < T:
                if (steps - 1) % every == 0 and bool(dec.finished.all()):
                    break
                dec.run_step(steps)
                steps += 1
            if dec.capture_error is not None and mode == "compile" and not _COMPILE_FAILED:
                _COMPILE_FAILED.append(str(dec.capture_error))
            ATTENTION_NOTES.update(dec.attention_notes)  # (after the steps: a failed capture changes it)
            MATMUL_NOTES.update(dec.matmul_notes)
        alive = dec.alive[:, :steps].clone()
        width = int(alive.sum(1).max()) if bool(dec.finished.all()) else steps
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(),
                       response_ids=dec.tokens[:, :width].clone(), response_mask=alive[:, :width],
                       student_logp=None if dec.lq is None else dec.lq[:, :width].clone(),
                       mix_logp=dec.lm[:, :width].clone())
    finally:
        for name, m in run.items():
            m.train(modes[name])
