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

Hybrid SP (``parallel.ring``, USP's layout): ``sp = ulysses x ring``. SP rank ``s`` has
``ulysses_rank = s % ulysses`` and ``ring_rank = s // ulysses``: the Ulysses groups are
consecutive ranks (their all-to-alls stay inside a node), the ring groups stride across them
(one point-to-point hop per ring step). The loader gives ring rank ``r`` the zigzag chunks ``r``
and ``2R-1-r`` of each window, split into ``ulysses`` contiguous pieces
(``longtrain.data.loader.sp_shard_indices``); the Ulysses all-to-all gathers a ring rank's
whole portion for ``H / ulysses`` heads, and ring attention (``longtrain.train.ring``) runs
over the ring group inside it: ``UlyssesAttention(RingAttention(kernel))``. Only the Ulysses
degree has to divide the heads, so SP may exceed the head count. ``ring=1`` is plain Ulysses,
with exactly the groups and token layout of before.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtrain.model.attention import Documents
from longtrain.model.errors import LongtrainError
from longtrain.model.tiled import apply_tiled_mlp
from longtrain.train.offload import ActivationOffload, apply_activation_offload, checkpointed_blocks
from longtrain.train.ring import RingAttention

logger = logging.getLogger(__name__)


def setup_accelerator_env() -> str:
    """Pick the device kind and make DeepSpeed agree with it; call before importing deepspeed.

    DeepSpeed chooses its accelerator at import time. On a machine without CUDA it would try
    other backends and fail, so ``DS_ACCELERATOR=cpu`` is set unless the user chose one.
    """
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


STALE_LOCK_S = 600.0
"""A torch-extensions build lock older than this, with no process building in its directory,
was left by a killed build (torch's FileBaton then waits for it forever)."""


def extension_build_dir() -> Path:
    """Where torch JIT-builds C++ extensions (``TORCH_EXTENSIONS_DIR``, else ~/.cache)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("_", verbose=False)).parent


def _building_in(directory: Path) -> bool:
    """Whether some live process works inside ``directory`` (a compiler, ninja, a loader)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).resolve() == directory.resolve():
                return True
        except OSError:
            continue
    return False


def check_stale_build_locks(root: Path | None = None, max_age_s: float = STALE_LOCK_S) -> None:
    """Refuse to start while a killed extension build's lock would hang DeepSpeed's loader.

    torch's ``FileBaton`` waits without a timeout for ``<build dir>/lock``; a build killed
    mid-way (a timeout, a preemption) leaves it behind and every later op load hangs. A lock
    older than ``max_age_s`` with no live process in its directory is reported with its path.
    """
    root = root if root is not None else extension_build_dir()
    if not root.is_dir():
        return
    now = time.time()
    for lock in root.glob("*/lock"):
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            continue
        if age > max_age_s and not _building_in(lock.parent):
            raise LongtrainError(
                f"{lock}: a torch-extensions build lock left by a killed build "
                f"({age / 60:.0f} min old, no process is building there); loading the op would "
                f"wait forever: remove it (rm {lock}) and start again"
            )


def avoid_jit_ops() -> None:
    """Never let DeepSpeed JIT-compile an op implicitly: use an op only when it is prebuilt.

    On a CPU accelerator DeepSpeed builds its shared-memory all-reduce (``deepspeed_shm_comm``)
    the first time ``deepspeed.init_distributed`` runs, in every rank at once, inside the
    launcher's timeouts; a build killed there leaves a lock that hangs every later run. Marked
    incompatible unless prebuilt (``DS_BUILD_SHM_COMM=1 pip install deepspeed``), DeepSpeed
    falls back to plain torch.distributed (gloo), which is what CPU runs here need.
    """
    import deepspeed
    from deepspeed.git_version_info import installed_ops

    ops = deepspeed.ops.__compatible_ops__
    for name in ("deepspeed_shm_comm", "deepspeed_ccl_comm"):
        if name in ops and not installed_ops.get(name, False):
            ops[name] = False


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
    check_stale_build_locks()
    import deepspeed

    avoid_jit_ops()

    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return dist.get_rank(), dist.get_world_size(), local


