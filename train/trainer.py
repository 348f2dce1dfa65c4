"""The one training loop: pretraining and fine-tuning are jobs of stages run by one Trainer.

``longtrain pretrain`` and ``longtrain finetune`` both run :class:`Trainer` in every process,
however it was started (one process, ``torchrun -m longtrain.launch``, the ``deepspeed``
launcher, srun). A job is a list of stages (``longtrain.train.stages``): pretraining is one
stage from scratch; a curriculum or a context extension is several; fine-tuning starts from
``model.init``. Each stage builds its engine (the SP degree, micro-batch and RoPE may change),
loads the last checkpoint if there is one, and trains to its end through one step function,
one logging path, one preemption path, one NaN policy and one evaluation hook. Resuming after
a crash takes exactly the path a stage boundary takes, which is why an interrupted run equals
an uninterrupted one bit for bit.

Order matters: the job is validated from environment variables alone before any process group
exists, so a bad job fails with one line on every rank instead of hanging in a collective.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from longtrain.data.loader import verify_data_dir
from longtrain.model.errors import LongtrainError
from longtrain.train import checkpoint as ckpt
from longtrain.train.artifacts import open_artifact
from longtrain.train.config import (
    ROPE_FIELDS,
    JobConfig,
    check_data,
    data_dirs,
    job_manifest,
    load_job,
    save_resolved,
    validate_job,
)
from longtrain.train.engine import (
    Prefetcher,
    build_model,
    compute_dtype,
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
from longtrain.train.eval.validator import check_long_eval, long_eval
from longtrain.train.export import write_model_output
from longtrain.train.files import (
    COMMANDS,
    DEEPSPEED_CONFIG,
    HEAD_CONFIG,
    LORA_CONFIG,
    METRICS,
    MODEL_CONFIG,
    find_latest,
    read_client_state,
    resolve_checkpoint,
)
from longtrain.train.metrics import (
    FlopsMeter,
    MetricsLogger,
    device_peak_flops,
    peak_memory,
    reset_peak_memory,
    set_tf32_policy,
)
from longtrain.train.parallel import (
    Topology,
    all_max,
    all_reduce_sum,
    build_topology,
    compile_seconds,
    env_world,
    init_distributed,
)
from longtrain.train.plan import check_offload_memory
from longtrain.train.preempt import PreemptionHandler
from longtrain.train.stages import Stage, resolve_stages, stage_at, stage_job, stage_model_config
from longtrain.train.tasks import make_task

# Test hooks. INJECT_NAN_ENV: comma-separated optimizer steps (1-based) whose loss is made NaN,
# to exercise the skip-and-stop path without a diverging model. CRASH_ENV: exit abruptly (like
# a killed job) right after this global step and its checkpoint.
INJECT_NAN_ENV = "LONGTRAIN_INJECT_NAN_STEPS"
CRASH_ENV = "LONGTRAIN_CRASH_AFTER_STEP"


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
    update equals the one of a single device seeing every token of the step. The losses stay
    on the device until one all-reduce at the end: one host sync per step.
    """
    set_lr(engine, lr)
    counts = torch.tensor([float(count_tokens(batches)), 0.0], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, group=topo.world_group)
    global_count = float(counts[0])
    # A step whose every target is masked still has to step in lockstep on all ranks.
    scale = grad_divisor(engine) / max(global_count, 1.0)
    local_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        loss_sum = forward_loss(engine, to_device(batch, device), job.train.loss_chunk_size)
        if inject_nan:
            loss_sum = loss_sum * float("nan")
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        local_sum += loss_sum.detach().double()
        if i < len(batches) - 1:
            engine.step()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local_sum, group=topo.world_group)
    loss = float(local_sum) / max(global_count, 1.0)
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


# ---- Stateful parts --------------------------------------------------------------------------


