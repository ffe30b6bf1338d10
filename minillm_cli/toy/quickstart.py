"""`minillm quickstart`: the whole pipeline on the synthetic world, offline, through the same
engine functions as the real commands (no toy code paths): tokenizer → SFT teacher → SFT student →
pretrain-mix → distil with kd, seqkd, rkl and minillm over several seeds → evaluate (validity,
ROUGE-L, dist4, reverse KL to the teacher) → compare (table + PNG).

The question it answers is the paper's: at equal budget (same student, same steps, batch and
learning rate), is the MiniLLM student better than the SFT, KD and SeqKD students?
"""
from __future__ import annotations

import sys

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from minillm_cli.errors import InputError, require

METHODS = ("kd", "seqkd", "rkl", "minillm")
# The paper's four optimisations, each switched off in turn by `--ablation`.
ABLATIONS = {
    "no-single-step": {"single_step": False},
    "no-teacher-mix": {"teacher_mix_alpha": 0.0},
    "no-length-norm": {"length_norm": False},
    "no-pt-loss": {"pt_data": None},
}


@dataclass(frozen=True)
class Recipe:
    teacher_steps: int
    student_steps: int
    sft_lr: float
    distill_steps: int
    distill_lr: float
    batch_size: int
    num_rollouts: int
    max_new_tokens: int
    distill_seeds: int
    eval_seeds: int
    pt_coef: float = 0.1


FULL = Recipe(teacher_steps=1200, student_steps=600, sft_lr=2e-3, distill_steps=320, distill_lr=5e-4,
              batch_size=16, num_rollouts=64, max_new_tokens=10, distill_seeds=3, eval_seeds=3)
FAST = Recipe(teacher_steps=600, student_steps=300, sft_lr=2e-3, distill_steps=48, distill_lr=5e-4,
              batch_size=16, num_rollouts=64, max_new_tokens=10, distill_seeds=1, eval_seeds=2)


@dataclass
class QuickstartConfig:
    out: str = "minillm-quickstart"
    fast: bool = False
    seed: int = 0
    distill_seeds: Optional[int] = None
    ablation: bool = False
    overwrite: bool = False
    device: str = "auto"
    quiet: bool = False
    recipe: Recipe = field(init=False)

    def __post_init__(self):
        require(self.distill_seeds is None or self.distill_seeds > 0,
                f"--distill-seeds must be > 0, got {self.distill_seeds}")
        base = FAST if self.fast else FULL
        self.recipe = replace(base, distill_seeds=self.distill_seeds or base.distill_seeds)


