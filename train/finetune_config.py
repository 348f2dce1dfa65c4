"""Config sections of fine-tuning runs (``finetune:`` in a job file) and the stage list.

A fine-tuning job is a :class:`~longtrain.train.config.JobConfig` whose ``finetune`` section
says what is trained (``task``), with which adapters (``lora``), in which stages (``stages``)
and when to stop (``early_stopping``). Each stage overrides a few fields of the job for its
span of steps; :func:`stage_job` turns a stage into a plain JobConfig so the pretraining
step, evaluation and engine code run unchanged inside it.

This module imports nothing from ``train.config`` at import time (config.py imports it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from longtrain.model.errors import LongtrainError

TASKS = ("lm", "classify")
STAGE_KEYS = (
    "name",
    "steps",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "sp",
    "lr",
    "warmup",
    "rope_theta",
    "rope_scaling",
)


@dataclass
class LoraSection:
    """Low-rank adapters (``rank: 0`` = off, every weight trains)."""

    rank: int = 0
    """Adapter rank r; 0 disables LoRA. With LoRA only adapters (and a task head) train."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input path."""
    targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Linear layers that get adapters: any of wq, wk, wv, wo, w1, w2, w3."""


@dataclass
class EarlyStoppingSection:
    """Stop when the validation loss stops improving (``patience: 0`` = off)."""

    patience: int = 0
    """Evaluations without an improvement of at least ``min_delta`` before the whole run stops;
    0 = off. The count restarts at each stage (losses at another seq_len do not compare)."""
    min_delta: float = 0.0
    """Smallest decrease of the validation loss that counts as an improvement."""


@dataclass
class FinetuneSection:
    """What a ``longtrain finetune`` run trains (ignored by ``longtrain pretrain``)."""

    task: str = "lm"
    """``lm``: next-token loss on data.dir (pretraining data for context extension, ``prepare
    --sft`` data for SFT: the loader masks non-assistant targets). ``classify``: a linear head
    on the last token; data.dir holds train.jsonl / val.jsonl of {"text", "label"}."""
    num_labels: int = 2
    """classify only: number of classes (labels are ints in [0, num_labels))."""
    lora: LoraSection = field(default_factory=LoraSection)
    """Low-rank adapters."""
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    """Early stopping on validation loss; the best model is kept in run_dir/best/."""
    stages: list = field(default_factory=list)
    """Curriculum: a list of mappings with ``steps`` and any of seq_len, micro_batch,
    grad_accum, sp, lr, warmup, rope_theta, rope_scaling (others come from the job). Empty =
    one stage made of the job itself. With stages, ``train.steps`` is replaced by their sum."""


@dataclass
class Stage:
    """One span of a curriculum, resolved (every field set)."""

    index: int
    """Position in the stage list (0-based)."""
    name: str
    """Label in logs."""
    start: int
    """First global optimizer step of the stage (0-based): the stage runs [start, end)."""
    end: int
    """One past its last global step."""
    seq_len: int
    """Window length."""
    micro_batch: int
    """Windows per DP rank per forward."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    sp: int
    """Sequence-parallel degree."""
    lr: float
    """Peak learning rate of the stage (its schedule restarts at the stage start)."""
    warmup: int
    """Warm-up steps at the stage start."""
    rope_theta: float | None
    """RoPE base, or None to keep the model's."""
    rope_scaling: dict | None
    """RoPE scaling mapping, or None to keep the model's."""

    @property
    def steps(self) -> int:
        """Optimizer steps in this stage."""
        return self.end - self.start


