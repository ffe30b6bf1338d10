"""Fine-tune a teacher or student on instruction data (loss on responses only; LoRA optional)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from minillm_cli.cli import options as o
from minillm_cli.cli.common import (Debug, Device, JsonOut, Limit, Quiet, Seed, echo_main, kept_weights, out_json, rank,
                                    run_command)


def command(
    model: Annotated[str, typer.Option("--model", help="MODEL: Hub id, local folder or LoRA adapter folder.")],
    data: o.Data,
    out: o.Out,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Epochs over the training split (default 1 when --steps is not given).")] = None,
    lr: o.Lr = 5e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size (examples per optimizer step, all processes together).")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Split each batch into this many micro-batches.")] = 1,
    max_length: o.MaxLength = 512,
    max_prompt_length: o.MaxPrompt = 256,
    limit: Limit = None,
    lora_r: o.LoraR = 0,
    lora_alpha: o.LoraAlpha = 16.0,
    lora_dropout: o.LoraDropout = 0.05,
    lora_targets: o.LoraTargets = None,
    save_adapter: o.SaveAdapter = False,
    prompt_field: o.PromptField = None,
    response_field: o.ResponseField = None,
    input_field: o.InputField = None,
    template: o.Template = "dolly",
    turns: o.Turns = "last",
    valid_size: o.ValidSize = 0.05,
    valid_data: o.ValidData = None,
    test_size: o.TestSize = 0.0,
    split_seed: o.SplitSeed = 1234,
    weight_decay: o.WeightDecay = 0.0,
    warmup_steps: o.Warmup = 0,
    schedule: o.Schedule = "cosine",
    max_grad_norm: o.MaxGradNorm = 1.0,
    adam_betas: o.AdamBetas = "0.9,0.999",
    eval_every: o.EvalEvery = 0,
    select_by: o.SelectBy = None,
    save_every: o.SaveEvery = 0,
    overwrite: o.Overwrite = False,
    resume: o.Resume = False,
    trust_remote_code: o.TrustRemote = False,
    dtype: o.Dtype = "auto",
    gradient_checkpointing: o.GradCkpt = False,
    device: Device = "auto",
    fsdp: o.Fsdp = False,
    seed: Seed = 0,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    debug: Debug = False,
) -> None:
    args = dict(locals())

    def body():
        from minillm_cli.config import SFTConfig
        from minillm_cli.engine.sft import train_sft

        data_o, run_o, optim_o, model_o = o.configs(args)
        cfg = SFTConfig(model=model, data=data_o, run=run_o, optim=optim_o, model_opts=model_o,
                        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum)
        summary = train_sft(cfg)
        if json_out and rank() == 0:
            out_json(summary)
        elif not quiet:
            best = summary["best_valid_loss"]
            echo_main(f"sft done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}"
                      + (f", lowest valid loss {best:.4f}" if best is not None else "") + kept_weights(summary)
                      + f" -> {summary['out']}")

    run_command(body, debug=debug)
