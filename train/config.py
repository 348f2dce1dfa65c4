"""Job configuration: what a training run does, read from YAML plus ``key.sub=value`` overrides.

A :class:`JobConfig` is a tree of small dataclasses (model, data, train, parallel, checkpoint,
log) with a docstring per field. Files are read with ``yaml.safe_load`` and nothing is ever
evaluated as code. Every mistake a user can make in a config -- an unknown key, a wrong type, a
combination that cannot run -- raises :class:`LongtrainError` with one line that names the key
and the fix, and :func:`validate_job` runs before any process group exists, so a bad job fails
in seconds instead of after the cluster has been booked and the model built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtrain.model.errors import LongtrainError
from longtrain.train.finetune_config import FinetuneSection

SCHEDULES = ("cosine", "wsd", "constant")
AC_MODES = ("none", "full", "selective")
DTYPES = ("auto", "fp32", "bf16")


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


@dataclass
class DataSection:
    """Where the tokens come from and how they are cut into windows."""

    dir: str = ""
    """Data directory written by ``longtrain prepare`` (holds manifest.json and the tokenizer)."""
    seq_len: int = 2048
    """Tokens per training window (the full sequence, before sequence-parallel sharding)."""
    attention: str = "document"
    """``document``: attention stays within each packed document; ``causal``: one causal window."""
    tokenizer: str = ""
    """Optional tokenizer directory; it must be the one the data was prepared with (hash check)."""
    val_batches: int = 8
    """Validation micro-batches per rank at each evaluation (0 = every validation window)."""


@dataclass
class TrainSection:
    """The optimisation: steps, batch, learning rate schedule, AdamW."""

    steps: int = 100
    """Optimizer steps to run (the total, counting steps done before a resume)."""
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
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    max_bad_steps: int = 5
    """Stop the run after this many NaN/Inf losses in a row (each one skips its update)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked cross-entropy (bounds the fp32 logits memory)."""


@dataclass
class ParallelSection:
    """How the job is spread over ranks: world = data parallel x sequence parallel."""

    sp: int = 1
    """Ulysses sequence-parallel degree; consecutive ranks form a group (keep it within a node)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (3 shards parameters too; the model is built already sharded)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    activation_checkpointing: str = "none"
    """none | full (recompute every block) | selective (recompute every other block)."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16; master weights stay fp32."""
    timeout_s: int = 1800
    """Collective timeout in seconds; a hung rank fails the job after this long."""


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
    ``longtrain.train.evaluate.long_eval``."""
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
    """Fine-tuning: task, LoRA, curriculum stages, early stopping (``longtrain finetune``)."""
    run_dir: str = "runs/default"
    """Output directory: config.yaml, metrics.jsonl, tb/, checkpoints/, loss_curve.png."""
    seed: int = 0
    """Seed for initialisation and the data order."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is written to run_dir/config.yaml)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> JobConfig, with type checks that name the key.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check/convert one leaf value against its annotated type; errors name the key."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise LongtrainError(
                f"{where}: '{key}' must be a mapping of {sorted(_field_types(typ))}, "
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
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, where: str) -> Any:
    hints = _field_types(cls)
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
        hints = _field_types(cls) if cls is not None else {}
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
    if cls is not None and parts[-1] not in _field_types(cls):
        raise LongtrainError(
            f"{where}: unknown config key '{dotted}'; valid keys are: "
            f"{', '.join(sorted(_field_types(cls)))}"
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
    job = _build(JobConfig, raw, "", where)
    check_fields(job)
    return job


def check_fields(job: JobConfig) -> None:
    """Field-level checks that need nothing but the config itself."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise LongtrainError(msg)

    t, p, c, lg, d = job.train, job.parallel, job.checkpoint, job.log, job.data
    need(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    need(
        d.attention in ("document", "causal"),
        f"data.attention must be document or causal, got '{d.attention}'",
    )
    need(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    need(t.micro_batch > 0, f"train.micro_batch must be positive, got {t.micro_batch}")
    need(t.grad_accum > 0, f"train.grad_accum must be positive, got {t.grad_accum}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.warmup >= 0, f"train.warmup must be >= 0, got {t.warmup}")
    need(
        t.schedule in SCHEDULES,
        f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{t.schedule}'",
    )
    need(0 < t.decay_fraction <= 1, "train.decay_fraction must be in (0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
    need(t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1")
    need(p.sp >= 1, f"parallel.sp must be >= 1, got {p.sp}")
    need(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0-3, got {p.zero_stage}")
    need(
        not (p.offload_optimizer and p.zero_stage == 0),
        "parallel.offload_optimizer needs parallel.zero_stage >= 1",
    )
    need(
        not (p.offload_params and p.zero_stage != 3),
        "parallel.offload_params needs parallel.zero_stage=3",
    )
    need(
        p.activation_checkpointing in AC_MODES,
        f"parallel.activation_checkpointing must be one of {', '.join(AC_MODES)}, "
        f"got '{p.activation_checkpointing}'",
    )
    need(p.dtype in DTYPES, f"parallel.dtype must be one of {', '.join(DTYPES)}, got '{p.dtype}'")
    need(c.interval >= 0, "checkpoint.interval must be >= 0")
    need(c.keep >= 2, f"checkpoint.keep={c.keep}: keep at least 2 (a new checkpoint may be torn)")
    need(
        c.preempt_deadline_s > 0,
        f"checkpoint.preempt_deadline_s={c.preempt_deadline_s}: must be > 0 seconds (e.g. 300; "
        "below the scheduler's grace period between its signal and SIGKILL)",
    )
    need(lg.interval >= 1, "log.interval must be >= 1")
    need(lg.eval_interval >= 0, "log.eval_interval must be >= 0")
    need(lg.long_eval_interval >= 0, "log.long_eval_interval must be >= 0 (0 = off)")
    need(lg.long_eval_bucket >= 1, "log.long_eval_bucket must be >= 1")
    need(
        isinstance(lg.long_eval_passkey, list)
        and all(type(n) is int and 0 < n <= d.seq_len for n in lg.long_eval_passkey),
        f"log.long_eval_passkey={lg.long_eval_passkey!r}: expected a list of lengths in "
        f"[1, data.seq_len={d.seq_len}], e.g. [{d.seq_len}]",
    )
    need(bool(job.run_dir), "run_dir must not be empty")


# ----------------------------------------------------------------------------------------------
# Validation against the world and the data, before any process group exists.


def read_manifest(data_dir: str) -> dict[str, Any]:
    """The data directory's manifest.json, or a one-line error naming the directory."""
    if not data_dir:
        raise LongtrainError("data.dir is not set; run `longtrain prepare` and pass data.dir=DIR")
    path = Path(data_dir) / "manifest.json"
    if not Path(data_dir).is_dir():
        raise LongtrainError(
            f"data.dir {data_dir}: no such directory; create it with `longtrain prepare --out {data_dir}`"
        )
    if not path.is_file():
        raise LongtrainError(
            f"data.dir {data_dir}: no manifest.json (not a prepared data directory); "
            "run `longtrain prepare` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongtrainError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e


def _tokenizer_hash(tok_dir: str) -> str:
    meta = Path(tok_dir) / "tokenizer_meta.json"
    if not meta.is_file():
        raise LongtrainError(
            f"data.tokenizer {tok_dir}: no tokenizer_meta.json; pass a directory written by "
            "`longtrain tokenizer`"
        )
    return str(json.loads(meta.read_text()).get("hash", ""))


def resolve_model_config(job: JobConfig, manifest: dict[str, Any] | None = None) -> Any:
    """The ModelConfig this job trains: flavor + overrides, vocab from the data, max_seq_len >= seq_len."""
    from longtrain.model.config import get_flavor

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


def validate_job(job: JobConfig, world_size: int, check_data: bool = True) -> Any:
    """Every check that can fail before a process group exists; returns the ModelConfig.

    Run on every rank from environment variables only (WORLD_SIZE), so a bad job stops with the
    same one-line message everywhere instead of hanging in a collective.
    """
    p, d = job.parallel, job.data
    manifest = read_manifest(d.dir) if check_data else None
    if manifest is not None and d.tokenizer:
        want, have = str(manifest.get("tokenizer_hash", "")), _tokenizer_hash(d.tokenizer)
        if want != have:
            raise LongtrainError(
                f"data.tokenizer {d.tokenizer} (hash {have[:12]}) differs from the tokenizer "
                f"data.dir {d.dir} was prepared with (hash {want[:12]}); use "
                f"{Path(d.dir) / 'tokenizer'} or re-run `longtrain prepare`"
            )
    cfg = resolve_model_config(job, manifest)
    if manifest is not None and int(manifest.get("vocab_size", 0)) > cfg.vocab_size:
        raise LongtrainError(
            f"model vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
            f"({manifest['vocab_size']}); drop model.overrides.vocab_size"
        )
    if world_size % p.sp != 0:
        raise LongtrainError(
            f"parallel.sp={p.sp} does not divide the world size {world_size}; use an sp that "
            f"divides the number of processes"
        )
    if cfg.n_heads % p.sp != 0:
        raise LongtrainError(
            f"parallel.sp={p.sp} does not divide the model's n_heads={cfg.n_heads} "
            f"(flavor {job.model.flavor}); pick sp from the divisors of {cfg.n_heads}"
        )
    kv = cfg.n_kv_heads
    if kv < p.sp and (p.sp % kv != 0 or cfg.n_heads % p.sp != 0):
        raise LongtrainError(
            f"parallel.sp={p.sp} with n_kv_heads={kv}: K/V heads are replicated up to sp, which "
            f"needs sp to be a multiple of n_kv_heads; pick such an sp"
        )
    if kv >= p.sp and kv % p.sp != 0:
        raise LongtrainError(
            f"parallel.sp={p.sp} does not divide n_kv_heads={kv}; pick sp dividing {kv} "
            f"or a multiple of it up to n_heads={cfg.n_heads}"
        )
    if d.seq_len % p.sp != 0:
        raise LongtrainError(
            f"data.seq_len={d.seq_len} is not divisible by parallel.sp={p.sp}; use a multiple "
            f"of {p.sp}"
        )
    dp = world_size // p.sp
    if job.train.micro_batch * dp * job.train.grad_accum <= 0:
        raise LongtrainError("train.micro_batch * DP * train.grad_accum must be positive")
    r = job.checkpoint.resume
    if r not in ("auto", "never") and not Path(r).is_dir():
        raise LongtrainError(
            f"checkpoint.resume={r}: no such checkpoint directory; use auto, never or an existing "
            f"run_dir/checkpoints/step_XXXXXXXX"
        )
    return cfg


def save_resolved(job: JobConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to run_dir/config.yaml (what the run actually used)."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    return out