def resolve_stages(job: Any) -> list[Stage]:
    """The job's stages with defaults filled in; a one-line error names a bad entry."""
    raw = job.finetune.stages or [{"steps": job.train.steps}]
    if not isinstance(raw, list):
        raise LongtrainError("finetune.stages must be a list of mappings, e.g. [{steps: 100}]")
    stages: list[Stage] = []
    start = 0
    for i, st in enumerate(raw):
        where = f"finetune.stages[{i}]"
        if not isinstance(st, dict):
            raise LongtrainError(f"{where} must be a mapping with at least 'steps'")
        unknown = sorted(set(st) - set(STAGE_KEYS))
        if unknown:
            raise LongtrainError(
                f"{where}: unknown key '{unknown[0]}'; stage keys are {', '.join(STAGE_KEYS)}"
            )

        def get(key: str, default: Any, typ: type, st: dict = st, where: str = where) -> Any:
            v = st.get(key, default)
            if v is None:
                return None
            try:
                out = typ(v)
            except (TypeError, ValueError):
                raise LongtrainError(f"{where}.{key} must be {typ.__name__}, got {v!r}") from None
            if typ is int and out != v:
                raise LongtrainError(f"{where}.{key} must be an integer, got {v!r}")
            return out

        steps = get("steps", None, int)
        if steps is None or steps < 1:
            raise LongtrainError(
                f"{where}.steps must be a positive integer, got {st.get('steps')!r}"
            )
        rs = st.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise LongtrainError(
                f"{where}.rope_scaling must be a mapping like {{type: yarn, factor: 4}}"
            )
        stage = Stage(
            index=i,
            name=str(st.get("name", f"stage{i + 1}")),
            start=start,
            end=start + steps,
            seq_len=get("seq_len", job.data.seq_len, int),
            micro_batch=get("micro_batch", job.train.micro_batch, int),
            grad_accum=get("grad_accum", job.train.grad_accum, int),
            sp=get("sp", job.parallel.sp, int),
            lr=get("lr", job.train.lr, float),
            warmup=get("warmup", job.train.warmup, int),
            rope_theta=get("rope_theta", None, float),
            rope_scaling=rs,
        )
        for key in ("seq_len", "micro_batch", "grad_accum", "sp"):
            if getattr(stage, key) < 1:
                raise LongtrainError(f"{where}.{key} must be positive")
        if stage.seq_len % stage.sp:
            raise LongtrainError(
                f"{where}: seq_len={stage.seq_len} is not divisible by sp={stage.sp}"
            )
        stages.append(stage)
        start += steps
    longest = max(s.seq_len for s in stages)
    for s in stages:
        if longest % s.seq_len:
            raise LongtrainError(
                f"finetune.stages[{s.index}].seq_len={s.seq_len} does not divide the longest "
                f"stage's seq_len {longest}; the loader cuts every stage's windows from blocks "
                "of the longest length (use powers of two)"
            )
    return stages


def stage_job(job: Any, stage: Stage) -> Any:
    """A copy of ``job`` with the stage's fields in place (train.steps = the stage's steps).

    Learning-rate schedules are per stage: ``lr_at(step - stage.start, stage_job(...))``.
    """
    sj = copy.deepcopy(job)
    sj.data.seq_len = stage.seq_len
    sj.train.micro_batch = stage.micro_batch
    sj.train.grad_accum = stage.grad_accum
    sj.train.steps = stage.steps
    sj.train.lr = stage.lr
    sj.train.warmup = min(stage.warmup, stage.steps)
    sj.parallel.sp = stage.sp
    return sj


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs global step ``step`` (0-based); past the end, the last one."""
    for s in stages:
        if s.start <= step < s.end:
            return s
    return stages[-1]


def check_finetune(job: Any) -> None:
    """Field checks of the finetune section (run with the rest of the config checks)."""
    f = job.finetune
    if f.task not in TASKS:
        raise LongtrainError(f"finetune.task must be one of {', '.join(TASKS)}, got '{f.task}'")
    if f.task == "classify" and f.num_labels < 2:
        raise LongtrainError(f"finetune.num_labels must be >= 2, got {f.num_labels}")
    if f.lora.rank < 0:
        raise LongtrainError(f"finetune.lora.rank must be >= 0 (0 = off), got {f.lora.rank}")
    from longtrain.model.lora import LoRAConfig

    # Checked even when LoRA is off, so that a typo does not wait for the day it is turned on.
    LoRAConfig(max(f.lora.rank, 1), f.lora.alpha, f.lora.dropout, tuple(f.lora.targets))
    if f.early_stopping.patience < 0:
        raise LongtrainError("finetune.early_stopping.patience must be >= 0 (0 = off)")
    if f.early_stopping.patience and not job.log.eval_interval:
        raise LongtrainError("finetune.early_stopping needs validation: set log.eval_interval > 0")
    resolve_stages(job)
