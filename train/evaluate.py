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

Distributed: ``torchrun --nproc_per_node N -m longtrain.launch eval ... --sp P`` splits every
window (and every passkey prompt) over ``P`` sequence-parallel ranks with the same Ulysses
wrapping as training (``train/parallel.py``), for contexts whose activations do not fit one
device; the ``N / P`` data-parallel groups share the windows / samples. Every rank holds the
whole model (evaluation keeps no optimizer state; SP splits the activations, which is what
grows with the context). Per-bucket sums and counts are summed over all ranks, so the result
is the single-device one up to float rounding; only rank 0 writes and prints. The model runs
on the GPU in bf16 when there is one.

In the training loop, :func:`long_eval` runs the same per-bucket loss (and optionally passkey
accuracy) on the engine's model every ``log.long_eval_interval`` steps; the trainer logs its
``long_eval/*`` scalars to metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from longtrain.data.passkey import PasskeySample, answer_correct, passkey_grid
from longtrain.model.errors import LongtrainError

if TYPE_CHECKING:
    from longtrain.train.parallel import Topology

IGNORE_INDEX = -100
# Passkey cells of the in-training eval: few, so a long-context eval stays a small share of a step
# budget (the full grid is `longtrain eval --task passkey`).
TRAIN_PASSKEY_DEPTHS = (0.0, 0.5, 1.0)
TRAIN_PASSKEY_TRIALS = 2


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

    def all_reduce(self, group: Any = None) -> None:
        """Sum the buckets over a process group (every rank scored different tokens)."""
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # gloo and NCCL both reduce float64/int64 exactly for these sizes; on NCCL the
            # tensors must live on the GPU.
            dev = _collective_device()
            sums, counts = self.sums.to(dev), self.counts.to(dev)
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
            self.sums, self.counts = sums.cpu(), counts.cpu()

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


def bucket_label(start: int, end: int) -> str:
    """``0-1K``, ``1K-2K``, ``32K-64K``; sizes that are not whole K stay plain: ``0-96``."""

    def fmt(n: int) -> str:
        return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)

    return f"{fmt(start)}-{fmt(end)}"


def _collective_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _gathered_head(model: Any) -> Iterator[torch.Tensor]:
    """The LM head weight, whole. Under ZeRO-3 it is partitioned and, unlike the blocks, used
    outside any submodule's forward here, so it is gathered explicitly (collective: every rank
    of the partition group enters this the same number of times)."""
    w = model.head_weight
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w]):
            yield w
    else:
        yield w


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
    with _gathered_head(model) as w:
        for s in range(0, B * T, chunk):
            logits = (flat[s : s + chunk] @ w.t()).float()  # (C, V)
            out[s : s + chunk] = F.cross_entropy(
                logits, lab[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="none"
            )
    return out.view(B, T)  # (B, T), local T (T/sp) under sequence parallelism


def eval_ppl(
    model: Any,
    batches: Iterable[dict[str, Any]],
    seq_len: int,
    bucket: int,
    device: torch.device,
    topo: Topology | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss by position bucket over ``batches`` (dicts as yielded by the data loader).

    With ``topo`` the batches are this rank's DP x SP slice (``validation_batches`` with the
    topology's ranks) and the sums and counts are added up over all ranks: each token is
    scored on exactly one rank, so the result is the single-device one.
    """
    buckets = PositionBuckets(bucket, seq_len)
    windows = 0
    for batch in tqdm(batches, desc="eval ppl", unit="window", leave=False, disable=not progress):
        losses = token_losses(model, batch, device).cpu()  # (B, T/sp)
        valid = batch["labels"] != IGNORE_INDEX
        buckets.add(losses, batch["position_ids"], valid)
        windows += int((batch.get("sample_ids", torch.zeros(1)) >= 0).sum())
    if topo is not None and topo.world_size > 1:
        buckets.all_reduce(topo.world_group)
        # Every SP rank of a group saw the same windows: count them once per DP group.
        (windows,) = _sum_ints([windows if topo.sp_rank == 0 else 0], topo.world_group)
    total, count = float(buckets.sums.sum()), int(buckets.counts.sum())
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


def _sum_ints(values: list[int], group: Any) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return [int(x) for x in t.tolist()]


@torch.no_grad()
def predict_answer(
    model: Any, sample: PasskeySample, device: torch.device, topo: Topology | None = None
) -> list[int]:
    """Greedy predictions for the key's positions, each from the tokens before it."""
    return answer_scores(model, sample, device, topo)[0]


@torch.no_grad()
def answer_scores(
    model: Any, sample: PasskeySample, device: torch.device, topo: Topology | None = None
) -> tuple[list[int], list[float]]:
    """(greedy prediction, negative log-likelihood) of each of the key's tokens, teacher-forced.

    Under sequence parallelism (``topo.sp > 1``) every rank of the SP group runs its slice of
    the prompt; the prompt is padded at the end to a multiple of ``sp`` with a separate
    document of pad tokens (causal: nothing before it sees it), and each key token is scored
    by the rank that holds the position predicting it.
    """
    a, n = sample.answer_start, len(sample.answer_ids)
    target = torch.tensor(sample.answer_ids, device=device)  # (n,)
    if topo is None or topo.sp == 1:
        ids = torch.tensor([sample.input_ids], device=device)  # (1, L)
        h = model.hidden(ids)  # (1, L, dim): one causal document
        with _gathered_head(model) as w:
            logits = (h[0, a - 1 : a - 1 + n] @ w.t()).float()  # (n, V): j predicts j+1
        nll = F.cross_entropy(logits, target, reduction="none")  # (n,)
        return logits.argmax(-1).tolist(), nll.tolist()
    L, P = sample.length, topo.sp
    Lp = -(-L // P) * P
    ids = torch.tensor(sample.input_ids + [0] * (Lp - L), device=device)  # (Lp,)
    pos = torch.cat([torch.arange(L), torch.arange(Lp - L)]).to(device)  # (Lp,)
    cu = torch.tensor([0, L] + ([Lp] if Lp > L else []), dtype=torch.int32, device=device)
    lo, hi = topo.sp_rank * Lp // P, (topo.sp_rank + 1) * Lp // P
    # max_seqlen=L on every rank: the same RoPE lengths (dynamic NTK) as the one-device run.
    h = model.hidden(ids[None, lo:hi], pos[None, lo:hi], cu, L)  # (1, Lp/sp, dim)
    want = torch.arange(a - 1, a - 1 + n, device=device)  # global positions predicting the key
    mine = (want >= lo) & (want < hi)  # (n,)
    # Row 0: predicted ids, row 1: NLL; float64 holds token ids exactly.
    out = torch.zeros(2, n, dtype=torch.float64, device=device)
    with _gathered_head(model) as w:
        if mine.any():
            logits = (h[0, want[mine] - lo] @ w.t()).float()  # (n_mine, V)
            out[0, mine] = logits.argmax(-1).double()
            out[1, mine] = F.cross_entropy(logits, target[mine], reduction="none").double()
    out = out.to(_collective_device())
    dist.all_reduce(out, group=topo.sp_group)  # each position is scored on exactly one rank
    return [int(x) for x in out[0].tolist()], out[1].tolist()


def eval_passkey(
    model: Any,
    samples: Sequence[PasskeySample],
    lengths: Sequence[int],
    depths: Sequence[float],
    device: torch.device,
    topo: Topology | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy per (length, depth) cell; ``samples`` as built by :func:`passkey_grid`.

    With ``topo`` the DP groups take samples ``dp_rank::dp`` (padded so every rank runs the
    same number of forwards: SP and ZeRO-3 collectives stay in step) and the per-sample
    results are summed over all ranks.
    """
    dp, dp_rank = (topo.dp, topo.dp_rank) if topo is not None else (1, 0)
    n_pad = -(-len(samples) // dp) * dp
    hit = torch.zeros(len(samples), dtype=torch.float64)
    tok = torch.zeros(len(samples), dtype=torch.float64)
    nll = torch.zeros(len(samples), dtype=torch.float64)
    mine = range(dp_rank, n_pad, dp)
    for i in tqdm(mine, desc="eval passkey", unit="sample", leave=False, disable=not progress):
        s = samples[min(i, len(samples) - 1)]  # padding repeats the last sample, unscored
        pred, key_nll = answer_scores(model, s, device, topo)
        if i < len(samples) and (topo is None or topo.sp_rank == 0):
            hit[i] = float(answer_correct(pred, s))
            tok[i] = sum(p == a for p, a in zip(pred, s.answer_ids)) / len(s.answer_ids)
            nll[i] = sum(key_nll) / len(key_nll)
    if topo is not None and topo.world_size > 1:
        all3 = torch.stack([hit, tok, nll]).to(_collective_device())  # (3, n)
        dist.all_reduce(all3, group=topo.world_group)
        hit, tok, nll = all3.cpu()
    hits: dict[tuple[int, float], list[float]] = {(n, d): [] for n in lengths for d in depths}
    tok_hits: dict[tuple[int, float], list[float]] = {k: [] for k in hits}
    nlls: dict[tuple[int, float], list[float]] = {k: [] for k in hits}
    for i, s in enumerate(samples):
        hits[(s.length, s.depth)].append(float(hit[i]))
        tok_hits[(s.length, s.depth)].append(float(tok[i]))
        nlls[(s.length, s.depth)].append(float(nll[i]))

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
        # Mean NLL of the key's tokens: moves before accuracy does while a model learns.
        "key_nll": grid(nlls),
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
    """``longtrain eval --checkpoint PATH | --hf DIR --task ppl|passkey [--sp P]``.

    One process, or every rank of ``torchrun --nproc_per_node N -m longtrain.launch eval``:
    the world is laid out as ``N / P`` data-parallel x ``P`` sequence-parallel ranks.
    """
    from longtrain.train.parallel import env_world

    if args.samples < 1:
        raise LongtrainError(f"--samples {args.samples}: must be >= 1")
    if args.sp < 1:
        raise LongtrainError(f"--sp {args.sp}: must be >= 1")
    rank, world, _ = env_world()
    if world % args.sp != 0:
        hint = f"; launch with torchrun --nproc_per_node {args.sp} -m longtrain.launch eval ..."
        raise LongtrainError(
            f"--sp {args.sp} does not divide the number of processes ({world})"
            + (hint if world == 1 else "")
        )
    if args.seq_len is not None and args.seq_len % args.sp != 0:
        raise LongtrainError(f"--seq-len {args.seq_len}: must be divisible by --sp {args.sp}")
    if world == 1:
        return _run_eval(args, None)

    from longtrain.train.parallel import build_topology, init_distributed

    owns_group = not dist.is_initialized()
    try:
        init_distributed(args.timeout)
        return _run_eval(args, build_topology(args.sp))
    except LongtrainError:
        if rank != 0:
            sys.exit(2)  # the job's one line is printed by rank 0 only
        raise
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_eval(args: argparse.Namespace, topo: Topology | None) -> int:
    """The eval itself, on one rank (``topo`` None: a single process)."""
    from longtrain.train.parallel import apply_ulysses

    main = topo is None or topo.rank == 0
    model, data_info, default_out = _load(args)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    if topo is not None:
        apply_ulysses(model, topo, model.cfg.n_kv_heads)
    out = Path(args.out) if args.out else default_out
    if main:
        out.mkdir(parents=True, exist_ok=True)
    name = args.checkpoint or args.hf
    torch.manual_seed(args.seed)
    dp, dp_rank = (topo.dp, topo.dp_rank) if topo else (1, 0)
    sp, sp_rank = (topo.sp, topo.sp_rank) if topo else (1, 0)
    ranks = f" on {topo.world_size} ranks (DP {dp} x SP {sp})" if topo else ""

    if args.task == "ppl":
        from longtrain.data.loader import validation_batches

        data = args.data or data_info.get("dir")
        if not data:
            raise LongtrainError("eval ppl: pass --data DIR (a directory from `longtrain prepare`)")
        seq_len = args.seq_len or int(data_info.get("seq_len") or model.cfg.max_seq_len)
        if seq_len % sp != 0:
            raise LongtrainError(f"eval ppl: seq_len {seq_len} is not divisible by --sp {sp}; "
                                 "pass --seq-len")  # fmt: skip
        batches = validation_batches(
            data, seq_len, 1, dp_rank=dp_rank, dp_size=dp, sp_rank=sp_rank, sp_size=sp,
            max_batches=-(-args.samples // dp), attention=data_info.get("attention", "document"),
        )  # fmt: skip
        res = eval_ppl(model, batches, seq_len, args.bucket, device, topo, progress=main)
        res.update({"model": str(name), "data": str(data), "dp": dp, "sp": sp})
        if not main:
            return 0
        json_path, png = out / "ppl_by_position.json", out / "ppl_by_position.png"
        json_path.write_text(json.dumps(res, indent=2))
        plot_ppl(res, png, f"{Path(str(name)).name}: loss by position (seq_len {seq_len})")
        for r in res["buckets"]:
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            print(f"  positions {r['start']:>7}-{r['end']:<7} tokens {r['tokens']:>9}  loss {loss}")
        print(
            f"eval ppl{ranks}: loss {res['loss']:.4f} (ppl {res['ppl']:.2f}) -> {json_path}, {png}"
        )
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
    res = eval_passkey(model, samples, lengths, depths, device, topo, progress=main)
    res.update({"model": str(name), "seed": args.seed, "dp": dp, "sp": sp})
    if not main:
        return 0
    json_path, png = out / "passkey.json", out / "passkey.png"
    json_path.write_text(json.dumps(res, indent=2))
    plot_passkey(res, png, f"{Path(str(name)).name}: passkey ({res['trials']} per cell)")
    print(f"  {'length':>8} " + " ".join(f"{d:>6g}" for d in depths))
    for n, row in zip(lengths, res["accuracy"]):
        print(f"  {n:>8} " + " ".join(f"{a:>6.2f}" for a in row))
    print(f"eval passkey{ranks}: accuracy {res['overall']:.3f} -> {json_path}, {png}")
    return 0


# ---------------------------------------------------------------------------------------------
# In the training loop


def long_eval(engine: Any, job: Any, topo: Topology, device: torch.device) -> dict[str, float]:
    """Long-context metrics of the model being trained, the same on every rank.

    Validation loss per position bucket of ``log.long_eval_bucket`` positions over the
    ``data.val_batches`` first validation steps (``long_eval/loss_0-1K``, ...,
    ``long_eval/loss`` overall) and, for each length of ``log.long_eval_passkey``, passkey
    accuracy over a few depths (``long_eval/passkey_8192``). Runs on the engine's sharded,
    Ulysses-wrapped model; every rank must call it (it is collective).
    """
    from longtrain.train.trainer import job_validation_batches

    model = engine.module
    engine.eval()
    try:
        batches = job_validation_batches(job, topo)
        bucket = job.log.long_eval_bucket
        res = eval_ppl(model, batches, job.data.seq_len, bucket, device, topo, progress=False)
        row = {
            f"long_eval/loss_{bucket_label(r['start'], min(r['end'], job.data.seq_len))}": r["loss"]
            for r in res["buckets"]
            if r["loss"] is not None
        }
        row["long_eval/loss"] = res["loss"]
        lengths = list(job.log.long_eval_passkey or [])
        if lengths:
            samples = check_long_eval(job)
            pk = eval_passkey(
                model, samples, lengths, TRAIN_PASSKEY_DEPTHS, device, topo, progress=False
            )
            for n, accs in zip(lengths, pk["accuracy"]):
                row[f"long_eval/passkey_{n}"] = sum(accs) / len(accs)
    finally:
        engine.train()
    return row


_PASSKEY_CACHE: dict[tuple[Any, ...], list[PasskeySample]] = {}


def check_long_eval(job: Any) -> list[PasskeySample]:
    """The in-training passkey samples (built once); raises now if a length cannot hold one.

    The trainer calls this before its first step so that a bad ``log.long_eval_passkey`` fails
    the job at once, not at the first long-context eval hours later.
    """
    from longtrain.data.tokenizer import Tokenizer

    lengths = list(job.log.long_eval_passkey or [])
    if not lengths:
        return []
    tok_dir = job.data.tokenizer or str(Path(job.data.dir) / "tokenizer")
    key = (tok_dir, tuple(lengths), job.seed)
    if key not in _PASSKEY_CACHE:
        if not Path(tok_dir).is_dir():
            raise LongtrainError(
                f"log.long_eval_passkey: no tokenizer at {tok_dir}; set data.tokenizer"
            )
        try:
            _PASSKEY_CACHE[key] = passkey_grid(
                Tokenizer.load(tok_dir),
                lengths,
                TRAIN_PASSKEY_DEPTHS,
                TRAIN_PASSKEY_TRIALS,
                job.seed,
            )
        except LongtrainError as e:
            msg = str(e).removeprefix("--lengths: ")
            raise LongtrainError(f"log.long_eval_passkey={lengths}: {msg}") from None
    return _PASSKEY_CACHE[key]


__all__ = [
    "PositionBuckets",
    "answer_scores",
    "bucket_label",
    "check_long_eval",
    "cli_eval",
    "eval_passkey",
    "eval_ppl",
    "long_eval",
    "plot_passkey",
    "plot_ppl",
    "predict_answer",
    "token_losses",
]