@dataclass
class Topology:
    """This rank's place in DP x SP (SP = Ulysses x ring) and the groups it belongs to."""

    rank: int
    """Global rank."""
    world_size: int
    """All ranks (DP x SP)."""
    sp: int
    """Sequence-parallel degree (Ulysses x ring)."""
    dp: int
    """Data-parallel degree (world_size // sp)."""
    sp_rank: int
    """Position inside the SP group: which shard of each window
    (``longtrain.data.loader.sp_shard_indices``; ``[s*T/sp, (s+1)*T/sp)`` when ring=1)."""
    dp_rank: int
    """Which data-parallel replica: which block of windows of the global order."""
    sp_group: Any
    """Process group of the sp consecutive ranks sharing windows."""
    dp_group: Any
    """Process group of the ranks with the same sp_rank."""
    world_group: Any
    """All ranks: ZeRO sharding, gradient reduction, and the global token count."""
    ring: int = 1
    """Ring degree inside the SP group."""
    ring_rank: int = 0
    """Position in the ring group: sp_rank // ulysses."""
    ring_group: Any = None
    """The ring ranks of this rank's SP group with its ulysses_rank (stride ulysses)."""
    ulysses: int = 0
    """Ulysses degree sp // ring (0 = fill in: sp // ring)."""
    ulysses_rank: int = -1
    """Position in the Ulysses group: sp_rank % ulysses (-1 = fill in)."""
    ulysses_group: Any = None
    """The ulysses consecutive ranks of this ring rank (None = sp_group when ring == 1)."""

    def __post_init__(self) -> None:
        # Positional construction with the first nine fields (tests, single-process runs) is
        # plain Ulysses: fill the hybrid fields in from them.
        if not self.ulysses:
            self.ulysses = self.sp // self.ring
        if self.ulysses_rank < 0:
            self.ulysses_rank = self.sp_rank % self.ulysses
        if self.ulysses_group is None and self.ring == 1:
            self.ulysses_group = self.sp_group


