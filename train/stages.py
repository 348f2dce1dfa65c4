"""A job as a list of stages: pretraining is one stage, a curriculum or a context extension more.

Each stage overrides a few fields of the job (window length, micro-batch, accumulation, SP
degree, learning rate and warm-up, RoPE) for its span of global steps ``[start, end)``.
:func:`stage_job` turns a stage into a plain :class:`~longtrain.train.config.JobConfig`, so the
engine, the step and the evaluation code see one job at a time; the trainer rebuilds the engine
at each stage boundary (a new SP degree or RoPE needs a new model) and continues the data order
with :class:`~longtrain.data.curriculum.StagedLoader`'s token cursor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from longtrain.data.mixture import check_mix
from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError

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
    "mix",
)


@dataclass
class Stage:
    """One span of a curriculum, resolved (every field set)."""

    index: int
    """Position in the stage list (0-based)."""
    name: str
    """Label in logs."""
    where: str
    """The config key of this stage, for messages (``train.stages[1]``)."""
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
    mix: list | None = None
    """This stage's data mixture (``data.mix`` entries), or None to keep the job's."""

    @property
    def steps(self) -> int:
        """Optimizer steps in this stage."""
        return self.end - self.start


def _stage_list(job: Any) -> tuple[list[Any], str]:
    if job.train.stages:
        return job.train.stages, "train.stages"
    if job.finetune.stages:
        return job.finetune.stages, "finetune.stages"
    return [{"steps": job.train.steps}], "train"


def _get(st: dict, key: str, default: Any, typ: type, where: str) -> Any:
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


def resolve_stages(job: Any) -> list[Stage]:
    """The job's stages with defaults filled in; a one-line error names a bad entry."""
    raw, key = _stage_list(job)
    if not isinstance(raw, list):
        raise LongtrainError(f"{key} must be a list of mappings, e.g. [{{steps: 100}}]")
    stages: list[Stage] = []
    start = 0
    for i, st in enumerate(raw):
        where = f"{key}[{i}]" if key != "train" else "train"
        if not isinstance(st, dict):
            raise LongtrainError(f"{where} must be a mapping with at least 'steps'")
        unknown = sorted(set(st) - set(STAGE_KEYS))
        if unknown:
            raise LongtrainError(
                f"{where}: unknown key '{unknown[0]}'; stage keys are {', '.join(STAGE_KEYS)}"
            )
        steps = _get(st, "steps", None, int, where)
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
            where=where if key != "train" else "parallel",
            start=start,
            end=start + steps,
            seq_len=_get(st, "seq_len", job.data.seq_len, int, where),
            micro_batch=_get(st, "micro_batch", job.train.micro_batch, int, where),
            grad_accum=_get(st, "grad_accum", job.train.grad_accum, int, where),
            sp=_get(st, "sp", job.parallel.sp, int, where),
            lr=_get(st, "lr", job.train.lr, float, where),
            warmup=_get(st, "warmup", job.train.warmup, int, where),
            rope_theta=_get(st, "rope_theta", None, float, where),
            rope_scaling=rs,
            mix=st.get("mix"),
        )
        if stage.mix is not None:
            check_mix(stage.mix, f"{where}.mix")
        for k in ("seq_len", "micro_batch", "grad_accum", "sp"):
            if getattr(stage, k) < 1:
                raise LongtrainError(f"{where}.{k} must be positive")
        if stage.lr <= 0:
            raise LongtrainError(f"{where}.lr must be positive, got {stage.lr}")
        stages.append(stage)
        start += steps
    longest = max(s.seq_len for s in stages)
    for s in stages:
        if longest % s.seq_len:
            raise LongtrainError(
                f"{s.where}.seq_len={s.seq_len} does not divide the longest stage's seq_len "
                f"{longest}; the loader cuts every stage's windows from blocks of the longest "
                "length (use powers of two)"
            )
    return stages


def total_steps(job: Any) -> int:
    """Optimizer steps of the whole job (the stages' sum, or train.steps)."""
    return resolve_stages(job)[-1].end


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
    if stage.mix is not None:
        sj.data.mix, sj.data.dir = list(stage.mix), ""
    return sj


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs global step ``step`` (0-based); past the end, the last one."""
    for s in stages:
        if s.start <= step < s.end:
            return s
    return stages[-1]


def stage_model_config(base: ModelConfig, st: Stage) -> ModelConfig:
    """The model of one stage: the stage's RoPE settings and max_seq_len >= its seq_len."""
    ch: dict[str, Any] = {}
    if st.rope_theta is not None:
        ch["rope_theta"] = st.rope_theta
    if st.rope_scaling is not None:
        ch["rope_scaling"] = dict(st.rope_scaling)
    ch["max_seq_len"] = max(base.max_seq_len, st.seq_len)
    try:
        return base.replace(**ch)
    except LongtrainError as e:
        raise LongtrainError(f"{st.where}: {e}") from None
