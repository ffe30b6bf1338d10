"""Instruction data from wherever users keep it, normalised to `Example`s.

DATA is a local .jsonl/.json/.csv/.parquet file, a Hub dataset id (org/name[/folder][#config][:split]),
or an alias. Field layouts are
detected from the first record of each file (Dolly, Alpaca/MiniLLM, Self-Instruct, Vicuna,
prompt/response, and chat conversations: `messages` with role/content as OpenAI and Hugging Face
chat data hold them, ShareGPT's `conversations` with from/value); a folder is read file by file,
subfolders included. `--prompt-field`,
`--response-field` and `--input-field` each replace one field of the detected layout.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minillm_cli.data.sources import data_files, sources
from minillm_cli.errors import InputError


@dataclass
class Example:
    """One instruction. `references` is empty when the data has no gold answer (Vicuna).
    `history`: the messages a conversation had before `instruction`, its last user message (a
    system message, earlier turns), as [{"role": ..., "content": ...}]; only `--template chat`
    renders them."""

    instruction: str
    input: str = ""
    references: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0] if self.references else ""


# ---------------------------------------------------------------------------------------------
# Field values: text, or refused. str() of a null, a list or an object is Python's repr ("None",
# "['a', 'b']", "{'k': 1}"), which would be trained on and scored as if it were the data's text.
# ---------------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _text(value: Any, where: str, name: str) -> str:
    """A prompt, input or answer field as text. Null (or missing) is empty, as an empty string:
    what an empty field means is then decided in one place for both (an empty instruction is
    dropped and counted; an empty answer is no reference). A number is taken as written (a CSV
    would hold the same text); anything else is refused, naming the record and the field."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "" if value != value else str(value)  # (NaN: how pandas writes a missing value to parquet)
    raise InputError(f"{where}: field {name!r} is {_kind(value)}, expected text (a string)")


def _refs(value: Any, where: str, name: str) -> list[str]:
    """The reference answers in a field: one string, or a list of them (MiniLLM's several
    outputs), or messages whose last is the assistant's (TRL's conversational completion); empty
    ones are no reference."""
    if _is_messages(value):
        own = _ask(_messages(value, where, name), where, name)[2]
        if not own:
            raise InputError(f"{where}: {name}: the last message is not the assistant's")
        return _refs(own, where, name)
    if isinstance(value, (list, tuple)):
        texts = [_text(v, where, f"{name}[{i}]") for i, v in enumerate(value)]
        return [t for t in texts if t.strip() != ""]
    text = _text(value, where, name)
    return [text] if text.strip() != "" else []


