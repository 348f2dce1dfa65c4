"""The training loop: build -> parallelize -> step -> log -> eval -> checkpoint.

``longtrain pretrain --config FILE [key=value ...]`` runs this in every process, however it was
started (one process, ``torchrun -m longtrain.launch``, the ``deepspeed`` launcher, srun). Order
matters: the config is validated from environment variables alone before any process group
exists, so a bad job fails with one line on every rank instead of hanging in a collective.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longtrain.model.errors import LongtrainError
from longtrain.train.config import JobConfig, load_job, read_manifest, save_resolved, validate_job
from longtrain.train.engine import (
    build_model,
    count_tokens,
    deepspeed_config,
    forward_loss,
    grad_divisor,
    grad_norm_stage0,
    initialize_engine,
    lr_at,
    set_lr,
    to_device,
    zero_stage0_grads,
)
from longtrain.train.metrics import (
    MetricsLogger,
    device_peak_flops,
    mfu,
    peak_memory_gb,
)
from longtrain.train.parallel import (
    Topology,
    all_reduce_sum,
    build_topology,
    env_world,
    init_distributed,
    setup_accelerator_env,
)

# Test hook: comma-separated optimizer steps (1-based) whose loss is made NaN, to exercise the
# skip-and-stop path without a diverging model.
INJECT_NAN_ENV = "LONGTRAIN_INJECT_NAN_STEPS"


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    """Mean token loss over the whole step (all ranks, all micro-batches)."""
    tokens: int
    """Unmasked target tokens in the step (global)."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when the update was skipped)."""
    skipped: bool
    """True when the loss was not finite and the update was not applied."""


def train_step(
    engine: Any,
    batches: list[dict[str, Any]],
    topo: Topology,
    job: JobConfig,
    device: torch.device,
    lr: float,
    inject_nan: bool = False,
) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches of this rank.

    Each micro-batch back-propagates ``local_loss_sum * world / N_global`` (see engine.py), so the
    update equals the one of a single device seeing every token of the step.
    """
    set_lr(engine, lr)
    local_count = count_tokens(batches)
    (global_count,) = all_reduce_sum([float(local_count)], device, topo.world_group)
    # A step whose every target is masked still has to step in lockstep on all ranks.
    scale = grad_divisor(engine) / max(global_count, 1.0)
    local_sum = 0.0
    for i, batch in enumerate(batches):
        loss_sum = forward_loss(engine, to_device(batch, device), job.train.loss_chunk_size)
        if inject_nan:
            loss_sum = loss_sum * float("nan")
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        local_sum += float(loss_sum.detach())
        if i < len(batches) - 1:
            engine.step()
    (total,) = all_reduce_sum([local_sum], device, topo.world_group)
    loss = total / max(global_count, 1.0)
    bad = not np.isfinite(loss)
    stage0_norm = None
    if job.parallel.zero_stage == 0:
        # Without ZeRO, DeepSpeed does not report the norm; gradients are whole and reduced.
        stage0_norm = grad_norm_stage0(engine)
        if bad:
            zero_stage0_grads(engine)
    engine.step()
    applied = engine.was_step_applied()
    if bad and applied and job.parallel.zero_stage != 0:
        raise LongtrainError(
            "the loss was NaN/Inf but DeepSpeed applied the update anyway; the weights may be "
            "corrupt: restart from the last committed checkpoint with a lower train.lr"
        )
    gn = engine.get_global_grad_norm() if job.parallel.zero_stage > 0 else stage0_norm
    grad_norm = float(gn) if gn is not None and not bad else float("nan")
    return StepResult(loss=loss, tokens=int(global_count), grad_norm=grad_norm, skipped=bad)


@torch.no_grad()
def job_validation_batches(job: JobConfig, topo: Topology) -> Any:
    """This rank's validation batches for the job (its DP slice, its SP shard)."""
    from longtrain.data.loader import validation_batches

    return validation_batches(
        job.data.dir,
        seq_len=job.data.seq_len,
        micro_batch=job.train.micro_batch,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        sp_rank=topo.sp_rank,
        sp_size=topo.sp,
        max_batches=job.data.val_batches or None,
        attention=job.data.attention,
    )


