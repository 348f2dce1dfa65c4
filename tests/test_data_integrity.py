"""Data integrity at train time: size, dtype, sha256 and token range of every shard.

Each test damages one file of a freshly prepared directory the way storage or a hand edit
would, and checks that the damage is caught with one error naming the file and the fix,
while the intact directory (the negative control) passes. A few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_data_prepare import run, small_rows, write_jsonl

import longtrain.data.loader as loader
from longtrain.data.loader import VERIFIED, DistributedLoader, open_split, verify_data_dir
from longtrain.data.tokenizer import file_sha256
from longtrain.model.errors import LongtrainError


@pytest.fixture
def data(tmp_path: Path) -> Path:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:30]))
    d = tmp_path / "data"
    run(corpus, d, val_fraction=0.2, shard_tokens=20_000)
    assert not (d / VERIFIED).exists()  # no verdict until the first verification
    return d


def first_shard(d: Path) -> tuple[dict, Path]:
    m = json.loads((d / "manifest.json").read_text())
    sh = m["splits"]["train"]["shards"][0]
    return sh, d / sh["tokens"]


def count_scans(monkeypatch) -> dict[str, int]:
    """Counts the files verify_data_dir reads (hashes and range-checks)."""
    calls = {"n": 0}
    real = loader._scan

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(loader, "_scan", counting)
    return calls


def test_intact_directory_verifies_once_then_from_the_cache(data: Path, monkeypatch) -> None:
    calls = count_scans(monkeypatch)
    verify_data_dir(data, progress=False)
    n_files = calls["n"]
    assert n_files >= 4 and (data / VERIFIED).is_file()
    verify_data_dir(data, progress=False)
    assert calls["n"] == n_files  # the cached verdict: no file hashed again
    next(DistributedLoader(data, seq_len=64))
    # A changed file (size or mtime) is hashed again, and only that one.
    _, path = first_shard(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    verify_data_dir(data, progress=False)
    assert calls["n"] == n_files + 1


def test_truncated_shard_is_named_before_memory_mapping(data: Path) -> None:
    _, path = first_shard(data)
    path.write_bytes(path.read_bytes()[:-6])
    # Before: numpy's "mmap length is greater than file size" from deep inside np.load.
    with pytest.raises(LongtrainError, match=rf"{path.name}: truncated.*re-run `longtrain prepare"):
        open_split(data, "train")
    with pytest.raises(LongtrainError, match=rf"{path.name}: truncated"):
        verify_data_dir(data, progress=False)
    open_split(data, "val")  # negative control: the intact split still opens
    run(data.parent / "c.jsonl", data, val_fraction=0.2, shard_tokens=20_000)
    open_split(data, "train")
    verify_data_dir(data, progress=False)


def test_altered_shard_fails_its_sha256(data: Path) -> None:
    verify_data_dir(data, progress=False)  # a cached verdict for the intact file
    _, path = first_shard(data)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # same size, one token id changed, still in range
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as any later write would
    open_split(data, "train")  # size and dtype are fine: only the hash can tell
    with pytest.raises(
        LongtrainError, match=rf"{path.name}: sha256 .* manifest.*re-run `longtrain prepare"
    ):
        verify_data_dir(data, progress=False)
    # The advice works: the same prepare redoes the damaged chunk, and the data verifies.
    run(data.parent / "c.jsonl", data, val_fraction=0.2, shard_tokens=20_000)
    verify_data_dir(data, progress=False)
    assert path.read_bytes() != bytes(raw)


def test_out_of_range_token_id_is_caught_even_with_a_matching_hash(data: Path) -> None:
    sh, path = first_shard(data)
    m = json.loads((data / "manifest.json").read_text())
    arr = np.load(path)
    arr[5] = m["vocab_size"]  # one past the vocabulary
    np.save(path, arr)
    # Fix the manifest up so that the hash check passes and only the range check can catch it.
    m["splits"]["train"]["shards"][0]["sha256"][sh["tokens"]] = file_sha256(path)
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        LongtrainError,
        match=rf"{path.name}: token id {m['vocab_size']} at position 5 .*vocab_size "
        rf"{m['vocab_size']}.*re-run `longtrain prepare",
    ):
        verify_data_dir(data, progress=False)
    assert not (data / VERIFIED).exists()  # a failed verdict is never cached
    arr[5] = m["vocab_size"] - 1  # negative control: the last valid id passes
    np.save(path, arr)
    m["splits"]["train"]["shards"][0]["sha256"][sh["tokens"]] = file_sha256(path)
    (data / "manifest.json").write_text(json.dumps(m))
    verify_data_dir(data, progress=False)


def test_wrong_dtype_or_missing_shard_and_read_only_dirs(data: Path, monkeypatch) -> None:
    sh, path = first_shard(data)
    np.save(path, np.load(path).astype(np.uint32))
    with pytest.raises(LongtrainError, match=rf"{path.name}: uint32\[\d+\] but the manifest says"):
        open_split(data, "train")
    path.unlink()
    with pytest.raises(LongtrainError, match=rf"{path.name}: missing shard"):
        verify_data_dir(data, progress=False)
    # A directory where the verdict cannot be written still verifies (without caching).
    other = data.parent / "other"
    run(data.parent / "c.jsonl", other, val_fraction=0.2, shard_tokens=20_000)

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(loader, "write_json_atomic", refuse)
    calls = count_scans(monkeypatch)
    verify_data_dir(other, progress=False)
    assert not (other / VERIFIED).exists() and calls["n"] >= 4
    n = calls["n"]
    verify_data_dir(other, progress=False)  # this process remembers its verdict
    assert calls["n"] == n
