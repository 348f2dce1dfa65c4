"""Sequence classification data: JSONL ``{"text": str, "label": int}`` -> right-padded rows.

``data.dir`` holds ``train.jsonl`` and ``val.jsonl``. Each text becomes
``encode(text)[: seq_len - 1] + [EOS]`` (the beginning is kept: a long document is cut at
its end), right-padded with the tokenizer's pad id to ``seq_len``. The class is predicted
from the last real token (the EOS), which is what transformers'
``LlamaForSequenceClassification`` pools (the rightmost non-pad token).

A batch follows the loader contract of ``longtrain.data.loader`` so the trainer's step and
sequence parallelism apply unchanged: ``labels`` (B, T/sp) is -100 except at the last token
of each row, where it holds the class (only on the SP rank whose slice contains it). Extra
keys: ``lengths`` (B,) real lengths and ``classes`` (B,) labels (-100 for padding rows).
Order: a seeded permutation per epoch over all rows, DP rank r takes the r-th block of each
micro-step, state = consumed rows (resumes on any DP size, like the LM loader).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtrain.data.loader import sp_shard_indices
from longtrain.data.tokenizer import Tokenizer
from longtrain.model.errors import LongtrainError

IGNORE = -100


def read_jsonl(path: Path, num_labels: int) -> tuple[list[str], list[int]]:
    """Texts and labels of one split; one clear error naming the file and line."""
    if not path.is_file():
        raise LongtrainError(
            f"{path}: not found; a classification data.dir holds train.jsonl and val.jsonl "
            'with one {"text": ..., "label": ...} per line'
        )
    texts, labels = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LongtrainError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LongtrainError(f'{path}:{i}: needs a string field "text"')
        lab = row.get("label")
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < num_labels:
            raise LongtrainError(
                f"{path}:{i}: label {lab!r} must be an int in [0, {num_labels}) "
                "(finetune.num_labels)"
            )
        texts.append(row["text"])
        labels.append(lab)
    if not texts:
        raise LongtrainError(f"{path}: no examples")
    return texts, labels


def encode_rows(tok: Tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, seq_len) int64 right-padded ids and (N,) lengths (last real token = EOS)."""
    ids = np.full((len(texts), seq_len), tok.pad_id, dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, row in enumerate(tok.encode_batch(texts)):
        row = row[: seq_len - 1] + [tok.eos_id]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


class ClassifyData:
    """One split, tokenized once into memory (classification sets are small)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        tokenizer_dir: str | Path,
        seq_len: int,
        num_labels: int,
    ) -> None:
        if not tokenizer_dir:
            raise LongtrainError(
                "finetune.task=classify needs data.tokenizer=DIR (a `longtrain tokenizer` output)"
            )
        self.tok = Tokenizer.load(tokenizer_dir)
        if self.tok.pad_id < 0:
            raise LongtrainError(f"{tokenizer_dir}: the tokenizer has no pad token")
        texts, labels = read_jsonl(Path(data_dir) / f"{split}.jsonl", num_labels)
        self.ids, self.lengths = encode_rows(self.tok, texts, seq_len)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray, sp_rank: int, sp_size: int, ring: int = 1) -> dict[str, Any]:
        """Rows (B,) (-1 = padding row, no label) -> a loader-contract batch for one SP rank
        (its shard of ``sp_shard_indices``: zigzag chunks under ring attention)."""
        valid = rows >= 0
        r = np.where(valid, rows, 0)
        ids = self.ids[r]  # (B, T)
        lengths = self.lengths[r]  # (B,)
        classes = np.where(valid, self.labels[r], IGNORE)  # (B,)
        B, T = ids.shape
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        labels[np.arange(B), lengths - 1] = classes
        cut = sp_shard_indices(T, sp_rank, sp_size, ring)  # (T/sp,) window positions
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(ids[:, cut])),  # (B, T/sp)
            "labels": torch.from_numpy(np.ascontiguousarray(labels[:, cut])),  # (B, T/sp)
            "position_ids": torch.from_numpy(np.ascontiguousarray(pos[:, cut])),  # (B, T/sp)
            "cu_seqlens": None,  # one causal sequence per row; padding comes after it
            "max_seqlen": None,
            "lengths": torch.from_numpy(lengths),
            "classes": torch.from_numpy(classes),
            "sample_ids": torch.from_numpy(np.where(valid, rows, -1)),
        }


class ClassifyLoader:
    """Infinite, resumable micro-batches of the train split for one DP x SP rank."""

    def __init__(
        self,
        data: ClassifyData,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        sp_rank: int,
        sp_size: int,
        seed: int,
        ring: int = 1,
    ) -> None:
        self.data, self.micro_batch, self.seed, self.ring = data, micro_batch, seed, ring
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.consumed_samples = 0

    def _rows(self, start: int, count: int) -> np.ndarray:
        n = len(self.data)
        g = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // n):
            sel = g // n == epoch
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            out[sel] = perm[g[sel] % n]
        return out

    def __iter__(self) -> ClassifyLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        rows = self._rows(self.consumed_samples + self.dp_rank * self.micro_batch, self.micro_batch)
        self.consumed_samples += self.micro_batch * self.dp_size
        return self.data.batch(rows, self.sp_rank, self.sp_size, self.ring)

    def state_dict(self) -> dict[str, Any]:
        """Global position (rank independent)."""
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "rows": len(self.data),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue after ``sd["consumed_samples"]`` rows; the data must be the same size."""
        if sd.get("rows", len(self.data)) != len(self.data):
            raise LongtrainError(
                f"loader state: {sd['rows']} training rows in the checkpoint but "
                f"{len(self.data)} now; resume with the same data"
            )
        self.consumed_samples = int(sd["consumed_samples"])


def classify_val_batches(
    data: ClassifyData,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    sp_rank: int,
    sp_size: int,
    ring: int = 1,
) -> Iterator[dict[str, Any]]:
    """Every validation row once; all ranks yield the same number of batches (padding rows)."""
    n, per = len(data), micro_batch * dp_size
    for step in range(-(-n // per)):
        g = step * per + dp_rank * micro_batch + np.arange(micro_batch, dtype=np.int64)
        yield data.batch(np.where(g < n, g, -1), sp_rank, sp_size, ring)
