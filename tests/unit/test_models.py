"""Model layer: pad token distinct from EOS, vocabulary checks (padded embeddings), LoRA targets,
the offline message for unknown models."""
from __future__ import annotations

import pytest

from minillm_cli.errors import InputError


def test_pad_added_when_missing(tmp_path):
    """A GPT-2-style tokenizer (EOS only, pad = EOS or none) gets a new, distinct pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minillm_cli.models import PAD_TOKEN, load_tokenizer

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for pad in (None, "<|endoftext|>"):
        raw = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad)
        raw.save_pretrained(str(tmp_path / "t"))
        tok = load_tokenizer(str(tmp_path / "t"))
        assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
        assert len(tok) == len(raw) + 1 and tok.pad_token_id == len(raw)


def test_vocabulary_check(tmp_path, tiny_dir):
    from minillm_cli.models import check_same_tokenizer, load_tokenizer
    from minillm_cli.toy.tiny import train_bpe_tokenizer

    a = load_tokenizer(str(tiny_dir / "student"))
    assert check_same_tokenizer(a, load_tokenizer(str(tiny_dir / "teacher"))) == len(a)
    other = train_bpe_tokenizer(["completely different text zzz qqq"] * 5, tmp_path / "o", vocab_size=300)
    with pytest.raises(InputError, match="tokenizers differ.*teacher has"):
        check_same_tokenizer(other, a)


def test_padded_embedding_sizes_are_fine(tmp_path, tiny_dir):
    """A teacher whose embedding matrix is wider than its tokenizer (e.g. 152064 vs 151936) loads
    and is sliced to the tokenizer's length by the engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from minillm_cli.engine.teacher import load_teacher
    from minillm_cli.models import load_tokenizer

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "teacher"))
    m.resize_token_embeddings(len(load_tokenizer(str(tiny_dir / "teacher"))) + 13)
    m.save_pretrained(str(tmp_path / "wide"))
    load_tokenizer(str(tiny_dir / "teacher")).save_pretrained(str(tmp_path / "wide"))
    tok = load_tokenizer(str(tiny_dir / "student"))
    teacher, vocab = load_teacher(str(tmp_path / "wide"), student_tokenizer=tok, device=torch.device("cpu"))
    assert vocab == len(tok)
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok) + 13
    assert not any(p.requires_grad for p in teacher.parameters())


def test_unknown_model_offline_message(monkeypatch):
    from minillm_cli.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="Hub is unreachable.*local model folder"):
        load_tokenizer("no-such-org/no-such-model")


def test_lora_targets_detected(tiny_dir):
    import torch

    from minillm_cli.models import LoraSettings, count_parameters, load_model, load_tokenizer, lora_targets

    tok = load_tokenizer(str(tiny_dir / "student"))
    model = load_model(str(tiny_dir / "student"), tokenizer=tok, device=torch.device("cpu"),
                       lora=LoraSettings(r=4))
    assert lora_targets(model.base_model.model, None) == ["c_attn", "c_proj", "c_fc"]
    total, trainable = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