def evaluate(
    engine: Any, job: JobConfig, topo: Topology, device: torch.device
) -> tuple[float, int]:
    """Validation (mean token loss, tokens) over the held-out split, the same on every rank."""
    engine.eval()
    local_sum, local_count = 0.0, 0
    for batch in job_validation_batches(job, topo):
        local_sum += float(
            forward_loss(engine, to_device(batch, device), job.train.loss_chunk_size)
        )
        local_count += int((batch["labels"] != -100).sum())
    engine.train()
    total, count = all_reduce_sum([local_sum, float(local_count)], device, topo.world_group)
    return total / max(count, 1.0), int(count)


def _quiet_deepspeed(rank: int) -> None:
    """DeepSpeed logs at INFO on every rank; keep warnings (rank 0) and errors."""
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    except ImportError:
        pass


def _checkpoint_api() -> Any:
    """The checkpoint module (train/checkpoint.py, owned by the reliability work)."""
    import longtrain.train.checkpoint as ckpt

    return ckpt


def run(job: JobConfig) -> int:
    """Run a whole pretraining job in this process (one rank of it)."""
    _, world, _ = env_world()
    cfg = validate_job(job, world)  # before any process group: fails fast, same on all ranks
    manifest = read_manifest(job.data.dir)

    rank, world, local = init_distributed(job.parallel.timeout_s)
    seed_all(job.seed)
    _quiet_deepspeed(rank)
    is_main = rank == 0
    topo = build_topology(job.parallel.sp)
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    )
    run_dir = Path(job.run_dir)
    ds_config = deepspeed_config(job, topo, device)
    if is_main:
        save_resolved(job, run_dir)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        print(
            f"longtrain: {cfg.num_params() / 1e6:.1f}M params, world {world} = DP {topo.dp} x "
            f"SP {topo.sp}, ZeRO-{job.parallel.zero_stage}, seq_len {job.data.seq_len}, "
            f"device {device.type}, run_dir {run_dir}",
            flush=True,
        )

    model = build_model(job, cfg, topo, ds_config, device)
    engine = initialize_engine(job, model, topo, ds_config)
    if is_main:
        print(f"longtrain: attention core {model.attention_core}", flush=True)

    from longtrain.data.loader import DistributedLoader

    loader = DistributedLoader(
        job.data.dir,
        split="train",
        seq_len=job.data.seq_len,
        micro_batch=job.train.micro_batch,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp,
        sp_rank=topo.sp_rank,
        sp_size=topo.sp,
        seed=job.seed,
        attention=job.data.attention,
        tokenizer_hash=manifest.get("tokenizer_hash"),
    )

    ckpt = _checkpoint_api()
    start_step, tokens_seen = 0, 0
    resume_from: Path | None = None
    if job.checkpoint.resume == "auto":
        resume_from = ckpt.find_latest(run_dir)
    elif job.checkpoint.resume != "never":
        resume_from = Path(job.checkpoint.resume)
    if resume_from is not None:
        client = ckpt.load_checkpoint(
            engine,
            resume_from,
            load_optimizer=True,
            model_config=cfg.to_dict(),
            tokenizer_hash=manifest.get("tokenizer_hash"),
            restore_rng=False,  # restored right before the first step: start-up draws numbers
        )
        start_step = int(client["step"])
        tokens_seen = int(client.get("tokens_seen", 0))
        loader.load_state_dict(client["loader"])
        if is_main:
            print(f"longtrain: resumed from {resume_from} at step {start_step}", flush=True)

    logger = MetricsLogger(
        run_dir,
        enabled=is_main,
        tensorboard=job.log.tensorboard,
        wandb_project=job.log.wandb_project if job.log.wandb else None,
        config=job.to_dict(),
        resume_step=start_step if resume_from is not None else None,
    )
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    peak, peak_src = device_peak_flops(device, dtype)
    flops_tok = cfg.flops_per_token(job.data.seq_len, causal=True)
    if is_main:
        print(f"longtrain: MFU peak {peak / 1e12:.3f} TFLOP/s per rank ({peak_src})", flush=True)

    handler = ckpt.PreemptionHandler(deadline_s=job.checkpoint.preempt_deadline_s)
    handler.install()

    saved_step = start_step if resume_from is not None else -1

    def save(step: int) -> Path:
        nonlocal saved_step
        saved_step = step
        client = {
            "step": step,
            "tokens_seen": tokens_seen,
            "loader": loader.state_dict(),
            "config": job.to_dict(),
            "tokenizer_hash": manifest.get("tokenizer_hash"),
            "world_size": world,
            "sp": topo.sp,
        }
        ckpt.wait_for_pending_save()  # an async save in flight commits before the next one
        return ckpt.save_checkpoint(
            engine,
            run_dir,
            step,
            client,
            cfg.to_dict(),
            keep=job.checkpoint.keep,
            async_save=job.checkpoint.async_save,
        )

    inject = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}
    if job.log.long_eval_interval:
        from longtrain.train.evaluate import check_long_eval

        check_long_eval(job)  # a bad passkey length fails now, not at the first long eval
    ev = job.log.eval_interval
    if ev and start_step == 0:
        vl, vt = evaluate(engine, job, topo, device)
        logger.log({"step": 0, "val_loss": vl, "val_ppl": float(np.exp(min(vl, 50))), "tokens": 0})

    from tqdm import tqdm

    bar = tqdm(
        total=job.train.steps,
        initial=start_step,
        disable=not (is_main and job.log.progress),
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
    )
    bad_streak, last_saved = 0, None
    win_tokens, win_start, win_losses = 0, time.perf_counter(), []
    step = start_step
    stopped_early = False
    if resume_from is not None:
        # Last, after everything that draws random numbers at start-up (the MFU matmul probe,
        # evaluation set-up): the steps continue with exactly the RNG the saved run had.
        ckpt.restore_rng_state(ckpt.resolve_checkpoint(resume_from))
    try:
        while step < job.train.steps:
            batches = [next(loader) for _ in range(job.train.grad_accum)]
            lr = lr_at(step, job)
            res = train_step(
                engine, batches, topo, job, device, lr, inject_nan=(step + 1) in inject
            )
            step += 1
            # All tokens processed (masked or not) measure throughput.
            step_tokens = job.data.seq_len * job.train.micro_batch * job.train.grad_accum * topo.dp
            tokens_seen += step_tokens
            win_tokens += step_tokens
            if res.skipped:
                bad_streak += 1
                if is_main:
                    bar.write(
                        f"step {step}: loss is {res.loss} -> update skipped ({bad_streak} in a row)"
                    )
                logger.log({"step": step, "loss": res.loss, "lr": lr, "skipped": True})
                if bad_streak >= job.train.max_bad_steps:
                    ckpt.wait_for_pending_save()  # the checkpoint named below is committed
                    where = last_saved or ckpt.find_latest(run_dir)
                    raise LongtrainError(
                        f"loss was NaN/Inf for {bad_streak} steps in a row (train.max_bad_steps="
                        f"{job.train.max_bad_steps}), stopping at step {step}; last good checkpoint: "
                        f"{where or 'none'}; resume from it with a lower train.lr"
                    )
            else:
                bad_streak = 0
                win_losses.append(res.loss)
            bar.update(1)
            if is_main:
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}")
            do_eval = bool(ev) and (step % ev == 0 or step == job.train.steps)
            if (
                step % job.log.interval == 0 or step == job.train.steps or do_eval
            ) and not res.skipped:
                el = time.perf_counter() - win_start
                tps = win_tokens / max(el, 1e-9)
                (mem,) = _all_max([peak_memory_gb(device)], device)
                row = {
                    "step": step,
                    # Mean over the steps since the last row: one noisy window is not the trend.
                    "loss": float(np.mean(win_losses)),
                    "lr": lr,
                    "grad_norm": res.grad_norm,
                    "tokens": tokens_seen,
                    "tokens_per_s": tps,
                    "mfu": mfu(flops_tok, tps, world, peak),
                    "peak_mem_gb": mem,
                }
                if do_eval:
                    vl, _ = evaluate(engine, job, topo, device)
                    row.update({"val_loss": vl, "val_ppl": float(np.exp(min(vl, 50)))})
                logger.log(row)
                win_tokens, win_start, win_losses = 0, time.perf_counter(), []
            li = job.log.long_eval_interval
            if li and (step % li == 0 or step == job.train.steps):
                from longtrain.train.evaluate import long_eval

                t0 = time.perf_counter()
                logger.log({"step": step, **long_eval(engine, job, topo, device)})
                win_start += time.perf_counter() - t0  # evaluating is not training throughput
            ci = job.checkpoint.interval
            if ci and step % ci == 0 and step < job.train.steps and bad_streak == 0:
                last_saved = save(step)
                win_start = time.perf_counter()  # saving is not training throughput
            if handler.should_stop():
                if bad_streak == 0:
                    last_saved = save(step)
                stopped_early = True
                if is_main:
                    bar.write(
                        f"longtrain: preempted; saved {last_saved}; resume with checkpoint.resume=auto"
                    )
                break
        if not stopped_early and bad_streak == 0 and saved_step != step:
            last_saved = save(step)
        ckpt.wait_for_pending_save()  # "done" and exit 0 only once the last save committed
    finally:
        bar.close()
        logger.close()
        handler.finish()
        handler.uninstall()
        # Also after a failure (NaN streak): the curve up to it is what one looks at first.
        try:
            png = logger.plot()
        except Exception as e:  # a plotting problem must not hide the run's own error
            png = None
            if is_main:
                print(f"longtrain: loss curve not written: {e}", flush=True)
    if is_main:
        print(f"longtrain: done at step {step}; checkpoint {last_saved}", flush=True)
        print(f"longtrain: metrics {run_dir / 'metrics.jsonl'}; loss curve {png}", flush=True)
    dist.barrier()
    return 0


