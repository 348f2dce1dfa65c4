"""Job configuration: what a run does, read from YAML plus ``key.sub=value`` overrides.

A :class:`JobConfig` is a tree of small dataclasses (model, data, train, parallel, checkpoint,
log, finetune) with a docstring per field; ``longtrain pretrain`` and ``longtrain finetune``
read the same tree. Files are read with ``yaml.safe_load`` and nothing is ever evaluated as
code. Each section checks its own fields in ``__post_init__``; :func:`validate_job` checks what
spans sections, the world size and the data, and every command calls it before any process
group exists, so a bad job fails in seconds with one line naming the key and the fix, instead
of after the cluster has been booked and the model built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtrain.data.loader import load_manifest
from longtrain.data.mixture import check_mix, check_mix_tokenizers
from longtrain.data.tokenizer import check_tokenizer_hash, tokenizer_hash
from longtrain.model.attention import resolve_core_name
from longtrain.model.config import ModelConfig, get_flavor
from longtrain.model.errors import LongtrainError
from longtrain.model.lora import LoRAConfig
from longtrain.train.parallel import sp_layout_problem
from longtrain.train.stages import Stage, resolve_stages, stage_model_config

SCHEDULES = ("cosine", "wsd", "constant")
AC_MODES = ("none", "full", "selective")
DTYPES = ("auto", "fp32", "bf16")
TASKS = ("lm", "classify")
ROPE_FIELDS = ("rope_theta", "rope_scaling", "max_seq_len")
"""ModelConfig fields a fine-tuning run (or a stage) may change on its initial model."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise LongtrainError(msg)


def _finite(name: str, value: float) -> None:
    _need(math.isfinite(value), f"{name}={value}: must be a finite number")


@dataclass
class ModelSection:
    """Which network to train."""

    flavor: str = "tiny"
    """Named model size from ``longtrain.model.config.FLAVORS`` (debug, tiny, 125m, 1b, 8b, 70b)."""
    attention: str = "auto"
    """Attention core: flash, torch_varlen, sdpa, reference or auto (best available, logged)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields that replace the flavor's, e.g. ``{n_layers: 4, rope_theta: 1e6}``.
    ``vocab_size`` defaults to the data's vocabulary and ``max_seq_len`` to at least data.seq_len."""
    init: str = ""
    """finetune only: start from this longtrain checkpoint, run dir, model dir or HF Llama
    directory (its shape wins over ``flavor``; ``overrides`` may change RoPE and max_seq_len)."""
    compile: bool = False
    """``torch.compile`` each transformer block's forward on its own (the attention core stays
    eager; under ZeRO-3 each block becomes one gathering unit), for training steps only:
    evaluation and export run the same weights eagerly. The first step pays the compile
    (15 s for ``tiny`` on a 2-core CPU; logged once). Off by default: on that CPU the 1.12x
    faster steps pay it back after ~270 steps, past a demo run (``bench/RESULTS.md``)."""


@dataclass
class DataSection:
    """Where the tokens come from and how they are cut into windows."""

    dir: str = ""
    """Data directory written by ``longtrain prepare`` (holds manifest.json and the tokenizer)."""
    mix: list = field(default_factory=list)
    """Instead of ``dir``: a weighted mixture of data directories, a list of ``{name, dir,
    weight}`` (each prepared with the same tokenizer). Windows are drawn from the sources by
    weight in a deterministic order (``longtrain.data.mixture``); rows of metrics.jsonl carry
    ``tokens_by_source`` and validation ``val_loss/<name>``. A stage may set its own ``mix``."""
    seq_len: int = 2048
    """Tokens per training window (the full sequence, before sequence-parallel sharding)."""
    attention: str = "document"
    """``document``: attention stays within each packed document; ``causal``: one causal window."""
    tokenizer: str = ""
    """Optional tokenizer directory; it must be the one the data was prepared with (hash check)."""
    val_batches: int = 8
    """Validation micro-batches per rank at each evaluation (0 = every validation window)."""

    def __post_init__(self) -> None:
        _need(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}")
        _need(
            self.attention in ("document", "causal"),
            f"data.attention must be document or causal, got '{self.attention}'",
        )
        _need(
            self.val_batches >= 0,
            f"data.val_batches={self.val_batches}: must be >= 0 (0 = every validation window)",
        )
        _need(
            not (self.dir and self.mix),
            "data.dir and data.mix are both set; a job reads one: drop data.dir (list it as a "
            "source of data.mix) or drop data.mix",
        )
        if self.mix:
            check_mix(self.mix)


