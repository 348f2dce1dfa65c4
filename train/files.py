"""The files of a run and the primitives that make them trustworthy.

Every file name longtrain reads or writes is defined here once (the run directory, the
checkpoint layout, model-only directories), with the integrity primitives built on them:
atomic writes, content hashes, the commit marker of a checkpoint and its verification, and
finding the newest complete checkpoint of a run. The checkpoint manager
(``longtrain.train.checkpoint``), resharding (``longtrain.train.reshard``), the artifact loader
(``longtrain.train.artifacts``) and export (``longtrain.train.export``) all build on it.

Layout of one run::

    run_dir/
      config.yaml  deepspeed_config.json  metrics.jsonl  commands.jsonl  tb/  loss_curve.png
      final/  best/                     # model-only directories (fine-tuning outputs)
      checkpoints/
        step_00000100/                  # one checkpoint; complete only once COMMIT exists
          mp_rank_00_model_states.pt    # DeepSpeed's files
          zero_pp_rank_R_mp_rank_00_optim_states.pt
          client_state.json             # the trainer's Stateful parts (JSON)
          rng_state_rankRRRRR.pt        # python/numpy/torch RNG of each rank (weights_only)
          model_config.json             # ModelConfig.to_dict()
          COMMIT                        # every file above with size + sha256, written last
        latest                          # "step_00000100", moved only after COMMIT
        universal/step_00000100/        # DeepSpeed universal checkpoint, made when resharding

A model-only directory holds ``model_config.json`` + ``model.safetensors`` (longtrain names),
plus ``lora_config.json`` / ``head_config.json`` / ``source.json`` when they apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from longtrain.model.errors import LongtrainError

log = logging.getLogger("longtrain.train.checkpoint")

CONFIG_YAML = "config.yaml"
DEEPSPEED_CONFIG = "deepspeed_config.json"
METRICS = "metrics.jsonl"
COMMANDS = "commands.jsonl"
"""One line per invocation of a run: its ``longtrain`` command, world size and start step."""
CHECKPOINTS = "checkpoints"
UNIVERSAL = "universal"
COMMIT = "COMMIT"
LATEST = "latest"
PENDING = ".pending"
CLIENT_STATE = "client_state.json"
MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
LORA_CONFIG = "lora_config.json"
HEAD_CONFIG = "head_config.json"
SOURCE = "source.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
EXPORT_MARKER = "longtrain_export.json"
"""Written last into every transformers directory longtrain exports (what it came from)."""
MODEL_CARD = "README.md"
"""The model card of a transformers export (what the Hub shows)."""
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
"""The two files of a PEFT adapter directory (the names peft's ``save_pretrained`` uses)."""
TOKENIZER_DIR = "tokenizer"
RNG_STATE = "rng_state_rank{rank:05d}.pt"
FORMAT_VERSION = 2
"""Client-state format: 1 = flat keys (step, tokens_seen, loader, ...), 2 = Stateful parts."""
STEP_RE = re.compile(r"^step_(\d{8})$")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Rank0Filter(logging.Filter):
    """Job-level notices are the same on every rank: print them once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return rank_world()[0] == 0 or getattr(record, "every_rank", False)


log.addFilter(_Rank0Filter())


def read_json(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from ``path``, or one clear error naming the file."""
    if not path.is_file():
        raise LongtrainError(f"{path}: file not found{what}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongtrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LongtrainError(f"{path}: expected a JSON object")
    return d


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, after making its bytes durable (the commit vouches for them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def step_dirname(step: int) -> str:
    """``step_00000042``: eight digits so that names sort like steps."""
    return f"step_{int(step):08d}"


def is_committed(path: str | Path) -> bool:
    """True when ``path`` holds a readable commit marker (the checkpoint is complete)."""
    try:
        json.loads((Path(path) / COMMIT).read_text())
        return True
    except (OSError, ValueError):
        return False


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, committed)`` for every ``step_XXXXXXXX`` directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, is_committed(p)))
    return sorted(out)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint of a run, or None; logs every incomplete one it skips.

    The commit marker is the truth: a newer committed directory wins even if a kill between
    the commit and the ``latest`` move left the pointer behind (that is logged too).
    """
    ckpts = list_checkpoints(run_dir)
    found: Path | None = None
    for _step, path, committed in reversed(ckpts):
        if committed:
            found = path
            break
        log.warning(
            "checkpoint %s is incomplete (no %s marker: its save was interrupted); skipping it",
            path,
            COMMIT,
        )
    if found is None:
        return None
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named != found.name:
        log.warning(
            "'%s' names %s, but the newest committed checkpoint is %s", pointer, named, found.name
        )
    skipped = [p.name for s, p, c in ckpts if not c and s > int(found.name[5:])]
    if skipped:
        log.warning(
            "resuming from the previous complete checkpoint %s (skipped %s)", found, skipped
        )
    return found


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either a checkpoint directory or a run directory."""
    p = Path(path)
    if (p / COMMIT).exists():
        return p
    if (p / CHECKPOINTS).is_dir():
        latest = find_latest(p)
        if latest is None:
            raise LongtrainError(
                f"{p}: run directory has no committed checkpoint under {CHECKPOINTS}/"
            )
        return latest
    if STEP_RE.match(p.name) and p.is_dir():
        raise LongtrainError(
            f"{p}: checkpoint is incomplete (no {COMMIT} marker; its save was interrupted): "
            "use the previous checkpoint or the run directory"
        )
    raise LongtrainError(
        f"{p}: not a checkpoint or run directory (expected {COMMIT} or {CHECKPOINTS}/)"
    )


def verify_checkpoint(path: str | Path, part: tuple[int, int] | None = None) -> dict[str, Any]:
    """Check every file of a checkpoint against its COMMIT marker; returns the marker.

    Raises LongtrainError naming the file when one is missing, truncated (size), altered
    (sha256) or not listed. Runs before anything in the directory is unpickled. With
    ``part=(i, n)`` only every n-th file's hash is checked (sizes and the listing always are),
    so that n ranks share the reading; see :func:`verify_collectively`.
    """
    path = Path(path)
    try:
        marker = json.loads((path / COMMIT).read_text())
        files: dict[str, dict[str, Any]] = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LongtrainError(
            f"{path / COMMIT}: missing or unreadable commit marker ({e})"
        ) from None
    for i, (rel, want) in enumerate(sorted(files.items())):
        f = path / rel
        if not f.is_file():
            raise LongtrainError(f"{f}: listed in {COMMIT} but missing; the checkpoint is damaged")
        size = f.stat().st_size
        if size != want["size"]:
            raise LongtrainError(
                f"{f}: size {size} bytes, {COMMIT} says {want['size']} (truncated or altered); "
                "resume from another checkpoint"
            )
        if part is not None and i % part[1] != part[0]:
            continue
        if hash_file(f)["sha256"] != want["sha256"]:
            raise LongtrainError(
                f"{f}: sha256 differs from {COMMIT} (altered or corrupt); resume from another checkpoint"
            )
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and rel != COMMIT and rel not in files:
            raise LongtrainError(
                f"{f}: file not listed in {COMMIT}; remove it or use another checkpoint"
            )
    return marker


def read_client_state(path: str | Path) -> dict[str, Any]:
    """The trainer's client state of a checkpoint (JSON; no verification, nothing unpickled)."""
    return json.loads((Path(path) / CLIENT_STATE).read_text())
