"""Single-query attention over a static KV cache that reads only the columns in use: the fast
sampler's decode-step attention, as a Triton kernel.

Why: the H200 profile of the teacher-mixed decode step (gpt2-xl + gpt2, batch 64, 2026-11-28,
benchmarks/rollout_profile.py) spends 2.04 of 5.40 ms in cuDNN's SDPA. SDPA reads the whole
preallocated cache (256 columns; on average 192 are in use), and reading only a bucketed prefix
(`fast_sampler.KV_BUCKETS`) saved nothing measurable (6.28 -> 6.25 ms): with one query per row
its time is not set by the bytes it reads. At ~4.2 TB/s the teacher's whole cache (5.0 GB at
batch 64) takes 1.2 ms, its used part on average 0.9 ms.

The kernel: one program per (row, head[, split of the columns]), a loop over blocks of cache
columns up to the step's last written column -- read from a device tensor, so one captured CUDA
graph serves every step and still reads only the used prefix -- with an online softmax in float32
and the additive (or boolean) mask of the sampler added per column. Where rows x heads are too
few to fill the GPU (small batches), the columns are split across programs and a second kernel
combines the partial softmaxes (flash-decoding). GQA: query head h reads key/value head
h // (H / H_kv). The output is written straight in the [B, 1, H, D] layout transformers' attention
functions return. Handed the step's new key and value (`new_kv`: static_cache.CacheWrites defers
its write to the layer's attention call, `defer_write`), the kernel writes them into the cache
itself -- two `index_copy_` kernels a layer fewer in the decode step, 0.35 ms of its 5.2 ms of
kernel time in run 4's profile -- and every program takes that column from registers.

`active(last_col)` installs it, for the forwards inside, in place of transformers' "sdpa" attention
function for single-query calls (everything else goes to the original). `fast_sampler` decides per
model whether to use it (`choose`: on CUDA, only where it gives SDPA's result and is measured
faster at the decoder's own shapes). On CPU tensors it runs through Triton's interpreter (tests).
Triton ships with the CUDA builds of torch on Linux; without it nothing here is used."""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import NamedTuple

import torch

from minillm_cli.engine.rollout_batch import attention_dims
from minillm_cli.engine.sampler import _hf_model
from minillm_cli.errors import MiniLLMWarning

try:  # (the kernels' bodies read `tl` from this module's globals, as Triton resolves names there)
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU builds of torch), or a broken install: SDPA is used
    triton = tl = None

BLOCK_N = 64  # cache columns per loop iteration
# more than this many programs per SM: no split of the columns (one kernel, no combine)
PROGRAMS_PER_SM = 4


def _interpreting() -> bool:
    """Triton imported in interpreter mode (TRITON_INTERPRET=1 before its import: its language
    functions are then plain Python, and kernels run on CPU tensors)."""
    knobs = getattr(triton, "knobs", None)
    flag = getattr(getattr(knobs, "runtime", None), "interpret", None)
    return bool(flag) if flag is not None else os.environ.get("TRITON_INTERPRET") == "1"


def available(device) -> bool:
    """Whether the kernel can run for tensors on `device`: CUDA with Triton, or CPU with Triton in
    interpreter mode (tests/conftest.py sets it on machines without a GPU)."""
    if triton is None:
        return False
    dev = torch.device(device).type
    return dev == "cuda" or (dev == "cpu" and _interpreting())


# -- the kernels (plain functions here, compiled or interpreted by `_kernels`; the annotations are
# strings, from which Triton reads which arguments are compile-time constants) ----------------

