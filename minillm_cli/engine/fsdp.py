"""FSDP2 sharding of the student (trained) and the teacher (frozen), and the full-state-dict
gathers that saving and checkpointing need.

- `shard(model, rt, trainable=...)`: `fully_shard` per transformer block (the model's largest
  ModuleList, e.g. `transformer.h` / `model.layers`) and then the root. Gradients are SUMMED over
  processes (our losses are already divided by the global normaliser): the gradient divide factor
  is 1 with sum-only collectives, on every FSDP unit (the setting is per unit, not inherited).
- Every FSDP forward/backward is a collective: callers run the same sequence of forwards on every
  rank (`Runtime.lockstep`, the sampler's `sync`).
- `full_model_state` / `full_optimizer_state` gather full, unsharded, CPU state dicts on rank 0
  (collectives: call them on every rank); `load_model_state` / `load_optimizer_state` scatter them
  back. Checkpoints therefore hold full state and resume with any number of processes.
"""
from __future__ import annotations

import os

import torch

from minillm_cli.errors import InputError


def fsdp_from_env() -> bool:
    """accelerate's FSDP config (distributed_type: FSDP) sets ACCELERATE_USE_FSDP=true."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def check_supported(*, lora: bool, teacher_device: str | None = None, save_adapter: bool = False,
                    adapter: str | None = None, flag: bool = True) -> None:
    """Refusals before anything loads. `adapter`: the trained model, when it is a LoRA adapter
    folder (only the adapter trains: LoRA by another name). flag: --fsdp was given (else
    accelerate's FSDP config turned it on, and the message says so)."""
    what = "--fsdp" if flag else "accelerate's FSDP config (ACCELERATE_USE_FSDP)"
    if lora or save_adapter:
        raise InputError(f"{what} with --lora-r is not supported: shard a full model, or train LoRA adapters "
                         "without --fsdp")
    if adapter:
        raise InputError(f"{what}: {adapter} is a LoRA adapter folder (only its weights train), which is not "
                         f"supported; merge it first (minillm sft --model {adapter} ... without --save-adapter) "
                         f"or train it without --fsdp")
    if teacher_device:
        raise InputError(f"{what} with --teacher-device is not supported: under FSDP the teacher is sharded "
                         "over the processes' devices")


def blocks_of(model) -> torch.nn.ModuleList | None:
    """The transformer blocks: the ModuleList holding the most parameters."""
    best, size = None, 0
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = m, n
    return best


def shard(model, rt, *, trainable: bool):
    """Shard `model` in place over all processes (a one-process group for world size 1)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from minillm_cli.engine.aligned_head import unalign_head

    unalign_head(model)  # (its forward swaps in a padded weight; untested under FSDP's parameter swaps)
    kw = {}
    if trainable and rt.device.type == "cuda":
        from minillm_cli.models import compute_dtype

        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype(rt.device), reduce_dtype=torch.float32)
    blocks = blocks_of(model)
    if blocks is not None:
        for block in blocks:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0's CPU (empty elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_opts(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, on rank 0's CPU. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_opts(full_state_dict=True, cpu_offload=True))


def load_model_state(model, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_opts(full_state_dict=True, strict=False))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_opts(full_state_dict=True))


def ids_to_names(model, optimizer, state: dict) -> dict:
    """A plain `optimizer.state_dict()` (parameters numbered in param-group order) keyed by
    parameter name instead, as `full_optimizer_state` writes it: so a checkpoint written without
    FSDP resumes under FSDP. Both sides build the optimizer with `make_optimizer`."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    out_groups, i = [], 0
    for g in state["param_groups"]:
        k = len(g["params"])
        out_groups.append({**g, "params": names[i : i + k]})
        i += k
    return {"state": {names[int(k)]: v for k, v in state["state"].items()}, "param_groups": out_groups}


def save_full(model, tokenizer, out, rt, *, trust_remote_code: bool = False) -> None:
    """Write the sharded model as an ordinary Hugging Face folder from rank 0. Gathers on every
    rank (a collective); rank 0 loads the full weights into a plain CPU copy and saves that."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from minillm_cli.models import quiet_transformers

    state = full_model_state(model)
    if not rt.is_main:
        return
    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, trust_remote_code=trust_remote_code)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"FSDP save: parameters missing from the gathered state: {missing[:3]}")
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def save_student(model, tokenizer, out, rt, *, merge_lora: bool = True, trust_remote_code: bool = False) -> None:
    """Save the trained model as a Hugging Face folder. Call on EVERY process: under FSDP the
    weights are gathered first (a collective); only rank 0 writes."""
    if rt.fsdp:
        save_full(model, tokenizer, out, rt, trust_remote_code=trust_remote_code)
    elif rt.is_main:
        from minillm_cli.models import save_pretrained

        save_pretrained(model, tokenizer, out, merge_lora=merge_lora)
