"""Sharded training checkpoints you can trust: atomic commit, integrity, exact resume.

:class:`CheckpointManager` is the one place a run's state is saved and restored: the DeepSpeed
engine (weights, optimizer, ZeRO shards), every Stateful part of the trainer (progress, data
loader, curriculum position, early stopping: each with ``state_dict``/``load_state_dict``),
and each rank's RNG. The file layout is in ``longtrain.train.files``.

The commit protocol (:func:`save_checkpoint`): every rank writes its files, hashes them and
drops a marker in ``.pending/``; after a barrier rank 0 gathers the markers into ``COMMIT``
(tmp + fsync + os.replace), and only then moves ``latest`` and prunes old checkpoints. A
process killed at any point leaves either a directory without ``COMMIT`` (ignored by
``find_latest``, which says so) or a complete checkpoint. DeepSpeed's own ``latest`` file is
never written or read.

Trust model: DeepSpeed's loader unpickles with ``weights_only=False``, so :func:`load_checkpoint`
checks every file against ``COMMIT`` (size, sha256, no unlisted files) before anything is
unpickled. That proves integrity, not provenance: load training checkpoints only from runs you
made; bring outside weights in through ``longtrain import-hf``. Our own files are JSON or
loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from longtrain.model.errors import LongtrainError
from longtrain.train.files import (
    CHECKPOINTS,
    CLIENT_STATE,
    COMMIT,
    FORMAT_VERSION,
    LATEST,
    METRICS,
    MODEL_CONFIG,
    PENDING,
    RNG_STATE,
    STEP_RE,
    UNIVERSAL,
    atomic_write_text,
    hash_file,
    is_committed,
    list_checkpoints,
    log,
    rank_world,
    read_client_state,
    resolve_checkpoint,
    step_dirname,
    verify_checkpoint,
)
from longtrain.train.reshard import ensure_universal

# Fault injection for tests: LONGTRAIN_CKPT_FAULT="<point>:<rank>:<step>" SIGKILLs that rank at
# that point of the save of that step (points: after_rank_files, before_commit, after_commit).
FAULT_ENV = "LONGTRAIN_CKPT_FAULT"


class Stateful(Protocol):
    """A part of the trainer whose position a checkpoint records (torch.distributed.checkpoint's
    protocol, with JSON-serialisable dicts)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _fault_point(name: str, rank: int, step: int) -> None:
    """SIGKILL this process here when the fault-injection variable names this point."""
    if os.environ.get(FAULT_ENV) == f"{name}:{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def verify_collectively(path: str | Path) -> None:
    """``verify_checkpoint`` with the hashing split across the ranks (each file is read once
    in total); every rank raises the first failure any rank found. Collective."""
    rank, world = rank_world()
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
        # Only this rank's own device: under srun each task may see one GPU, under torchrun
        # all of them, and a rank only ever draws on the device it trains on.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
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
    cuda = snap.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # format 1 saved every visible device's state
            cuda = (
                cuda[torch.cuda.current_device()]
                if len(cuda) > torch.cuda.current_device()
                else None
            )
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------- save


class _RecordingEngine:
    """Wraps DeepSpeed's checkpoint engine to learn which files this rank writes.

    With ``capture=True`` nothing is written: each state is snapshotted (tensors copied to
    CPU, so training may go on) and written later by the async writer thread. A write that
    fails for lack of space is recorded instead of raised, so that DeepSpeed's own
    collectives inside the save complete on every rank and the ranks then fail together.
    """

    def __init__(self, inner: Any, capture: bool) -> None:
        self._inner, self._capture = inner, capture
        self.paths: list[str] = []
        self.captured: list[tuple[str, Any]] = []
        self.error: str | None = None

    def save(self, state_dict: Any, path: str) -> None:
        self.paths.append(str(path))
        if self._capture:
            self.captured.append((str(path), _snapshot(state_dict)))
        elif self.error is None:
            try:
                self._inner.save(state_dict, path)
            except (OSError, RuntimeError) as e:
                if not is_disk_full(e):
                    raise
                self.error = disk_full_message(Path(path))

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
    return copy.deepcopy(obj)


def is_disk_full(e: BaseException) -> bool:
    """True for the ways a write reports a full filesystem (or quota): ENOSPC/EDQUOT, and
    torch.save's ``inline_container.cc ... unexpected pos`` (its writer hides the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or ("inline_container" in text and "unexpected pos" in text)


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def disk_full_message(file: Path) -> str:
    """One line: which filesystem is full, what was being written, how much a save needs."""
    mount = _mount_point(Path(file))
    free = shutil.disk_usage(mount).free
    root = Path(file).parent.parent  # run_dir/checkpoints
    sizes = []
    for _s, p, committed in list_checkpoints(root.parent):
        if committed:
            marker = json.loads((p / COMMIT).read_text())
            sizes.append(sum(int(f["size"]) for f in marker["files"].values()))
    need = f"~{sizes[-1] / 1e9:.2f} GB per checkpoint" if sizes else "the size of one checkpoint"
    return (
        f"no space left on {mount} while writing {file} (a save needs {need}, {free / 1e9:.2f} GB "
        "free); free space or point run_dir at a larger filesystem, then resume: the previous "
        "committed checkpoint is intact"
    )


def _all_or_none(fn: Any) -> None:
    """Run ``fn`` on every rank; if it fails on any rank (disk full, a LongtrainError), every
    rank raises that rank's one-line message instead of some ranks waiting in a barrier."""
    _, world = rank_world()
    err: str | None = None
    try:
        fn()
    except LongtrainError as e:
        err = str(e)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        err = disk_full_message(Path(getattr(e, "filename", None) or _writing["file"] or "."))
    if world > 1:
        errs: list[str | None] = [None] * world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise LongtrainError(err)


