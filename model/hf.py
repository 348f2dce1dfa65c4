"""The map between longtrain's Transformer and transformers' ``LlamaForCausalLM``: names and config.

Weights: a declarative key map (:data:`KEY_MAP`) plus named transforms (:data:`TRANSFORMS`).
Our RoPE uses transformers' ``rotate_half`` pairing, so q/k need no permutation and every
entry is ``identity``; a checkpoint in Meta's interleaved layout would add a ``permute_qk``
transform here and nowhere else.

Config: :func:`config_to_hf` writes a complete ``config.json`` that loads in transformers 5
(which reads ``rope_parameters``) and in 4.4x (which reads ``rope_scaling``): both keys are
written, with the same content. Dynamic NTK (all versions) and YaRN (4.4x up to 4.47) are
measured by transformers against ``max_position_embeddings``, so for those two types
``max_position_embeddings`` is the original (pretraining) length, as in Qwen's YaRN configs;
for the other types it is ``max_seq_len``. Checked: logits of exported linear, dynamic, yarn
and llama3 models at 4x the original length agree to 4e-6 in transformers 4.46.3 and 5.24.

Only maps live here (single-device, no files): reading and writing directories is
``longtrain.train.artifacts`` and ``longtrain.train.export``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from longtrain.model.config import ModelConfig, RopeScaling
from longtrain.model.errors import LongtrainError

# (longtrain name, transformers name, transform). "{i}" is the layer index.
KEY_MAP: list[tuple[str, str, str]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "identity"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "identity"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "identity"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "identity"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "identity"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "identity"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "identity"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", "identity"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", "identity"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", "identity"),
    ("norm.weight", "model.norm.weight", "identity"),
    ("output.weight", "lm_head.weight", "identity"),
]

Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor]
# name -> (longtrain -> HF, HF -> longtrain)
TRANSFORMS: dict[str, tuple[Transform, Transform]] = {
    "identity": (lambda t, cfg: t, lambda t, cfg: t),
}

# Keys some transformers versions stored that carry no weights of their own.
_IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
"""transformers' spelling of each dtype (config.json ``torch_dtype`` / ``dtype``)."""


# ---- config ------------------------------------------------------------------------------


def _rope_dict(rs: RopeScaling) -> dict[str, Any]:
    d = rs.to_dict()
    d["rope_type"] = d.pop("type")
    if rs.type == "dynamic":
        # transformers reads dynamic's original length from max_position_embeddings and
        # warns about this key; it is written there instead (see config_to_hf).
        d.pop("original_max_position_embeddings", None)
    return d


