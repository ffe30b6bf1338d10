"""Device, precision and processes for one run.

Launchers (`torchrun`, `accelerate launch`) set RANK/WORLD_SIZE/LOCAL_RANK; we join that process
group directly (gloo on CPU, nccl on CUDA) and do our own gradient all-reduce with SUM. Losses are
normalised by *global* counts, and work is cut into micro-batches whose composition does not
depend on the number of processes, so 1 and N processes compute the same update.
"""
from __future__ import annotations

import atexit
import functools
import os
import random
import sys
from dataclasses import dataclass

import torch

from minillm_cli.errors import InputError, MiniLLMError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False  # models sharded with FSDP2 (engine/fsdp.py): forwards are collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops in a single process) -------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def sum_scalar(self, x: float) -> float:
        if not self.distributed:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.comm_device)
        self.all_reduce_sum(t)
        return float(t.item())

    def sum_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """`sum_scalar` of every value in one collective (one host read instead of one each)."""
        if not self.distributed:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.comm_device)
        self.all_reduce_sum(t)
        return dict(zip(values, t.tolist()))

    def max_scalar(self, x: float) -> float:
        if not self.distributed:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def least(self, x: int | None) -> int | None:
        """The smallest of x over all processes (None anywhere: None), so that a decision taken
        from each process's own measurement is the same everywhere."""
        if not self.distributed:
            return x
        least = -self.max_scalar(-float(-1 if x is None else x))
        return None if least < 0 else int(least)

    def agree_stop(self, signal_number: int) -> int:
        """The largest pending stop-signal number over all processes (0: none). A launcher delivers
        SIGTERM/SIGINT to each process separately, at slightly different moments; deciding together
        makes every process stop after the same step instead of one waiting forever in a collective."""
        return int(self.max_scalar(signal_number))

    def reduce_gradients(self, params) -> None:
        """Sum gradients over processes (each process already scaled by the global normaliser).
        A process that had no micro-batch this step contributes zeros: every process must join
        the collective, and every parameter ends with the same gradient everywhere."""
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                          for p in params]).to(self.comm_device)
        self.all_reduce_sum(flat)
        i = 0
        for p in params:
            n = p.numel()
            g = flat[i : i + n].view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += n

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn):
        """`fn()` on rank 0 alone; every process returns its result or raises its MiniLLMError.
        A refusal on rank 0 (an --out that may not be replaced, a full disk) then stops every
        process with the same error, instead of leaving the others in the next collective until
        the launcher kills them. Other exceptions stay rank 0's own (a bug: its traceback)."""
        if not self.distributed:
            return fn()
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except MiniLLMError as e:
                error = (type(e), str(e))
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error[0](error[1], everywhere=True)
        return result

    def together(self, fn):
        """`fn()` on every process (reading the data, say); a MiniLLMError any of them raises stops
        every process with the lowest such rank's error, said once by rank 0. An error raised on one
        process alone (its own copy of a file, on another node) was otherwise said by no one: an
        InputError is taken to be raised alike everywhere, so ranks other than 0 keep quiet, while
        rank 0 went on and was killed by the launcher."""
        if not self.distributed:
            return fn()
        result = error = None
        try:
            result = fn()
        except MiniLLMError as e:
            error = (type(e), str(e))
        errors = [None] * self.world_size
        torch.distributed.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first[0](first[1], everywhere=True)
        return result

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @property
    def comm_device(self) -> torch.device:
        if self.distributed and torch.distributed.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def lockstep(self, items: list) -> list[tuple[int, object, bool]]:
        """This process's work units as (k, unit, real): unit k goes to rank k % world_size. Under
        FSDP every forward is a collective, so every process must run the same number of units:
        a process short of work gets copies of unit 0 with real=False, whose results the caller
        discards (zero loss weight, statistics dropped). Without FSDP there is no padding."""
        mine = [(k, items[k], True) for k in range(self.rank, len(items), self.world_size)]
        if self.fsdp and items:
            per_rank = -(-len(items) // self.world_size)
            mine += [(-1, items[0], False)] * (per_rank - len(mine))
        return mine

    def sampling_engine(self, requested: str) -> str:
        """The --sampler engine this run may use: the eager loop under FSDP (every forward is a
        collective, which static caches and CUDA graphs do not take part in), else `requested`."""
        return "eager" if self.fsdp else requested

    @property
    def decode_sync(self):
        """The sampler's `sync` under multi-process FSDP (stop decoding when every process is
        done); None otherwise."""
        if not (self.fsdp and self.distributed):
            return None
        return lambda done_here: not self.any_flag(not done_here)

    def any_flag(self, flag: bool) -> bool:
        """True when `flag` holds on any process (a collective under FSDP; local otherwise)."""
        if not (self.fsdp and self.distributed):
            return bool(flag)
        return self.max_scalar(1.0 if flag else 0.0) > 0


def resolve_device(name: str, local_rank: int = 0, flag: str = "--device") -> torch.device:
    name = (name or "auto").lower()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and name == "auto":
        name = "cpu"
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {name}: no CUDA device is available on this machine")
        if name == "cuda":
            return torch.device(f"cuda:{local_rank}")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"{flag} {name!r}: expected auto, cpu, cuda or cuda:N")


_our_group = None  # the default process group init_runtime created (a caller's own is left alone)
_last_run_clean = True  # the last engine run returned (did not raise)


