"""Sharded training checkpoints you can trust: atomic commit, integrity, exact resume.

Layout of one run (``run_dir/checkpoints/``)::

    step_00000100/                      # one checkpoint; complete only once COMMIT exists
        mp_rank_00_model_states.pt      # DeepSpeed's files (engine.save_checkpoint(root, tag))
        zero_pp_rank_R_mp_rank_00_optim_states.pt
        client_state.json               # ours: trainer state (loader, step, config, tokenizer hash)
        rng_state_rankRRRRR.pt          # ours: python/numpy/torch RNG of each rank (weights_only)
        model_config.json               # ours: ModelConfig.to_dict()
        COMMIT                          # JSON: every file above with size + sha256, written last
    latest                              # "step_00000100", moved (os.replace) only after COMMIT
    universal/step_00000100/            # DeepSpeed universal checkpoint, made when resharding

The commit protocol: every rank writes its files, hashes them and drops a marker in
``.pending/``; after a barrier rank 0 gathers the markers into ``COMMIT`` (tmp + fsync +
os.replace), and only then moves ``latest`` and prunes old checkpoints. A process killed at
any point leaves either a directory without ``COMMIT`` (ignored by :func:`find_latest`, which
says so) or a complete checkpoint. DeepSpeed's own ``latest`` file is never written or read.

Trust model: DeepSpeed's loader unpickles with ``weights_only=False``, so :func:`load_checkpoint`
checks every file against ``COMMIT`` (size, sha256, no unlisted files) before anything is
unpickled. That proves integrity, not provenance: load training checkpoints only from runs you
made; bring outside weights in through ``longtrain import-hf``. Our own files are JSON or
loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longtrain.model.errors import LongtrainError
from longtrain.train.preempt import PreemptionHandler
from longtrain.train.reshard import consolidate_state_dict, ensure_universal, iter_state_dict

__all__ = [
    "PreemptionHandler",
    "consolidate_state_dict",
    "iter_state_dict",
    "save_checkpoint",
    "wait_for_pending_save",
    "find_latest",
    "list_checkpoints",
    "resolve_checkpoint",
    "verify_checkpoint",
    "verify_collectively",
    "check_compatible",
    "load_checkpoint",
    "read_client_state",
    "restore_rng_state",
]

log = logging.getLogger(__name__)


class _Rank0Filter(logging.Filter):
    """Job-level notices are the same on every rank: print them once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank_world()[0] == 0 or getattr(record, "every_rank", False)


log.addFilter(_Rank0Filter())

CHECKPOINTS = "checkpoints"
COMMIT = "COMMIT"
LATEST = "latest"
PENDING = ".pending"
CLIENT_STATE = "client_state.json"
MODEL_CONFIG = "model_config.json"
RNG_STATE = "rng_state_rank{rank:05d}.pt"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")
# Fault injection for tests: LONGTRAIN_CKPT_FAULT="<point>:<rank>:<step>" SIGKILLs that rank at
# that point of the save of that step (points: after_rank_files, before_commit, after_commit).
_FAULT_ENV = "LONGTRAIN_CKPT_FAULT"


# ----------------------------------------------------------------------------- small helpers


def _fault_point(name: str, rank: int, step: int) -> None:
    """SIGKILL this process here when the fault-injection variable names this point."""
    if os.environ.get(_FAULT_ENV) == f"{name}:{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _hash_file(path: Path) -> dict[str, Any]:
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
        m = _STEP_RE.match(p.name)
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
    if _STEP_RE.match(p.name) and p.is_dir():
        raise LongtrainError(
            f"{p}: checkpoint is incomplete (no {COMMIT} marker; its save was interrupted): "
            "use the previous checkpoint or the run directory"
        )
    raise LongtrainError(
        f"{p}: not a checkpoint or run directory (expected {COMMIT} or {CHECKPOINTS}/)"
    )


# ----------------------------------------------------------------------------- integrity


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
        if _hash_file(f)["sha256"] != want["sha256"]:
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