@dataclass
class TrainSection:
    """The optimisation: steps, batch, learning rate schedule, AdamW."""

    steps: int = 100
    """Optimizer steps to run (the total, counting steps done before a resume). With
    ``stages`` it is replaced by the sum of their steps."""
    micro_batch: int = 1
    """Windows per data-parallel rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; tokens/step = seq_len*micro_batch*grad_accum*DP."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and wsd)."""
    warmup: int = 10
    """Linear warm-up steps from 0 to ``lr``."""
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | constant."""
    decay_fraction: float = 0.2
    """wsd only: fraction of all steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    max_bad_steps: int = 5
    """Stop the run after this many NaN/Inf losses in a row (each one skips its update)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked cross-entropy (bounds the fp32 logits memory)."""
    mlp_chunk_size: int = 0
    """Tokens per tile of the sequence-tiled MLP; 0 = off. The MLP then holds one tile's
    intermediates (3 x tile x ffn_dim) instead of the rank's micro_batch x seq_len/sp tokens'
    worth, for one extra MLP forward per step. A tile of a few thousand tokens keeps the
    matmuls large enough to run at full speed on a GPU while the saving grows with the window;
    ``model.dim`` is a safe small value (``longtrain plan`` shows what each choice saves)."""
    stages: list = field(default_factory=list)
    """Curriculum: a list of mappings with ``steps`` and any of seq_len, micro_batch,
    grad_accum, sp, lr, warmup, rope_theta, rope_scaling, name (the rest comes from the job),
    run one after the other as one resumable run, e.g. seq_len 512 -> 2048 for pretraining
    or 32K -> 128K with YaRN for context extension. Empty = one stage made of the job itself.
    See ``longtrain.train.stages``."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum"):
            v = getattr(self, name)
            _need(v > 0, f"train.{name} must be positive, got {v}")
        for name in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "beta1", "beta2",
                     "eps", "grad_clip"):  # fmt: skip
            _finite(f"train.{name}", getattr(self, name))
        _need(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _need(self.warmup >= 0, f"train.warmup must be >= 0, got {self.warmup}")
        _need(
            self.schedule in SCHEDULES,
            f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'",
        )
        _need(0 < self.decay_fraction <= 1, "train.decay_fraction must be in (0, 1]")
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _need(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}: must be >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _need(0 <= v < 1, f"train.{name}={v}: must be in [0, 1), e.g. 0.9 / 0.95")
        _need(self.eps > 0, f"train.eps={self.eps}: must be > 0, e.g. 1e-8")
        _need(
            self.grad_clip >= 0,
            f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables clipping)",
        )
        _need(self.max_bad_steps >= 1, "train.max_bad_steps must be >= 1")
        _need(self.loss_chunk_size >= 1, "train.loss_chunk_size must be >= 1")
        _need(
            self.mlp_chunk_size >= 0,
            f"train.mlp_chunk_size={self.mlp_chunk_size}: must be >= 0 (0 = off), e.g. the "
            "model's dim",
        )
        _need(
            isinstance(self.stages, list),
            "train.stages must be a list of mappings, e.g. [{steps: 100, seq_len: 512}]",
        )


@dataclass
class ParallelSection:
    """How the job is spread over ranks: world = data parallel x sequence parallel."""

    sp: int = 1
    """Sequence-parallel degree in all (Ulysses x ring); consecutive ranks form a group."""
    ring: int = 1
    """Ring-attention degree inside the SP group (sp = ulysses x ring; ring=sp is pure ring).
    Ulysses groups are consecutive ranks (inside a node), ring groups stride across them."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (3 shards parameters too; the model is built already sharded)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    activation_checkpointing: str = "none"
    """none | full (recompute every block) | selective (recompute every other block)."""
    offload_activations: bool = False
    """Keep the checkpointed blocks' inputs in host memory (pinned, copied on a side stream
    and prefetched in the backward on GPU) instead of device memory; needs
    activation_checkpointing full or selective. The host memory it needs is checked against
    /proc/meminfo before the job starts."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16; master weights stay fp32."""
    timeout_s: int = 1800
    """Collective timeout in seconds; a hung rank fails the job after this long."""

    def __post_init__(self) -> None:
        _need(self.sp >= 1, f"parallel.sp must be >= 1, got {self.sp}")
        _need(
            self.ring >= 1 and self.sp % self.ring == 0,
            f"parallel.ring={self.ring} must divide parallel.sp={self.sp} (sp = ulysses x ring)",
        )
        _need(
            self.zero_stage in (0, 1, 2, 3),
            f"parallel.zero_stage must be 0-3, got {self.zero_stage}",
        )
        _need(
            not (self.offload_optimizer and self.zero_stage == 0),
            "parallel.offload_optimizer needs parallel.zero_stage >= 1",
        )
        _need(
            not (self.offload_params and self.zero_stage != 3),
            "parallel.offload_params needs parallel.zero_stage=3",
        )
        _need(
            self.activation_checkpointing in AC_MODES,
            f"parallel.activation_checkpointing must be one of {', '.join(AC_MODES)}, "
            f"got '{self.activation_checkpointing}'",
        )
        _need(
            not (self.offload_activations and self.activation_checkpointing == "none"),
            "parallel.offload_activations=true needs parallel.activation_checkpointing=full or "
            "selective: only the inputs of checkpointed blocks are offloaded",
        )
        _need(
            self.dtype in DTYPES,
            f"parallel.dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'",
        )
        _need(self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s}: must be > 0 seconds")


