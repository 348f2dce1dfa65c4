"""Deterministic, resumable, distributed loading of packed windows.

The *global sequence* of a split is the concatenation over epochs ``e = 0, 1, ...`` of a
permutation of its window ids drawn from ``(seed, e)``: global sample ``g`` is window
``perm(g // N)[g % N]`` with ``N = num_windows``. A micro-step consumes the next
``micro_batch * dp_size`` samples; data-parallel rank ``r`` takes the ``r``-th contiguous block
of ``micro_batch``. The only state is the global count of consumed samples, so a run resumed on
another number of DP ranks (or another micro-batch) continues with exactly the next unseen
samples. Steps may straddle an epoch boundary; nothing is dropped or repeated.

All ranks of a sequence-parallel group read the same windows; SP rank ``s`` of ``P`` keeps
tokens ``[s*L/P, (s+1)*L/P)`` of the inputs, of the *already shifted* labels and of the
position ids, while ``cu_seqlens`` / ``max_seqlen`` describe the full window (the attention
core sees the whole sequence after the Ulysses all-to-all).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtrain.data.packing import (
    ATTENTION_MODES,
    IGNORE_INDEX,
    TokenStream,
    num_windows,
    pack_from_stream,
)
from longtrain.model.errors import LongtrainError

MANIFEST = "manifest.json"


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``<data_dir>/manifest.json``, or one clear error."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise LongtrainError(f"{path}: not found; run `longtrain prepare --out {data_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongtrainError(f"{path}: invalid JSON ({e}); run `longtrain prepare` again") from None


def open_split(
    data_dir: str | Path, split: str, tokenizer_hash: str | None = None
) -> tuple[TokenStream, dict[str, Any]]:
    """Memory-map the shards of ``split``; checks the tokenizer hash when one is given."""
    d = Path(data_dir)
    manifest = load_manifest(d)
    if tokenizer_hash is not None and tokenizer_hash != manifest["tokenizer_hash"]:
        raise LongtrainError(
            f"{d / MANIFEST}: shards were made with tokenizer {manifest['tokenizer_hash'][:12]}, "
            f"but this run uses {tokenizer_hash[:12]}; use the tokenizer in {d / 'tokenizer'} "
            "or re-run `longtrain prepare` with yours"
        )
    if split not in manifest["splits"]:
        raise LongtrainError(f"split={split!r}: {d} has splits {sorted(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise LongtrainError(
            f"{d}: split {split!r} is empty; prepare with a larger --val-fraction or more data"
        )
    dtype = np.dtype(manifest["dtype"])
    tokens, offsets, masks = [], [], []
    for sh in shards:
        path = d / sh["tokens"]
        if not path.is_file():
            raise LongtrainError(f"{path}: missing shard; re-run `longtrain prepare` (it resumes)")
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != dtype or len(arr) != sh["stored_tokens"]:
            raise LongtrainError(
                f"{path}: {arr.dtype}[{len(arr)}] but the manifest says "
                f"{dtype}[{sh['stored_tokens']}]; re-run `longtrain prepare` (it re-verifies)"
            )
        tokens.append(arr)
        offsets.append(np.load(d / sh["index"]))
        if sh.get("mask"):
            masks.append(np.load(d / sh["mask"], mmap_mode="r"))
    return TokenStream.from_arrays(tokens, offsets, masks or None), manifest


def _check_parallel(seq_len: int, micro_batch: int, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int, attention: str) -> None:  # fmt: skip
    if seq_len < 1 or micro_batch < 1:
        raise LongtrainError(f"seq_len={seq_len}, micro_batch={micro_batch}: must be positive")
    if not 0 <= dp_rank < dp_size:
        raise LongtrainError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
    if not 0 <= sp_rank < sp_size:
        raise LongtrainError(f"sp_rank={sp_rank}: must be in [0, sp_size={sp_size})")
    if seq_len % sp_size:
        raise LongtrainError(
            f"seq_len={seq_len}: must be divisible by the sequence-parallel size {sp_size}"
        )
    if attention not in ATTENTION_MODES:
        raise LongtrainError(f"attention={attention!r}: choose one of {ATTENTION_MODES}")


def _to_batch(
    packed: dict[str, Any], sample_ids: np.ndarray, sp_rank: int, sp_size: int
) -> dict[str, Any]:
    L = packed["input_ids"].shape[1]
    lo, hi = sp_rank * L // sp_size, (sp_rank + 1) * L // sp_size
    # Shifted labels are split like the inputs: the label at a shard boundary stays with the
    # earlier shard, the one whose last input predicts it.
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(packed["input_ids"][:, lo:hi])),
        "labels": torch.from_numpy(np.ascontiguousarray(packed["labels"][:, lo:hi])),
        "position_ids": torch.from_numpy(np.ascontiguousarray(packed["position_ids"][:, lo:hi])),
        "cu_seqlens": torch.from_numpy(packed["cu_seqlens"].astype(np.int32)),
        "max_seqlen": int(packed["max_seqlen"]),
        "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
    }


class DistributedLoader:
    """Infinite iterator of micro-batches for one DP rank and SP rank (see module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 2048,
        micro_batch: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        sp_rank: int = 0,
        sp_size: int = 1,
        seed: int = 0,
        attention: str = "document",
        tokenizer_hash: str | None = None,
    ) -> None:
        _check_parallel(seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size, attention)
        self.data_dir = Path(data_dir)
        self.split, self.seq_len, self.micro_batch = split, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.seed, self.attention = seed, attention
        self.stream, self.manifest = open_split(data_dir, split, tokenizer_hash)
        self.num_windows: int = num_windows(self.stream.total_tokens, seq_len)
        if self.num_windows == 0:
            raise LongtrainError(
                f"{data_dir}: split {split!r} has {self.stream.total_tokens} tokens, fewer than "
                f"seq_len+1={seq_len + 1}; lower seq_len or prepare more data"
            )
        self.consumed_samples = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read."""
        return self.consumed_samples // self.num_windows

    @property
    def global_batch(self) -> int:
        """Samples consumed by one micro-step over all DP ranks."""
        return self.micro_batch * self.dp_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch`` (the same on every rank: seeded by ``(seed, epoch)``)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        return self._perm

    def global_samples(self, start: int, count: int) -> np.ndarray:
        """Window ids of global samples ``[start, start + count)``."""
        g = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.num_windows):  # at most two epochs per step
            sel = g // self.num_windows == epoch
            out[sel] = self.permutation(int(epoch))[g[sel] % self.num_windows]
        return out

    def __iter__(self) -> DistributedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch
        ids = self.global_samples(start, self.micro_batch)
        self.consumed_samples += self.global_batch
        packed = pack_from_stream(self.stream, ids, self.seq_len, self.attention)
        return _to_batch(packed, ids, self.sp_rank, self.sp_size)

    def state_dict(self) -> dict[str, Any]:
        """Global position (rank-independent), plus what must match on resume."""
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "split": self.split,
            "tokenizer_hash": self.manifest["tokenizer_hash"],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at ``sd["consumed_samples"]``; the data and window size must be unchanged."""
        for key in ("seed", "seq_len", "num_windows", "split", "tokenizer_hash"):
            if key in sd and sd[key] != self.state_dict()[key]:
                raise LongtrainError(
                    f"loader state: {key}={sd[key]!r} in the checkpoint but {self.state_dict()[key]!r} "
                    "now; resume with the same data, seq_len and seed (or start a new run)"
                )
        self.consumed_samples = int(sd["consumed_samples"])


