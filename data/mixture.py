"""Weighted mixtures of prepared data directories, read as one deterministic, resumable stream.

``data.mix`` lists sources ``{name, dir, weight}`` (used instead of ``data.dir``); each ``dir``
is written by ``longtrain prepare`` with the same tokenizer. :func:`check_mix` validates the
list and normalises the weights, :func:`check_mix_tokenizers` checks that every source was
made with one tokenizer; both only read manifests, so the config layer calls them before any
process group.

**Order.** As in :class:`~longtrain.data.curriculum.StagedLoader`, the stream is a global
*token cursor* over blocks of the longest stage length ``Lmax`` (plus the shared target
token); a stage with window length ``L`` (dividing ``Lmax``) reads the current block as
``Lmax / L`` consecutive windows. Global block ``b`` comes from the source that a fixed
schedule gives it:

- the weights are quantised to integers ``q_i`` (``round(w_i * 2**16)``, at least 1, divided
  by their gcd: 0.25 / 0.75 becomes 1 / 3), and one *period* of ``W = sum(q_i)`` blocks puts
  source ``i``'s ``q_i`` blocks at the evenly spaced times ``(k + 1/2) / q_i`` (sorted, ties
  in source order), so every prefix of the order holds each source within about one block
  of its weight (:func:`weighted_schedule`);
- block ``b`` is then its source's ``j``-th block, ``j = (b // W) * q_i`` plus the source's
  earlier positions in the period, and within the source, block ``j`` is
  ``perm_i(e)[j % N_i]`` of its own epoch ``e = j // N_i``, a permutation of the source's
  ``N_i`` blocks seeded by ``(seed, hash(name), e)``.

Everything is a function of ``(seed, b)``: there is no per-source cursor, the state is the
global token cursor alone, and DP / SP slicing, micro-batch changes, exact resume and
resharding to another DP size work exactly as for one source. At a stage change the cursor
is rounded up to the new ``L`` (at most ``L - 1`` tokens skipped, none repeated), as
StagedLoader does. The price of mixing per block rather than per window: a stage whose
windows are shorter than ``Lmax`` reads ``Lmax / L`` windows in a row from one source, so
its mixture is exact per block, not per window.

A source whose blocks are all read starts its next epoch (a new permutation) on its own,
whatever the others do; the loader logs it once (DP rank 0, SP rank 0). Every batch carries
``source_ids`` ``(micro_batch,)`` int64, indices into :attr:`MixtureLoader.source_names`,
and ``sample_ids`` are window ids within that source's train split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtrain.data.loader import (
    check_parallel,
    load_manifest,
    open_split,
    to_batch,
    validation_batches,
)
from longtrain.data.packing import TokenStream, num_windows, pack
from longtrain.data.tokenizer import check_tokenizer_hash
from longtrain.model.errors import LongtrainError

log = logging.getLogger(__name__)

MIX_KEYS = ("name", "dir", "weight")
QUANTUM = 1 << 16
"""Weights are quantised to multiples of ``1 / QUANTUM`` of the total (at least one)."""
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class MixSource:
    """One validated entry of ``data.mix``."""

    name: str
    """Unique label: metrics are ``val_loss/<name>`` and ``tokens/<name>``."""
    dir: str
    """A data directory written by ``longtrain prepare``."""
    weight: float
    """Share of the training blocks, normalised so that the weights sum to 1."""


def check_mix(mix: Any, where: str = "data.mix") -> list[MixSource]:
    """Validate a ``data.mix`` list and return its sources with normalised weights.

    Accepts dicts ``{name, dir, weight}`` or :class:`MixSource` (so it is idempotent). A
    non-list, an unknown or missing key, a name that is empty, odd or given twice, an empty
    dir, or a weight that is not a positive finite number is one error naming the entry.
    Reads no files.
    """
    if not isinstance(mix, (list, tuple)) or not mix:
        raise LongtrainError(
            f"{where}: expected a non-empty list of {{name, dir, weight}}, got {mix!r}"
        )
    seen: dict[str, int] = {}
    out = []
    for i, entry in enumerate(mix):
        at = f"{where}[{i}]"
        if isinstance(entry, MixSource):
            entry = asdict(entry)
        if not isinstance(entry, dict):
            raise LongtrainError(f"{at}: expected {{name, dir, weight}}, got {entry!r}")
        unknown = sorted(set(map(str, entry)) - set(MIX_KEYS))
        if unknown:
            raise LongtrainError(
                f"{at}: unknown key {unknown[0]!r}; the keys are {', '.join(MIX_KEYS)}"
            )
        missing = [k for k in MIX_KEYS if k not in entry]
        if missing:
            raise LongtrainError(f"{at}: missing {missing[0]!r}; give name, dir and weight")
        name, d, w = entry["name"], entry["dir"], entry["weight"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise LongtrainError(
                f"{at}.name {name!r}: use letters, digits, '_', '-' or '.' (it names metrics)"
            )
        if name in seen:
            raise LongtrainError(
                f"{at}.name {name!r}: given twice (also {where}[{seen[name]}]); names must be "
                "unique"
            )
        seen[name] = i
        if not isinstance(d, (str, Path)) or not str(d):
            raise LongtrainError(f"{at}.dir {d!r}: give the directory `longtrain prepare` wrote")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise LongtrainError(
                f"{at}.weight {w!r}: must be a positive number (a source share, e.g. 0.25)"
            )
        out.append((name, str(d), float(w)))
    total = sum(w for _, _, w in out)
    return [MixSource(name, d, w / total) for name, d, w in out]


def check_mix_tokenizers(
    sources: Sequence[MixSource | dict], tokenizer_hash: str | None = None, where: str = "data.mix"
) -> str:
    """The tokenizer hash shared by every source's manifest, or one error naming the source
    that differs (from ``tokenizer_hash`` when given, else from the first source)."""
    sources = check_mix(list(sources), where)
    want, want_what = tokenizer_hash, "this run (data.tokenizer)"
    for i, s in enumerate(sources):
        have = str(load_manifest(s.dir).get("tokenizer_hash", ""))
        what = f"{where}[{i}] {s.name!r} (dir {s.dir})"
        if not want:
            want, want_what = have, what
            continue
        check_tokenizer_hash(
            want, have, want_what, what, f"prepare {s.dir} again with the tokenizer of the others"
        )
    return str(want)


def weighted_schedule(weights: Sequence[float]) -> np.ndarray:
    """One period of the source order: source indices (int64), ``q_i`` of each (see module
    docstring). Every prefix of ``k`` blocks holds about ``k * w_i`` of source ``i`` (within
    about one block); the period is as short as the quantised weights allow."""
    w = np.asarray(weights, dtype=np.float64)
    q = np.maximum(1, np.rint(w / w.sum() * QUANTUM)).astype(np.int64)
    q //= reduce(math.gcd, q.tolist())
    # Source i's k-th block sits at time (2k + 1) / (2 q_i) of the period: evenly spaced,
    # offset by half a step so that no source waits a whole period for its first block.
    # Equal rationals give equal doubles, so ties are exact and broken by source index.
    times = np.concatenate([(2 * np.arange(n) + 1) / (2 * n) for n in q])
    src = np.repeat(np.arange(len(q)), q)
    return src[np.lexsort((src, times))]


def _name_key(name: str) -> int:
    # Permutations seeded by the name, not the position: reordering data.mix does not
    # reshuffle a source (the interleaving changes anyway).
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


def _concat(streams: list[TokenStream]) -> tuple[TokenStream, np.ndarray]:
    """One stream over all sources (memory maps, not copies) and each source's first token."""
    sizes = np.array([s.total_tokens for s in streams], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    tokens = [t for s in streams for t in s.tokens]
    masks = None
    if any(s.masks is not None for s in streams):
        # Pretraining sources next to SFT ones train on every token: a zero-copy view of ones.
        masks = [
            m
            for s in streams
            for m in (s.masks or [np.broadcast_to(np.uint8(1), (len(t),)) for t in s.tokens])
        ]
    doc_starts = np.concatenate([s.doc_starts + b for s, b in zip(streams, base)])
    return TokenStream(tokens=tokens, masks=masks, doc_starts=doc_starts), base


class MixtureLoader:
    """Infinite micro-batches of ``seq_len`` windows from weighted sources (module docstring).

    The constructor mirrors :class:`~longtrain.data.curriculum.StagedLoader` with ``sources``
    (a ``data.mix`` list) instead of ``data_dir``.
    """

    def __init__(
        self,
        sources: Sequence[MixSource | dict],
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
        self.sources = check_mix(list(sources))
        self.source_names: list[str] = [s.name for s in self.sources]
        """Names in ``data.mix`` order; ``batch["source_ids"]`` index into it."""
        self.tokenizer_hash = check_mix_tokenizers(self.sources, tokenizer_hash)
        streams = []
        for i, s in enumerate(self.sources):
            stream, _ = open_split(s.dir, "train", self.tokenizer_hash)
            if num_windows(stream.total_tokens, longest) == 0:
                raise LongtrainError(
                    f"data.mix[{i}] {s.name!r} (dir {s.dir}): the train split has "
                    f"{stream.total_tokens} tokens, fewer than the longest stage's "
                    f"seq_len+1={longest + 1}; prepare more data for it or drop it"
                )
            streams.append(stream)
        self.num_blocks = np.array(
            [num_windows(s.total_tokens, longest) for s in streams], dtype=np.int64
        )
        self.stream, self._base = _concat(streams)
        self.schedule = weighted_schedule([s.weight for s in self.sources])
        self._period = len(self.schedule)
        self._quota = np.bincount(self.schedule, minlength=len(self.sources))
        # Positions of each source within one period: rank of a position = searchsorted.
        self._positions = [np.flatnonzero(self.schedule == i) for i in range(len(self.sources))]
        self._keys = [_name_key(s.name) for s in self.sources]
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.cursor = 0
        self.origin = 0
        """First global block of the current mixture (a stage may change the mixture)."""
        self.base = np.zeros(len(self.sources), dtype=np.int64)
        """Blocks each source supplied before :attr:`origin` (under earlier mixtures)."""
        self.new_segment_ok = False
        """Set by the trainer for a stage that starts now: a checkpoint made with another
        mixture then starts a new segment of the order instead of being refused."""
        self._seen_epoch = self._epochs_before(0)

    # ---- the global order ------------------------------------------------------------------

    def consumed_blocks(self, blocks: int) -> np.ndarray:
        """How many of the first ``blocks`` global blocks each source supplied, ``(n,)``."""
        period, r = divmod(max(int(blocks) - self.origin, 0), self._period)
        part = np.bincount(self.schedule[:r], minlength=len(self.sources))
        return self.base + period * self._quota + part

    def blocks(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(source, block within the source, epoch of that source)`` of global blocks ``b``."""
        b = np.asarray(b, dtype=np.int64)
        period, r = np.divmod(b - self.origin, self._period)
        src = self.schedule[r]
        block, epoch = np.empty_like(b), np.empty_like(b)
        for i in np.unique(src):
            sel = src == i
            j = self.base[i] + period[sel] * self._quota[i]
            j = j + np.searchsorted(self._positions[i], r[sel])
            epoch[sel], within = np.divmod(j, self.num_blocks[i])
            out = np.empty(len(j), dtype=np.int64)
            for e in np.unique(epoch[sel]):  # at most two epochs per call in practice
                at = epoch[sel] == e
                out[at] = self._perm(int(i), int(e))[within[at]]
            block[sel] = out
        return src, block, epoch

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, self._keys[source], epoch])
            self._perms[key] = rng.permutation(int(self.num_blocks[source]))
        return self._perms[key]

    def windows(self, cursor: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(source, window id in the source, start in the joint stream)`` of the ``count``
        windows of ``seq_len`` starting at token cursor ``cursor``."""
        c = cursor + self.seq_len * np.arange(count, dtype=np.int64)  # token cursors
        b, offset = np.divmod(c, self.longest)
        src, block, _ = self.blocks(b)
        local = block * self.longest + offset  # a multiple of seq_len: it divides both terms
        return src, local // self.seq_len, self._base[src] + local

    def consumed_tokens(self) -> dict[str, int]:
        """Cursor positions read from each source so far (the tokens of every window read, plus
        any skipped by a stage change): lets the trainer restore per-source token counts."""
        full, part = divmod(self.cursor, self.longest)
        out = self.consumed_blocks(full) * self.longest
        if part:
            out[self.schedule[(full - self.origin) % self._period]] += part
        return dict(zip(self.source_names, map(int, out)))

    def _epochs_before(self, cursor: int) -> np.ndarray:
        """Epoch of the last block each source supplied before ``cursor`` (-1: none yet)."""
        n = self.consumed_blocks(-(-cursor // self.longest))
        return np.where(n > 0, (n - 1) // self.num_blocks, -1)

    def _log_new_epochs(self, cursor: int, tokens: int) -> None:
        # Computed from the global step on every rank (so the state stays rank independent),
        # logged by one.
        first, last = cursor // self.longest, (cursor + tokens - 1) // self.longest
        src, _, epoch = self.blocks(np.arange(first, last + 1, dtype=np.int64))
        for i in np.unique(src):
            e = int(epoch[src == i].max())
            if e > self._seen_epoch[i]:
                if e > 0 and self.dp_rank == 0 and self.sp_rank == 0:
                    log.warning(
                        "data.mix: source %r read all its %d blocks; starting its epoch %d",
                        self.source_names[i],
                        int(self.num_blocks[i]),
                        e,
                    )
                self._seen_epoch[i] = e

    # ---- iteration and state ---------------------------------------------------------------

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        step_tokens = self.micro_batch * self.dp_size * self.seq_len
        self._log_new_epochs(self.cursor, step_tokens)
        start = self.cursor + self.dp_rank * self.micro_batch * self.seq_len
        src, ids, starts = self.windows(start, self.micro_batch)
        self.cursor += step_tokens
        L1 = self.seq_len + 1
        windows = np.stack([self.stream.read(int(s), L1) for s in starts])  # (B, L+1)
        masks = None
        if self.stream.masks is not None:
            masks = np.stack([self.stream.read_mask(int(s), L1) for s in starts])  # (B, L+1)
        packed = pack(windows, starts, self.stream.doc_starts, masks, self.attention)
        batch = to_batch(packed, ids, self.sp_rank, self.sp_size, self.ring)
        batch["source_ids"] = torch.from_numpy(src.astype(np.int64))
        return batch

    def _mix_state(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "weight": s.weight, "num_blocks": int(n)}
            for s, n in zip(self.sources, self.num_blocks)
        ]

    def state_dict(self) -> dict[str, Any]:
        """The global token cursor and the current segment, plus what must match on resume
        (rank independent)."""
        return {
            "cursor": int(self.cursor),
            "origin": int(self.origin),
            "base": dict(zip(self.source_names, map(int, self.base))),
            "seq_len": self.seq_len,
            "longest": self.longest,
            "seed": self.seed,
            "mix": self._mix_state(),
            "tokenizer_hash": self.tokenizer_hash,
        }

    def _start_segment(self, sd: dict[str, Any]) -> None:
        """Continue a checkpoint made under another mixture: the new weights apply from the
        next block on, and each source continues its own order where it stopped."""
        old = sd["mix"]
        origin = -(-int(sd["cursor"]) // self.longest)
        o_origin = int(sd.get("origin", 0))
        o_base = sd.get("base") or {}
        sched = weighted_schedule([m["weight"] for m in old])
        period, r = divmod(origin - o_origin, len(sched))
        used = period * np.bincount(sched, minlength=len(old)) + np.bincount(
            sched[:r], minlength=len(old)
        )
        before = {m["name"]: int(o_base.get(m["name"], 0)) + int(n) for m, n in zip(old, used)}
        self.origin = origin
        self.base = np.array([before.get(n, 0) for n in self.source_names], dtype=np.int64)
        self.cursor = origin * self.longest
        if self.dp_rank == 0 and self.sp_rank == 0:
            log.warning(
                "data.mix: a new mixture from block %d on (%s)",
                origin,
                ", ".join(f"{s.name} {s.weight:.3g}" for s in self.sources),
            )

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue at the saved cursor, rounded up to this stage's window length.

        The sources, their weights and sizes must be the checkpoint's: the order of every
        earlier block depends on them.
        """
        now = self.state_dict()
        if "mix" in sd and sd["mix"] != now["mix"] and self.new_segment_ok:
            for key in ("longest", "seed", "tokenizer_hash"):
                if key in sd and sd[key] != now[key]:
                    raise LongtrainError(
                        f"loader state: {key}={sd[key]!r} in the checkpoint but {now[key]!r} "
                        "now; resume with the same stages, seed and tokenizer"
                    )
            self._start_segment(sd)
            self._seen_epoch = self._epochs_before(self.cursor)
            return
        for key in ("longest", "seed", "mix", "tokenizer_hash"):
            if key in sd and sd[key] != now[key]:
                raise LongtrainError(
                    f"loader state: {key}={sd[key]!r} in the checkpoint but {now[key]!r} now; "
                    "resume with the same data.mix (names, weights, data), stages and seed"
                )
        self.origin = int(sd.get("origin", 0))
        base = sd.get("base") or {}
        self.base = np.array([int(base.get(n, 0)) for n in self.source_names], dtype=np.int64)
        c = int(sd["cursor"])
        self.cursor = -(-c // self.seq_len) * self.seq_len
        self._seen_epoch = self._epochs_before(self.cursor)


def mixture_validation_batches(
    sources: Sequence[MixSource | dict],
    seq_len: int,
    micro_batch: int = 1,
    dp_rank: int = 0,
    dp_size: int = 1,
    sp_rank: int = 0,
    sp_size: int = 1,
    max_batches: int | None = None,
    attention: str = "document",
    tokenizer_hash: str | None = None,
    ring: int = 1,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source name, batch)`` over every source's ``val`` split, source after source.

    Each source's batches are :func:`~longtrain.data.loader.validation_batches` of its dir
    (every window once, the same count on every rank, ``max_batches`` per source), with
    ``source_ids`` set, so the caller can report ``val_loss/<name>`` per source.
    """
    sources = check_mix(list(sources))
    for i, s in enumerate(sources):
        try:
            batches = validation_batches(
                s.dir, seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size,
                max_batches, attention, tokenizer_hash, ring,
            )  # fmt: skip
            for batch in batches:
                batch["source_ids"] = torch.full((micro_batch,), i, dtype=torch.int64)
                yield s.name, batch
        except LongtrainError as e:
            raise LongtrainError(f"data.mix[{i}] {s.name!r}: {e}") from None