def verify_collectively(path: str | Path) -> None:
    """:func:`verify_checkpoint` with the hashing split across the ranks (each file is read
    once in total); every rank raises the first failure any rank found. Collective."""
    rank, world = _rank_world()
    err: str | None = None
    try:
        verify_checkpoint(path, (rank, world))
    except LongtrainError as e:
        err = str(e)
    if world > 1:
        errs: list[str | None] = [None] * world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise LongtrainError(err)


def read_client_state(path: str | Path) -> dict[str, Any]:
    """The trainer's client state of a checkpoint (JSON; no verification, nothing unpickled)."""
    return json.loads((Path(path) / CLIENT_STATE).read_text())


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}={a!r} in the checkpoint but {b!r} in this run"]


def check_compatible(
    path: str | Path, model_config: dict | None = None, tokenizer_hash: str | None = None
) -> None:
    """Refuse a checkpoint whose model config or tokenizer differs from the run's, by field."""
    path = Path(path)
    if model_config is not None:
        saved = json.loads((path / MODEL_CONFIG).read_text())
        diffs = _diff(saved, json.loads(json.dumps(model_config)), "model")
        if diffs:
            raise LongtrainError(
                f"{path / MODEL_CONFIG}: model config differs: {'; '.join(diffs)}; resume with the "
                "checkpoint's model config or start a new run_dir"
            )
    if tokenizer_hash is not None:
        saved_hash = read_client_state(path).get("tokenizer_hash")
        if saved_hash != tokenizer_hash:
            raise LongtrainError(
                f"{path / CLIENT_STATE}: tokenizer_hash={saved_hash!r} in the checkpoint but "
                f"{tokenizer_hash!r} in this run's data; use the data the run was started with"
            )


# ----------------------------------------------------------------------------- RNG


def _rng_snapshot() -> dict[str, Any]:
    """RNG states as tensors and plain values, so torch.load(weights_only=True) reads them."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    snap = {
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return snap


def _rng_restore(snap: dict[str, Any]) -> None:
    py = snap["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = snap["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(snap["torch"])
    if snap.get("cuda") is not None and torch.cuda.is_available():
        if len(snap["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(snap["cuda"])


# ----------------------------------------------------------------------------- save


class _RecordingEngine:
    """Wraps DeepSpeed's checkpoint engine to learn which files this rank writes.

    With ``capture=True`` nothing is written: each state is snapshotted (tensors copied to
    CPU, so training may go on) and written later by the async writer thread.
    """

    def __init__(self, inner: Any, capture: bool) -> None:
        self._inner, self._capture = inner, capture
        self.paths: list[str] = []
        self.captured: list[tuple[str, Any]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.paths.append(str(path))
        if self._capture:
            self.captured.append((str(path), _snapshot(state_dict)))
        else:
            self._inner.save(state_dict, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _snapshot(obj: Any) -> Any:
    """A deep copy whose tensors live on the CPU and no longer alias training state."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    if isinstance(obj, (int, float, str, bool, bytes, type(None))):
        return obj
    import copy

    return copy.deepcopy(obj)


_pending: dict[str, Any] = {"thread": None, "error": None}


