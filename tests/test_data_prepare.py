"""prepare: manifest vs per-document encodings, deterministic split, resume, sources, bad input.

STDLIB tests (marked ``slow``) prepare the whole standard library three times (2 workers and
1 worker by file, 2 workers by directory; ~35 s together on 2 cores); the rest use small
corpora written into tmp dirs. The "nothing lost" tests (issue 12) failed on the code before
the fix: a mistyped corpus deleted the dataset, a foreign manifest.json was overwritten, a
file as --out raised FileExistsError, an empty val split was accepted.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_tokenizer import _TMP, stdlib_docs, stdlib_encodings, stdlib_tokenizer_dir

import longtrain.data.prepare as prep
from longtrain.data.corpus import CorpusSpec, file_header, group_text
from longtrain.data.loader import DistributedLoader, open_split
from longtrain.data.packing import IGNORE_INDEX
from longtrain.data.prepare import is_val, prepare, verify_shard
from longtrain.data.tokenizer import Tokenizer
from longtrain.launch.cli import main
from longtrain.model.errors import LongtrainError


@functools.cache
def stdlib_prepared(workers: int) -> Path:
    out = Path(_TMP.name) / f"stdlib-data-w{workers}"
    prepare(
        CorpusSpec("stdlib"),
        stdlib_tokenizer_dir(),
        out,
        workers=workers,
        val_fraction=0.05,
        shard_tokens=3_000_000,
        progress=False,
    )
    return out


def split_stream(d: Path, split: str) -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    return np.concatenate([np.load(d / s["tokens"]) for s in m["splits"][split]["shards"]])


@pytest.mark.slow
def test_stdlib_manifest_counts_equal_per_document_encodings() -> None:
    d = stdlib_prepared(2)
    m = json.loads((d / "manifest.json").read_text())
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    expected = {"train": [], "val": []}
    empty = 0
    for (doc_id, text), ids in zip(stdlib_docs(), stdlib_encodings()):
        if not text.strip():
            empty += 1
            continue
        expected["val" if is_val(doc_id, 0.05) else "train"].append(np.append(ids, tok.eos_id))
    n_tokens = sum(len(x) - 1 for s in expected.values() for x in s)
    assert m["tokens"] == n_tokens and m["stored_tokens"] == n_tokens + m["documents"]
    assert m["documents"] == sum(len(s) for s in expected.values())
    assert m["dropped_empty"] == empty > 0
    assert m["dtype"] == "uint16" and m["vocab_size"] == 2000 and m["tokenizer_hash"] == tok.hash
    assert len(m["splits"]["train"]["shards"]) >= 3
    for split, docs in expected.items():
        # Every token of every shard, in order: the concatenated per-document encodings.
        ref = np.concatenate(docs)
        assert np.array_equal(split_stream(d, split), ref)
        assert m["splits"][split]["documents"] == len(docs)
        for sh in m["splits"][split]["shards"]:
            assert verify_shard(d, sh)
            off = np.load(d / sh["index"])
            assert (
                off[0] == 0 and off[-1] == sh["stored_tokens"] and len(off) == sh["documents"] + 1
            )
    assert Tokenizer.load(d / "tokenizer").hash == tok.hash
    # The loader reads exactly these tokens: window w is stream[w*L : w*L + L + 1].
    train = split_stream(d, "train")
    b = next(DistributedLoader(d, seq_len=512, micro_batch=4, tokenizer_hash=tok.hash))
    for row, w in enumerate(b["sample_ids"].tolist()):
        assert b["input_ids"][row].tolist() == train[w * 512 : w * 512 + 512].tolist()


@pytest.mark.slow
def test_stdlib_val_split_same_across_runs_and_worker_counts() -> None:
    a = json.loads((stdlib_prepared(2) / "manifest.json").read_text())
    b = json.loads((stdlib_prepared(1) / "manifest.json").read_text())
    assert a["splits"]["val"]["documents"] > 50
    for split in ("train", "val"):
        sha_a = [s["sha256"] for s in a["splits"][split]["shards"]]
        sha_b = [s["sha256"] for s in b["splits"][split]["shards"]]
        assert sha_a == sha_b


# ---- small corpora ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@functools.cache
def small_rows() -> tuple[dict, ...]:
    return tuple({"text": text, "id": doc_id} for doc_id, text in stdlib_docs()[:120])


def run(corpus: Path | str, out: Path, **kw) -> dict:
    spec_kw = {
        k: kw.pop(k)
        for k in list(kw)
        if k in ("skip_bad", "errors", "text_field", "txt_per_line", "streaming", "group_by")
    }
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(CorpusSpec(str(corpus), **spec_kw), stdlib_tokenizer_dir(), out, **kw)


def shard_hashes(m: dict) -> list:
    return [s["sha256"] for sp in ("train", "val") for s in m["splits"][sp]["shards"]]


def test_prepare_idempotent_and_resumes_after_interruption(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()))
    full = run(corpus, tmp_path / "full", shard_tokens=20_000, val_fraction=0.2)
    assert len(shard_hashes(full)) > 6
    # A complete run is a no-op: nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "full").glob("*.npy")}
    assert run(corpus, tmp_path / "full", shard_tokens=20_000, val_fraction=0.2) == full
    assert "already prepared" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "full").glob("*.npy")}

    calls = {"n": 0}
    real = prep._encode

    def flaky(item):
        calls["n"] += 1
        if calls["n"] == 70:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(prep, "_encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, tmp_path / "part", shard_tokens=20_000, val_fraction=0.2)
    assert not (tmp_path / "part" / "manifest.json").exists()
    calls["n"] = -(10**9)  # no more interruptions; count the resumed run's work
    resumed = run(corpus, tmp_path / "part", shard_tokens=20_000, val_fraction=0.2)
    assert shard_hashes(resumed) == shard_hashes(full)
    assert {k: v for k, v in resumed.items() if k != "source"} == {
        k: v for k, v in full.items() if k != "source"
    }
    assert 0 < calls["n"] + 10**9 < 120 - 30  # the verified chunks were not re-tokenized
    assert "resuming after" in capsys.readouterr().out

    # A corrupt shard is never taken as finished: redone, same bytes.
    victim = tmp_path / "part" / full["splits"]["train"]["shards"][3]["tokens"]
    victim.write_bytes(victim.read_bytes()[:-10])
    (tmp_path / "part" / "manifest.json").unlink()
    again = run(corpus, tmp_path / "part", shard_tokens=20_000, val_fraction=0.2)
    assert shard_hashes(again) == shard_hashes(full)
    assert "corrupt" in capsys.readouterr().out
    # Other options: refused without --overwrite; with it, prepared again from scratch, not
    # mixed with the old chunks.
    with pytest.raises(LongtrainError, match=r"shard_tokens 20000 -> 50000.*--overwrite"):
        run(corpus, tmp_path / "part", shard_tokens=50_000, val_fraction=0.2)
    other = run(corpus, tmp_path / "part", shard_tokens=50_000, val_fraction=0.2, overwrite=True)
    assert other["tokens"] == full["tokens"] and len(shard_hashes(other)) < len(shard_hashes(full))


def test_sources_agree_jsonl_json_parquet_csv_saved_streaming(tmp_path: Path) -> None:
    import datasets

    rows = [{"text": r["text"][:3000], "id": r["id"]} for r in small_rows()[:30]]
    rows.insert(5, {"text": "", "id": "empty"})
    ref = run(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "ref", val_fraction=0.0)
    ref_stream = split_stream(tmp_path / "ref", "train")
    assert ref["documents"] == 30 and ref["dropped_empty"] == 1
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src, kw in [
        ("c.parquet", {}),
        ("c.csv", {}),
        ("c.json", {}),
        ("saved", {}),
        ("saved", {"streaming": True}),
        ("c.parquet", {"streaming": True}),
    ]:
        out = tmp_path / f"out-{src}-{len(kw)}"
        m = run(tmp_path / src, out, val_fraction=0.0, **kw)
        assert np.array_equal(split_stream(out, "train"), ref_stream), src
        assert m["tokens"] == ref["tokens"] and m["dropped_empty"] == 1
    # .txt: one document per file, or per line.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("alpha beta\n\ngamma\n")
    (tmp_path / "t" / "b.txt").write_text("delta\n")
    m = run(tmp_path / "t" / "*.txt", tmp_path / "txt", val_fraction=0.0)
    assert m["documents"] == 2
    m = run(tmp_path / "t" / "*.txt", tmp_path / "txtl", val_fraction=0.0, txt_per_line=True)
    assert m["documents"] == 3 and m["dropped_empty"] == 1


def test_bad_inputs_each_one_clear_error(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, '{"text": "b"', {"text": "c"}, "[1]"])
    with pytest.raises(LongtrainError, match=r"bad.jsonl:2: malformed JSONL.*--skip-bad"):
        run(bad, tmp_path / "o1")
    m = run(bad, tmp_path / "o2", skip_bad=True, val_fraction=0.0)
    assert m["bad_records"] == 2 and m["documents"] == 2 and "bad.jsonl:4" in m["first_bad"][1]

    nofield = write_jsonl(tmp_path / "nf.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(
        LongtrainError, match=r"nf.jsonl:1: no field 'text'; fields present: body, title"
    ):
        run(nofield, tmp_path / "o3")
    m = run(nofield, tmp_path / "o3b", text_field="body", val_fraction=0.0)
    assert m["documents"] == 1

    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": "x"}])
    m = run(empty, tmp_path / "o4", val_fraction=0.0)
    assert m["dropped_empty"] == 2 and m["documents"] == 1
    with pytest.raises(LongtrainError, match="no non-empty documents"):
        run(write_jsonl(tmp_path / "e2.jsonl", [{"text": ""}]), tmp_path / "o4b")

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(LongtrainError, match=r"latin.txt: byte 3 is not UTF-8.*--errors replace"):
        run(latin, tmp_path / "o5")
    m = run(latin, tmp_path / "o6", errors="replace", val_fraction=0.0)
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    assert tok.decode(split_stream(tmp_path / "o6", "train")[:-1]) == "caf\ufffd ok"
    badjl = tmp_path / "latin.jsonl"
    badjl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LongtrainError, match=r"latin.jsonl:2: byte"):
        run(badjl, tmp_path / "o7")

    (tmp_path / "broken.json").write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(LongtrainError, match=r"broken.json: cannot read as json"):
        run(tmp_path / "broken.json", tmp_path / "o7b")
    (tmp_path / "t.csv").write_text("body,n\nhello,1\n")
    with pytest.raises(LongtrainError, match=r"t.csv#0: no field 'text'; fields present: body, n"):
        run(tmp_path / "t.csv", tmp_path / "o7c")
    with pytest.raises(LongtrainError, match=r"t.csv#0: field 'n' is int"):
        run(tmp_path / "t.csv", tmp_path / "o7d", text_field="n")
    with pytest.raises(LongtrainError, match="no such file"):
        run(tmp_path / "nothing*.jsonl", tmp_path / "o8")
    with pytest.raises(LongtrainError, match="not written by datasets.save_to_disk"):
        run(tmp_path, tmp_path / "o9")
    with pytest.raises(LongtrainError, match="--val-fraction"):
        run(empty, tmp_path / "o10", val_fraction=1.5)

    # Shards read with another tokenizer: one clear error.
    with pytest.raises(LongtrainError, match="shards were made with tokenizer"):
        open_split(tmp_path / "o4", "train", tokenizer_hash="0" * 64)
    with pytest.raises(LongtrainError, match="shards were made with tokenizer"):
        DistributedLoader(tmp_path / "o4", seq_len=1, tokenizer_hash="0" * 64)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": '])
    rc = main(
        [
            "prepare",
            "--corpus",
            str(bad),
            "--tokenizer",
            str(stdlib_tokenizer_dir()),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("longtrain prepare: error: ") and "bad.jsonl:1" in err[-1]
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:10]))
    rc = main(
        [
            "tokenizer",
            "--corpus",
            str(corpus),
            "--vocab-size",
            "400",
            "--sample-mb",
            "1",
            "--out",
            str(tmp_path / "tk"),
        ]
    )
    assert rc == 0 and Tokenizer.load(tmp_path / "tk").vocab_size == 400


def test_sft_prepare_and_loader_mask_token_by_token(tmp_path: Path) -> None:
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    recs = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo!"},
            ]
        },
        {"prompt": "2+2?", "response": " 4"},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d\n"},
            ]
        },
    ]
    corpus = write_jsonl(tmp_path / "sft.jsonl", recs)
    m = run(corpus, tmp_path / "sft", sft=True, val_fraction=0.0)
    assert m["sft"] and m["documents"] == 3
    # Reference, token by token: (id, trained?) in order, EOS after each record untrained.
    R, E = tok.role_ids, tok.end_id
    ref: list[tuple[int, int]] = []

    def msg(role: str, text: str) -> None:
        train = int(role == "assistant")
        ref.append((R[role], 0))
        ref.extend((t, train) for t in tok.encode(text))
        ref.append((E, train))

    for role, text in [("system", "S"), ("user", "hi"), ("assistant", "yo!")]:
        msg(role, text)
    ref.append((tok.eos_id, 0))
    for role, text in [("user", "2+2?"), ("assistant", " 4")]:
        msg(role, text)
    ref.append((tok.eos_id, 0))
    for role, text in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d\n")]:
        msg(role, text)
    ref.append((tok.eos_id, 0))
    sh = m["splits"]["train"]["shards"][0]
    assert np.load(tmp_path / "sft" / sh["tokens"]).tolist() == [t for t, _ in ref]
    assert np.load(tmp_path / "sft" / sh["mask"]).tolist() == [k for _, k in ref]
    # Loader: one window over everything; label t = token t+1 exactly where it is trained.
    L = len(ref) - 1
    b = next(DistributedLoader(tmp_path / "sft", seq_len=L, micro_batch=1))
    want = [ref[t + 1][0] if ref[t + 1][1] else IGNORE_INDEX for t in range(L)]
    assert b["labels"][0].tolist() == want
    assert b["input_ids"][0].tolist() == [t for t, _ in ref[:-1]]

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            recs[1],
            {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "bot", "content": "x"}]},
            {"q": 1},
        ],
    )
    with pytest.raises(LongtrainError, match=r"bad.jsonl:2: no assistant message"):
        run(bad, tmp_path / "sb", sft=True)
    m = run(bad, tmp_path / "sb2", sft=True, skip_bad=True, val_fraction=0.0)
    assert m["bad_records"] == 3 and m["documents"] == 1
    assert "role 'bot'" in m["first_bad"][1] and "fields present: q" in m["first_bad"][2]


@pytest.mark.timeout(120)
def test_pool_error_midway_fails_fast_and_feed_is_bounded(tmp_path: Path) -> None:
    rows = [{"text": f"x = {i}\n"} for i in range(3000)]
    rows[40] = {"body": "no text"}
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(LongtrainError, match=r"c.jsonl:41: no field 'text'"):
        run(corpus, tmp_path / "o", workers=2)
    # The feeder (the pool's task thread) never runs more than `limit` records ahead.
    throttle = prep._Throttle(5)
    pulled: list[int] = []
    t = threading.Thread(target=lambda: pulled.extend(throttle.feed(iter(range(100)))))
    t.start()
    time.sleep(0.3)
    assert len(pulled) == 5
    for _ in range(3):
        throttle.sem.release()  # the parent consumed three results
    time.sleep(0.3)
    assert len(pulled) == 8
    throttle.close()
    t.join(timeout=5)
    assert not t.is_alive() and len(pulled) == 8


def test_split_independent_of_path_spelling(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", list(small_rows()[:40]))
    a = run(tmp_path / "d" / "*.jsonl", tmp_path / "abs", val_fraction=0.3)
    monkeypatch.chdir(tmp_path)
    b = run("./d/a.jsonl", tmp_path / "rel", val_fraction=0.3)
    assert 0 < a["splits"]["val"]["documents"] < 40
    assert shard_hashes(a) == shard_hashes(b)


# ---- nothing lost: a prepared dataset survives any failed or refused prepare ------------------


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative name -> bytes): what "untouched" means."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
    }


def test_refused_or_failed_prepare_leaves_the_dataset_intact(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:40]))
    d = tmp_path / "data"
    old = run(corpus, d, val_fraction=0.2, shard_tokens=20_000)
    before = snapshot(d)
    # Issue 12: a typo'd corpus used to unlink the manifest and every shard before failing.
    with pytest.raises(LongtrainError, match="typo"):
        run(tmp_path / "typo*.txt", d, val_fraction=0.2, shard_tokens=20_000)
    assert snapshot(d) == before
    # Other options into a complete dataset: refused, naming the directory, what differs, the fix.
    with pytest.raises(LongtrainError, match=r"data: .*val_fraction 0.2 -> 0.3.*--overwrite"):
        run(corpus, d, val_fraction=0.3, shard_tokens=20_000)
    assert snapshot(d) == before
    with pytest.raises(LongtrainError, match="typo"):
        run(tmp_path / "typo*.txt", d, val_fraction=0.3, overwrite=True)
    assert snapshot(d) == before

    # --overwrite builds beside the old dataset: interrupted midway, the old one is untouched.
    calls = {"n": 0}
    real = prep._encode

    def flaky(item):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(prep, "_encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, d, val_fraction=0.3, shard_tokens=20_000, overwrite=True)
    assert snapshot(d) == before
    assert run(corpus, d, val_fraction=0.2, shard_tokens=20_000) == old  # still usable as is
    # Re-running the overwrite resumes the build beside it, then swaps it in.
    calls["n"] = -(10**9)
    new = run(corpus, d, val_fraction=0.3, shard_tokens=20_000, overwrite=True)
    assert "resuming after" in capsys.readouterr().out
    assert 0 < calls["n"] + 10**9 < 40
    assert new["val_fraction"] == 0.3 and new == json.loads((d / "manifest.json").read_text())
    assert all(verify_shard(d, s) for sp in ("train", "val") for s in new["splits"][sp]["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "data"]  # no leftovers
    fresh = run(corpus, tmp_path / "fresh", val_fraction=0.3, shard_tokens=20_000)
    assert shard_hashes(fresh) == shard_hashes(new)
    # Re-verifying a finished dataset does not need its corpus any more (as before).
    corpus.rename(tmp_path / "moved.jsonl")
    assert run(corpus, d, val_fraction=0.3, shard_tokens=20_000) == new


def test_swap_interrupted_between_renames_restores_the_old_dataset(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:20]))
    d = tmp_path / "data"
    run(corpus, d, val_fraction=0.2)
    before = snapshot(d)
    # A crash right after the first rename of the swap: the old dataset sits under the
    # reserved sibling name, nothing at --out. The next prepare puts it back first.
    d.rename(prep.sibling_dir(d, "old"))
    with pytest.raises(LongtrainError, match="--overwrite"):
        run(corpus, d, val_fraction=0.3)
    assert snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "data"]


def test_foreign_manifest_or_files_are_never_overwritten_silently(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:20]))
    d = tmp_path / "theirs"
    d.mkdir()
    (d / "manifest.json").write_text('{"model": "not longtrain"}\n')
    with pytest.raises(LongtrainError, match=r"theirs/manifest.json: not written by.*--overwrite"):
        run(corpus, d, val_fraction=0.2)
    assert (d / "manifest.json").read_text() == '{"model": "not longtrain"}\n'
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json"]
    # --overwrite replaces the whole directory, so files that are not longtrain's stop it.
    (d / "notes.txt").write_text("mine")
    with pytest.raises(LongtrainError, match=r"notes.txt"):
        run(corpus, d, val_fraction=0.2, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    (d / "notes.txt").unlink()
    m = run(corpus, d, val_fraction=0.2, overwrite=True)
    assert json.loads((d / "manifest.json").read_text()) == m and m["documents"] == 20


def test_out_is_a_file_and_empty_val_split_are_one_clear_error(tmp_path: Path, capsys) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", list(small_rows()[:20]))
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(LongtrainError, match=r"--out .*afile: is a file"):
        run(corpus, f)
    assert f.read_text() == "x"
    rc = main(["prepare", "--corpus", str(corpus), "--tokenizer", str(stdlib_tokenizer_dir())]
              + ["--out", str(f), "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "afile: is a file" in err[0]
    # Three documents, none of which hashes below 0.01: val would be empty. Said now, not at
    # pretrain time.
    rows = list(small_rows()[:3])
    assert not any(is_val(f"t.jsonl:{i}", 0.01) for i in (1, 2, 3))
    tiny = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(LongtrainError, match=r"--val-fraction 0.01 put 0 of 3 documents in val"):
        run(tiny, tmp_path / "v", val_fraction=0.01)
    assert not (tmp_path / "v" / "manifest.json").exists()
    # The advice works: another --val-fraction replaces the unfinished run.
    assert run(tiny, tmp_path / "v", val_fraction=0.0)["documents"] == 3


# ---- long documents: --group-by directory, --min-doc-tokens, length distribution ---------------


def documents(d: Path, split: str = "train") -> list[np.ndarray]:
    """The documents of a split (EOS dropped), in order, from the shards and their indexes."""
    m = json.loads((d / "manifest.json").read_text())
    out = []
    for sh in m["splits"][split]["shards"]:
        toks, off = np.load(d / sh["tokens"]), np.load(d / sh["index"])
        out += [toks[a : b - 1] for a, b in zip(off[:-1], off[1:])]
    return out


def test_group_by_directory_decodes_to_its_files_with_headers(tmp_path: Path, capsys) -> None:
    tree = {
        "README.txt": "top level\n",
        "src/b.txt": "beta, no final newline",
        "src/a.txt": "alpha\n",
        "src/sub/c.txt": "gamma\n  indented\n",
        "docs/z.txt": "zeta \u00e9\n",
    }
    for rel, text in tree.items():
        (tmp_path / "repo" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / rel).write_text(text)
    corpus = str(tmp_path / "repo" / "**" / "*.txt")
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    by_file = run(corpus, tmp_path / "files", val_fraction=0.0)
    assert by_file["documents"] == 5 and by_file["group_by"] == "file"  # the default
    rc = main(["prepare", "--corpus", corpus, "--tokenizer", str(stdlib_tokenizer_dir()), "--out",
               str(tmp_path / "dirs"), "--val-fraction", "0", "--group-by", "directory"])  # fmt: skip
    assert rc == 0
    m = json.loads((tmp_path / "dirs" / "manifest.json").read_text())
    assert m["documents"] == 4 and m["group_by"] == "directory"
    # Directories sorted, files in path order inside each, each after its header line, the
    # text exactly as stored (no newline added after a file that lacks one).
    want = [
        "=== README.txt ===\ntop level\n",
        "=== docs/z.txt ===\nzeta \u00e9\n",
        "=== src/a.txt ===\nalpha\n=== src/b.txt ===\nbeta, no final newline",
        "=== src/sub/c.txt ===\ngamma\n  indented\n",
    ]
    assert [tok.decode(d.tolist()) for d in documents(tmp_path / "dirs")] == want
    assert (
        group_text([("src/a.txt", "alpha\n"), ("src/b.txt", "beta, no final newline")]) == want[2]
    )
    assert file_header("src/a.txt") == "=== src/a.txt ===\n"
    capsys.readouterr()
    with pytest.raises(
        LongtrainError, match=r"--group-by directory: --corpus .*c.jsonl holds jsonl"
    ):
        run(
            write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}]), tmp_path / "o", group_by="directory"
        )
    with pytest.raises(LongtrainError, match=r"--group-by directory with --txt-per-line"):
        run(corpus, tmp_path / "o2", group_by="directory", txt_per_line=True)
    with pytest.raises(LongtrainError, match=r"--group-by folder: choose one of file, directory"):
        run(corpus, tmp_path / "o3", group_by="folder")


def test_min_doc_tokens_and_document_length_distribution(tmp_path: Path, capsys) -> None:
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    rows = list(small_rows()[:60])
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    lengths = np.array([len(tok.encode(r["text"])) for r in rows])
    n = int(np.median(lengths))
    kept = lengths >= n
    assert 0 < kept.sum() < len(rows)
    everything = run(corpus, tmp_path / "all", val_fraction=0.2)
    assert everything["dropped_short"] == 0 and everything["documents"] == len(rows)
    capsys.readouterr()
    m = run(corpus, tmp_path / "long", val_fraction=0.2, min_doc_tokens=n, shard_tokens=30_000)
    assert m["min_doc_tokens"] == n and m["dropped_short"] == int((~kept).sum())
    assert m["documents"] == int(kept.sum())
    printed = capsys.readouterr().out
    for split in ("train", "val"):
        got = np.array([len(d) for d in documents(tmp_path / "long", split)])
        assert len(got) and got.min() >= n
        want = [int(v) for v in np.percentile(got, [50, 90], method="lower")]
        st = m["splits"][split]["doc_lengths"]
        assert st == {"count": len(got), "p50": want[0], "p90": want[1], "max": int(got.max())}
        assert (
            f"{split}:" in printed
            and f"p50 {st['p50']}, p90 {st['p90']}, max {st['max']}" in printed
        )
    # Exactly the documents of >= n tokens, in corpus order, in the split they had anyway.
    for split in ("train", "val"):
        want_docs = [d.tolist() for d in documents(tmp_path / "all", split) if len(d) >= n]
        assert [d.tolist() for d in documents(tmp_path / "long", split)] == want_docs
    with pytest.raises(LongtrainError, match=rf"min_doc_tokens {n} -> {n + 1}.*--overwrite"):
        run(corpus, tmp_path / "long", val_fraction=0.2, min_doc_tokens=n + 1, shard_tokens=30_000)
    with pytest.raises(
        LongtrainError, match=r"no documents left .*60 shorter than --min-doc-tokens"
    ):
        run(corpus, tmp_path / "none", val_fraction=0.2, min_doc_tokens=10**9)
    with pytest.raises(LongtrainError, match="--min-doc-tokens -1: must be 0 or more"):
        run(corpus, tmp_path / "neg", min_doc_tokens=-1)


@pytest.mark.slow
def test_stdlib_grouped_by_directory_gives_long_documents(tmp_path: Path) -> None:
    tok = Tokenizer.load(stdlib_tokenizer_dir())
    m = prepare(
        CorpusSpec("stdlib", group_by="directory"),
        stdlib_tokenizer_dir(),
        tmp_path / "dirs",
        workers=2,
        val_fraction=0.05,
        shard_tokens=3_000_000,
        progress=False,
    )
    by_file = sum(1 for _, text in stdlib_docs() if text.strip())
    longest = max(m["splits"][s]["doc_lengths"]["max"] for s in ("train", "val"))
    print(f"stdlib: {by_file} documents by file, {m['documents']} by directory, longest {longest}")
    assert m["documents"] * 5 <= by_file and longest >= 200_000
    # One real directory document decodes to its files, each after its header, exactly.
    texts = dict(stdlib_docs())
    files = sorted(k for k in texts if k.startswith("json/") and k.count("/") == 1)
    want = group_text((f, texts[f]) for f in files)
    assert len(files) >= 4 and any(
        tok.decode(d.tolist()) == want for d in documents(tmp_path / "dirs")
    )
