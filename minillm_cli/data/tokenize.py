"""Tokenisation and collation.

A training sequence is `prompt tokens + response tokens + EOS`; only the response tokens and EOS
carry loss (`loss_mask`). Padding uses the tokenizer's pad id, which `models.load_tokenizer`
guarantees is distinct from EOS, and the loss mask is built from spans, never from token ids, so
EOS is always trained and padding never is.
"""
from __future__ import annotations

from dataclasses import dataclass

from minillm_cli.data.examples import Example
from minillm_cli.data.template import end_of_answer_id, render_prompt


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are the prompt; the rest is response (+ EOS)
    cut: bool = False  # the response lost its end (and EOS) to max_length

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _prompt_ids(tokenizer, text: str, template: str = "dolly") -> list[int]:
    # add_special_tokens: a BOS for tokenizers that use one (Llama); GPT-2 adds nothing. A chat
    # template writes its own BOS into the text, so it must not be added twice.
    return list(tokenizer(text, add_special_tokens=template != "chat")["input_ids"])


def encode_prompts(tokenizer, examples: list[Example], template: str = "dolly",
                   max_prompt_length: int = 256) -> tuple[list[list[int]], list[int], int]:
    """Prompt token lists, the indices of the kept examples, and how many were dropped for length."""
    kept, idx, dropped = [], [], 0
    for i, ex in enumerate(examples):
        ids = _prompt_ids(tokenizer, render_prompt(ex, template, tokenizer), template)
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        kept.append(ids)
        idx.append(i)
    return kept, idx, dropped


def encode_sft(tokenizer, examples: list[Example], template: str = "dolly", max_prompt_length: int = 256,
               max_length: int = 512, responses: list[str] | None = None,
               ends: list[bool] | None = None) -> tuple[list[Encoded], int]:
    """Encode prompt + response + EOS. Prompts over `max_prompt_length` are dropped (and counted);
    sequences over `max_length` lose the end of their response (and then carry no EOS, so the model
    is never taught to stop where text was merely cut). `responses` overrides the gold answers
    (SeqKD trains on teacher generations); `ends[i]` False: response i was cut (a generation that
    reached --max-new-tokens), so it gets no EOS either. Under `--template chat` "EOS" is the token
    that closes the template's assistant turn where it has one (`end_of_answer_id`)."""
    out, dropped = [], 0
    eos = end_of_answer_id(tokenizer, template)
    for i, ex in enumerate(examples):
        response = responses[i] if responses is not None else ex.response
        p = _prompt_ids(tokenizer, render_prompt(ex, template, tokenizer), template)
        if len(p) > max_prompt_length:
            dropped += 1
            continue
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        r += [eos] if ends is None or ends[i] else []
        ids = (p + r)[:max_length]
        if len(ids) <= len(p):  # nothing of the response fits
            dropped += 1
            continue
        out.append(Encoded(ids, len(p), cut=len(p) + len(r) > max_length))
    return out, dropped


def collate_sft(batch: list[Encoded], pad_id: int):
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` (all [B, L]).

    `loss_mask[b, t]` is True when token t of row b is a response token or EOS, i.e. a target.
    Shift once in the loss: logits[:, :-1] predict input_ids[:, 1:] under loss_mask[:, 1:]."""
    import torch

    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    lm = torch.zeros((len(batch), L), dtype=torch.bool)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        att[b, :n] = 1
        lm[b, e.prompt_len : n] = True
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-padded prompts for generation: (input_ids [B, P], attention_mask [B, P])."""
    import torch

    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        att[b, P - len(p):] = 1
    return ids, att
