"""engine/recompute.py: gradient checkpointing by block gives the same gradients (also with
dropout, also in eval mode) and keeps less for the backward."""
from __future__ import annotations

import pytest
import torch

from minillm_cli.engine.recompute import recompute_blocks


def _model(kind: str, dropout: float = 0.0):
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=40, n_positions=32,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        return GPT2LMHeadModel(cfg).double()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, max_position_embeddings=32,
                      attention_dropout=dropout)
    return LlamaForCausalLM(cfg).double()


def _loss_and_grads(model, ids, att, seed=1):
    torch.manual_seed(seed)  # the dropout masks
    out = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    loss = out.log_softmax(-1)[..., 3].mean()
    model.zero_grad()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _saved_numel(model, ids, att) -> int:
    total = 0

    def pack(x):
        nonlocal total
        total += x.numel()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=ids, attention_mask=att, use_cache=False).logits.sum()
    return total


@pytest.mark.parametrize("kind, train", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_same_gradients_less_saved(kind, train):
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(ids)
    att[0, :3] = 0  # left padding
    plain = _model(kind, dropout=0.3 if train else 0.0).train(train)
    ckpt = _model(kind, dropout=0.3 if train else 0.0).train(train)
    ckpt.load_state_dict(plain.state_dict())
    assert recompute_blocks(ckpt) == 3
    assert recompute_blocks(ckpt) == 3  # idempotent: no double wrapping
    l1, g1 = _loss_and_grads(plain, ids, att)
    l2, g2 = _loss_and_grads(ckpt, ids, att)
    assert l1 == l2 and len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if train:  # dropout is live: a different seed gives another loss (the test sees the masks)
        assert _loss_and_grads(plain, ids, att, seed=5)[0] != l1
    assert _saved_numel(ckpt, ids, att) < 0.5 * _saved_numel(plain, ids, att)


def test_without_grad_blocks_run_plainly_and_caches_still_work():
    model = _model("gpt2")
    recompute_blocks(model)
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        nxt = model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    assert nxt.logits.shape == (1, 1, 40)


def test_state_dict_and_class_untouched(tmp_path):
    model = _model("gpt2")
    keys = list(model.state_dict())
    cls = type(model.transformer.h[0])
    recompute_blocks(model)
    assert list(model.state_dict()) == keys and type(model.transformer.h[0]) is cls
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_lora_student_same_gradients():
    from minillm_cli.models import LoraSettings, apply_lora

    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    att = torch.ones_like(ids)
    grads = []
    for recompute in (False, True):
        model = apply_lora(_model("gpt2"), LoraSettings(2, 4.0, 0.0, None))
        torch.manual_seed(9)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero, so that gradients reach lora_A too
                p.data.normal_()
        if recompute:
            assert recompute_blocks(model) == 3
        grads.append(_loss_and_grads(model.eval(), ids, att)[1])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_copies_and_pickles_stay_bound_to_their_own_blocks():
    import copy
    import pickle

    ids = torch.randint(0, 40, (1, 8))
    model = _model("gpt2")
    recompute_blocks(model)
    want = model(input_ids=ids, use_cache=False).logits.detach()
    twin = copy.deepcopy(model)
    thawed = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.zero_()  # changes the original only
    for other in (twin, thawed):
        torch.testing.assert_close(other(input_ids=ids, use_cache=False).logits.detach(), want)
        assert other.transformer.h[0].forward.block is other.transformer.h[0]
    assert recompute_blocks(twin) == 3


class _Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(8))

    def forward(self, x):
        return x + sum(e(x) for e in self.experts)


class _Moe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Expert() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_without_transformers_layers_the_decoder_blocks_are_picked_not_the_experts():
    from minillm_cli.errors import InputError

    model = _Moe()
    assert recompute_blocks(model) == 3
    assert all("forward" in layer.__dict__ for layer in model.layers)
    assert not any("forward" in e.__dict__ for layer in model.layers for e in layer.experts)
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()
    with pytest.raises(InputError, match="no transformer blocks"):
        recompute_blocks(torch.nn.Linear(3, 3))