def _attend(Q, K, V, MASK, LAST, O, PM, PL, NK, NV,
            sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h,
            snk_b, snk_h, snv_b, snv_h,
            H, GROUP, L, L_CACHE, scale, split_len, D: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_LAST: tl.constexpr,
            HAS_NEW: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # (offsets into a large cache overflow 32 bits)
    part = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(Q + b * sq_b + h * sq_h + d, mask=dm, other=0.0).to(tl.float32) * scale
    n = L
    last = L  # (no column is the new one)
    if HAS_LAST:  # the columns in use: up to the last one written
        last = tl.load(LAST).to(tl.int32)
        n = tl.minimum(last + 1, L)
    if HAS_NEW:  # this step's key and value: written into the cache at column `last` by one
        # program per (row, KV head), and read from registers by every program, which never load
        # that column from memory -- so no program reads it while it is being written. In the
        # cache's dtype first (exact: `_unserved_new`), as attention would read it back.
        kn = tl.load(NK + b * snk_b + hk * snk_h + d, mask=dm, other=0.0).to(K.dtype.element_ty)
        vn = tl.load(NV + b * snv_b + hk * snv_h + d, mask=dm, other=0.0).to(V.dtype.element_ty)
        writer = (h % GROUP == 0) & (part == 0) & (last < L_CACHE)
        wm = dm & (tl.zeros([BLOCK_D], tl.int32) + writer.to(tl.int32) != 0)  # (bool, per column)
        tl.store(K + b * sk_b + hk * sk_h + last * sk_l + d, kn, mask=wm)
        tl.store(V + b * sv_b + hk * sv_h + last * sv_l + d, vn, mask=wm)
        kn = kn.to(tl.float32)
        vn = vn.to(tl.float32)
    start = part * split_len
    end = tl.minimum(start + split_len, n)
    # the running max starts finite, so a split with no column in use gives weights exp(-huge) = 0
    m_i = tl.full([1], -1.0e30, tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(start, end, BLOCK):
        cols = s + tl.arange(0, BLOCK)
        cm = cols < end
        kv_mask = cm[:, None] & dm[None, :]
        if HAS_NEW:
            kv_mask = kv_mask & (cols != last)[:, None]
        k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_l + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        # issued before the softmax's reductions: the compiler does not move loads across their
        # barriers, and the V block's DRAM round trip then overlaps the K block's arithmetic
        v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_l + d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        if HAS_NEW:
            k = tl.where((cols == last)[:, None], kn[None, :], k)
            v = tl.where((cols == last)[:, None], vn[None, :], v)
        score = tl.sum(k * q[None, :], 1)
        if HAS_MASK:
            if MASK_BOOL:
                ok = tl.load(MASK + b * sm_b + cols * sm_l, mask=cm, other=0)
                score = tl.where(ok != 0, score, float("-inf"))
            else:
                score += tl.load(MASK + b * sm_b + cols * sm_l, mask=cm, other=0.0).to(tl.float32)
        score = tl.where(cm, score, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, 0))
        p = tl.exp(score - m_new)
        corr = tl.exp(m_i - m_new)
        acc = acc * corr + tl.sum(p[:, None] * v, 0)
        l_i = l_i * corr + tl.sum(p, 0)
        m_i = m_new
    if SPLIT:  # partial results, combined by _combine
        row = bh * tl.num_programs(1) + part
        tl.store(O + row * BLOCK_D + d, acc)
        tl.store(PM + row, tl.max(m_i, 0))  # ([1] -> a scalar)
        tl.store(PL + row, tl.max(l_i, 0))
    else:  # (a row with no allowed column gives 0, where SDPA would give NaN or the mean)
        out = acc / tl.where(l_i > 0, l_i, 1.0)
        tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=dm)


