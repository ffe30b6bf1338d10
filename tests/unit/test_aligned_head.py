"""engine/aligned_head.py: the LM head multiplies over vocabulary rows padded to a multiple of 64
(on by default on CUDA, forced here on the CPU): the same logits (shape, values) and gradients as
the plain head for tied and biased heads, in float64 and under bf16 autocast (where the pad runs on
the cast copy); parameters, ties and state dicts untouched; copies and pickles bind to their own
head; the sampler's aligned copy is not padded again."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import gpt2_numbers
from minillm_cli.engine.aligned_head import align_head, is_aligned, unalign_head
from minillm_cli.engine.losses import lm_loss

V = 11  # 12 rows with the pad row


def _model(seed=1, bias=False, dtype=torch.float64):
    model = gpt2_numbers(seed, vocab=V, pad=V, eos=0, n_layer=2).to(dtype)
    if bias:
        head = torch.nn.Linear(model.config.n_embd, V + 1, bias=True, dtype=dtype)
        torch.nn.init.normal_(head.bias)
        model.lm_head = head  # untied
    return model


def _loss_and_grads(model, ids):
    logits = model(input_ids=ids).logits
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    loss = lm_loss(logits[:, :-1], ids[:, 1:], mask, float(mask.sum()), V, chunk_size=5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
def test_same_logits_and_gradients_as_the_plain_head(bias):
    plain = _model(bias=bias)
    aligned = copy.deepcopy(plain)
    assert align_head(aligned) and is_aligned(aligned) and not is_aligned(plain)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    a, la, ga = _loss_and_grads(plain, ids)
    b, lb, gb = _loss_and_grads(aligned, ids)
    assert b.shape == a.shape == (3, 9, V + 1)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("untied", [False, True])
def test_under_autocast_the_pad_copies_the_cast_weight(untied):
    """A float32 head under bf16 autocast: cast (as autocast would), then pad the bf16 copy; the
    logits are those of the plain head up to the rounding of another GEMM shape."""
    plain = _model(dtype=torch.float32, bias=untied)
    aligned = copy.deepcopy(plain)
    align_head(aligned)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))

    class Pads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.constant_pad_nd.default:
                self.dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = plain(input_ids=ids).logits
        with Pads() as pads:
            b = aligned(input_ids=ids).logits
    assert pads.dtypes == [torch.bfloat16] * (2 if untied else 1)  # weight (and bias), cast first
    assert b.dtype == a.dtype and b.shape == a.shape
    torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=3e-2)
    # the gradients, the head's share included (the tie's embedding side alone would give a
    # float32 gradient too): those of the plain head, up to bf16 rounding
    grads = []
    for model, out in ((plain, a), (aligned, b)):
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=2e-2, atol=2e-3, msg=n)
    head = "lm_head.weight" if untied else "transformer.wte.weight"
    assert grads[1][head].dtype == torch.float32  # the master's gradient


def test_parameters_ties_state_dict_copies_and_pickles():
    model = _model()
    params = dict(model.named_parameters())
    state = model.state_dict()
    assert align_head(model)
    wrapped = model.lm_head.forward
    assert not align_head(model) and model.lm_head.forward is wrapped  # (a second call wraps nothing)
    assert is_aligned(model)
    assert dict(model.named_parameters()) == params
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.state_dict().keys() == state.keys()
    assert all(model.state_dict()[k] is not None and torch.equal(model.state_dict()[k], state[k]) for k in state)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=ids).logits

    twin = copy.deepcopy(model)  # the copy's head multiplies its own weight
    assert is_aligned(twin)
    with torch.no_grad():
        twin.transformer.wte.weight.mul_(-1)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert not torch.allclose(twin(input_ids=ids).logits, ref)

    back = pickle.loads(pickle.dumps(model))
    assert is_aligned(back)
    torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=0, atol=0)
    with torch.no_grad():
        back.transformer.wte.weight.mul_(-1)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)

    unalign_head(model)
    assert not is_aligned(model) and "forward" not in model.lm_head.__dict__


def test_nothing_to_align():
    from peft import LoraConfig, get_peft_model

    aligned_rows = gpt2_numbers(1, vocab=15, pad=15, eos=0)  # 16 rows
    assert not align_head(aligned_rows) and not is_aligned(aligned_rows)
    adapted = get_peft_model(_model(dtype=torch.float32), LoraConfig(r=2, target_modules=["lm_head"]))
    assert not align_head(adapted)  # a LoRA layer on the head: its own forward, left alone


def test_the_sampler_reads_its_aligned_copy_unpadded(monkeypatch):
    """With the sampler's padded copy installed (sampling_weights.PaddedHead) the head is aligned
    already: no pad per decode step; the tokens are those of a plain model."""
    from minillm_cli.data.tokenize import left_pad
    from minillm_cli.engine import fast_sampler
    from minillm_cli.engine.sampler import SamplingParams

    student, teacher = _model(1, dtype=torch.float32), _model(2, dtype=torch.float32)
    ids, mask = left_pad([[3, 4, 5], [6], [7, 8, 9, 1]], V)

    def run():
        return fast_sampler.fast_sample(student, teacher, prompt_ids=ids, prompt_mask=mask,
                                        params=SamplingParams(8), alpha=0.3, eos_id=0, pad_id=V,
                                        generators=[torch.Generator().manual_seed(s) for s in range(3)],
                                        vocab_size=V, engine="static", keep=False)
    ref = run()
    for m in (student, teacher):
        align_head(m)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.constant_pad_nd.default:
                self.n += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(fast_sampler, "PAD_HEAD_DEVICES", ("cpu",))
    run()  # self-checks outside the count
    with Count() as count:
        got = run()
    assert count.n == 0
    assert torch.equal(got.response_ids, ref.response_ids)
    monkeypatch.setattr(fast_sampler, "PAD_HEAD_DEVICES", ())  # the aligned forward alone
    got = run()
    assert torch.equal(got.response_ids, ref.response_ids)
    torch.testing.assert_close(got.mix_logp, ref.mix_logp, rtol=0, atol=1e-5)


def test_load_model_aligns_a_misaligned_head_where_it_fuses(tiny_dir):
    """`load_model(fuse=True)` (the default on CUDA): a vocabulary grown to an odd row count by
    one added token gets the aligned head; aligned rows and `fuse=False` are left alone."""
    from minillm_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "teacher"))
    path, cpu = str(tiny_dir / "teacher"), torch.device("cpu")
    as_is = load_model(path, tokenizer=tok, device=cpu, fuse=True)
    assert as_is.lm_head.out_features % 8 == 0 and not is_aligned(as_is)
    tok.add_tokens(["<an-added-token>"])
    grown = load_model(path, tokenizer=tok, device=cpu, fuse=True)
    assert grown.lm_head.out_features % 8 != 0 and is_aligned(grown)
    assert not is_aligned(load_model(path, tokenizer=tok, device=cpu, fuse=False))


def test_not_another_librarys_forward_and_gone_before_fsdp_shards(monkeypatch):
    """Only our own forward counts as aligned and is removed (accelerate's hooks install a
    functools.partial forward too); `fsdp.shard` removes it before sharding."""
    import functools
    import types

    from minillm_cli.engine import fsdp

    model = _model(dtype=torch.float32)
    hooked = functools.partial(lambda mod, x: mod.__class__.forward(mod, x), model.lm_head)
    model.lm_head.forward = hooked
    assert not is_aligned(model)
    assert not align_head(model) and model.lm_head.forward is hooked  # not replaced
    unalign_head(model)
    assert model.lm_head.forward is hooked  # nor removed
    del model.lm_head.forward
    assert align_head(model)
    seen = []
    monkeypatch.setattr("torch.distributed.fsdp.fully_shard", lambda mod, **kw: seen.append(is_aligned(model)))
    fsdp.shard(model, types.SimpleNamespace(device=torch.device("cpu")), trainable=True)
    assert seen and not any(seen) and not is_aligned(model)
