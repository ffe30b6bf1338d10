"""Shared fixtures: a local tokenizer and tiny GPT-2 teacher/student folders, made once per session.
Nothing comes from the Hub (HF_HUB_OFFLINE is forced here as well as in CI)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a 2-core machine: one thread per process is faster than two fighting threads,
# and subprocesses (CLI runs, torchrun workers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)
# Without a GPU, Triton (where installed) runs kernels through its interpreter on CPU tensors, so
# the decode-attention kernel's tests run here too (engine/decode_attention.py). It must be set
# before Triton's first import (importing transformers' models imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName a red fruit.\n\n### Response:\nApple",
    "### Input:\nThe sky is blue.\n\n### Response:\nThe sky is blue because of Rayleigh scattering.",
    "When did Virgin Australia start operating? It commenced services on 31 August 2000.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = ?",
    "Which is a species of fish? Tope or Rope. Tope. Why can camels survive for long without water?",
] * 4


def gpt2_numbers(seed: int, *, vocab: int = 11, pad: int = 11, eos: int = 0, n_layer: int = 1,
                 n_positions: int = 96, attn: str = "sdpa"):
    """A tiny in-memory GPT-2 over a toy vocabulary (ids 0..vocab-1, EOS 0) whose logits are one
    row wider (the pad row), with large random weights so distributions are far from uniform."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=vocab + 1, n_positions=n_positions,
                     initializer_range=0.4, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = attn
    return GPT2LMHeadModel(cfg).eval()


def llama_numbers(seed: int, *, vocab: int = 11, pad: int = 11, eos: int = 0):
    """A tiny Llama over the same toy vocabulary: 2 key/value heads for 4 query heads (query head
    h reads KV head h // 2), a gated MLP, no biases, rotary positions; sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab + 1, max_position_embeddings=96, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=pad, initializer_range=0.4)).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture(autouse=True)
def _gpu_tests_decode_matmuls_on_cublas(request, monkeypatch):
    """GPU tests sample with the decode matmuls on cuBLAS, except tests/gpu/test_gpu_matmul.py.
    `fast_sampler.DECODE_MATMUL = "auto"` plans the split-K matmul for every new decoder shape,
    which on a fresh machine means Triton builds per batch size (row tile) and config, ~1 s
    each: more than the device call has to spare for tests that check other things. Some of
    those also compare bits between runs whose matmul shapes differ (the student's bf16 weight
    copies on and off), where the kernel and cuBLAS sum in other orders. (A conftest.py in
    tests/gpu would shadow this one for `from conftest import`.)"""
    path = Path(str(request.fspath))
    if path.parent.name != "gpu" or path.stem == "test_gpu_matmul":
        return
    from minillm_cli.engine import fast_sampler

    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "cublas")


# The toy sampling setup sampler tests share: gpt2_numbers' vocabulary, pad and EOS ids, and four
# prompts of different lengths (left-padded by toy_sample_args).
TOY_V, TOY_PAD, TOY_EOS = 11, 11, 0
TOY_PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 2], [5], [1, 2, 3, 4]]


def toy_sample_args(seeds, alpha, **kw) -> dict:
    """Keyword arguments of sample() / fast_sample() over TOY_PROMPTS: one generator per seed,
    SamplingParams(max_new_tokens (default 24), **the rest of kw)."""
    from minillm_cli.data.tokenize import left_pad
    from minillm_cli.engine.sampler import SamplingParams

    ids, mask = left_pad(TOY_PROMPTS, TOY_PAD)
    return dict(prompt_ids=ids, prompt_mask=mask, params=SamplingParams(kw.pop("max_new_tokens", 24), **kw),
                alpha=alpha, eos_id=TOY_EOS, pad_id=TOY_PAD,
                generators=[torch.Generator().manual_seed(s) for s in seeds], vocab_size=TOY_V)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder with `tokenizer/`, `teacher/` (4 layers, 64 wide) and `student/` (1 layer, 32 wide)."""
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = train_bpe_tokenizer(CORPUS, root / "tokenizer", vocab_size=384)
    make_gpt2(tok, root / "teacher", n_layer=2, n_embd=64, n_head=2, seed=1)
    make_gpt2(tok, root / "student", n_layer=1, n_embd=32, n_head=2, seed=2)
    return root


@pytest.fixture(scope="session")
def dolly_like(tmp_path_factory) -> Path:
    """A small Dolly-layout file (instruction/context/response/category)."""
    rows = []
    for i in range(40):
        rows.append({
            "instruction": f"Name item number {i} of the list.",
            "context": "The list is: apple, pear, plum." if i % 3 == 0 else "",
            "response": f"Item {i} is an apple." if i % 2 else "A pear.",
            "category": "open_qa",
        })
    return write_jsonl(tmp_path_factory.mktemp("data") / "dolly.jsonl", rows)
