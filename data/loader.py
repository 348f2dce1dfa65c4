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
core sees the whole sequence after the Ulysses all-to-all). With ring attention
(``ring > 1``, hybrid SP ``P = ulysses x ring``) SP rank ``s`` keeps the tokens
:func:`sp_shard_indices` names instead: its ring rank's two zigzag chunks, cut into
``ulysses`` pieces; the same indices cut inputs, labels and positions, so labels stay shifted
before the split and every document keeps its positions, however it straddles the chunks.

Integrity: :func:`open_split` checks each file's header and size against the manifest;
:func:`verify_data_dir` (called once at start-up) adds sha256 and token-range checks, with a
cached verdict, so a damaged shard is named instead of training silently or crashing later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from longtrain.data.packing import (
    ATTENTION_MODES,
    IGNORE_INDEX,
    TokenStream,
    num_windows,
    pack_from_stream,
)
from longtrain.data.prepare import VERIFIED, write_json_atomic
from longtrain.model.errors import LongtrainError
from longtrain.model.ring_attention import ring_portion

MANIFEST = "manifest.json"


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``<data_dir>/manifest.json``, or one clear error naming the directory and the fix.

    The one reader of manifests: the trainer, the loaders and eval all come through here.
    """
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise LongtrainError(
            f"data.dir {data_dir}: no such directory; create it with "
            f"`longtrain prepare --out {data_dir}`"
        )
    if not path.is_file():
        raise LongtrainError(
            f"data.dir {data_dir}: no {MANIFEST} (not a prepared data directory); "
            f"run `longtrain prepare --out {data_dir}` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongtrainError(
            f"{path}: line {e.lineno}: not valid JSON ({e.msg}); run `longtrain prepare` again"
        ) from None


def _rerun(d: Path) -> str:
    return (
        f"re-run `longtrain prepare --out {d}` with the options it was made with (it "
        "re-verifies every shard and redoes the damaged ones)"
    )


def _npy_layout(path: Path, rerun: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from a ``.npy`` header, reading nothing else."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            return tuple(shape), dtype, f.tell()
    except FileNotFoundError:
        raise LongtrainError(f"{path}: missing shard; {rerun}") from None
    except (OSError, ValueError, EOFError) as e:
        raise LongtrainError(f"{path}: not a readable .npy file ({e}); {rerun}") from None


def _check_npy(path: Path, dtype: np.dtype, length: int | None, rerun: str) -> int:
    """Header and file size agree with the manifest (before any memory map: numpy's own
    error for a short file is "mmap length is greater than file size"); the data offset."""
    shape, got, offset = _npy_layout(path, rerun)
    if got != dtype or len(shape) != 1 or (length is not None and shape[0] != length):
        dims = ",".join(map(str, shape))
        raise LongtrainError(
            f"{path}: {got}[{dims}] but the manifest says {dtype}[{length}]; {rerun}"
        )
    need, size = offset + shape[0] * dtype.itemsize, path.stat().st_size
    if size < need:
        raise LongtrainError(
            f"{path}: truncated ({size} bytes; its header and the manifest need {need}); {rerun}"
        )
    if size > need:
        raise LongtrainError(f"{path}: {size - need} bytes past the end of its data; {rerun}")
    return offset


def _shard_files(d: Path, sh: dict[str, Any], dtype: np.dtype) -> list[tuple[Path, np.dtype, int | None, str]]:  # fmt: skip
    """``(path, dtype, length, kind)`` of each file of one shard, as the manifest describes it."""
    n = int(sh["stored_tokens"])
    docs = sh.get("documents")
    files = [
        (d / sh["tokens"], dtype, n, "tokens"),
        (d / sh["index"], np.dtype(np.int64), None if docs is None else int(docs) + 1, "index"),
    ]
    if sh.get("mask"):
        files.append((d / sh["mask"], np.dtype(np.uint8), n, "mask"))
    return files


def _load_index(path: Path, stored_tokens: int, rerun: str) -> np.ndarray:
    off = np.load(path)
    if len(off) == 0 or off[0] != 0 or off[-1] != stored_tokens or (np.diff(off) < 0).any():
        raise LongtrainError(
            f"{path}: document offsets do not run from 0 up to the shard's {stored_tokens} "
            f"tokens; {rerun}"
        )
    return off


def open_split(
    data_dir: str | Path, split: str, tokenizer_hash: str | None = None
) -> tuple[TokenStream, dict[str, Any]]:
    """Memory-map the shards of ``split``; checks the tokenizer hash when one is given.

    Every file's presence, dtype, length and size is checked against the manifest first
    (cheap: headers and ``stat``); :func:`verify_data_dir` adds hashes and token ranges.
    """
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
    dtype, rerun = np.dtype(manifest["dtype"]), _rerun(d)
    tokens, offsets, masks = [], [], []
    for sh in shards:
        for path, want, length, kind in _shard_files(d, sh, dtype):
            _check_npy(path, want, length, rerun)
            if kind == "tokens":
                tokens.append(np.load(path, mmap_mode="r"))
            elif kind == "index":
                offsets.append(_load_index(path, int(sh["stored_tokens"]), rerun))
            else:
                masks.append(np.load(path, mmap_mode="r"))
    return TokenStream.from_arrays(tokens, offsets, masks or None), manifest


# Verdicts of this process, for directories where .verified.json cannot be written.
_VERDICTS: dict[str, dict[str, Any]] = {}
_SCAN_BLOCK = 1 << 24  # bytes read (and hashed, and range-checked) at a time


def _scan(path: Path, offset: int, dtype: np.dtype, limit: int | None, bar: tqdm) -> tuple[str, tuple[int, int] | None]:  # fmt: skip
    """sha256 of the file and, with ``limit``, the first ``(position, value) >= limit``.

    One pass over the bytes for both, so a data directory is read once, not twice.
    """
    h, bad, pos = hashlib.sha256(), None, 0
    block = max(1, _SCAN_BLOCK // dtype.itemsize) * dtype.itemsize  # whole items per block
    with open(path, "rb") as f:
        h.update(f.read(offset))
        while data := f.read(block):
            h.update(data)
            if limit is not None and bad is None:
                a = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
                over = np.flatnonzero(a >= limit)
                if len(over):
                    bad = (pos + int(over[0]), int(a[over[0]]))
                pos += len(a)
            bar.update(len(data))
    return h.hexdigest(), bad


def _cached_verdicts(d: Path) -> dict[str, Any]:
    try:
        files = json.loads((d / VERIFIED).read_text()).get("files")
        if isinstance(files, dict):
            return files
    except (OSError, ValueError, AttributeError):
        pass
    return _VERDICTS.get(str(d.resolve()), {})


def verify_data_dir(data_dir: str | Path, progress: bool = True) -> None:
    """Check every file the manifest lists, or raise one error naming the file and the fix.

    Size, dtype and length from each ``.npy`` header (a truncated shard is named, not
    memory-mapped); the sha256 recorded in the manifest; token ids below the manifest's
    ``vocab_size`` (an ``IndexError`` in the embedding otherwise) and mask values in {0, 1};
    document offsets from 0 to the shard's length. The bytes are read once per data
    directory: a passing verdict is cached in ``<data_dir>/.verified.json``, per file keyed
    by size, mtime, the manifest's sha256 and vocab size, so later calls only ``stat`` (a
    changed file is checked again). Without write access the verdict is kept in this process
    only. Call it before any process group: it is the same on every rank.
    """
    d = Path(data_dir)
    manifest = load_manifest(d)
    dtype, vocab, rerun = np.dtype(manifest["dtype"]), manifest.get("vocab_size"), _rerun(d)
    entries: dict[str, Any] = {}
    todo = []
    for info in manifest["splits"].values():
        for sh in info["shards"]:
            for path, want, length, kind in _shard_files(d, sh, dtype):
                offset = _check_npy(path, want, length, rerun)
                st = path.stat()
                key = {
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "sha256": sh.get("sha256", {}).get(path.name),
                    "vocab_size": vocab if kind == "tokens" else None,
                }
                entries[path.name] = key
                todo.append((path, key, offset, want, kind, int(sh["stored_tokens"])))
    cached = _cached_verdicts(d)
    todo = [t for t in todo if cached.get(t[0].name) != t[1]]
    if not todo:
        return
    total = sum(t[1]["size"] for t in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {d}", disable=not progress) as bar:  # fmt: skip
        for path, key, offset, want, kind, stored in todo:
            limit = {"tokens": vocab, "mask": 2}.get(kind)
            digest, bad = _scan(path, offset, want, limit, bar)
            if key["sha256"] and digest != key["sha256"]:
                raise LongtrainError(
                    f"{path}: sha256 {digest[:12]} does not match {key['sha256'][:12]} in the "
                    f"manifest (the file changed after prepare wrote it); {rerun}"
                )
            if bad is not None and kind == "tokens":
                raise LongtrainError(
                    f"{path}: token id {bad[1]} at position {bad[0]} is not below vocab_size "
                    f"{vocab} of {d / MANIFEST}; {rerun}"
                )
            if bad is not None:
                raise LongtrainError(
                    f"{path}: mask value {bad[1]} at position {bad[0]} (must be 0 or 1); {rerun}"
                )
            if kind == "index":
                _load_index(path, stored, rerun)
    _VERDICTS[str(d.resolve())] = entries
    try:
        write_json_atomic(d / VERIFIED, {"files": entries})
    except OSError:
        pass  # a read-only data directory: verified, just not cached on disk


def check_parallel(seq_len: int, micro_batch: int, dp_rank: int, dp_size: int, sp_rank: int, sp_size: int, attention: str, ring: int = 1) -> None:  # fmt: skip
    """The rank and window arguments every loader takes, checked once for all of them."""
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
    if ring < 1 or sp_size % ring:
        raise LongtrainError(f"ring={ring}: must divide the sequence-parallel size {sp_size}")
    if ring > 1 and seq_len % (2 * sp_size):
        raise LongtrainError(
            f"seq_len={seq_len}: ring attention cuts windows into 2 x ring chunks split over "
            f"the Ulysses ranks; use a multiple of 2 x sp = {2 * sp_size}"
        )
    if attention not in ATTENTION_MODES:
        raise LongtrainError(f"attention={attention!r}: choose one of {ATTENTION_MODES}")


def sp_shard_indices(seq_len: int, sp_rank: int, sp: int, ring: int = 1) -> np.ndarray:
    """Window positions SP rank ``sp_rank`` of ``sp`` holds, in its local order (int64).

    ``ring=1``: the contiguous ``[s*L/sp, (s+1)*L/sp)``. Hybrid SP (``sp = ulysses x ring``,
    ``ulysses_rank = s % ulysses``, ``ring_rank = s // ulysses``): the ring rank's zigzag
    portion (``longtrain.model.ring_attention.ring_portion``: chunks ``r`` and ``2R-1-r`` of
    ``2R``) cut into ``ulysses`` contiguous pieces, piece ``ulysses_rank``. The Ulysses
    all-to-all concatenates the pieces in rank order, which gives the ring core its portion.
    """
    if ring == 1:
        return np.arange(sp_rank * seq_len // sp, (sp_rank + 1) * seq_len // sp, dtype=np.int64)
    u = sp // ring
    portion = ring_portion(seq_len, sp_rank // u, ring)  # (L/R,)
    n = len(portion) // u
    j = sp_rank % u
    return portion[j * n : (j + 1) * n]


def to_batch(
    packed: dict[str, Any], sample_ids: np.ndarray, sp_rank: int, sp_size: int, ring: int = 1
) -> dict[str, Any]:
    """The loader contract from packed windows: this SP rank's shard of inputs, shifted labels
    and positions (:func:`sp_shard_indices`), the full window's ``cu_seqlens`` and
    ``max_seqlen``, and the sample ids."""
    L = packed["input_ids"].shape[1]
    if ring == 1:
        cut = slice(sp_rank * L // sp_size, (sp_rank + 1) * L // sp_size)
    else:
        cut = sp_shard_indices(L, sp_rank, sp_size, ring)  # zigzag: an index, not a slice
    # Shifted labels are cut like the inputs: the label at a shard boundary stays with the
    # input that predicts it.
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(packed["input_ids"][:, cut])),
        "labels": torch.from_numpy(np.ascontiguousarray(packed["labels"][:, cut])),
        "position_ids": torch.from_numpy(np.ascontiguousarray(packed["position_ids"][:, cut])),
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
        ring: int = 1,
    ) -> None:
        check_parallel(seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size, attention, ring)
        self.ring = ring
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
        return to_batch(packed, ids, self.sp_rank, self.sp_size, self.ring)

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
    ring: int = 1,
) -> Iterator[dict[str, Any]]:
    """Every window of the ``val`` split once, in order, sliced like :class:`DistributedLoader`.

    All ranks yield the same number of batches (collectives stay in step): the last step is
    padded with repeats of window 0 whose labels are all ``-100`` and ``sample_ids`` are -1, so
    they add no loss and no token count.
    """
    check_parallel(seq_len, micro_batch, dp_rank, dp_size, sp_rank, sp_size, attention, ring)
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
        yield to_batch(packed, np.where(valid, g, -1), sp_rank, sp_size, ring)
