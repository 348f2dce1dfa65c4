"""Packing: windows of ``seq_len + 1`` tokens over the concatenated documents of a split.

Shards store every document followed by its EOS, so a split is one long token stream. Window
``i`` is ``stream[i*L : i*L + L + 1]`` (consecutive windows share one token, so every token
but the first is a target exactly once). Inputs are ``w[:-1]``, labels ``w[1:]``.

With ``attention="document"`` (the default) nothing crosses a document boundary:

- a *segment* is a document's tokens plus its EOS, cut at the window start;
- ``position_ids`` restart at 0 at each segment start;
- ``cu_seqlens`` lists segment starts over the flattened ``(B*L,)`` inputs, so every multiple
  of ``L`` is a boundary (flash-attn varlen convention, int32);
- the one cross-document target, where the input is a document's final EOS and the label is
  the next document's first token, is ``-100``.

With ``attention="causal"`` the window is one sequence (GPT-style): positions ``0..L-1``,
``cu_seqlens = [0, L, 2L, ...]``, labels unmasked apart from SFT masks.

SFT data carries a per-token mask; ``label[t]`` is ``-100`` where ``mask[t+1] == 0``.
Everything here is numpy slicing and ``searchsorted``; no Python loop per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtrain.model.errors import LongtrainError

IGNORE_INDEX = -100
ATTENTION_MODES = ("document", "causal")


@dataclass
class TokenStream:
    """The concatenation of a split's shards (memory-mapped), with global document starts."""

    tokens: list[np.ndarray]
    """Token memmap of each shard, in order."""
    masks: list[np.ndarray] | None
    """Per-token SFT loss mask (uint8, 1 = trained target) of each shard, or None."""
    doc_starts: np.ndarray
    """int64 (n_docs,): global offset of each document's first token, ascending, [0] == 0."""

    def __post_init__(self) -> None:
        sizes = np.array([len(t) for t in self.tokens], dtype=np.int64)
        # shard_starts[i] = global offset of shard i's first token; last entry = total tokens.
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total_tokens = int(self.shard_starts[-1])

    @classmethod
    def from_arrays(
        cls,
        tokens: list[np.ndarray],
        offsets: list[np.ndarray],
        masks: list[np.ndarray] | None = None,
    ) -> TokenStream:
        """Build from per-shard tokens and per-shard document offsets ``(n_docs + 1,)``."""
        starts, base = [], 0
        for tok, off in zip(tokens, offsets):
            starts.append(np.asarray(off[:-1], dtype=np.int64) + base)
            base += len(tok)
        doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        return cls(tokens=tokens, masks=masks, doc_starts=doc_starts)

    def _read(self, arrays: list[np.ndarray], start: int, length: int, dtype: type) -> np.ndarray:
        out = np.empty(length, dtype=dtype)
        i = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        filled = 0
        # Loop over the (one or two) shards a window touches, not over tokens.
        while filled < length:
            lo = start + filled - int(self.shard_starts[i])
            chunk = arrays[i][lo : lo + length - filled]
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            i += 1
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as int64."""
        if start < 0 or start + length > self.total_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside {self.total_tokens} tokens")
        return self._read(self.tokens, start, length, np.int64)

    def read_mask(self, start: int, length: int) -> np.ndarray | None:
        """SFT mask of tokens ``[start, start + length)``, or None for pretraining data."""
        if self.masks is None:
            return None
        return self._read(self.masks, start, length, np.uint8)


def num_windows(total_tokens: int, seq_len: int) -> int:
    """How many full windows of ``seq_len + 1`` tokens (stride ``seq_len``) the stream holds."""
    return max(0, (total_tokens - 1) // seq_len)


def pack(
    windows: np.ndarray,
    window_starts: np.ndarray,
    doc_starts: np.ndarray,
    masks: np.ndarray | None = None,
    attention: str = "document",
) -> dict[str, np.ndarray | int]:
    """Inputs, shifted labels, positions and cu_seqlens of a batch of windows.

    windows: (B, L+1) token ids; window_starts: (B,) global offset of each window's first
    token; doc_starts: ascending global document starts; masks: (B, L+1) SFT mask or None.
    Returns numpy arrays ``input_ids``, ``labels``, ``position_ids`` (B, L), ``cu_seqlens``
    int32 (n+1,) over the flattened B*L inputs, and ``max_seqlen`` (int).
    """
    if attention not in ATTENTION_MODES:
        raise LongtrainError(f"attention={attention!r}: choose one of {ATTENTION_MODES}")
    B, L1 = windows.shape
    L = L1 - 1
    inputs = windows[:, :-1].astype(np.int64)
    labels = windows[:, 1:].astype(np.int64).copy()
    if masks is not None:
        labels[masks[:, 1:] == 0] = IGNORE_INDEX
    if attention == "causal":
        position_ids = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)).copy()
        cu = np.arange(0, B * L + 1, L, dtype=np.int32)
        return dict(
            input_ids=inputs, labels=labels, position_ids=position_ids, cu_seqlens=cu, max_seqlen=L
        )
    pos = window_starts.astype(np.int64)[:, None] + np.arange(L1, dtype=np.int64)  # (B, L+1)
    idx = np.searchsorted(doc_starts, pos, side="left")
    is_start = (idx < len(doc_starts)) & (doc_starts[np.minimum(idx, len(doc_starts) - 1)] == pos)
    # The target at t is cross-document when token t+1 opens a new document.
    labels[is_start[:, 1:]] = IGNORE_INDEX
    # Segment of each input token: the later of its document's start and the window start.
    seg_idx = np.searchsorted(doc_starts, pos[:, :L], side="right") - 1  # (B, L)
    seg_start = np.maximum(doc_starts[np.maximum(seg_idx, 0)], window_starts[:, None])
    position_ids = pos[:, :L] - seg_start
    opens = is_start[:, :L].copy()
    opens[:, 0] = True  # every window start opens a segment
    flat = np.flatnonzero(opens.reshape(-1))  # (B*L,) flattened segment starts
    cu = np.concatenate([flat, [B * L]]).astype(np.int32)
    max_seqlen = int(np.diff(cu).max())
    return dict(
        input_ids=inputs,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
    )


def pack_from_stream(
    stream: TokenStream, window_ids: np.ndarray, seq_len: int, attention: str = "document"
) -> dict[str, np.ndarray | int]:
    """Read windows ``window_ids`` of ``stream`` and :func:`pack` them."""
    L1 = seq_len + 1
    starts = np.asarray(window_ids, dtype=np.int64) * seq_len
    windows = np.stack([stream.read(int(s), L1) for s in starts])  # (B, L+1)
    masks = None
    if stream.masks is not None:
        masks = np.stack([stream.read_mask(int(s), L1) for s in starts])  # (B, L+1)
    return pack(windows, starts, stream.doc_starts, masks, attention)
