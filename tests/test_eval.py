"""Long-context evaluation: position bucketing, the passkey generator and scoring, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from longtrain.data.passkey import (
    FILLER,
    INTRO,
    NEEDLE,
    QUESTION,
    answer_correct,
    make_passkey_sample,
    passkey_grid,
)
from longtrain.launch.cli import main as cli_main
from longtrain.model.errors import LongtrainError
from longtrain.train.eval.passkey import eval_passkey, predict_answer
from longtrain.train.eval.ppl import PositionBuckets


class CharTokenizer:
    """One token per character (ids = code points): lengths and positions are easy to check."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_position_buckets_by_hand() -> None:
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]])
    # Row 1 holds two documents: positions restart at 0 at index 3.
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])
    valid = torch.tensor([[True, True, False, True, True, True], [True] * 5 + [False]])
    b = PositionBuckets(2, 6)
    b.add(losses, pos, valid)
    rows = b.result()
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(0, 2, 6), (2, 4, 2), (4, 6, 2)]
    # [0,2): 1, 2, 10, 20, 40, 50; [2,4): 4, 30; [4,6): 5, 6.
    assert rows[0]["loss"] == pytest.approx((1 + 2 + 10 + 20 + 40 + 50) / 6)
    assert rows[1]["loss"] == pytest.approx((4 + 30) / 2)
    assert rows[2]["loss"] == pytest.approx(5.5)
    assert rows[2]["ppl"] == pytest.approx(torch.tensor(5.5).exp().item())
    empty = PositionBuckets(4, 10)
    empty.add(torch.ones(3), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    assert [r["tokens"] for r in empty.result()] == [3, 0, 0]
    assert empty.result()[1]["loss"] is None


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_needle_at_depth_and_exact_length(depth: float) -> None:
    tok = CharTokenizer()
    s = make_passkey_sample(tok, 2000, depth, seed=3, trial=1)
    text = tok.decode(s.input_ids)
    assert len(s.input_ids) == s.length == 2000
    assert text.startswith(INTRO) and text.endswith(QUESTION + s.key)
    needle = NEEDLE.format(key=s.key)
    assert text[s.needle_start : s.needle_start + len(needle)] == needle
    assert text.count(s.key) == 3  # twice in the needle, once as the answer
    n_filler = 2000 - len(INTRO) - len(needle) - len(QUESTION) - len(s.key)
    assert s.actual_depth == pytest.approx(depth, abs=1 / n_filler)
    assert (s.needle_start - len(INTRO)) == round(depth * n_filler)
    filler = (
        text[len(INTRO) : s.needle_start]
        + text[s.needle_start + len(needle) : -len(QUESTION + s.key)]
    )
    assert (FILLER * 30).startswith(filler[: len(FILLER) * 3])
    assert s.input_ids[s.answer_start :] == s.answer_ids == tok.encode(s.key)


def test_passkey_is_deterministic_and_keys_vary() -> None:
    tok = CharTokenizer()
    a = passkey_grid(tok, [500, 800], [0.0, 0.5], trials=3, seed=7)
    b = passkey_grid(tok, [500, 800], [0.0, 0.5], trials=3, seed=7)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    # A sample does not depend on which others are generated.
    alone = make_passkey_sample(tok, 800, 0.5, seed=7, trial=2)
    assert alone.input_ids == a[-1].input_ids
    assert len({s.key for s in a}) >= 10 and all(len(s.key) == 5 for s in a)
    other_seed = passkey_grid(tok, [500, 800], [0.0, 0.5], trials=3, seed=8)
    assert [s.key for s in other_seed] != [s.key for s in a]
    with pytest.raises(LongtrainError, match="too short"):
        make_passkey_sample(tok, 100, 0.5)


class OracleModel:
    """hidden() = one-hot of the next token; the head is the identity: argmax = next token.

    ``wrong`` positions predict a wrong token instead, to check what the score looks at.
    """

    def __init__(self, vocab: int, wrong: set[int]) -> None:
        self.head_weight = torch.eye(vocab)
        self.wrong = wrong

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        nxt = torch.cat([ids[0, 1:], ids[0, :1]])  # (L,): the token each position predicts
        for j in self.wrong:
            nxt[j] = (nxt[j] + 1) % self.head_weight.shape[0]
        return torch.nn.functional.one_hot(nxt, self.head_weight.shape[0]).float()[
            None
        ]  # (1, L, V)


def test_passkey_scored_only_on_the_key_tokens() -> None:
    tok = CharTokenizer()
    s = make_passkey_sample(tok, 600, 0.5, seed=0)
    cpu = torch.device("cpu")
    everything_else_wrong = set(range(s.answer_start - 1)) | {599}
    pred = predict_answer(OracleModel(256, everything_else_wrong), s, cpu)
    assert pred == s.answer_ids and answer_correct(pred, s)
    for k in range(len(s.answer_ids)):  # one wrong key token fails the sample
        assert not answer_correct(
            predict_answer(OracleModel(256, {s.answer_start - 1 + k}), s, cpu), s
        )
    samples = passkey_grid(tok, [400, 600], [0.0, 1.0], trials=2)
    res = eval_passkey(OracleModel(256, set()), samples, [400, 600], [0.0, 1.0], cpu)
    assert (
        res["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and res["overall"] == 1.0 and res["trials"] == 2
    )
    # The first key token wrong in every 400-token sample (the key is 5 characters there).
    res = eval_passkey(OracleModel(256, {400 - 5 - 1}), samples, [400, 600], [0.0, 1.0], cpu)
    assert res["accuracy"] == [[0.0, 0.0], [1.0, 1.0]] and res["overall"] == 0.5
    assert res["token_accuracy"] == [[0.8, 0.8], [1.0, 1.0]]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and prepared data from a small synthetic corpus, and a debug-sized model."""
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = (
        "the grass is green sky blue sun yellow pass key remember here we go and back again".split()
    )
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(15)) for _ in range(rng.randint(10, 40))]
        lines.append(f"the pass key is {rng.randint(0, 99999)}.")
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    tok, data = root / "tok", root / "data"
    assert cli_main(["tokenizer", "--corpus", str(corpus / "*.txt"), "--vocab-size", "320",
                     "--out", str(tok)]) == 0  # fmt: skip
    assert cli_main(["prepare", "--corpus", str(corpus / "*.txt"), "--tokenizer", str(tok),
                     "--out", str(data), "--workers", "1", "--val-fraction", "0.3"]) == 0  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(get_flavor("debug", vocab_size=320, max_seq_len=512), attention="sdpa")
    save_model_dir(model, root / "ckpt")
    return {"tok": tok, "data": data, "ckpt": root / "ckpt", "root": root}


def test_cli_eval_ppl_and_passkey_write_json_and_png(tiny_setup: dict[str, Path]) -> None:
    out = tiny_setup["root"] / "out"
    rc = cli_main(["eval", "--checkpoint", str(tiny_setup["ckpt"]), "--task", "ppl",
                   "--data", str(tiny_setup["data"]), "--seq-len", "256", "--bucket", "64",
                   "--samples", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    ppl = json.loads((out / "ppl_by_position.json").read_text())
    assert [b["start"] for b in ppl["buckets"]] == [0, 64, 128, 192]
    assert sum(b["tokens"] for b in ppl["buckets"]) == ppl["tokens"] > 0
    # An untrained model is close to uniform over the 320 tokens: loss near ln(320).
    assert abs(ppl["loss"] - torch.tensor(320.0).log().item()) < 0.5
    assert (out / "ppl_by_position.png").stat().st_size > 1000

    rc = cli_main(["eval", "--checkpoint", str(tiny_setup["ckpt"]), "--task", "passkey",
                   "--tokenizer", str(tiny_setup["tok"]), "--lengths", "384,512",
                   "--depths", "0,0.5,1", "--samples", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    pk = json.loads((out / "passkey.json").read_text())
    assert pk["lengths"] == [384, 512] and pk["depths"] == [0.0, 0.5, 1.0] and pk["trials"] == 2
    assert len(pk["accuracy"]) == 2 and all(0 <= a <= 1 for row in pk["accuracy"] for a in row)
    assert (out / "passkey.png").stat().st_size > 1000


def test_cli_eval_bad_input_is_one_line(
    tiny_setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(["eval", "--checkpoint", str(tiny_setup["root"] / "nope"), "--task", "ppl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0]
    rc = cli_main(["eval", "--checkpoint", str(tiny_setup["ckpt"]), "--task", "passkey",
                   "--tokenizer", str(tiny_setup["tok"]), "--lengths", "8,x"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--lengths" in err[0]
