"""Parallel tokenization of a corpus into memory-mapped shards + ``manifest.json``.

Layout of a data directory::

    manifest.json            what the loader reads (see ``prepare`` for its fields)
    prepare_state.json       finished chunks, for resuming; ``complete`` once done
    .verified.json           the loader's cached integrity verdict (``verify_data_dir``)
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

Nothing already prepared is lost. The corpus is opened and its first record read before
anything in ``--out`` is touched. A complete dataset made with other options or another
tokenizer, or a ``manifest.json`` that prepare did not write, is refused unless
``--overwrite``; then the new dataset is built (resumably) in the sibling
``.<out>.prepare-new`` and swapped in by two renames only once complete, the old one passing
through ``.<out>.prepare-old`` (a prepare that finds it there after a crash puts it back).
Only an *unfinished* prepare with other options is discarded in place.

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
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longtrain.data.corpus import CorpusSpec, CorpusStats, iter_rows, record_text
from longtrain.data.tokenizer import MODEL_FILE, Tokenizer, copy_tokenizer, file_sha256
from longtrain.model.errors import LongtrainError

MANIFEST = "manifest.json"
STATE = "prepare_state.json"
VERIFIED = ".verified.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Fingerprint keys added after format 1 shipped, with the value that older data implicitly
# had: they enter the fingerprint only when different, so old data still resumes.
_FINGERPRINT_DEFAULTS = {"min_doc_tokens": 0, "group_by": "file"}
# What prepare itself writes into --out (and the temp names of those files): anything else
# there belongs to the user, and --overwrite, which replaces the whole directory, refuses.
_OURS = re.compile(
    r"^(manifest\.json|prepare_state\.json|\.verified\.json|tokenizer"
    r"|(train|val)_\d{5,}(\.idx|\.mask)?\.npy)(\.\d+)?(\.tmp)?$"
)


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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temp name unique to this process, then rename: readers (and other
    ranks writing the same file) see the old or the new file, never a half-written one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy under a temp name, rename, and return the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    return file_sha256(path)


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


def _read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def sibling_dir(out: Path, role: str) -> Path:
    """``.<name>.prepare-<role>`` beside ``out``: where a replacement is built (``new``) and
    where the replaced dataset waits during the swap (``old``). On the same filesystem as
    ``out``, so both moves are renames."""
    return out.parent / f".{out.name}.prepare-{role}"


def doc_length_stats(lengths: np.ndarray) -> dict[str, int]:
    """``count``, ``p50``, ``p90``, ``max`` of document lengths (tokens, EOS excluded)."""
    if len(lengths) == 0:
        return {"count": 0, "p50": 0, "p90": 0, "max": 0}
    p50, p90 = np.percentile(lengths, [50, 90], method="lower")
    return {"count": len(lengths), "p50": int(p50), "p90": int(p90), "max": int(lengths.max())}


def _split_doc_lengths(out: Path, shards: list[dict]) -> np.ndarray:
    # From the index files rather than counted on the fly: a resumed run has them all.
    parts = [np.diff(np.load(out / sh["index"])) - 1 for sh in shards]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _fingerprint_diff(old: dict, new: dict) -> str:
    """``key old -> new`` for every option that differs (the corpus description flattened)."""

    def flat(fp: dict) -> dict:
        d = {**_FINGERPRINT_DEFAULTS, **{k: v for k, v in fp.items() if k != "source"}}
        d.update(fp.get("source") or {})
        if isinstance(d.get("tokenizer_hash"), str):
            d["tokenizer_hash"] = d["tokenizer_hash"][:12]
        return d

    a, b = flat(old), flat(new)
    keys = [*b, *(k for k in a if k not in b)]
    diff = [f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in keys if a.get(k) != b.get(k)]
    return ", ".join(diff) or "another format"


def _replace_reason(out: Path, fingerprint: dict) -> str | None:
    """Why preparing into ``out`` would replace an existing dataset; None when it would only
    create, resume or verify one (an unfinished prepare with other options is not a
    dataset: :func:`_load_state` discards it)."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        return None
    state, manifest = _read_json(out / STATE), _read_json(manifest_path)
    ours = (
        isinstance(state, dict)
        and isinstance(state.get("fingerprint"), dict)
        and isinstance(manifest, dict)
        and manifest.get("format") == FORMAT_VERSION
        and manifest.get("tokenizer_hash") == state["fingerprint"].get("tokenizer_hash")
    )
    if not ours:
        return f"{manifest_path}: not written by `longtrain prepare` (no matching {STATE})"
    if state["fingerprint"] != fingerprint:
        diff = _fingerprint_diff(state["fingerprint"], fingerprint)
        return f"{out}: holds a dataset prepared with other options or tokenizer ({diff})"
    return None