def _list(value: Any, where: str, name: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: field {name!r} is {_kind(value)}, expected a list")
    return list(value)


# ---------------------------------------------------------------------------------------------
# Layouts: which fields hold the prompt, the input and the answer. --prompt-field,
# --response-field and --input-field replace one role each; the layout's other fields stay
# (overriding the answer field of Dolly data keeps its context).
# ---------------------------------------------------------------------------------------------
PROMPT_FIELDS = ("instruction", "prompt")
INPUT_FIELDS = ("context", "input")
RESPONSE_FIELDS = ("response", "output", "completion", "answer")


def _flat(prompt: str, inp: str | None, responses: tuple[str, ...], *, strict_response: bool = False,
          turns: str = "last"):
    """Records with the prompt, input and answer in top-level fields. `responses`: the answer's
    field, or candidates of which a record's first present one is used. A named (--response-field)
    answer must be in every record; a layout's own may be missing from one (no reference).
    A prompt of messages (TRL's conversational prompt/completion) is asked after its earlier
    turns; under --turns all, the assistant turns among those are examples too, as a
    conversation's are."""

    def build(r: dict, where: str) -> list[Example]:
        if strict_response:
            refs = _refs(r[responses[0]], where, responses[0])
        else:
            key = next((k for k in responses if k in r), None)
            refs = _refs(r[key], where, key) if key else []
        value, history, earlier = r[prompt], [], []
        if _is_messages(value):  # (TRL's conversational prompt/completion: both fields hold messages)
            untrained: set[int] = set()
            msgs = _messages(value, where, prompt, untrained)
            value, history, own = _ask(msgs, where, prompt)
            if own:
                raise InputError(f"{where}: {prompt}: the prompt's messages end with the assistant's; "
                                 f"expected the user's")
            if turns == "all":  # (the prompt's answered turns; its last user message is asked below)
                earlier = [t for t in _turns(msgs, where, prompt, untrained) if t[2]]
        named_input = _text(r.get(inp), where, inp) if inp else ""
        meta = {"conversation": where} if earlier else {}  # (split together: see split_examples)
        return [*(Example(i, named_input, _refs(own, where, prompt), history=h, meta=dict(meta)) for i, h, own in earlier),
                Example(_text(value, where, prompt), named_input, refs, history=history, meta=dict(meta))]

    return build


def _self_instruct(prompt: str | None = None, inp: str | None = None, response: str | None = None):
    """One example per instance (its input and output). A named input replaces every instance's;
    a named answer field makes one example per record (instances' outputs no longer apply, nor
    their inputs, which belong to those outputs)."""

    def build(r: dict, where: str) -> list[Example]:
        instruction = _text(r[prompt or "instruction"], where, prompt or "instruction")
        named_input = _text(r.get(inp), where, inp) if inp else ""
        if response:
            return [Example(instruction, named_input, _refs(r[response], where, response))]
        out = []
        for k, inst in enumerate(_list(r.get("instances"), where, "instances") or [{}]):
            if not isinstance(inst, dict):
                raise InputError(f"{where}: field 'instances[{k}]' is {_kind(inst)}, expected an object")
            out.append(Example(instruction,
                               named_input if inp else _text(inst.get("input"), where, f"instances[{k}].input"),
                               _refs(inst.get("output"), where, f"instances[{k}].output")))
        return out

    return build


def _vicuna(prompt: str | None = None, inp: str | None = None, response: str | None = None):
    """The first turn is the prompt; `reference` (where present) the answer."""

    def build(r: dict, where: str) -> list[Example]:
        if prompt:
            instruction = _text(r[prompt], where, prompt)
        else:
            turns = _list(r.get("turns"), where, "turns")
            instruction = _text(turns[0], where, "turns[0]") if turns else ""  # (empty: dropped and counted)
        refs = _refs(r[response], where, response) if response else _refs(r.get("reference"), where, "reference")
        return [Example(instruction, _text(r.get(inp), where, inp) if inp else "", refs)]

    return build


# ---------------------------------------------------------------------------------------------
# Conversations: chat data as OpenAI and Hugging Face datasets hold it (`messages`:
# [{"role", "content"}]) and ShareGPT's (`conversations`: [{"from", "value"}]). One example per
# conversation: its last assistant message is the answer, the user message before it the
# instruction, and what came before that (a system message, earlier turns) the history the
# instruction is asked in. A conversation that ends with a user message is a prompt without a
# reference (evaluation sets).
# ---------------------------------------------------------------------------------------------
_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "system": "system",
          "developer": "system"}  # (OpenAI's newer name for the system message)


def _content(value: Any, where: str, name: str) -> str:
    """A message's text: a string, or OpenAI's list of parts when every part is text."""
    if isinstance(value, (list, tuple)):
        parts = []
        for k, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = f"of type {part.get('type')!r}" if isinstance(part, dict) else _kind(part)
                raise InputError(f"{where}: {name}[{k}] is a part {kind}; only text parts are supported")
            parts.append(_text(part.get("text"), where, f"{name}[{k}].text"))
        return "".join(parts)
    return _text(value, where, name)


def _messages(value: Any, where: str, name: str, untrained: set[int] | None = None) -> list[dict[str, str]]:
    """A conversation as [{"role": user|assistant|system, "content": text}]. `untrained` gets the
    indices of messages marked `"weight": 0` (OpenAI's fine-tuning data: not trained on)."""
    out = []
    for k, m in enumerate(_list(value, where, name)):
        if not isinstance(m, dict):
            raise InputError(f"{where}: {name}[{k}] is {_kind(m)}, expected a message object")
        role_key, text_key = ("role", "content") if "role" in m else ("from", "value")
        if role_key not in m:
            raise InputError(f"{where}: {name}[{k}] has no 'role' (or ShareGPT 'from'); found: "
                             f"{', '.join(sorted(m)) or 'none'}")
        raw = m[role_key]
        role = _ROLES.get(raw.lower()) if isinstance(raw, str) else None
        if role is None:
            raise InputError(f"{where}: {name}[{k}] has role {raw!r}; expected user, assistant or system "
                             f"(or ShareGPT's human, gpt, system)")
        calls = next((c for c in ("tool_calls", "function_call") if m.get(c)), None)
        if calls:  # (its content is null: read as text, the call would be an empty answer or turn)
            raise InputError(f"{where}: {name}[{k}] is a tool call ({calls!r}); tool calls are not supported")
        if text_key not in m:  # (null is empty text; a missing key is another layout, e.g. role/value)
            raise InputError(f"{where}: {name}[{k}] has no {text_key!r} beside {role_key!r}; found: "
                             f"{', '.join(sorted(m))}")
        out.append({"role": role, "content": _content(m[text_key], where, f"{name}[{k}].{text_key}")})
        if untrained is not None and m.get("weight") == 0 and not isinstance(m.get("weight"), bool):
            untrained.add(k)
    return out


