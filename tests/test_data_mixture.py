"""Mixtures of data directories: weights, the global order, resume, resharding, bad input.

Synthetic data directories (no tokenizer), built by test_data_packing's writer. Source ``k``
holds tokens in its own id range, so every row of a batch shows which source it came from.
A few seconds on 2 cores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_packing import EOS, write_data_dir

from longtrain.data.loader import open_split, validation_batches
from longtrain.data.mixture import (
    MixSource,
    MixtureLoader,
    check_mix,
    check_mix_tokenizers,
    mixture_validation_batches,
    weighted_schedule,
)
from longtrain.model.errors import LongtrainError

KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "sample_ids", "source_ids")


def source_dir(d: Path, k: int, n_docs: int, seed: int) -> Path:
    """Documents with tokens in [100k + 10, 100k + 100) (k < 10 keeps them under vocab 1000)."""
    rng = np.random.default_rng(seed)
    docs = [
        np.append(rng.integers(100 * k + 10, 100 * k + 100, size=int(rng.integers(1, 40))), EOS)
        for _ in range(n_docs)
    ]
    write_data_dir(d, docs, n_shards=2)
    return d


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    # Source 1 is small, so it runs out (and starts new epochs) first.
    return [
        source_dir(tmp_path / "a", 1, 80, 1),
        source_dir(tmp_path / "b", 2, 30, 2),
        source_dir(tmp_path / "c", 3, 120, 3),
    ]


def mix(dirs: list[Path], weights: list[float]) -> list[dict]:
    return [{"name": p.name, "dir": str(p), "weight": w} for p, w in zip(dirs, weights)]


def loaders(sources, dp_size: int, seq_len: int = 16, longest: int = 16, mb: int = 2, **kw):
    return [
        MixtureLoader(sources, longest, seq_len, mb, r, dp_size, 0, 1, seed=kw.pop("seed", 3), **kw)
        for r in range(dp_size)
    ]


def global_order(lds: list[MixtureLoader], steps: int) -> list[tuple[int, int]]:
    """(source, window id) of every sample of ``steps`` micro-steps, DP ranks in order."""
    out = []
    for _ in range(steps):
        for ld in lds:
            b = next(ld)
            out += list(zip(b["source_ids"].tolist(), b["sample_ids"].tolist()))
    return out


def test_rows_are_windows_of_the_source_they_name(dirs: list[Path]) -> None:
    ld = MixtureLoader(mix(dirs, [1, 1, 2]), 16, 16, 4, 0, 1, 0, 1, seed=0)
    assert ld.source_names == ["a", "b", "c"]
    streams = [open_split(d, "train")[0] for d in dirs]
    for _ in range(10):
        b = next(ld)
        assert b["source_ids"].dtype == torch.int64 and b["source_ids"].shape == (4,)
        for row, (s, w) in enumerate(zip(b["source_ids"].tolist(), b["sample_ids"].tolist())):
            ref = streams[s].read(w * 16, 17)
            assert b["input_ids"][row].tolist() == ref[:-1].tolist()
            # Labels: the next token, or -100 where a new document starts (never the token of
            # a neighbouring source's first document).
            lab = b["labels"][row].tolist()
            assert all(x == -100 or x == y for x, y in zip(lab, ref[1:].tolist()))
            assert all(100 * (s + 1) <= t < 100 * (s + 2) or t == EOS for t in ref.tolist())


@pytest.mark.parametrize("weights", [[0.25, 0.75], [0.3, 0.7], [0.2, 0.3, 0.5]])
def test_token_fractions_follow_the_weights(dirs: list[Path], weights: list[float]) -> None:
    lds = loaders(mix(dirs, weights), dp_size=2, mb=4)
    tokens = np.zeros(len(weights))
    for _ in range(8):  # 8 steps x 2 ranks x 4 = 64 windows
        for ld in lds:
            b = next(ld)
            for s in b["source_ids"].tolist():
                tokens[s] += b["input_ids"].shape[1]
    frac = tokens / tokens.sum()
    assert np.abs(frac - np.array(weights)).max() <= 0.03, frac
    # Every prefix stays within about one block of its share, not just the 64th.
    sched = np.concatenate([weighted_schedule(weights)] * 2)[:640]
    for k in range(1, len(sched) + 1):
        counts = np.bincount(sched[:k], minlength=len(weights))
        assert np.abs(counts - k * np.array(weights)).max() < 1.5
    assert weighted_schedule([0.25, 0.75]).tolist() == [1, 0, 1, 1]  # period 4, evenly spread
    # Negative control: the fractions test tells weights apart.
    assert np.abs(frac - np.array(weights[::-1])).max() > 0.03 or weights == weights[::-1]


def test_resume_is_bitwise_and_reshards_to_another_dp_size(dirs: list[Path]) -> None:
    sources = mix(dirs, [0.25, 0.25, 0.5])
    k = 9
    straight = [next(ld) for ld in loaders(sources, 1, mb=3) for _ in range(2 * k)]
    first = loaders(sources, 1, mb=3)[0]
    part = [next(first) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    again = loaders(sources, 1, mb=3)[0]
    again.load_state_dict(state)
    part += [next(again) for _ in range(k)]
    for x, y in zip(straight, part, strict=True):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), key
        assert x["max_seqlen"] == y["max_seqlen"]
    # DP 2 -> 1 (and 1 -> 2): the global order goes on, nothing repeated or skipped. The
    # reference is long enough for the small source to wrap into its next epochs.
    ref = global_order(loaders(sources, 1, mb=2), 60)
    two = loaders(sources, 2, mb=2)
    got = global_order(two, 10)
    one = loaders(sources, 1, mb=2)[0]
    one.load_state_dict(two[1].state_dict())
    got += global_order([one], 20)
    back = loaders(sources, 2, mb=2)
    for ld in back:
        ld.load_state_dict(one.state_dict())
    got += global_order(back, 10)
    assert got == ref[: len(got)] and len(got) == 120
    assert two[0].state_dict() == two[1].state_dict()  # rank independent


def test_each_source_goes_through_epochs_on_its_own_and_logs_them(dirs: list[Path], caplog) -> None:
    sources = mix(dirs, [0.2, 0.6, 0.2])  # the small source b, read fastest
    ld = loaders(sources, 1, mb=4)[0]
    nb = dict(zip(ld.source_names, ld.num_blocks.tolist()))
    with caplog.at_level(logging.WARNING, logger="longtrain.data.mixture"):
        order = global_order([ld], 40)
    seen = {name: [w for s, w in order if ld.source_names[s] == name] for name in nb}
    b = seen["b"]
    assert len(b) > 2 * nb["b"]
    for e in range(2):  # each epoch of b: a permutation of its blocks, a new one each time
        assert sorted(b[e * nb["b"] : (e + 1) * nb["b"]]) == list(range(nb["b"]))
    assert b[: nb["b"]] != b[nb["b"] : 2 * nb["b"]]
    assert len(set(seen["c"])) == len(seen["c"]) < nb["c"]  # c is still in its first epoch
    msgs = [r.getMessage() for r in caplog.records]
    assert any("source 'b' read all its" in m and "epoch 1" in m for m in msgs)
    assert any("epoch 2" in m for m in msgs) and not any("'c'" in m for m in msgs)
    # Only DP rank 0 logs; the per-source token counts follow from the cursor alone.
    counts = np.zeros(3, dtype=int)
    for s, _ in order:
        counts[s] += 16
    assert ld.consumed_tokens() == dict(zip(ld.source_names, counts.tolist()))


def test_stage_change_continues_without_repeats(dirs: list[Path]) -> None:
    """Stage 1 reads windows of 16 from blocks of 32, stage 2 windows of 32: no token twice."""
    sources = mix(dirs, [0.5, 0.25, 0.25])
    s1 = MixtureLoader(sources, 32, 16, 3, 0, 1, 0, 1, seed=1)
    spans = []
    for _ in range(5):  # 15 windows of 16: ends mid-block
        b = next(s1)
        spans += [
            (s, w * 16, 16) for s, w in zip(b["source_ids"].tolist(), b["sample_ids"].tolist())
        ]
    s2 = MixtureLoader(sources, 32, 32, 2, 0, 1, 0, 1, seed=1)
    s2.load_state_dict(s1.state_dict())
    assert s2.cursor == 16 * 16  # rounded up from 15 * 16: half a block skipped
    for _ in range(5):
        b = next(s2)
        spans += [
            (s, w * 32, 32) for s, w in zip(b["source_ids"].tolist(), b["sample_ids"].tolist())
        ]
    covered = {(s, t) for s, start, n in spans for t in range(start, start + n)}
    assert len(covered) == sum(n for _, _, n in spans)  # disjoint
    # Stage 2's windows are exactly the blocks of the one long order after the cursor.
    ref = MixtureLoader(sources, 32, 32, 1, 0, 1, 0, 1, seed=1)
    ref.cursor = 16 * 16
    want = [tuple(x) for x in zip(*[a.tolist() for a in ref.windows(ref.cursor, 10)[:2]])]
    assert [(s, w // 32) for s, w, _ in spans[15:]] == want
    with pytest.raises(LongtrainError, match="does not divide the longest stage"):
        MixtureLoader(sources, 32, 12, 1, 0, 1, 0, 1)


def test_sp_ranks_split_the_same_windows(dirs: list[Path]) -> None:
    sources = mix(dirs, [1, 1, 1])
    whole = next(MixtureLoader(sources, 16, 16, 3, 0, 1, 0, 1, seed=2))
    parts = [next(MixtureLoader(sources, 16, 16, 3, 0, 1, s, 4, seed=2)) for s in range(4)]
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), whole[key])
    for p in parts:
        assert torch.equal(p["source_ids"], whole["source_ids"])
        assert torch.equal(p["cu_seqlens"], whole["cu_seqlens"])


def test_validation_per_source(dirs: list[Path]) -> None:
    sources = mix(dirs, [1, 2, 3])
    got: dict[str, list] = {}
    for name, b in mixture_validation_batches(sources, 16, micro_batch=2, dp_size=1):
        got.setdefault(name, []).append(b)
    assert list(got) == ["a", "b", "c"]
    for i, d in enumerate(dirs):
        ref = list(validation_batches(d, 16, micro_batch=2))
        assert len(got[d.name]) == len(ref)
        for x, y in zip(got[d.name], ref):
            assert torch.equal(x["input_ids"], y["input_ids"])
            assert (x["source_ids"] == i).all()
    capped = list(mixture_validation_batches(sources, 16, micro_batch=2, max_batches=1))
    assert [n for n, _ in capped] == ["a", "b", "c"]


def test_bad_mixtures_are_one_clear_line(dirs: list[Path], tmp_path: Path) -> None:
    good = mix(dirs, [1, 3, 4])
    srcs = check_mix(good)
    assert [s.weight for s in srcs] == [0.125, 0.375, 0.5] and check_mix(srcs) == srcs
    assert isinstance(srcs[0], MixSource)
    cases = [
        (good[:1] + [{**good[1], "weight": -0.5}], r"data.mix\[1\].weight -0.5: must be a positive"),
        (good[:1] + [{**good[1], "weight": 0}], r"data.mix\[1\].weight 0: must be a positive"),
        (good[:1] + [{**good[1], "weight": True}], r"data.mix\[1\].weight True"),
        (good[:1] + [{**good[1], "weight": float("nan")}], r"data.mix\[1\].weight nan"),
        (good + [{**good[0], "dir": "x"}], r"data.mix\[3\].name 'a': given twice \(also data.mix\[0\]\)"),
        ([{"name": "a", "dir": "x", "wieght": 1}], r"data.mix\[0\]: unknown key 'wieght'"),
        ([{"name": "a", "weight": 1}], r"data.mix\[0\]: missing 'dir'"),
        ([{"name": "a b", "dir": "x", "weight": 1}], r"data.mix\[0\].name 'a b'"),
        ([], r"data.mix: expected a non-empty list"),
        ("a,b", r"data.mix: expected a non-empty list"),
    ]  # fmt: skip
    for bad, match in cases:
        with pytest.raises(LongtrainError, match=match) as e:
            check_mix(bad)
        assert "\n" not in str(e.value)
    # One source made with another tokenizer: named, in the helper and in the loader.
    m = json.loads((dirs[2] / "manifest.json").read_text())
    m["tokenizer_hash"] = "fff999"
    (dirs[2] / "manifest.json").write_text(json.dumps(m))
    assert check_mix_tokenizers(good[:2]) == "abc123"
    with pytest.raises(
        LongtrainError, match=r"data.mix\[2\] 'c' \(dir .*c\) \(tokenizer hash fff999\)"
    ):
        check_mix_tokenizers(good)
    with pytest.raises(LongtrainError, match=r"data.mix\[2\] 'c'"):
        MixtureLoader(good, 16, 16, 1, 0, 1, 0, 1)
    with pytest.raises(LongtrainError, match=r"data.mix\[0\] 'a'.*this run"):
        check_mix_tokenizers(good[:2], tokenizer_hash="000111")
    small = source_dir(tmp_path / "tiny", 4, 2, 0)
    with pytest.raises(LongtrainError, match=r"data.mix\[1\] 'tiny' .*fewer than"):
        MixtureLoader(good[:1] + mix([small], [1]), 256, 256, 1, 0, 1, 0, 1)
    # A checkpoint of another mixture is refused on resume.
    sd = MixtureLoader(good[:2], 16, 16, 1, 0, 1, 0, 1).state_dict()
    other = MixtureLoader(mix(dirs[:2], [1, 1]), 16, 16, 1, 0, 1, 0, 1)
    with pytest.raises(LongtrainError, match=r"loader state: mix=.*same data.mix"):
        other.load_state_dict(sd)


def test_sft_source_next_to_a_pretraining_source(dirs: list[Path], tmp_path: Path) -> None:
    """Masks apply to the SFT source's rows only; the other source trains on every target."""
    rng = np.random.default_rng(5)
    docs = [
        np.append(rng.integers(510, 600, size=int(rng.integers(2, 30))), EOS) for _ in range(60)
    ]
    masks = [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs]
    write_data_dir(tmp_path / "sft", docs, 2, masks)
    sources = mix([dirs[0], tmp_path / "sft"], [1, 1])
    ld = MixtureLoader(sources, 16, 16, 4, 0, 1, 0, 1, seed=0)
    plain, sft = open_split(dirs[0], "train")[0], open_split(tmp_path / "sft", "train")[0]
    seen = set()
    for _ in range(6):
        b = next(ld)
        for row, (s, w) in enumerate(zip(b["source_ids"].tolist(), b["sample_ids"].tolist())):
            stream = (plain, sft)[s]
            nxt, m = stream.read(w * 16 + 1, 16), stream.read_mask(w * 16 + 1, 16)
            lab = b["labels"][row]
            if m is None:  # pretraining: only document starts are ignored
                assert ((lab == -100) | (lab == torch.from_numpy(nxt))).all()
                assert (lab != -100).sum() > 8
            else:
                assert (lab[torch.from_numpy(m == 0)] == -100).all()
            seen.add(s)
    assert seen == {0, 1}
