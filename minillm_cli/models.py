"""Load teachers and students (Hub id, local folder, or LoRA adapter folder), check that they
share a tokenizer, and save what we trained as an ordinary Hugging Face folder."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minillm_cli import hub
from minillm_cli.errors import InputError

PAD_TOKEN = "<|pad|>"

# LoRA target modules per architecture (model_type), when the user names none.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    # families that share some of Llama's names but not all: the llama-like detection below would
    # adapt only those (Phi-3: o_proj and down_proj, not its fused qkv_proj and gate_up_proj)
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "mpt": ["Wqkv", "out_proj", "up_proj", "down_proj"],
}
# Llama's names, and the fused projections of its derivatives (Phi-3's qkv_proj and gate_up_proj)
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
               "down_proj"]


@dataclass
class LoraSettings:
    r: int
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Sequence[str] | None = None

    def __post_init__(self):
        if self.r <= 0:
            raise InputError(f"--lora-r must be > 0, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.alpha < float("inf"):  # (0 scales the adapter's update to nothing: a silent no-op)
            raise InputError(f"--lora-alpha must be a finite number > 0, got {self.alpha}")


def _not_found(name: str, what: str, err: Exception, adapter: str | None = None) -> InputError:
    """adapter: the LoRA adapter folder whose base model `name` is (its adapter_config.json's
    base_model_name_or_path): a base that has moved is named as such, not as a model the user gave."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name).expanduser().exists():
        return InputError(f"{what} {name!r}: cannot load this folder ({first})")
    unreachable = hub.offline("models") or "connect" in str(err).lower() or "offline" in str(err).lower()
    if adapter is not None and (hub.looks_like_path(name) or unreachable):
        gone = ("a folder that does not exist" if hub.looks_like_path(name)
                else "not a local folder, and the Hugging Face Hub is unreachable (offline)")
        return InputError(f"{what} {adapter!r} is a LoRA adapter whose base model {name!r} is {gone}; if the base "
                          f"model has moved, set base_model_name_or_path in "
                          f"{Path(adapter) / 'adapter_config.json'} to its folder")
    if hub.looks_like_path(name):  # (no Hub id: a folder mistyped or moved)
        return InputError(f"{what} {name!r}: no such folder")
    if unreachable:
        return InputError(f"{what} {name!r}: not a local folder, and the Hugging Face Hub is unreachable "
                          f"(offline); pass a local model folder")
    return InputError(f"{what} {name!r}: not a local folder nor a Hub model ({first})")


