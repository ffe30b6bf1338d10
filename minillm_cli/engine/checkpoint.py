"""Atomic checkpoints: everything a run needs to continue exactly where it stopped.

Layout: OUT/checkpoints/step-00000010/{state.pt,meta.json} plus OUT/checkpoints/LATEST naming the
newest complete one. A checkpoint is written into a temporary folder, fsynced, renamed into place,
and only then does LATEST move (itself by atomic rename). A run killed at any instant therefore
leaves LATEST pointing at a complete checkpoint; a full disk leaves the previous one intact.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from minillm_cli.errors import InputError, RunError

LATEST = "LATEST"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only what the optimizer changes (all weights for a full model, adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names or not names}


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, extra: dict | None = None,
                    keep: int = 2, model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. Raises RunError on a
    full disk (with the previous checkpoint intact). `model_state`/`optimizer_state`: full states
    gathered beforehand (FSDP; the optimizer's keyed by parameter name)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        payload = {
            "step": step,
            "model": trainable_state(model) if model_state is None else model_state,
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "optimizer_keys": "ids" if optimizer_state is None else "names",
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        }
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / "meta.json", "w") as fh:
            json.dump({"step": step, "complete": True}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            prev = latest_checkpoint(run_dir)
            raise RunError(f"disk full while writing checkpoint at step {step} in {root}; "
                           f"previous checkpoint {'intact: ' + prev.name if prev else 'none'}") from None
        raise RunError(f"could not write checkpoint at step {step} in {root}: {e}") from None
    _prune(root, keep)
    return final


def save_on_main(rt, run_dir: Path, step: int, **kw) -> None:
    """`save_checkpoint` on rank 0; every process learns whether it worked, so a full disk stops
    all of them with the same message instead of leaving the others waiting in a collective.
    Under FSDP the full model and optimizer states are first gathered on rank 0 (collectives, so
    every process takes part)."""
    if getattr(rt, "fsdp", False):
        from minillm_cli.engine import fsdp

        kw["model_state"] = fsdp.full_model_state(kw["model"])
        kw["optimizer_state"] = fsdp.full_optimizer_state(kw["model"], kw["optimizer"])
    rt.on_main(lambda: save_checkpoint(run_dir, step, **kw))


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume from checkpoint `step`: drop metrics rows of later steps (logged by a run killed
    before it could checkpoint them; they are about to be recomputed) and any torn last line.
    Returns the rows kept."""
    path = Path(path)
    if not path.is_file():
        return []
    keep, rows = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step", 0) <= step:
            keep.append(line)
            if isinstance(row, dict):
                rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    mine = f".tmp-{os.getpid()}"
    for stale in [*root.glob(".step-*.tmp-*"), *root.glob(f".{LATEST}.tmp-*")]:  # left by killed runs
        if stale.name.endswith(mine):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (LATEST if valid, else the newest complete folder)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    ptr = root / LATEST
    if ptr.is_file():
        cand = root / ptr.read_text().strip()
        if (cand / "meta.json").is_file() and (cand / "state.pt").is_file():
            return cand
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "meta.json").is_file() and (p / "state.pt").is_file())
    return done[-1] if done else None


def resume_run(out: Path, *, model, optimizer, scheduler, steps: int, is_main: bool) -> dict | None:
    """--resume: restore OUT's newest checkpoint; returns load_checkpoint's {"step", "extra"} plus
    "path". The optimizer then holds the rate this run's schedule sets for the next step (its saved
    rate came from the first run's schedule, whose length --steps may have changed: a finished
    cosine run would otherwise resume at 0); a step count below the checkpoint's is refused; rows
    metrics.jsonl holds past the checkpoint are dropped (rank 0), and "logged" holds the rows kept
    (rank 0; [] elsewhere). None: a run folder (run_config.json) stopped before its first
    checkpoint -- seqkd during its teacher's generation, say -- whose training starts at step 0
    (its metrics rows dropped); a folder that is neither is refused."""
    last = latest_checkpoint(out)
    if last is None:
        if (Path(out) / "summary.json").is_file():  # (a finished run whose checkpoints were deleted)
            raise InputError(f"--resume: the run in {out} finished (summary.json) and has no checkpoint left "
                             f"to continue from; start a new --out (or --overwrite this one)")
        if (Path(out) / "run_config.json").is_file():
            if is_main:
                truncate_metrics(Path(out) / "metrics.jsonl", 0)
            return None
        raise InputError(f"--resume: no checkpoint in {out}/checkpoints")
    state = load_checkpoint(last, model=model, optimizer=optimizer, scheduler=scheduler)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    if state["step"] > steps:
        raise InputError(f"--resume: the run in {out} is at step {state['step']} already, past the {steps} steps "
                         f"asked for; give more --steps (or --epochs)")
    logged = truncate_metrics(Path(out) / "metrics.jsonl", state["step"]) if is_main else []
    return {**state, "path": last, "logged": logged}


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore model/optimizer/scheduler/RNG; returns {"step", "extra"}."""
    payload = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    by_name = payload.get("optimizer_keys") == "names"  # written under FSDP
    impl = [{k: g.get(k) for k in _IMPLEMENTATION} for g in optimizer.param_groups]
    from minillm_cli.engine import fsdp

    if fsdp.is_sharded(model):
        known = set(model.state_dict())
        unexpected = [k for k in payload["model"] if k not in known]
        if unexpected:
            raise RunError(f"checkpoint {path} does not match the model (unexpected keys {unexpected[:3]})")
        fsdp.load_model_state(model, payload["model"])
        optim = payload["optimizer"] if by_name else fsdp.ids_to_names(model, optimizer, payload["optimizer"])
        fsdp.load_optimizer_state(model, optimizer, optim)
    else:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
        if unexpected:
            raise RunError(f"checkpoint {path} does not match the model (unexpected keys {unexpected[:3]})")
        if by_name:
            fsdp.load_optimizer_state(model, optimizer, payload["optimizer"])
        else:
            optimizer.load_state_dict(payload["optimizer"])
    _keep_implementation(optimizer, impl)
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload.get("extra", {})}


# An optimizer's state dict carries its implementation flags, and loading one installs them: a
# run that builds the fused AdamW (CUDA) would resume with the per-tensor one of an older or CPU
# checkpoint, or the other way round (a fused state under FSDP or on a CPU). The run's own choice
# stands; only the numbers come from the checkpoint.
_IMPLEMENTATION = ("fused", "foreach", "capturable")


def _keep_implementation(optimizer, impl: list[dict]) -> None:
    """Put back the flags `impl` (read before loading) and move each `step` count where that
    implementation keeps it: on the parameter's device for fused / capturable, else on the CPU
    (both float32, as torch's AdamW makes them)."""
    for group, kept in zip(optimizer.param_groups, impl):
        group.update(kept)
        on_device = bool(kept.get("fused") or kept.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor):
                state["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)
