"""engine/sampling_weights.py: a float32 model sampled under bf16 autocast reads bf16 copies of its
matmul weights, cast once per call, instead of casting every weight in every decode step; the
rollouts are bitwise those of the per-step casts (GPT-2 with its tied head, Llama, a LoRA model),
the masters are back afterwards, and a kept decoder sees optimizer steps."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import gpt2_numbers
from minillm_cli.data.tokenize import left_pad
from minillm_cli.engine import fast_sampler
from minillm_cli.engine.fast_sampler import fast_sample
from minillm_cli.engine.sampler import SamplingParams
from minillm_cli.engine.sampling_weights import SamplingWeights, sampling_weights

V, PAD, EOS = 11, 11, 0
PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 2], [5], [1, 2, 3, 4]]


@pytest.fixture(autouse=True)
def _release():
    yield
    fast_sampler.release()


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=V + 1, max_position_embeddings=64,
                      initializer_range=0.4, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _lora(seed):
    from minillm_cli.models import LoraSettings, apply_lora

    model = apply_lora(gpt2_numbers(seed, vocab=V, pad=PAD, eos=EOS, n_layer=2), LoraSettings(2, 4.0, 0.0, None))
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero, so the adapters change the logits
            p.data.normal_()
    return model.eval()


def _falcon_with_biases(seed):
    """FalconLinear subclasses nn.Linear with its own forward: matmul, then `+ bias` outside
    autocast (float32 with the master bias, bf16 with a copy): must not be covered."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=V + 1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, bias=True,
                       new_decoder_architecture=False, multi_query=False, alibi=False, parallel_attn=True,
                       initializer_range=0.4, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    cfg._attn_implementation = "sdpa"
    model = FalconForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 1)
    return model


def _dora(seed):
    """peft's DoRA casts the layer input to lora_A's weight dtype and takes the weight norm
    outside autocast: covered modules, but a copy changes the numbers; the check drops them."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2_numbers(seed, vocab=V, pad=PAD, eos=EOS, n_layer=2),
                           LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                                      fan_in_fan_out=True, use_dora=True))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model.eval()


STUDENTS = {
    "gpt2": lambda: gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS, n_layer=2),
    "llama": lambda: _llama(3),
    "gpt2-lora": lambda: _lora(4),
    "falcon-biases": lambda: _falcon_with_biases(5),
    "gpt2-dora": lambda: _dora(6),
}
# whether the student samples through copies (the DoRA model fails the exactness check)
USES_COPIES = {"gpt2": True, "llama": True, "gpt2-lora": True, "falcon-biases": True, "gpt2-dora": False}


def _sample(student, teacher, seeds=(1, 2, 3, 4), dtype=torch.bfloat16, **kw):
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.autocast("cpu", dtype=dtype), warnings.catch_warnings():
        warnings.filterwarnings("error", message="fast sampler unavailable")  # the static path ran
        return fast_sample(student, teacher, prompt_ids=ids, prompt_mask=mask, params=SamplingParams(10),
                           alpha=0.3, eos_id=EOS, pad_id=PAD,
                           generators=[torch.Generator().manual_seed(s) for s in seeds], vocab_size=V,
                           engine="static", **kw)


def _bitwise(a, b):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.mix_logp, b.mix_logp)
    assert torch.equal(a.student_logp, b.student_logp)


@pytest.mark.parametrize("kind,dtype", [(k, torch.bfloat16) for k in sorted(STUDENTS)]
                         + [("gpt2", torch.float16), ("llama", torch.float16)])
def test_rollouts_are_bitwise_those_of_per_step_casts(kind, dtype, monkeypatch):
    student, teacher = STUDENTS[kind](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    with_copies = _sample(student, teacher, dtype=dtype, keep=True)
    (dec,) = fast_sampler._KEPT.values()
    assert (dec.models["student"].weights is not None) == USES_COPIES[kind]
    assert dec.models["teacher"].weights is not None  # (a float32 teacher here)
    fast_sampler.release()
    monkeypatch.setattr(fast_sampler, "SAMPLING_WEIGHTS", False)
    per_step = _sample(student, teacher, dtype=dtype, keep=False)
    _bitwise(with_copies, per_step)
    assert with_copies.response_ids.shape[1] >= 5


class _Casts(TorchDispatchMode):
    """Counts float32 -> low-precision casts of the given tensors' storage."""

    def __init__(self, ptrs):
        super().__init__()
        self.ptrs, self.n = ptrs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.n += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("copies", [True, False])
