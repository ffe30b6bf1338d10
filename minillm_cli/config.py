"""One dataclass per command, validated in `__post_init__` (raising InputError with the flag's
name), and saved with every run as `run_config.json` together with package versions."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minillm_cli.errors import InputError, require


@dataclass
class DataOptions:
    data: str
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    input_field: Optional[str] = None
    template: str = "dolly"
    max_prompt_length: int = 256
    max_length: int = 512
    valid_size: float = 0.05
    test_size: float = 0.0
    split_seed: int = 1234
    limit: Optional[int] = None
    valid_data: Optional[str] = None  # a separate validation file (then DATA is not split for validation)
    turns: str = "last"  # a conversation's examples: its last assistant turn, or "all" of them
    # (no flag) warn when --valid-data examples are training examples too; off for a task whose
    # finite prompt set repeats by design (quickstart's synthetic world)
    warn_overlap: bool = True

    def __post_init__(self):
        require(self.template in ("dolly", "chat", "raw"), f"--template {self.template!r}: expected dolly, chat or raw")
        require(self.turns in ("last", "all"), f"--turns {self.turns!r}: expected last or all")
        require(self.max_prompt_length > 0, f"--max-prompt-length must be > 0, got {self.max_prompt_length}")
        require(self.max_length > 1, f"--max-length must be > 1, got {self.max_length}")
        require(self.max_prompt_length < self.max_length,
                f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length ({self.max_length})")
        require(self.valid_size >= 0 and self.test_size >= 0, "--valid-size/--test-size must be >= 0")
        for flag, v in (("--valid-size", self.valid_size), ("--test-size", self.test_size)):
            require(v < 1 or float(v).is_integer(),
                    f"{flag} {v}: a fraction below 1, or a whole number of examples")
        require(self.limit is None or self.limit > 0, f"--limit must be > 0, got {self.limit}")


@dataclass
class OptimOptions:
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    adam_betas: tuple = (0.9, 0.999)  # (--adam-betas "B1,B2" arrives as text)

    def __post_init__(self):
        require(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        given = self.adam_betas
        try:
            betas = tuple(float(b) for b in (given.split(",") if isinstance(given, str) else given))
        except (TypeError, ValueError):
            betas = ()
        require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
                f"--adam-betas {given if isinstance(given, str) else ','.join(map(str, given))}: expected two numbers "
                f"in [0, 1) as B1,B2, e.g. 0.9,0.999")
        self.adam_betas = betas
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        require(self.schedule in ("cosine", "constant", "linear"),
                f"--schedule {self.schedule!r}: expected cosine, constant or linear")
        require(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class RunOptions:
    out: str
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    json: bool = False
    eval_every: int = 0  # 0: at the end only
    save_every: int = 0  # 0: at the end only
    fsdp: bool = False  # shard student and teacher with FSDP2 (engine/fsdp.py)
    # which weights OUT keeps (engine/selection.py): last | loss | rougeL | reverse-kl; None: the
    # command's default, set by its config (sft: loss; distill: last)
    select_by: Optional[str] = None

    def __post_init__(self):
        require(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        if self.select_by is not None:
            from minillm_cli.engine.selection import canonical_select

            self.select_by = canonical_select(self.select_by)
        require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        require(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other")


@dataclass
class ModelOptions:
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: Optional[list] = None
    save_adapter: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward

    def __post_init__(self):
        require(self.lora_r >= 0, f"--lora-r must be >= 0, got {self.lora_r}")
        if self.lora_r == 0:  # (full fine-tuning, or an adapter folder training its own adapter, with its own settings)
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = [f"--{k.replace('_', '-')}" for k in ("lora_targets", "lora_alpha", "lora_dropout")
                     if getattr(self, k) != defaults[k]]
            require(not given, f"{', '.join(given)} without --lora-r: no new LoRA adapter to apply "
                               f"{'it' if len(given) == 1 else 'them'} to (--lora-r 0 trains every weight, or an "
                               f"adapter folder's own adapter with its own settings)")
        self.lora()  # (its settings are checked before anything loads)
        # (--save-adapter's needs depend on the model: models.check_model_options)

    def lora(self):
        from minillm_cli.models import LoraSettings

        if self.lora_r <= 0:
            return None
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)


@dataclass
class SFTConfig:
    model: str
    data: DataOptions
    run: RunOptions
    optim: OptimOptions = field(default_factory=OptimOptions)
    model_opts: ModelOptions = field(default_factory=ModelOptions)
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1

    def __post_init__(self):
        require(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        require(self.grad_accum > 0, f"--grad-accum must be > 0, got {self.grad_accum}")
        require(self.batch_size % self.grad_accum == 0,
                f"--batch-size ({self.batch_size}) must be a multiple of --grad-accum ({self.grad_accum})")
        require(self.steps is None or self.steps > 0, f"--steps must be > 0, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        require(not (self.steps and self.epochs), "give --steps or --epochs, not both")
        explicit = self.run.select_by is not None
        if not explicit:
            self.run.select_by = "loss"
        require(self.run.select_by in ("last", "loss", "rougeL"),
                f"--select-by {self.run.select_by}: sft selects by last, loss or rougeL")
        # (a resume takes the run's own --select-by, its default included, and check_resume holds
        # it and the data options to the first run's, which this check passed then)
        check_selection(self.run.select_by, self.data, explicit and not self.run.resume)
        from minillm_cli.models import check_model_options

        check_model_options(self.model, self.model_opts, "--model")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def inputs(self) -> dict:
        """The inputs that name files or folders, by flag (`prepare_out_dir` keeps them)."""
        return with_adapter_bases({"--model": self.model, "--data": self.data.data,
                                   "--valid-data": self.data.valid_data})


def check_selection(select_by: str, data: DataOptions, explicit: bool = True) -> None:
    """A selection by a validation metric needs a validation set (sft's default, by loss, keeps
    the final weights without one)."""
    require(select_by == "last" or not explicit or data.valid_data is not None or data.valid_size > 0,
            f"--select-by {select_by} needs validation data: --valid-size 0 and no --valid-data leave none")


def with_adapter_bases(inputs: dict) -> dict:
    """`inputs` and, for each model given as a LoRA adapter folder, the base model it loads on."""
    from minillm_cli.models import adapter_base

    out = dict(inputs)
    for flag in ("--model", "--student", "--teacher"):
        if inputs.get(flag):
            try:
                base = adapter_base(inputs[flag])
            except InputError:  # (an adapter without a base: refused when it loads)
                base = None
            if base:
                out[f"{flag}'s base model"] = base
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("minillm-cli", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def save_run_config(cfg: Any, out: Path, command: str, extra: dict | None = None) -> None:
    # cwd: what relative paths in the config were relative to (check_resume resolves them)
    body = {"command": command, "config": to_dict(cfg), "versions": package_versions(), "cwd": os.getcwd()}
    if extra:
        body.update(extra)
    tmp = out / "run_config.json.tmp"
    tmp.write_text(json.dumps(body, indent=2, default=str))
    tmp.replace(out / "run_config.json")


# What a resumed run may change: how long it runs, what it prints, evaluates and saves, where and
# how fast it runs (the sampler engines draw the same distribution; cached teacher logits,
# checkpointed blocks and FSDP sharding give the same numbers up to float rounding:
# tests/e2e/test_fsdp.py resumes across it). Anything else would continue the checkpoint as a
# different run than the one run_config.json describes.
RESUMABLE = frozenset({
    "steps", "epochs", "run.out", "run.resume", "run.overwrite", "run.quiet", "run.json", "run.eval_every",
    "run.save_every", "run.device", "run.fsdp", "eval_prompts", "sampler", "cache_teacher_logits",
    "teacher_device", "model_opts.gradient_checkpointing", "grad_accum", "model_opts.save_adapter", "update_graphs",
    "data.warn_overlap",
})
_PATHS = frozenset({"model", "teacher", "student", "data.data", "data.valid_data", "pt_data", "teacher_peft"})
# Settings added after runs were first recorded, and what a record without them ran with: such a
# run is resumed under that value only (--turns all would read its data into other examples).
_ADDED = {"data.turns": "last"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def same_path(old, new, old_cwd: str | None) -> bool:
    """Whether two spellings of --data/--model... name the same local file or folder (the old one
    relative to the directory the run started in, when the record says)."""
    if not (isinstance(old, str) and isinstance(new, str)):
        return old == new
    pn = Path(new).expanduser()
    if not pn.exists():  # a Hub id or alias: the name is all there is
        return old == new
    po = Path(old).expanduser()
    if not po.is_absolute() and old_cwd:
        po = Path(old_cwd) / po
    return po.exists() and po.resolve() == pn.resolve()


def _same_targets(old, new, saved: dict) -> bool:
    """--lora-targets: equal, or the first run left them to detection and this one names exactly
    what it detected (run_config.json's resolved `lora_targets`)."""
    if old is not None or new is None:
        # (a list resumed without --lora-targets is refused: this run would detect its own targets,
        # not take the recorded ones)
        return old == new
    detected = (saved.get("resolved") or {}).get("lora_targets")
    return isinstance(detected, list) and sorted(new) == sorted(detected)


def saved_record(out: str | Path) -> dict | None:
    """The run in `out`'s whole record (run_config.json: command, config, resolved, cwd...), or
    None when there is no readable one."""
    try:
        saved = json.loads((Path(out).expanduser() / "run_config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def saved_config(out: str | Path) -> dict:
    """The configuration the run in `out` recorded (run_config.json), or {} when there is none."""
    config = (saved_record(out) or {}).get("config")
    return config if isinstance(config, dict) else {}


def saved_resolved(out: str | Path) -> dict | None:
    """What the run in `out` recorded its "auto" settings became (run_config.json's `resolved`; {}
    in a record without them), or None when there is no readable record."""
    saved = saved_record(out)
    if saved is None:
        return None
    resolved = saved.get("resolved")
    return resolved if isinstance(resolved, dict) else {}


def check_resume(cfg: Any, out: Path, command: str) -> list[str]:
    """Refuse --resume when the settings differ from those the run in OUT was started with
    (its run_config.json), except the RESUMABLE ones: the checkpoint's optimizer, scheduler and
    buffers would otherwise continue under settings the record does not show. Returns notes."""
    path = Path(out) / "run_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # (the checkpoint loader says what else is missing)
        from minillm_cli.engine.checkpoint import latest_checkpoint

        if latest_checkpoint(out) is None:  # (before seqkd's setup writes a run_config.json of its own)
            raise InputError(f"--resume: {out} holds no run to resume (no run_config.json, no checkpoint)")
        return [f"note: {path} is missing or unreadable: this command's settings cannot be checked against "
                f"the run's, and are taken as given"]
    if saved.get("command") != command:
        raise InputError(f"--resume: {out} holds a {saved.get('command')!r} run, this is {command!r} "
                         f"(--method differs?); start a new --out")
    old = _flat(saved.get("config") or {})
    old.update({k: v for k, v in _ADDED.items() if k not in old})
    new = _flat(json.loads(json.dumps(to_dict(cfg), default=str)))
    allowed = set(RESUMABLE)
    if not new.get("whiten"):  # rollout micro-batches only change what runs together, unless whitened per batch
        allowed.add("rollout_batch_size")
    changed = []
    for k in sorted(new):
        if k not in old or k in allowed:
            continue
        same = (same_path(old[k], new[k], saved.get("cwd")) if k in _PATHS
                else _same_targets(old[k], new[k], saved) if k == "model_opts.lora_targets" else old[k] == new[k])
        if not same:
            changed.append(k)
    if changed:
        what = ", ".join(f"--{k.split('.')[-1].replace('_', '-')} {old[k]!r} -> {new[k]!r}" for k in changed)
        raise InputError(f"--resume: {out} was started with other settings ({what}); resume with the same ones "
                         f"(--steps/--epochs, logging, evaluation, saving, device and speed options may change) "
                         f"or start a new --out")
    notes = []
    length = [k for k in ("steps", "epochs") if k in old and old[k] != new.get(k)]
    if length and new.get("optim.schedule") != "constant":
        notes.append(f"note: the {new.get('optim.schedule')} learning-rate schedule is laid out again over the new "
                     f"length; the resumed steps follow the new curve")
    return notes


def resumed_lora(settings, out: str | Path, resume: bool):
    """LoRA settings for this run: on --resume without --lora-targets, the targets the run detected
    when it started (run_config.json's resolved `lora_targets`), not a new detection, which another
    release may make differently (Phi-3's grew): the checkpoint's adapter and optimizer hold those."""
    if not resume or settings is None or settings.targets is not None:
        return settings
    detected = (saved_resolved(out) or {}).get("lora_targets")
    if isinstance(detected, list) and detected and all(isinstance(t, str) for t in detected):
        return dataclasses.replace(settings, targets=list(detected))
    return settings


def check_resumed_answer_end(out: str | Path, tokenizer, template: str) -> None:
    """--resume: a run goes on ending answers with the token it was trained to end them with
    (run_config.json's resolved `end_of_answer`; a record without it comes from a release that
    ended every answer with EOS, also under --template chat)."""
    from minillm_cli.data.template import end_of_answer_id

    resolved = saved_resolved(out)
    if resolved is None:
        return
    was = resolved.get("end_of_answer", tokenizer.eos_token_id)
    now = end_of_answer_id(tokenizer, template)
    if was != now:
        name = tokenizer.convert_ids_to_tokens
        raise InputError(f"--resume: the run in {out} was trained to end answers with {name(was)!r} (id {was}); this "
                         f"release ends --template {template} answers with {name(now)!r} (id {now}), the chat "
                         f"template's end of turn: start a new --out, or finish the run with the release that "
                         f"started it")


def inputs_inside(out: str | Path, inputs) -> list[str]:
    """The local inputs (a dict flag -> path or None, or (flag, path) pairs; Hub ids and aliases
    are skipped) that are the folder `out` or lie inside it, as "--flag path"."""
    folder = Path(out).expanduser().resolve()
    found = []
    for flag, value in (inputs.items() if isinstance(inputs, dict) else inputs):
        path = Path(value).expanduser() if value else None
        if path is not None and path.exists():
            path = path.resolve()
            if path == folder or folder in path.parents:
                found.append(f"{flag} {value}")
    return found


def prepare_out_dir(out: str, *, overwrite: bool, resume: bool, inputs: dict | None = None) -> Path:
    """Refuse a non-empty --out unless --resume, or --overwrite of a run folder (run_config.json):
    that clears the whole folder, the evaluations kept in it included (they describe the run being
    replaced), and is refused where an input (`inputs`: flag -> path) is the folder or lies in it."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise InputError(f"--out {out}: folder exists and is not empty; pass --overwrite to replace it "
                             f"or --resume to continue it")
        import shutil

        if not (path / "run_config.json").exists():
            raise InputError(f"--out {out}: not a minillm run folder (no run_config.json); refusing to clear it "
                             f"even with --overwrite")
        inside = inputs_inside(path, inputs or {})
        if inside:
            raise InputError(f"--out {out}: holds {', '.join(inside)}, which --overwrite would delete; write the "
                             f"run to another folder")
        shutil.rmtree(path)
    elif resume:
        raise InputError(f"--resume: {out} has no run to resume")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    return path


METHODS = ("minillm", "kd", "seqkd", "rkl")
AUTO_MICRO_BATCH = 8  # `distill --grad-accum 0`: the largest micro-batch (issue 7's update step: 8 x 512)


def auto_grad_accum(batch_size: int, most: int = AUTO_MICRO_BATCH, processes: int | None = None) -> int:
    """The fewest micro-batches of equal size, at most `most` rows each, that make up the batch
    (64 -> 8 of 8; 12 -> 2 of 6; 7 -> 1 of 7), a multiple of the number of processes (WORLD_SIZE
    by default) where one divides the batch, so that none sits idle (64 on 16 processes -> 16 of 4).
    Results do not depend on it: losses are normalised by the mini-batch's global counts."""
    if processes is None:
        processes = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    fits = [g for g in range(1, batch_size + 1) if batch_size % g == 0 and batch_size // g <= most]
    return next((g for g in fits if g % processes == 0), fits[0])


# options only some methods read (DistillConfig.unused_options warns about the others)
_MINILLM_OPTIONS = ("num_rollouts", "rollout_batch_size", "ppo_epochs", "teacher_mix_alpha", "clip_ratio",
                    "single_step", "length_norm", "importance_weight", "gamma", "include_current_reward", "whiten",
                    "reward_scale", "reward_clip", "loss_normalizer", "pt_data", "pt_coef", "pt_batch_size",
                    "pt_kd_ratio", "cache_teacher_logits", "eval_prompts", "update_graphs")
_SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "sampler")  # minillm, seqkd


@dataclass
class DistillConfig:
    """`minillm distill`. Defaults are the paper's (METHOD.md); the reference code's departures are
    flags (gamma 0.95, --include-current-reward, --whiten, --reward-scale 0.5, --reward-clip 100,
    --pt-kd-ratio 0.5)."""

    teacher: str
    student: str
    data: DataOptions
    run: RunOptions
    optim: OptimOptions = field(default_factory=lambda: OptimOptions(lr=5e-6, warmup_steps=100, schedule="constant"))
    model_opts: ModelOptions = field(default_factory=ModelOptions)
    method: str = "minillm"
    steps: Optional[int] = None
    epochs: Optional[float] = None
    # None: 64 for minillm (the reference code's global mini-batch, 4 per GPU on 16 GPUs, over its
    # 16 x 16 = 256 rollouts: 16 updates per rollout buffer), 8 for the baselines
    batch_size: Optional[int] = None
    grad_accum: int = 0  # 0: auto, micro-batches of at most AUTO_MICRO_BATCH rows (memory as batch 8)
    # rollouts and PPO
    num_rollouts: int = 256
    rollout_batch_size: int = 0  # 0: auto (engine/rollout_batch.py)
    ppo_epochs: int = 4
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    teacher_mix_alpha: float = 0.2
    clip_ratio: float = 0.2
    single_step: bool = True
    length_norm: bool = True
    importance_weight: str = "token"
    gamma: float = 1.0
    include_current_reward: bool = False
    whiten: bool = False
    reward_scale: float = 1.0
    reward_clip: Optional[float] = None
    loss_normalizer: str = "tokens"
    # pre-training loss
    pt_data: Optional[str] = None
    pt_coef: float = 1.0
    pt_batch_size: int = 0  # 0: --batch-size
    pt_kd_ratio: float = 0.0
    # baselines
    kd_ratio: float = 0.5
    # teacher
    teacher_peft: Optional[str] = None
    teacher_device: Optional[str] = None
    eval_prompts: int = 32
    # speed (GPU): rollout engine (the same distribution as the eager loop; tokens may differ by float
    # rounding) and teacher-logit caching (exact); see docs/PERFORMANCE-NOTES.md
    sampler: str = "auto"
    cache_teacher_logits: Optional[bool] = None  # None: where it fits (engine/minillm.teacher_logit_cache)
    update_graphs: bool = True  # MiniLLM's update micro-steps replayed from CUDA graphs (engine/captured_step.py)

    def __post_init__(self):
        require(self.sampler in ("auto", "eager", "static", "graph", "compile"),
                f"--sampler {self.sampler!r}: expected auto, eager, static, graph or compile")
        require(self.method in METHODS, f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        by_default = self.batch_size is None
        if by_default:
            self.batch_size = 64 if self.method == "minillm" else 8
        require(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        require(self.grad_accum >= 0, f"--grad-accum must be >= 0, got {self.grad_accum}")
        if self.grad_accum == 0:
            self.grad_accum = auto_grad_accum(self.batch_size)
        require(self.batch_size % self.grad_accum == 0,
                f"--batch-size ({self.batch_size}) must be a positive multiple of --grad-accum ({self.grad_accum})")
        require(self.steps is None or self.steps > 0, f"--steps must be > 0, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        require(self.num_rollouts > 0, f"--num-rollouts must be > 0, got {self.num_rollouts}")
        require(self.num_rollouts >= self.batch_size or self.method != "minillm",
                f"--num-rollouts ({self.num_rollouts}) must be at least --batch-size ({self.batch_size}"
                + (", minillm's default)" if by_default else ")"))
        require(self.rollout_batch_size >= 0, f"--rollout-batch-size must be >= 0, got {self.rollout_batch_size}")
        require(self.ppo_epochs > 0, f"--ppo-epochs must be > 0, got {self.ppo_epochs}")
        require(self.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {self.max_new_tokens}")
        require(self.teacher_device is None or re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.teacher_device.lower()),
                f"--teacher-device {self.teacher_device!r}: expected auto, cpu, cuda or cuda:N")
        # (seqkd: a teacher answer past it would be cut from its SFT, with its EOS)
        require(self.method not in ("minillm", "seqkd")
                or self.data.max_prompt_length + self.max_new_tokens <= self.data.max_length,
                f"--max-prompt-length {self.data.max_prompt_length} + --max-new-tokens {self.max_new_tokens} exceed "
                f"--max-length {self.data.max_length} (the longest prompt + response "
                f"{'a rollout' if self.method == 'minillm' else 'the teacher'} may make; 512 by "
                f"default): raise --max-length or lower one of the others")
        require(math.isfinite(self.teacher_mix_alpha) and 0.0 <= self.teacher_mix_alpha <= 1.0,
                f"--teacher-mix-alpha must be in [0, 1], got {self.teacher_mix_alpha}")
        require(self.teacher_mix_alpha < 1.0 or self.method != "minillm",
                "--teacher-mix-alpha 1 samples from the teacher only: the student's policy gradient needs alpha < 1")
        require(self.clip_ratio >= 0, f"--clip-ratio must be >= 0, got {self.clip_ratio}")
        require(0 < self.temperature < math.inf, f"--temperature must be a finite number > 0, got {self.temperature}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.importance_weight in ("token", "sequence"),
                f"--importance-weight {self.importance_weight!r}: expected token or sequence")
        require(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        require(self.reward_scale > 0, f"--reward-scale must be > 0, got {self.reward_scale}")
        require(self.reward_clip is None or self.reward_clip > 0, f"--reward-clip must be > 0, got {self.reward_clip}")
        require(self.loss_normalizer in ("tokens", "sequences"),
                f"--loss-normalizer {self.loss_normalizer!r}: expected tokens or sequences")
        require(self.pt_coef >= 0, f"--pt-coef must be >= 0, got {self.pt_coef}")
        require(self.pt_batch_size >= 0, f"--pt-batch-size must be >= 0, got {self.pt_batch_size}")
        require(0 <= self.pt_kd_ratio <= 1, f"--pt-kd-ratio must be in [0, 1], got {self.pt_kd_ratio}")
        require(0 <= self.kd_ratio <= 1, f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
        require(self.eval_prompts >= 0, f"--eval-prompts must be >= 0, got {self.eval_prompts}")
        require(not (self.steps and self.epochs), "give --steps or --epochs, not both")
        explicit = self.run.select_by is not None
        if not explicit:
            self.run.select_by = "last"
        require(self.run.select_by != "loss" or self.method != "minillm",
                "--select-by loss: MiniLLM computes no validation loss; select by rougeL or reverse-kl")
        require(self.run.select_by != "reverse-kl" or self.method == "minillm",
                "--select-by reverse-kl: only --method minillm computes valid_reverse_kl; select by loss or rougeL")
        require(self.run.select_by != "reverse-kl" or self.eval_prompts > 0,
                "--select-by reverse-kl needs --eval-prompts > 0 (the prompts valid_reverse_kl is computed on)")
        # (a resume takes the run's own --select-by, its default included, and check_resume holds
        # it and the data options to the first run's, which this check passed then)
        check_selection(self.run.select_by, self.data, explicit and not self.run.resume)
        from minillm_cli.models import adapter_base, check_model_options

        check_model_options(self.student, self.model_opts, "--student")
        require(not (self.teacher_peft and adapter_base(self.teacher)
                     and same_path(self.teacher, self.teacher_peft, None)),
                f"--teacher-peft {self.teacher_peft} is the --teacher folder itself, whose adapter is applied "
                f"already: drop --teacher-peft (or name the base model as --teacher)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def inputs(self) -> dict:
        """The inputs that name files or folders, by flag (`prepare_out_dir` keeps them)."""
        return with_adapter_bases({"--teacher": self.teacher, "--student": self.student, "--data": self.data.data,
                                   "--valid-data": self.data.valid_data, "--pt-data": self.pt_data,
                                   "--teacher-peft": self.teacher_peft})

    def unused_options(self) -> list[str]:
        """The flags given (away from their defaults) that this --method does not read."""
        used = {"minillm": {*_MINILLM_OPTIONS, *_SAMPLING_OPTIONS},
                "seqkd": {*_SAMPLING_OPTIONS, "rollout_batch_size"},  # (generates in rollout batches)
                "kd": {"kd_ratio"}, "rkl": set()}[self.method]
        ignored = {*_MINILLM_OPTIONS, *_SAMPLING_OPTIONS, "kd_ratio"} - used
        if self.pt_data is None:  # (no PT loss: its settings apply to nothing)
            ignored |= {"pt_coef", "pt_batch_size", "pt_kd_ratio"}
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ignored and value != f.default:
                flag = f.name.replace("_", "-")
                out.append((f"--no-{flag}" if value is False and f.default is not False else f"--{flag}")
                           + (" (no --pt-data)" if f.name.startswith("pt_") and self.method == "minillm" else ""))
        return out

    def as_sft(self, model: str) -> SFTConfig:
        """The supervised loop's view of this run (kd, rkl and seqkd train the student with it)."""
        return SFTConfig(model=model, data=self.data, run=self.run, optim=self.optim, model_opts=self.model_opts,
                         steps=self.steps, epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum)
