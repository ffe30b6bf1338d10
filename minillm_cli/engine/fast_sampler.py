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

transformers compatibility: the cache is passed through `sampler.model_kwargs` (`cache=` or
`past_key_values=` by the forward signature); `cache_position` is passed only when the forward
accepts it (<= 5.2x); StaticCache is built from the keyword arguments its constructor accepts;
layers that keep a device `cumulative_length` (5.2x) are rewound in place, never cropped.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from dataclasses import astuple

import torch

from minillm_cli.engine.sampler import (
    Rollout, SamplingParams, _Stepper, _forward_params, _hf_model, causal_allow, mix_and_sample,
    model_kwargs, positions_from_mask, sample as eager_sample)
from minillm_cli.engine import decode_attention, decode_matmul
from minillm_cli.engine.fused import fused_activations
from minillm_cli.engine.sampling_weights import padded_head, sampling_weights
from minillm_cli.engine.static_cache import make_static_cache, own_writes, rewind
from minillm_cli.errors import require

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
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
_SUPPORTED_ATTN = ("sdpa", "eager")


def resolve_engine(engine: str, device) -> str:
    """'auto' -> 'graph' on CUDA, 'eager' elsewhere; 'graph'/'compile' off CUDA -> 'static'."""
    require(engine in ENGINES, f"rollout engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device)
    if engine == "auto":
        return "graph" if dev.type == "cuda" else "eager"
    if engine in ("graph", "compile") and dev.type != "cuda":
        return "static"
    return engine


# -- one model on a static cache --------------------------------------------------------------

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _autocast_dtype(device):
    """Autocast's dtype on this device's type, None when off (what a self-check or a captured
    graph depends on; the argument-less `torch.is_autocast_enabled()` asks about CUDA only)."""
    dev = torch.device(device).type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _fresh_casts(device):
    """Inside the decode step, autocast must cast float32 weights afresh instead of using its
    cache of cast copies: a CUDA graph captured over cached copies would read them after the
    autocast region that owned them has exited and freed them (garbage, NaN), and would keep
    reading stale copies after an optimizer step. The casts become part of the step."""
    import contextlib

    dtype = _autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def _param_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _param_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def additive_mask(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as an additive one in `dtype` (0 where allowed, min elsewhere)."""
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, torch.finfo(dtype).min)


class _StaticModel:
    """A model with its StaticCache: forward(ids [B,q], allow [B,1,q,L] bool, positions [B,q],
    cache_position [q]) -> next-token logits [B, V] (sliced to the vocabulary)."""

    def __init__(self, model, vocab_size: int, batch_size: int, max_len: int, device):
        self.model, self.vocab_size = model, vocab_size
        self.impl = getattr(_hf_model(model).config, "_attn_implementation", None) or "eager"
        if self.impl not in _SUPPORTED_ATTN:
            raise _Unsupported(f"attention implementation {self.impl!r}")
        self.dtype = _param_dtype(model)
        # where the model runs: a teacher behind TeacherOnDevice runs on its own device, outside the
        # student device's autocast (its mask must then be in its weights' dtype, its cache columns
        # on its device)
        self.device = _param_device(model)
        amp = _autocast_dtype(self.device)
        self.mask_dtype = amp or self.dtype
        # the LM head with its vocabulary rows padded to aligned ones (in the dtype it runs in)
        self.head = padded_head(_hf_model(model), amp) if self.device.type in PAD_HEAD_DEVICES else None
        skip = (self.head.head,) if self.head is not None else ()
        # float32 matmul weights cast once per call instead of in every step, where that is exact
        self.weights = sampling_weights(model, amp, skip) if SAMPLING_WEIGHTS else None
        if self.weights is not None and not _copies_exact(model, self.weights, vocab_size, device):
            self.weights = None
        try:
            self.cache = make_static_cache(model, batch_size, max_len, device, self.dtype)
        except torch.cuda.OutOfMemoryError:
            raise  # (versions that allocate here) transient: must not switch to the eager loop
        except Exception as e:  # a model family without static-cache support
            raise _Unsupported(f"StaticCache: {e}") from e
        # a sliding-window layer keeps min(window, max_len) positions and rolls over them; the
        # decode step's [B, 1, 1, max_len] mask does not fit it (it raised mid-rollout)
        short = min((getattr(layer, "max_cache_len", max_len) for layer in getattr(self.cache, "layers", ())),
                    default=max_len)
        if short < max_len:
            raise _Unsupported(f"a sliding-window cache of {short} positions, shorter than the rollout's {max_len}")
        # the sampler writes the cache at its own positions (static_cache.CacheWrites), where it can
        self.writes = own_writes(self.cache)
        # decode steps attend through decode_attention's kernel, with this config (set by
        # `_choose_attention`)
        self.decode_kernel, self.decode_config = False, None
        # decode steps run these matmul signatures through decode_matmul's kernel (`_choose_matmuls`)
        self.matmul_table: dict | None = None
        self.kw = model_kwargs(model, cache=self.cache, logits_to_keep=1, use_cache=True)
        self.pass_cache_position = "cache_position" in _forward_params(type(_hf_model(model)))

    def refresh_copies(self) -> None:
        """Cast / pad the current masters (an optimizer step may have run since the last call)
        into the copies. Every model's, before any is installed: the same model as student and
        teacher must not copy the other decoder's installed copy."""
        for copies in (self.weights, self.head):
            if copies is not None:
                copies.refresh()

    @contextlib.contextmanager
    def installed_copies(self):
        """Inside: the model reads the low-precision copies of its float32 matmul weights and the
        padded head (after `refresh_copies`)."""
        with contextlib.ExitStack() as stack:
            for copies in (self.weights, self.head):
                if copies is not None:
                    stack.enter_context(copies.installed())
            yield

    @contextlib.contextmanager
    def sampling_weights(self):
        """One model alone: refresh_copies, then installed_copies."""
        self.refresh_copies()
        with self.installed_copies():
            yield

    def mask(self, allow: torch.Tensor) -> torch.Tensor:
        """Additive, in the dtype attention runs in (autocast's, else the weights'): eager attention
        adds it to the scores, and SDPA would otherwise convert a boolean mask in every layer (60
        layers a step for gpt2-xl + gpt2). Once per model and step instead:
        H200, batch 64, 7.98 -> 7.77 ms/step (2026-11-28, benchmarks/rollout_profile.py)."""
        return additive_mask(allow, self.mask_dtype)

    def forward(self, ids, allow, positions, cache_position, kv_len: int | None = None):
        """kv_len: attend over cache columns [0, kv_len) only (`allow` is that wide); needs
        `self.writes`."""
        kw = dict(self.kw)
        if self.pass_cache_position:
            kw["cache_position"] = cache_position
        if self.writes is not None:  # (TeacherOnDevice moves the forward's arguments, not this)
            self.writes.at, self.writes.kv_len = cache_position.to(self.device), kv_len
        kernel = self.decode_kernel and ids.shape[1] == 1 and self.writes is not None
        if kernel:
            self.writes.defer = FUSED_CACHE_WRITES
        try:
            with (decode_attention.active(self.writes.at, self.decode_config) if kernel
                  else contextlib.nullcontext()), \
                    decode_matmul.active(self.matmul_table if ids.shape[1] == 1 else None):
                out = self.model(input_ids=ids, attention_mask=self.mask(allow),
                                 position_ids=positions, **kw)
        finally:
            if self.writes is not None:
                self.writes.at = self.writes.kv_len = None
                self.writes.defer = False
        return out.logits[:, -1, : self.vocab_size]

    def compile_decode(self, backend: str = "inductor") -> None:
        """Decode steps through torch.compile'd forward (one shape: q = 1; the prefill stays
        eager). Only the model is compiled -- the usual compiled static-cache decode -- not the
        sampling around it, whose vocabulary-wide reductions are where torch 2.11's inductor failed
        when the whole step was compiled (H200, gpt2-xl shapes, 2026-11-28)."""
        require(COMPILE_MODE in COMPILE_MODES,
                f"compile mode must be one of {COMPILE_MODES[1:]} (the step is captured in our own CUDA "
                f"graph), got {COMPILE_MODE!r}")
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # (the name differs across versions)
            if hasattr(dynamo, name):  # one compiled version per model x decoder shape: 8 runs out
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        kw = {"mode": COMPILE_MODE} if COMPILE_MODE and backend == "inductor" else {}
        self.decode = torch.compile(self.forward, backend=backend, dynamic=False, **kw)

    def decode(self, ids, allow, positions, cache_position, kv_len=None):
        return self.forward(ids, allow, positions, cache_position, kv_len)


class _Unsupported(Exception):
    pass


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


# -- self-check: the static path reproduces a full forward on this transformers version ------

_COPIES_EXACT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _copies_exact(model, weights, vocab_size: int, device) -> bool:
    """Whether `model` gives bit for bit the same logits reading the low-precision copies as
    reading its float32 masters under this autocast (code around a covered module may read the
    weight's dtype: peft's DoRA does). Once per model, autocast dtype and device."""
    key = (_autocast_dtype(_param_device(model)), str(device))
    done = _COPIES_EXACT.setdefault(model, {})
    if key not in done:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab_size, (2, 8), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                  **model_kwargs(model, use_cache=False))
        with _fresh_casts(device):  # as the decode step runs
            ref = model(**kw).logits
            weights.refresh()
            with weights.installed():
                got = model(**kw).logits
        done[key] = torch.equal(ref, got)
    return done[key]


_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# model -> {autocast dtype: why its decode steps through the kernel failed self_check, or None
# where they passed}; models without an entry were not checked through it
_KERNEL_UNSAFE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# device types on which self_check also runs the decode steps through decode_attention's kernel
# (where "auto" may choose it; tests add "cpu", where Triton's interpreter runs it)
KERNEL_CHECK_DEVICES: tuple = ("cuda",)


def _kernel_pass_on(device) -> bool:
    """Whether the switches let self_check decode through the kernel on this device (part of its
    cache key: a check made with the pass off must not stand for one with it on)."""
    return DECODE_ATTENTION != "sdpa" and torch.device(device).type in KERNEL_CHECK_DEVICES


def _kernel_checkable(sm, device) -> bool:
    """Whether self_check also decodes `sm`'s model through the kernel: where "auto" may choose it,
    and only for a model on the sampler's own device (a teacher on another GPU never attends
    through the kernel: its steps are not captured)."""
    return (_kernel_pass_on(device) and sm.impl == "sdpa" and sm.writes is not None
            and sm.device == torch.device(device)  # (as `fast_sample` decides what it captures)
            and decode_attention.available(device))


def kernel_unsafe(model, device) -> str | None:
    """Why `model`'s decode steps through the kernel failed self_check here (None: passed or not
    checked)."""
    return _KERNEL_UNSAFE.get(model, {}).get(_autocast_dtype(device))


@torch.no_grad()
def self_check(model, vocab_size: int, device, eos_id: int = 0) -> str | None:
    """None when a left-padded static-cache prefill + 3 decode steps give the logits of one
    uncached forward over the same tokens (within precision); else a reason. Cached per model,
    autocast dtype, device and `_kernel_pass_on`."""
    key = (_autocast_dtype(device), str(device), _kernel_pass_on(device))
    done = _CHECKED.get(model)
    if done is not None and key in done:
        return done[key]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 8), generator=g).to(device)
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    mask[0, :1] = 0
    mask[1, :3] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, eos_id))
    P, n_dec = 5, 3
    was = model.training
    model.eval()
    try:
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                    **model_kwargs(model, use_cache=False)).logits[:, :, :vocab_size].float()
        key_valid = torch.cat([mask[:, :P].bool(), torch.ones(2, 16 - P, dtype=torch.bool,
                                                              device=device)], 1)
        pos = positions_from_mask(mask)

        def static_logits(kernel: bool):
            sm = _StaticModel(model, vocab_size, 2, 16, device)
            sm.decode_kernel = kernel  # (decode steps through decode_attention's kernel)
            with sm.sampling_weights():  # as fast_sample runs the model
                got = [sm.forward(ids[:, :P], causal_allow(key_valid, P), pos[:, :P],
                                  torch.arange(P, device=device)).float()]
                ar = torch.arange(16, device=device)
                for k in range(n_dec):
                    col = torch.tensor([P + k], device=device)
                    # where the sampler owns the cache writes, attention reads the used prefix, as
                    # a step does with KV_BUCKETS (checks the views, too)
                    n = P + k + 1 if sm.writes is not None else None
                    allow = (key_valid & (ar <= col))[:, None, None, :n]
                    got.append(sm.forward(ids[:, P + k : P + k + 1], allow, pos[:, P + k : P + k + 1],
                                          col, n).float())
            return sm, torch.stack(got, 1)

        sm, got = static_logits(False)
        low = _autocast_dtype(device) is not None or sm.dtype in (torch.float16, torch.bfloat16)
        checkable = _kernel_checkable(sm, device)
        del sm  # (its weight copies: the kernel's pass below builds its own)
        want = ref[:, P - 1 : P + n_dec]
        # the noise floor: how far the eager sampler's own cached decode is from the full forward
        # (deep bf16 models drift by more than a fixed tolerance; a wrong mask or position drifts
        # by far more than the floor)
        st = _Stepper(model, vocab_size)
        base = [st.prefill(ids[:, :P], mask[:, :P]).float()]
        for k in range(n_dec):
            base.append(st.step(ids[:, P + k], mask[:, : P + k + 1], pos[:, P + k]).float())
        base = torch.stack(base, 1)

        def rel(x):
            return float((x - want).abs().max() / want.abs().max().clamp(min=1e-6))

        err, floor = rel(got), rel(base)
        # capped: a drifting dynamic-cache path must not widen the check past what a wrong mask
        # or position (errors of order one) would show
        tol = max(3e-2 if low else 1e-4, min(4 * floor, 0.25))
        reason = None if err <= tol else (f"static-cache logits differ from a full forward (rel {err:.2e}; "
                                          f"the dynamic cache's {floor:.2e})")
        if reason is None and checkable:
            # the same through the decode-attention kernel (and its cache writes): a model whose
            # attention the kernel does not reproduce keeps SDPA, not the reference loop. (Its
            # rounding differs from SDPA's: held to 1.5x SDPA's error where that is above tol.)
            broken = len(decode_attention._BROKEN)
            try:
                err_k = rel(static_logits(True)[1])
                unsafe = (None if err_k <= max(tol, 1.5 * err)
                          else f"rel {err_k:.2e} from a full forward (SDPA's {err:.2e})")
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                unsafe = f"{type(e).__name__}: {e}"[:200]
            if len(decode_attention._BROKEN) > broken:  # the kernel failed here (and the dispatch
                # handed the call to SDPA): this model keeps SDPA, the others may still use it
                unsafe = f"the kernel failed: {decode_attention._BROKEN[broken][:160]}"
                del decode_attention._BROKEN[broken:]
            _KERNEL_UNSAFE.setdefault(model, {})[_autocast_dtype(device)] = unsafe
    except _Unsupported as e:
        reason = str(e)
    except torch.cuda.OutOfMemoryError:
        raise  # transient, not a property of the model: must not switch the run to the eager loop
    except Exception as e:  # whatever breaks the static path here falls back to the reference
        reason = f"static-cache path failed: {type(e).__name__}: {e}"
    finally:
        model.train(was)
    _CHECKED.setdefault(model, {})[key] = reason
    return reason