def _recover_swap(out: Path) -> None:
    """Finish what a prepare stopped between the renames of a swap left behind."""
    old = sibling_dir(out, "old")
    if not old.exists():
        return
    if not out.exists():
        os.replace(old, out)
        print(f"{out}: put back the dataset that a stopped `prepare --overwrite` was replacing")
        return
    state = _read_json(out / STATE)
    if isinstance(state, dict) and state.get("complete") and (out / MANIFEST).is_file():
        shutil.rmtree(old)  # the swap was done; only removing the replaced copy was cut short
        return
    raise LongtrainError(
        f"{old}: the dataset that a stopped `prepare --overwrite` was replacing, while {out} "
        f"exists too; move it back to {out} or delete it, then re-run"
    )


def _swap_in(new: Path, out: Path) -> None:
    """Replace ``out`` by the complete dataset ``new``: two renames, then the old one goes."""
    old = sibling_dir(out, "old")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def _open_corpus(spec: CorpusSpec, stats: CorpusStats) -> Iterator[tuple[str, dict]]:
    """The corpus's records with the first one already read, so that a missing file, a
    mistyped glob or an unreadable format fails here, before anything is removed."""
    rows = iter_rows(spec, stats)
    first = next(rows, None)
    return rows if first is None else itertools.chain([first], rows)