@dataclass
class CheckpointSection:
    """When checkpoints are written and where a run continues from."""

    interval: int = 1000
    """Save every this many steps (and always at the end); 0 = only at the end."""
    keep: int = 3
    """Committed checkpoints to keep (>= 2); older ones are deleted after a new one commits."""
    resume: str = "auto"
    """auto (latest committed checkpoint in run_dir, if any) | never | PATH to one checkpoint."""
    async_save: bool = False
    """Copy the state to CPU memory at the save and write, hash and commit it from a background
    thread while training goes on (the files equal a synchronous save's). Costs host memory of
    one rank's shards; the next save and the end of the run wait for it to commit."""
    preempt_deadline_s: float = 300.0
    """After SIGTERM/SIGUSR1 (any rank), the ranks stop at the next step, save and exit 0; a
    process still alive this many seconds after the signal exits with code 124 (the previous
    committed checkpoint stays the latest). Keep it below the scheduler's grace period."""

    def __post_init__(self) -> None:
        _need(self.interval >= 0, "checkpoint.interval must be >= 0")
        _need(
            self.keep >= 2,
            f"checkpoint.keep={self.keep}: keep at least 2 (a new checkpoint may be torn)",
        )
        _need(
            self.preempt_deadline_s > 0 and math.isfinite(self.preempt_deadline_s),
            f"checkpoint.preempt_deadline_s={self.preempt_deadline_s}: must be > 0 seconds (e.g. "
            "300; below the scheduler's grace period between its signal and SIGKILL)",
        )
        _need(bool(self.resume), "checkpoint.resume must be auto, never or a checkpoint path")


