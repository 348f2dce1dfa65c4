"""Loss by position: does a token gain from a longer context? (``longtrain eval --task ppl``)

The position of a token is its ``position_id``: its distance from the start of what it attends
to (the document start under ``data.attention=document``, the window start under ``causal``),
so the curve shows whether later tokens gain from a longer context. With a topology, the
windows are this rank's DP x SP slice and the per-bucket sums and counts are added up over all
ranks: each token is scored on exactly one rank, so the result is the single-device one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from longtrain.model.errors import LongtrainError

if TYPE_CHECKING:
    from longtrain.train.parallel import Topology

IGNORE_INDEX = -100


class PositionBuckets:
    """Sums token losses into buckets of ``size`` positions: [0, size), [size, 2*size), ..."""

    def __init__(self, size: int, max_len: int) -> None:
        if size < 1:
            raise LongtrainError(f"--bucket {size}: must be >= 1")
        self.size = size
        self.n = max(1, -(-max_len // size))
        self.sums = torch.zeros(self.n, dtype=torch.float64)
        self.counts = torch.zeros(self.n, dtype=torch.int64)

    def add(self, losses: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Add per-token ``losses`` at ``positions`` where ``valid`` (all the same shape)."""
        idx = (positions[valid] // self.size).clamp(max=self.n - 1).long().cpu()
        self.sums.index_add_(0, idx, losses[valid].double().cpu())
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def all_reduce(self, group: Any = None) -> None:
        """Sum the buckets over a process group (every rank scored different tokens)."""
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # gloo and NCCL both reduce float64/int64 exactly for these sizes; on NCCL the
            # tensors must live on the GPU.
            dev = collective_device()
            sums, counts = self.sums.to(dev), self.counts.to(dev)
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
            self.sums, self.counts = sums.cpu(), counts.cpu()

    def result(self) -> list[dict[str, Any]]:
        """One row per bucket: start, end, tokens, mean loss and perplexity (None if empty)."""
        rows = []
        for i in range(self.n):
            c = int(self.counts[i])
            loss = float(self.sums[i] / c) if c else None
            rows.append(
                {
                    "start": i * self.size,
                    "end": (i + 1) * self.size,
                    "tokens": c,
                    "loss": loss,
                    "ppl": math.exp(min(loss, 50.0)) if loss is not None else None,
                }
            )
        return rows


def bucket_label(start: int, end: int) -> str:
    """``0-1K``, ``1K-2K``, ``32K-64K``; sizes that are not whole K stay plain: ``0-96``."""

    def fmt(n: int) -> str:
        return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)

    return f"{fmt(start)}-{fmt(end)}"


def collective_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def gathered_head(model: Any) -> Iterator[torch.Tensor]:
    """The LM head weight, whole. Under ZeRO-3 it is partitioned and, unlike the blocks, used
    outside any submodule's forward here, so it is gathered explicitly (collective: every rank
    of the partition group enters this the same number of times)."""
    w = model.head_weight
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w]):
            yield w
    else:
        yield w


@torch.no_grad()
def token_losses(
    model: Any, batch: dict[str, Any], device: torch.device, chunk: int = 1024
) -> torch.Tensor:
    """(B, T) fp32 cross-entropy of every token (0 where the label is -100), chunked over the head."""
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    cu = batch.get("cu_seqlens")
    h = model.hidden(
        ids,
        batch["position_ids"].to(device),
        cu.to(device) if cu is not None else None,
        batch.get("max_seqlen"),
    )  # (B, T, dim)
    B, T, D = h.shape
    flat = h.reshape(B * T, D)  # (B*T, dim)
    lab = labels.reshape(B * T)  # (B*T,)
    out = torch.zeros(B * T, dtype=torch.float32, device=device)
    with gathered_head(model) as w:
        for s in range(0, B * T, chunk):
            logits = (flat[s : s + chunk] @ w.t()).float()  # (C, V)
            out[s : s + chunk] = F.cross_entropy(
                logits, lab[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="none"
            )
    return out.view(B, T)  # (B, T), local T (T/sp) under sequence parallelism


def eval_ppl(
    model: Any,
    batches: Iterable[dict[str, Any]],
    seq_len: int,
    bucket: int,
    device: torch.device,
    topo: Topology | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss by position bucket over ``batches`` (dicts as yielded by the data loader).

    With ``topo`` the batches are this rank's DP x SP slice (``validation_batches`` with the
    topology's ranks) and the sums and counts are added up over all ranks: each token is
    scored on exactly one rank, so the result is the single-device one.
    """
    buckets = PositionBuckets(bucket, seq_len)
    windows = 0
    for batch in tqdm(batches, desc="eval ppl", unit="window", leave=False, disable=not progress):
        losses = token_losses(model, batch, device).cpu()  # (B, T/sp)
        valid = batch["labels"] != IGNORE_INDEX
        buckets.add(losses, batch["position_ids"], valid)
        windows += int((batch.get("sample_ids", torch.zeros(1)) >= 0).sum())
    if topo is not None and topo.world_size > 1:
        buckets.all_reduce(topo.world_group)
        # Every SP rank of a group saw the same windows: count them once per DP group.
        (windows,) = sum_ints([windows if topo.sp_rank == 0 else 0], topo.world_group)
    total, count = float(buckets.sums.sum()), int(buckets.counts.sum())
    if count == 0:
        raise LongtrainError("eval ppl: no scored tokens (empty validation split?)")
    loss = total / count
    return {
        "task": "ppl",
        "seq_len": seq_len,
        "bucket": bucket,
        "windows": windows,
        "tokens": count,
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "buckets": buckets.result(),
    }


def sum_ints(values: list[int], group: Any) -> list[int]:
    """Sum a few Python ints over a process group (exactly, as int64)."""
    t = torch.tensor(values, dtype=torch.int64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return [int(x) for x in t.tolist()]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Loss per position bucket (empty buckets left out)."""
    plt = pyplot()
    rows = [r for r in result["buckets"] if r["loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["loss"] for r in rows], marker="o")
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or f"loss by position, seq_len {result['seq_len']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
