"""One model on a static KV cache, as the fast sampler runs it (engine/fast_sampler.py).

`StaticModel` holds a transformers `StaticCache` preallocated for prompt + new tokens, the
sampler's own cache writes (static_cache.CacheWrites), and the per-call weight copies that make a
decode step cheap: float32 matmul weights cast once per call under autocast, the LM head padded to
aligned rows (engine/sampling_weights.py). `forward` takes an additive 4-D mask, positions and the
cache position from the caller, so a decode step has fixed shapes and no host synchronisation;
it routes single-token steps through decode_attention's kernel and decode_matmul's tables where
the sampler chose them. A model this path cannot serve raises `Unsupported` (the sampler then
falls back to the reference loop).

The benchmark switches live in fast_sampler.py; they reach this module as a `ModelSwitches`
built per call there, so setting `fast_sampler.SAMPLING_WEIGHTS` (say) takes effect on the next
decoder built.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from minillm_cli.engine import decode_attention, decode_matmul
from minillm_cli.engine.sampler import _forward_params, _hf_model, model_kwargs, positions_from_mask
from minillm_cli.engine.sampling_weights import padded_head, sampling_weights
from minillm_cli.engine.static_cache import make_static_cache, own_writes
from minillm_cli.errors import require

SUPPORTED_ATTN = ("sdpa", "eager")
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ModelSwitches:
    """How a StaticModel is built and run (fast_sampler's switches of the same names, whose
    comments say what each is for; the defaults are theirs)."""
    weight_copies: bool = True               # SAMPLING_WEIGHTS
    pad_head_devices: tuple = ("cuda",)      # PAD_HEAD_DEVICES
    fused_cache_writes: bool = True          # FUSED_CACHE_WRITES
    compile_mode: str | None = None          # COMPILE_MODE


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def autocast_dtype(device):
    """Autocast's dtype on this device's type, None when off (what a self-check or a captured
    graph depends on; the argument-less `torch.is_autocast_enabled()` asks about CUDA only)."""
    dev = torch.device(device).type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def fresh_casts(device):
    """Inside the decode step, autocast must cast float32 weights afresh instead of using its
    cache of cast copies: a CUDA graph captured over cached copies would read them after the
    autocast region that owned them has exited and freed them (garbage, NaN), and would keep
    reading stale copies after an optimizer step. The casts become part of the step."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def param_dtype(model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def param_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def additive_mask(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as an additive one in `dtype` (0 where allowed, min elsewhere)."""
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, torch.finfo(dtype).min)


class Unsupported(Exception):
    """A model the static path cannot serve (the sampler falls back to the reference loop)."""


class StaticModel:
    """A model with its StaticCache: forward(ids [B,q], allow [B,1,q,L] bool, positions [B,q],
    cache_position [q]) -> next-token logits [B, V] (sliced to the vocabulary)."""

    def __init__(self, model, vocab_size: int, batch_size: int, max_len: int, device,
                 switches: ModelSwitches = ModelSwitches()):
        self.model, self.vocab_size, self.switches = model, vocab_size, switches
        self.impl = getattr(_hf_model(model).config, "_attn_implementation", None) or "eager"
        if self.impl not in SUPPORTED_ATTN:
            raise Unsupported(f"attention implementation {self.impl!r}")
        self.dtype = param_dtype(model)
        # where the model runs: a teacher behind TeacherOnDevice runs on its own device, outside the
        # student device's autocast (its mask must then be in its weights' dtype, its cache columns
        # on its device)
        self.device = param_device(model)
        amp = autocast_dtype(self.device)
        self.mask_dtype = amp or self.dtype
        # the LM head with its vocabulary rows padded to aligned ones (in the dtype it runs in)
        self.head = padded_head(_hf_model(model), amp) if self.device.type in switches.pad_head_devices else None
        skip = (self.head.head,) if self.head is not None else ()
        # float32 matmul weights cast once per call instead of in every step, where that is exact
        self.weights = sampling_weights(model, amp, skip) if switches.weight_copies else None
        if self.weights is not None and not copies_exact(model, self.weights, vocab_size, device):
            self.weights = None
        try:
            self.cache = make_static_cache(model, batch_size, max_len, device, self.dtype)
        except torch.cuda.OutOfMemoryError:
            raise  # (versions that allocate here) transient: must not switch to the eager loop
        except Exception as e:  # a model family without static-cache support
            raise Unsupported(f"StaticCache: {e}") from e
        # a sliding-window layer keeps min(window, max_len) positions and rolls over them; the
        # decode step's [B, 1, 1, max_len] mask does not fit it (it raised mid-rollout)
        short = min((getattr(layer, "max_cache_len", max_len) for layer in getattr(self.cache, "layers", ())),
                    default=max_len)
        if short < max_len:
            raise Unsupported(f"a sliding-window cache of {short} positions, shorter than the rollout's {max_len}")
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
            self.writes.defer = self.switches.fused_cache_writes
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
        mode = self.switches.compile_mode
        require(mode in COMPILE_MODES,
                f"compile mode must be one of {COMPILE_MODES[1:]} (the step is captured in our own CUDA "
                f"graph), got {mode!r}")
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # (the name differs across versions)
            if hasattr(dynamo, name):  # one compiled version per model x decoder shape: 8 runs out
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        kw = {"mode": mode} if mode and backend == "inductor" else {}
        self.decode = torch.compile(self.forward, backend=backend, dynamic=False, **kw)

    def decode(self, ids, allow, positions, cache_position, kv_len=None):
        return self.forward(ids, allow, positions, cache_position, kv_len)


_COPIES_EXACT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def copies_exact(model, weights, vocab_size: int, device) -> bool:
    """Whether `model` gives bit for bit the same logits reading the low-precision copies as
    reading its float32 masters under this autocast (code around a covered module may read the
    weight's dtype: peft's DoRA does). Once per model, autocast dtype and device."""
    key = (autocast_dtype(param_device(model)), str(device))
    done = _COPIES_EXACT.setdefault(model, {})
    if key not in done:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab_size, (2, 8), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                  **model_kwargs(model, use_cache=False))
        with fresh_casts(device):  # as the decode step runs
            ref = model(**kw).logits
            weights.refresh()
            with weights.installed():
                got = model(**kw).logits
        done[key] = torch.equal(ref, got)
    return done[key]