def _is_messages(value: Any) -> bool:
    """A list of message objects (role/content, or ShareGPT's from/value)."""
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value))


def _turns(msgs: list[dict[str, str]], where: str, name: str,
           untrained: set[int] = frozenset()) -> list[tuple[str, list[dict[str, str]], list[str]]]:
    """(instruction, history, answer) of every assistant turn that answers a user message
    (`--turns all`; an assistant's opening greeting answers nothing, a turn in `untrained` is
    context only), and of the final user message when the conversation ends with one: each asked
    after the messages before it. With none of these, the conversation as `_ask` reads it (its
    error, or an empty instruction), unless every answer is of weight 0: then none (`_ask` would
    make its last answer a target). A conversation `--turns last` refuses is refused here too."""
    whole = _ask(msgs, where, name)
    answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and k and msgs[k - 1]["role"] == "user"]
    out = [_ask(msgs[:k + 1], where, name) for k, m in enumerate(msgs)
           if (k in answers and k not in untrained) or (m["role"] == "user" and k == len(msgs) - 1)]
    return out or ([] if answers else [whole])


def _ask(msgs: list[dict[str, str]], where: str, name: str) -> tuple[str, list[dict[str, str]], list[str]]:
    """(instruction, history, answer) of a conversation: its last user message, the messages
    before it, and the assistant's answer after it ([]: it ends with the user's)."""
    msgs = list(msgs)
    own = [msgs.pop()["content"]] if msgs and msgs[-1]["role"] == "assistant" else []
    if not any(m["role"] == "user" for m in msgs):  # (no question: a system message, a greeting, or
        return "", msgs, own                        # nothing -- dropped and counted, not refused)
    if msgs and msgs[-1]["role"] != "user":
        which, want = (("the message before the last answer", "the user's (an answer replies to a user message)")
                       if own else ("the last message", "the user's or the assistant's"))
        raise InputError(f"{where}: {name}: {which} is the {msgs[-1]['role']}'s, expected {want}")
    instruction = msgs.pop()["content"] if msgs else ""  # (none: dropped and counted)
    # an empty system message is none (SlimOrca's, Orca's "no system message"): not rendered either
    return instruction, [m for m in msgs if m["role"] != "system" or m["content"].strip()], own


def _conversation(field_name: str):
    def factory(prompt: str | None = None, inp: str | None = None, response: str | None = None,
                turns: str = "last"):
        """A named answer field replaces the conversation's own last answer; a named prompt field
        replaces the conversation (no history), and so needs a named answer field too: the
        conversation's last answer replies to its last user message, which the named prompt need
        not be (ultrachat's `prompt` is the first); a named input goes with the instruction.
        turns: "last", one example per conversation (its last answer not of weight 0); "all", one
        per assistant turn, which a named
        prompt or answer field would make one example of the conversation again: refused, not
        trained on the last turn alone as if --turns all had not been asked for."""

        def build(r: dict, where: str) -> list[Example]:
            if turns == "all" and (prompt or response):
                flag = f"--prompt-field {prompt}" if prompt else f"--response-field {response}"
                raise InputError(f"{where}: --turns all makes an example of every assistant turn of {field_name!r}; "
                                 f"{flag} makes one example of the whole conversation: use --turns last, or "
                                 f"leave the conversation's fields to its layout")
            if prompt and not response:
                raise InputError(f"{where}: --prompt-field {prompt} replaces the whole conversation "
                                 f"({field_name!r}), its answer too: name the answer with --response-field "
                                 f"(--response-field {field_name}: the conversation's last assistant message)")
            named_input = _text(r.get(inp), where, inp) if inp else ""
            if prompt:
                return [Example(_text(r[prompt], where, prompt), named_input, _refs(r[response], where, response))]
            untrained: set[int] = set()
            msgs = _messages(r.get(field_name), where, field_name, untrained)
            if turns == "all" and not response:
                return [Example(i, named_input, _refs(own, where, field_name), history=h,
                                meta={"conversation": where})  # (split together: see split_examples)
                        for i, h, own in _turns(msgs, where, field_name, untrained)]
            if untrained and not response:  # (its last answer of weight 0: the last one trained is the
                last = _turns(msgs, where, field_name, untrained)[-1:]  # target, the rest after it unread)
                if not last:
                    return []
                instruction, history, own = last[0]
            else:
                instruction, history, own = _ask(msgs, where, field_name)
            refs = _refs(r[response], where, response) if response else _refs(own, where, field_name)
            return [Example(instruction, named_input, refs, history=history)]

        return build

    return factory