def test_no_weight_is_cast_while_decoding(copies, monkeypatch):
    """With the copies, no float32 weight is cast during a call (the copies are refreshed with an
    in-place copy_ once); without them, each decode step casts them all again."""
    monkeypatch.setattr(fast_sampler, "SAMPLING_WEIGHTS", copies)
    student, teacher = STUDENTS["gpt2"](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    _sample(student, teacher, keep=True)  # self-checks and the decoder, outside the count
    ptrs = {p.data_ptr() for m in (student, teacher) for p in m.parameters()}
    with _Casts(ptrs) as casts:
        r = _sample(student, teacher, keep=True)
    steps = r.response_ids.shape[1]
    n_matmul = sum(len(SamplingWeights(m, torch.bfloat16).masters) for m in (student, teacher))
    if copies:
        assert casts.n == 0
    else:
        assert casts.n >= (steps - 1) * n_matmul


def test_what_is_copied_and_that_the_masters_come_back():
    """Linear / Conv1D parameters only: LayerNorm and the embedding stay float32 (autocast keeps
    those ops in float32), GPT-2's LM head, tied to the embedding, reads its own copy while the
    embedding lookup reads the master."""
    model = STUDENTS["gpt2"]()
    masters = {n: p for n, p in model.named_parameters()}
    w = sampling_weights(model, torch.bfloat16)
    assert sampling_weights(model, None) is None
    assert sampling_weights(model.to(torch.bfloat16), torch.bfloat16) is None  # nothing to cast
    model.float()
    w = sampling_weights(model, torch.bfloat16)
    # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj) x (weight, bias) + the head's weight
    assert len(w) == 2 * 4 * 2 + 1
    assert w.nbytes() == 2 * sum(p.numel() for n, p in masters.items() if "ln" not in n and "wpe" not in n)
    w.refresh()
    with w.installed():
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.transformer.wte.weight.dtype == torch.float32
        assert model.transformer.h[0].ln_1.weight.dtype == torch.float32
        assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
        torch.testing.assert_close(model.lm_head.weight, masters["transformer.wte.weight"].to(torch.bfloat16),
                                   rtol=0, atol=0)
    assert {n: p for n, p in model.named_parameters()} == masters
    assert all(a is b for a, b in zip(model.parameters(), masters.values()))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    with pytest.raises(RuntimeError), w.installed():
        raise RuntimeError("a failed step")
    assert all(a is b for a, b in zip(model.parameters(), masters.values()))


def test_a_kept_decoder_samples_with_the_weights_after_an_optimizer_step():
    student, teacher = STUDENTS["gpt2"](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    _sample(student, teacher, keep=True)
    with torch.no_grad():
        for p in student.parameters():  # what an optimizer step does: in place
            p.mul_(-1.5)
    kept = _sample(student, teacher, keep=True, seeds=(5, 6, 7, 8))
    fast_sampler.release()
    fresh = _sample(student, teacher, keep=False, seeds=(5, 6, 7, 8))
    _bitwise(kept, fresh)
    masters = list(student.parameters())
    assert all(p.dtype == torch.float32 for p in masters)


def test_replaced_parameters_get_a_new_decoder():
    """A kept decoder reads the parameters' storage (its graph, its copies): parameters replaced
    by new tensors (load_state_dict(assign=True)) must not be sampled through the old ones."""
    student, teacher = STUDENTS["gpt2"](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    _sample(student, teacher, keep=True)
    other = STUDENTS["gpt2"]()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    student.load_state_dict(other.state_dict(), assign=True)
    new = list(student.parameters())
    kept = _sample(student, teacher, keep=True, seeds=(5, 6, 7, 8))
    assert all(a is b for a, b in zip(student.parameters(), new))
    fast_sampler.release()
    _bitwise(kept, _sample(other, teacher, keep=False, seeds=(5, 6, 7, 8)))  # the same weights


# -- the padded LM head (sampling_weights.PaddedHead; on by default on CUDA only) ----------------

@pytest.fixture
def pad_on_cpu(monkeypatch):
    monkeypatch.setattr(fast_sampler, "PAD_HEAD_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2-lora", "falcon-biases"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_a_padded_head_samples_the_same_rollouts(kind, amp, monkeypatch):
    """Rows padded with zeros add logit columns that the sampler cuts off: the same tokens, and
    log-probs equal up to the rounding of another matmul shape."""
    student, teacher = STUDENTS[kind](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)

    def run(pad: bool):
        monkeypatch.setattr(fast_sampler, "PAD_HEAD_DEVICES", ("cpu",) if pad else ())
        fast_sampler.release()
        if amp is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="fast sampler unavailable")
                ids, mask = left_pad(PROMPTS, PAD)
                r = fast_sample(student, teacher, prompt_ids=ids, prompt_mask=mask, params=SamplingParams(10),
                                alpha=0.3, eos_id=EOS, pad_id=PAD,
                                generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)],
                                vocab_size=V, engine="static", keep=True)
        else:
            r = _sample(student, teacher, dtype=amp, keep=True)
        (dec,) = fast_sampler._KEPT.values()
        return r, dec

    padded, dec = run(True)
    for name in ("student", "teacher"):
        head = dec.models[name].head
        assert head is not None and head.rows == 64 and head.weight.shape[0] == 64
        assert head.weight.dtype == (amp or torch.float32)
        # a float32 model under autocast: the head's one copy is the padded one
        if dec.models[name].weights is not None:
            assert all(mod is not head.head for mod, _, _ in dec.models[name].weights.slots)
    plain, dec = run(False)
    assert all(m.head is None for m in dec.models.values())
    assert torch.equal(padded.response_ids, plain.response_ids)
    assert torch.equal(padded.response_mask, plain.response_mask)
    tol = dict(rtol=0, atol=1e-5) if amp is None else dict(rtol=0, atol=5e-2)
    torch.testing.assert_close(padded.mix_logp, plain.mix_logp, **tol)
    torch.testing.assert_close(padded.student_logp, plain.student_logp, **tol)
    assert padded.response_ids.shape[1] >= 5


def _biased_head_model():
    model = STUDENTS["gpt2"]()
    head = torch.nn.Linear(model.config.n_embd, model.config.vocab_size, bias=True)
    torch.nn.init.normal_(head.bias)
    model.lm_head = head  # untied, with a bias
    return model


def test_what_the_padded_head_holds_and_that_the_masters_come_back():
    from minillm_cli.engine.sampling_weights import padded_head

    model = _biased_head_model()
    masters = dict(model.named_parameters())
    h = padded_head(model, torch.bfloat16)
    assert h.rows == 64 and h.dtype == torch.bfloat16
    h.refresh()
    with h.installed():
        w, b = model.lm_head.weight, model.lm_head.bias
        assert w.shape == (64, model.config.n_embd) and b.shape == (64,)
        assert torch.equal(w[: V + 1], masters["lm_head.weight"].to(torch.bfloat16))
        assert torch.equal(b[: V + 1], masters["lm_head.bias"].to(torch.bfloat16))
        assert not w[V + 1 :].any() and not b[V + 1 :].any()
        x = torch.randn(3, model.config.n_embd)
        torch.testing.assert_close(model.lm_head(x.bfloat16())[:, : V + 1],
                                   torch.nn.functional.linear(x.bfloat16(), masters["lm_head.weight"].bfloat16(),
                                                              masters["lm_head.bias"].bfloat16()))
    assert dict(model.named_parameters()) == masters
    assert all(a is masters[n] for n, a in model.named_parameters())
    with pytest.raises(RuntimeError), h.installed():
        raise RuntimeError("a failed step")
    assert all(a is masters[n] for n, a in model.named_parameters())
    # the head's own dtype without autocast; a tied head stays tied
    tied = STUDENTS["gpt2"]()
    h = padded_head(tied, None)
    assert h.dtype == torch.float32
    h.refresh()
    with h.installed():
        assert tied.lm_head.weight.shape[0] == 64
        assert tied.transformer.wte.weight.shape[0] == V + 1  # the embedding keeps its master
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_no_padded_head_where_it_is_aligned_or_not_a_plain_linear():
    from peft import LoraConfig, get_peft_model

    from minillm_cli.engine.sampling_weights import padded_head

    aligned = gpt2_numbers(1, vocab=15, pad=15, eos=EOS, n_layer=1)  # 16 rows
    assert aligned.lm_head.out_features == 16 and padded_head(aligned, None) is None
    adapted = get_peft_model(STUDENTS["gpt2"](), LoraConfig(r=2, target_modules=["lm_head"]))
    assert padded_head(adapted, None) is None  # a LoRA layer with its own forward
    assert padded_head(STUDENTS["gpt2-lora"](), None) is not None  # adapters elsewhere: the head is plain


def test_a_kept_decoder_pads_the_head_after_an_optimizer_step(pad_on_cpu):
    student, teacher = STUDENTS["gpt2"](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    _sample(student, teacher, keep=True)
    (dec,) = fast_sampler._KEPT.values()
    assert dec.models["student"].head is not None
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-1.5)
    kept = _sample(student, teacher, keep=True, seeds=(5, 6, 7, 8))
    fast_sampler.release()
    _bitwise(kept, _sample(student, teacher, keep=False, seeds=(5, 6, 7, 8)))


def test_no_weight_is_cast_while_decoding_with_a_padded_head(pad_on_cpu):
    student, teacher = STUDENTS["gpt2"](), gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    _sample(student, teacher, keep=True)
    ptrs = {p.data_ptr() for m in (student, teacher) for p in m.parameters()}
    with _Casts(ptrs) as casts:
        _sample(student, teacher, keep=True)
    assert casts.n == 0
