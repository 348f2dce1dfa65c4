"""Worker processes for tests/test_checkpoint.py (holds no tests itself).

Run as ``python tests/test_checkpoint_worker.py SCENARIO OUT_DIR`` with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set. Each scenario trains tiny DeepSpeed engines on the CPU (gloo,
fp32) along the trainer's paths: the engine from a job's ``deepspeed_config`` (the engine's own
optimizer rule: torch's AdamW on CPU, nothing JIT-built) and ``initialize_engine``; batches
from the trainer's loader (``LMTask.loader`` over ``OUT_DIR/data``, which the test writes);
steps through ``train_step``; saves and resumes through the ``CheckpointManager`` with the
loader and the progress as Stateful parts, the RNG restored right before the first resumed
step. What the test compares is written into OUT_DIR as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GLOBAL_BATCH = 4  # windows per optimizer step, whatever the DP size
SEQ = 16  # window length; the loader's position is counted in tokens (cursor = windows * SEQ)
VOCAB = 40
DIM_IN, DIM_H = 13, 27  # odd sizes: ZeRO partitions need padding
TOKENIZER_HASH = "tok0"  # the data directory's manifest says so too


def data_dir(out: Path) -> Path:
    """Where the test writes the data directory every scenario reads."""
    return out / "data"


def _dist() -> tuple[int, int]:
    from longtrain.train.parallel import init_distributed

    rank, world, _ = init_distributed(timeout_s=90)
    return rank, world


def _model(dropout: float):
    import torch
    import torch.nn.functional as F

    class Tiny(torch.nn.Module):
        """A language model with the trainer's contract: ``(sum of token losses, count)``."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, DIM_IN)
            self.inp = torch.nn.Linear(DIM_IN, DIM_H)
            self.drop = torch.nn.Dropout(dropout)
            self.out = torch.nn.Linear(DIM_H, VOCAB)
            self.register_buffer("scale", torch.tensor([0.5, 2.0]))

        def forward(self, input_ids, labels, **unused):
            h = self.drop(F.gelu(self.inp(self.emb(input_ids))))  # (B, T, H)
            logits = self.out(h) * self.scale[0]  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            return loss, (labels != -100).sum()

    torch.manual_seed(0)
    return Tiny()


@dataclass
class Run:
    """One engine with the trainer's loader and progress."""

    engine: Any
    job: Any
    topo: Any
    loader: Any
    progress: Any

    def parts(self) -> dict[str, Any]:
        return {"progress": self.progress, "loader": self.loader}


_TOPO: list[Any] = []


def _engine(out: Path, stage: int, dropout: float = 0.0, grad_accum: int = 1) -> Run:
    import torch
    import torch.distributed as dist

    from longtrain.train.config import load_job
    from longtrain.train.engine import deepspeed_config, initialize_engine
    from longtrain.train.parallel import build_topology
    from longtrain.train.stages import resolve_stages
    from longtrain.train.tasks import make_task
    from longtrain.train.trainer import Progress

    world = dist.get_world_size()
    job = load_job(
        None,
        [
            f"data.dir={data_dir(out)}",
            f"data.seq_len={SEQ}",
            "train.steps=12",
            f"train.micro_batch={GLOBAL_BATCH // world // grad_accum}",
            f"train.grad_accum={grad_accum}",
            "train.lr=1e-2",
            "train.warmup=4",
            "train.schedule=constant",
            "train.weight_decay=0.01",
            f"parallel.zero_stage={stage}",
            "parallel.dtype=fp32",
        ],
    )
    if not _TOPO:
        _TOPO.append(build_topology(1))  # collective: once per process
    topo = _TOPO[0]
    cfg = deepspeed_config(job, world, torch.device("cpu"))
    eng = initialize_engine(job, _model(dropout), topo, cfg)
    st = resolve_stages(job)[0]
    loader = make_task(job, TOKENIZER_HASH, st.seq_len).loader(st, topo)
    return Run(eng, job, topo, loader, Progress())


def _train(run: Run, start: int, stop: int) -> list[float]:
    """Optimizer steps start+1..stop on the loader's next batches; the global mean losses."""
    import torch

    from longtrain.train.engine import lr_at
    from longtrain.train.trainer import train_step

    losses = []
    for step in range(start, stop):
        batches = [next(run.loader) for _ in range(run.job.train.grad_accum)]
        res = train_step(
            run.engine, batches, run.topo, run.job, torch.device("cpu"), lr_at(step, run.job)
        )
        run.progress.step = step + 1
        run.progress.tokens_seen += SEQ * GLOBAL_BATCH
        losses.append(res.loss)
    return losses


def _manager(run_dir: Path, keep: int = 3, async_save: bool = False):
    from longtrain.train.checkpoint import CheckpointManager

    return CheckpointManager(run_dir, {}, TOKENIZER_HASH, keep=keep, async_save=async_save)


