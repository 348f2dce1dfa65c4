"""``longtrain finetune``: SFT, context extension, staged curricula, LoRA, classification.

The run is a list of stages (one when ``finetune.stages`` is empty). Each stage is executed
by the pretraining machinery unchanged: :func:`~longtrain.train.finetune_config.stage_job`
turns it into a JobConfig, and ``train_step`` / ``evaluate`` / the DeepSpeed engine /
``save_checkpoint`` run on it. At a stage boundary a checkpoint is committed, the engine is
rebuilt for the new SP degree, micro-batch and RoPE, and that checkpoint is loaded; resuming
after a crash takes exactly the same path, which is why an interrupted staged run equals an
uninterrupted one. The data order is :class:`~longtrain.train.curriculum.StagedLoader`'s
token cursor (no window is repeated across stages).

Weights come from ``model.init`` (a training checkpoint or run dir, a model-only dir, or an
HF Llama dir) and are loaded before LoRA adapters and a task head are added. Outputs besides
the checkpoints: ``run_dir/final/`` and, with early stopping, ``run_dir/best/``: model-only
directories (``model_config.json`` + ``model.safetensors``, plus ``lora_config.json`` and
``head_config.json`` when they apply) that ``longtrain export-hf --checkpoint DIR
[--merge-lora]`` turns into a transformers directory (``LlamaForSequenceClassification`` for
``task: classify``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.train.config import JobConfig, load_job, read_manifest, save_resolved
from longtrain.train.engine import compute_dtype, deepspeed_config, initialize_engine, lr_at
from longtrain.train.finetune_config import (
    Stage,
    check_finetune,
    resolve_stages,
    stage_at,
    stage_job,
)
from longtrain.train.finetune_model import (
    build_finetune_model,
    check_shape_compatible,
    init_model_config,
    load_init_state,
    stage_model_config,
)
from longtrain.train.metrics import MetricsLogger, device_peak_flops, mfu, peak_memory_gb
from longtrain.train.parallel import all_reduce_sum, build_topology, env_world, init_distributed

# Test hook: exit abruptly (like a killed job) right after this global step and its checkpoint.
CRASH_ENV = "LONGTRAIN_FT_CRASH_AFTER_STEP"


def _check_topology(cfg: ModelConfig, st: Stage, world: int, staged: bool) -> None:
    where = f"finetune.stages[{st.index}]" if staged else "parallel"
    if world % st.sp:
        raise LongtrainError(f"{where}: sp={st.sp} does not divide the world size {world}")
    if cfg.n_heads % st.sp:
        raise LongtrainError(f"{where}: sp={st.sp} does not divide n_heads={cfg.n_heads}")
    kv = cfg.n_kv_heads
    if (kv >= st.sp and kv % st.sp) or (kv < st.sp and st.sp % kv):
        raise LongtrainError(f"{where}: sp={st.sp} and n_kv_heads={kv}: one must divide the other")


# ---- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate_classify(
    engine: Any, data: Any, sj: JobConfig, topo: Any, device: torch.device
) -> dict[str, float]:
    """Validation loss, accuracy and macro-F1 over every validation row (all ranks agree)."""
    from longtrain.data.classify import classify_val_batches

    engine.eval()
    C = sj.finetune.num_labels
    conf = torch.zeros(C, C, dtype=torch.float64, device=device)  # [true, predicted]
    loss_sum = 0.0
    for batch in classify_val_batches(
        data, sj.train.micro_batch, topo.dp_rank, topo.dp, topo.sp_rank, topo.sp
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


@torch.no_grad()
def position_bucket_losses(
    model: torch.nn.Module, data_dir: str | Path, seq_len: int, bucket: int, max_windows: int = 16
) -> list[tuple[int, int, float]]:
    """Mean validation loss per position bucket ``[(lo, hi, loss), ...]`` of one model.

    Windows are whole ``seq_len`` causal sequences of the val split (positions 0..seq_len-1),
    so the buckets above the training length show how well the model uses a longer context.
    """
    from longtrain.data.loader import validation_batches

    model.eval()
    sums = np.zeros(-(-seq_len // bucket))
    counts = np.zeros_like(sums)
    for i, b in enumerate(validation_batches(data_dir, seq_len, attention="causal")):
        if i >= max_windows:
            break
        logits = model(b["input_ids"], position_ids=b["position_ids"]).float()  # (1, T, V)
        labels = b["labels"]
        tok = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none"
        ).view(labels.shape)  # (1, T)
        ok = (labels != -100).numpy()[0]
        per = tok.numpy()[0]
        idx = np.arange(seq_len) // bucket
        np.add.at(sums, idx[ok], per[ok])
        np.add.at(counts, idx[ok], 1)
    return [
        (k * bucket, min((k + 1) * bucket, seq_len), float(sums[k] / max(counts[k], 1)))
        for k in range(len(sums))
    ]


# ---- outputs -------------------------------------------------------------------------------


def write_model_output(
    ckpt: Path, out: Path, job: JobConfig, pad_id: int | None, extra: dict
) -> None:
    """Rank 0: a model-only directory (export-hf input) from a committed checkpoint, atomically."""
    from longtrain.train.reshard import write_model_dir

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(ckpt, tmp)
    ft = job.finetune
    if ft.lora.rank:
        (tmp / "lora_config.json").write_text(
            json.dumps(
                {"rank": ft.lora.rank, "alpha": ft.lora.alpha, "targets": list(ft.lora.targets)}
            )
        )
    if ft.task == "classify":
        head = {"task": "classify", "num_labels": ft.num_labels, "pad_token_id": pad_id}
        (tmp / "head_config.json").write_text(json.dumps(head))
    (tmp / "source.json").write_text(json.dumps({"checkpoint": str(ckpt), **extra}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ---- the run -------------------------------------------------------------------------------


class _Run:
    """State shared by the stages of one run (one rank)."""

    def __init__(self, job: JobConfig) -> None:
        from longtrain.train import checkpoint as ckpt

        self.ckpt = ckpt
        check_finetune(job)
        self.stages = resolve_stages(job)
        job.train.steps = self.stages[-1].end
        self.job, self.ft, self.task = job, job.finetune, job.finetune.task
        _, world, _ = env_world()
        self.manifest = read_manifest(job.data.dir) if self.task == "lm" else {}
        if self.manifest and job.data.tokenizer:
            from longtrain.train.config import _tokenizer_hash

            want, have = self.manifest.get("tokenizer_hash"), _tokenizer_hash(job.data.tokenizer)
            if want != have:
                raise LongtrainError(
                    f"data.tokenizer {job.data.tokenizer} differs from the tokenizer data.dir "
                    f"{job.data.dir} was prepared with; use {Path(job.data.dir) / 'tokenizer'}"
                )
        self.base_cfg = init_model_config(job, self.manifest)  # before any process group
        for st in self.stages:
            cfg = stage_model_config(self.base_cfg, job, st)
            _check_topology(cfg, st, world, bool(job.finetune.stages))
        if self.task == "classify" and len(self.stages) > 1:
            raise LongtrainError("finetune.task=classify runs one stage; drop finetune.stages")
        self.tok_hash = self.manifest.get("tokenizer_hash")
        self.rank, self.world, _ = init_distributed(job.parallel.timeout_s)
        from longtrain.train.trainer import seed_all

        seed_all(job.seed)
        self.is_main = self.rank == 0
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        self.run_dir = Path(job.run_dir)
        self.longest = max(s.seq_len for s in self.stages)
        self.pad_id: int | None = None
        self.cls_train = self.cls_val = None
        if self.task == "classify":
            from longtrain.data.classify import ClassifyData

            tk, n = job.data.tokenizer, self.ft.num_labels
            self.cls_train = ClassifyData(job.data.dir, "train", tk, self.longest, n)
            self.cls_val = ClassifyData(job.data.dir, "val", tk, self.longest, n)
            self.pad_id = self.cls_train.tok.pad_id
        self.crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
        self.stop = self.preempted = False

    def start(self) -> None:
        """Find where to continue: a committed checkpoint of run_dir, or model.init."""
        job, ckpt = self.job, self.ckpt
        self.resume_from: Path | None = None
        if job.checkpoint.resume == "auto":
            self.resume_from = ckpt.find_latest(self.run_dir)
        elif job.checkpoint.resume != "never":
            self.resume_from = ckpt.resolve_checkpoint(job.checkpoint.resume)
        client = ckpt.read_client_state(self.resume_from) if self.resume_from else {}
        self.step = int(client.get("step", 0))
        self.tokens_seen = int(client.get("tokens_seen", 0))
        self.loader_state = client.get("loader")
        self.early = client.get("early_stop") or {"stage": None}
        self.last_ckpt = self.resume_from
        self.init_sd = None
        if self.resume_from is None and job.model.init:
            if self.is_main or job.parallel.zero_stage < 3:
                self.init_sd = load_init_state(job, self.base_cfg)
            else:
                self.init_sd = {}  # ZeRO-3: rank 0 scatters, the others join each gather

    def save(self, engine: Any, loader: Any, topo: Any, st: Stage, cfg: ModelConfig) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": loader.state_dict(),
            "config": self.job.to_dict(),
            "tokenizer_hash": self.tok_hash,
            "world_size": self.world,
            "sp": topo.sp,
            "stage": st.index,
            "early_stop": self.early,
            "finetune": {"task": self.task, "pad_token_id": self.pad_id},
        }
        keep = self.job.checkpoint.keep
        return self.ckpt.save_checkpoint(
            engine, self.run_dir, self.step, state, cfg.to_dict(), keep
        )

    def validate(self, engine: Any, sj: JobConfig, topo: Any) -> dict[str, float]:
        from longtrain.train.trainer import evaluate

        if self.task == "classify":
            return evaluate_classify(engine, self.cls_val, sj, topo, self.device)
        vl, _ = evaluate(engine, sj, topo, self.device)
        return {"val_loss": vl, "val_ppl": float(np.exp(min(vl, 50)))}

    def make_loader(self, st: Stage, topo: Any) -> Any:
        job = self.job
        if self.task == "classify":
            from longtrain.data.classify import ClassifyLoader

            args = (st.micro_batch, topo.dp_rank, topo.dp, topo.sp_rank, topo.sp, job.seed)
            loader: Any = ClassifyLoader(self.cls_train, *args)
        else:
            from longtrain.train.curriculum import StagedLoader

            loader = StagedLoader(
                job.data.dir, self.longest, st.seq_len, st.micro_batch, topo.dp_rank, topo.dp,
                topo.sp_rank, topo.sp, job.seed, job.data.attention, self.tok_hash,
            )  # fmt: skip
        if self.loader_state is not None:
            loader.load_state_dict(self.loader_state)
        return loader

    def run_stage(self, st: Stage, logger: MetricsLogger, bar: Any, handler: Any) -> None:
        """Build the engine for stage ``st``, load the last checkpoint, train to its end."""
        from longtrain.train.trainer import _all_max, train_step

        job, ft = self.job, self.ft
        sj = stage_job(job, st)
        cfg = stage_model_config(self.base_cfg, job, st)
        topo = build_topology(st.sp)
        ds_config = deepspeed_config(sj, topo, self.device)
        if self.is_main:
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
            rope = cfg.rope_scaling.to_dict() if cfg.rope_scaling else "default"
            bar.write(
                f"longtrain finetune: {st.name} steps [{st.start}, {st.end}) seq_len "
                f"{st.seq_len} DP {topo.dp} x SP {topo.sp} rope {rope} theta {cfg.rope_theta:g} "
                f"task {self.task} lora r={ft.lora.rank}"
            )
        init = None if self.last_ckpt else self.init_sd
        model = build_finetune_model(sj, cfg, topo, ds_config, self.device, init)
        engine = initialize_engine(sj, model, topo, ds_config)
        if self.last_ckpt is not None:
            check_shape_compatible(self.last_ckpt, cfg)
            # RNG is restored right before the first step: the MFU probe below draws numbers.
            self.ckpt.load_checkpoint(
                engine, self.last_ckpt, tokenizer_hash=self.tok_hash, restore_rng=False
            )
        loader = self.make_loader(st, topo)
        if self.early.get("stage") != st.index:
            # Validation losses at another seq_len are not comparable: restart the count.
            self.early = {"best": None, "best_step": None, "bad": 0, "stage": st.index}
        ev = job.log.eval_interval
        if ev and self.step == st.start:
            logger.log({"step": self.step, "stage": st.index, **self.validate(engine, sj, topo)})
        peak, _ = device_peak_flops(self.device, compute_dtype(sj, self.device))
        flops_tok = cfg.flops_per_token(st.seq_len, causal=True)
        if self.last_ckpt is not None:
            self.ckpt.restore_rng_state(self.last_ckpt)
        win_tokens, win_start, saved_at = 0, time.perf_counter(), -1
        while self.step < st.end:
            batches = [next(loader) for _ in range(st.grad_accum)]
            lr = lr_at(self.step - st.start, sj)
            res = train_step(engine, batches, topo, sj, self.device, lr)
            self.step += 1
            step = self.step
            n_tok = st.seq_len * st.micro_batch * st.grad_accum * topo.dp
            self.tokens_seen += n_tok
            win_tokens += n_tok
            bar.update(1)
            if res.skipped:
                raise LongtrainError(f"step {step}: loss is {res.loss}; lower train.lr and resume")
            do_eval = bool(ev) and (step % ev == 0 or step == st.end)
            row: dict[str, Any] = {}
            if step % job.log.interval == 0 or step == st.end or do_eval:
                tps = win_tokens / max(time.perf_counter() - win_start, 1e-9)
                (mem,) = _all_max([peak_memory_gb(self.device)], self.device)
                row = {
                    "step": step, "stage": st.index, "loss": res.loss, "lr": lr,
                    "grad_norm": res.grad_norm, "tokens": self.tokens_seen, "tokens_per_s": tps,
                    "mfu": mfu(flops_tok, tps, self.world, peak), "peak_mem_gb": mem,
                }  # fmt: skip
                win_tokens, win_start = 0, time.perf_counter()
            improved = False
            if do_eval:
                row.update(self.validate(engine, sj, topo))
                vl, es, e = row["val_loss"], ft.early_stopping, self.early
                if e["best"] is None or vl < e["best"] - es.min_delta:
                    e.update(best=vl, best_step=step, bad=0)
                    improved = es.patience > 0
                else:
                    e["bad"] += 1
                    self.stop = bool(es.patience) and e["bad"] >= es.patience
            if row:
                logger.log(row)
            preempted = handler.should_stop()
            ci = job.checkpoint.interval
            if (ci and step % ci == 0) or step == st.end or improved or self.stop or preempted:
                self.last_ckpt, saved_at = self.save(engine, loader, topo, st, cfg), step
            if improved:
                if self.is_main:
                    info = {"step": step, "val_loss": self.early["best"]}
                    write_model_output(
                        self.last_ckpt, self.run_dir / "best", job, self.pad_id, info
                    )
                dist.barrier()
            if self.crash_at and step == self.crash_at:
                os._exit(17)
            if self.stop or preempted:
                if self.is_main:
                    why = (
                        "early stopping" if self.stop else "preempted; resume with the same command"
                    )
                    e = self.early
                    bar.write(
                        f"longtrain finetune: {why} at step {step}; best val_loss "
                        f"{e['best']} at step {e['best_step']}"
                    )
                self.stop, self.preempted = True, preempted
                break
        self.loader_state = loader.state_dict()
        if saved_at != self.step:
            self.last_ckpt = self.save(engine, loader, topo, st, cfg)
        engine.destroy()
        del engine, model
        gc.collect()


def run_finetune(job: JobConfig) -> int:
    """Run a whole fine-tuning job in this process (one rank of it)."""
    from tqdm import tqdm

    from longtrain.train.trainer import _quiet_deepspeed

    r = _Run(job)
    _quiet_deepspeed(r.rank)
    if r.is_main:
        save_resolved(job, r.run_dir)
    r.start()
    logger = MetricsLogger(
        r.run_dir,
        enabled=r.is_main,
        tensorboard=job.log.tensorboard,
        wandb_project=job.log.wandb_project if job.log.wandb else None,
        config=job.to_dict(),
        resume_step=r.step if r.resume_from is not None else None,
    )
    handler = r.ckpt.PreemptionHandler()
    handler.install()
    show = r.is_main and job.log.progress
    bar = tqdm(
        total=job.train.steps, initial=r.step, disable=not show, desc="finetune", unit="step"
    )
    try:
        while r.step < job.train.steps and not r.stop:
            r.run_stage(stage_at(r.stages, r.step), logger, bar, handler)
    finally:
        bar.close()
        logger.close()
    if r.is_main and r.last_ckpt is not None and not r.preempted:
        final = r.run_dir / "final"
        write_model_output(r.last_ckpt, final, job, r.pad_id, {"step": r.step})
        lora = " --merge-lora" if job.finetune.lora.rank else ""
        print(f"longtrain finetune: done at step {r.step}; model {final}", flush=True)
        print(
            f"longtrain finetune: export with `longtrain export-hf --checkpoint {final} --out OUT"
            f"{lora} --tokenizer TOKENIZER_DIR`",
            flush=True,
        )
    logger.plot()
    dist.barrier()
    return 0


def export_hook(args: argparse.Namespace) -> int | None:
    """``export-hf`` of fine-tuning outputs; None when the source is not one (plain export).

    Handles a model dir with ``head_config.json`` (classification), and a training checkpoint
    or run dir whose run had LoRA or a task head: it is first written as a model dir with
    its ``lora_config.json`` / ``head_config.json`` (what ``run_dir/final`` holds), then
    exported from there.
    """
    import tempfile

    from longtrain.model import hf
    from longtrain.model.heads import cli_export_hf, read_head_config

    src = Path(args.checkpoint)
    if (src / "model_config.json").is_file() and (src / "model.safetensors").is_file():
        return cli_export_hf(args) if read_head_config(src) else None
    from longtrain.train import checkpoint as ckpt

    try:
        path = ckpt.resolve_checkpoint(src)
        state = ckpt.read_client_state(path)
    except (LongtrainError, OSError, ValueError):
        return None
    job_dict = state.get("config") or {}
    ft = job_dict.get("finetune") or {}
    if not (ft.get("task") == "classify" or (ft.get("lora") or {}).get("rank")):
        return None
    job = load_job(None, [])
    job.finetune.task = ft.get("task", "lm")
    job.finetune.num_labels = int(ft.get("num_labels", 2))
    for k, v in (ft.get("lora") or {}).items():
        setattr(job.finetune.lora, k, v)
    pad = (state.get("finetune") or {}).get("pad_token_id")
    with tempfile.TemporaryDirectory(prefix="longtrain-export-") as tmp:
        out = Path(tmp) / "model"
        write_model_output(path, out, job, pad, {"step": state.get("step")})
        sub = argparse.Namespace(**{**vars(args), "checkpoint": str(out)})
        return cli_export_hf(sub) if job.finetune.task == "classify" else hf.cli_export_hf(sub)


def cli_finetune(args: argparse.Namespace) -> int:
    """``longtrain finetune --config FILE [overrides]``."""
    from longtrain.train.trainer import _quiet_errors_off_rank0

    def go(a: argparse.Namespace) -> int:
        return run_finetune(load_job(a.config, list(a.overrides or [])))

    return _quiet_errors_off_rank0(go, args)