# -- the decode loop --------------------------------------------------------------------------

class _Decoder:
    """Static buffers + the step function for one shape (B, P, L, T) and one set of settings.
    All state the step touches lives in tensors updated in place, so the step can be captured."""

    def __init__(self, models: dict, *, B: int, P: int, T: int, L: int, alpha: float,
                 params: SamplingParams, eos_id: int, pad_id: int, vocab_size: int, device):
        self.models = models  # name -> _StaticModel ("student" / "teacher")
        self.B, self.P, self.T, self.L = B, P, T, L
        self.alpha, self.params, self.eos, self.pad, self.V = alpha, params, eos_id, pad_id, vocab_size
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
        self.attention_notes: dict = {}  # name -> (kernel used?, why): _choose_attention
        self.matmul_notes: dict = {}  # name -> (kernel used for any shape?, why): _choose_matmuls
        # the width of a bucket of cache columns attention reads (None: the whole cache)
        bucketed = KV_BUCKETS > 1 and all(m.writes is not None for m in models.values())
        self.width = _round_up(-(-T // KV_BUCKETS), 16) if bucketed else None
        parallel = PARALLEL_MODELS and torch.device(device).type == "cuda" and len(models) == 2
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
        real = self.prompt_real | ((self.ar >= P) & (self.ar < P + t))
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
        self.finished.logical_or_(alive & (tok == self.eos))
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
        return min(self.L, self.P + _round_up(s, self.width))

    def step(self, kv_len: int | None = None) -> None:
        """Feed the last token (cache column P + t - 1), run the models, sample token t."""
        with _fresh_casts(self.device):
            self._step(kv_len)

    def _step(self, kv_len: int | None) -> None:
        t = self.t
        col = self.P + t - 1
        allow = (self.key_valid[:, :kv_len] & (self.ar[:kv_len] <= col))[:, None, None, :]
        pos = (self.next_pos + t - 1)[:, None]
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
        warnings.warn(f"CUDA graph capture failed ({e}); decoding eagerly", stacklevel=4)
        self.capture_error, self.capturing = e, False
        self.uncompile()  # else each step would call the failing compiler again
        if DECODE_ATTENTION == "auto":  # its choice was for replayed steps (no launch overhead)
            for name, m in self.models.items():
                if m.decode_kernel:
                    m.decode_kernel = False
                    self.attention_notes[name] = (False, "SDPA: the step is not captured")
        if DECODE_MATMUL == "auto":  # (likewise)
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
    warnings.warn(f"fast sampler unavailable ({reason}); using the eager sampler", stacklevel=3)
    for g, st in zip(kw["generators"], states):  # the uniforms were drawn already: draw them again
        g.set_state(st)
    return eager_sample(**kw)


@torch.no_grad()
def fast_sample(student, teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                params: SamplingParams, alpha: float, eos_id: int, pad_id: int,
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
    captured = mode in ("graph", "compile") and all(_param_device(m) == device for m in run.values())
    bucket = prompt_bucket or (64 if captured else 1)
    keep = captured if keep is None else keep
    P = _round_up(P0, bucket)
    L = _round_up(P + T, 16)
    ids, pm = prompt_ids, prompt_mask.bool()
    if P > P0:  # extra left padding (masked; EOS is a valid embedding row)
        ids = torch.cat([torch.full((B, P - P0), eos_id, dtype=ids.dtype, device=device), ids], 1)
        pm = torch.cat([torch.zeros(B, P - P0, dtype=torch.bool, device=device), pm], 1)

    modes = {name: m.training for name, m in run.items()}
    for m in run.values():
        m.eval()
    try:
        if check:  # with the model's own modules (the fallback, too, is the reference)
            for name, m in run.items():
                reason = self_check(m, vocab_size, device, eos_id)
                if reason is not None:
                    return _fallback(f"{name}: {reason}", states, **common)
        # a kept decoder (its captured graph, its weight copies) reads the parameters' storage:
        # a model whose parameters were replaced since (load_state_dict(assign=True), .to())
        # needs a new one
        key = (tuple((n, id(m), tuple(p.data_ptr() for p in m.parameters())) for n, m in run.items()),
               B, P, T, L, alpha, astuple(params),
               eos_id, pad_id, vocab_size, mode, str(device), _autocast_dtype(device))
        dec = _KEPT.get(key)
        fresh = dec is None
        if fresh:
            _drop_kept()  # at most one kept decoder: its caches can be large
            try:
                models = {n: _StaticModel(m, vocab_size, B, L, device) for n, m in run.items()}
            except _Unsupported as e:
                return _fallback(str(e), states, **common)
            dec = _Decoder(models, B=B, P=P, T=T, L=L, alpha=alpha, params=params, eos_id=eos_id,
                           pad_id=pad_id, vocab_size=vocab_size, device=device)
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
