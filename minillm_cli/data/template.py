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


# the assistant's text in the conversation rendered to find what closes its turn (`end_of_answer_id`)
_SENTINEL = "MINILLMANSWERSENTINEL"


def end_of_answer_id(tokenizer, template: str = "dolly") -> int:
    """The token an answer ends with: what training appends after a response and where sampling
    stops. EOS, except under `--template chat` where the chat template closes the assistant's turn
    with a special token of its own (Gemma's `<end_of_turn>`, ChatML's `<|im_end|>` in a base
    model's tokenizer whose EOS is `<|endoftext|>`): a model taught to end with EOS there would
    learn turns the template never closes, and a rollout would run on past the turn's end."""
    eos = tokenizer.eos_token_id
    if template != "chat" or not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _SENTINEL}], tokenize=False)
        # (whitespace between the answer and the closing token -- "{{ content }}\n<|im_end|>" --
        # does not make the template's turns plain-text-closed)
        tail = text[text.index(_SENTINEL) + len(_SENTINEL):].lstrip() if _SENTINEL in text else ""
        first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []
    except Exception:  # (a template that refuses this conversation: EOS, as before)
        return eos
    # a token of its own: special, or added to the vocabulary whole (never a piece of plain text)
    own = set(getattr(tokenizer, "all_special_ids", []) or [])
    own |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    if first and first[0] in own and first[0] != tokenizer.pad_token_id:
        return first[0]
    return eos


def answer_stops(tokenizer, template: str = "dolly") -> tuple[int, ...]:
    """The tokens a sampled answer ends at: the end of an answer (`end_of_answer_id`, what
    training appends) first, then EOS where that differs -- a model that ends its answers with
    EOS (one trained before the end of turn was learnt, a base teacher) stops there too."""
    end, eos = end_of_answer_id(tokenizer, template), tokenizer.eos_token_id
    return (end,) if eos is None or eos == end else (end, eos)


def check_template_fits(examples: list[Example], template: str) -> None:
    """Refuse conversations with a system message or earlier turns (`Example.history`) under a
    template other than chat -- before any model loads. The paper's template has one instruction:
    what came before it would be dropped without a word, and the model asked something other
    than the data asks. A history with no text (SlimOrca's empty system message) loses nothing."""
    if template == "chat":
        return
    convs = [e for e in examples if any(m["content"].strip() for m in e.history)]
    if convs:
        count = f"{len(convs)} of {len(examples)} examples are conversations" if len(examples) > 1 else "a conversation"
        raise InputError(f"{convs[0].meta.get('where', 'data')}: {count} with a system message or earlier turns "
                         f"before the last user message: --template {template} renders one instruction; "
                         f"use --template chat")


def render_prompt(example: Example, template: str = "dolly", tokenizer=None) -> str:
    check_template_fits([example], template)
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
        messages = [*example.history, {"role": "user", "content": content}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            from jinja2 import TemplateError  # (transformers' dependency)

            if not isinstance(e, TemplateError) or not example.history:
                raise
            # a template that refuses the data's conversation (Gemma's: no system role)
            where = example.meta.get("where", "an example")
            raise InputError(f"{where}: the tokenizer's chat template refuses this conversation: {e}") from None
    raise InputError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
