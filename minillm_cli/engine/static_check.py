"""The fast sampler's self-check: on this transformers version and device, does a model's
static-cache path (engine/static_model.py) reproduce one uncached forward over the same tokens?

Run once per model before its first static-cache rollout. A left-padded prefill plus three decode
steps -- the sampler's own masks, positions, cache writes, prefix views and weight copies -- is
compared with a full forward; the tolerance is set by how far the eager sampler's own cached
decode drifts (deep bf16 models drift by more than a fixed bound; a wrong mask or position by far
more). A model that fails goes to the reference loop. Where the sampler may decode through
decode_attention's kernel, the same steps run through it too: a model the kernel does not
reproduce keeps SDPA (`kernel_unsafe`), the others may still use the kernel.
"""
from __future__ import annotations

import weakref

import torch

from minillm_cli.engine import decode_attention
from minillm_cli.engine.sampler import _Stepper, causal_allow, model_kwargs, positions_from_mask
from minillm_cli.engine.static_model import (
    ModelSwitches, StaticModel, Unsupported, autocast_dtype)

# model -> {(autocast dtype, device, kernel pass?, switches): None where the model passed, else why not}
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# model -> {autocast dtype: why its decode steps through the kernel failed self_check, or None
# where they passed}; models without an entry were not checked through it
_KERNEL_UNSAFE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def kernel_checkable(sm, device, kernel_pass: bool) -> bool:
    """Whether self_check also decodes `sm`'s model through the kernel: where the sampler's switches
    let "auto" choose it (`kernel_pass`), and only for a model on the sampler's own device (a teacher
    on another GPU never attends through the kernel: its steps are not captured)."""
    return (kernel_pass and sm.impl == "sdpa" and sm.writes is not None
            and sm.device == torch.device(device)  # (as `fast_sample` decides what it captures)
            and decode_attention.available(device))


def kernel_unsafe(model, device) -> str | None:
    """Why `model`'s decode steps through the kernel failed self_check here (None: passed or not
    checked)."""
    return _KERNEL_UNSAFE.get(model, {}).get(autocast_dtype(device))


@torch.no_grad()
def self_check(model, vocab_size: int, device, eos_id: int = 0, *, kernel_pass: bool = False,
               switches: ModelSwitches = ModelSwitches()) -> str | None:
    """None when a left-padded static-cache prefill + 3 decode steps give the logits of one
    uncached forward over the same tokens (within precision); else a reason. kernel_pass: also
    decode through decode_attention's kernel where `kernel_checkable`. Cached per model, autocast
    dtype, device, kernel_pass and switches (a check made with the pass off must not stand for one
    with it on)."""
    key = (autocast_dtype(device), str(device), kernel_pass, switches)
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
            sm = StaticModel(model, vocab_size, 2, 16, device, switches)
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
        low = autocast_dtype(device) is not None or sm.dtype in (torch.float16, torch.bfloat16)
        checkable = kernel_checkable(sm, device, kernel_pass)
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
            _KERNEL_UNSAFE.setdefault(model, {})[autocast_dtype(device)] = unsafe
    except Unsupported as e:
        reason = str(e)
    except torch.cuda.OutOfMemoryError:
        raise  # transient, not a property of the model: must not switch the run to the eager loop
    except Exception as e:  # whatever breaks the static path here falls back to the reference
        reason = f"static-cache path failed: {type(e).__name__}: {e}"
    finally:
        model.train(was)
    _CHECKED.setdefault(model, {})[key] = reason
    return reason

