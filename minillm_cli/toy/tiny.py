"""Local tokenizers and tiny models, saved as ordinary Hugging Face folders.

Used by `quickstart` and by the tests: nothing can come from the Hub here, so we train a
byte-level BPE in well under a second and build small GPT-2 configurations with random weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 512, pad: bool = True):
    """Train a byte-level BPE on `texts`, save it to `out`, return the fast tokenizer.

    EOS is `<|endoftext|>` (also BOS), PAD is a distinct `<|pad|>` so EOS is always trained
    (pad False: no pad token, as GPT-2's own tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD] if pad else [EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD if pad else None, unk_token=None
    )
    fast.model_max_length = 1024
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def make_gpt2(tokenizer, out: str | Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
              n_positions: int = 512, seed: int = 0):
    """A randomly initialised GPT-2 sized for `tokenizer`, saved (with the tokenizer) to `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model
