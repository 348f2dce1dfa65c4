"""Packing against a brute-force reference, and the distributed loader's global order.

Fast tests (synthetic data directories, no tokenizer): about 5 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain.data.loader import DistributedLoader, validation_batches
from longtrain.data.packing import IGNORE_INDEX, TokenStream, pack_from_stream
from longtrain.model.errors import LongtrainError

EOS = 2


def random_docs(rng: np.random.Generator, n: int, max_len: int) -> list[np.ndarray]:
    """Documents of random lengths (>= 1) with tokens in [10, 1000), EOS appended."""
    return [
        np.append(rng.integers(10, 1000, size=int(rng.integers(1, max_len))), EOS) for _ in range(n)
    ]


def write_data_dir(
    d: Path,
    docs: list[np.ndarray],
    n_shards: int,
    masks: list[np.ndarray] | None = None,
    dtype: str = "uint16",
) -> None:
    """A data directory in prepare's layout (train only), docs split over ``n_shards``."""
    d.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, part in enumerate(np.array_split(np.arange(len(docs)), n_shards)):
        toks = np.concatenate([docs[i] for i in part]).astype(dtype)
        off = np.concatenate([[0], np.cumsum([len(docs[i]) for i in part])]).astype(np.int64)
        np.save(d / f"train_{k:05d}.npy", toks)
        np.save(d / f"train_{k:05d}.idx.npy", off)
        mask_name = None
        if masks is not None:
            mask_name = f"train_{k:05d}.mask.npy"
            np.save(d / mask_name, np.concatenate([masks[i] for i in part]).astype(np.uint8))
        shards.append(
            {
                "tokens": f"train_{k:05d}.npy",
                "index": f"train_{k:05d}.idx.npy",
                "mask": mask_name,
                "documents": len(part),
                "stored_tokens": len(toks),
                "sha256": {},
            }
        )
    manifest = {
        "tokenizer_hash": "abc123",
        "vocab_size": 1000,
        "dtype": dtype,
        "splits": {"train": {"shards": shards}, "val": {"shards": shards}},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def reference_window(
    docs: list[np.ndarray], start: int, seq_len: int, attention: str, mask=None
) -> dict:
    """Token-by-token reference: explicit document id and offset of every stream token."""
    flat, doc_of, off_in_doc, m = [], [], [], []
    for i, d in enumerate(docs):
        for j, t in enumerate(d):
            flat.append(int(t))
            doc_of.append(i)
            off_in_doc.append(j)
            m.append(1 if mask is None else int(mask[i][j]))
    L = seq_len
    inp, lab, pos, seg_starts = [], [], [], []
    for t in range(L):
        a = start + t
        inp.append(flat[a])
        target_ok = m[a + 1] == 1
        if attention == "document":
            target_ok = target_ok and doc_of[a + 1] == doc_of[a]
            p = off_in_doc[a] if off_in_doc[a] <= t else t  # cut at the window start
        else:
            p = t
        lab.append(flat[a + 1] if target_ok else IGNORE_INDEX)
        pos.append(p)
        if p == 0:
            seg_starts.append(t)
    return dict(input_ids=inp, labels=lab, position_ids=pos, seg_starts=seg_starts)


@pytest.mark.parametrize("attention", ["document", "causal"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_packing_matches_brute_force(attention: str, with_mask: bool) -> None:
    rng = np.random.default_rng(0)
    for trial in range(4):
        docs = random_docs(rng, n=int(rng.integers(5, 40)), max_len=int(rng.integers(2, 60)))
        masks = (
            [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs] if with_mask else None
        )
        parts = np.array_split(np.arange(len(docs)), 3)
        tokens = [
            np.concatenate([docs[i] for i in p]) if len(p) else np.zeros(0, np.uint16)
            for p in parts
        ]
        offsets = [np.concatenate([[0], np.cumsum([len(docs[i]) for i in p])]) for p in parts]
        mask_arrays = (
            [
                np.concatenate([masks[i] for i in p]) if len(p) else np.zeros(0, np.uint8)
                for p in parts
            ]
            if with_mask
            else None
        )
        stream = TokenStream.from_arrays(tokens, offsets, mask_arrays)
        total = sum(len(d) for d in docs)
        assert stream.total_tokens == total
        seq_len = int(rng.integers(1, min(50, total - 1) + 1))
        n_win = (total - 1) // seq_len
        ids = rng.choice(n_win, size=min(n_win, 5), replace=False)
        got = pack_from_stream(stream, ids, seq_len, attention)
        B = len(ids)
        cu_ref = []
        for b, w in enumerate(ids):
            ref = reference_window(docs, int(w) * seq_len, seq_len, attention, masks)
            assert got["input_ids"][b].tolist() == ref["input_ids"], (trial, b)
            assert got["labels"][b].tolist() == ref["labels"], (trial, b)
            assert got["position_ids"][b].tolist() == ref["position_ids"], (trial, b)
            cu_ref += [b * seq_len + s for s in ref["seg_starts"]]
        assert got["cu_seqlens"].tolist() == cu_ref + [B * seq_len]
        assert got["cu_seqlens"].dtype == np.int32
        assert got["max_seqlen"] == int(np.diff(got["cu_seqlens"]).max())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    write_data_dir(tmp_path, random_docs(rng, 60, 40), n_shards=3)
    return tmp_path


def run_ranks(
    data_dir: Path, dp_size: int, steps: int, state: dict | None = None, **kw
) -> tuple[list[list[int]], dict]:
    """Per micro-step, the sample ids of all DP ranks concatenated in rank order; final state."""
    loaders = [
        DistributedLoader(data_dir, seq_len=16, dp_rank=r, dp_size=dp_size, **kw)
        for r in range(dp_size)
    ]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        out.append([i for ld in loaders for i in next(ld)["sample_ids"].tolist()])
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("dp_size,micro_batch", [(1, 1), (2, 3), (4, 2)])
def test_three_epochs_cover_global_order(data_dir: Path, dp_size: int, micro_batch: int) -> None:
    probe = DistributedLoader(data_dir, seq_len=16, seed=7)
    n = probe.num_windows
    expected = np.concatenate([probe.permutation(e) for e in range(4)])
    G = dp_size * micro_batch
    steps = -(-3 * n // G)
    seen, _ = run_ranks(data_dir, dp_size, steps, micro_batch=micro_batch, seed=7)
    flat = [i for step in seen for i in step]
    assert flat == expected[: steps * G].tolist()
    for e in range(3):  # each epoch is a permutation: no duplicates, nothing missed
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))
    assert not np.array_equal(probe.permutation(0), probe.permutation(1))


def test_resume_after_k_steps_is_identical(data_dir: Path) -> None:
    full, _ = run_ranks(data_dir, 2, 30, micro_batch=2, seed=3)
    first, state = run_ranks(data_dir, 2, 11, micro_batch=2, seed=3)
    rest, _ = run_ranks(data_dir, 2, 19, state=json.loads(json.dumps(state)), micro_batch=2, seed=3)
    assert first + rest == full
    # Whole batches, not just ids: a resumed loader gives identical tensors.
    a = DistributedLoader(data_dir, seq_len=16, micro_batch=2, seed=3)
    for _ in range(5):
        next(a)
    b = DistributedLoader(data_dir, seq_len=16, micro_batch=2, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x, y = next(a), next(b)
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids"):
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_resume_with_other_dp_size_continues_global_sequence(
    data_dir: Path, before: int, after: int
) -> None:
    probe = DistributedLoader(data_dir, seq_len=16, seed=5)
    expected = np.concatenate([probe.permutation(e) for e in range(3)]).tolist()
    first, state = run_ranks(data_dir, before, 7, micro_batch=2, seed=5)
    rest, _ = run_ranks(data_dir, after, 9, state=state, micro_batch=2, seed=5)
    flat = [i for s in first + rest for i in s]
    assert state["consumed_samples"] == 7 * 2 * before
    assert flat == expected[: len(flat)]


def test_sp_ranks_split_shifted_sequence(data_dir: Path) -> None:
    whole = next(DistributedLoader(data_dir, seq_len=16, micro_batch=3, seed=1))
    parts = [
        next(DistributedLoader(data_dir, seq_len=16, micro_batch=3, seed=1, sp_rank=s, sp_size=4))
        for s in range(4)
    ]
    for k in ("input_ids", "labels", "position_ids"):
        assert parts[0][k].shape == (3, 4)
        assert torch.equal(torch.cat([p[k] for p in parts], dim=1), whole[k])
    for p in parts:
        assert torch.equal(p["cu_seqlens"], whole["cu_seqlens"])
        assert p["max_seqlen"] == whole["max_seqlen"]
    assert whole["cu_seqlens"].dtype == torch.int32 and whole["input_ids"].dtype == torch.int64


def test_validation_batches_cover_every_window_once(data_dir: Path) -> None:
    n = DistributedLoader(data_dir, split="val", seq_len=16).num_windows
    ids, counted = [], 0
    for r in range(3):
        batches = list(validation_batches(data_dir, 16, micro_batch=2, dp_rank=r, dp_size=3))
        assert len(batches) == -(-n // 6)  # same count on every rank
        for b in batches:
            for i, lab in zip(b["sample_ids"].tolist(), b["labels"]):
                if i < 0:
                    assert (lab == IGNORE_INDEX).all()
                else:
                    ids.append(i)
                    counted += 1
    assert sorted(ids) == list(range(n)) and counted == n
    assert len(list(validation_batches(data_dir, 16, 2, max_batches=2))) == 2


def test_loader_bad_inputs(data_dir: Path, tmp_path_factory) -> None:
    with pytest.raises(LongtrainError, match="tokenizer"):
        DistributedLoader(data_dir, seq_len=16, tokenizer_hash="fff000")
    with pytest.raises(LongtrainError, match="divisible"):
        DistributedLoader(data_dir, seq_len=15, sp_size=2)
    with pytest.raises(LongtrainError, match="fewer than"):
        DistributedLoader(data_dir, seq_len=10**7)
    with pytest.raises(LongtrainError, match="no such directory|no manifest.json"):
        DistributedLoader(tmp_path_factory.mktemp("empty"), seq_len=16)
    ld = DistributedLoader(data_dir, seq_len=16)
    sd = ld.state_dict()
    with pytest.raises(LongtrainError, match="seq_len"):
        DistributedLoader(data_dir, seq_len=8).load_state_dict(sd)


def test_loader_applies_sft_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 20, 30)
    masks = [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs]
    write_data_dir(tmp_path, docs, 2, masks)
    ld = DistributedLoader(tmp_path, seq_len=12, micro_batch=2, seed=0)
    for _ in range(5):
        b = next(ld)
        for row, w in enumerate(b["sample_ids"].tolist()):
            ref = reference_window(docs, w * 12, 12, "document", masks)
            assert b["labels"][row].tolist() == ref["labels"]


def test_uint32_shards_for_large_vocabularies(tmp_path: Path) -> None:
    from longtrain.data.prepare import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    rng = np.random.default_rng(3)
    docs = [
        np.append(rng.integers(60000, 200000, size=int(rng.integers(1, 20))), EOS)
        for _ in range(30)
    ]
    write_data_dir(tmp_path, docs, 2, dtype="uint32")
    b = next(DistributedLoader(tmp_path, seq_len=8, micro_batch=2))
    for row, w in enumerate(b["sample_ids"].tolist()):
        ref = reference_window(docs, w * 8, 8, "document")
        assert (
            b["input_ids"][row].tolist() == ref["input_ids"]
            and b["labels"][row].tolist() == ref["labels"]
        )
    assert int(b["input_ids"].max()) > 65535
    # A manifest that disagrees with the shard's dtype is one clear error.
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["dtype"] = "uint16"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LongtrainError, match="but the manifest says"):
        DistributedLoader(tmp_path, seq_len=8)
