"""The model of a fine-tuning run: where its weights come from, its RoPE per stage, LoRA, heads.

``model.init`` may name, in order of detection:

- a Hugging Face Llama directory (``config.json``), read by ``longtrain.model.hf.load_hf``;
- a model-only directory (``model_config.json`` + ``model.safetensors``: import-hf output,
  a run's ``final/`` or ``best/``);
- a training checkpoint or run directory (``COMMIT`` / ``checkpoints/``), consolidated from
  its ZeRO shards on the CPU after every file is verified against its commit marker.

Adapters already in the initial weights are merged first (a LoRA run can be continued as a
full fine-tune or with fresh adapters). ``model.overrides`` and each stage may change the
RoPE settings (``rope_theta``, ``rope_scaling``) and ``max_seq_len`` of the initial model,
never its shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.train.finetune_config import Stage

ROPE_FIELDS = ("rope_theta", "rope_scaling", "max_seq_len")


def _init_kind(path: Path) -> str:
    if (path / "config.json").is_file():
        return "hf"
    if (path / "model_config.json").is_file() and (path / "model.safetensors").is_file():
        return "model_dir"
    if (path / "COMMIT").is_file() or (path / "checkpoints").is_dir():
        return "checkpoint"
    raise LongtrainError(
        f"model.init={path}: not an HF Llama directory (config.json), a model directory "
        "(model_config.json + model.safetensors) or a training checkpoint/run directory"
    )


def init_model_config(job: Any, manifest: dict[str, Any]) -> ModelConfig:
    """The run's base ModelConfig: the init model's (or the flavor's) + allowed overrides."""
    from longtrain.train.config import resolve_model_config

    init = job.model.init
    if not init:
        return resolve_model_config(job, manifest or None)
    path = Path(init)
    if not path.is_dir():
        raise LongtrainError(f"model.init={init}: no such directory")
    kind = _init_kind(path)
    if kind == "hf":
        from longtrain.model.hf import _read_json, config_from_hf

        cfg = config_from_hf(_read_json(path / "config.json"), where=str(path / "config.json"))
    else:
        if kind == "checkpoint":
            from longtrain.train.checkpoint import resolve_checkpoint

            path = resolve_checkpoint(path)
        cfg = ModelConfig.from_dict(json.loads((path / "model_config.json").read_text()))
    bad = sorted(
        k
        for k, v in job.model.overrides.items()
        if k not in ROPE_FIELDS and getattr(cfg, k, v) != v
    )
    if bad:
        raise LongtrainError(
            f"model.overrides.{bad[0]}: the shape comes from model.init={init}; only "
            f"{', '.join(ROPE_FIELDS)} may be overridden when fine-tuning"
        )
    cfg = cfg.replace(**{k: v for k, v in job.model.overrides.items() if k in ROPE_FIELDS})
    vocab = int(manifest.get("vocab_size", 0)) if manifest else 0
    if vocab > cfg.vocab_size:
        raise LongtrainError(
            f"model.init={init} has vocab_size={cfg.vocab_size}, smaller than the data's {vocab}"
        )
    return cfg


def stage_model_config(base: ModelConfig, job: Any, st: Stage) -> ModelConfig:
    """The model of one stage: the stage's RoPE settings and max_seq_len >= its seq_len."""
    ch: dict[str, Any] = {}
    if st.rope_theta is not None:
        ch["rope_theta"] = st.rope_theta
    if st.rope_scaling is not None:
        ch["rope_scaling"] = dict(st.rope_scaling)
    ch["max_seq_len"] = max(base.max_seq_len, st.seq_len)
    try:
        return base.replace(**ch)
    except LongtrainError as e:
        raise LongtrainError(f"finetune.stages[{st.index}]: {e}") from None


def check_shape_compatible(ckpt: Path, cfg: ModelConfig) -> None:
    """A checkpoint may differ from the run in RoPE and max_seq_len only (stages change them)."""
    saved = json.loads((Path(ckpt) / "model_config.json").read_text())
    now = cfg.to_dict()
    diff = [k for k in now if k not in ROPE_FIELDS and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise LongtrainError(
            f"{ckpt}/model_config.json: {k}={saved.get(k)!r} but this run has {now[k]!r}; "
            "resume with the checkpoint's model or start a new run_dir"
        )


def _merge_adapters(
    sd: dict[str, torch.Tensor], scaling: float | None, where: str
) -> dict[str, torch.Tensor]:
    if not any(k.endswith(".lora_a") for k in sd):
        return sd
    if scaling is None:
        raise LongtrainError(
            f"model.init={where}: holds LoRA adapters but no rank/alpha to merge them"
        )
    from longtrain.model.lora import merge_lora_state_dict

    return merge_lora_state_dict(sd, scaling)


def load_init_state(job: Any, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fp32 CPU state dict (longtrain names) of ``model.init``, adapters merged, head fitted."""
    from safetensors.torch import load_file

    path = Path(job.model.init)
    kind = _init_kind(path)
    scaling = None
    if kind == "hf":
        from longtrain.model.hf import load_hf

        sd = load_hf(path, attention="sdpa").state_dict()
    elif kind == "model_dir":
        sd = load_file(str(path / "model.safetensors"))
        lc = path / "lora_config.json"
        if lc.is_file():
            d = json.loads(lc.read_text())
            scaling = float(d["alpha"]) / float(d["rank"])
    else:
        from longtrain.train.checkpoint import read_client_state, resolve_checkpoint
        from longtrain.train.reshard import consolidate_state_dict

        path = resolve_checkpoint(path)
        sd = consolidate_state_dict(path)
        lora = read_client_state(path).get("config", {}).get("finetune", {}).get("lora", {})
        if lora.get("rank"):
            scaling = float(lora["alpha"]) / float(lora["rank"])
    sd = {k: v.float() for k, v in _merge_adapters(dict(sd), scaling, str(path)).items()}
    ft = job.finetune
    if ft.task == "classify":
        sd.pop("output.weight", None)
        if "score.weight" in sd and sd["score.weight"].shape[0] != ft.num_labels:
            sd.pop("score.weight")  # a new label set: a fresh head
    else:
        sd.pop("score.weight", None)
        if "output.weight" not in sd and not cfg.tie_embeddings:
            raise LongtrainError(
                f"model.init={path}: no LM head (output.weight); task lm needs one"
            )
    return sd


def _construct(job: Any, cfg: ModelConfig) -> nn.Module:
    from longtrain.model.heads import TransformerForClassification
    from longtrain.model.transformer import Transformer

    if job.finetune.task == "classify":
        return TransformerForClassification(
            cfg, job.finetune.num_labels, attention=job.model.attention
        )
    return Transformer(cfg, attention=job.model.attention)


@torch.no_grad()
def _fill(model: nn.Module, sd: dict[str, torch.Tensor] | None, zero3: bool, rank0: bool) -> None:
    """Copy ``sd`` into the (possibly ZeRO-3 partitioned) parameters; missing keys keep init."""
    if sd is None:
        return
    names = dict(model.named_parameters())
    if rank0 or not zero3:
        unknown = sorted(set(sd) - set(names))
        if unknown:
            raise LongtrainError(f"model.init: weights {unknown[:3]} do not exist in this model")
    for name, prm in names.items():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([prm], modifier_rank=0):
                if rank0 and name in sd:
                    prm.copy_(sd[name])
        elif name in sd:
            prm.copy_(sd[name])


def build_finetune_model(
    sj: Any,
    cfg: ModelConfig,
    topo: Any,
    ds_config: dict,
    device: torch.device,
    init_sd: dict | None,
) -> nn.Module:
    """Built like pretraining (meta + init, or ZeRO-3 partitioned), then initial weights,
    then LoRA adapters (head stays trainable), then Ulysses and activation checkpointing."""
    import torch.distributed as dist

    from longtrain.train.parallel import (
        apply_activation_checkpointing,
        apply_ulysses,
        setup_accelerator_env,
    )

    setup_accelerator_env()
    import deepspeed

    zero3 = sj.parallel.zero_stage == 3
    rank0 = dist.get_rank() == 0
    if zero3:
        from longtrain.train.engine import _init_zero3

        with deepspeed.zero.Init(
            data_parallel_group=topo.world_group,
            config_dict_or_path=ds_config,
            remote_device="cpu" if sj.parallel.offload_params else None,
        ):
            model = _construct(sj, cfg)
        _init_zero3(model, sj.seed)
        if hasattr(model, "score"):
            with deepspeed.zero.GatheredParameters([model.score.weight], modifier_rank=0):
                if rank0:
                    model.init_score()
    else:
        with torch.device("meta"):
            model = _construct(sj, cfg)
        model.to_empty(device=device)
        torch.manual_seed(sj.seed)
        model.init_weights()
    _fill(model, init_sd, zero3, rank0)
    lora = sj.finetune.lora
    if lora.rank:
        from longtrain.model.lora import LoRAConfig, apply_lora

        torch.manual_seed(sj.seed + 1)  # same adapters on every rank
        apply_lora(model, LoRAConfig(lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)))
        if hasattr(model, "score"):
            model.score.weight.requires_grad_(True)
    if zero3 and model.output is not None:
        # The LM head is used by the top-level forward (chunked loss), outside its module.
        deepspeed.zero.register_external_parameter(model, model.head_weight)
    apply_ulysses(model, topo, cfg.n_kv_heads)
    apply_activation_checkpointing(model, sj.parallel.activation_checkpointing)
    return model