def wait_for_pending_save() -> None:
    """Block until an asynchronous save has committed; re-raises its error, if any."""
    t = _pending["thread"]
    if t is not None:
        t.join()
        _pending["thread"] = None
    err, _pending["error"] = _pending["error"], None
    if err is not None:
        raise LongtrainError(f"asynchronous checkpoint save failed: {err}") from err


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    client_state: dict,
    model_config: dict,
    keep: int,
    async_save: bool = False,
    commit_timeout_s: float = 1800.0,
) -> Path:
    """Save a sharded checkpoint of ``engine`` at ``step``; every rank must call this.

    ``client_state`` (JSON-serialisable: loader state, step, resolved config, tokenizer hash)
    is written by rank 0; RNG states are saved per rank here. With ``async_save`` the state is
    copied to CPU memory now and written, hashed and committed by a background thread while
    training goes on (no collectives run in that thread; ranks meet through marker files).
    Returns the checkpoint directory (complete once :func:`wait_for_pending_save` returns).
    """
    if keep < 2:
        raise LongtrainError(
            f"checkpoint.keep={keep}: keep at least 2 checkpoints (a new one may be torn)"
        )
    wait_for_pending_save()
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    rank, world = _rank_world()
    root = Path(run_dir) / CHECKPOINTS
    tag = step_dirname(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists() and not is_committed(path):
            log.warning("removing incomplete checkpoint %s left by an interrupted save", path)
            shutil.rmtree(path)
    _barrier()
    if is_committed(path):
        log.warning("checkpoint %s already committed; not saving step %d again", path, step)
        return path

    try:
        state_text = json.dumps(client_state, sort_keys=True, indent=1)
    except TypeError as e:
        raise LongtrainError(f"client_state must be JSON-serialisable ({e})") from None
    stage = int(engine.zero_optimization_stage())
    partitions = int(getattr(engine, "seq_dp_world_size", engine.dp_world_size))
    topology = {"world_size": world, "zero_stage": stage, "zero_partitions": partitions}
    full_state = dict(client_state, step=int(step), topology=topology, format=FORMAT_VERSION)
    state_text = json.dumps(full_state, sort_keys=True, indent=1)
    rng = _rng_snapshot()

    # ds_to_universal needs this key in DeepSpeed's own client state to reshard later.
    ds_client = {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        },
        "iteration": int(step),
    }
    rec = _RecordingEngine(engine.checkpoint_engine, capture=async_save)
    engine.checkpoint_engine = rec
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=ds_client, save_latest=False)
    finally:
        engine.checkpoint_engine = rec._inner

    def write_and_commit() -> None:
        for p, state in rec.captured:
            torch.save(state, p)
        mine = [Path(p) for p in rec.paths]
        rng_path = path / RNG_STATE.format(rank=rank)
        torch.save(rng, rng_path)
        mine.append(rng_path)
        if rank == 0:
            (path / CLIENT_STATE).write_text(state_text)
            (path / MODEL_CONFIG).write_text(json.dumps(model_config, sort_keys=True, indent=1))
            mine += [path / CLIENT_STATE, path / MODEL_CONFIG]
        _fault_point("after_rank_files", rank, step)
        entries = {p.relative_to(path).as_posix(): _hash_file(p) for p in mine}
        (path / PENDING).mkdir(exist_ok=True)
        _atomic_write_text(path / PENDING / f"rank_{rank:05d}.json", json.dumps(entries))

    def commit(wait_s: float) -> None:
        files: dict[str, Any] = {}
        deadline = time.monotonic() + wait_s
        for r in range(world):
            marker = path / PENDING / f"rank_{r:05d}.json"
            while not marker.is_file():
                if time.monotonic() > deadline:
                    raise LongtrainError(
                        f"{marker}: rank {r} did not finish its checkpoint files in time"
                    )
                time.sleep(0.2)
            files.update(json.loads(marker.read_text()))
        _fault_point("before_commit", rank, step)
        shutil.rmtree(path / PENDING)
        body = {"format": FORMAT_VERSION, "step": int(step), "world_size": world, "files": files}
        _atomic_write_text(path / COMMIT, json.dumps(body, sort_keys=True, indent=1))
        _fault_point("after_commit", rank, step)
        _atomic_write_text(root / LATEST, tag + "\n")
        _prune(run_dir, keep)

    if not async_save:
        write_and_commit()
        _barrier()
        if rank == 0:
            commit(wait_s=60.0)
        _barrier()
        return path

    def run() -> None:
        try:
            write_and_commit()
            if rank == 0:
                commit(wait_s=commit_timeout_s)
        except BaseException as e:  # reported by wait_for_pending_save
            _pending["error"] = e

    t = threading.Thread(target=run, name=f"ckpt-{tag}", daemon=False)
    _pending["thread"] = t
    t.start()
    return path


