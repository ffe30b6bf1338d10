"""The fast sampler's KV caches: a transformers StaticCache per model, built for whatever this
transformers version's constructor takes, with its writes taken over where its layers are plain
`StaticLayer`s.

Why take the writes over: a StaticLayer finds where to write from a device counter of its own,
`cumulative_length` (transformers 5.17 and 5.2x alike): per layer and decode step it launches
`arange`, an add for the positions and an in-place add for the counter, besides the two
`index_copy_` writes -- 3 bookkeeping kernels a layer, 180 a step for gpt2-xl + gpt2, each a
few microseconds of GPU time inside the captured step (the H200 profile of 2026-11-28 lists the
long-integer adds among its kernels). The sampler knows the write column already (one device
tensor a step, shared by every layer), so `CacheWrites.update` writes there with the two copies
alone, or -- where the forward's attention runs decode_attention's kernel -- leaves them to
the kernel (`defer`), which writes the new column while it attends (two copy kernels a layer,
0.35 of 5.2 ms of kernel time in that H200 profile). Nothing else reads the counter on the
sampler's path: the forward gets `position_ids` and a ready 4-D mask (transformers then builds
no mask and asks the cache for no length), and `fast_sampler.self_check` compares the whole
path with an uncached forward once per model (on CUDA also through decode_attention's kernel,
its deferred writes included).

It also lets attention read a prefix of the cache (`kv_len`): the keys and values returned to the
attention layer are views of the first `kv_len` columns, so a step early in a long rollout does
not read the unused tail (fast_sampler.KV_BUCKETS)."""
from __future__ import annotations

import inspect

import torch

from minillm_cli.engine import decode_attention
from minillm_cli.engine.sampler import _hf_model


def make_static_cache(model, batch_size: int, max_cache_len: int, device, dtype):
    """A transformers StaticCache for `model`, built with whatever arguments this version's
    constructor takes (5.x: config + max_cache_len, lazily allocated; 4.x: also batch size,
    device and dtype)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": _hf_model(model).config, "max_cache_len": max_cache_len}
    for name, value in (("max_batch_size", batch_size), ("batch_size", batch_size),
                        ("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


def rewind(cache, length: int) -> None:
    """Set a static cache's write position to `length` in place (StaticLayer keeps a device
    `cumulative_length`; versions that index by `cache_position` keep no such state). Harmless
    where CacheWrites writes instead."""
    for layer in getattr(cache, "layers", ()):
        cl = getattr(layer, "cumulative_length", None)
        if isinstance(cl, torch.Tensor):
            cl.fill_(length)
        elif isinstance(cl, int):
            layer.cumulative_length = length


class CacheWrites:
    """Installed as `cache.update` (transformers' attention layers call
    `cache.update(key_states, value_states, layer_idx, ...)`): writes the new keys and values at
    the cache columns `at` (a device tensor of the forward's positions, set by the caller before
    each forward) and returns the first `kv_len` columns (all when None)."""

    def __init__(self, cache):
        # the layers, not the cache: cache.update -> self -> cache would be a reference cycle, and
        # the caches' memory would then outlive the decoder until a full garbage collection
        self.layers = cache.layers
        self.at: torch.Tensor | None = None
        self.kv_len: int | None = None
        # one-column writes left to decode_attention's kernel (set by the caller for a forward
        # whose attention runs inside `decode_attention.active(self.at)`)
        self.defer = False
        cache.update = self.update  # an instance attribute: the class's method stays as it is

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:  # (the first write allocates, as StaticLayer.update would)
            layer.lazy_initialization(key_states, value_states)
        # (a no-op where the dtypes agree; transformers 5.17 allocates the values in the keys' dtype,
        # and a float32 Llama under bf16 autocast has float32 keys -- rotary in float32 -- and
        # bf16 values: the bf16 values go into float32 storage exactly, and attention under
        # autocast reads them back as the same bf16 numbers. StaticLayer.update refused them, so
        # such a student sampled with the eager loop on 5.17.)
        if (self.defer and key_states.shape[2] == 1 and self.at.numel() == 1
                and decode_attention.fusion_ok()):
            decode_attention.defer_write(layer.keys, layer.values, self.at, key_states, value_states)
        else:
            decode_attention.write_columns(layer.keys, layer.values, self.at, key_states, value_states)
        n = self.kv_len
        if n is None:
            return layer.keys, layer.values
        return layer.keys[:, :, :n], layer.values[:, :, :n]


def own_writes(cache) -> CacheWrites | None:
    """CacheWrites for `cache` when every layer is a plain StaticLayer (sliding-window or other
    layers keep their own update); None otherwise."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:  # pragma: no cover - transformers < 5 has no layer classes
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return None
    return CacheWrites(cache)