_writing: dict[str, str | None] = {"file": None}
"""The file the checkpoint writer is writing now (named when the disk fills up)."""

_pending: dict[str, Any] = {"thread": None, "error": None}


def wait_for_pending_save() -> None:
    """Block until an asynchronous save has committed; re-raises its error, if any."""
    t = _pending["thread"]
    if t is not None:
        t.join()
        _pending["thread"] = None
    err, _pending["error"] = _pending["error"], None
    if isinstance(err, LongtrainError):
        raise LongtrainError(f"asynchronous checkpoint save failed: {err}") from None
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
    extra_files: dict[str, dict] | None = None,
) -> Path:
    """Save a sharded checkpoint of ``engine`` at ``step``; every rank must call this.

    ``client_state`` (JSON-serialisable: loader state, step, resolved config, tokenizer hash)
    is written by rank 0, with ``model_config`` and ``extra_files`` (name -> JSON object, e.g.
    ``lora_config.json``); RNG states are saved per rank here. With ``async_save`` the state is
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

    rank, world = rank_world()
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
        # A run never skips its own save: a committed directory of this step belongs to
        # another lineage (the trainer refuses or sets aside such checkpoints before it starts).
        raise LongtrainError(
            f"{path} is already committed by another run; this run's step {step} cannot be "
            "saved there: use a new run_dir or resume with checkpoint.resume=auto"
        )

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
        if rec.error:
            raise LongtrainError(rec.error)
        for p, state in rec.captured:
            _writing["file"] = p
            torch.save(state, p)
        mine = [Path(p) for p in rec.paths]
        rng_path = path / RNG_STATE.format(rank=rank)
        _writing["file"] = str(rng_path)
        torch.save(rng, rng_path)
        mine.append(rng_path)
        if rank == 0:
            (path / CLIENT_STATE).write_text(state_text)
            (path / MODEL_CONFIG).write_text(json.dumps(model_config, sort_keys=True, indent=1))
            mine += [path / CLIENT_STATE, path / MODEL_CONFIG]
            for name, obj in (extra_files or {}).items():
                (path / name).write_text(json.dumps(obj, sort_keys=True, indent=1))
                mine.append(path / name)
        _fault_point("after_rank_files", rank, step)
        entries = {p.relative_to(path).as_posix(): hash_file(p) for p in mine}
        (path / PENDING).mkdir(exist_ok=True)
        atomic_write_text(path / PENDING / f"rank_{rank:05d}.json", json.dumps(entries))

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
        atomic_write_text(path / COMMIT, json.dumps(body, sort_keys=True, indent=1))
        _fault_point("after_commit", rank, step)
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(run_dir, keep)

    if not async_save:
        _all_or_none(write_and_commit)
        _all_or_none(lambda: commit(wait_s=60.0) if rank == 0 else None)
        return path

    def run() -> None:
        try:
            write_and_commit()
            if rank == 0:
                commit(wait_s=commit_timeout_s)
        except BaseException as e:  # reported by wait_for_pending_save
            if isinstance(e, (OSError, RuntimeError)) and is_disk_full(e):
                e = LongtrainError(disk_full_message(Path(_writing["file"] or path)))
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
        shutil.rmtree(p.parent / UNIVERSAL / p.name, ignore_errors=True)


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
    rank, _ = rank_world()
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
    rank, _ = rank_world()
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


# ----------------------------------------------------------------------------- manager


def client_parts(state: dict[str, Any]) -> dict[str, Any]:
    """The Stateful parts' states of a client state, from either format.

    Format 1 (earlier checkpoints) kept the trainer's fields flat; they map onto the parts of
    format 2 so such checkpoints still resume.
    """
    if "parts" in state:
        return dict(state["parts"])
    return {
        "progress": {
            "step": int(state.get("step", 0)),
            "tokens_seen": int(state.get("tokens_seen", 0)),
        },
        "loader": state.get("loader"),
        "early_stop": state.get("early_stop"),
    }


class CheckpointManager:
    """Saves and restores a run: the engine, its Stateful parts and each rank's RNG.

    ``parts`` maps a name to an object with ``state_dict``/``load_state_dict``; the manager
    builds the client state from them (nothing else writes it), adds what resuming checks
    (the resolved job, the tokenizer hash, the world it was saved with) and hands the files
    to :func:`save_checkpoint`'s commit protocol.
    """

    def __init__(
        self,
        run_dir: str | Path,
        job: dict[str, Any],
        tokenizer_hash: str | None,
        keep: int,
        async_save: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.job, self.tokenizer_hash = job, tokenizer_hash
        self.keep, self.async_save = keep, async_save
        self.meta = dict(meta or {})
        """Fixed JSON fields every client state carries (e.g. the task head's pad id)."""

    def save(
        self,
        engine: Any,
        step: int,
        parts: dict[str, Stateful],
        model_config: dict[str, Any],
        extra_files: dict[str, dict] | None = None,
    ) -> Path:
        """Commit a checkpoint of ``engine`` and every part at ``step`` (collective)."""
        _, world = rank_world()
        state = {
            "parts": {name: part.state_dict() for name, part in parts.items()},
            "config": self.job,
            "tokenizer_hash": self.tokenizer_hash,
            "world_size": world,
            **self.meta,
        }
        wait_for_pending_save()  # an async save in flight commits before the next one
        return save_checkpoint(
            engine,
            self.run_dir,
            step,
            state,
            model_config,
            keep=self.keep,
            async_save=self.async_save,
            extra_files=extra_files,
        )

    def load(
        self,
        engine: Any,
        path: str | Path,
        parts: dict[str, Stateful],
        model_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Verify and load ``path`` into ``engine`` and every part that has saved state.

        The RNG is not restored here: the caller does it right before its first step
        (:func:`restore_rng_state`), after whatever start-up work draws random numbers.
        Returns the checkpoint's client state.
        """
        state = load_checkpoint(
            engine,
            path,
            load_optimizer=True,
            model_config=model_config,
            tokenizer_hash=self.tokenizer_hash,
            restore_rng=False,
        )
        saved = client_parts(state)
        for name, part in parts.items():
            if saved.get(name) is not None:
                part.load_state_dict(saved[name])
        return state


# ----------------------------------------------------------------------------- lineage


ABANDONED = "abandoned"
"""``checkpoints/abandoned/``: checkpoints newer than the one a run was resumed from."""


def _has_run(run_dir: Path) -> list[str]:
    found = [p.name for _s, p, _c in list_checkpoints(run_dir)]
    if (run_dir / METRICS).is_file():
        found.append(METRICS)
    return found


def check_lineage(run_dir: str | Path, resume: str) -> None:
    """Refuse a resume setting that would mix two runs in one run directory.

    One run directory holds one lineage of checkpoints and metrics. ``never`` in a directory
    that already holds a run, or a checkpoint of another directory resumed into one that has
    its own, would save, prune and log across both: refused, naming the fix. Runs on every
    rank before any process group (it only reads the filesystem).
    """
    run_dir = Path(run_dir)
    used = _has_run(run_dir)
    if not used:
        return
    if resume == "never":
        raise LongtrainError(
            f"run_dir {run_dir} already holds a run ({', '.join(used[:3])}); "
            "checkpoint.resume=never would mix two runs in it: pass a new run_dir, or "
            "checkpoint.resume=auto to continue that run"
        )
    if resume not in ("auto", "never"):
        src = resolve_checkpoint(resume).resolve()
        if src.parent != (run_dir / CHECKPOINTS).resolve():
            raise LongtrainError(
                f"checkpoint.resume={resume} belongs to another run, and run_dir {run_dir} "
                f"already holds one ({', '.join(used[:3])}): resume into a new run_dir"
            )


def set_aside_future(run_dir: str | Path, resumed_from: Path) -> list[Path]:
    """Move the checkpoints newer than ``resumed_from`` into ``checkpoints/abandoned/``.

    Resuming from an older checkpoint of a run abandons the steps after it; their directories
    (committed or not, intact or corrupt) must neither be pruned in place of the one resumed
    from nor be mistaken for the newest state later. Nothing is deleted. Rank 0 only.
    """
    root = Path(run_dir) / CHECKPOINTS
    if Path(resumed_from).resolve().parent != root.resolve():
        return []
    step = int(STEP_RE.match(Path(resumed_from).name).group(1))  # type: ignore[union-attr]
    moved = []
    for s, path, _committed in list_checkpoints(run_dir):
        if s <= step:
            continue
        dest = root / ABANDONED / path.name
        n = 1
        while dest.exists():
            dest, n = root / ABANDONED / f"{path.name}.{n}", n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        shutil.rmtree(root / UNIVERSAL / path.name, ignore_errors=True)
        log.warning(
            "resuming from %s: the newer checkpoint %s belongs to an abandoned future; moved to %s",
            resumed_from.name,
            path.name,
            dest,
        )
        moved.append(dest)
    latest = root / LATEST
    if moved and latest.is_file():
        atomic_write_text(latest, Path(resumed_from).name + "\n")
    return moved
