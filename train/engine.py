"""DeepSpeed engine: config built from the JobConfig, the model built sharded, the step's loss scaling.

No hand-edited DeepSpeed JSON: :func:`deepspeed_config` derives everything (ZeRO stage,
offload, precision, clipping, accumulation) from :class:`~longtrain.train.config.JobConfig`.

Loss normalisation. The step's loss is ``sum of token losses / N`` where ``N`` is the number of
unmasked tokens in the WHOLE step: every micro-batch on every DP x SP rank (all-reduced before
the first backward). DeepSpeed then (a) divides by ``grad_accum`` unless told not to, which we
do (``scale_wrt_gas=False``), and (b) sums gradients over all DP x SP ranks and divides by the
world size (it is not told about SP, see ``parallel.py``). So each rank back-propagates
``local_sum * world / N``: the reduced gradient is exactly ``d(sum over all tokens)/dw / N``,
independent of how the tokens were split across ranks, micro-batches or sequence shards.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtrain.model.attention import resolve_core_name
from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.model.heads import TransformerForClassification
from longtrain.model.lora import apply_lora
from longtrain.model.transformer import Transformer
from longtrain.train.config import JobConfig
from longtrain.train.offload import gather_mlp_once_zero3
from longtrain.train.parallel import Topology, parallelize, setup_accelerator_env


def compute_dtype(job: JobConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless parallel.dtype says otherwise."""
    if job.parallel.dtype == "fp32":
        return torch.float32
    if job.parallel.dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def deepspeed_config(job: JobConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for this job (also written to run_dir/deepspeed_config.json).

    A pure function of the job, the world size and the device kind: the planner reads the
    bucket sizes and offload settings from it instead of keeping copies.
    """
    t, p = job.train, job.parallel
    dtype = compute_dtype(job, device)
    on_gpu = device.type == "cuda"
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "contiguous_gradients": True,
        # Overlapping communication needs side streams; on CPU it only adds threads.
        "overlap_comm": on_gpu,
        "reduce_bucket_size": int(5e8) if on_gpu else int(5e7),
        "allgather_bucket_size": int(5e8) if on_gpu else int(5e7),
    }
    if p.zero_stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": int(1e5) if on_gpu else 0,
                "stage3_prefetch_bucket_size": int(5e7) if on_gpu else int(1e7),
                "stage3_max_live_parameters": int(1e9),
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed sees every rank as data parallel (SP is ours), so its "batch" counts each
        # SP rank's shard of a window as a sample; only its own bookkeeping uses this number.
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                # See deepspeed_adam(): torch's AdamW unless DeepSpeed's own op can be used
                # without failing at the first step.
                "torch_adam": not (on_gpu and deepspeed_adam(p.offload_optimizer)),
            },
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": on_gpu and p.offload_optimizer and deepspeed_adam(True),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        # Non-finite gradients must skip the update (NaN/Inf loss handling relies on it).
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # Summing gradients over micro-batches and over DP x SP ranks in bf16 loses bits as
        # accumulation and world size grow: both run in fp32 (the weights stay fp32 masters).
        # DeepSpeed supports the fp32 accumulation only through its ZeRO optimizers; without
        # ZeRO (stage 0) it accumulates in the model dtype and only the reduction is fp32.
        cfg["communication_data_type"] = "fp32"
        if p.zero_stage > 0:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def deepspeed_adam(offload_optimizer: bool) -> bool:
    """Whether a GPU run uses DeepSpeed's Adam (True) or torch's AdamW (False).

    Only a prebuilt op is ever used (``DS_BUILD_CPU_ADAM=1`` / ``DS_BUILD_FUSED_ADAM=1`` at
    ``pip install deepspeed``; ``ds_report`` lists them): a JIT build at the first step runs in
    every rank at once, inside collective timeouts, with ``-march=native`` into a shared
    ``~/.cache`` (SIGILL on a node with another CPU, a hang on a killed build's lock).
    DeepSpeed's CPU Adam (ZeRO-Offload: the optimizer step on the CPU) is several times faster
    than torch's AdamW there (Ren et al. 2021, section 5), so offloaded runs should prebuild it;
    its fused GPU Adam gains little over torch's foreach AdamW.
    """
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    return bool(installed_ops.get("cpu_adam" if offload_optimizer else "fused_adam"))


def lr_at(step: int, job: JobConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    t = job.train
    if t.warmup > 0 and step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    lo = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        span = max(1, t.steps - t.warmup)
        frac = min(1.0, (step - t.warmup) / span)
        return lo + 0.5 * (t.lr - lo) * (1 + math.cos(math.pi * frac))
    # wsd: stable at lr, then a linear decay over the last decay_fraction of the steps.
    decay_start = int(t.steps * (1 - t.decay_fraction))
    if step < decay_start:
        return t.lr
    frac = min(1.0, (step - decay_start) / max(1, t.steps - decay_start))
    return t.lr + (lo - t.lr) * frac


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (projections, embeddings), none on norms."""
    decay, no_decay = [], []
    for _, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        # ZeRO-3 partitions params to 1-D; ds_shape keeps the real shape.
        shape = getattr(prm, "ds_shape", prm.shape)
        (decay if len(shape) >= 2 else no_decay).append(prm)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def init_sharded(model: nn.Module, seed: int) -> None:
    """Initialise a ZeRO-3-partitioned model one unit at a time, identical to init_weights().

    The units and their order come from the model (``Transformer.init_units``); only one unit
    is ever gathered, so a model that does not fit on one rank can still be initialised. Rank
    0 draws the values and ``GatheredParameters(modifier_rank=0)`` scatters them back into
    the shards. tests/test_train_parallel.py checks the result against ``init_weights``.
    """
    import deepspeed

    rank0 = dist.get_rank() == 0
    torch.manual_seed(seed)
    for params, fill in model.init_units():
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank0:
                fill()
    model.rope.reset_parameters()


@torch.no_grad()
def load_weights(model: nn.Module, state: dict[str, torch.Tensor], zero3: bool) -> None:
    """Copy ``state`` into the (possibly ZeRO-3 partitioned) parameters; missing keys keep
    their initialisation. Under ZeRO-3 only rank 0 needs the tensors (it scatters them)."""
    import deepspeed

    rank0 = dist.get_rank() == 0
    names = dict(model.named_parameters())
    if rank0 or not zero3:
        unknown = sorted(set(state) - set(names))
        if unknown:
            raise LongtrainError(f"model.init: weights {unknown[:3]} do not exist in this model")
    for name, prm in names.items():
        if zero3:
            with deepspeed.zero.GatheredParameters([prm], modifier_rank=0):
                if rank0 and name in state:
                    prm.copy_(state[name])
        elif name in state:
            prm.copy_(state[name])


def construct(job: JobConfig, cfg: ModelConfig, attention: str) -> nn.Module:
    """The plain single-device model of the job's task (language model or classifier)."""
    if job.finetune.task == "classify":
        return TransformerForClassification(cfg, job.finetune.num_labels, attention=attention)
    return Transformer(cfg, attention=attention)


def build_model(
    job: JobConfig,
    cfg: ModelConfig,
    topo: Topology,
    ds_config: dict[str, Any],
    device: torch.device,
    init_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The one model builder: never whole on one rank under ZeRO-3, then parallelized.

    ZeRO 0-2: built on ``meta``, materialised on the device, ``init_weights()`` with the job's
    seed (every rank draws the same values; DeepSpeed also broadcasts rank 0's).
    ZeRO-3: built inside ``deepspeed.zero.Init`` so each parameter is partitioned over all
    DP x SP ranks as soon as it is created, then initialised unit by unit.
    Then, in order: the initial weights (``init_state``, fine-tuning's ``model.init``), LoRA
    adapters (only they and a task head train), and :func:`parallelize`.
    """
    setup_accelerator_env()
    import deepspeed

    # Resolve "auto" before zero.Init: probing cores imports torch._dynamo, which breaks while
    # zero.Init has patched tensor constructors.
    core = resolve_core_name(job.model.attention)
    zero3 = job.parallel.zero_stage == 3
    if zero3:
        remote = "cpu" if job.parallel.offload_params else None
        with deepspeed.zero.Init(
            data_parallel_group=topo.world_group,
            config_dict_or_path=ds_config,
            remote_device=remote,
            # dtype stays None: DeepSpeed then takes it from the config (bf16 or fp32). An
            # explicit dtype is ignored on accelerators without fp16 (CPU), which get bf16.
        ):
            model = construct(job, cfg, core)
        init_sharded(model, job.seed)
    else:
        with torch.device("meta"):
            model = construct(job, cfg, core)
        model.to_empty(device=device)
        torch.manual_seed(job.seed)
        model.init_weights()
    if init_state is not None:
        load_weights(model, init_state, zero3)
    lora = job.finetune.lora
    if lora.rank:
        torch.manual_seed(job.seed + 1)  # the same adapters on every rank
        apply_lora(model, lora)
        if isinstance(model, TransformerForClassification):
            model.score.weight.requires_grad_(True)
    if zero3 and job.train.mlp_chunk_size:
        # The tiled MLP calls its projections without their module hooks: ZeRO-3 gathers
        # them once per MLP forward/backward instead (after LoRA added its adapters).
        gather_mlp_once_zero3(model)
    if zero3 and model.output is not None:
        # The LM head weight is used by the top-level forward (chunked loss), outside the
        # module that owns it; ZeRO-3 must gather it for that forward and its backward.
        deepspeed.zero.register_external_parameter(model, model.head_weight)
    return parallelize(model, topo, job)


def initialize_engine(
    job: JobConfig, model: nn.Module, topo: Topology, ds_config: dict[str, Any]
) -> Any:
    """``deepspeed.initialize`` over all DP x SP ranks; checks DeepSpeed's gradient divisor."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, job.train.weight_decay),
        config=ds_config,
    )
    if grad_divisor(engine) != topo.world_size:
        raise LongtrainError(
            f"DeepSpeed averages gradients over {grad_divisor(engine)} ranks, expected the world "
            f"size {topo.world_size}; this DeepSpeed version sets up data parallelism differently"
        )
    return engine


def grad_divisor(engine: Any) -> float:
    """What DeepSpeed divides the summed gradients by: the data-parallel size it sees (world)."""
    return float(engine.dp_world_size)


def set_lr(engine: Any, lr: float) -> None:
    """Set the learning rate of every param group (the schedule is a pure function of the step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def count_tokens(batches: list[dict[str, Any]]) -> int:
    """Unmasked target tokens (labels != -100) in this rank's micro-batches."""
    return int(sum(int((b["labels"] != -100).sum()) for b in batches))


class Prefetcher:
    """Reads a loader's next micro-batches in a background thread, pinned on CUDA.

    Packing windows is numpy work that releases the GIL, so it overlaps the step; pinned
    host memory lets ``to_device``'s ``non_blocking`` copies run asynchronously. The order is
    the loader's own, and :meth:`state_dict` is the loader's state after the last batch
    *consumed*, not the last one read ahead, so checkpoints are exactly as without it.
    Wrap a loader after its state is loaded.
    """

    def __init__(self, loader: Any, depth: int = 2, pin: bool = False) -> None:
        self.loader, self.pin = loader, pin
        self.source_names = getattr(loader, "source_names", None)
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="longtrain-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.loader)
                if self.pin:
                    batch = {
                        k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()
                    }
                item: tuple[str, Any] = ("batch", (batch, self.loader.state_dict()))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # raised in the consumer, where it can be reported
            self._queue.put(("error", e))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, Any]:
        kind, item = self._queue.get()
        if kind == "error":
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's state after the last batch handed out."""
        return self._state

    def close(self) -> None:
        """Stop reading ahead (the batches read ahead are dropped, never counted)."""
        self._stop.set()
        self._thread.join(timeout=5)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a loader batch to the device; ints stay ints."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
    }


def forward_loss(engine: Any, batch: dict[str, Any], chunk_size: int) -> torch.Tensor:
    """This rank's summed token loss for one micro-batch (fp32 scalar, differentiable)."""
    loss_sum, _ = engine(
        input_ids=batch["input_ids"],
        labels=batch["labels"],
        position_ids=batch.get("position_ids"),
        cu_seqlens=batch.get("cu_seqlens"),
        max_seqlen=batch.get("max_seqlen"),
        chunk_size=chunk_size,
    )
    return loss_sum.float()


def zero_stage0_grads(engine: Any) -> None:
    """Make a ZeRO-0 step a no-op for the weights (its optimizer has no overflow check)."""
    for prm in engine.module.parameters():
        if prm.grad is not None:
            prm.grad.zero_()
    set_lr(engine, 0.0)


def grad_norm_stage0(engine: Any) -> float:
    """Global L2 norm of the (already reduced, unclipped) gradients under ZeRO-0."""
    sq = sum(
        float(p.grad.detach().float().pow(2).sum())
        for p in engine.module.parameters()
        if p.grad is not None
    )
    return math.sqrt(sq)
