"""Parallel tokenization of a corpus into memory-mapped shards + ``manifest.json``.

Layout of a data directory::

    manifest.json            what the loader reads (see ``prepare`` for its fields)
    prepare_state.json       finished chunks, for resuming; ``complete`` once done
    tokenizer/               copy of the tokenizer the shards were made with
    train_00000.npy          tokens: every document followed by EOS (uint16 or uint32)
    train_00000.idx.npy      int64 (n_docs + 1,): document offsets into the token shard
    train_00000.mask.npy     uint8 SFT target mask (``--sft`` only)
    val_00000.npy ...        the held-out split, same layout

Documents are read in the corpus order, tokenized by a pool of workers with order preserved
(``imap``), and cut into *chunks*: a chunk closes when it holds ``shard_tokens`` tokens and
writes one shard per split. The output therefore depends only on the corpus, tokenizer and
options, never on the number of workers. Each file is written under a temporary name and
renamed; the state file records each finished chunk with its files' sha256 and the number of
corpus records consumed. A re-run verifies those hashes, keeps the verified prefix, skips the
consumed records without tokenizing them, and continues; a complete run is a no-op.

A document goes to ``val`` when the first 8 bytes of sha256(doc id), as a fraction of 2**64,
are below ``val_fraction``: the same split for every run and worker count.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longtrain.data.corpus import CorpusSpec, CorpusStats, iter_rows, record_text
from longtrain.data.tokenizer import MODEL_FILE, Tokenizer, copy_tokenizer, file_sha256
from longtrain.model.errors import LongtrainError

MANIFEST = "manifest.json"
STATE = "prepare_state.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split: a hash of the document id, independent of order and workers."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


def available_cores() -> int:
    """Cores this process may run on (the affinity mask under SLURM/containers)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---- workers ---------------------------------------------------------------------------------

_TOK: Tokenizer | None = None
_SFT = False
_TEXT_FIELD = "text"


def _init_worker(model_bytes: bytes, meta: dict, sft: bool, text_field: str) -> None:
    global _TOK, _SFT, _TEXT_FIELD
    _TOK, _SFT, _TEXT_FIELD = Tokenizer(model_bytes, meta), sft, text_field


def _encode(
    item: tuple[str, dict],
) -> tuple[str, np.ndarray | None, np.ndarray | None, str | None]:
    """(doc_id, ids + EOS, mask, error): ids None for an empty document, error for a bad record.

    Arrays (not lists) travel back to the parent: pickling them is far cheaper.
    """
    from longtrain.data.sft import encode_record

    doc_id, row = item
    assert _TOK is not None
    dtype = token_dtype(_TOK.vocab_size)
    try:
        if _SFT:
            ids, mask = encode_record(_TOK, doc_id, row)
            # EOS closes the record like any document; it is not a trained target.
            return (
                doc_id,
                np.array([*ids, _TOK.eos_id], dtype=dtype),
                np.array([*mask, 0], dtype=np.uint8),
                None,
            )
        text = record_text(doc_id, row, _TEXT_FIELD)
    except LongtrainError as e:
        return doc_id, None, None, str(e)
    # Whitespace-only documents (empty __init__.py files) carry nothing to learn.
    if not text.strip():
        return doc_id, None, None, None
    return doc_id, np.array([*_TOK.encode(text), _TOK.eos_id], dtype=dtype), None, None


