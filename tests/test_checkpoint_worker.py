"""Worker processes for tests/test_checkpoint.py (holds no tests itself).

Run as ``python tests/test_checkpoint_worker.py SCENARIO OUT_DIR`` with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set; each scenario builds tiny DeepSpeed engines on the CPU (gloo,
fp32), trains on step-indexed data, and writes what the test compares into OUT_DIR as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

GLOBAL_BATCH = 4
DIM_IN, DIM_H = 13, 27  # odd sizes: ZeRO partitions need padding


def _dist() -> tuple[int, int]:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=90))
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _model(dropout: float):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(DIM_IN, DIM_H)
            self.drop = torch.nn.Dropout(dropout)
            self.out = torch.nn.Linear(DIM_H, DIM_IN)
            self.register_buffer("scale", torch.tensor([0.5, 2.0]))

        def forward(self, x):
            h = self.drop(torch.nn.functional.gelu(self.inp(x)))  # (B, H)
            return self.out(h) * self.scale[0]

    torch.manual_seed(0)
    return Tiny()


def _engine(stage: int, dropout: float = 0.0, grad_accum: int = 1):
    import deepspeed
    import torch.distributed as dist

    world = dist.get_world_size()
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world // grad_accum,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4},
        },
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    m = _model(dropout)
    eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    return eng


def _train(eng, start: int, stop: int) -> list[float]:
    """Steps start+1..stop; the batch depends on the step only, dropout on the global RNG."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(GLOBAL_BATCH, DIM_IN, generator=g)
        y = torch.sin(x)
        per = GLOBAL_BATCH // world
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        accum = eng.gradient_accumulation_steps()
        mb = per // accum
        total = torch.zeros(())
        for a in range(accum):
            loss = torch.nn.functional.mse_loss(
                eng(xs[a * mb : (a + 1) * mb]), ys[a * mb : (a + 1) * mb]
            )
            eng.backward(loss)
            eng.step()
            total += loss.detach() / accum
        dist.all_reduce(total)
        losses.append((total / world).item())
    return losses


def _save(eng, run_dir: Path, step: int, keep: int = 3, async_save: bool = False) -> str:
    from longtrain.train.checkpoint import save_checkpoint

    state = {"loader": {"consumed_samples": step * GLOBAL_BATCH}, "tokenizer_hash": "tok0"}
    return str(
        save_checkpoint(eng, run_dir, step, state, {"dim": DIM_H}, keep=keep, async_save=async_save)
    )


def _lr(eng) -> float:
    return float(eng.get_lr()[0])