def config_to_hf(
    cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """transformers ``LlamaConfig`` dict for ``cfg`` (loads in transformers 4.4x and 5)."""
    rs = cfg.rope_scaling
    max_pos = cfg.max_seq_len
    if rs is not None and rs.type in ("dynamic", "yarn"):
        # transformers <= 4.47 measures both against max_position_embeddings (yarn ignores
        # original_max_position_embeddings there), so it must hold the original length;
        # transformers 5 reads original_max_position_embeddings and agrees.
        assert rs.original_max_position_embeddings is not None
        max_pos = rs.original_max_position_embeddings
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs is not None:
        rope_parameters = {**_rope_dict(rs), "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": max_pos,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_dict(rs) if rs is not None else None,  # transformers 4.4x
        "rope_parameters": rope_parameters,  # transformers 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise LongtrainError(f"{where}: missing field '{key}'")
    return d[key]


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers Llama config dict; unsupported features are refused."""
    archs = d.get("architectures") or []
    if d.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise LongtrainError(
            f"{where}: model_type={d.get('model_type')!r}, architectures={archs}; import-hf reads "
            "Llama models (LlamaForCausalLM) only"
        )
    for key, ok in (
        ("hidden_act", d.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not d.get("attention_bias", False)),
        ("mlp_bias", not d.get("mlp_bias", False)),
        ("pretraining_tp", d.get("pretraining_tp", 1) in (1, None)),
    ):
        if not ok:
            raise LongtrainError(
                f"{where}: {key}={d.get(key)!r} is not supported by longtrain's Llama"
            )
    # transformers 5 prefers rope_scaling when present (legacy), else rope_parameters.
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise LongtrainError(f"{where}: partial_rotary_factor != 1 is not supported")
    rope.pop("partial_rotary_factor", None)
    max_pos = int(_require(d, "max_position_embeddings", where))
    scaling: RopeScaling | None = None
    max_seq_len = max_pos
    if rope_type != "default":
        if rope_type not in ("linear", "dynamic", "yarn", "llama3"):
            raise LongtrainError(
                f"{where}: rope type {rope_type!r} is not supported (linear, dynamic, yarn, llama3 are)"
            )
        if rope_type == "dynamic":
            # transformers measures dynamic NTK against max_position_embeddings.
            rope["original_max_position_embeddings"] = max_pos
            max_seq_len = int(max_pos * float(rope.get("factor", 1.0)))
        elif rope_type in ("yarn", "llama3"):
            rope.setdefault("original_max_position_embeddings", max_pos)
            if rope_type == "yarn":  # max_position_embeddings may hold the original length
                omp = int(rope["original_max_position_embeddings"])
                max_seq_len = max(max_pos, int(omp * float(rope.get("factor", 1.0))))
        else:
            rope.pop("original_max_position_embeddings", None)
        try:
            scaling = RopeScaling.from_dict({"type": rope_type, **rope})
        except LongtrainError as e:
            raise LongtrainError(f"{where}: {e}") from None
    n_heads = int(_require(d, "num_attention_heads", where))
    try:
        return ModelConfig(
            vocab_size=int(_require(d, "vocab_size", where)),
            dim=int(_require(d, "hidden_size", where)),
            n_layers=int(_require(d, "num_hidden_layers", where)),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=d.get("head_dim"),
            ffn_dim=int(_require(d, "intermediate_size", where)),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except LongtrainError as e:
        raise LongtrainError(f"{where}: {e}") from None


# ---- state dicts -------------------------------------------------------------------------


def key_rows(cfg: ModelConfig, lm_head: bool = True) -> list[tuple[str, str, str]]:
    """:data:`KEY_MAP` expanded for ``cfg``: ``(ours, theirs, transform)`` per tensor, in order.

    ``lm_head=False`` leaves the LM head out (a tied model, or a classifier whose head is
    ``score``).
    """
    rows = []
    for ours, theirs, transform in KEY_MAP:
        if ours.startswith("output.") and (cfg.tie_embeddings or not lm_head):
            continue
        if "{i}" in ours:
            rows += [(ours.format(i=i), theirs.format(i=i), transform) for i in range(cfg.n_layers)]
        else:
            rows.append((ours, theirs, transform))
    return rows


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """longtrain names -> transformers names; every key must be mapped, none left over."""
    rows = key_rows(cfg)
    missing = [ours for ours, _, _ in rows if ours not in sd]
    extra = sorted(set(sd) - {ours for ours, _, _ in rows})
    if missing or extra:
        raise LongtrainError(
            f"state dict does not match the model config: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return {theirs: TRANSFORMS[t][0](sd[ours], cfg) for ours, theirs, t in rows}


def state_dict_from_hf(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "weights"
) -> dict[str, torch.Tensor]:
    """transformers names -> longtrain names; a tied ``lm_head`` copy is checked and dropped."""
    sd = {k: v for k, v in sd.items() if not _IGNORED_HF_KEYS.fullmatch(k)}
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        if not torch.equal(
            sd["lm_head.weight"], sd.get("model.embed_tokens.weight", torch.empty(0))
        ):
            raise LongtrainError(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens"
            )
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    rows = key_rows(cfg)
    missing = [theirs for _, theirs, _ in rows if theirs not in sd]
    extra = sorted(set(sd) - {theirs for _, theirs, _ in rows})
    if missing or extra:
        raise LongtrainError(
            f"{where}: tensors do not match config.json: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return {ours: TRANSFORMS[t][1](sd[theirs], cfg) for ours, theirs, t in rows}