def _combine(ACC, PM, PL, O, H, so_b, so_h, D: tl.constexpr,
             PARTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    p = tl.arange(0, BLOCK_P)
    pm = p < PARTS
    d = tl.arange(0, BLOCK_D)
    m = tl.load(PM + bh * PARTS + p, mask=pm, other=float("-inf"))
    w = tl.exp(m - tl.max(m, 0))  # an empty part has m = -1e30: weight 0
    l = tl.sum(w * tl.load(PL + bh * PARTS + p, mask=pm, other=0.0), 0)
    acc = tl.load(ACC + (bh * PARTS + p[:, None]) * BLOCK_D + d[None, :], mask=pm[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l > 0, l, 1.0)
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=d < D)


_KERNELS: list = []


def _kernels():
    """(attend, combine): compiled by Triton, or run by its interpreter in interpreter mode."""
    if not _KERNELS:
        _KERNELS.extend((triton.jit(_attend), triton.jit(_combine)))
    return _KERNELS


def _sm_count(device) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 4  # the interpreter: a few parts, so tests cover the combine


def parts_for(B: int, H: int, L: int, device, block: int = BLOCK_N) -> int:
    """How many splits of the columns: enough programs for every SM, a power of two, at most one
    split per block of columns."""
    want = -(-PROGRAMS_PER_SM * _sm_count(device) // (B * H))
    most = max(1, -(-L // block))
    parts = 1
    while parts < want and parts * 2 <= most:
        parts *= 2
    return parts


def unserved(query, key, value, mask) -> str | None:
    """Why `decode_attention` cannot take these inputs (None: it can)."""
    B, H, q_len, D = query.shape
    Hk, L = key.shape[1], key.shape[2]
    if q_len != 1 or H % Hk or key.shape != value.shape or key.shape[0] != B or key.shape[3] != D:
        return f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                             or mask.shape[3] != L or mask.shape[0] not in (1, B)):
        return f"mask {tuple(mask.shape)} for {L} columns"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "the head dimension is not contiguous"
    if not available(query.device):
        return f"no Triton for {query.device.type} tensors here"
    return None


def _unserved_new(new_kv, key, value, last_col) -> str | None:
    """Why the kernel cannot write `new_kv` into the caches `key`, `value` (None: it can)."""
    if new_kv is None:
        return None
    nk, nv = new_kv
    B, Hk, _, D = key.shape
    if last_col is None:
        return "a new key and value need the column to write them at"
    if (nk.shape != (B, Hk, 1, D) or nv.shape != nk.shape or nk.device != key.device
            or nv.device != value.device):
        return f"new key {tuple(nk.shape)}, value {tuple(nv.shape)} for a cache {tuple(key.shape)}"
    if nk.stride(-1) != 1 or nv.stride(-1) != 1:
        return "the new key's or value's head dimension is not contiguous"
    if not (_exact_cast(nk.dtype, key.dtype) and _exact_cast(nv.dtype, value.dtype)):
        # (rounding down to the cache's dtype is left to torch: Triton's interpreter truncates)
        return f"new key / value in {nk.dtype} / {nv.dtype} for {key.dtype} / {value.dtype} caches"
    return None


def _exact_cast(src, dst) -> bool:
    return src == dst or (dst == torch.float32 and src in (torch.bfloat16, torch.float16))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, last_col: torch.Tensor | None,
                     scale: float | None = None, parts: int | None = None,
                     config: tuple[int, int] | None = None,
                     new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     cache_len: int | None = None) -> torch.Tensor:
    """query [B, H, 1, D]; key, value [B, H_kv, L, D] (H_kv divides H; any strides with the last
    dimension contiguous); mask None, or [B, 1, 1, L] additive (0 allowed, a large negative number
    not) or boolean (True allowed), broadcast over heads; last_col None (all L columns) or a
    one-element integer device tensor: columns > last_col are not read. config: (columns per
    loop iteration, warps), default (BLOCK_N, 4). new_kv: None, or this step's (key, value)
    [B, H_kv, 1, D] not yet in the cache (each in its cache's dtype, or a 16-bit float for a
    float32 cache): the kernel writes them into key / value at column last_col and attends over
    them there, which saves the decode step two copy kernels per layer. cache_len: where key and
    value are views of a cache's first L columns, its whole width (a column past the view is
    still written, and not attended, as after a separate write).
    -> [B, 1, H, D] in the query's dtype, softmax(q k^T * scale + mask) v computed in float32."""
    why = unserved(query, key, value, mask) or _unserved_new(new_kv, key, value, last_col)
    if why is not None:
        raise ValueError(f"decode_attention: {why}")
    B, H, _, D = query.shape
    Hk, L = key.shape[1], key.shape[2]
    block, warps = config or (BLOCK_N, 4)
    attend, combine = _kernels()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    parts = parts or parts_for(B, H, L, query.device, block)
    split_len = -(-L // parts)
    split_len = -(-split_len // block) * block
    block_d = max(16, triton.next_power_of_2(D))
    out = torch.empty(B, 1, H, D, dtype=query.dtype, device=query.device)
    m = mask if mask is not None else query  # (an unused pointer)
    sm_b = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    sm_l = 0 if mask is None else mask.stride(3)
    last = last_col if last_col is not None else query
    nk, nv = new_kv if new_kv is not None else (query, query)  # (unused pointers without)
    if parts > 1:
        acc = torch.empty(B * H * parts, block_d, dtype=torch.float32, device=query.device)
        pm = torch.empty(B * H * parts, dtype=torch.float32, device=query.device)
        pl = torch.empty_like(pm)
        dest = acc
    else:
        dest, pm, pl = out, out, out
    attend[(B * H, parts)](
        query, key, value, m, last, dest, pm, pl, nk, nv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, sm_l, out.stride(0), out.stride(2),
        nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1),
        H, H // Hk, L, cache_len or L, scale, split_len, D=D,
        HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_LAST=last_col is not None, HAS_NEW=new_kv is not None, SPLIT=parts > 1, BLOCK=block,
        BLOCK_D=block_d, num_warps=warps)
    if parts > 1:
        combine[(B * H,)](acc, pm, pl, out, H, out.stride(0), out.stride(2), D=D,
                          PARTS=parts, BLOCK_P=max(2, triton.next_power_of_2(parts)), BLOCK_D=block_d)
    return out


# -- in place of transformers' sdpa attention, for the sampler's decode forwards ---------------

_ACTIVE: list = []  # (last written column, config) of the forward running now (a stack)
_BROKEN: list = []  # why the kernel failed in a forward (then this process uses SDPA)
# why the kernel failed with the step's cache writes (`new_kv`, say a Triton that cannot build that
# variant) where it ran without them: this process then writes the cache separately
_NO_FUSION: list = []


def fusion_ok() -> bool:
    """Whether cache writes may be left to the kernel (`static_cache.CacheWrites.defer`)."""
    return not _NO_FUSION
# keyword arguments that change what attention computes: with any of them set, the original runs
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "head_mask")


class _Write(NamedTuple):
    """A cache write: keys / values [B, H_kv, L, D] get new_k / new_v at the columns `at`."""
    keys: torch.Tensor
    values: torch.Tensor
    at: torch.Tensor
    new_k: torch.Tensor
    new_v: torch.Tensor


# cache writes of the running forward left to the kernel: the cache's key storage (data_ptr) ->
# _Write. static_cache.CacheWrites files them (`defer_write`) where the forward's attention runs
# through `active`; the dispatch hands each to the kernel, or writes it first wherever the
# original function attends instead.
_PENDING: dict = {}


def write_columns(keys, values, at, new_k, new_v) -> None:
    """The cache write the kernel saves: keys / values [B, H_kv, L, D] at the columns `at`."""
    keys.index_copy_(2, at, new_k.to(keys.dtype))
    values.index_copy_(2, at, new_v.to(values.dtype))


def defer_write(keys, values, at, new_k, new_v) -> None:
    """Leave this write to the layer's attention call (inside `active`, whose column `at` is)."""
    _PENDING[keys.data_ptr()] = _Write(keys, values, at, new_k, new_v)


def _take_pending(key, value, last_col):
    """The _Write filed for this cache if the kernel can do it, else None; a write the kernel
    cannot do is done here."""
    pending = _PENDING.pop(key.data_ptr(), None) if _PENDING else None
    if pending is None:
        return None
    if (pending.values.data_ptr() != value.data_ptr() or pending.at is not last_col
            or pending.keys.stride() != key.stride() or pending.values.stride() != value.stride()
            or _unserved_new((pending.new_k, pending.new_v), key, value, last_col) is not None):
        write_columns(*pending)
        return None
    return pending


def _write_pending(key) -> None:
    pending = _PENDING.pop(key.data_ptr(), None) if _PENDING else None
    if pending is not None:
        write_columns(*pending)


def _interface():
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface._global_mapping


def _dispatch(original):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  is_causal=None, **kwargs):
        if (not _ACTIVE or _BROKEN or dropout != 0.0 or kwargs.get("output_attentions")
                or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
                or unserved(query, key, value, attention_mask) is not None):
            _write_pending(key)  # (the original reads the cache: the new column must be there)
            return original(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, is_causal=is_causal, **kwargs)
        last_col, config = _ACTIVE[-1]
        pending = _take_pending(key, value, last_col)
        new_kv = None if pending is None else (pending.new_k, pending.new_v)
        cache_len = None if pending is None else pending.keys.shape[2]
        try:
            return decode_attention(query, key, value, attention_mask, last_col, scaling,
                                    config=config, new_kv=new_kv, cache_len=cache_len), None
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # e.g. Triton cannot compile a new specialisation
            error = e
        if pending is not None:  # (the same values again, should the kernel have written them)
            write_columns(*pending)
            try:  # the kernel without the writes: separate writes from here on
                out = decode_attention(query, key, value, attention_mask, last_col, scaling, config=config)
                _NO_FUSION.append(f"{type(error).__name__}: {error}")
                warnings.warn(f"decode-attention kernel failed with the cache writes ({_NO_FUSION[-1][:200]}); "
                              "writing the cache separately", MiniLLMWarning, stacklevel=2)
                return out, None
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                error = e
        _BROKEN.append(f"{type(error).__name__}: {error}")  # SDPA from here on
        warnings.warn(f"decode-attention kernel failed ({_BROKEN[-1][:200]}); using SDPA", MiniLLMWarning, stacklevel=2)
        return original(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)

    attention._minillm_original = original
    return attention


@contextlib.contextmanager
def active(last_col: torch.Tensor | None, config: tuple[int, int] | None = None):
    """Inside: transformers' "sdpa" attention calls with one query run `decode_attention`, reading
    cache columns <= last_col (a device tensor: the forward's write column), with `config`."""
    mapping = _interface()
    before = mapping.get("sdpa")
    if before is not None and not hasattr(before, "_minillm_original"):
        mapping["sdpa"] = _dispatch(before)
    _ACTIVE.append((last_col, config))
    try:
        yield
    finally:
        _ACTIVE.pop()
        if not _ACTIVE and before is not None:
            mapping["sdpa"] = before
        left = list(_PENDING.values())
        _PENDING.clear()
        for pending in left:  # (the cache must hold every column written, whatever happened)
            write_columns(*pending)
    if left:  # a layer's attention did not come through here: it attended without its new column
        raise RuntimeError(f"decode attention: {len(left)} cache write(s) deferred to the kernel "
                           "were not taken by an attention call; this forward's output is wrong")


# -- whether to use it: the same result as SDPA, and faster at this decoder's shapes -----------

_CHOICES: dict = {}
MARGIN = 0.9  # the kernel must take at most this fraction of SDPA's time
# (columns per loop iteration, warps) tried by `choose`, the first the default: fewer warps mean
# fewer cross-warp reductions per block, more columns more bytes in flight per program
# (one warp: every reduction stays inside the warp, no barrier; 1,600 programs at batch 64 still
# fill an H200's 132 SMs many times over)
CONFIGS = ((64, 4), (64, 2), (64, 1), (32, 1), (128, 2))


@torch.no_grad()
def choose(model, B: int, L: int, used: int, q_dtype, kv_dtype, mask_dtype, device,
           fused_writes: bool = False):
    """(use the kernel?, why, config) for `model`'s decode attention over a cache of L columns in
    `kv_dtype` of which `used` are read on average: on CUDA, each config's output checked against
    SDPA's, then SDPA over all L columns (what the decode step runs otherwise, casting the cache
    to the queries' dtype where autocast would) timed against the fastest config, both replayed
    from CUDA graphs over copies of the cache that do not fit in L2 together. fused_writes: the
    kernel writes the step's key and value (`new_kv`), SDPA's side the two copies it needs.
    Cached per shape."""
    device = torch.device(device)
    if not _measurable(device):
        return False, "needs CUDA and Triton", None
    dims = attention_dims(_hf_model(model))
    if dims is None:
        return False, "the model's config does not give its attention shape", None
    _, H, Hk, D = dims
    key = (B, H, Hk, D, L, used, q_dtype, kv_dtype, mask_dtype, str(device), fused_writes)
    if key in _CHOICES:
        return _CHOICES[key]
    try:
        choice = _measure(B, H, Hk, D, L, used, q_dtype, kv_dtype, mask_dtype, device, fused_writes)
    except torch.cuda.OutOfMemoryError:  # an optional speed-up must not cost the run its batch
        torch.cuda.empty_cache()  # (the measurement's tensors are gone with its frame)
        return False, "out of memory while measuring (not kept: measured again next time)", None
    _CHOICES[key] = choice
    return choice


def _measurable(device) -> bool:
    return device.type == "cuda" and available(device)


def _l2_bytes(device) -> int:
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20


def _measure(B, H, Hk, D, L, used, q_dtype, kv_dtype, mask_dtype, device, fused_writes=False):
    g = torch.Generator(device=device).manual_seed(0)
    kv_bytes = 2 * B * Hk * L * D * torch.empty((), dtype=kv_dtype).element_size()
    # the decode step reads every other layer's cache and weights between two visits of this one:
    # cycle through copies that together exceed L2 three times, so neither side reads warm lines
    copies = max(1, min(16, -(-3 * _l2_bytes(device) // kv_bytes)))
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=q_dtype)
    ks = [torch.randn(B, Hk, L, D, generator=g, device=device, dtype=kv_dtype) for _ in range(copies)]
    vs = [torch.randn(B, Hk, L, D, generator=g, device=device, dtype=kv_dtype) for _ in range(copies)]
    allow = torch.arange(L, device=device)[None, :] < used
    allow[: B // 2, : min(8, used - 1)] = False  # some left padding
    mask = torch.zeros(B, 1, 1, L, dtype=mask_dtype, device=device).masked_fill(
        ~allow[:, None, None, :], torch.finfo(mask_dtype).min)
    sdpa_mask = mask.to(q_dtype)
    last = torch.tensor([used - 1], device=device)
    # the step's new key and value (from the projections, in the queries' dtype)
    new_kv = (torch.randn(B, Hk, 1, D, generator=g, device=device, dtype=q_dtype),
              torch.randn(B, Hk, 1, D, generator=g, device=device, dtype=q_dtype))
    # (where the kernel cannot take them, the step writes them separately either way)
    fused_writes = fused_writes and fusion_ok() and _unserved_new(new_kv, ks[0], vs[0], last) is None
    if fused_writes:  # the variant with the writes must build here, else it is timed without them
        try:
            decode_attention(q, ks[0], vs[0], mask, last, new_kv=new_kv)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            _NO_FUSION.append(f"{type(e).__name__}: {e}")
            fused_writes = False
    # transformers' sdpa path for one query: grouped heads packed into the query (pack_gqa)
    q_packed = q.reshape(B, Hk, H // Hk, D)

    def sdpa(i):
        k, v = ks[i], vs[i]
        if fused_writes:  # what the step runs before SDPA where the kernel does not write
            write_columns(k, v, last, *new_kv)
        if kv_dtype != q_dtype:  # as autocast casts the cache for SDPA in every layer
            k, v = k.to(q_dtype), v.to(q_dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q_packed, k, v, attn_mask=sdpa_mask)
        return out.reshape(B, H, 1, D).transpose(1, 2)

    def ours(config):
        def run(i):
            return decode_attention(q, ks[i], vs[i], mask, last, config=config,
                                    new_kv=new_kv if fused_writes else None)
        run.config = config  # (which one a timer was handed)
        return run

    try:
        want = sdpa(0).float()
        tol = 1e-2 if q_dtype in (torch.float16, torch.bfloat16) else 1e-4
        tol *= max(1.0, float(want.abs().max()))
        times, failed = {}, []
        for config in CONFIGS:
            try:
                err = float((ours(config)(0).float() - want).abs().max())
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # Triton cannot build this config here: the others may do
                failed.append(f"{config}: {type(e).__name__}: {e}")
                continue
            if not err <= tol:
                return False, f"config {config} differs from SDPA by {err:.2e}", None
            times[config] = _time(ours(config), copies)
        if not times:
            return False, failed[0][:300], None
        t_sdpa = _time(sdpa, copies)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # Triton could not compile or launch it here: SDPA it is
        return False, f"{type(e).__name__}: {e}"[:300], None
    best = min(times, key=times.get)
    use = times[best] <= MARGIN * t_sdpa
    return use, (f"{times[best] * 1e6:.1f} us per layer with {best} vs SDPA {t_sdpa * 1e6:.1f} "
                 f"(used {used} of {L} columns)"), best


def _time(fn, copies: int, reps: int = 24) -> float:
    """Seconds per call of fn(i), i cycling over the copies, replayed from one CUDA graph of
    `reps` calls (as the captured decode step runs it: no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, plans, workspaces: before the capture
        for i in range(2):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / (4 * reps) * 1e-3