def _say(cfg: QuickstartConfig, msg: str) -> None:
    if not cfg.quiet:
        from rich.console import Console

        Console(stderr=True).print(msg)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from minillm_cli.config import DataOptions, DistillConfig, ModelOptions, OptimOptions, RunOptions, SFTConfig
    from minillm_cli.data.pretrain import PretrainMixConfig, build_mixture
    from minillm_cli.engine.distill import run_distill
    from minillm_cli.engine.sft import train_sft
    from minillm_cli.toy.world import FAST as FAST_WORLD, FULL as FULL_WORLD, build_world

    t_start = time.perf_counter()
    r = cfg.recipe
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"--out {out}: folder exists and is not empty; pass --overwrite to replace it")
        if not (out / "world" / "world.json").exists():
            raise InputError(f"--out {out}: not a quickstart folder; refusing to clear it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        timings[name] = round(time.perf_counter() - t_start - sum(timings.values()), 1)

    _say(cfg, f"[bold]quickstart[/] ({'fast' if cfg.fast else 'full'}): building the synthetic world in {out}/world")
    world = build_world(out / "world", seed=cfg.seed, size=FAST_WORLD if cfg.fast else FULL_WORLD)
    stage("world")
    # The raw template (the instruction as the prompt): the Dolly header would be two thirds of
    # every sequence here, and the question is distillation, not prompt formatting.
    # (its finite prompt set repeats between train and valid by design: no overlap warning)
    data = DataOptions(data=world["train"], valid_data=world["valid"], template="raw", max_prompt_length=48,
                       max_length=64, warn_overlap=False)

    def sft(model: str, run_out: Path, steps: int) -> None:
        c = SFTConfig(model=model, data=data, run=RunOptions(out=str(run_out), seed=cfg.seed, device=cfg.device,
                                                                      quiet=True, eval_every=max(steps // 2, 1)),
                      optim=OptimOptions(lr=r.sft_lr, warmup_steps=50, schedule="cosine"), steps=steps,
                      batch_size=32)
        train_sft(c)

    _say(cfg, f"SFT teacher ({r.teacher_steps} steps)")
    sft(world["teacher_init"], out / "teacher", r.teacher_steps)
    stage("sft_teacher")
    _say(cfg, f"SFT student ({r.student_steps} steps)")
    sft(world["student_init"], out / "sft", r.student_steps)
    stage("sft_student")
    _say(cfg, "pretrain-mix for the PT loss")
    build_mixture(PretrainMixConfig(sources=[world["pretrain_text"]], tokenizer=str(out / "sft"), out=str(out / "pt"),
                                    seq_len=32, split_blank_lines=True, workers=0, valid_fraction=0.02))
    stage("pretrain_mix")

    def distill(method: str, seed: int, name: str, **overrides) -> Path:
        run_out = out / "runs" / name
        c = DistillConfig(
            teacher=str(out / "teacher"), student=str(out / "sft"), data=data,
            run=RunOptions(out=str(run_out), seed=seed, device=cfg.device, quiet=True,
                           eval_every=max(r.distill_steps // 6, 1)),
            optim=OptimOptions(lr=r.distill_lr, warmup_steps=0, schedule="constant"),
            model_opts=ModelOptions(), method=method, steps=r.distill_steps, batch_size=r.batch_size, grad_accum=1,
            num_rollouts=r.num_rollouts, ppo_epochs=4, max_new_tokens=r.max_new_tokens,
            pt_data=str(out / "pt"), pt_coef=r.pt_coef, eval_prompts=32)
        for k, v in overrides.items():
            setattr(c, k, v)
        c.__post_init__()
        run_distill(c)
        return run_out

    def sft_more(seed: int, name: str) -> Path:
        run_out = out / "runs" / name
        c = SFTConfig(model=str(out / "sft"), data=data,
                      # compared at its last step, like every distilled student
                      run=RunOptions(out=str(run_out), seed=seed, device=cfg.device, quiet=True,
                                     eval_every=max(r.distill_steps // 6, 1), select_by="last"),
                      optim=OptimOptions(lr=r.distill_lr, warmup_steps=0, schedule="constant"),
                      steps=r.distill_steps, batch_size=r.batch_size)
        train_sft(c)
        return run_out

    runs: dict[str, list[Path]] = {m: [] for m in ("sft", *METHODS)}
    for s in range(r.distill_seeds):
        _say(cfg, f"SFT continued at the distillation budget (seed {s + 1}/{r.distill_seeds}, {r.distill_steps} steps)")
        runs["sft"].append(sft_more(cfg.seed + s, f"sft-s{s}"))
    stage("sft_equal_budget")
    for method in METHODS:
        for s in range(r.distill_seeds):
            _say(cfg, f"distill {method} (seed {s + 1}/{r.distill_seeds}, {r.distill_steps} steps)")
            runs[method].append(distill(method, cfg.seed + s, f"{method}-s{s}"))
        stage(f"distill_{method}")
    ablations: dict[str, Path] = {}
    if cfg.ablation:
        for name, overrides in ABLATIONS.items():
            _say(cfg, f"ablation: minillm {name}")
            ablations[name] = distill("minillm", cfg.seed, f"minillm-{name}", **overrides)
        stage("ablation")

    _say(cfg, "evaluate (validity, ROUGE-L, dist4, reverse KL to the teacher)")
    # rows of the comparison: the SFT student before distillation ("start"), and SFT continued for
    # the distillation budget ("sft": same steps, batch and learning rate as each method) so that
    # every student column had the same number of updates
    results = {"teacher": [evaluate_model(cfg, out / "teacher", world, out / "eval" / "teacher.json", teacher=None)],
               "start": [evaluate_model(cfg, out / "sft", world, out / "eval" / "start.json", teacher=out / "teacher")]}
    for method, paths in runs.items():
        results[method] = [evaluate_model(cfg, p, world, out / "eval" / f"{p.name}.json", teacher=out / "teacher")
                           for p in paths]
    ablation_results = {name: [evaluate_model(cfg, p, world, out / "eval" / f"{p.name}.json", teacher=out / "teacher")]
                        for name, p in ablations.items()}
    stage("evaluate")
    table = write_comparison(cfg, out, results, ablations, ablation_results)
    claim = verdict({name: combine(name, rs) for name, rs in results.items()})
    (out / "comparison.md").write_text(table + "\n" + claim + "\n")
    stage("compare")
    summary = {"out": str(out), "seconds": round(time.perf_counter() - t_start, 1), "timings": timings,
               "table": table, "verdict": claim, "fast": cfg.fast, "distill_seeds": r.distill_seeds, "eval_seeds": r.eval_seeds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_model(cfg: QuickstartConfig, model: Path, world: dict, result_path: Path, *, teacher) -> dict:
    from minillm_cli.eval.evaluate import EvaluateConfig, run_evaluate
    from minillm_cli.toy.task import is_valid

    metrics = ["validity", "rougeL", "dist4"] + (["reverse-kl"] if teacher is not None else [])
    return run_evaluate(EvaluateConfig(
        model=str(model), data=world["test"], metrics=metrics, teacher=str(teacher) if teacher else None,
        seeds=cfg.recipe.eval_seeds, seed=cfg.seed, max_new_tokens=cfg.recipe.max_new_tokens, max_prompt_length=48,
        max_length=64, template="raw", no_repeat_ngram_size=0, out=str(result_path), device=cfg.device, quiet=True,
        validity=lambda ex, pred: is_valid(ex.instruction, pred)))


def combine(name: str, results: list[dict]) -> dict:
    """One result per method: each metric's per-seed values are the per-run means, so mean ± std
    is over the seeds of the distillation itself (each run already averaged over sampling seeds)."""
    from minillm_cli.eval.metrics import aggregate
    from minillm_cli.eval.results import make_result

    names = list(results[0]["metrics"])
    metrics = {m: aggregate([r["metrics"][m]["mean"] for r in results]) for m in names}
    first = results[0]
    return make_result(model=name, data=first["data"], n=first["n"], protocol=first.get("protocol", {}),
                       metrics=metrics, runs=[r.get("model") for r in results])


def verdict(combined: dict[str, dict], metric: str = "validity") -> str:
    """The paper's claim, measured: is MiniLLM's `metric` above SFT's, KD's and SeqKD's (same
    student, same budget)? Says by how much, and whether the gap exceeds the seeds' spread."""
    m = combined["minillm"]["metrics"][metric]
    parts, ahead = [], True
    for rival in ("sft", "kd", "seqkd"):
        r = combined[rival]["metrics"][metric]
        gap = m["mean"] - r["mean"]
        spread = (m["std"] ** 2 + r["std"] ** 2) ** 0.5
        ahead &= gap > 0
        note = ", within the seeds' spread" if abs(gap) <= spread else ""
        parts.append(f"{rival} {r['mean']:.1f} ({gap:+.1f}{note})")
    others = {k: v["metrics"][metric]["mean"] for k, v in combined.items() if k not in ("teacher", "start", "minillm")}
    best = max(others, key=others.get)
    head = "MiniLLM came out ahead of SFT, KD and SeqKD" if ahead else "MiniLLM did NOT come out ahead of SFT, KD and SeqKD"
    tail = "" if best in ("sft", "kd", "seqkd") or others[best] <= m["mean"] else \
        f"; {best} ({others[best]:.1f}) is above MiniLLM"
    return f"{head} on {metric}: minillm {m['mean']:.1f} ± {m['std']:.1f} vs " + ", ".join(parts) + tail + "."


def write_comparison(cfg: QuickstartConfig, out: Path, results: dict[str, list[dict]], ablations: dict,
                     ablation_results: dict[str, list[dict]]) -> str:
    from minillm_cli.eval.compare import comparison, load_entries, render_markdown, rich_table
    from minillm_cli.eval.plot import plot_comparison
    from minillm_cli.eval.results import write_result

    files = []
    for name, rs in results.items():
        path = out / "compare" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_result(path, combine(name, rs))
        files.append(path)
    entries = load_entries(files, names=list(results))
    comp = comparison(entries, baseline="sft")
    md = render_markdown(comp)
    (out / "comparison.md").write_text(md)
    plot_comparison(entries, out / "comparison.png", title="quickstart: teacher, SFT and distilled students")
    if ablations:
        runs = [out / "runs" / "minillm-s0", *ablations.values()]
        plot_comparison(load_entries(runs, names=["minillm", *ablations]), out / "ablation.png",
                        title="MiniLLM ablation: training curves")
        files = [out / "compare" / "minillm.json"]
        for name, rs in ablation_results.items():
            files.append(out / "compare" / f"minillm-{name}.json")
            write_result(files[-1], combine(f"minillm-{name}", rs))
        (out / "ablation.md").write_text(render_markdown(comparison(load_entries(files, names=["minillm", *ablation_results]),
                                                                    baseline="minillm")))
    if not cfg.quiet:
        from rich.console import Console

        Console(stderr=True, width=None if sys.stderr.isatty() else 240).print(rich_table(comp))  # (no 80-column cut in logs)
    return md
