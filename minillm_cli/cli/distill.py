"""Train a student from a teacher: MiniLLM (reverse-KL policy gradient), or the KD, SeqKD and RKL baselines."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from minillm_cli.cli import options as o
from minillm_cli.cli.common import (Debug, Device, JsonOut, Limit, Quiet, Seed, echo_main, kept_weights, out_json, rank,
                                    run_command)

Int = lambda flag, help: Annotated[int, typer.Option(flag, help=help)]  # noqa: E731
Float = lambda flag, help: Annotated[float, typer.Option(flag, help=help)]  # noqa: E731
Bool = lambda flag, help: Annotated[bool, typer.Option(flag, help=help)]  # noqa: E731


def command(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher MODEL (Hub id, local folder or LoRA adapter folder).")],
    student: Annotated[str, typer.Option("--student", help="Student MODEL to train (usually an SFT checkpoint).")],
    data: o.Data,
    out: o.Out,
    method: Annotated[str, typer.Option("--method", help="minillm | kd | seqkd | rkl.")] = "minillm",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (MiniLLM: PPO updates; rollouts are refreshed as needed).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training prompts (default 1 when --steps is not given).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Global mini-batch (rollouts or examples per optimizer step, all processes). Default: 64 for minillm (the reference code's), 8 for the baselines.")] = None,
    grad_accum: Int("--grad-accum", "Split each mini-batch into this many micro-batches. 0 (auto): micro-batches of at most 8.") = 0,
    lr: o.Lr = 5e-6,
    num_rollouts: Int("--num-rollouts", "Rollouts sampled per MiniLLM iteration (global).") = 256,
    rollout_batch_size: Int("--rollout-batch-size", "Prompts sampled together. 0 (auto): as many as their KV caches fit in half the free memory, up to --num-rollouts (--batch-size with --whiten, the update's micro-batch under --fsdp).") = 0,
    ppo_epochs: Int("--ppo-epochs", "Passes over each rollout buffer.") = 4,
    max_new_tokens: Int("--max-new-tokens", "Longest sampled response.") = 256,
    temperature: Float("--temperature", "Sampling temperature (both models).") = 1.0,
    top_k: Int("--top-k", "Top-k filtering (0: off), applied to both models before mixing.") = 0,
    top_p: Float("--top-p", "Top-p filtering (1: off), applied to both models before mixing.") = 1.0,
    teacher_mix_alpha: Float("--teacher-mix-alpha", "alpha of p~ = alpha*teacher + (1-alpha)*student (paper: 0.2).") = 0.2,
    clip_ratio: Float("--clip-ratio", "PPO clip epsilon (0: no clipping).") = 0.2,
    no_single_step: Bool("--no-single-step", "Ablation: no single-step decomposition (plain policy gradient).") = False,
    no_length_norm: Bool("--no-length-norm", "Ablation: un-normalised long-term returns.") = False,
    importance_weight: Annotated[str, typer.Option("--importance-weight", help="token (paper's approximation) | sequence (exact products of the ratios: unbiased, noisier).")] = "token",
    gamma: Float("--gamma", "Discount of the long-term return (reference code: 0.95).") = 1.0,
    include_current_reward: Bool("--include-current-reward", "Reference code: the advantage includes r_t.") = False,
    whiten: Bool("--whiten", "Reference code: whiten advantages, over the valid tokens of each rollout micro-batch (--rollout-batch-size).") = False,
    reward_scale: Float("--reward-scale", "Rewards are divided by this, as the reference code's reward_scaling (its scripts: 0.5, doubling them).") = 1.0,
    reward_clip: Annotated[Optional[float], typer.Option("--reward-clip", help="Reference code: 100.")] = None,
    loss_normalizer: Annotated[str, typer.Option("--loss-normalizer", help="tokens (mean per response token) | sequences.")] = "tokens",
    pt_data: Annotated[Optional[str], typer.Option("--pt-data", help="A pretrain-mix folder for the PT loss.")] = None,
    pt_coef: Float("--pt-coef", "Weight of the PT loss.") = 1.0,
    pt_batch_size: Int("--pt-batch-size", "PT chunks per step (0: --batch-size).") = 0,
    pt_kd_ratio: Float("--pt-kd-ratio", "Mix forward KD into the PT loss (reference code's kd_ratio).") = 0.0,
    kd_ratio: Float("--kd-ratio", "kd: weight of forward KL against CE (paper: 0.5).") = 0.5,
    teacher_peft: Annotated[Optional[str], typer.Option("--teacher-peft", help="LoRA adapter merged into the teacher.")] = None,
    teacher_device: Annotated[Optional[str], typer.Option("--teacher-device", help="Put the teacher elsewhere (cpu, cuda:1).")] = None,
    eval_prompts: Int("--eval-prompts", "Validation prompts for the reverse-KL curve (0: off).") = 32,
    sampler: Annotated[str, typer.Option("--sampler", help="Sampling engine for rollouts and validation samples: auto (static KV caches + CUDA graph on GPUs, the eager loop on CPUs) | eager (the reference loop) | static | graph | compile (experimental).")] = "auto",
    cache_teacher_logits: Annotated[Optional[bool], typer.Option("--cache-teacher-logits/--no-cache-teacher-logits", help="Keep the teacher's logits from scoring for all PPO epochs instead of a teacher forward per update (exact; memory rollouts*tokens*vocab). Default: on in one-process runs where twice that fits in 1/4 of the memory free after loading.")] = None,
    update_graphs: Annotated[bool, typer.Option("--update-graphs/--no-update-graphs", help="MiniLLM on one CUDA GPU (not --fsdp, --gradient-checkpointing or --teacher-device): replay each update micro-step (forward, loss, backward) from a CUDA graph captured per micro-batch shape; same results, far fewer kernel launches. Off: the eager micro-step.")] = True,
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
    warmup_steps: o.Warmup = 100,
    schedule: Annotated[str, typer.Option("--schedule", help="constant (paper) | cosine | linear, after warm-up.")] = "constant",
    max_grad_norm: o.MaxGradNorm = 1.0,
    adam_betas: o.AdamBetas = "0.9,0.999",
    eval_every: o.EvalEvery = 0,
    select_by: o.SelectBy = None,
    save_every: o.SaveEvery = 0,
    overwrite: o.Overwrite = False,
    resume: o.Resume = False,
    trust_remote_code: o.TrustRemote = False,
    dtype: o.StudentDtype = "auto",
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
        from minillm_cli.config import DistillConfig, saved_config
        from minillm_cli.engine.distill import run_distill

        data_o, run_o, optim_o, model_o = o.configs(args)
        size = batch_size
        if size is None and resume:  # the run's own: the default was 8 before it became 64
            size = saved_config(out).get("batch_size")
        cfg = DistillConfig(
            teacher=teacher, student=student, method=method, data=data_o, run=run_o, optim=optim_o,
            model_opts=model_o,
            steps=steps, epochs=epochs, batch_size=size if isinstance(size, int) else None, grad_accum=grad_accum,
            num_rollouts=num_rollouts, rollout_batch_size=rollout_batch_size, ppo_epochs=ppo_epochs,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            teacher_mix_alpha=teacher_mix_alpha, clip_ratio=clip_ratio, single_step=not no_single_step,
            length_norm=not no_length_norm, importance_weight=importance_weight, gamma=gamma,
            include_current_reward=include_current_reward, whiten=whiten, reward_scale=reward_scale,
            reward_clip=reward_clip, loss_normalizer=loss_normalizer, pt_data=pt_data, pt_coef=pt_coef,
            pt_batch_size=pt_batch_size, pt_kd_ratio=pt_kd_ratio, kd_ratio=kd_ratio, teacher_peft=teacher_peft,
            teacher_device=teacher_device, eval_prompts=eval_prompts, sampler=sampler,
            cache_teacher_logits=cache_teacher_logits, update_graphs=update_graphs,
        )
        summary = run_distill(cfg)
        if json_out and rank() == 0:
            out_json(summary)
        elif not quiet:
            echo_main(f"distill ({method}) done: {summary['steps']} steps{kept_weights(summary)} -> {summary['out']}")

    run_command(body, debug=debug)