def _prune(run_dir: str | Path, keep: int) -> None:
    """Delete committed checkpoints older than the newest ``keep`` committed ones.

    Incomplete directories are never touched here (a concurrent save may own one). The marker
    goes first so that a kill mid-delete leaves an incomplete directory, never a torn "complete"
    one. Derived universal conversions of deleted steps go too.
    """
    committed = [(s, p) for s, p, c in list_checkpoints(run_dir) if c]
    for _, p in committed[:-keep]:
        log.info("keep=%d: deleting old checkpoint %s", keep, p)
        (p / COMMIT).unlink()
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(p.parent / "universal" / p.name, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def load_checkpoint(
    engine: Any,
    path: str | Path,
    load_optimizer: bool = True,
    model_config: dict | None = None,
    tokenizer_hash: str | None = None,
    restore_rng: bool = True,
    convert_timeout_s: float = 3600.0,
) -> dict:
    """Verify, then load a checkpoint into ``engine``; returns the trainer's client state.

    Every file is checked against COMMIT before DeepSpeed unpickles anything; a different
    model config or tokenizer hash is refused by field. When the ZeRO partition count differs
    from the checkpoint's (DP or SP size changed), the checkpoint is converted once to
    DeepSpeed's universal format (rank 0 converts, the others wait) and loaded from there.
    """
    path = resolve_checkpoint(path)
    rank, _ = _rank_world()
    verify_collectively(path)
    check_compatible(path, model_config, tokenizer_hash)
    state = read_client_state(path)
    saved = state.get("topology", {})
    stage = int(engine.zero_optimization_stage())
    partitions = int(getattr(engine, "seq_dp_world_size", engine.dp_world_size))
    reshard = plan_resume(saved, stage, partitions, path)
    load_dir, tag = path.parent, path.name
    cfg = engine._config
    if reshard:
        log.warning(
            "checkpoint %s has %d ZeRO partitions, this run %d: loading through a universal checkpoint",
            path,
            saved["zero_partitions"],
            partitions,
        )
        udir = ensure_universal(path, is_converter=rank == 0, timeout_s=convert_timeout_s)
        verify_collectively(udir)
        load_dir, tag = udir.parent, udir.name
    previous = cfg.load_universal_checkpoint
    # DeepSpeed consults this flag only while loading, so it can be set for this one load.
    cfg.load_universal_checkpoint = reshard
    try:
        loaded, _ = engine.load_checkpoint(
            str(load_dir),
            tag=tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
    finally:
        cfg.load_universal_checkpoint = previous
    if loaded is None:
        raise LongtrainError(f"{path}: DeepSpeed could not load this checkpoint")
    if restore_rng:
        restore_rng_state(path)
    return state


def restore_rng_state(path: str | Path) -> None:
    """Set this rank's python/numpy/torch(/cuda) RNG to the checkpoint's (verified) state.

    :func:`load_checkpoint` does this by default; a trainer that draws random numbers between
    loading and its first step (a benchmark, a warm-up) should load with ``restore_rng=False``
    and call this right before the first step, so that the RNG continues exactly.
    """
    rank, _ = _rank_world()
    rng_file = Path(path) / RNG_STATE.format(rank=rank)
    if not rng_file.is_file():
        log.warning(
            "%s missing (world size changed): using rank 0's RNG state",
            rng_file.name,
            extra={"every_rank": True},
        )
        rng_file = Path(path) / RNG_STATE.format(rank=0)
    _rng_restore(torch.load(rng_file, weights_only=True))


def plan_resume(saved: dict, zero_stage: int, zero_partitions: int, path: str | Path = "") -> bool:
    """True when resuming needs resharding; LongtrainError for combinations we cannot load.

    Pure function of the saved topology and the run's, so the trainer can call it (with
    :func:`read_client_state`) before any engine exists.
    """
    if not saved:
        return False
    s_stage, s_parts = int(saved["zero_stage"]), int(saved["zero_partitions"])
    if s_stage != zero_stage and not {s_stage, zero_stage} <= {1, 2}:
        raise LongtrainError(
            f"{path}: checkpoint was saved with parallel.zero_stage={s_stage}, this run uses "
            f"{zero_stage}; resume with parallel.zero_stage={s_stage} (only 1 <-> 2 can be mixed)"
        )
    if s_parts == zero_partitions or zero_stage == 0:
        return False  # stage 0 keeps full replicas: any DP size reads them as they are
    return True
