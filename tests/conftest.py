"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from longtrain.data.corpus import CorpusSpec, iter_texts, stdlib_files
from longtrain.data.prepare import prepare
from longtrain.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer (vocab 512) + prepared LM data (~1.4M tokens of stdlib code) + SFT data."""
    root = tmp_path_factory.mktemp("ft")
    corp = root / "corpus"
    corp.mkdir()
    for f in [f for f in stdlib_files() if f.stat().st_size > 20000][:60]:
        (corp / f"{f.parent.name}_{f.name}.txt").write_text(f.read_text(errors="replace"))
    docs = list(iter_texts(CorpusSpec(str(corp / "*.txt"))))
    train_tokenizer(docs, root / "tok", vocab_size=512, sample_mb=1, progress=False)
    prepare(CorpusSpec(str(corp / "*.txt")), root / "tok", root / "data", workers=1,
            val_fraction=0.1, progress=False)  # fmt: skip
    rng = random.Random(0)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(400):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            msgs = [{"role": "user", "content": f"add {a} and {b}"},
                    {"role": "assistant", "content": f"return {a + b}"}]  # fmt: skip
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "def calc(x):"})
            f.write(json.dumps({"messages": msgs}) + "\n")
    prepare(CorpusSpec(str(root / "chat.jsonl")), root / "tok", root / "sft", workers=1,
            val_fraction=0.1, sft=True, progress=False)  # fmt: skip
    return root
