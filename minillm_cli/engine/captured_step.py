"""A training micro-step -- forward, loss, backward -- replayed from a CUDA graph.

Why. At the paper's shapes (gpt2-xl teacher, gpt2 student, 8 rows x 512 columns) the eager
MiniLLM micro-step launches some two thousand kernels, most of them small: a 768-wide student
under autocast is casts, layer norms, biases and residual adds around small matmuls, forward and
backward. The host takes longer to launch them than the GPU takes to run them, so the step's time
is the host's: H200 runs 3 and 4 (2026-11-28) timed the same code at 0.0527 and 0.0682 s on two
machines of the same kind, where the naive step (fewer, larger kernels) differed by 5%. A
replayed graph launches the whole micro-step at once.

How. One graph per micro-batch shape (`RolloutBatch.select(bucket=True)` rounds both widths to
multiples of 64, so a run meets few shapes), captured the first time a shape is seen, right
after that micro-step ran eagerly on the capture stream: the eager run is the real step (its
gradients count) and the warm-up a capture needs, so a capture costs one recording pass of the
host (and the synchronisation and cache flush torch.cuda.graph starts with). Later micro-batches of the shape are copied into the graph's input
tensors and replayed. What a captured step may not do, and the step function must not: read a
device value on the host, or depend on Python values other than the shapes (the normaliser comes
in as a device scalar). Gradients accumulate in place into gradient tensors this object owns:
an optimizer's `zero_grad(set_to_none=True)` leaves `.grad` None, which `_bind_grads` undoes by
zeroing ours and putting them back (what None means to the next accumulation). Graphs share one
memory pool: replays never overlap and each replay's outputs are read, in stream order, before
the next replay writes anything. `release()` frees the graphs and their memory (before sampling,
which wants it). A step whose warm-up synchronised with the host is not captured, and a capture
that fails anyway warns once; the steps run eagerly from then on: same results, the eager speed.
"""
from __future__ import annotations

import warnings
from dataclasses import fields, is_dataclass, replace
from typing import Callable

import torch

from minillm_cli.errors import MiniLLMWarning


