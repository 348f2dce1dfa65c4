"""The model card (``README.md``) of a transformers export, from what the run recorded.

:func:`model_card` writes the model's shape and then the run's own record
(:meth:`longtrain.train.artifacts.Artifact.record`): steps and tokens from the checkpoint's
progress, the last validation and training loss from ``metrics.jsonl``, the data's manifest
summary, every invocation from ``commands.jsonl`` and the resolved job. Nothing is typed in,
and nothing comes from the clock or the output path, so two exports of the same weights are
byte for byte the same (``longtrain.train.export.write_hf`` writes it into every export).
"""

from __future__ import annotations

import shlex
from typing import Any

import torch
import yaml

from longtrain.model.config import ModelConfig
from longtrain.model.hf import DTYPE_NAMES


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _model_rows(
    cfg: ModelConfig, params: int, dtype: torch.dtype, head: Any, lora: Any
) -> list[tuple[str, str]]:
    arch = "LlamaForSequenceClassification" if head else "LlamaForCausalLM"
    task = f"{int(head['num_labels'])}-way classifier on the last token" if head else "causal LM"
    rs = cfg.rope_scaling
    rope = f"theta {cfg.rope_theta:g}, "
    if rs is None:
        rope += "no scaling"
    else:
        knobs = [f"{k} {v:g}" for k, v in sorted(rs.to_dict().items()) if type(v) in (int, float)]
        rope += f"{rs.type} scaling ({', '.join(knobs)})"
    weights = DTYPE_NAMES[dtype]
    if lora:
        (cfg_lora, how) = lora
        weights += f", LoRA r={cfg_lora['rank']} alpha={float(cfg_lora['alpha']):g} {how}"
    return [
        ("architecture", f"`{arch}` ({task}): pre-norm decoder, RMSNorm, SwiGLU, RoPE, GQA"),
        ("parameters", f"{params:,}"),
        (
            "layers",
            f"{cfg.n_layers} x (dim {cfg.dim}, {cfg.n_heads} query / {cfg.n_kv_heads} "
            f"K/V heads of {cfg.head_dim}, MLP {cfg.ffn_dim})",
        ),
        (
            "vocabulary",
            f"{cfg.vocab_size} ({'tied' if cfg.tie_embeddings else 'untied'} embeddings)",
        ),
        ("context length", f"{cfg.max_seq_len} tokens"),
        ("RoPE", rope),
        ("weights", weights),
    ]


def _training_rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
    job = rec.get("job") or {}
    data, train, par = (job.get(k) or {} for k in ("data", "train", "parallel"))
    rows = [("steps", str(rec["step"])), ("tokens trained", f"{rec['tokens']:,}")]
    # Figures as the run logged them (repr of the float in metrics.jsonl).
    val = f"{rec['val_loss']!r} (step {rec['val_step']})" if "val_loss" in rec else "not evaluated"
    rows.append(("final validation loss", val))
    if "loss" in rec:
        rows.append(("last training loss", f"{rec['loss']!r} (step {rec['loss_step']})"))
    if (job.get("model") or {}).get("init"):
        rows.append(("initial weights", f"`{job['model']['init']}`"))
    if data:
        rows.append(("windows", f"{data.get('seq_len')} tokens, attention {data.get('attention')}"))
    if train:
        opt = (
            f"AdamW, lr {train.get('lr')!r}, {train.get('schedule')}, warm-up {train.get('warmup')}"
        )
        rows.append(("optimizer", opt))
        batch = f"micro-batch {train.get('micro_batch')} x accumulation {train.get('grad_accum')}"
        rows.append(("batch", batch + " per data-parallel rank"))
    if rec.get("world_size"):
        world, sp = int(rec["world_size"]), int(par.get("sp", 1))
        rows.append(
            ("processes", f"{world} = DP {world // sp} x SP {sp}, ZeRO-{par.get('zero_stage')}")
        )
    return rows


def _data_rows(man: dict[str, Any], data_dir: str | None) -> list[tuple[str, str]]:
    splits = ", ".join(
        f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens"
        for name, s in (man.get("splits") or {}).items()
        if "documents" in s and "tokens" in s
    )
    return [
        ("corpus", f"`{man.get('corpus', '?')}` prepared into `{data_dir}`"),
        ("documents", f"{man.get('documents', 0):,}"),
        ("tokens", f"{man.get('tokens', 0):,}"),
        ("splits", splits or "-"),
        ("vocabulary", f"{man.get('vocab_size')} ({man.get('dtype')} token ids)"),
        ("tokenizer sha256", f"`{man.get('tokenizer_hash')}`"),
    ]


def model_card(
    cfg: ModelConfig,
    params: int,
    dtype: torch.dtype,
    head: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    lora: tuple[dict[str, Any], str] | None = None,
) -> str:
    """The README.md of a transformers export: the model, then what its run recorded.

    ``params``: the tensors' element count as exported; ``head``: a classifier's head config;
    ``record``: :meth:`~longtrain.train.artifacts.Artifact.record` ({} or None: weights saved
    from memory); ``lora``: a LoRA run's adapter config and what became of the adapters
    ("merged in", "not included: base weights").
    """
    arch = "LlamaForSequenceClassification" if head else "LlamaForCausalLM"
    auto = "AutoModelForSequenceClassification" if head else "AutoModelForCausalLM"
    pipeline = "text-classification" if head else "text-generation"
    out = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}"]
    out += ["tags: [longtrain, llama]", "---", "", f"# {arch} trained with longtrain", ""]
    out += ["## Model", "", *_table(_model_rows(cfg, params, dtype, head, lora))]
    rec = record or {}
    if not rec:
        out += ["## Training", "", "No training run is recorded for these weights.", ""]
    else:
        job = rec.get("job") or {}
        data_dir = (job.get("data") or {}).get("dir")
        out += ["## Training", "", *_table(_training_rows(rec)), "## Data", ""]
        if rec.get("manifest"):
            out += _table(_data_rows(rec["manifest"], data_dir))
        else:
            out += [f"The data's manifest (`{data_dir}`) could not be read at export.", ""]
        out += ["## How it was made", ""]
        for i, c in enumerate(rec.get("commands") or []):
            what = "Started" if i == 0 else f"Resumed at step {c.get('start_step')}"
            cmd = shlex.join(c.get("command") or [])
            out += [f"{what} on {c.get('world_size')} process(es):", "", "```bash", cmd, "```", ""]
        if not rec.get("commands"):
            out += ["The command line was not recorded (the run predates commands.jsonl).", ""]
        out += ["The resolved job (the run's `config.yaml`):", "", "```yaml"]
        out += [yaml.safe_dump(job, sort_keys=False).rstrip(), "```", ""]
    out += ["## Use", "", "```python", f"from transformers import AutoTokenizer, {auto}", ""]
    out += [f'model = {auto}.from_pretrained("path/to/this/directory")']
    out += ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", ""]
    return "\n".join(out)