def _load_state(out: Path, fingerprint: dict) -> tuple[list[dict], bool]:
    """Finished chunks whose files verify (a prefix), and whether the run was complete.

    State of another fingerprint is an unfinished prepare (``_replace_reason`` sends complete
    datasets elsewhere): its files are discarded.
    """
    path = out / STATE
    if not path.is_file():
        return [], False
    state = _read_json(path)
    if not isinstance(state, dict):
        return [], False
    if state.get("fingerprint") != fingerprint:
        print(f"{out}: discarding an unfinished prepare made with other options or tokenizer")
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
    overwrite: bool = False,
    min_doc_tokens: int = 0,
) -> dict[str, Any]:
    """Tokenize ``spec`` into ``out_dir``; returns the manifest (also written as JSON).

    Manifest fields: ``format``, ``tokenizer_hash``, ``vocab_size``, ``dtype``, ``eos_id``,
    ``sft``, ``documents`` / ``tokens`` (tokens exclude the EOS after each document;
    ``stored_tokens`` include it), ``dropped_empty``, ``dropped_short`` (fewer than
    ``min_doc_tokens`` tokens), ``min_doc_tokens``, ``group_by``, ``bad_records``,
    ``skipped_undecodable``, ``val_fraction``, ``source``, and ``splits.<train|val>`` with
    counts, ``doc_lengths`` (``count``/``p50``/``p90``/``max`` tokens) and the shard list
    (file names, document and token counts, per-file sha256).

    ``overwrite`` allows replacing a complete dataset made with other options (or a directory
    whose ``manifest.json`` prepare did not write); see the module docstring for how.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LongtrainError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise LongtrainError(f"--shard-tokens {shard_tokens}: must be positive")
    if min_doc_tokens < 0:
        raise LongtrainError(f"--min-doc-tokens {min_doc_tokens}: must be 0 or more")
    workers = workers or available_cores()
    if workers < 1:
        raise LongtrainError(f"--workers {workers}: must be at least 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LongtrainError(
            f"--out {out}: is a file, not a directory; give the path of a data directory "
            "(it is created when missing)"
        )
    tok = Tokenizer.load(tokenizer_dir)
    fingerprint = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "source": spec.describe(),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "sft": sft,
        "skip_bad": spec.skip_bad,
    }
    if min_doc_tokens != _FINGERPRINT_DEFAULTS["min_doc_tokens"]:
        fingerprint["min_doc_tokens"] = min_doc_tokens
    job = _Job(
        spec,
        Path(tokenizer_dir),
        tok,
        fingerprint,
        workers,
        val_fraction,
        shard_tokens,
        sft,
        progress,
        min_doc_tokens,
    )
    _recover_swap(out)
    state = _read_json(out / STATE)
    done = isinstance(state, dict) and state.get("fingerprint") == fingerprint
    if not (done and state.get("complete") and (out / MANIFEST).is_file()):
        # Anything but re-verifying a finished run reads the corpus: open it now, while
        # nothing in --out has been touched.
        job.rows = _open_corpus(spec, job.stats)
    reason = _replace_reason(out, fingerprint) if out.is_dir() else None
    if reason is None:
        return _build(out, job)
    if not overwrite:
        raise LongtrainError(
            f"{reason}; pass --overwrite to replace it (the new dataset is built beside it and "
            "swapped in only once complete), or choose another --out"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise LongtrainError(
            f"--out {out}: also holds {', '.join(foreign[:5])}{more}, which longtrain did not "
            "write, and --overwrite replaces the whole directory; move them out or choose "
            "another --out"
        )
    new = sibling_dir(out, "new")
    if new.exists():
        st = _read_json(new / STATE)
        if not (isinstance(st, dict) and st.get("fingerprint") == fingerprint):
            shutil.rmtree(new)  # our own scratch from an --overwrite with other options
    print(f"{reason}: building its replacement in {new}")
    manifest = _build(new, job)
    _swap_in(new, out)
    print(f"{out}: replaced by the new dataset")
    return manifest


@dataclass
class _Job:
    """What one ``prepare`` call builds, handed to :func:`_build`."""

    spec: CorpusSpec
    tokenizer_dir: Path
    tok: Tokenizer
    fingerprint: dict
    workers: int
    val_fraction: float
    shard_tokens: int
    sft: bool
    progress: bool
    min_doc_tokens: int
    stats: CorpusStats = field(default_factory=CorpusStats)
    rows: Iterator[tuple[str, dict]] | None = None
    """The opened corpus (see :func:`_open_corpus`); None until something must be read."""


def _build(out: Path, job: _Job) -> dict[str, Any]:
    """Create, resume or re-verify the dataset of ``job`` in ``out``; returns its manifest."""
    spec, tok, sft, val_fraction = job.spec, job.tok, job.sft, job.val_fraction
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    chunks, complete = _load_state(out, job.fingerprint)
    if complete and (out / MANIFEST).is_file():
        print(f"{out}: already prepared, {len(chunks)} chunks verified")
        return json.loads((out / MANIFEST).read_text())
    copy_tokenizer(job.tokenizer_dir, out / "tokenizer")

    last = chunks[-1] if chunks else {}
    records_done = last.get("records_end", 0)
    counts = copy.deepcopy(last["counts"]) if chunks else _empty_counts()
    dropped = last.get("dropped_empty", 0)
    dropped_short = last.get("dropped_short", 0)
    # Records rejected by the workers (SFT validation); malformed lines are counted by the
    # corpus reader, which re-reads the skipped prefix on resume.
    bad_encoded = last.get("bad_records", 0)
    stats = job.stats
    rows = job.rows if job.rows is not None else _open_corpus(spec, stats)
    if records_done:
        print(f"{out}: resuming after {len(chunks)} verified chunks ({records_done} records)")
        rows = itertools.islice(rows, records_done, None)
    state = {"fingerprint": job.fingerprint, "chunks": chunks, "complete": False}
    write_json_atomic(out / STATE, state)

    model_bytes = (job.tokenizer_dir / MODEL_FILE).read_bytes()
    init_args = (model_bytes, tok.meta, sft, spec.text_field)
    pool = None
    if job.workers > 1:
        pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(
            job.workers, _init_worker, init_args
        )
        # Pool.imap drains its input eagerly in a feeder thread; the semaphore bounds the
        # records in flight so a corpus larger than memory streams through.
        throttle = _Throttle(job.workers * 256)
        results = pool.imap(_encode, throttle.feed(rows), chunksize=16)
    else:
        throttle = None
        _init_worker(*init_args)
        results = map(_encode, rows)

    chunk, n_records, t0 = _Chunk(), records_done, time.time()
    bar = tqdm(desc="tokenizing", unit="doc", disable=not job.progress, initial=records_done)

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
                "dropped_short": dropped_short,
                "bad_records": bad_encoded,
            }
        )
        write_json_atomic(out / STATE, state)

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
            if len(ids) - 1 < job.min_doc_tokens:  # the EOS is not the document's
                dropped_short += 1
                continue
            split = "val" if is_val(doc_id, val_fraction) else "train"
            chunk.add(split, ids, mask)
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids) - 1
            if chunk.stored >= job.shard_tokens:
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
        short = (
            f", {dropped_short} shorter than --min-doc-tokens {job.min_doc_tokens}"
            if job.min_doc_tokens
            else ""
        )
        raise LongtrainError(
            f"--corpus {spec.source}: no documents left ({dropped} empty{short} dropped)"
            if short
            else f"--corpus {spec.source}: no non-empty documents ({dropped} empty dropped)"
        )
    n_docs = sum(counts[s]["documents"] for s in SPLITS)
    if val_fraction > 0 and counts["val"]["documents"] == 0:
        # Said now rather than by the first validation of a pretraining run. The chunks stay
        # (the state is not complete), so a re-run with other options simply replaces them.
        hint = min(0.5, 3 / n_docs)
        raise LongtrainError(
            f"--val-fraction {val_fraction} put 0 of {n_docs} documents in val (the split is a "
            f"hash of each document id); raise it (about {hint:.2g} holds out a few documents) "
            "or pass --val-fraction 0 to prepare without a validation split"
        )
    splits = {
        s: {
            **counts[s],
            "doc_lengths": doc_length_stats(
                _split_doc_lengths(out, [c["shards"][s] for c in all_chunks if s in c["shards"]])
            ),
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
        "documents": n_docs,
        "tokens": sum(counts[s]["tokens"] for s in SPLITS),
        "stored_tokens": sum(counts[s]["stored_tokens"] for s in SPLITS),
        "dropped_empty": dropped,
        "dropped_short": dropped_short,
        "min_doc_tokens": job.min_doc_tokens,
        "group_by": spec.group_by,
        "bad_records": stats.bad_records + bad_encoded,
        "first_bad": stats.first_bad,
        "skipped_undecodable": stats.undecodable,
        "val_fraction": val_fraction,
        "source": spec.describe(),
        "splits": splits,
    }
    write_json_atomic(out / MANIFEST, manifest)
    state["complete"] = True
    write_json_atomic(out / STATE, state)
    dt = time.time() - t0
    short = (
        f", {dropped_short} shorter than {job.min_doc_tokens} tokens dropped"
        if job.min_doc_tokens
        else ""
    )
    print(
        f"wrote {out}: {manifest['documents']} documents, {manifest['tokens']} tokens "
        f"({splits['val']['documents']} docs in val), {dropped} empty dropped{short}, "
        f"{manifest['bad_records']} bad skipped, {dt:.1f}s"
    )
    for s in SPLITS:
        st = splits[s]["doc_lengths"]
        print(
            f"  {s + ':':6} {st['count']} documents, tokens per document p50 {st['p50']}, "
            f"p90 {st['p90']}, max {st['max']}"
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
        overwrite=args.overwrite,
        min_doc_tokens=args.min_doc_tokens,
    )
    return 0
