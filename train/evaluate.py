"""``longtrain eval``: long-context evaluation of a checkpoint or a Hugging Face directory.

Tasks:

- ``ppl``: validation loss by position bucket (0-1K, 1K-2K, ... up to the context length).
  The position of a token is its ``position_id``: its distance from the start of what it
  attends to (the document start under ``data.attention=document``, the window start under
  ``causal``), so the curve shows whether later tokens gain from a longer context. Writes
  ``ppl_by_position.json`` and ``ppl_by_position.png``.
- ``passkey``: retrieval of a random number hidden at controlled depths in filler text
  (``longtrain.data.passkey``), at several context lengths; a sample counts as correct when the
  greedy prediction of every one of the key's tokens is right (teacher-forced, so only the
  key's tokens are scored). Writes ``passkey.json`` and the heatmap ``passkey.png`` (context
  length x depth).

Single process for now (``--sp 1``); the model runs on the GPU in bf16 when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from longtrain.data.passkey import PasskeySample, answer_correct, passkey_grid
from longtrain.model.errors import LongtrainError

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Position buckets


class PositionBuckets:
    """Sums token losses into buckets of ``size`` positions: [0, size), [size, 2*size), ..."""

    def __init__(self, size: int, max_len: int) -> None:
        if size < 1:
            raise LongtrainError(f"--bucket {size}: must be >= 1")
        self.size = size
        self.n = max(1, -(-max_len // size))
        self.sums = torch.zeros(self.n, dtype=torch.float64)
        self.counts = torch.zeros(self.n, dtype=torch.int64)

    def add(self, losses: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Add per-token ``losses`` at ``positions`` where ``valid`` (all the same shape)."""
        idx = (positions[valid] // self.size).clamp(max=self.n - 1).long().cpu()
        self.sums.index_add_(0, idx, losses[valid].double().cpu())
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def result(self) -> list[dict[str, Any]]:
        """One row per bucket: start, end, tokens, mean loss and perplexity (None if empty)."""
        rows = []
        for i in range(self.n):
            c = int(self.counts[i])
            loss = float(self.sums[i] / c) if c else None
            rows.append(
                {
                    "start": i * self.size,
                    "end": (i + 1) * self.size,
                    "tokens": c,
                    "loss": loss,
                    "ppl": math.exp(min(loss, 50.0)) if loss is not None else None,
                }
            )
        return rows


@torch.no_grad()
def token_losses(
    model: Any, batch: dict[str, Any], device: torch.device, chunk: int = 1024
) -> torch.Tensor:
    """(B, T) fp32 cross-entropy of every token (0 where the label is -100), chunked over the head."""
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    cu = batch.get("cu_seqlens")
    h = model.hidden(
        ids,
        batch["position_ids"].to(device),
        cu.to(device) if cu is not None else None,
        batch.get("max_seqlen"),
    )  # (B, T, dim)
    B, T, D = h.shape
    flat = h.reshape(B * T, D)  # (B*T, dim)
    lab = labels.reshape(B * T)  # (B*T,)
    out = torch.zeros(B * T, dtype=torch.float32, device=device)
    w = model.head_weight
    for s in range(0, B * T, chunk):
        logits = (flat[s : s + chunk] @ w.t()).float()  # (C, V)
        out[s : s + chunk] = F.cross_entropy(
            logits, lab[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="none"
        )
    return out.view(B, T)  # (B, T)


def eval_ppl(
    model: Any,
    batches: Iterable[dict[str, Any]],
    seq_len: int,
    bucket: int,
    device: torch.device,
) -> dict[str, Any]:
    """Loss by position bucket over ``batches`` (dicts as yielded by the data loader)."""
    buckets = PositionBuckets(bucket, seq_len)
    total, count, windows = 0.0, 0, 0
    for batch in tqdm(batches, desc="eval ppl", unit="window", leave=False):
        losses = token_losses(model, batch, device).cpu()
        valid = batch["labels"] != IGNORE_INDEX
        buckets.add(losses, batch["position_ids"], valid)
        total += float(losses[valid].double().sum())
        count += int(valid.sum())
        windows += int((batch.get("sample_ids", torch.zeros(1)) >= 0).sum())
    if count == 0:
        raise LongtrainError("eval ppl: no scored tokens (empty validation split?)")
    loss = total / count
    return {
        "task": "ppl",
        "seq_len": seq_len,
        "bucket": bucket,
        "windows": windows,
        "tokens": count,
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "buckets": buckets.result(),
    }


# ---------------------------------------------------------------------------------------------
# Passkey


@torch.no_grad()
def predict_answer(model: Any, sample: PasskeySample, device: torch.device) -> list[int]:
    """Greedy predictions for the key's positions, each from the tokens before it."""
    ids = torch.tensor([sample.input_ids], device=device)  # (1, L)
    h = model.hidden(ids)  # (1, L, dim): one causal document
    a, n = sample.answer_start, len(sample.answer_ids)
    logits = h[0, a - 1 : a - 1 + n] @ model.head_weight.t()  # (n, V): position j predicts j+1
    return logits.argmax(-1).tolist()


def eval_passkey(
    model: Any,
    samples: Sequence[PasskeySample],
    lengths: Sequence[int],
    depths: Sequence[float],
    device: torch.device,
) -> dict[str, Any]:
    """Accuracy per (length, depth) cell; ``samples`` as built by :func:`passkey_grid`."""
    hits: dict[tuple[int, float], list[bool]] = {(n, d): [] for n in lengths for d in depths}
    tok_hits: dict[tuple[int, float], list[float]] = {k: [] for k in hits}
    for s in tqdm(samples, desc="eval passkey", unit="sample", leave=False):
        pred = predict_answer(model, s, device)
        hits[(s.length, s.depth)].append(answer_correct(pred, s))
        right = sum(p == a for p, a in zip(pred, s.answer_ids))
        tok_hits[(s.length, s.depth)].append(right / len(s.answer_ids))

    def grid(d: dict[tuple[int, float], list[Any]]) -> list[list[float]]:
        return [[sum(d[(n, x)]) / max(1, len(d[(n, x)])) for x in depths] for n in lengths]

    acc = grid(hits)
    return {
        "task": "passkey",
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": len(samples) // max(1, len(lengths) * len(depths)),
        "accuracy": acc,
        # Partial credit: the fraction of the key's tokens predicted right (a diagnostic).
        "token_accuracy": grid(tok_hits),
        "overall": sum(map(sum, hits.values())) / max(1, len(samples)),
    }


# ---------------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Loss per position bucket (empty buckets left out)."""
    plt = _plt()
    rows = [r for r in result["buckets"] if r["loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["loss"] for r in rows], marker="o")
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or f"loss by position, seq_len {result['seq_len']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Heatmap of accuracy: context length (rows) x needle depth (columns)."""
    plt = _plt()
    acc = result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(acc) + 2))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(acc)), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or f"passkey retrieval ({result['trials']} trials per cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


class _HFEncoder:
    """``encode(text)`` over a transformers tokenizer, without special tokens."""

    def __init__(self, directory: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(directory)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def _load_training_checkpoint(path: Path) -> tuple[Any, dict[str, Any], Path]:
    """A trainer checkpoint (DeepSpeed shards, any ZeRO stage) consolidated on the CPU."""
    from longtrain.model.config import ModelConfig
    from longtrain.model.transformer import Transformer
    from longtrain.train import checkpoint as ckpt
    from longtrain.train.parallel import setup_accelerator_env

    setup_accelerator_env()  # before shard consolidation imports deepspeed
    path = ckpt.resolve_checkpoint(path)
    cfg_file = path / "model_config.json"
    if not cfg_file.is_file():
        raise LongtrainError(f"{path}: no model_config.json; not a longtrain checkpoint")
    cfg = ModelConfig.from_dict(json.loads(cfg_file.read_text()))
    sd = ckpt.consolidate_state_dict(path)
    # Build on meta and adopt the consolidated tensors: the model never exists twice.
    with torch.device("meta"):
        model = Transformer(cfg, attention="auto")
    _, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise LongtrainError(
            f"{path}: weights do not match model_config.json (missing {still_meta[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.rope.to_empty(device="cpu")
    model.rope.reset_parameters()
    data = ckpt.read_client_state(path).get("config", {}).get("data", {}) or {}
    return model, data, path


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """The model, what the run says about its data, and the default output directory."""
    from longtrain.model.hf import load_hf, load_model_dir

    if args.hf:
        if not Path(args.hf).is_dir():
            raise LongtrainError(f"--hf {args.hf}: not a directory")
        return load_hf(args.hf, attention="auto"), {}, Path("runs") / "eval" / Path(args.hf).name
    src = Path(args.checkpoint)
    if (src / "model.safetensors").is_file() and (src / "model_config.json").is_file():
        return load_model_dir(src, attention="auto"), {}, src / "eval"  # model-only directory
    model, data, path = _load_training_checkpoint(src)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    return model, data, run_dir / "eval" / path.name


def _parse_list(text: str, kind: type, option: str) -> list[Any]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LongtrainError(f"{option} {text}: expected comma-separated numbers") from None
    if not values:
        raise LongtrainError(f"{option}: empty list")
    return values


def cli_eval(args: argparse.Namespace) -> int:
    """``longtrain eval --checkpoint PATH | --hf DIR --task ppl|passkey``."""
    if args.sp != 1:
        raise LongtrainError(
            f"--sp {args.sp}: sequence-parallel evaluation is not implemented yet; use --sp 1 "
            "(contexts must fit one device)"
        )
    if args.samples < 1:
        raise LongtrainError(f"--samples {args.samples}: must be >= 1")
    model, data_info, default_out = _load(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    name = args.checkpoint or args.hf
    torch.manual_seed(args.seed)

    if args.task == "ppl":
        from longtrain.data.loader import validation_batches

        data = args.data or data_info.get("dir")
        if not data:
            raise LongtrainError("eval ppl: pass --data DIR (a directory from `longtrain prepare`)")
        seq_len = args.seq_len or int(data_info.get("seq_len") or model.cfg.max_seq_len)
        batches = validation_batches(
            data, seq_len, 1, max_batches=args.samples,
            attention=data_info.get("attention", "document"),
        )  # fmt: skip
        res = eval_ppl(model, batches, seq_len, args.bucket, device)
        res.update({"model": str(name), "data": str(data)})
        json_path, png = out / "ppl_by_position.json", out / "ppl_by_position.png"
        json_path.write_text(json.dumps(res, indent=2))
        plot_ppl(res, png, f"{Path(str(name)).name}: loss by position (seq_len {seq_len})")
        for r in res["buckets"]:
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            print(f"  positions {r['start']:>7}-{r['end']:<7} tokens {r['tokens']:>9}  loss {loss}")
        print(f"eval ppl: loss {res['loss']:.4f} (ppl {res['ppl']:.2f}) -> {json_path}, {png}")
        return 0

    # passkey
    tok_dir = args.tokenizer or (
        str(Path(data_info["dir"]) / "tokenizer") if data_info.get("dir") else None
    )
    if tok_dir is None and args.hf:
        encoder: Any = _HFEncoder(args.hf)
    elif tok_dir is None:
        raise LongtrainError(
            "eval passkey: pass --tokenizer DIR (written by `longtrain tokenizer`)"
        )
    else:
        from longtrain.data.tokenizer import Tokenizer

        if not Path(tok_dir).is_dir():
            raise LongtrainError(f"--tokenizer {tok_dir}: not a directory")
        encoder = Tokenizer.load(tok_dir)
    top = model.cfg.max_seq_len
    lengths = (
        _parse_list(args.lengths, int, "--lengths")
        if args.lengths
        else sorted({max(256, top // 8), max(256, top // 4), max(256, top // 2), top})
    )
    depths = _parse_list(args.depths, float, "--depths")
    samples = passkey_grid(encoder, lengths, depths, args.samples, args.seed)
    res = eval_passkey(model, samples, lengths, depths, device)
    res.update({"model": str(name), "seed": args.seed})
    json_path, png = out / "passkey.json", out / "passkey.png"
    json_path.write_text(json.dumps(res, indent=2))
    plot_passkey(res, png, f"{Path(str(name)).name}: passkey ({res['trials']} per cell)")
    print(f"  {'length':>8} " + " ".join(f"{d:>6g}" for d in depths))
    for n, row in zip(lengths, res["accuracy"]):
        print(f"  {n:>8} " + " ".join(f"{a:>6.2f}" for a in row))
    print(f"eval passkey: accuracy {res['overall']:.3f} -> {json_path}, {png}")
    return 0


__all__ = [
    "PositionBuckets",
    "cli_eval",
    "eval_passkey",
    "eval_ppl",
    "plot_passkey",
    "plot_ppl",
    "predict_answer",
    "token_losses",
]
