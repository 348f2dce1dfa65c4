"""Process groups (data parallel x sequence parallel) and Ulysses sequence parallelism.

The world is laid out as ``DP x SP`` with the SP groups made of consecutive ranks, so that a
group shares a node (its all-to-alls are the heaviest traffic) and torchrun's rank order maps
onto it directly: rank ``r`` has ``sp_rank = r % sp`` and ``dp_rank = r // sp``.

:class:`Topology` is deliberately NOT handed to DeepSpeed as an ``mpu``. DeepSpeed 0.19.8
divides sequence-parallel gradients inconsistently: its ZeRO-1/2 and ZeRO-3 contiguous-bucket
paths divide the DP x SP sum by ``world / sp``, but the ZeRO-3 reduce-scatter path (the default,
and the only one for parameters larger than a bucket) divides by ``world`` (measured with an
mpu while building this: SP=2 ZeRO-3 gradients came out exactly half, while the losses still
matched SP=1 because Adam hides a uniform gradient scale -- which is why
tests/test_train_parallel.py compares gradient norms and gradients too). Without an mpu every
path is plain data parallelism over all DP x SP ranks -- reduce over the world, divide by the
world size -- which is what we want for ZeRO sharding anyway, and the trainer's loss scaling
compensates for that single, well-tested divisor (see ``engine.py``).

Ulysses: each block's attention ``core`` is wrapped in DeepSpeed's ``DistributedAttention``,
which turns ``(B, T/sp, H, D)`` shards into ``(B, T, H/sp, D)`` with one all-to-all, runs the
local core over the WHOLE window (so the window's ``cu_seqlens`` stay valid), and turns the
output back. When a model has fewer K/V heads than ``sp`` (8 KV heads at SP=16), K and V are
replicated up to ``sp`` heads before the exchange instead of refusing the job.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtrain.model.errors import LongtrainError
from longtrain.model.tiled import apply_tiled_mlp
from longtrain.train.offload import ActivationOffload, apply_activation_offload, checkpointed_blocks


def setup_accelerator_env() -> str:
    """Pick the device kind and make DeepSpeed agree with it; call before importing deepspeed.

    DeepSpeed chooses its accelerator at import time. On a machine without CUDA it would try
    other backends and fail, so ``DS_ACCELERATOR=cpu`` is set unless the user chose one.
    """
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, deepspeed, srun)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        return rank, world, local
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun without torchrun: one task per GPU.
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Create the default process group (NCCL on GPU, gloo on CPU); returns (rank, world, local).

    A single process without a launcher still gets a one-rank group, so the same code path
    (DeepSpeed, collectives) runs everywhere.
    """
    rank, world, local = env_world()
    device = setup_accelerator_env()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LongtrainError(
                f"{var} is not set for a {world}-rank job; launch with torchrun, the deepspeed "
                "launcher, or launch/slurm/pretrain.sbatch"
            )
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    if device == "cuda":
        torch.cuda.set_device(local % torch.cuda.device_count())
    backend = "nccl" if device == "cuda" else "gloo"
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return dist.get_rank(), dist.get_world_size(), local


@dataclass
class Topology:
    """This rank's place in DP x SP and the groups it belongs to."""

    rank: int
    """Global rank."""
    world_size: int
    """All ranks (DP x SP)."""
    sp: int
    """Sequence-parallel degree."""
    dp: int
    """Data-parallel degree (world_size // sp)."""
    sp_rank: int
    """Position inside the SP group: which slice [s*T/sp, (s+1)*T/sp) of each window."""
    dp_rank: int
    """Which data-parallel replica: which block of windows of the global order."""
    sp_group: Any
    """Process group of the sp consecutive ranks sharing windows."""
    dp_group: Any
    """Process group of the ranks with the same sp_rank."""
    world_group: Any
    """All ranks: ZeRO sharding, gradient reduction, and the global token count."""


