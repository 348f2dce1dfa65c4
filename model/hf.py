"""Conversion to and from transformers' ``LlamaForCausalLM`` directories, and model-only checkpoints.

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

Model-only checkpoint (what ``import-hf`` writes and ``export-hf`` reads; the trainer writes
the same two files into each checkpoint): ``model_config.json`` + ``model.safetensors`` in
longtrain names.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from longtrain.model.config import ModelConfig, RopeScaling
from longtrain.model.errors import LongtrainError
from longtrain.model.transformer import Transformer

MODEL_CONFIG_FILE = "model_config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
LORA_CONFIG_FILE = "lora_config.json"

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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


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


def _expand(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    rows = []
    for ours, theirs, transform in KEY_MAP:
        if ours.startswith("output.") and cfg.tie_embeddings:
            continue
        if "{i}" in ours:
            rows += [(ours.format(i=i), theirs.format(i=i), transform) for i in range(cfg.n_layers)]
        else:
            rows.append((ours, theirs, transform))
    return rows


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """longtrain names -> transformers names; every key must be mapped, none left over."""
    rows = _expand(cfg)
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
    rows = _expand(cfg)
    missing = [theirs for _, theirs, _ in rows if theirs not in sd]
    extra = sorted(set(sd) - {theirs for _, theirs, _ in rows})
    if missing or extra:
        raise LongtrainError(
            f"{where}: tensors do not match config.json: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return {ours: TRANSFORMS[t][1](sd[theirs], cfg) for ours, theirs, t in rows}


# ---- sharded safetensors -----------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '10KB', '123' -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(text).upper())
    if not m:
        raise LongtrainError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB, 200MB, 10KB")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    size = int(float(m.group(1)) * units[m.group(2)])
    if size < 1:
        raise LongtrainError(f"--max-shard-size: must be positive, got {text!r}")
    return size


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> list[str]:
    """Write ``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().clone()  # own storage: safetensors refuses shared
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / MODEL_WEIGHTS_FILE), metadata=meta)
        return [MODEL_WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LongtrainError(f"{path}: file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongtrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LongtrainError(f"{path}: expected a JSON object")
    return d


def load_hf_weights(hf_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory: single or sharded safetensors; pickles only
    with ``allow_pickle`` and then with ``weights_only=True`` (no code runs)."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        return _load_indexed(hf_dir, index, lambda p: load_file(str(p)))
    pickles = [hf_dir / "pytorch_model.bin", hf_dir / "pytorch_model.bin.index.json"]
    if any(p.is_file() for p in pickles):
        if not allow_pickle:
            raise LongtrainError(
                f"{hf_dir}: only pytorch_model.bin (pickle) weights found; pass --allow-pickle to "
                "read them with torch.load(weights_only=True), or convert them to safetensors"
            )

        def load_pickle(p: Path) -> dict[str, torch.Tensor]:
            return torch.load(p, map_location="cpu", weights_only=True)

        if pickles[0].is_file():
            return load_pickle(pickles[0])
        return _load_indexed(hf_dir, pickles[1], load_pickle)
    raise LongtrainError(
        f"{hf_dir}: no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _load_indexed(
    hf_dir: Path, index: Path, load: Callable[[Path], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise LongtrainError(f"{index}: no 'weight_map'")
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        path = hf_dir / fname
        if not path.is_file():
            raise LongtrainError(f"{index}: shard {fname} is listed but missing")
        out.update(load(path))
    return out


# ---- public API --------------------------------------------------------------------------


def _build(cfg: ModelConfig, sd: dict[str, torch.Tensor], attention: str) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, attention=attention)
    # assign=True adopts the loaded fp32 tensors instead of allocating a second copy.
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_hf(hf_dir: str | Path, allow_pickle: bool = False, attention: str = "auto") -> Transformer:
    """A transformers Llama directory -> fp32 :class:`Transformer` on CPU."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LongtrainError(f"--hf {hf_dir}: not a directory")
    cfg = config_from_hf(_read_json(hf_dir / "config.json"), where=str(hf_dir / "config.json"))
    sd = state_dict_from_hf(load_hf_weights(hf_dir, allow_pickle), cfg, where=str(hf_dir))
    return _build(cfg, sd, attention)


def _token_ids(tokenizer: str | Path | None) -> tuple[int | None, int | None, int | None]:
    if tokenizer is None:
        return None, None, None
    from longtrain.data.tokenizer import Tokenizer  # lazy: model/ does not depend on data/

    tok = Tokenizer.load(tokenizer)

    def ok(i: int) -> int | None:
        return i if i is not None and i >= 0 else None

    return ok(tok.bos_id), ok(tok.eos_id), ok(tok.pad_id)


def write_hf_config(
    cfg: ModelConfig, out: Path, tokenizer: str | Path | None, dtype: torch.dtype
) -> list[str]:
    """Write ``config.json`` and ``generation_config.json`` into ``out``; returns their names.

    Shared by :func:`save_hf` and the streaming export of training checkpoints, so both
    write the same files.
    """
    import transformers

    bos, eos, pad = _token_ids(tokenizer)
    hf_cfg = config_to_hf(cfg, bos, eos)
    hf_cfg["pad_token_id"] = pad
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = _DTYPE_NAMES[dtype]  # 4.4x / 5 spellings
    hf_cfg["transformers_version"] = transformers.__version__
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    gen.update(pad_token_id=pad, transformers_version=transformers.__version__)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ["config.json", "generation_config.json"]


def save_hf(
    model: Transformer,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write a directory ``AutoModelForCausalLM`` / ``AutoTokenizer`` load with no extra code.

    ``tokenizer`` is a directory written by ``longtrain tokenizer``. Returns the file names.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LongtrainError(f"--dtype: unknown {dtype!r}; use bf16, fp16 or fp32")
        dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    files = write_hf_config(cfg, out, tokenizer, dtype)
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    files += save_sharded(state_dict_to_hf(sd, cfg), out, parse_size(max_shard_size))
    if tokenizer is not None:
        from longtrain.data.tokenizer import save_hf_tokenizer  # lazy: data/ builds it

        save_hf_tokenizer(tokenizer, out)
    return files


def save_model_dir(model: Transformer, out_dir: str | Path) -> None:
    """Model-only checkpoint: ``model_config.json`` + ``model.safetensors`` (longtrain names)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(out / MODEL_WEIGHTS_FILE), metadata={"format": "pt"})
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")


def _lora_merged(
    sd: dict[str, torch.Tensor], ckpt: Path, merge_lora: bool
) -> dict[str, torch.Tensor]:
    if not any(k.endswith((".lora_a", ".lora_b")) for k in sd):
        return sd
    if not merge_lora:
        raise LongtrainError(
            f"{ckpt}: the weights hold LoRA adapters; pass --merge-lora to fold them in"
        )
    lcfg = _read_json(ckpt / LORA_CONFIG_FILE)
    from longtrain.model.lora import merge_lora_state_dict

    return merge_lora_state_dict(sd, float(lcfg["alpha"]) / float(lcfg["rank"]))


def load_model_dir(
    ckpt_dir: str | Path, attention: str = "auto", merge_lora: bool = False
) -> Transformer:
    """Inverse of :func:`save_model_dir` (also reads the same two files in a trainer checkpoint)."""
    ckpt = Path(ckpt_dir)
    cfg_path, w_path = ckpt / MODEL_CONFIG_FILE, ckpt / MODEL_WEIGHTS_FILE
    cfg_dict = _read_json(cfg_path)
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except LongtrainError as e:
        raise LongtrainError(f"{cfg_path}: {e}") from None
    if not w_path.is_file():
        raise LongtrainError(f"{w_path}: file not found")
    sd = _lora_merged(load_file(str(w_path)), ckpt, merge_lora)
    try:
        return _build(cfg, sd, attention)
    except RuntimeError as e:
        raise LongtrainError(
            f"{w_path}: weights do not match {MODEL_CONFIG_FILE}: {str(e).splitlines()[0]}"
        ) from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the newest committed ``checkpoints/step_XXXXXXXX`` of a run."""
    p = Path(path)
    if (p / MODEL_CONFIG_FILE).is_file():
        return p
    steps = sorted((p / "checkpoints").glob("step_" + "[0-9]" * 8)) if p.is_dir() else []
    done = [s for s in steps if (s / "COMMIT").is_file() and (s / MODEL_CONFIG_FILE).is_file()]
    if done:
        return done[-1]
    raise LongtrainError(
        f"--checkpoint {p}: no {MODEL_CONFIG_FILE} there and no committed checkpoints/step_XXXXXXXX "
        "under it; pass a checkpoint directory or a run directory"
    )


def cli_export_hf(args: argparse.Namespace) -> int:
    """``longtrain export-hf``: checkpoint (or run dir) -> transformers directory."""
    ckpt = resolve_checkpoint(args.checkpoint)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise LongtrainError(f"--tokenizer {args.tokenizer}: not a directory")
    size = parse_size(args.max_shard_size)
    model = load_model_dir(ckpt, attention="sdpa", merge_lora=args.merge_lora)
    files = save_hf(
        model, args.out, tokenizer=args.tokenizer, dtype=args.dtype, max_shard_size=size
    )
    print(f"exported {ckpt} -> {args.out} ({len(files)} model files, {args.dtype})")
    return 0


def cli_import_hf(args: argparse.Namespace) -> int:
    """``longtrain import-hf``: transformers Llama directory -> model-only checkpoint."""
    model = load_hf(args.hf, allow_pickle=args.allow_pickle, attention="sdpa")
    save_model_dir(model, args.out)
    print(f"imported {args.hf} -> {args.out} ({model.cfg.num_params():,} parameters)")
    return 0
