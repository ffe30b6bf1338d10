"""Typer option groups shared by `sft` and `distill`, and their conversion into config dataclasses.
Only typer and the standard library here (imported by `minillm --help`)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

Data = Annotated[str, typer.Option("--data", help="DATA: .jsonl/.json/.csv/.parquet file (or a folder of them), Hub dataset id (org/name[#config][:split]), or alias (dolly, self-inst, vicuna, sni, unni).")]
Out = Annotated[str, typer.Option("--out", help="Output folder (a Hugging Face model folder plus run_config.json and metrics.jsonl).")]
PromptField = Annotated[Optional[str], typer.Option("--prompt-field", help="Field holding the instruction (overrides layout detection).")]
ResponseField = Annotated[Optional[str], typer.Option("--response-field", help="Field holding the reference response(s).")]
InputField = Annotated[Optional[str], typer.Option("--input-field", help="Field holding the optional input/context.")]
Turns = Annotated[str, typer.Option("--turns", help="Chat data: last (one example per conversation, its last assistant turn) | all (one per assistant turn, each after the conversation before it).")]
Template = Annotated[str, typer.Option("--template", help="Prompt template: dolly (the paper's), chat (tokenizer's chat template), raw.")]
MaxPrompt = Annotated[int, typer.Option("--max-prompt-length", help="Drop examples whose prompt is longer (tokens).")]
MaxLength = Annotated[int, typer.Option("--max-length", help="Maximum prompt + response tokens.")]
ValidSize = Annotated[float, typer.Option("--valid-size", help="Validation split: a count, or a fraction if < 1.")]
ValidData = Annotated[Optional[str], typer.Option("--valid-data", help="A separate validation file (DATA is then not split for validation).")]
TestSize = Annotated[float, typer.Option("--test-size", help="Test split held out: a count, or a fraction if < 1.")]
SplitSeed = Annotated[int, typer.Option("--split-seed", help="Seed of the train/valid/test split (independent of --seed).")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
Warmup = Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")]
Schedule = Annotated[str, typer.Option("--schedule", help="cosine | constant | linear (after warm-up).")]
AdamBetas = Annotated[str, typer.Option("--adam-betas", help="AdamW's B1,B2 (the reference code's MiniLLM trainer uses 0.9,0.95).")]
MaxGradNorm = Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0: off).")]
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Validate every N steps (0: at the end).")]
SelectBy = Annotated[Optional[str], typer.Option("--select-by", help="Which weights --out keeps: last; loss (best validation loss; sft's default); rougeL (best validation ROUGE-L of one sampled answer per validation prompt, as the paper picks its models; costs a generation per --eval-every); reverse-kl (distill minillm's best valid_reverse_kl). distill's default: last.")]
SaveEvery = Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (always at the end).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
LoraR = Annotated[int, typer.Option("--lora-r", help="LoRA rank (0: full fine-tuning; an adapter folder as the model keeps training its adapter).")]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha.")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")]
LoraTargets = Annotated[Optional[str], typer.Option("--lora-targets", help="Comma-separated module names, or all-linear (every linear layer but the output head); detected per architecture by default.")]
SaveAdapter = Annotated[bool, typer.Option("--save-adapter", help="Save the LoRA adapter instead of merged weights.")]
TrustRemote = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the Hub (off by default).")]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Shard the trained model (and distill's teacher) with FSDP2 over the processes (also on when accelerate's FSDP config is used).")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 for loaded weights.")]
StudentDtype = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 for the student's weights (the frozen teacher is bf16/fp16 on GPUs, float32 on CPUs).")]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute each transformer block's activations in the backward: much less memory for the trained model, about one more forward of compute.")]


def split_targets(s: Optional[str]):
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


def configs(a: dict):
    """DataOptions, RunOptions, OptimOptions and ModelOptions from a command's parsed options
    (its `locals()`): the option names above map one to one onto the dataclass fields."""
    from minillm_cli.config import DataOptions, ModelOptions, OptimOptions, RunOptions

    data = DataOptions(data=a["data"], prompt_field=a["prompt_field"], response_field=a["response_field"],
                       input_field=a["input_field"], template=a["template"], max_prompt_length=a["max_prompt_length"],
                       max_length=a["max_length"], valid_size=a["valid_size"], test_size=a["test_size"],
                       split_seed=a["split_seed"], limit=a["limit"], valid_data=a["valid_data"], turns=a["turns"])
    select_by = a.get("select_by")
    if select_by is None and a["resume"]:  # the run's own, not this command's default
        from minillm_cli.config import saved_config

        recorded = (saved_config(a["out"]).get("run") or {}).get("select_by")
        select_by = recorded if isinstance(recorded, str) else None
    run = RunOptions(out=a["out"], overwrite=a["overwrite"], resume=a["resume"], seed=a["seed"], device=a["device"],
                     quiet=a["quiet"], json=a["json_out"], eval_every=a["eval_every"], save_every=a["save_every"],
                     fsdp=a.get("fsdp", False), select_by=select_by)
    optim = OptimOptions(lr=a["lr"], weight_decay=a["weight_decay"], warmup_steps=a["warmup_steps"],
                         schedule=a["schedule"], max_grad_norm=a["max_grad_norm"], adam_betas=a["adam_betas"])
    model = ModelOptions(lora_r=a["lora_r"], lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"],
                         lora_targets=split_targets(a["lora_targets"]), save_adapter=a["save_adapter"],
                         trust_remote_code=a["trust_remote_code"], dtype=a["dtype"],
                         gradient_checkpointing=a.get("gradient_checkpointing", False))
    return data, run, optim, model
