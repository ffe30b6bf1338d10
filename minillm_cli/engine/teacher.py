"""The teacher: loaded once, frozen, in the device's half precision, optionally with a LoRA
adapter merged in, on its own device if asked (`--teacher-device`), and checked to share the
student's tokenizer."""
from __future__ import annotations

import torch

from minillm_cli.engine.runtime import resolve_device
from minillm_cli.errors import InputError


class TeacherOnDevice(torch.nn.Module):
    """Runs a teacher that lives on another device (or offloaded to the CPU) and hands its outputs
    back on the student's device, so the engine never has to know where the teacher is."""

    def __init__(self, model, home: torch.device):
        super().__init__()
        self.model = model
        self.home = home
        self.config = model.config
        self.device_ = next(model.parameters()).device

    def get_base_model(self):
        """The wrapped model: `sampler.model_kwargs` reads its forward signature (cache argument
        name, logits_to_keep) through this, as it does for PEFT models."""
        return self.model

    def forward(self, **kw):
        moved = {k: (v.to(self.device_) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        out = self.model(**moved)
        out.logits = out.logits.to(self.home)
        return out


def load_teacher(name: str, *, student_tokenizer, device: torch.device, teacher_device: str | None = None,
                 peft: str | None = None, trust_remote_code: bool = False, dtype: str = "auto",
                 context: tuple[int, str] | None = None, note=None, template: str = "dolly"):
    """Load the teacher frozen; returns (teacher, vocab_size shared with the student).
    context: (longest sequence it will see, the flags that set it), checked against its positions
    (models.check_context; `note` logs what is not refused). template: the prompts' (--template chat
    compares how the two tokenizers end answers, not their EOS)."""
    from minillm_cli.models import check_context, check_same_tokenizer, load_model, load_tokenizer, pick_dtype

    t_tok = load_tokenizer(name, trust_remote_code=trust_remote_code, what="teacher",
                           pad=student_tokenizer.pad_token)
    vocab = check_same_tokenizer(t_tok, student_tokenizer, template=template, note=note)
    where = resolve_device(teacher_device, flag="--teacher-device") if teacher_device else device
    model = load_model(name, tokenizer=t_tok, device=where, dtype=pick_dtype(where, dtype),
                       trust_remote_code=trust_remote_code, trainable=False, what="teacher")
    if peft:
        from peft import PeftModel

        from minillm_cli import hub

        hub.before_lookup(peft)  # (a Hub id: no minutes of retries without a network)
        try:
            model = PeftModel.from_pretrained(model, peft).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:  # (RuntimeError: shapes of another base model)
            if isinstance(e, RuntimeError) and "size mismatch" not in str(e):
                raise  # (out of memory, a CUDA error: not a property of the adapter)
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise InputError(f"--teacher-peft {peft}: cannot load the adapter on teacher {name} ({detail[:300]})") from None
        model.eval().requires_grad_(False)
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight.shape[0] < vocab:
        raise InputError(f"teacher {name!r}: output layer has {model.get_output_embeddings().weight.shape[0]} rows "
                         f"for a {vocab}-token vocabulary")
    if context is not None:
        check_context(model, *context, who="teacher", note=note)
    if where != device:
        model = TeacherOnDevice(model, device)
    return model, vocab