class CapturedSteps:
    """`step(batch, normalizer)` -> outputs, replayed from a CUDA graph per batch shape.

    fn(batch, normalizer) runs one micro-step -- forward, loss, `backward()` -- on a dataclass
    batch of tensors (and Python values that are part of its shape: a prompt length, a padding
    flag) with `normalizer` a float32 0-dim device tensor, and returns detached tensors (a tensor,
    or a tuple / dict of them, nested once). params: the parameters that get gradients.
    enabled False (or a device other than CUDA): `fn` runs eagerly with a Python float normaliser
    turned into a tensor the same way, so both paths compute the same arithmetic.

    The returned tensors of a replay are the graph's own output tensors: read them (queue work on
    them) before the next `step`, which overwrites them."""

    def __init__(self, fn: Callable, params: list[torch.Tensor], device: torch.device, enabled: bool = True):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.device = torch.device(device)
        self.enabled = bool(enabled) and self.device.type == "cuda"
        self.graphs: dict = {}  # shape key -> (graph, static batch, static normaliser, outputs)
        self.pool = None
        self.grads: list[torch.Tensor] | None = None
        self.stream = None
        self._warned: dict = {}  # (warnings passed on from warm-ups: once per place)
        self.error: str | None = None
        self.captures = 0
        self.replays = 0

    # ------------------------------------------------------------------------------------------
    def __call__(self, batch, normalizer: float):
        norm = torch.full((), float(normalizer), dtype=torch.float32, device=self.device)
        if not self.enabled:
            return self.fn(batch, norm)
        key = _shape_key(batch)
        entry = self.graphs.get(key)
        if entry is None:
            return self._first(key, batch, norm)
        graph, static, static_norm, outputs = entry
        _copy_into(static, batch)
        static_norm.copy_(norm)
        self._bind_grads()
        graph.replay()
        self.replays += 1
        return outputs

    def release(self) -> None:
        """Drop the graphs, their memory pool and our hold on the gradient tensors (sampling gets
        the memory; the next micro-step binds afresh)."""
        self.graphs.clear()
        self.pool = None
        self.grads = None

    @property
    def summary(self) -> str:
        if not self.enabled:
            return "eager" + (f" (not captured: {self.error})" if self.error else "")
        return f"CUDA graphs: {self.captures} captured, {self.replays} replayed"

    # ------------------------------------------------------------------------------------------
    def _first(self, key, batch, norm):
        """The shape's first micro-step: eagerly on the capture stream (the real step), then the
        capture, which records without running. A warm-up that synchronised with the host (which
        a capture cannot) is not captured: a failed capture is worth avoiding, it leaves torch's
        allocator in a poor state on some versions."""
        static = _clone(batch)
        static_norm = norm.clone()
        self._bind_grads()
        result, synced = self._warm_up(static, static_norm)
        self._adopt_grads()
        if synced:
            self._give_up(f"the step synchronises with the host ({synced})")
            return result
        try:
            graph, outputs = self._capture(static, static_norm)
        except Exception as e:  # not capturable, or out of memory: eager from now on (this step counted)
            if self.device.type == "cuda":  # (a device that is broken, not just uncapturable, raises here)
                torch.cuda.synchronize(self.device)
            self._give_up(f"{type(e).__name__}: {e}; a failed capture can keep the graphs' memory reserved")
            return result
        self.graphs[key] = (graph, static, static_norm, outputs)
        self.captures += 1
        return result

    def _give_up(self, why: str) -> None:
        self.enabled, self.error = False, why
        self.release()
        warnings.warn(f"CUDA graph capture of the training micro-step not possible ({why}); running it eagerly",
                      MiniLLMWarning, stacklevel=4)

    def _warm_up(self, static, static_norm):
        """(fn's result, what synchronised or ""): fn eagerly on the stream the capture will use
        (lazy per-stream state -- cuBLAS workspaces, autograd's stream bookkeeping -- must exist
        before a capture), with torch's synchronisation warnings on."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        mode = torch.cuda.get_sync_debug_mode()
        result, synced = None, ""
        try:
            with warnings.catch_warnings(record=True) as seen, torch.cuda.stream(self.stream):
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = self.fn(static, static_norm)
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
        finally:  # (also when fn raises: the static tensors must not be reused under the side stream)
            main.wait_stream(self.stream)
            for t in _tensors(static) + [static_norm]:
                t.record_stream(self.stream)
        _record_on(result, main)  # allocated on the side stream, read on the main one
        for w in seen:
            text = str(w.message)
            if "synchroniz" in text and "debug mode" not in text:
                synced = synced or text.splitlines()[0][:120]
            else:  # someone else's warning: passed on (once per place, as Python's default filter)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=self._warned)
        return result, synced

    def _capture(self, static, static_norm):
        """(graph, its outputs): fn recorded into a CUDA graph in the shared pool."""
        main = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                outputs = self.fn(static, static_norm)
        except BaseException as e:
            # torch.cuda.graph's exit raises without leaving its stream context: the capture stream
            # would stay current for the rest of the run
            torch.cuda.set_stream(main)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            raise
        self.pool = graph.pool()
        # the recorded backward must have accumulated into the gradient tensors we hold: one made
        # during the capture would live in the graph's pool, overwritten by every replay
        for i, p in enumerate(self.params):
            if p.grad is not self.grads[i]:
                p.grad = self.grads[i]
                raise RuntimeError("the captured backward made a gradient the warm-up did not")
        return graph, outputs

    def _bind_grads(self) -> None:
        """Every parameter we hold a gradient tensor for has it as `.grad` (the tensor the graphs
        accumulate into): zeroed where an optimizer set `.grad` to None, holding the value where
        someone replaced it."""
        if self.grads is None:
            return
        zero = []
        for p, g in zip(self.params, self.grads):
            if g is None or p.grad is g:
                continue
            if p.grad is None:  # set to None by zero_grad: zeros mean the same to an accumulation
                zero.append(g)
            else:  # replaced by someone: keep its value in our tensor
                g.copy_(p.grad)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    def _adopt_grads(self) -> None:
        """After a warm-up: hold the gradient tensors it made (a parameter that got none has no
        gradient in the captured step either, and keeps `.grad` None, as eagerly: the optimizer
        skips it). Made on the side stream, used on the main one from now on."""
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if self.grads is None:
            self.grads = [None] * len(self.params)
        for i, p in enumerate(self.params):
            if p.grad is not None and self.grads[i] is not p.grad:
                if main is not None and self.grads[i] is None:
                    p.grad.record_stream(main)
                self.grads[i] = p.grad


def _shape_key(batch) -> tuple:
    key = []
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            key.append((f.name, tuple(v.shape), v.dtype, v.device))
        elif v is None or isinstance(v, (bool, int, float, str)):
            key.append((f.name, v))
        else:
            raise TypeError(f"CapturedSteps: field {f.name!r} of type {type(v).__name__} is not a tensor or a "
                            f"plain value")
    return tuple(key)


def _clone(batch):
    assert is_dataclass(batch)
    return replace(batch, **{f.name: getattr(batch, f.name).clone() for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


def _tensors(batch) -> list[torch.Tensor]:
    return [getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]


def _copy_into(static, batch) -> None:
    for dst, src in zip(_tensors(static), _tensors(batch)):
        dst.copy_(src, non_blocking=True)


def _record_on(result, stream) -> None:
    items = result.values() if isinstance(result, dict) else result if isinstance(result, (tuple, list)) else [result]
    for v in items:
        if isinstance(v, torch.Tensor):
            v.record_stream(stream)
        elif isinstance(v, (dict, tuple, list)):
            _record_on(v, stream)