def build_topology(sp: int) -> Topology:
    """Create the DP x SP groups on the initialised default group (every rank must call this)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp != 0:
        raise LongtrainError(f"parallel.sp={sp} does not divide the world size {world}")
    dp = world // sp
    sp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for d in range(dp):
        g = dist.new_group(list(range(d * sp, (d + 1) * sp)))
        if rank // sp == d:
            sp_group = g
    for s in range(sp):
        g = dist.new_group(list(range(s, world, sp)))
        if rank % sp == s:
            dp_group = g
    return Topology(
        rank=rank,
        world_size=world,
        sp=sp,
        dp=dp,
        sp_rank=rank % sp,
        dp_rank=rank // sp,
        sp_group=sp_group,
        dp_group=dp_group,
        world_group=dist.group.WORLD,
    )


def sp_layout_problem(n_heads: int, n_kv_heads: int, sp: int) -> str | None:
    """What stops ``sp``-way Ulysses on a model with these heads, or None when it can run.

    The one statement of the rule (config validation, eval, the planner and the wrapper all
    ask here): the query heads split evenly over the SP ranks, and so do the K/V heads, which
    are replicated up to ``sp`` when there are fewer of them.
    """
    if n_heads % sp:
        return (
            f"does not divide the model's n_heads={n_heads}; pick sp from the divisors of {n_heads}"
        )
    return _kv_problem(n_kv_heads, sp)


def _kv_problem(n_kv_heads: int, sp: int) -> str | None:
    if n_kv_heads < sp and sp % n_kv_heads:
        return (
            f"is not a multiple of n_kv_heads={n_kv_heads}: K/V heads are replicated up to sp, "
            "which needs sp to be a multiple of n_kv_heads; pick such an sp"
        )
    if n_kv_heads >= sp and n_kv_heads % sp:
        return f"does not divide n_kv_heads={n_kv_heads}; pick sp dividing {n_kv_heads}"
    return None


def kv_replication(n_kv_heads: int, sp: int) -> int:
    """How many times each K/V head is repeated so that every SP rank gets at least one."""
    problem = _kv_problem(n_kv_heads, sp)
    if problem:
        raise LongtrainError(f"parallel.sp={sp} {problem}")
    return 1 if n_kv_heads >= sp else sp // n_kv_heads


class UlyssesAttention(nn.Module):
    """A model attention core run under Ulysses SP: same contract as the core it wraps.

    In: q (B, T/sp, Hq, D), k/v (B, T/sp, Hkv, D) -- this rank's slice of the window.
    Out: (B, T/sp, Hq, D). Inside, the wrapped core sees (B, T, Hq/sp, D), the whole window for
    a slice of the heads, with the window's ``cu_seqlens``/``max_seqlen`` (global offsets).
    """

    def __init__(self, core: nn.Module, sp_group: Any, sp: int, n_kv_heads: int) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.kv_repeat = kv_replication(n_kv_heads, sp)
        # scatter heads (dim 2), gather sequence (dim 1) for batch-first (B, T, H, D) tensors.
        self.dist_attn = DistributedAttention(core, sp_group, scatter_idx=2, gather_idx=1)

    @property
    def core(self) -> nn.Module:
        """The wrapped single-device core."""
        return self.dist_attn.local_attn

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        if self.kv_repeat > 1:
            # Each K/V head is repeated next to itself, so query head i still maps to (a copy
            # of) its own K/V head i // (Hq/Hkv) after heads are split into contiguous chunks.
            k = k.repeat_interleave(self.kv_repeat, dim=2)  # (B, T/sp, Hkv*r, D)
            v = v.repeat_interleave(self.kv_repeat, dim=2)  # (B, T/sp, Hkv*r, D)
        return self.dist_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            0,  # batch_dim_idx
            None,  # rotary_pos_emb: RoPE is applied by the model before the core
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )


def apply_ulysses(model: nn.Module, topo: Topology, n_kv_heads: int) -> int:
    """Wrap every block's ``attention.core`` for sequence parallelism; returns blocks wrapped."""
    if topo.sp == 1:
        return 0
    n = 0
    for block in model.layers:
        core = block.attention.core
        if isinstance(core, UlyssesAttention):
            continue
        block.attention.core = UlyssesAttention(core, topo.sp_group, topo.sp, n_kv_heads)
        n += 1
    return n


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Recompute blocks in backward: ``full`` every block, ``selective`` every other block.

    The block's ``forward`` is replaced on the instance, so parameter names (and therefore
    checkpoints and HF export) are unchanged. Non-reentrant checkpointing is what ZeRO-3's
    parameter-gathering hooks support.
    """
    n = 0
    for i in checkpointed_blocks(len(model.layers), mode):
        block = model.layers[i]
        inner = block.forward

        def ckpt_forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = ckpt_forward
        n += 1
    return n


def parallelize(model: nn.Module, topo: Topology, job: Any | None) -> nn.Module:
    """Apply parallelism to a plain single-device model: the only sequence of ``apply_*`` calls.

    In order: sequence parallelism wraps each block's attention core (the model's math is
    untouched); the MLP is tiled along the sequence (``train.mlp_chunk_size``); activation
    checkpointing wraps each block's forward (so a recompute replays the all-to-alls and the
    tiles too); the checkpointed block inputs are routed to host memory
    (``parallel.offload_activations``; the offloader is kept as ``model.activation_offload``
    for its byte counters). ``job=None`` is evaluation: sequence parallelism only.
    Returns the same module, changed in place.
    """
    apply_ulysses(model, topo, model.cfg.n_kv_heads)
    if job is None:
        return model
    mode = job.parallel.activation_checkpointing
    apply_tiled_mlp(model, job.train.mlp_chunk_size)
    apply_activation_checkpointing(model, mode)
    if job.parallel.offload_activations:
        device = next(model.parameters()).device
        model.activation_offload = ActivationOffload(device)
        apply_activation_offload(model, model.activation_offload, mode)
    return model


def all_reduce_sum(values: list[float], device: torch.device, group: Any = None) -> list[float]:
    """Sum a few Python numbers over a group in one collective (float64 keeps token counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [float(x) for x in t.tolist()]


def all_max(values: list[float], device: torch.device, group: Any = None) -> list[float]:
    """The maximum of a few Python numbers over a group, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(x) for x in t.tolist()]
