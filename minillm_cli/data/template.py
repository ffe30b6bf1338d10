"""Prompt templates. `dolly` is the paper's (Alpaca-style) template and the default; `chat` uses
the tokenizer's chat template; `raw` uses the instruction verbatim (plus the input, if any)."""
from __future__ import annotations

from minillm_cli.data.examples import Example
from minillm_cli.errors import InputError

TEMPLATES = ("dolly", "chat", "raw")

DOLLY_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DOLLY_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def render_prompt(example: Example, template: str = "dolly", tokenizer=None) -> str:
    if template == "dolly":
        if example.input.strip():
            return DOLLY_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return DOLLY_NO_INPUT.format(instruction=example.instruction)
    if template == "raw":
        return example.instruction + (("\n\n" + example.input) if example.input.strip() else "")
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError("--template chat: the tokenizer has no chat template; use --template dolly")
        content = example.instruction + (("\n\n" + example.input) if example.input.strip() else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise InputError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