def quiet_transformers() -> None:
    """No library progress bars or advisory logs: our display is the only one."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # raised by peft's LoRA wrapping on transformers 5.2x: about their code, nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def adapter_base(name: str) -> str | None:
    """The base model of a LoRA adapter folder, or None when `name` is not one."""
    cfg = Path(name).expanduser() / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(f"{cfg}: adapter without base_model_name_or_path")
        return base
    return None


def check_model_options(name: str, opts, flag: str) -> None:
    """ModelOptions `opts` against the trained model `name`, before anything loads.
    --save-adapter: an adapter folder keeps training its own adapter (--lora-r 0), which
    --save-adapter saves on the same base. With --lora-r it is merged into its base first and a
    new adapter added: that merged model exists nowhere on disk, so the new adapter alone could
    not be loaded. --dtype float16 for weights that AdamW updates: its steps and its eps (1e-8)
    underflow in float16 without loss scaling (NaN after the first step), so only a frozen base
    under LoRA may be float16."""
    base = adapter_base(name)
    if opts.dtype in ("float16", "fp16") and opts.lora_r <= 0 and base is None:
        raise InputError(f"--dtype {opts.dtype} for the trained weights of {flag} {name}: AdamW cannot update "
                         f"float16 weights (its steps underflow); use auto (float32 master weights, half-precision "
                         f"autocast on GPUs), or train a LoRA adapter on a float16 base (--lora-r)")
    if opts.save_adapter and opts.lora_r <= 0 and base is None:
        raise InputError(f"--save-adapter needs --lora-r (or a LoRA adapter folder as {flag})")
    if opts.save_adapter and opts.lora_r > 0 and base is not None:
        raise InputError(f"--save-adapter with --lora-r: {flag} {name} is an adapter, merged into {base} before "
                         f"the new one is added, and that merged model is saved nowhere; keep training its own "
                         f"adapter (--lora-r 0 --save-adapter) or save merged weights (no --save-adapter)")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "tokenizer", pad: str | None = None):
    """AutoTokenizer with a pad token distinct from EOS (added as `<|pad|>` when the tokenizer has
    none, or only EOS/UNK==EOS to offer), so that EOS is always a trained target. pad: a teacher's
    is its student's where the teacher has that token (or it is our `<|pad|>`): each would pick
    its own from its EOS, and under --template chat an instruct teacher (EOS `<|im_end|>`, pad
    `<|endoftext|>`) and its base student (EOS = pad = `<|endoftext|>`: given `<|pad|>`) would
    differ by the pad token alone."""
    from transformers import AutoTokenizer

    quiet_transformers()
    base = adapter_base(name)
    source = name
    if base is not None and not any((Path(name) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        source = base
    hub.before_lookup(source)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(source, what, e, adapter=name if source != name else None) from None
    if tok.eos_token_id is None:
        raise InputError(f"{what} {name!r}: the tokenizer has no EOS token; responses need one to end")
    if pad is not None and pad in tok.get_vocab():
        tok.pad_token = pad
    elif pad == PAD_TOKEN:
        tok.add_special_tokens({"pad_token": pad})
    elif tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    return tok


def pick_dtype(device, requested: str = "auto", *, training: bool = False):
    """Weights' dtype: float32 on CPU; on CUDA bf16 when supported (else fp16) for frozen models,
    and float32 master weights for trained ones (bf16 autocast does the compute)."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise InputError(f"--dtype {requested!r}: expected auto, float32, bfloat16 or float16")
        return names[requested]
    if device.type != "cuda" or training:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def compute_dtype(device):
    """The autocast dtype on this device (None on CPU: plain float32)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(name: str, *, tokenizer, device, dtype=None, lora: LoraSettings | None = None,
               trust_remote_code: bool = False, trainable: bool = True, what: str = "model",
               fuse: bool | None = None):
    """Load a causal LM onto `device`. Adapter folders are loaded on their base and merged (a frozen
    teacher) or kept trainable (a LoRA student). The embedding matrix grows when the tokenizer has
    tokens the model lacks (our pad token); it never shrinks (padded vocabularies stay padded and
    callers slice logits to len(tokenizer)). fuse (default: on CUDA): composed activations such as
    GPT-2's gelu_new run as one kernel (engine/fused.py), and an LM head with misaligned vocabulary
    rows multiplies over rows padded to a multiple of 64 (engine/aligned_head.py); the same
    functions, saved folders unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    base = adapter_base(name)
    hub.before_lookup(base or name)
    try:
        model = AutoModelForCausalLM.from_pretrained(base or name, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(base or name, what, e, adapter=name if base else None) from None
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # New rows (our pad token) start at the mean embedding, so their logits look like an
        # average token's instead of taking mass from a trained model's strongly negative logits.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model._minillm_added_rows = True  # (save_pretrained and adapter_note need to know)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if base is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, name, is_trainable=trainable and lora is None)
        except RuntimeError as e:  # shapes of another base model than the one its config names
            if "size mismatch" not in str(e):
                raise
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise InputError(f"{what} {name}: cannot load the adapter on its base {base} ({detail[:300]})") from None
        if not trainable or lora is not None:
            model = model.merge_and_unload()
    if lora is not None and trainable:
        model = apply_lora(model, lora)
    model.to(device)
    if fuse is None:
        fuse = torch.device(device).type == "cuda"
    if fuse:
        from minillm_cli.engine.aligned_head import align_head
        from minillm_cli.engine.fused import fuse_activations

        fuse_activations(model)
        align_head(model)  # the LM head over rows padded to a multiple of 64 (engine/aligned_head.py)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_limit(model) -> tuple[int, str] | None:
    """(positions, config key) the model was built for, or None when its config does not say."""
    cfg = getattr(model, "config", None)
    if cfg is None:  # a wrapper (TeacherOnDevice) around the model
        cfg = getattr(getattr(model, "model", None), "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _learned_positions(model) -> bool:
    """A table of learned absolute positions (GPT-2's `wpe`, OPT's `embed_positions`): past its
    last row there is nothing to look up."""
    import torch

    return any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
               for name, m in model.named_modules())


def check_context(model, length: int, flags: str, who: str, note=None) -> None:
    """Sequences longer than the model's positions: refused (exit 2) for a learned position table,
    which fails deep inside with an index error; for rotary / ALiBi models (whose configured
    length rope scaling may extend) a note through `note`, as they only degrade past it."""
    limit = context_limit(model)
    if limit is None or length <= limit[0]:
        return
    what = f"{flags} ({length} tokens) exceeds the {who}'s context of {limit[0]} positions (config.{limit[1]})"
    if _learned_positions(model):
        raise InputError(f"{what}; lower it")
    if note is not None:
        note(f"note: {what}; past it a model without learned positions works but may degrade")


def _linear_names(model, *, head: bool = True) -> list[str]:
    """The last names of the model's linear layers (GPT-2's Conv1D too), sorted; without the
    output head unless `head`."""
    import torch

    out = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and (head or m is not out)})


