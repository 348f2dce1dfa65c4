"""Classification metrics of a task head: validation loss, accuracy and macro-F1.

Every validation row is scored exactly once across the DP x SP ranks (the rank that holds a
row's last token), so the confusion matrix summed over all ranks is the single-device one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longtrain.data.classify import classify_val_batches
from longtrain.train.parallel import all_reduce_sum


@torch.no_grad()
def evaluate_classify(
    engine: Any, data: Any, num_labels: int, micro_batch: int, topo: Any, device: torch.device
) -> dict[str, float]:
    """Validation loss, accuracy and macro-F1 over every validation row (all ranks agree)."""
    engine.eval()
    C = num_labels
    conf = torch.zeros(C, C, dtype=torch.float64, device=device)  # [true, predicted]
    loss_sum = 0.0
    for batch in classify_val_batches(
        data, micro_batch, topo.dp_rank, topo.dp, topo.sp_rank, topo.sp, topo.ring
    ):
        labels = batch["labels"].to(device)
        logits = engine(
            input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)
        )
        sel = labels != -100  # (B, T/sp): last tokens held by this rank
        lg, y = logits[sel].float(), labels[sel]  # (n, C), (n,)
        loss_sum += (
            float(torch.nn.functional.cross_entropy(lg, y, reduction="sum")) if len(y) else 0.0
        )
        conf.index_put_(
            (y, lg.argmax(-1)),
            torch.ones(len(y), dtype=torch.float64, device=device),
            accumulate=True,
        )
    engine.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(conf, group=topo.world_group)
    (loss_sum,) = all_reduce_sum([loss_sum], device, topo.world_group)
    n = float(conf.sum())
    tp = conf.diag()
    prec = tp / conf.sum(0).clamp(min=1)
    rec = tp / conf.sum(1).clamp(min=1)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(tp))
    return {
        "val_loss": loss_sum / max(n, 1.0),
        "val_acc": float(tp.sum()) / max(n, 1.0),
        "val_f1": float(f1.mean()),
    }