def init_runtime(device: str = "auto", fsdp: bool = False) -> Runtime:
    """Join the launcher's process group. With `fsdp` (or accelerate's FSDP environment) the models
    are sharded later; a single process then gets a one-process group of its own (FSDP needs one)."""
    from minillm_cli.engine.fsdp import fsdp_from_env

    global _our_group
    fsdp = bool(fsdp) or fsdp_from_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if _is_ours() and torch.distributed.get_backend() != backend:  # an earlier run of this process
        torch.distributed.destroy_process_group()                   # was on another kind of device
        _our_group = None
    if dev.type == "cuda" and (world > 1 or fsdp):
        torch.cuda.set_device(dev)
    if (world > 1 or fsdp) and not torch.distributed.is_initialized():
        if world > 1 or all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")):  # a launcher's
            torch.distributed.init_process_group(backend=backend)
        else:  # plain `python -m minillm_cli ... --fsdp`: a private one-process group
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
        atexit.unregister(_leave_at_exit)  # (registered once however often a group is created)
        atexit.register(_leave_at_exit)
        _our_group = torch.distributed.group.WORLD
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local, fsdp=fsdp)


def _leave_at_exit() -> None:
    """Destroy the process group init_runtime created, once, as the process exits (the group
    lives as long as the process, so runs in one process share it: destroying and re-creating a
    group against the launcher's store failed 2 of 7 times in a review's 2-process probe). Why
    at all: a worker that exits with a live gloo group can abort at interpreter exit ("terminate
    called without an active exception", SIGABRT), turning a finished run into a failed one for
    the launcher -- 9 of 40 two-process runs of a bare all-reduce script on a 2-core CPU machine,
    0 of 50 with this exit hook. An NCCL group is left alone after a run that raised: destroying
    it flushes pending collectives, which can hang a failing rank whose peers never join them."""
    global _our_group
    if _is_ours() and (_last_run_clean or torch.distributed.get_backend() != "nccl"):
        if _last_run_clean and torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() > 1:
            # every rank at teardown before any tears down: a rank whose peer is gone while its
            # gloo threads still talk to it can abort all the same (seen twice under load in CI
            # runs shared with other work); bounded, as a peer may have died
            try:
                import datetime

                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            except Exception:  # (a peer that never came: tear down alone, as before)
                pass
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # teardown only: the run's own result is already out
            print(f"warning: leaving the process group failed: {e}", file=sys.stderr)
    _our_group = None


def _is_ours() -> bool:
    """The current default process group is the one init_runtime created (not destroyed since,
    nor replaced by a caller's own)."""
    return (_our_group is not None and torch.distributed.is_initialized()
            and torch.distributed.group.WORLD is _our_group)


def run_entry(fn):
    """Decorate an engine entry point (a whole run): records whether it returned or raised (which
    `_leave_at_exit` needs to know for NCCL)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _last_run_clean
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            _last_run_clean = False
            raise
        _last_run_clean = True
        return out
    return wrapper


def scaling_warnings(world_size: int, micro_batches_per_step: int, fsdp: bool = False,
                     batch_size: int | None = None) -> list[str]:
    """Lines rank 0 prints before training: settings under which processes sit idle (under FSDP
    they run a discarded copy of a micro-batch instead, since every forward is a collective).
    batch_size: when no --grad-accum that divides it is a multiple of world_size, the advice is
    about --batch-size instead."""
    out = []
    if world_size > 1 and micro_batches_per_step % world_size:
        idle = world_size - micro_batches_per_step % world_size
        what = "compute a discarded micro-batch (FSDP lockstep)" if fsdp else "idle"
        advice = f"set --grad-accum to a multiple of {world_size}"
        if batch_size and not any(batch_size % g == 0 for g in range(world_size, batch_size + 1, world_size)):
            advice = f"make --batch-size ({batch_size}) a multiple of {world_size} and --grad-accum too"
        out.append(f"warning: {micro_batches_per_step} micro-batch(es) per step for {world_size} processes: "
                   f"{idle} process(es) {what} in the last round of every update; {advice} (the result "
                   f"of another --grad-accum differs by float rounding, and by a dropout model's masks)")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding must never be why a run fails
        pass
    torch.manual_seed(seed)


def example_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, keys), e.g. (seed, iteration, example
    index): the randomness of one rollout never depends on which process or batch holds it."""
    h = seed & 0xFFFFFFFF
    for k in keys:
        h = (h * 1_000_003 + (k & 0xFFFFFFFF) + 0x9E3779B9) % (2**63 - 1)
    g = torch.Generator()
    g.manual_seed(h)
    return g


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU's queue: a plain
    `.to("cuda")` from pageable memory synchronises the stream; from pinned memory it is queued."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def resolved_settings(rt: Runtime, model, amp, **extra) -> dict:
    """What the run's "auto" settings became (device, weights' and autocast dtypes, LoRA's target
    modules), for run_config.json."""
    def name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    out = {"device": str(rt.device), "dtype": name(next(model.parameters()).dtype), "autocast": name(amp)}
    peft = getattr(model, "peft_config", None)
    targets = getattr(peft.get("default"), "target_modules", None) if isinstance(peft, dict) else None
    if isinstance(targets, (set, list, tuple)):  # the modules LoRA adapts (detected unless named)
        out["lora_targets"] = sorted(targets)
    return {**out, **extra}


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    """bf16/fp16 autocast on CUDA (float32 master weights); a no-op context elsewhere.
    cache False: every use of a weight casts it afresh (what a CUDA graph must record: a cached
    copy is freed when the autocast region ends and would be stale after an optimizer step)."""
    import contextlib

    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free now: on a CUDA device, what the driver reports free plus what torch's caching
    allocator holds unused; for the CPU, available RAM, capped by a cgroup (container) limit
    minus what the cgroup uses. None when unknown."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "cpu":
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                 "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
                try:
                    cap = open(limit).read().strip()
                    if cap.isdigit():
                        free = min(free, int(cap) - int(open(used).read().strip()))
                    break
                except OSError:
                    continue
            return max(free, 0)
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None