def _names(target: str, module_names) -> bool:
    """Whether a LoRA target names one of `module_names`, as peft matches a list of targets."""
    return any(n == target or n.endswith("." + target) for n in module_names)


def lora_targets(model, requested: Sequence[str] | None) -> list[str]:
    """The module names LoRA adapts: those requested (`all-linear`, as peft names it: every linear
    layer but the output head), else the architecture's usual ones."""
    if requested and [t.lower() for t in requested] == ["all-linear"]:
        return _linear_names(model, head=False)
    if requested:
        return list(requested)
    mtype = getattr(model.config, "model_type", "")
    if mtype in LORA_TARGETS:
        return LORA_TARGETS[mtype]
    import torch

    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    llama = [t for t in _LLAMA_LIKE if t in names]
    if llama:
        return llama
    names.discard("lm_head")
    if not names:
        raise InputError(f"LoRA: no linear layers found in a {mtype!r} model; name them with --lora-targets")
    return sorted(names)


def precheck_trained_model(name: str, *, lora: LoraSettings | None, length: int, flags: str, who: str,
                           trust_remote_code: bool = False) -> None:
    """What loading the trained model would refuse (too short a context for a learned position
    table, LoRA targets it lacks), found on a weightless copy on the meta device: for a command
    with expensive work before it loads the model (seqkd's teacher generation), so that a bad
    setting is refused before the work, not after it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = adapter_base(name)
    try:
        config = AutoConfig.from_pretrained(base or name, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # (loading it later says what is wrong, as without this check)
    check_context(model, length, flags, who)
    if lora is not None:
        apply_lora(model, lora)


def apply_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, lora.targets)
    if lora.targets:
        # peft refuses targets only when none of them matches: one misspelt name beside a right one
        # would leave its modules untrained without a word
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not _names(t, names)]
        if missing:
            raise InputError(f"LoRA targets {targets}: {missing} name no module of the model (its linear layers: "
                             f"{', '.join(_linear_names(model))})")
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None and getattr(inp, "weight", None) is getattr(out, "weight", False):
        # an adapter on one of two tied matrices is merged into the one tensor both share: the saved
        # model's other end changes too, and it is not the model trained (nor what an adapter folder
        # loads as: every minillm command merges it)
        tied = {n for n, m in model.named_modules() if m is inp or m is out}
        named = [t for t in targets if _names(t, tied)]
        if named:
            raise InputError(f"LoRA targets {targets}: {named} adapt an embedding matrix that the model ties to "
                             f"its other end ({', '.join(sorted(tied))}); merged, the adapter would change both; "
                             f"leave {'it' if len(named) == 1 else 'them'} out of --lora-targets")
    try:
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                         task_type="CAUSAL_LM", fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
        return get_peft_model(model, cfg)
    except ValueError as e:
        first = str(e).splitlines()[0]
        if first.startswith("Target module ") and first.endswith("("):  # (peft prints the whole module)
            first = f"{first[:-1]} is not supported: name linear layers (or embeddings)"
        raise InputError(f"LoRA targets {targets}: {first}") from None


def check_same_tokenizer(teacher_tok, student_tok, *, teacher: str = "teacher", student: str = "student",
                         template: str = "dolly", note=None) -> int:
    """Teacher and student must share a tokenizer. Embedding sizes may differ (padded vocabularies,
    e.g. 151936 vs 152064): what counts is the tokenizer. Returns the shared vocabulary size.
    Under --template chat they must end answers alike (`end_of_answer_id`; their EOS may then
    differ: an instruct teacher's EOS is often its end of turn); prompts are the student's template's
    (`note` says so where the teacher's own would render them otherwise)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv), key=lambda t: tv[t])[:3]
        only_s = sorted(set(sv) - set(tv), key=lambda t: sv[t])[:3]
        moved = [t for t in set(tv) & set(sv) if tv[t] != sv[t]][:3]
        parts = [f"{teacher} has {len(tv)} tokens, {student} has {len(sv)}"]
        if only_t:
            parts.append(f"only in {teacher}: {only_t}")
        if only_s:
            parts.append(f"only in {student}: {only_s}")
        if moved:
            parts.append(f"different ids for {moved}")
        raise InputError("teacher and student tokenizers differ (" + "; ".join(parts) +
                         "); MiniLLM needs a shared vocabulary")
    if template == "chat":
        from minillm_cli.data.examples import Example
        from minillm_cli.data.template import answer_stops, end_of_answer_id, render_prompt

        t_end, s_end = end_of_answer_id(teacher_tok, template), end_of_answer_id(student_tok, template)
        if not getattr(teacher_tok, "chat_template", None):
            # a teacher whose tokenizer has no chat template (a base model; --teacher-peft's base,
            # whose adapter's tokenizer is not read) sees the student's prompts and ends at its EOS,
            # where the samplers stop too (`answer_stops`): its EOS must be one of those stops
            if teacher_tok.eos_token_id not in answer_stops(student_tok, template):
                raise InputError(f"--template chat: the {teacher}'s tokenizer has no chat template and ends answers "
                                 f"with its EOS {teacher_tok.eos_token!r} (id {teacher_tok.eos_token_id}), neither the "
                                 f"{student}'s end of an answer nor its EOS; give the {teacher} the {student}'s chat "
                                 f"template, or use --template dolly")
            if note is not None:
                note(f"note: the {teacher}'s tokenizer has no chat template: prompts are rendered with the "
                     f"{student}'s")
        elif t_end != s_end:
            raise InputError(f"--template chat: the {teacher}'s chat template ends an answer with "
                             f"{teacher_tok.convert_ids_to_tokens(t_end)!r} (id {t_end}), the {student}'s with "
                             f"{student_tok.convert_ids_to_tokens(s_end)!r} (id {s_end}); give both the same chat "
                             f"template (tokenizer_config.json's chat_template), or use --template dolly")
        if note is not None and getattr(teacher_tok, "chat_template", None):
            probe = Example("hi")
            try:
                differs = render_prompt(probe, "chat", teacher_tok) != render_prompt(probe, "chat", student_tok)
            except Exception:  # (a template that refuses the probe: jinja2 raise_exception, ...)
                differs = False
            if differs:
                note(f"note: the {teacher}'s chat template renders prompts otherwise than the {student}'s; "
                     f"prompts are rendered with the {student}'s")
    elif teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise InputError(f"teacher and student use different EOS ids ({teacher_tok.eos_token_id} vs "
                         f"{student_tok.eos_token_id})")
    return len(student_tok)


def save_pretrained(model, tokenizer, out: str | Path, *, merge_lora: bool = True) -> None:
    """Save an ordinary Hugging Face folder (safetensors). LoRA students are merged unless asked not to."""
    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if hasattr(model, "peft_config") and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    # A run resumed with --save-adapter switched (or an --overwrite-free re-save) must not leave the
    # other format's files behind: from_pretrained would load those, not this save.
    adapter = hasattr(to_save, "peft_config")
    for stale in (out.glob("adapter_model.*") if not adapter else
                  [*out.glob("model*.safetensors*"), *out.glob("pytorch_model*.bin*")]):
        stale.unlink()
    if not adapter:
        (out / "adapter_config.json").unlink(missing_ok=True)
    else:
        for name in ("config.json", "generation_config.json"):  # (the merged model's)
            (out / name).unlink(missing_ok=True)
    # an adapter over a grown vocabulary must carry the embeddings (peft's "auto" does so too, with
    # a warning on stderr that --quiet cannot silence)
    grown = {"save_embedding_layers": True} if adapter and getattr(to_save, "_minillm_added_rows", False) else {}
    to_save.save_pretrained(str(out), safe_serialization=True, **grown)
    tokenizer.save_pretrained(str(out))
    if to_save is model and hasattr(model, "peft_config"):
        _absolute_base(out / "adapter_config.json")


def end_generation_at(model, tokenizer, stop_id: int | None) -> None:
    """A saved model's `generate` stops where its training ends answers: where that is not EOS (the
    chat template's end of turn under --template chat), generation_config.eos_token_id lists it
    beside EOS (as instruct models' own configs do)."""
    gc = getattr(model, "generation_config", None)
    if gc is None or stop_id is None or stop_id == tokenizer.eos_token_id:
        return
    ids = gc.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    gc.eos_token_id = ids + [i for i in (tokenizer.eos_token_id, stop_id) if i is not None and i not in ids]


def low_precision_warning(model, lr: float) -> str | None:
    """The warning for weights that AdamW updates in bfloat16 (--dtype bfloat16 without LoRA): an
    update below about 1/256 of a weight rounds away, as most do at distillation's learning rates
    (a review measured 1,181 of 61,920 weights moved in 60 steps at lr 5e-6, 53,241 in float32)."""
    import torch

    if not any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad):
        return None
    return (f"the trained weights are bfloat16: AdamW's updates smaller than about 1/256 of a weight are rounded "
            f"away (at --lr {lr:g} most are), so much of the model may not train; --dtype auto keeps float32 "
            f"master weights (half-precision autocast on GPUs)")


def adapter_note(model, save_adapter: bool) -> str | None:
    """The line to log when the adapter this run will save needs peft to load: its tokenizer
    gained our pad token, so the base's embeddings grow on loading, which peft's
    AutoPeftModelForCausalLM (and every minillm command) does and transformers'
    AutoModelForCausalLM.from_pretrained cannot (a size mismatch)."""
    if not (save_adapter and getattr(model, "_minillm_added_rows", False)):
        return None
    return (f"note: the tokenizer gained {PAD_TOKEN} (its vocabulary is larger than the base model's): load the saved "
            f"adapter with peft's AutoPeftModelForCausalLM.from_pretrained, which grows the base's embeddings; "
            f"transformers' AutoModelForCausalLM cannot (or save merged weights: no --save-adapter)")


def _absolute_base(cfg: Path) -> None:
    """peft records the base model as it was named: a folder given relative to the working
    directory would make the adapter load only from there (or as a Hub id elsewhere)."""
    if not cfg.is_file():
        return
    data = json.loads(cfg.read_text())
    base = data.get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and Path(base).expanduser().is_dir():
        data["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