class Progress:
    """Where the run is: the global optimizer step and the tokens seen (Stateful)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.tokens_by_source: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "tokens_by_source": dict(self.tokens_by_source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        self.tokens_by_source = {
            k: int(v) for k, v in (state.get("tokens_by_source") or {}).items()
        }


class EarlyStopping:
    """Best validation loss so far and evaluations without improvement, per stage (Stateful)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.stage: int | None = None

    def enter(self, stage: int) -> None:
        """Validation losses at another window length do not compare: restart the count."""
        if self.stage != stage:
            self.best, self.best_step, self.bad, self.stage = None, None, 0, stage

    def update(self, val_loss: float, step: int) -> tuple[bool, bool]:
        """(improved and worth keeping, should stop) after one evaluation."""
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = val_loss, step, 0
            return self.patience > 0, False
        self.bad += 1
        return False, bool(self.patience) and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
            "stage": self.stage,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad, self.stage = int(state.get("bad", 0)), state.get("stage")


class _Window:
    """Training throughput and mean loss over the steps since the last metrics row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens, self.start, self.losses = 0, time.perf_counter(), []

    def pause(self, seconds: float) -> None:
        """Evaluating and saving are not training throughput."""
        self.start += seconds


# ---- output policy ---------------------------------------------------------------------------


def quiet_libraries(rank: int) -> None:
    """The one output policy of every command and launcher: longtrain's own lines, progress
    bars and errors; library chatter only when it is a real problem, and once.

    DeepSpeed logs at INFO on every rank (WARNING on rank 0 and ERROR elsewhere are kept).
    torch.distributed and DeepSpeed raise FutureWarning / DeprecationWarning / UserWarning about
    their own internals on every call; those say nothing a user can act on.
    """
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    except ImportError:
        pass
    for cat in (FutureWarning, DeprecationWarning, UserWarning):
        for module in (r"torch\.distributed.*", r"deepspeed.*", r"torch\.utils\.checkpoint"):
            warnings.filterwarnings("ignore", category=cat, module=module)


def record_command(run_dir: Path, world: int, step: int, argv: list[str] | None = None) -> None:
    """Append this invocation to ``run_dir/commands.jsonl``: its ``longtrain`` command line
    (the launcher's script path and the deepspeed launcher's ``--local_rank`` left out), the
    world size and the step it started from. Exports cite it in the model card."""
    args = list(sys.argv if argv is None else argv)[1:]
    cmd = ["longtrain", *(a for a in args if not a.startswith(("--local_rank", "--local-rank")))]
    with open(run_dir / COMMANDS, "a") as f:
        f.write(json.dumps({"command": cmd, "world_size": world, "start_step": step}) + "\n")


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch from the job's seed.

    Two runs of a job then draw the same numbers, and the RNG states their checkpoints record
    are comparable (a resume restores them).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- the trainer -----------------------------------------------------------------------------


class Trainer:
    """One rank of a job: validates it, then runs its stages (see the module docstring)."""

    def __init__(self, job: JobConfig, command: str = "pretrain") -> None:
        _, world, _ = env_world()
        self.job, self.command = job, command
        self.init = open_artifact(job.model.init, option="model.init") if job.model.init else None
        init_cfg = self.init.config() if self.init is not None else None
        # Every check that can fail runs here, before any process group exists.
        self.base_cfg = validate_job(job, world, command=command, init_config=init_cfg)
        self.stages = resolve_stages(job)
        if job.parallel.offload_activations:
            check_offload_memory(job, self.base_cfg, self.stages, world)
        job.train.steps = self.stages[-1].end
        self.longest = max(s.seq_len for s in self.stages)
        manifest = job_manifest(job, self.stages) if job.finetune.task == "lm" else {}
        if manifest:
            check_data(job, self.stages)
        self.task = make_task(job, manifest.get("tokenizer_hash"), self.longest)
        self.tokenizer_hash = self.task.tokenizer_hash
        if job.log.long_eval_interval:
            check_long_eval(job)  # a bad passkey length fails now, not at the first long eval
        self.run_dir = Path(job.run_dir)
        ckpt.check_lineage(self.run_dir, job.checkpoint.resume)
        for d in data_dirs(job, self.stages) if manifest else []:
            verify_data_dir(d, progress=False)  # size, sha256 (cached), id range
        self.progress = Progress()
        es = job.finetune.early_stopping
        self.early = EarlyStopping(es.patience, es.min_delta)
        self.inject = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}
        self.crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
        self._command_recorded = False
        self._compiled_stage: int | None = None  # model.compile: the stage last timed
        self._compile_total = 0.0

    # ---- set-up -------------------------------------------------------------------------

    def _start(self) -> None:
        """The process group, the device, where to continue from."""
        job = self.job
        self.rank, self.world, _ = init_distributed(job.parallel.timeout_s)
        seed_all(job.seed)
        quiet_libraries(self.rank)
        self.is_main = self.rank == 0
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        # One explicit TF32 policy: fp32 matmuls may use TF32 only in a run that computes in
        # bf16 anyway (its fp32 leftovers are not where the precision is).
        tf32 = set_tf32_policy(enabled=compute_dtype(job, self.device) != torch.float32)
        if self.is_main:
            print(f"longtrain: {tf32}", flush=True)
        self.topos: dict[int, Topology] = {}
        self.last_ckpt: Path | None = None
        r = job.checkpoint.resume
        if r == "auto":
            self.last_ckpt = find_latest(self.run_dir)
        elif r != "never":
            self.last_ckpt = resolve_checkpoint(r)
            if self.rank == 0:
                ckpt.set_aside_future(self.run_dir, self.last_ckpt)
            dist.barrier()
        self.resumed = self.last_ckpt is not None
        self._announced = False
        if self.resumed:
            # Read (nothing unpickled) to know the step, hence the stage, before any engine.
            self.progress.load_state_dict(
                ckpt.client_parts(read_client_state(self.last_ckpt))["progress"]
            )
        self.manager = ckpt.CheckpointManager(
            self.run_dir,
            job.to_dict(),
            self.tokenizer_hash,
            keep=job.checkpoint.keep,
            async_save=job.checkpoint.async_save,
            meta={"finetune": {"task": self.task.name, "pad_token_id": self.task.pad_token_id}},
        )
        self.init_state: dict[str, torch.Tensor] | None = None
        if not self.resumed and self.init is not None:
            if self.rank == 0 or job.parallel.zero_stage < 3:
                self.init_state = self._init_weights()
            else:
                self.init_state = {}  # ZeRO-3: rank 0 scatters, the others join each gather

    def _init_weights(self) -> dict[str, torch.Tensor]:
        """fp32 CPU state dict of ``model.init``: adapters merged, the head fitted to the task."""
        assert self.init is not None
        sd = self.init.state_dict(merge_lora=True)
        ft, cfg = self.job.finetune, self.base_cfg
        if ft.task == "classify":
            sd.pop("output.weight", None)
            if "score.weight" in sd and sd["score.weight"].shape[0] != ft.num_labels:
                sd.pop("score.weight")  # a new label set: a fresh head
        else:
            sd.pop("score.weight", None)
            if "output.weight" not in sd and not cfg.tie_embeddings:
                raise LongtrainError(
                    f"model.init={self.init.path}: no LM head (output.weight); task lm needs one"
                )
        return sd

    def _topology(self, sp: int) -> Topology:
        if sp not in self.topos:  # new_group is collective: every rank builds the same ones
            self.topos[sp] = build_topology(sp, self.job.parallel.ring)
        return self.topos[sp]

    def _parts(self, loader: Any) -> dict[str, Any]:
        return {"progress": self.progress, "loader": loader, "early_stop": self.early}

    def _save(self, engine: Any, loader: Any, cfg: Any) -> Path:
        extra = {}
        lora = self.job.finetune.lora
        if lora.rank:
            extra[LORA_CONFIG] = {
                "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
            }  # fmt: skip
        if self.task.name == "classify":
            extra[HEAD_CONFIG] = {
                "task": "classify",
                "num_labels": self.job.finetune.num_labels,
                "pad_token_id": self.task.pad_token_id,
            }
        self.last_ckpt = self.manager.save(
            engine, self.progress.step, self._parts(loader), cfg.to_dict(), extra_files=extra
        )
        self.saved_at = self.progress.step
        self.handler.last_saved = str(self.last_ckpt)
        return self.last_ckpt

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> int:
        """Train every stage to its end (or to a preemption / early stop); 0 on success."""
        self._start()
        job = self.job
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            tensorboard=job.log.tensorboard,
            wandb_project=job.log.wandb_project if job.log.wandb else None,
            config=job.to_dict(),
            resume_step=self.progress.step if self.resumed else None,
        )
        self.handler = PreemptionHandler(deadline_s=job.checkpoint.preempt_deadline_s)
        self.handler.last_saved = str(self.last_ckpt) if self.last_ckpt else None
        self.handler.install()
        self.bar = tqdm(
            total=job.train.steps,
            initial=self.progress.step,
            disable=not (self.is_main and job.log.progress),
            desc=self.command,
            unit="step",
            dynamic_ncols=True,
        )
        self.stopped = self.preempted = False
        self.bad_streak = 0
        self.saved_at = self.progress.step if self.resumed else -1
        try:
            while self.progress.step < job.train.steps and not self.stopped:
                self._run_stage(stage_at(self.stages, self.progress.step))
            ckpt.wait_for_pending_save()  # "done" and exit 0 only once the last save committed
        finally:
            self.bar.close()
            self.logger.close()
            self.handler.finish()
            self.handler.uninstall()
            # Also after a failure (NaN streak): the curve up to it is what one looks at first.
            try:
                png = self.logger.plot()
            except Exception as e:  # a plotting problem must not hide the run's own error
                png = None
                if self.is_main:
                    print(f"longtrain: loss curve not written: {e}", flush=True)
        self._finish(png)
        dist.barrier()
        return 0

    def _finish(self, png: Path | None) -> None:
        """The closing lines, and ``final/`` for a fine-tuning run that reached its end."""
        if not self.is_main:
            return
        step = self.progress.step
        print(f"longtrain: done at step {step}; checkpoint {self.last_ckpt}", flush=True)
        print(f"longtrain: metrics {self.run_dir / METRICS}; loss curve {png}", flush=True)
        if self.command != "finetune" or self.last_ckpt is None or self.preempted:
            return
        final = self.run_dir / "final"
        write_model_output(
            self.last_ckpt, final, {"step": step, "data": self.job.to_dict()["data"]}
        )
        lora = " --merge-lora" if self.job.finetune.lora.rank else ""
        print(f"longtrain finetune: model {final}", flush=True)
        print(
            f"longtrain finetune: export with `longtrain export-hf --checkpoint {final} --out OUT"
            f"{lora}`",
            flush=True,
        )

    def _build_stage(self, st: Stage) -> tuple[Any, Any, Any, Any, Any]:
        """Engine, loader, model config, topology and stage job of ``st`` (checkpoint loaded)."""
        job = self.job
        sj = stage_job(job, st)
        cfg = stage_model_config(self.base_cfg, st)
        topo = self._topology(st.sp)
        ds_config = deepspeed_config(sj, self.world, self.device)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / DEEPSPEED_CONFIG).write_text(json.dumps(ds_config, indent=2))
        init = None if self.last_ckpt is not None else self.init_state
        model = build_model(sj, cfg, topo, ds_config, self.device, init)
        engine = initialize_engine(sj, model, topo, ds_config)
        loader = self.task.loader(st, topo, fresh=self.progress.step == st.start)
        if self.last_ckpt is not None:
            check_shape_compatible(self.last_ckpt, cfg)
            self.manager.load(engine, self.last_ckpt, self._parts(loader))
            if self.is_main and self.resumed and not self._announced:
                self.bar.write(
                    f"longtrain: resumed from {self.last_ckpt} at step {self.progress.step}"
                )
            self._announced = True
        loader = Prefetcher(loader, pin=self.device.type == "cuda")
        if self.is_main:
            # Only now is the job accepted (a refused resume must not rewrite it).
            save_resolved(job, self.run_dir)
            if not self._command_recorded:  # once per invocation, once it is accepted
                record_command(self.run_dir, self.world, self.progress.step)
                self._command_recorded = True
            rope = cfg.rope_scaling.to_dict() if cfg.rope_scaling else "default"
            lora = f", LoRA r={job.finetune.lora.rank}" if job.finetune.lora.rank else ""
            ring = f" (Ulysses {topo.ulysses} x ring {topo.ring})" if topo.ring > 1 else ""
            self.bar.write(
                f"longtrain {self.command}: {st.name} steps [{st.start}, {st.end}): "
                f"{cfg.num_params() / 1e6:.1f}M params, world {self.world} = DP {topo.dp} x "
                f"SP {topo.sp}{ring}, ZeRO-{job.parallel.zero_stage}, seq_len {st.seq_len}, rope "
                f"{rope} theta {cfg.rope_theta:g}, task {self.task.name}{lora}, attention core "
                f"{model.attention_core}, device {self.device.type}, run_dir {self.run_dir}"
            )
        return engine, loader, cfg, topo, sj

    def _run_stage(self, st: Stage) -> None:
        """Build the engine for stage ``st``, load the last checkpoint, train to its end."""
        job = self.job
        engine, loader, cfg, topo, sj = self._build_stage(st)
        self.early.enter(st.index)
        if job.log.eval_interval and self.progress.step == st.start:
            row = {
                "step": self.progress.step,
                "stage": st.index,
                "tokens": self.progress.tokens_seen,
            }
            self.logger.log({**row, **self.task.validate(engine, sj, topo, self.device)})
        peak, src = device_peak_flops(self.device, compute_dtype(sj, self.device))
        if self.is_main and st.index == self.stages[0].index:
            what = f"{peak / 1e12:.3f} TFLOP/s per rank" if peak else "none, MFU not logged"
            self.bar.write(f"longtrain: MFU peak {what} ({src})")
        meter = FlopsMeter(cfg, sp=topo.sp)
        if self.last_ckpt is not None:
            # Last, after everything that draws random numbers at start-up (the MFU matmul
            # probe, evaluation set-up): the steps continue with exactly the saved RNG.
            ckpt.restore_rng_state(self.last_ckpt)
        win = _Window()
        while self.progress.step < st.end:
            if self._step(st, engine, loader, topo, sj, cfg, win, peak, meter):
                break
        if self.saved_at != self.progress.step and self.bad_streak == 0:
            self._save(engine, loader, cfg)  # every stage boundary is a committed checkpoint
        ckpt.wait_for_pending_save()  # the next stage loads this checkpoint
        loader.close()
        engine.destroy()
        del engine
        gc.collect()

    def _step(self, st: Stage, engine: Any, loader: Any, topo: Topology, sj: JobConfig, cfg: Any,
              win: _Window, peak: float | None, meter: FlopsMeter) -> bool:  # fmt: skip
        """One optimizer step with its logging, evaluation and saving; True to leave the stage."""
        job, prog = self.job, self.progress
        batches = [next(loader) for _ in range(st.grad_accum)]
        for b in batches:  # the CPU cu_seqlens, before the batch moves: no device sync
            meter.add(b["cu_seqlens"], seq_len=st.seq_len, batch=int(b["input_ids"].shape[0]))
        lr = lr_at(prog.step - st.start, sj)
        res = train_step(
            engine, batches, topo, sj, self.device, lr, inject_nan=(prog.step + 1) in self.inject
        )
        prog.step += 1
        step = prog.step
        if sj.model.compile and self._compiled_stage != st.index:
            self._log_compile(st, step)  # this stage's first step (fresh or resumed) compiled
        # All tokens processed (masked or not) measure throughput.
        n_tok = st.seq_len * st.micro_batch * st.grad_accum * topo.dp
        prog.tokens_seen += n_tok
        win.tokens += n_tok
        names = getattr(loader, "source_names", None)
        if names:
            self._count_sources(batches, names, st.seq_len, topo)
        self.bar.update(1)
        if res.skipped:
            self._bad_step(step, res, lr)
        else:
            self.bad_streak = 0
            win.losses.append(res.loss)
            if self.is_main:
                self.bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}")
        ev = job.log.eval_interval
        do_eval = bool(ev) and (step % ev == 0 or step == st.end)
        improved = False
        if (step % job.log.interval == 0 or step == st.end or do_eval) and not res.skipped:
            el = max(time.perf_counter() - win.start, 1e-9)
            row: dict[str, Any] = {
                "step": step, "stage": st.index,
                # Mean over the steps since the last row: one noisy window is not the trend.
                "loss": float(np.mean(win.losses)), "lr": lr, "grad_norm": res.grad_norm,
                "tokens": prog.tokens_seen, "tokens_per_s": win.tokens / el,
            }  # fmt: skip
            if prog.tokens_by_source:
                row["tokens_by_source"] = dict(prog.tokens_by_source)
            flops = all_reduce_sum(meter.totals(), self.device, topo.world_group)
            row.update(FlopsMeter.row(flops, el, self.world, peak))
            row.update(self._memory(engine))
            if do_eval:
                row.update(self.task.validate(engine, sj, topo, self.device))
                improved, stop = self.early.update(row["val_loss"], step)
                self.stopped = self.stopped or stop
            self.logger.log(row)
            win.reset()
            meter.reset()
            reset_peak_memory(self.device)
        li = job.log.long_eval_interval
        if li and (step % li == 0 or step == job.train.steps):
            t0 = time.perf_counter()
            self.logger.log({"step": step, **long_eval(engine, sj, topo, self.device)})
            win.pause(time.perf_counter() - t0)
        preempted = self.handler.should_stop()
        ci = job.checkpoint.interval
        periodic = bool(ci) and step % ci == 0 and step < job.train.steps
        if (periodic or improved or self.stopped or preempted) and self.bad_streak == 0:
            t0 = time.perf_counter()
            self._save(engine, loader, cfg)
            win.pause(time.perf_counter() - t0)
        if improved:
            ckpt.wait_for_pending_save()  # best/ is made from a committed checkpoint
            if self.is_main:
                info = {"step": step, "val_loss": self.early.best, "data": job.to_dict()["data"]}
                write_model_output(self.last_ckpt, self.run_dir / "best", info)
            dist.barrier()
        if self.crash_at and step == self.crash_at:
            ckpt.wait_for_pending_save()
            os._exit(17)
        if preempted:
            self.preempted = self.stopped = True
        if self.stopped and self.is_main:
            e = self.early
            why = (
                f"preempted; saved {self.last_ckpt}; resume with checkpoint.resume=auto"
                if self.preempted
                else f"early stopping at step {step}; best val_loss {e.best} at step {e.best_step}"
            )
            self.bar.write(f"longtrain {self.command}: {why}")
        return self.stopped

    def _log_compile(self, st: Stage, step: int) -> None:
        """The seconds ``model.compile`` cost, once per stage (a new stage's shapes compile
        anew): one line and a metrics row ``{"step", "stage", "compile_s"}`` (rank 0's figure)."""
        self._compiled_stage = st.index
        total = compile_seconds()
        if total is None:
            return
        spent, self._compile_total = total - self._compile_total, total
        if self.is_main:
            self.bar.write(
                f"longtrain: torch.compile of the blocks took {spent:.1f} s (step {step})"
            )
        self.logger.log({"step": step, "stage": st.index, "compile_s": spent})

    def _count_sources(self, batches: list[dict[str, Any]], names: list[str], seq_len: int,
                       topo: Topology) -> None:  # fmt: skip
        """Add this step's tokens per mixture source (every window: seq_len tokens)."""
        local = [0.0] * len(names)
        for b in batches:
            for i in b["source_ids"].tolist():
                local[i] += seq_len
        # The ranks of one SP group read the same windows: count each window once.
        total = all_reduce_sum(local, self.device, topo.world_group)
        for name, n in zip(names, total):
            by = self.progress.tokens_by_source
            by[name] = by.get(name, 0) + round(n / topo.sp)

    def _memory(self, engine: Any) -> dict[str, float]:
        """Peak memory since the last row (max over ranks), and host memory of offload."""
        mem = peak_memory(self.device)
        offload = getattr(engine.module, "activation_offload", None)
        if offload is not None:
            mem["offload_host_gb"] = offload.peak_host_bytes / 1e9
            offload.reset_counters()
        keys = sorted(mem)
        return dict(zip(keys, all_max([mem[k] for k in keys], self.device)))

    def _bad_step(self, step: int, res: StepResult, lr: float) -> None:
        """The NaN policy: skip the update, log it, stop after ``max_bad_steps`` in a row."""
        self.bad_streak += 1
        if self.is_main:
            self.bar.write(
                f"step {step}: loss is {res.loss} -> update skipped ({self.bad_streak} in a row)"
            )
        self.logger.log({"step": step, "loss": res.loss, "lr": lr, "skipped": True})
        mb = self.job.train.max_bad_steps
        if self.bad_streak >= mb:
            ckpt.wait_for_pending_save()  # the checkpoint named below is committed
            where = self.last_ckpt or find_latest(self.run_dir)
            raise LongtrainError(
                f"loss was NaN/Inf for {self.bad_streak} steps in a row (train.max_bad_steps="
                f"{mb}), stopping at step {step}; last good checkpoint: {where or 'none'}; resume "
                "from it with a lower train.lr"
            )


def check_shape_compatible(checkpoint: Path, cfg: Any) -> None:
    """A checkpoint may differ from the run in RoPE and max_seq_len only (stages change them)."""
    saved = json.loads((Path(checkpoint) / MODEL_CONFIG).read_text())
    now = cfg.to_dict()
    diff = [k for k in now if k not in ROPE_FIELDS and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise LongtrainError(
            f"{checkpoint / MODEL_CONFIG}: {k}={saved.get(k)!r} but this run has {now[k]!r}; "
            "resume with the checkpoint's model or start a new run_dir"
        )


# ---- commands --------------------------------------------------------------------------------


def _one_line_errors(fn: Any, args: argparse.Namespace) -> int:
    """Run ``fn``; on ranks other than 0 a LongtrainError exits with code 2 without printing,
    so a failing job shows its one line once instead of once per rank."""
    try:
        return int(fn(args) or 0)
    except LongtrainError:
        if env_world()[0] != 0:
            sys.exit(2)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli_pretrain(args: argparse.Namespace) -> int:
    """``longtrain pretrain --config FILE [overrides]``: a language model from scratch."""

    def go(a: argparse.Namespace) -> int:
        return Trainer(load_job(a.config, list(a.overrides or [])), "pretrain").run()

    return _one_line_errors(go, args)


def cli_finetune(args: argparse.Namespace) -> int:
    """``longtrain finetune --config FILE [overrides]``: SFT, context extension, stages, LoRA,
    classification, from ``model.init``."""

    def go(a: argparse.Namespace) -> int:
        return Trainer(load_job(a.config, list(a.overrides or [])), "finetune").run()

    return _one_line_errors(go, args)