@dataclass
class LogSection:
    """What is reported, how often, and where."""

    interval: int = 10
    """Write a metrics row every this many steps."""
    eval_interval: int = 100
    """Validation loss/perplexity every this many steps (and at the start and end); 0 = never."""
    long_eval_interval: int = 0
    """Long-context eval every this many steps (and at the end); 0 = off. Logs validation loss
    per position bucket (``long_eval/loss_0-1K``, ...) to metrics.jsonl and TensorBoard; see
    ``longtrain.train.eval.validator.long_eval``."""
    long_eval_bucket: int = 1024
    """Positions per bucket of the long-context eval (``loss_0-1K`` covers positions 0-1023)."""
    long_eval_passkey: list = field(default_factory=list)
    """Context lengths (each <= data.seq_len) at which the long-context eval also measures
    passkey retrieval accuracy (``long_eval/passkey_<len>``), e.g. ``[8192, 32768]``; [] = none."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tb/."""
    wandb: bool = False
    """Also log to Weights & Biases if wandb is installed (honours WANDB_MODE=offline)."""
    wandb_project: str = "longtrain"
    """W&B project name."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""

    def __post_init__(self) -> None:
        _need(self.interval >= 1, "log.interval must be >= 1")
        _need(self.eval_interval >= 0, "log.eval_interval must be >= 0")
        _need(self.long_eval_interval >= 0, "log.long_eval_interval must be >= 0 (0 = off)")
        _need(self.long_eval_bucket >= 1, "log.long_eval_bucket must be >= 1")
        _need(
            isinstance(self.long_eval_passkey, list)
            and all(type(n) is int and n > 0 for n in self.long_eval_passkey),
            f"log.long_eval_passkey={self.long_eval_passkey!r}: expected a list of positive "
            "context lengths, e.g. [2048]",
        )


@dataclass
class EarlyStoppingSection:
    """Stop when the validation loss stops improving (``patience: 0`` = off)."""

    patience: int = 0
    """Evaluations without an improvement of at least ``min_delta`` before the whole run stops;
    0 = off. The count restarts at each stage (losses at another seq_len do not compare)."""
    min_delta: float = 0.0
    """Smallest decrease of the validation loss that counts as an improvement."""

    def __post_init__(self) -> None:
        _need(self.patience >= 0, "finetune.early_stopping.patience must be >= 0 (0 = off)")
        _need(
            self.min_delta >= 0 and math.isfinite(self.min_delta),
            f"finetune.early_stopping.min_delta={self.min_delta}: must be a number >= 0",
        )


@dataclass
class FinetuneSection:
    """What a ``longtrain finetune`` run trains (``longtrain pretrain`` refuses the task and
    LoRA settings: it trains a language model from scratch)."""

    task: str = "lm"
    """``lm``: next-token loss on data.dir (pretraining data for context extension, ``prepare
    --sft`` data for SFT: the loader masks non-assistant targets). ``classify``: a linear head
    on the last token; data.dir holds train.jsonl / val.jsonl of {"text", "label"}."""
    num_labels: int = 2
    """classify only: number of classes (labels are ints in [0, num_labels))."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=0))
    """Low-rank adapters (``rank: 0`` = off, every weight trains; see ``longtrain.model.lora``)."""
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    """Early stopping on validation loss; the best model is kept in run_dir/best/."""
    stages: list = field(default_factory=list)
    """The same as ``train.stages`` (the spelling of earlier fine-tuning configs); set one."""

    def __post_init__(self) -> None:
        _need(
            self.task in TASKS,
            f"finetune.task must be one of {', '.join(TASKS)}, got '{self.task}'",
        )
        _need(
            self.task != "classify" or self.num_labels >= 2,
            f"finetune.num_labels must be >= 2, got {self.num_labels}",
        )


@dataclass
class JobConfig:
    """A whole training job. Field names are a contract: presets, tests and users rely on them."""

    model: ModelSection = field(default_factory=ModelSection)
    """The network."""
    data: DataSection = field(default_factory=DataSection)
    """The tokens."""
    train: TrainSection = field(default_factory=TrainSection)
    """The optimisation."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """The distribution over ranks."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Saving and resuming."""
    log: LogSection = field(default_factory=LogSection)
    """Reporting."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    """Fine-tuning: task, LoRA, early stopping (``longtrain finetune``)."""
    run_dir: str = "runs/default"
    """Output directory: config.yaml, metrics.jsonl, tb/, checkpoints/, loss_curve.png."""
    seed: int = 0
    """Seed for initialisation and the data order."""

    def __post_init__(self) -> None:
        _need(bool(self.run_dir), "run_dir must not be empty")
        _need(
            not (self.train.stages and self.finetune.stages),
            "train.stages and finetune.stages are the same setting; keep one (train.stages)",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of built-in types (what is written to run_dir/config.yaml)."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> JobConfig, with type checks that name the key.


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check/convert one leaf value against its annotated type; errors name the key."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise LongtrainError(
                f"{where}: '{key}' must be a mapping of {sorted(typing.get_type_hints(typ))}, "
                f"got {type(value).__name__}"
            )
        return _build(typ, value, f"{key}.", where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise LongtrainError(f"{where}: '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LongtrainError(f"{where}: '{key}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-4" as a string; people write learning rates that way.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise LongtrainError(f"{where}: '{key}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LongtrainError(f"{where}: '{key}' must be a string, got {value!r}")
    if typ is dict or typing.get_origin(typ) is dict:
        if isinstance(value, dict):
            return dict(value)
        raise LongtrainError(f"{where}: '{key}' must be a mapping, got {value!r}")
    if typ is list or typing.get_origin(typ) in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise LongtrainError(f"{where}: '{key}' must be a list, got {value!r}")
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in hints]
    if unknown:
        k = unknown[0]
        raise LongtrainError(
            f"{where}: unknown config key '{prefix}{k}'; valid keys under "
            f"'{prefix or 'top level'}' are: {', '.join(sorted(hints))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", where) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set ``a.b.c = value`` in a nested dict; only dict-typed fields may take new sub-keys."""
    parts = dotted.split(".")
    node = tree
    cls: Any = JobConfig
    for i, part in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if cls is not None and part not in hints:
            raise LongtrainError(
                f"{where}: unknown config key '{'.'.join(parts[: i + 1])}'; valid keys are: "
                f"{', '.join(sorted(hints))}"
            )
        nxt = hints.get(part) if cls is not None else None
        cls = nxt if dataclasses.is_dataclass(nxt) else None
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LongtrainError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a mapping")
    if cls is not None and parts[-1] not in typing.get_type_hints(cls):
        raise LongtrainError(
            f"{where}: unknown config key '{dotted}'; valid keys are: "
            f"{', '.join(sorted(typing.get_type_hints(cls)))}"
        )
    node[parts[-1]] = value


