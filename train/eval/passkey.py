"""Passkey retrieval: a random number hidden at controlled depths of filler text, at several
context lengths (``longtrain eval --task passkey``, and the in-training long eval).

A sample counts as correct when the greedy prediction of every one of the key's tokens is
right (teacher-forced, so only the key's tokens are scored). Under sequence parallelism every
rank of an SP group runs its slice of the prompt and each key token is scored by the rank that
holds the position predicting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from longtrain.data.loader import sp_shard_indices
from longtrain.data.passkey import PasskeySample, answer_correct
from longtrain.train.eval.ppl import collective_device, gathered_head, pyplot

if TYPE_CHECKING:
    from longtrain.train.parallel import Topology


@torch.no_grad()
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

    Under sequence parallelism (``topo.sp > 1``) every rank of the SP group runs its shard of
    the prompt (``sp_shard_indices``: a slice, or zigzag chunks under ring attention); the
    prompt is padded at the end to a multiple of ``sp`` (``2 * sp`` with a ring) with a
    separate document of pad tokens (causal: nothing before it sees it), and each key token is
    scored by the rank that holds the position predicting it.
    """
    a, n = sample.answer_start, len(sample.answer_ids)
    target = torch.tensor(sample.answer_ids, device=device)  # (n,)
    if topo is None or topo.sp == 1:
        ids = torch.tensor([sample.input_ids], device=device)  # (1, L)
        h = model.hidden(ids)  # (1, L, dim): one causal document
        with gathered_head(model) as w:
            logits = (h[0, a - 1 : a - 1 + n] @ w.t()).float()  # (n, V): j predicts j+1
        nll = F.cross_entropy(logits, target, reduction="none")  # (n,)
        return logits.argmax(-1).tolist(), nll.tolist()
    L, P, R = sample.length, topo.sp, topo.ring
    step = P if R == 1 else 2 * P  # the zigzag chunks of a ring split evenly
    Lp = -(-L // step) * step
    ids = torch.tensor(sample.input_ids + [0] * (Lp - L), device=device)  # (Lp,)
    pos = torch.cat([torch.arange(L), torch.arange(Lp - L)]).to(device)  # (Lp,)
    cu = torch.tensor([0, L] + ([Lp] if Lp > L else []), dtype=torch.int32, device=device)
    shard = torch.from_numpy(sp_shard_indices(Lp, topo.sp_rank, P, R)).to(device)  # (Lp/sp,)
    # max_seqlen=L on every rank: the same RoPE lengths (dynamic NTK) as the one-device run.
    h = model.hidden(ids[None, shard], pos[None, shard], cu, L)  # (1, Lp/sp, dim)
    want = torch.arange(a - 1, a - 1 + n, device=device)  # global positions predicting the key
    local = torch.full((Lp,), -1, dtype=torch.long, device=device)
    local[shard] = torch.arange(len(shard), device=device)  # window position -> local row
    mine = local[want] >= 0  # (n,)
    # Row 0: predicted ids, row 1: NLL; float64 holds token ids exactly.
    out = torch.zeros(2, n, dtype=torch.float64, device=device)
    with gathered_head(model) as w:
        if mine.any():
            logits = (h[0, local[want[mine]]] @ w.t()).float()  # (n_mine, V)
            out[0, mine] = logits.argmax(-1).double()
            out[1, mine] = F.cross_entropy(logits, target[mine], reduction="none").double()
    out = out.to(collective_device())
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
        all3 = torch.stack([hit, tok, nll]).to(collective_device())  # (3, n)
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


def plot_passkey(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Heatmap of accuracy: context length (rows) x needle depth (columns)."""
    plt = pyplot()
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