# name, the fields that identify it (a tuple: one of them), and for flat layouts the fields of
# the prompt, the input and the answer; tried in this order (conversations after the flat
# layouts: a record that has both keeps the flat reading it had)
LAYOUTS = [
    ("dolly", ("instruction", "context", "response"), ("instruction", "context", ("response",))),
    ("self-instruct", ("instruction", "instances"), None),
    ("alpaca", ("instruction", "output"), ("instruction", "input", ("output",))),
    ("dolly-no-context", ("instruction", "response"), ("instruction", "context", ("response",))),
    ("prompt/output", ("prompt", "output"), ("prompt", None, ("output",))),
    ("prompt/response", ("prompt", ("response", "completion", "answer")),
     ("prompt", None, ("response", "completion", "answer"))),
    ("messages", ("messages",), None),
    ("sharegpt", ("conversations",), None),
    ("conversation", ("conversation",), None),
    ("vicuna", ("turns",), None),
]
_CONVERSATIONS = {"messages": _conversation("messages"), "sharegpt": _conversation("conversations"),
                  "conversation": _conversation("conversation")}
_NESTED = {"self-instruct": _self_instruct, "vicuna": _vicuna, **_CONVERSATIONS}
CONVERSATION_LAYOUTS = tuple(_CONVERSATIONS)  # (the layout names an Example's meta["layout"] starts with)
TURNS = ("last", "all")  # --turns: which assistant turns of a conversation are examples


def _detect(keys: set[str]):
    for layout in LAYOUTS:
        if all(k in keys if isinstance(k, str) else any(a in keys for a in k) for k in layout[1]):
            return layout
    return None


def _layout_hint() -> str:
    return ("known layouts: instruction/context/response (Dolly), instruction/input/output (Alpaca), "
            "prompt/output, prompt/response, instruction/instances (Self-Instruct), turns (Vicuna), "
            "messages or conversation (role/content chat data), conversations (ShareGPT); "
            "or name them with --prompt-field/--response-field")