def _full_params(eng, stage: int) -> dict:
    import deepspeed

    params = list(eng.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {k: v.detach().clone() for k, v in eng.module.state_dict().items()}


def scenario_main(out: Path) -> dict:
    """2 ranks: straight runs, sync/async saves, keep-last-k, consolidation references."""
    import torch
    import torch.distributed as dist

    from longtrain.train.checkpoint import wait_for_pending_save

    rank, world = _dist()
    res: dict = {}
    # Exact-resume reference: dropout on, ZeRO-2, saves at 3 and 6.
    eng = _engine(2, dropout=0.1)
    res["exact_losses"] = _train(eng, 0, 3)
    _save(eng, out / "exact", 3)
    res["exact_losses"] += _train(eng, 3, 6)
    _save(eng, out / "exact", 6)
    # keep-last-k with k=2: saves at 7, 8, 9 delete 3 and 6 and 7.
    for s in (7, 8, 9):
        res["exact_losses"] += _train(eng, s - 1, s)
        _save(eng, out / "keep", s, keep=2)
    # async == sync: the same state saved both ways; the async one while training goes on.
    _save(eng, out / "sync", 9)
    _save(eng, out / "async", 9, async_save=True)
    _train(eng, 9, 11)
    wait_for_pending_save()
    del eng
    # Resharding references: no dropout (DP=1 and DP=2 would draw different masks).
    eng = _engine(2)
    res["plain_losses"] = _train(eng, 0, 3)
    _save(eng, out / "plain2", 3)
    res["plain_losses"] += _train(eng, 3, 6)
    del eng
    # Consolidation: stages 0-3, reference full weights from the live engine.
    for stage in (0, 1, 2, 3):
        eng = _engine(stage)
        _train(eng, 0, 2)
        path = _save(eng, out / f"zero{stage}", 2)
        ref = _full_params(eng, stage)
        if rank == 0:
            torch.save(ref, Path(path).parent.parent / "ref.pt")
        del eng
    dist.barrier()
    res["world"] = world
    return res


def scenario_single(out: Path) -> dict:
    """1 rank: straight plain run (grad_accum 2 = same global batch), resharded 2 -> 1 resume."""
    from longtrain.train.checkpoint import load_checkpoint

    _dist()
    res: dict = {}
    eng = _engine(2, grad_accum=2)
    res["plain_losses"] = _train(eng, 0, 3)
    _save(eng, out / "plain1", 3)
    res["plain_losses"] += _train(eng, 3, 6)
    del eng
    eng = _engine(2, grad_accum=2)
    state = load_checkpoint(eng, out / "plain2" / "checkpoints" / "step_00000003")
    res["resharded_state"] = state
    res["resharded_lr"] = _lr(eng)
    res["resharded_losses"] = _train(eng, 3, 6)
    return res


def scenario_resume(out: Path) -> dict:
    """2 ranks: exact resume from step 3 (bitwise), resharded 1 -> 2 resume."""
    import shutil

    import torch.distributed as dist

    from longtrain.train.checkpoint import load_checkpoint
    from longtrain.train.files import find_latest

    rank, world = _dist()
    res: dict = {}
    eng = _engine(2, dropout=0.1)
    # A file only the other rank hashes is altered: every rank must refuse, naming it.
    bad = out / "corrupt" / "checkpoints" / "step_00000003"
    if rank == 0:
        shutil.copytree(out / "exact" / "checkpoints" / "step_00000003", bad)
        victim = sorted(json.loads((bad / "COMMIT").read_text())["files"])[1]
        data = bytearray((bad / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / victim).write_bytes(bytes(data))
    dist.barrier()
    try:
        load_checkpoint(eng, bad)
        err = None
    except Exception as e:  # reported, compared by the test
        err = f"{type(e).__name__}: {e}"
    errors: list = [None] * world
    dist.all_gather_object(errors, err)
    res["corrupt_errors"] = errors
    state = load_checkpoint(
        eng, out / "exact" / "checkpoints" / "step_00000003", model_config={"dim": DIM_H}
    )
    res["resume_state"] = state
    res["resume_losses"] = _train(eng, 3, 6)
    _save(eng, out / "resumed", 6)
    del eng
    eng = _engine(2)
    latest = find_latest(out / "plain1")
    state = load_checkpoint(eng, latest)
    res["resharded_losses"] = _train(eng, 3, 6)
    return res


def scenario_preempt(out: Path) -> dict:
    """2 ranks: rank 1 signals itself in step 3; both ranks must stop before step 4."""
    import signal

    import torch.distributed as dist

    from longtrain.train.preempt import PreemptionHandler

    rank, world = dist.get_rank(), dist.get_world_size()
    handler = PreemptionHandler(deadline_s=60).install()
    stopped_at = None
    for step in range(1, 10):
        if handler.should_stop():
            stopped_at = step - 1
            break
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1 if world == 2 else signal.SIGTERM)
    handler.finish()
    handler.uninstall()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, stopped_at)
    return {"stopped_at": gathered}


def fault_tail(out: Path) -> None:
    """With LONGTRAIN_CKPT_FAULT set (for step 4): a good save at 2, then the faulty save at 4."""
    eng = _engine(2)
    _train(eng, 0, 2)
    _save(eng, out / "fault", 2)
    _train(eng, 2, 4)
    _save(eng, out / "fault", 4)


SCENARIOS = {
    "main": scenario_main,
    "single": scenario_single,
    "resume": scenario_resume,
}

if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    name, out_dir = sys.argv[1], Path(sys.argv[2])
    result = SCENARIOS[name](out_dir)
    if name != "single":
        result.update(scenario_preempt(out_dir))
    if int(os.environ["RANK"]) == 0:
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    if os.environ.get("LONGTRAIN_CKPT_FAULT"):
        fault_tail(out_dir)
