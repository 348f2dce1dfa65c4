"""Tokenizer: training on the stdlib, exact round trip, HF files, chat template, bad input.

STDLIB tests (``stdlib`` in their names, marked ``slow``; ``-m "not slow"`` deselects them)
read the whole standard library (~31 MB): the round trip of every file takes ~15 s on 2 cores. The tokenizer they use is trained once
per session (vocab 2000 on a 4 MB sample, ~2 s) by :func:`stdlib_tokenizer_dir`, which
test_data_prepare.py reuses.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import pytest

from longtrain.data.corpus import CorpusSpec, iter_texts
from longtrain.data.sft import encode_chat
from longtrain.data.tokenizer import (
    CHAT_TEMPLATE,
    Tokenizer,
    save_hf_tokenizer,
    train_tokenizer,
)
from longtrain.model.errors import LongtrainError

_TMP = tempfile.TemporaryDirectory(prefix="longtrain-data-tests-")
TRAIN_SECONDS: dict[str, float] = {}


@functools.cache
def stdlib_docs() -> tuple[tuple[str, str], ...]:
    """Every stdlib document (id, text), read once per session."""
    return tuple(iter_texts(CorpusSpec("stdlib")))


@functools.cache
def stdlib_tokenizer_dir() -> Path:
    """A vocab-2000 tokenizer trained on a 4 MB stdlib sample, once per session."""
    out = Path(_TMP.name) / "tok"
    t0 = time.perf_counter()
    train_tokenizer(
        stdlib_docs(), out, vocab_size=2000, sample_mb=4, source="stdlib", progress=False
    )
    TRAIN_SECONDS["stdlib"] = time.perf_counter() - t0
    return out


@functools.cache
def stdlib_encodings() -> tuple[list[int], ...]:
    """Token ids of every stdlib document, by sentencepiece's own batch threading (a path
    independent of prepare's process pool)."""
    t = Tokenizer.load(stdlib_tokenizer_dir())
    return tuple(t.sp.encode([text for _, text in stdlib_docs()], out_type=int, num_threads=2))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.load(stdlib_tokenizer_dir())


def test_stdlib_tokenizer_trains_fast_with_fixed_specials(tok: Tokenizer) -> None:
    assert TRAIN_SECONDS["stdlib"] < 60
    meta = json.loads((stdlib_tokenizer_dir() / "tokenizer_meta.json").read_text())
    assert tok.vocab_size == meta["vocab_size"] == 2000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.role_ids == {"system": 4, "user": 5, "assistant": 6} and tok.end_id == 7
    assert meta["special_tokens"]["<|end|>"] == 7 and len(tok.hash) == 64
    # Deterministic: the same corpus, sample and seed give the same model bytes.
    again = Path(_TMP.name) / "tok-again"
    train_tokenizer(stdlib_docs(), again, vocab_size=2000, sample_mb=4, progress=False)
    assert Tokenizer.load(again).hash == tok.hash


@pytest.mark.slow
def test_stdlib_roundtrip_every_file(tok: Tokenizer) -> None:
    docs = stdlib_docs()
    assert len(docs) > 1700
    encoded = stdlib_encodings()
    bad = [doc_id for (doc_id, text), ids in zip(docs, encoded) if tok.decode(ids) != text]
    assert bad == []
    # No BOS/EOS added, no dummy prefix: encode concatenates like text does for plain lines.
    assert tok.bos_id not in tok.encode("x = 1\n") and tok.decode(tok.encode(" a")) == " a"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\t\tx\r\n",
        "    \n\n  ",
        "ünïcödé 漢字 🙂 \u2028 \x00\x7f",
        "1234567890",
        "<s></s><unk>",
        "\u2581",  # sentencepiece's whitespace mark, literal in the text
        "a\u2581 \u2581\u2581b \u2581",
    ],
)
def test_roundtrip_edge_cases(tok: Tokenizer, text: str, tmp_path: Path) -> None:
    assert tok.decode(tok.encode(text)) == text
    if "\u2581" in text:  # the HF tokenizer decodes our ids to the same text
        from transformers import AutoTokenizer

        save_hf_tokenizer(stdlib_tokenizer_dir(), tmp_path)
        assert AutoTokenizer.from_pretrained(str(tmp_path)).decode(tok.encode(text)) == text


@pytest.mark.slow
def test_hf_tokenizer_matches_on_sampled_stdlib(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_hf_tokenizer(stdlib_tokenizer_dir(), tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    sample = stdlib_docs()[::12]
    assert len(sample) > 140
    for doc_id, text in sample:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, doc_id  # default call adds no BOS/EOS
        assert hf.decode(ids) == text, doc_id
    s = "<|user|>hi<|end|><|assistant|>  x\n<|end|>"
    assert hf.encode(s, add_special_tokens=False) == tok.encode(s)


def test_chat_template_matches_sft_ids(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    save_hf_tokenizer(stdlib_tokenizer_dir(), tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.chat_template == CHAT_TEMPLATE
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["add_bos_token"] is False
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": " Fine.\n\tok "},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "done"},
    ]
    ids, _ = encode_chat(tok, msgs)
    got = hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert list(got) == ids
    prompt = hf.apply_chat_template(
        msgs[:2], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert (
        list(prompt) == encode_chat(tok, msgs[:2] + [{"role": "assistant", "content": ""}])[0][:-1]
    )


def test_tokenizer_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(LongtrainError, match="tokenizer.model: not found"):
        Tokenizer.load(tmp_path)
    d = tmp_path / "copy"
    d.mkdir()
    src = stdlib_tokenizer_dir()
    (d / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes() + b"x")
    (d / "tokenizer_meta.json").write_text((src / "tokenizer_meta.json").read_text())
    with pytest.raises(LongtrainError, match="does not match"):
        Tokenizer.load(d)
    with pytest.raises(LongtrainError, match="--vocab-size"):
        train_tokenizer([("a", "b")], tmp_path / "t", vocab_size=100)
    with pytest.raises(LongtrainError, match="no documents"):
        train_tokenizer([], tmp_path / "t", vocab_size=500)