def _all_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) for x in t.tolist()]


def _quiet_errors_off_rank0(fn: Any, job_args: argparse.Namespace) -> int:
    """Run ``fn``; on ranks other than 0 a LongtrainError exits with code 2 without printing,
    so a failing job shows its one line once instead of once per rank."""
    try:
        return int(fn(job_args) or 0)
    except LongtrainError:
        if env_world()[0] != 0:
            sys.exit(2)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch from the job's seed.

    Two runs of a job then draw the same numbers, and the RNG states their checkpoints record
    are comparable (a resume restores them).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cli_pretrain(args: argparse.Namespace) -> int:
    """``longtrain pretrain --config FILE [overrides]``."""

    def go(a: argparse.Namespace) -> int:
        return run(load_job(a.config, list(a.overrides or [])))

    return _quiet_errors_off_rank0(go, args)


def cli_finetune(args: argparse.Namespace) -> int:
    """``longtrain finetune``: SFT, context extension, stages, LoRA, classification."""
    from longtrain.train.finetune import cli_finetune as run_cli  # its own module (issue 6)

    return run_cli(args)


def cli_export_hf(args: argparse.Namespace) -> int:
    """``longtrain export-hf --checkpoint RUN_DIR|CHECKPOINT --out DIR``.

    A training checkpoint (DeepSpeed shards of any ZeRO stage, or a run directory: its latest
    committed checkpoint) is streamed on the CPU, one tensor at a time, into the files
    ``longtrain.model.hf.save_hf`` would write (``longtrain.train.reshard.export_hf``).
    A model-only directory (``import-hf`` output: model_config.json + model.safetensors) is
    handed to the model room's exporter as it is. Without ``--tokenizer`` the tokenizer the
    run's data was prepared with is included when it can be found.
    """
    setup_accelerator_env()  # before anything imports deepspeed (shard consolidation does)
    from longtrain.model import hf
    from longtrain.train.finetune import export_hook

    done = export_hook(args)  # LoRA / classification outputs of `longtrain finetune`
    if done is not None:
        return done
    src = Path(args.checkpoint)
    if (src / "model.safetensors").is_file() and (src / "model_config.json").is_file():
        return hf.cli_export_hf(args)
    ckpt = _checkpoint_api()
    path = ckpt.resolve_checkpoint(src)
    if not (path / "model_config.json").is_file():
        raise LongtrainError(f"{path}: no model_config.json; not a longtrain training checkpoint")
    tokenizer = args.tokenizer
    if tokenizer is None:
        state = ckpt.read_client_state(path)
        data_dir = state.get("config", {}).get("data", {}).get("dir", "")
        cand = Path(data_dir) / "tokenizer" if data_dir else None
        if cand is not None and (cand / "tokenizer_meta.json").is_file():
            tokenizer = str(cand)
    elif not Path(tokenizer).is_dir():
        raise LongtrainError(f"--tokenizer {tokenizer}: not a directory")
    from longtrain.train.reshard import export_hf

    # Streamed tensor by tensor from the ZeRO shards into the HF shards: peak memory stays at
    # about one tensor, however large the model (bench/bench_checkpoint.py measures it).
    files = export_hf(
        path,
        args.out,
        tokenizer=tokenizer,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        merge_lora=args.merge_lora,
    )
    tok = f", tokenizer from {tokenizer}" if tokenizer else ", no tokenizer"
    print(f"exported {path} -> {args.out} ({len(files)} model files, {args.dtype}{tok})")
    return 0