def validation_batches(
    data_dir: str | Path,
    seq_len: int,
    micro_batch: int = 1,
    dp_rank: int = 0,
    dp_size: int = 1,
    sp_rank: int = 0,
    sp_size: int = 1,
    max_batches: int | None = None,
    attention: str = "document",
    tokenizer_hash: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Every window of the ``val`` split once, in order, sliced like :class:`DistributedLoader`.

    All ranks yield the same number of batches (collectives stay in step): the last step is
    padded with repeats of window 0 whose labels are all ``-100`` and ``sample_ids`` are -1, so
    they add no loss and no token count.
    """
    _check_parallel(seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size, attention)
    stream, _ = open_split(data_dir, "val", tokenizer_hash)
    n = num_windows(stream.total_tokens, seq_len)
    if n == 0:
        raise LongtrainError(
            f"{data_dir}: split 'val' has {stream.total_tokens} tokens, fewer than "
            f"seq_len+1={seq_len + 1}; lower seq_len or raise --val-fraction"
        )
    per_step = micro_batch * dp_size
    steps = -(-n // per_step)
    if max_batches is not None:
        steps = min(steps, max_batches)
    for step in range(steps):
        g = step * per_step + dp_rank * micro_batch + np.arange(micro_batch, dtype=np.int64)
        valid = g < n
        packed = pack_from_stream(stream, np.where(valid, g, 0), seq_len, attention)
        packed["labels"][~valid] = IGNORE_INDEX
        yield _to_batch(packed, np.where(valid, g, -1), sp_rank, sp_size)