def build_topology(sp: int, ring: int = 1) -> Topology:
    """Create the DP x SP groups, and the Ulysses and ring groups inside SP, on the initialised
    default group (every rank must call this, with the same arguments)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp != 0:
        raise LongtrainError(f"parallel.sp={sp} does not divide the world size {world}")
    if ring < 1 or sp % ring:
        raise LongtrainError(f"parallel.ring={ring} must divide parallel.sp={sp}")
    dp = world // sp
    u = sp // ring
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
    sp_rank = rank % sp
    ulysses_group, ring_group = (sp_group if ring == 1 else None), (sp_group if u == 1 else None)
    if ring > 1 and u > 1:
        for d in range(dp):
            for r in range(ring):  # Ulysses: u consecutive ranks
                g = dist.new_group([d * sp + r * u + j for j in range(u)])
                if rank // sp == d and sp_rank // u == r:
                    ulysses_group = g
            for j in range(u):  # ring: the same ulysses_rank in each Ulysses group
                g = dist.new_group([d * sp + r * u + j for r in range(ring)])
                if rank // sp == d and sp_rank % u == j:
                    ring_group = g
    return Topology(
        rank=rank,
        world_size=world,
        sp=sp,
        dp=dp,
        sp_rank=sp_rank,
        dp_rank=rank // sp,
        sp_group=sp_group,
        dp_group=dp_group,
        world_group=dist.group.WORLD,
        ring=ring,
        ring_rank=sp_rank // u,
        ring_group=ring_group,
        ulysses=u,
        ulysses_rank=sp_rank % u,
        ulysses_group=ulysses_group,
    )


def sp_layout_problem(n_heads: int, n_kv_heads: int, sp: int, ring: int = 1) -> str | None:
    """What stops ``sp``-way sequence parallelism with ``ring`` ring ranks on a model with
    these heads, or None when it can run.

    The one statement of the rule (config validation, eval, the planner and the wrapper all
    ask here): the query heads split evenly over the ``sp / ring`` Ulysses ranks, and so do
    the K/V heads, which are replicated up to the Ulysses degree when there are fewer of
    them. The ring splits the sequence, not the heads, so ``sp`` may exceed the head count.
    """
    if ring < 1 or sp % ring:
        return f"is not a multiple of parallel.ring={ring}; pick a ring degree dividing sp"
    u = sp // ring
    name = "sp" if ring == 1 else "sp/ring"
    lead = "" if ring == 1 else f"with parallel.ring={ring}: the Ulysses degree sp/ring={u} "
    if n_heads % u:
        return (
            f"{lead}does not divide the model's n_heads={n_heads}; pick {name} from the "
            f"divisors of {n_heads}" + ("" if ring == 1 else " (a larger ring degree)")
        )
    problem = _kv_problem(n_kv_heads, u, name)
    return None if problem is None else lead + problem


def _kv_problem(n_kv_heads: int, sp: int, name: str = "sp") -> str | None:
    if n_kv_heads < sp and sp % n_kv_heads:
        return (
            f"is not a multiple of n_kv_heads={n_kv_heads}: K/V heads are replicated up to "
            f"{name}, which needs {name} to be a multiple of n_kv_heads; pick such an {name}"
        )
    if n_kv_heads >= sp and n_kv_heads % sp:
        return f"does not divide n_kv_heads={n_kv_heads}; pick {name} dividing {n_kv_heads}"
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
    Under hybrid SP, ``sp`` here is the Ulysses degree, ``T`` the ring rank's portion (L/ring
    tokens) and the wrapped core a :class:`~longtrain.train.ring.RingAttention`.
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


def apply_ring(model: nn.Module, topo: Topology) -> int:
    """Run every block's ``attention.core`` as ring attention over ``topo.ring_group``
    (before :func:`apply_ulysses`, which wraps the result); returns blocks changed.

    The ring computes with the block kernel matching the model's core (flash-attn's varlen
    kernel for ``flash``, PyTorch's for ``torch_varlen``, plain PyTorch math otherwise).
    """
    if topo.ring == 1:
        return 0
    n = 0
    name = getattr(model, "attention_core", "sdpa")
    for block in model.layers:
        core = block.attention.core
        if isinstance(core, (RingAttention, UlyssesAttention)):
            continue
        block.attention.core = RingAttention(core, topo.ring_group, topo.ring, topo.ring_rank, name)
        n += 1
    if n:
        # The kernel is chosen once, from the core's name, and said (a GPU kernel that could
        # not load names its reason).
        logger.info("ring attention x%d: %s", topo.ring, block.attention.core.kernel_reason)
    return n


def apply_ulysses(model: nn.Module, topo: Topology, n_kv_heads: int) -> int:
    """Wrap every block's ``attention.core`` for Ulysses over ``topo.ulysses_group``; returns
    blocks wrapped (none at ulysses degree 1, i.e. plain ring or no SP)."""
    if topo.ulysses == 1:
        return 0
    n = 0
    for block in model.layers:
        core = block.attention.core
        if isinstance(core, UlyssesAttention):
            continue
        block.attention.core = UlyssesAttention(core, topo.ulysses_group, topo.ulysses, n_kv_heads)
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


def _input_requires_grad(block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: a block input that needs no gradient is handed over as one that does
    (a detached alias), so that a ZeRO-3 leaf's gradient hook fires after the block's backward."""
    x = args[0] if args else None
    if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.requires_grad:
        return None
    return (x.detach().requires_grad_(True), *args[1:])


