"""prepare: manifest vs per-document encodings, deterministic split, resume, sources, bad input.

STDLIB tests (marked ``slow``) prepare the whole standard library twice (2 workers and
1 worker, ~25 s together on 2 cores); the rest use small corpora written into tmp dirs.
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
from longtrain.data.corpus import CorpusSpec
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
        if k in ("skip_bad", "errors", "text_field", "txt_per_line", "streaming")
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
    # Other options: prepared again from scratch, not mixed with the old chunks.
    other = run(corpus, tmp_path / "part", shard_tokens=50_000, val_fraction=0.2)
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
