"""What the trainer evaluates in its loop: validation loss and the long-context eval.

Every function is collective (all ranks call it with their own slice) and returns the same
numbers on every rank; all of them run without autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longtrain.data.loader import validation_batches
from longtrain.data.mixture import mixture_validation_batches
from longtrain.data.passkey import PasskeySample, passkey_grid
from longtrain.data.tokenizer import Tokenizer
from longtrain.model.errors import LongtrainError
from longtrain.train.engine import forward_loss, to_device
from longtrain.train.eval.passkey import eval_passkey
from longtrain.train.eval.ppl import bucket_label, eval_ppl
from longtrain.train.parallel import all_reduce_sum

if TYPE_CHECKING:
    from longtrain.train.parallel import Topology

# Passkey cells of the in-training eval: few, so a long-context eval stays a small share of a
# step budget (the full grid is `longtrain eval --task passkey`).
TRAIN_PASSKEY_DEPTHS = (0.0, 0.5, 1.0)
TRAIN_PASSKEY_TRIALS = 2


def named_validation_batches(job: Any, topo: Topology) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source name, batch)`` of this rank's validation batches (its DP slice, its SP
    shard): one unnamed source (``""``) for ``data.dir``, every source of ``data.mix``."""
    common = dict(
        seq_len=job.data.seq_len,
        micro_batch=job.train.micro_batch,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        sp_rank=topo.sp_rank,
        sp_size=topo.sp,
        max_batches=job.data.val_batches or None,
        attention=job.data.attention,
        ring=topo.ring,
    )
    if job.data.mix:
        yield from mixture_validation_batches(job.data.mix, **common)
        return
    for batch in validation_batches(job.data.dir, **common):
        yield "", batch


def job_validation_batches(job: Any, topo: Topology) -> Iterator[dict[str, Any]]:
    """This rank's validation batches for the job (every source of a mixture)."""
    for _name, batch in named_validation_batches(job, topo):
        yield batch


@torch.no_grad()
def validation_loss(
    engine: Any, job: Any, topo: Topology, device: torch.device
) -> dict[str, float]:
    """``val_loss`` (mean token loss over the held-out split) and ``val_ppl``, the same on every
    rank; with ``data.mix`` also ``val_loss/<name>`` per source (``val_loss`` is then the mean
    over all their tokens)."""
    engine.eval()
    sums: dict[str, list[float]] = {}
    try:
        for name, batch in named_validation_batches(job, topo):
            loss = forward_loss(engine, to_device(batch, device), job.train.loss_chunk_size)
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(loss)
            acc[1] += float((batch["labels"] != -100).sum())
    finally:
        engine.train()
    names = sorted(sums)
    flat = all_reduce_sum([v for n in names for v in sums[n]], device, topo.world_group)
    total, count = sum(flat[0::2]), sum(flat[1::2])
    if count == 0:
        raise LongtrainError(
            f"data.dir {job.data.dir or job.data.mix}: the validation split has no scored tokens "
            f"at data.seq_len={job.data.seq_len}; prepare with a larger --val-fraction"
        )
    vl = total / count
    row = {"val_loss": vl, "val_ppl": math.exp(min(vl, 50.0))}
    for i, name in enumerate(names):
        if name:
            row[f"val_loss/{name}"] = flat[2 * i] / max(flat[2 * i + 1], 1.0)
    return row


@torch.no_grad()
def long_eval(engine: Any, job: Any, topo: Topology, device: torch.device) -> dict[str, float]:
    """Long-context metrics of the model being trained, the same on every rank.

    Validation loss per position bucket of ``log.long_eval_bucket`` positions over the
    ``data.val_batches`` first validation steps (``long_eval/loss_0-1K``, ...,
    ``long_eval/loss`` overall) and, for each length of ``log.long_eval_passkey``, passkey
    accuracy over a few depths (``long_eval/passkey_8192``). Runs on the engine's sharded,
    Ulysses-wrapped model; every rank must call it (it is collective).
    """
    model = engine.module
    engine.eval()
    try:
        batches = job_validation_batches(job, topo)
        bucket = job.log.long_eval_bucket
        res = eval_ppl(model, batches, job.data.seq_len, bucket, device, topo, progress=False)
        row = {
            f"long_eval/loss_{bucket_label(r['start'], min(r['end'], job.data.seq_len))}": r["loss"]
            for r in res["buckets"]
            if r["loss"] is not None
        }
        row["long_eval/loss"] = res["loss"]
        lengths = list(job.log.long_eval_passkey or [])
        if lengths:
            samples = check_long_eval(job)
            pk = eval_passkey(
                model, samples, lengths, TRAIN_PASSKEY_DEPTHS, device, topo, progress=False
            )
            for n, accs in zip(lengths, pk["accuracy"]):
                row[f"long_eval/passkey_{n}"] = sum(accs) / len(accs)
    finally:
        engine.train()
    return row


_PASSKEY_CACHE: dict[tuple[Any, ...], list[PasskeySample]] = {}


def check_long_eval(job: Any) -> list[PasskeySample]:
    """The in-training passkey samples (built once); raises now if a length cannot hold one.

    The trainer calls this before its first step so that a bad ``log.long_eval_passkey`` fails
    the job at once, not at the first long-context eval hours later.
    """
    lengths = list(job.log.long_eval_passkey or [])
    if not lengths:
        return []
    tok_dir = job.data.tokenizer or str(Path(job.data.dir) / "tokenizer")
    key = (tok_dir, tuple(lengths), job.seed)
    if key not in _PASSKEY_CACHE:
        if not Path(tok_dir).is_dir():
            raise LongtrainError(
                f"log.long_eval_passkey: no tokenizer at {tok_dir}; set data.tokenizer"
            )
        try:
            _PASSKEY_CACHE[key] = passkey_grid(
                Tokenizer.load(tok_dir),
                lengths,
                TRAIN_PASSKEY_DEPTHS,
                TRAIN_PASSKEY_TRIALS,
                job.seed,
            )
        except LongtrainError as e:
            msg = str(e).removeprefix("--lengths: ")
            raise LongtrainError(f"log.long_eval_passkey={lengths}: {msg}") from None
    return _PASSKEY_CACHE[key]
