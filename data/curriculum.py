"""A data order for staged curricula: every stage continues where the previous one stopped.

The training split is cut into *blocks* of the longest stage length ``Lmax`` (plus the one
shared target token, as for ordinary windows). The global order is a seeded permutation of
the blocks per epoch, read as one long *token cursor*: a stage with window length ``L``
(``L`` divides ``Lmax``) reads the next ``L`` tokens of the current block as one window, so
four 4K windows of stage 1 cover exactly one 16K block of stage 2's order. At a stage change
the cursor is rounded up to a multiple of the new ``L`` (at most ``L - 1`` tokens are
skipped, none is repeated). The state is the cursor alone, global and rank independent, so a
run resumed on another DP size, SP degree or micro-batch, in the middle of any stage, reads
exactly the tokens an uninterrupted run would have read.

Batches follow ``longtrain.data.loader``'s contract (labels shifted before the SP split,
positions and ``cu_seqlens`` per document or per window), built by the same packing code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longtrain.data.loader import check_parallel, open_split, to_batch
from longtrain.data.packing import num_windows, pack_from_stream
from longtrain.model.errors import LongtrainError


class StagedLoader:
    """Infinite micro-batches of window length ``seq_len`` cut from blocks of ``longest``."""

    def __init__(
        self,
        data_dir: str | Path,
        longest: int,
        seq_len: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        sp_rank: int,
        sp_size: int,
        seed: int = 0,
        attention: str = "document",
        tokenizer_hash: str | None = None,
        ring: int = 1,
    ) -> None:
        check_parallel(seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size, attention, ring)
        self.ring = ring  # ring attention degree inside SP: the zigzag layout of to_batch
        if longest % seq_len:
            raise LongtrainError(f"seq_len={seq_len} does not divide the longest stage {longest}")
        self.longest, self.seq_len, self.micro_batch = longest, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.seed, self.attention = seed, attention
        self.stream, self.manifest = open_split(data_dir, "train", tokenizer_hash)
        self.num_blocks = num_windows(self.stream.total_tokens, longest)
        if self.num_blocks == 0:
            raise LongtrainError(
                f"{data_dir}: the train split has {self.stream.total_tokens} tokens, fewer than "
                f"the longest stage's seq_len+1={longest + 1}; prepare more data"
            )
        self.cursor = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            }
        return self._perms[epoch]

    def window_ids(self, cursor: int, count: int) -> np.ndarray:
        """Ids (in windows of ``seq_len``) of the ``count`` windows starting at ``cursor``."""
        c = cursor + self.seq_len * np.arange(count, dtype=np.int64)  # token cursors
        block_no, offset = c // self.longest, c % self.longest
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(block_no // self.num_blocks):
            sel = block_no // self.num_blocks == epoch
            block = self._perm(int(epoch))[block_no[sel] % self.num_blocks]
            # block*Lmax + offset is a multiple of seq_len because seq_len divides both.
            out[sel] = (block * self.longest + offset[sel]) // self.seq_len
        return out

    def __iter__(self) -> StagedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        start = self.cursor + self.dp_rank * self.micro_batch * self.seq_len
        ids = self.window_ids(start, self.micro_batch)
        self.cursor += self.micro_batch * self.dp_size * self.seq_len
        packed = pack_from_stream(self.stream, ids, self.seq_len, self.attention)
        return to_batch(packed, ids, self.sp_rank, self.sp_size, self.ring)

    def state_dict(self) -> dict[str, Any]:
        """The global token cursor plus what must match on resume."""
        return {
            "cursor": int(self.cursor),
            "seq_len": self.seq_len,
            "longest": self.longest,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "tokenizer_hash": self.manifest["tokenizer_hash"],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at the saved cursor, rounded up to this stage's window length.

        Also reads the state of a :class:`~longtrain.data.loader.DistributedLoader` (windows of
        one length, counted as samples): with ``longest == seq_len`` both visit windows in the
        same order, so a pretraining checkpoint made with it resumes here exactly.
        """
        if "cursor" not in sd and "consumed_samples" in sd:
            if int(sd.get("seq_len", self.seq_len)) != self.longest:
                raise LongtrainError(
                    f"loader state: windows of {sd.get('seq_len')} tokens in the checkpoint but "
                    f"{self.longest} now; resume with the same data.seq_len"
                )
            sd = {**sd, "cursor": int(sd["consumed_samples"]) * self.longest,
                  "num_blocks": sd.get("num_windows", self.num_blocks)}  # fmt: skip
        for key in ("longest", "seed", "num_blocks", "tokenizer_hash"):
            if key in sd and sd[key] != self.state_dict()[key]:
                raise LongtrainError(
                    f"loader state: {key}={sd[key]!r} in the checkpoint but "
                    f"{self.state_dict()[key]!r} now; resume with the same data, stages and seed"
                )
        c = int(sd["cursor"])
        self.cursor = -(-c // self.seq_len) * self.seq_len