# ---- files -----------------------------------------------------------------------------------


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy under a temp name, rename, and return the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    return file_sha256(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _Throttle:
    """Bounds the records handed to the pool but not yet consumed by the parent."""

    def __init__(self, limit: int) -> None:
        self.sem = threading.Semaphore(limit)
        self.stop = threading.Event()

    def feed(self, rows: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        for row in rows:
            self.sem.acquire()
            if self.stop.is_set():
                return
            yield row

    def close(self) -> None:
        # Wake a feeder blocked in acquire() so the pool's task thread can end (terminate()
        # joins it).
        self.stop.set()
        self.sem.release()


def verify_shard(data_dir: Path, shard: dict) -> bool:
    """True when every file of a shard exists with its recorded sha256."""
    return all(
        (data_dir / name).is_file() and file_sha256(data_dir / name) == digest
        for name, digest in shard["sha256"].items()
    )


class _Chunk:
    """Documents (ids + EOS) of one chunk, per split, until written."""

    def __init__(self) -> None:
        self.ids: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.stored = 0

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self.ids[split].append(ids)
        if mask is not None:
            self.masks[split].append(mask)
        self.stored += len(ids)

    def write(self, out: Path, index: int, sft: bool) -> dict[str, dict]:
        shards = {}
        for split in SPLITS:
            docs = self.ids[split]
            if not docs:
                continue
            name = f"{split}_{index:05d}"
            lengths = np.array([len(d) for d in docs], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            sha = {
                f"{name}.npy": _save_npy(out / f"{name}.npy", np.concatenate(docs)),
                f"{name}.idx.npy": _save_npy(out / f"{name}.idx.npy", offsets),
            }
            if sft:
                m = np.concatenate(self.masks[split])
                sha[f"{name}.mask.npy"] = _save_npy(out / f"{name}.mask.npy", m)
            shards[split] = {
                "tokens": f"{name}.npy",
                "index": f"{name}.idx.npy",
                "mask": f"{name}.mask.npy" if sft else None,
                "documents": len(docs),
                "stored_tokens": int(offsets[-1]),
                "sha256": sha,
            }
        return shards


def _empty_counts() -> dict[str, dict[str, int]]:
    return {s: {"documents": 0, "tokens": 0, "stored_tokens": 0} for s in SPLITS}


def _load_state(out: Path, fingerprint: dict) -> tuple[list[dict], bool]:
    """Finished chunks whose files verify (a prefix), and whether the run was complete."""
    path = out / STATE
    if not path.is_file():
        return [], False
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return [], False
    if state.get("fingerprint") != fingerprint:
        print(f"{out}: prepared with other options or tokenizer; preparing again")
        for chunk in state.get("chunks", []):
            for shard in chunk["shards"].values():
                for name in shard["sha256"]:
                    (out / name).unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        return [], False
    good = []
    for chunk in state["chunks"]:
        if not all(verify_shard(out, s) for s in chunk["shards"].values()):
            print(f"{out}: chunk {chunk['index']} is missing or corrupt; redoing from there")
            return good, False
        good.append(chunk)
    return good, bool(state.get("complete"))


def prepare(
    spec: CorpusSpec,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    workers: int | None = None,
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    sft: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``spec`` into ``out_dir``; returns the manifest (also written as JSON).

    Manifest fields: ``format``, ``tokenizer_hash``, ``vocab_size``, ``dtype``, ``eos_id``,
    ``sft``, ``documents`` / ``tokens`` (tokens exclude the EOS after each document;
    ``stored_tokens`` include it), ``dropped_empty``, ``bad_records``, ``skipped_undecodable``,
    ``val_fraction``, ``source``, and ``splits.<train|val>`` with counts and the shard list
    (file names, document and token counts, per-file sha256).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LongtrainError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise LongtrainError(f"--shard-tokens {shard_tokens}: must be positive")
    workers = workers or available_cores()
    if workers < 1:
        raise LongtrainError(f"--workers {workers}: must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    fingerprint = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "source": spec.describe(),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "sft": sft,
        "skip_bad": spec.skip_bad,
    }
    chunks, complete = _load_state(out, fingerprint)
    if complete and (out / MANIFEST).is_file():
        print(f"{out}: already prepared, {len(chunks)} chunks verified")
        return json.loads((out / MANIFEST).read_text())
    copy_tokenizer(tokenizer_dir, out / "tokenizer")

    records_done = chunks[-1]["records_end"] if chunks else 0
    counts = copy.deepcopy(chunks[-1]["counts"]) if chunks else _empty_counts()
    dropped = chunks[-1]["dropped_empty"] if chunks else 0
    # Records rejected by the workers (SFT validation); malformed lines are counted by the
    # corpus reader, which re-reads the skipped prefix on resume.
    bad_encoded = chunks[-1]["bad_records"] if chunks else 0
    stats = CorpusStats()
    rows: Iterator[tuple[str, dict]] = iter_rows(spec, stats)
    if records_done:
        print(f"{out}: resuming after {len(chunks)} verified chunks ({records_done} records)")
        rows = itertools.islice(rows, records_done, None)
    state = {"fingerprint": fingerprint, "chunks": chunks, "complete": False}
    _write_json(out / STATE, state)

    model_bytes = (Path(tokenizer_dir) / MODEL_FILE).read_bytes()
    init_args = (model_bytes, tok.meta, sft, spec.text_field)
    pool = None
    if workers > 1:
        pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(
            workers, _init_worker, init_args
        )
        # Pool.imap drains its input eagerly in a feeder thread; the semaphore bounds the
        # records in flight so a corpus larger than memory streams through.
        throttle = _Throttle(workers * 256)
        results = pool.imap(_encode, throttle.feed(rows), chunksize=16)
    else:
        throttle = None
        _init_worker(*init_args)
        results = map(_encode, rows)

    chunk, n_records, t0 = _Chunk(), records_done, time.time()
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, initial=records_done)

    def flush() -> None:
        index = len(state["chunks"])
        shards = chunk.write(out, index, sft)
        for split, sh in shards.items():
            counts[split]["stored_tokens"] += sh["stored_tokens"]
        state["chunks"].append(
            {
                "index": index,
                "records_end": n_records,
                "shards": shards,
                "counts": copy.deepcopy(counts),
                "dropped_empty": dropped,
                "bad_records": bad_encoded,
            }
        )
        _write_json(out / STATE, state)

    try:
        for doc_id, ids, mask, error in results:
            if throttle is not None:
                throttle.sem.release()
            n_records += 1
            bar.update(1)
            if error is not None:
                if not spec.skip_bad:
                    raise LongtrainError(error)
                bad_encoded += 1
                if len(stats.first_bad) < 10:
                    stats.first_bad.append(error)
                continue
            if ids is None:
                dropped += 1
                continue
            split = "val" if is_val(doc_id, val_fraction) else "train"
            chunk.add(split, ids, mask)
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids) - 1
            if chunk.stored >= shard_tokens:
                flush()
                chunk = _Chunk()
        if chunk.stored:
            flush()
    finally:
        bar.close()
        if throttle is not None:
            throttle.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    all_chunks = state["chunks"]
    if not all_chunks:
        raise LongtrainError(
            f"--corpus {spec.source}: no non-empty documents ({dropped} empty dropped)"
        )
    splits = {
        s: {
            **counts[s],
            "shards": [c["shards"][s] for c in all_chunks if s in c["shards"]],
        }
        for s in SPLITS
    }
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "sft": sft,
        "documents": sum(counts[s]["documents"] for s in SPLITS),
        "tokens": sum(counts[s]["tokens"] for s in SPLITS),
        "stored_tokens": sum(counts[s]["stored_tokens"] for s in SPLITS),
        "dropped_empty": dropped,
        "bad_records": stats.bad_records + bad_encoded,
        "first_bad": stats.first_bad,
        "skipped_undecodable": stats.undecodable,
        "val_fraction": val_fraction,
        "source": spec.describe(),
        "splits": splits,
    }
    _write_json(out / MANIFEST, manifest)
    state["complete"] = True
    _write_json(out / STATE, state)
    dt = time.time() - t0
    print(
        f"wrote {out}: {manifest['documents']} documents, {manifest['tokens']} tokens "
        f"({splits['val']['documents']} docs in val), {dropped} empty dropped, "
        f"{manifest['bad_records']} bad skipped, {dt:.1f}s"
    )
    if stats.undecodable:
        print(f"skipped {len(stats.undecodable)} undecodable stdlib files: {stats.undecodable}")
    return manifest


def cli_prepare(args: argparse.Namespace) -> int:
    """``longtrain prepare``."""
    prepare(
        CorpusSpec.from_args(args),
        args.tokenizer,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        sft=args.sft,
    )
    return 0