def load_job(path: str | os.PathLike | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file (or none: defaults) and apply ``key.sub=value`` overrides.

    Override values are parsed as YAML scalars (``train.lr=1e-4``, ``log.wandb=true``,
    ``model.overrides.n_layers=2``), never evaluated.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise LongtrainError(f"--config {path}: no such file; presets are in launch/configs/")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise LongtrainError(f"{path}:{line} is not valid YAML ({e.__class__.__name__})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise LongtrainError(f"{path}: the top level must be a mapping of config sections")
        raw = loaded
    for ov in overrides or []:
        if "=" not in ov:
            raise LongtrainError(f"override '{ov}': expected key.sub=value, e.g. train.steps=100")
        key, _, text = ov.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise LongtrainError(f"override '{ov}': value is not a valid YAML scalar") from e
        _set_path(raw, key.strip(), value, f"override '{ov}'")
    where = str(path) if path is not None else "config"
    return _build(JobConfig, raw, "", where)


# ----------------------------------------------------------------------------------------------
# Validation against the command, the world and the data, before any process group exists.


def read_manifest(data_dir: str) -> dict[str, Any]:
    """The data directory's manifest.json, or a one-line error naming data.dir and the fix."""
    if not data_dir:
        raise LongtrainError(
            "data.dir is not set; run `longtrain prepare` and pass data.dir=DIR (or data.mix)"
        )
    return load_manifest(data_dir)


def data_dirs(job: JobConfig, stages: list[Stage] | None = None) -> list[str]:
    """Every data directory the job reads (``data.dir``, or the sources of every mixture)."""
    mixes = [job.data.mix] + [st.mix for st in stages or [] if st.mix]
    dirs = [str(m["dir"]) for mix in mixes for m in mix or []]
    return list(dict.fromkeys(dirs)) if dirs else [job.data.dir]


def job_manifest(job: JobConfig, stages: list[Stage] | None = None) -> dict[str, Any]:
    """The manifest that describes the job's tokens (vocabulary, tokenizer hash): the one of
    ``data.dir``, or of the first mixture source once every source is checked to have been
    prepared with one tokenizer (the error names the source that differs)."""
    mixes = [("data.mix", job.data.mix)] + [(f"{st.where}.mix", st.mix) for st in stages or []]
    want = None
    for where, mix in mixes:
        if mix:
            want = check_mix_tokenizers(mix, want, where)
    return read_manifest(data_dirs(job, stages)[0])


def resolve_model_config(job: JobConfig, manifest: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig a from-scratch job trains: flavor + overrides, vocab from the data,
    max_seq_len >= seq_len."""
    overrides = dict(job.model.overrides)
    if manifest is not None and "vocab_size" not in overrides and "vocab_size" in manifest:
        overrides["vocab_size"] = int(manifest["vocab_size"])
    try:
        cfg = get_flavor(job.model.flavor, **overrides)
    except LongtrainError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise LongtrainError(
            f"model.flavor={job.model.flavor} with model.overrides={overrides}: {e}"
        ) from e
    if cfg.max_seq_len < job.data.seq_len:
        if "max_seq_len" in overrides:
            raise LongtrainError(
                f"model.overrides.max_seq_len={cfg.max_seq_len} is below data.seq_len="
                f"{job.data.seq_len}; raise it or lower data.seq_len"
            )
        cfg = get_flavor(job.model.flavor, **{**overrides, "max_seq_len": job.data.seq_len})
    return cfg


def apply_init_overrides(job: JobConfig, cfg: ModelConfig) -> ModelConfig:
    """The initial model's config with ``model.overrides`` applied (RoPE and length only)."""
    bad = sorted(
        k
        for k, v in job.model.overrides.items()
        if k not in ROPE_FIELDS and getattr(cfg, k, v) != v
    )
    if bad:
        raise LongtrainError(
            f"model.overrides.{bad[0]}: the shape comes from model.init={job.model.init}; only "
            f"{', '.join(ROPE_FIELDS)} may be overridden when fine-tuning"
        )
    return cfg.replace(**{k: v for k, v in job.model.overrides.items() if k in ROPE_FIELDS})


def check_sp(
    cfg: ModelConfig, sp: int, world_size: int, seq_len: int, key: str, ring: int = 1
) -> None:
    """The sequence-parallel rules for one degree ``sp`` with ``ring`` ring ranks inside it
    (``key`` names the setting): ring divides sp, sp/ring (the Ulysses degree) divides the
    heads, and the window splits evenly -- into 2 x ring zigzag chunks, each cut over the
    Ulysses ranks, when ring > 1 (documents need no padding; only the window length)."""
    if world_size % sp != 0:
        raise LongtrainError(
            f"{key}={sp} does not divide the world size {world_size}; use an sp that "
            "divides the number of processes"
        )
    if ring < 1 or sp % ring:
        raise LongtrainError(
            f"parallel.ring={ring} does not divide {key}={sp}; sp = ulysses x ring, so pick a "
            f"ring degree dividing {sp}"
        )
    problem = sp_layout_problem(cfg.n_heads, cfg.n_kv_heads, sp, ring)
    if problem:
        raise LongtrainError(f"{key}={sp} {problem}")
    if seq_len % sp != 0:
        raise LongtrainError(
            f"data.seq_len={seq_len} is not divisible by {key}={sp}; use a multiple of {sp}"
        )
    if ring > 1 and seq_len % (2 * sp):
        raise LongtrainError(
            f"data.seq_len={seq_len} is not a multiple of 2 x {key} = {2 * sp}: with "
            f"parallel.ring={ring} each window is cut into {2 * ring} zigzag chunks split over "
            f"{sp // ring} Ulysses ranks; use a multiple of {2 * sp}"
        )


def check_command(job: JobConfig, command: str) -> None:
    """What ``longtrain pretrain`` and ``longtrain finetune`` each accept."""
    ft = job.finetune
    if command == "pretrain":
        for key, set_ in (
            ("model.init", bool(job.model.init)),
            ("finetune.task", ft.task != "lm"),
            ("finetune.lora.rank", ft.lora.rank > 0),
        ):
            if set_:
                raise LongtrainError(
                    f"{key} is a fine-tuning setting; `longtrain pretrain` trains from scratch: "
                    "use `longtrain finetune`, or drop it"
                )
    if ft.early_stopping.patience and not job.log.eval_interval:
        raise LongtrainError("finetune.early_stopping needs validation: set log.eval_interval > 0")
    if ft.task == "classify" and job.log.long_eval_interval:
        raise LongtrainError(
            "log.long_eval_interval measures language-model loss; set it to 0 for "
            "finetune.task=classify"
        )


def validate_job(
    job: JobConfig,
    world_size: int,
    check_data: bool = True,
    command: str = "pretrain",
    init_config: ModelConfig | None = None,
) -> ModelConfig:
    """Every check that can fail before a process group exists; returns the base ModelConfig.

    Run on every rank from environment variables only (WORLD_SIZE), so a bad job stops with the
    same one-line message everywhere instead of hanging in a collective. ``init_config`` is the
    config of ``model.init`` (read by the caller through ``longtrain.train.artifacts``); the
    stages are checked one by one (``longtrain.train.stages``).
    """
    check_command(job, command)
    resolve_core_name(job.model.attention)  # an unavailable core fails here, naming the fix
    d = job.data
    manifest = None
    stages = resolve_stages(job)
    if check_data and job.finetune.task == "lm":
        manifest = job_manifest(job, stages)
        if d.tokenizer:
            check_tokenizer_hash(
                str(manifest.get("tokenizer_hash", "")),
                tokenizer_hash(d.tokenizer, "data.tokenizer"),
                f"the data in data.dir {d.dir or data_dirs(job, stages)[0]}",
                f"data.tokenizer {d.tokenizer}",
                f"use {Path(d.dir) / 'tokenizer'} or re-run `longtrain prepare`",
            )
    if init_config is not None:
        cfg = apply_init_overrides(job, init_config)
    else:
        cfg = resolve_model_config(job, manifest)
    if manifest is not None and int(manifest.get("vocab_size", 0)) > cfg.vocab_size:
        what = f"model.init={job.model.init}" if init_config is not None else "the model"
        raise LongtrainError(
            f"{what} has vocab_size={cfg.vocab_size}, smaller than the data's vocabulary "
            f"({manifest['vocab_size']}); drop model.overrides.vocab_size or use another model"
        )
    staged = bool(job.train.stages or job.finetune.stages)
    for st in stages:
        key = f"{st.where}.sp" if staged else "parallel.sp"
        check_sp(stage_model_config(cfg, st), st.sp, world_size, st.seq_len, key, job.parallel.ring)
        if job.train.micro_batch * (world_size // st.sp) * st.grad_accum <= 0:
            raise LongtrainError("train.micro_batch * DP * train.grad_accum must be positive")
    if job.finetune.task == "classify" and len(stages) > 1:
        raise LongtrainError("finetune.task=classify runs one stage; drop train.stages")
    longest = max(s.seq_len for s in stages)
    bad = [n for n in job.log.long_eval_passkey if n > longest]
    if bad:
        raise LongtrainError(
            f"log.long_eval_passkey={job.log.long_eval_passkey!r}: {bad[0]} is above the "
            f"longest window data.seq_len={longest}; use lengths <= {longest}"
        )
    r = job.checkpoint.resume
    if r not in ("auto", "never") and not Path(r).is_dir():
        raise LongtrainError(
            f"checkpoint.resume={r}: no such checkpoint directory; use auto, never or an existing "
            f"run_dir/checkpoints/step_XXXXXXXX"
        )
    if Path(job.run_dir).exists() and not Path(job.run_dir).is_dir():
        raise LongtrainError(f"run_dir={job.run_dir} is a file; pass a directory path")
    return cfg


def check_data(job: JobConfig, stages: list[Stage]) -> None:
    """The data against the job: enough training tokens for the longest window, a validation
    split that holds a window when the job evaluates, in every directory it reads."""
    for d in data_dirs(job, stages):
        _check_split_sizes(job, d, read_manifest(d), stages)


def _check_split_sizes(job: JobConfig, data_dir: str, manifest: dict[str, Any],
                       stages: list[Stage]) -> None:  # fmt: skip
    longest = max(s.seq_len for s in stages)
    splits = manifest.get("splits") or {}

    def tokens(split: str) -> int:
        shards = (splits.get(split) or {}).get("shards") or []
        return sum(int(sh.get("stored_tokens", sh.get("tokens", 0))) for sh in shards)

    have = tokens("train")
    if have < longest + 1:
        raise LongtrainError(
            f"data.dir {data_dir}: the train split has {have} tokens, fewer than one window "
            f"of data.seq_len+1={longest + 1}; lower data.seq_len or prepare more data"
        )
    if job.log.eval_interval or job.log.long_eval_interval:
        val = tokens("val")
        if val < longest + 1:
            raise LongtrainError(
                f"data.dir {data_dir}: the validation split has {val} tokens, fewer than one "
                f"window of data.seq_len+1={longest + 1}; prepare with a larger --val-fraction, "
                "lower data.seq_len, or set log.eval_interval=0"
            )


def save_resolved(job: JobConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to run_dir/config.yaml (what the run actually used)."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    os.replace(tmp, out)
    return out
