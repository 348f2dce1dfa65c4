"""Chat / instruction records -> token ids + loss mask, packed like pretraining data.

Accepted records (one per JSONL line or dataset row):

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- ``{"prompt": str, "response": str}`` (optionally ``"system": str``), read as one user turn
  and one assistant turn.

Each message becomes ``<|role|>`` + ``encode(content)`` + ``<|end|>``, with no separators and
no BOS; this is exactly what the chat template in ``tokenizer.CHAT_TEMPLATE`` renders, so
``AutoTokenizer.apply_chat_template(messages, tokenize=True)`` gives the same ids. Packing
appends EOS after the record (mask 0), as after every pretraining document.

The mask marks *targets*: ``mask[j] == 1`` means token ``j`` is predicted with a loss. It is
1 for an assistant message's content tokens and its ``<|end|>`` (the model must learn to stop)
and 0 for everything else, including the ``<|assistant|>`` marker itself (it is given, not
generated). The loader turns ``mask[t+1] == 0`` into ``labels[t] = -100``.
"""

from __future__ import annotations

from typing import Any

from longtrain.data.tokenizer import ROLES, Tokenizer
from longtrain.model.errors import LongtrainError


def record_messages(doc_id: str, row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of one record, validated; one clear error naming the record otherwise."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LongtrainError(
                f"{doc_id}: 'messages' must be a non-empty list of {{role, content}}"
            )
    elif "prompt" in row and "response" in row:
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": row["system"]})
        msgs += [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
    else:
        raise LongtrainError(
            f"{doc_id}: an SFT record needs 'messages' or 'prompt' + 'response'; fields present: "
            f"{', '.join(map(str, row)) or '(none)'}"
        )
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LongtrainError(
                f"{doc_id}: message {i} must be an object with 'role' and 'content'"
            )
        if m["role"] not in ROLES:
            raise LongtrainError(
                f"{doc_id}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise LongtrainError(
                f"{doc_id}: message {i} content is {type(m['content']).__name__}, expected a string"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise LongtrainError(f"{doc_id}: no assistant message, so nothing would be trained")
    return out


def encode_chat(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and target mask (same length) of a validated conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        body = tok.encode(m["content"]) + [tok.end_id]
        train = 1 if m["role"] == "assistant" else 0
        ids += [tok.role_ids[m["role"]], *body]
        mask += [0] + [train] * len(body)
    return ids, mask


def encode_record(tok: Tokenizer, doc_id: str, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """:func:`record_messages` then :func:`encode_chat`."""
    return encode_chat(tok, record_messages(doc_id, row))
