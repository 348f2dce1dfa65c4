"""Passkey retrieval samples: a random number hidden at a chosen depth in filler text.

The format follows the passkey retrieval test of Mohtashami & Jaggi 2023 ("Landmark
Attention", section 4.2), used since by position-interpolation and YaRN papers to probe
whether a model can use its whole context: an instruction, repetitive filler, one needle
sentence holding the key, more filler, and a question whose answer is the key.

Samples are built in token space so the context length is exact: the pieces are encoded once,
the filler tokens are repeated and cut to fill the budget, and the needle goes after
``round(depth * filler_tokens)`` filler tokens. The key is drawn from a ``random.Random``
seeded with a string of (seed, length, depth, trial), so a sample never depends on the order
or the number of other samples, nor on ``PYTHONHASHSEED``. Only the key's tokens are scored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from longtrain.model.errors import LongtrainError

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is "


class Encoder(Protocol):
    """Anything with ``encode(text) -> list[int]`` (no BOS/EOS): our Tokenizer, a HF adapter."""

    def encode(self, text: str) -> list[int]: ...


@dataclass
class PasskeySample:
    """One sequence of exactly ``length`` tokens whose last ``len(answer_ids)`` are the key."""

    input_ids: list[int]
    """INTRO + filler + NEEDLE + filler + QUESTION + the key's tokens."""
    answer_start: int
    """Index of the key's first token in ``input_ids`` (the tokens scored)."""
    answer_ids: list[int]
    """The key's tokens (``input_ids[answer_start:]``)."""
    key: str
    """The number, as text."""
    needle_start: int
    """Index where the needle sentence begins."""
    depth: float
    """Requested depth in [0, 1]: 0 puts the needle right after the instruction, 1 right
    before the question."""
    actual_depth: float
    """Filler tokens before the needle / all filler tokens (differs from ``depth`` by rounding)."""
    length: int
    """Context length in tokens (``len(input_ids)``)."""


def make_passkey_sample(
    tokenizer: Encoder, length: int, depth: float, seed: int = 0, trial: int = 0, digits: int = 5
) -> PasskeySample:
    """A passkey sample of exactly ``length`` tokens with the needle at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise LongtrainError(f"--depths: {depth} is outside [0, 1]")
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.6f}:{trial}")
    key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    intro = tokenizer.encode(INTRO)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    answer = tokenizer.encode(key)
    filler_unit = tokenizer.encode(FILLER)
    n_filler = length - len(intro) - len(needle) - len(question) - len(answer)
    if n_filler < len(filler_unit) or not filler_unit or not answer:
        need = length - n_filler + len(filler_unit)
        raise LongtrainError(
            f"--lengths: {length} tokens is too short for a passkey prompt with this tokenizer "
            f"(at least {need} needed)"
        )
    filler = (filler_unit * (n_filler // len(filler_unit) + 1))[:n_filler]
    before = round(depth * n_filler)
    ids = intro + filler[:before] + needle + filler[before:] + question + answer
    assert len(ids) == length, (len(ids), length)
    return PasskeySample(
        input_ids=ids,
        answer_start=length - len(answer),
        answer_ids=answer,
        key=key,
        needle_start=len(intro) + before,
        depth=depth,
        actual_depth=before / n_filler,
        length=length,
    )


def passkey_grid(
    tokenizer: Encoder,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
) -> list[PasskeySample]:
    """``trials`` samples for every (length, depth) cell, in row-major order."""
    return [
        make_passkey_sample(tokenizer, n, d, seed, t)
        for n in lengths
        for d in depths
        for t in range(trials)
    ]


def answer_correct(predicted: Sequence[int], sample: PasskeySample) -> bool:
    """Exact match of the predicted ids at the key's positions (teacher-forced greedy).

    ``predicted[i]`` is the argmax prediction for ``input_ids[answer_start + i]`` made from
    the tokens before it. All of them right is the same as greedy decoding producing the key.
    """
    return list(predicted) == list(sample.answer_ids)


__all__ = [
    "FILLER",
    "INTRO",
    "NEEDLE",
    "QUESTION",
    "PasskeySample",
    "answer_correct",
    "make_passkey_sample",
    "passkey_grid",
]