def _save(run: Run, run_dir: Path, step: int, keep: int = 3, async_save: bool = False) -> str:
    assert run.progress.step == step
    mgr = _manager(run_dir, keep, async_save)
    return str(mgr.save(run.engine, step, run.parts(), {"dim": DIM_H}))


def _resume(run: Run, path: Path, forget: str | None = None) -> dict:
    """Resume as the trainer does; ``forget`` ("loader" or "rng") is a known bug for the
    negative controls: that part is not restored. Returns step and parts of the state."""
    from longtrain.train.checkpoint import client_parts, restore_rng_state

    parts = {k: v for k, v in run.parts().items() if k != forget}
    state = _manager(Path(path).parent.parent).load(
        run.engine, path, parts, model_config={"dim": DIM_H}
    )
    if forget != "rng":
        restore_rng_state(path)
    return {"step": state["step"], **client_parts(state)}


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
    run = _engine(out, 2, dropout=0.1)
    opt = run.engine.basic_optimizer
    res["optimizer"] = f"{type(opt).__module__}.{type(opt).__name__}"
    res["exact_losses"] = _train(run, 0, 3)
    _save(run, out / "exact", 3)
    res["loader_at_3"] = run.loader.state_dict()
    res["exact_losses"] += _train(run, 3, 6)
    _save(run, out / "exact", 6)
    # keep-last-k with k=2: saves at 7, 8, 9 delete 3 and 6 and 7.
    for s in (7, 8, 9):
        res["exact_losses"] += _train(run, s - 1, s)
        _save(run, out / "keep", s, keep=2)
    # async == sync: the same state saved both ways; the async one while training goes on.
    _save(run, out / "sync", 9)
    _save(run, out / "async", 9, async_save=True)
    _train(run, 9, 11)
    wait_for_pending_save()
    del run
    # Resharding references: no dropout (DP=1 and DP=2 would draw different masks).
    run = _engine(out, 2)
    res["plain_losses"] = _train(run, 0, 3)
    _save(run, out / "plain2", 3)
    res["plain_losses"] += _train(run, 3, 6)
    del run
    # Consolidation: stages 0-3, reference full weights from the live engine.
    for stage in (0, 1, 2, 3):
        run = _engine(out, stage)
        _train(run, 0, 2)
        path = _save(run, out / f"zero{stage}", 2)
        ref = _full_params(run.engine, stage)
        if rank == 0:
            torch.save(ref, Path(path).parent.parent / "ref.pt")
        del run
    dist.barrier()
    res["world"] = world
    return res


def scenario_single(out: Path) -> dict:
    """1 rank: straight plain run (grad_accum 2 = same global batch), resharded 2 -> 1 resume."""
    _dist()
    res: dict = {}
    run = _engine(out, 2, grad_accum=2)
    res["plain_losses"] = _train(run, 0, 3)
    _save(run, out / "plain1", 3)
    res["plain_losses"] += _train(run, 3, 6)
    del run
    run = _engine(out, 2, grad_accum=2)
    res["resharded_state"] = _resume(run, out / "plain2" / "checkpoints" / "step_00000003")
    res["resharded_lr"] = float(run.engine.optimizer.param_groups[0]["lr"])
    res["resharded_losses"] = _train(run, 3, 6)
    return res


def scenario_resume(out: Path) -> dict:
    """2 ranks: exact resume from step 3 (bitwise) and its negative controls, resharded 1 -> 2
    resume."""
    import shutil

    import torch.distributed as dist

    from longtrain.train.checkpoint import load_checkpoint
    from longtrain.train.files import find_latest

    rank, world = _dist()
    res: dict = {}
    run = _engine(out, 2, dropout=0.1)
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
        load_checkpoint(run.engine, bad)
        err = None
    except Exception as e:  # reported, compared by the test
        err = f"{type(e).__name__}: {e}"
    errors: list = [None] * world
    dist.all_gather_object(errors, err)
    res["corrupt_errors"] = errors
    good = out / "exact" / "checkpoints" / "step_00000003"
    res["resume_state"] = _resume(run, good)
    res["resume_losses"] = _train(run, 3, 6)
    _save(run, out / "resumed", 6)
    del run
    # Negative controls: the same resume with the loader position or the RNG forgotten.
    for part in ("loader", "rng"):
        run = _engine(out, 2, dropout=0.1)
        _resume(run, good, forget=part)
        res[f"forgot_{part}_losses"] = _train(run, 3, 6)
        del run
    run = _engine(out, 2)
    res["resharded_state"] = _resume(run, find_latest(out / "plain1"))
    res["resharded_losses"] = _train(run, 3, 6)
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
    run = _engine(out, 2)
    _train(run, 0, 2)
    _save(run, out / "fault", 2)
    _train(run, 2, 4)
    _save(run, out / "fault", 4)


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