def load_examples(spec: str, *, prompt_field: str | None = None, response_field: str | None = None,
                  input_field: str | None = None, limit: int | None = None,
                  split: str | None = None, note: Callable[[str], None] | None = None,
                  turns: str = "last") -> list[Example]:
    """Read DATA into Examples. Raises InputError for missing files, malformed records, unknown
    layouts (naming the fields found), a field named by an override that the data lacks, a
    field that holds no text, and data with no usable example. Examples with an empty
    instruction are dropped; `note` (a progress log) hears how many, and how many files a
    folder gave. turns: a conversation's "last" assistant turn, or "all" of them, as examples."""
    if turns not in TURNS:
        raise InputError(f"--turns {turns!r}: expected {' or '.join(TURNS)}")
    examples: list[Example] = []
    layouts: dict[str, str] = {}  # source -> its layout (a source without records has none)
    n_sources = 0
    untrained: list[str] = []  # records that gave no example
    input_seen, fields_seen = input_field is None, set()
    for source, records in sources(spec, split):
        n_sources += 1
        builder = None
        for where, rec in records:
            if builder is None:
                layouts[source], builder = _choose_builder(where, rec, prompt_field, response_field, input_field, turns)
            if not input_seen:
                input_seen = input_field in rec
                fields_seen.update(rec)
            try:
                built = builder(rec, where)
            except KeyError as e:
                raise InputError(f"{where}: missing field {e.args[0]!r} (layout {layouts[source]}; found: "
                                 f"{', '.join(sorted(rec)) or 'none'})") from None
            if not built:  # (a conversation every answer of which is of weight 0)
                untrained.append(where)
            for e in built:
                e.meta["where"] = where  # file:line (or record n), for messages about this example
                e.meta["layout"] = layouts[source]
            examples.extend(built)
            if limit is not None and len(examples) >= limit:
                examples = examples[:limit]
                break
        if limit is not None and len(examples) >= limit:
            break
    if not input_seen:  # (a typo would blank every input, as a missing --prompt-field is refused)
        raise InputError(f"{spec}: --input-field {input_field} not found in any record; found: "
                         f"{', '.join(sorted(fields_seen)) or 'none'}")
    path = Path(spec).expanduser()
    if note is not None and path.is_dir():  # (which files a folder gave is not otherwise visible)
        total = len(data_files(path))
        kinds = [f"{n} {name}" for name, n in Counter(layouts.values()).items()]
        kinds += [f"{n_sources - len(layouts)} empty"] if n_sources > len(layouts) else []
        note(f"data: {n_sources}{'' if n_sources == total else f' of {total}'} file{'s' * (total != 1)} read from {spec} "
             f"({', '.join(kinds)})" + ("" if n_sources == total else f"; --limit {limit} reached"))
    empty = [e for e in examples if not e.instruction.strip()]
    examples = [e for e in examples if e.instruction.strip()]
    weight0 = (f"{len(untrained)} conversation{'s' * (len(untrained) != 1)} with every answer of weight 0 "
               f"(the first: {untrained[0]})"
               if untrained else "")
    if not examples:
        raise InputError(f"{spec}: no examples (the file is empty or every record has an empty or null instruction"
                         + (f"; {weight0}" if weight0 else "") + ")")
    if empty and note is not None:
        note(f"note: {len(empty)} examples with an empty instruction dropped (the first: "
             f"{empty[0].meta['where']})")
    if weight0 and note is not None:
        note(f"note: {weight0} left out: nothing to train on")
    return examples


def _choose_builder(where: str, rec: dict, prompt_field, response_field, input_field, turns: str = "last"):
    """(layout name, builder) for a source, from its first record and the overrides."""
    keys = set(rec)
    missing = [f for f in (prompt_field, response_field) if f and f not in keys]
    if missing:
        raise InputError(f"{where}: field(s) {', '.join(missing)} not found; found: {', '.join(sorted(keys))}")
    layout = _detect(keys)
    if layout is None and not (prompt_field or response_field):
        raise InputError(f"{where}: no known field layout; found fields: {', '.join(sorted(keys)) or 'none'}; "
                         + _layout_hint())
    named = ", ".join(f"--{role}-field {f}" for role, f in
                      (("prompt", prompt_field), ("response", response_field), ("input", input_field)) if f)
    if layout is None:  # no layout: each field the overrides leave unnamed is found by its usual names
        prompt = prompt_field or next((k for k in PROMPT_FIELDS if k in keys), None)
        if prompt is None:
            raise InputError(f"{where}: no prompt field ({' or '.join(PROMPT_FIELDS)}); found: "
                             f"{', '.join(sorted(keys))}; name it with --prompt-field")
        inp = input_field or next((k for k in INPUT_FIELDS if k in keys), None)
        response = response_field or next((k for k in RESPONSE_FIELDS if k in keys), None)
        return (f"fields {prompt}/{inp or '-'}/{response or '-'}",
                _flat(prompt, inp, (response,) if response else (), strict_response=bool(response_field), turns=turns))
    name, _, fields = layout
    label = f"{name}, {named}" if named else name
    if fields is None:
        if name in _CONVERSATIONS:
            return label, _NESTED[name](prompt_field, input_field, response_field, turns=turns)
        return label, _NESTED[name](prompt_field, input_field, response_field)
    prompt, inp, responses = fields
    return label, _flat(prompt_field or prompt, input_field or inp,
                        (response_field,) if response_field else responses, strict_response=bool(response_field),
                        turns=turns)