def apply_compile(model: nn.Module, enabled: bool = True, zero3: bool = False) -> int:
    """``torch.compile`` each block's own forward, one block at a time (``model.compile``);
    returns the number of blocks compiled (0 when not ``enabled``).

    Per block, as torchtitan's ``apply_compile``: the blocks run the same code, so the graphs
    compiled for the first one serve them all (parameters are graph inputs, not constants)
    and compiling costs one block, not the model. Compiled: the norms, projections, RoPE, the
    MLP (tiled or not, LoRA adapters included) and the residual adds, where the time between
    the matmuls goes. Not compiled:

    - the attention core (``torch.compiler.disable``): a block compiles to the graphs before
      and after it (four with torch 2.13, whose graph break inside the inlined
      ``Attention.forward`` cuts ``Block.forward`` at that call too: the attention norm, the
      projections and RoPE, the output projection, the MLP half). The cores are one fused
      kernel already; ``sdpa`` loops over the window's
      documents in Python, whose number and lengths change with every batch (traced, each
      layout would be a new graph); a Ulysses core's all-to-alls stay out of the graphs too.
      A :class:`~longtrain.model.attention.Documents` carries its own ``max_seqlen``, so the
      redundant int is not passed into the graph, where a new value would recompile it.
    - evaluation: the compiled forward runs only while autograd records (training steps and
      their recompute); under ``torch.no_grad`` the eager forward runs, so validation and
      long-context evaluation compile no inference graphs of their own.

    ZeRO-3 (``zero3``): DeepSpeed hooks every submodule to gather its weights, and inside a
    compiled block those hooks would break the graph at every projection (dynamo then compiles
    DeepSpeed's hook code itself, once per module type, until its recompile limit). So each
    block becomes a ZeRO-3 leaf (``set_z3_leaf_module``): it gathers all its weights when it
    starts, for its forward and again for its backward (one block's weights live at a time
    instead of one projection's), and holds no hooks inside, so its graphs run whole. A
    leaf's gradients are reduced by a hook on the block that fires when
    the gradient of the block's input is ready; the first block's input needs none when the
    embedding is frozen (LoRA), so a pre-hook hands it over as one that does.

    Call it BEFORE :func:`apply_activation_checkpointing`: the checkpoint then wraps the
    compiled forward, and its recompute replays the same graphs. torchtitan's order (compile
    over the checkpoint) needs a block without graph breaks: dynamo cannot trace a checkpoint
    region that holds one and then compiles nothing at all (measured, torch 2.13). Parameter
    names are unchanged (the instance's ``forward`` is replaced, as checkpointing does), so
    checkpoints of compiled and eager runs are interchangeable and export never compiles.
    """
    if not enabled:
        return 0
    if zero3:
        from deepspeed.utils import set_z3_leaf_module
    n = 0
    for block in model.layers:
        if zero3:
            set_z3_leaf_module(block, True)
            # Registered before deepspeed.initialize, so it runs before DeepSpeed's own
            # pre-hooks, which attach the gradient bookkeeping to the inputs they are given.
            block.register_forward_pre_hook(_input_requires_grad)
        core = block.attention.core
        core.forward = torch.compiler.disable(core.forward)
        eager = block.forward
        compiled = torch.compile(eager)

        def forward(
            *args: Any, _eager: Any = eager, _compiled: Any = compiled, **kwargs: Any
        ) -> Any:
            if not torch.is_grad_enabled():
                return _eager(*args, **kwargs)
            if isinstance(kwargs.get("cu_seqlens"), Documents):
                kwargs["max_seqlen"] = None
            return _compiled(*args, **kwargs)

        block.forward = forward
        n += 1
    return n


def compile_seconds() -> float | None:
    """Seconds ``torch.compile`` has spent in this process (dynamo and inductor, forward and
    backward graphs), or None when this torch does not report it (a private counter)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent()["total_wall_time"])
    except Exception:  # the counter moved in another torch release: the run goes on unlogged
        return None


def parallelize(model: nn.Module, topo: Topology, job: Any | None) -> nn.Module:
    """Apply parallelism to a plain single-device model: the only sequence of ``apply_*`` calls.

    In order: sequence parallelism wraps each block's attention core (the model's math is
    untouched): ring attention inside, Ulysses around it; the MLP is tiled along the
    sequence (``train.mlp_chunk_size``); each block's forward is compiled (``model.compile``, the core left eager); activation checkpointing
    wraps each block's forward (so a recompute replays the all-to-alls and the
    tiles too); the checkpointed block inputs are routed to host memory
    (``parallel.offload_activations``; the offloader is kept as ``model.activation_offload``
    for its byte counters). ``job=None`` is evaluation: sequence parallelism only.
    Returns the same module, changed in place.
    """
    apply_ring(model, topo)
    apply_ulysses(model, topo, model.cfg.n_kv_heads)
    if job is None:
        return model
    mode = job.parallel.activation_checkpointing
    apply_tiled_mlp(model, job.train.mlp_chunk_size)
    apply_compile(model, job.model.compile, zero3=job.parallel.zero_stage == 3)  # before AC
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
