"""``longtrain plan``: per-GPU memory, step time and MFU of a job before anyone books a cluster.

Everything here is arithmetic on the model shape and the parallel layout; nothing is allocated.
``bench/bench_plan.py`` checks the memory model against measured peaks of real CPU runs.

Notation (per micro-step): ``N`` parameters, ``L`` layers, ``h`` model dim, ``f`` FFN dim,
``Hq``/``Hkv`` query/KV heads of size ``d``, ``V`` vocabulary, ``s`` the full window (seq_len),
``b`` micro batch, ``P`` the sequence-parallel (Ulysses) degree, ``W`` GPUs, ``D = W / P`` the
data-parallel degree, ``t = b * s / P`` tokens held by one GPU, ``a`` bytes per activation
element (2 for bf16, 4 for fp32), ``c`` the loss chunk in tokens.

1. Model states (Rajbhandari et al. 2020, "ZeRO", section 3 and 5.1, with ``K = 12``):
   ``2N`` bf16 parameters, ``2N`` bf16 gradients and ``12N`` fp32 optimizer state (master
   weights, Adam m and v). ZeRO partitions over every rank of the DP x SP group (DeepSpeed
   reduces gradients over the sequence-data-parallel group, so ``W`` ranks share the shards):
   stage 1 shards the 12N, stage 2 also the gradients, stage 3 also the parameters.
   ``offload_optimizer`` moves the optimizer shard (and, for stage 2/3, the fp32 gradient
   partition DeepSpeed builds for the CPU step) to host memory. In fp32 (CPU runs) parameters
   and gradients take 4 bytes; DeepSpeed's ZeRO optimizers still keep a separate fp32 master
   partition (stage >= 1), plain stage 0 does not.
2. Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
   Transformer Models", section 4.1: ``sbh(34 + 5as/h)`` bytes at 16 bits for GPT with
   dropout). Re-derived for this model (RMSNorm, RoPE, GQA, SwiGLU, no dropout) by listing the
   tensors autograd keeps, and adapted to flash/varlen attention, which keeps only q, k, v,
   the output and a log-sum-exp per head instead of the ``5as/h`` score, softmax and dropout
   tensors. Per local token and layer:
   ``a * (4h + Hq*d + 2*Hkv'*d + Hq*d + 4f) + 4 * (Hq + 2)`` bytes, where the ``4h`` are the
   two norms' inputs and outputs, ``Hkv' = max(Hkv, P)`` (K/V heads replicated up to P under
   SP), ``4f`` are SwiGLU's w1 and w3 outputs, the SiLU output and the product feeding w2, and
   the fp32 tail is the log-sum-exp and the two norms' reciprocal RMS. Ulysses does not change
   the per-GPU count (the core holds all ``s`` tokens for ``Hq/P`` heads: the same bytes as
   ``s/P`` tokens for all heads). ``tests/test_plan.py`` checks this list against the bytes
   autograd actually saves for one block of our Transformer.
   Checkpointing policies: ``none`` keeps every layer; ``full`` keeps each layer's input
   (``a*h`` per token) and recomputes one layer at a time in the backward, so one layer's
   activations plus its gradient temporaries are live on top; ``selective`` keeps the matmul
   outputs (q, k, v, attention output, w1/w3 outputs) and recomputes the cheap element-wise
   ops (norms, SiLU, product), the spirit of Korthikanti's selective recomputation once flash
   attention has already removed the ``s^2`` term.
3. Loss: the final norm output ``a*h`` per token is kept; the chunked loss materialises one
   chunk of logits at a time: ``c*V`` in the compute dtype plus fp32 log-probabilities and their
   gradient (``c*V*(a + 8)`` bytes), recomputed in the backward.
4. Communication buffers (read off DeepSpeed 0.19's ``stage_1_and_2.py`` / ``stage3.py``):
   ZeRO-1/2 allocate a fresh ``reduce_bucket_size`` gradient bucket every micro-step (fp32 for
   ZeRO-1, two of them with ``overlap_comm``), which the gradients pass through, so they hold
   their own partition plus the bucket, never the full gradients; ZeRO-3 allocates one bucket
   at start-up and keeps parameters gathered while their next use is near (up to
   ``stage3_max_live_parameters``); Ulysses' all-to-all input and
   output for one layer's q, k, v. On a CPU, resident memory counts only pages written, so the
   fresh ZeRO-1/2 bucket is nearly empty at the backward peak (``GpuSpec.counts_untouched``).
5. Runtime reserve on GPU: 2.5 GB for the CUDA context, NCCL and cuBLAS workspaces, plus 5% of
   the allocator total for fragmentation (assumed, not measured here; the GPU check records
   ``torch.cuda.max_memory_reserved`` so it can be calibrated).

Step time: model FLOPs per token from ``ModelConfig.flops_per_token(s, causal=True)`` (6N plus
attention, causal attention counted once), executed FLOPs add one forward per recomputed part
(full checkpointing: 8/6 of the dense FLOPs). Matmuls run at ``matmul_eff`` of the datasheet
peak, attention at ``attn_eff``, element-wise work adds ``elementwise_overhead``; Ulysses'
all-to-alls (4 per layer forward, 4 backward, 4 more when recomputed) are exposed; ZeRO
collectives overlap the backward and only the excess is exposed; the CPU Adam step and PCIe
traffic of an offloaded optimizer are exposed. MFU = model FLOPs (no recompute) / (time *
datasheet peak), the convention of the trainer's metrics. All constants are in
:class:`GpuSpec` and printed with ``--json``; they are assumptions until the GPU check measures
them (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError

GB = 1e9
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers and efficiency assumptions of one accelerator type."""

    name: str
    """Short name (a100, h100, h200, cpu)."""
    peak_tflops: float
    """Dense bf16 tensor-core peak from the datasheet (SXM parts), TFLOP/s."""
    link_gbps: float
    """Intra-node per-GPU unidirectional bandwidth (NVLink), GB/s."""
    internode_gbps: float = 50.0
    """Per-GPU network bandwidth across nodes (one 400 Gb/s NIC per GPU), GB/s."""
    pcie_gbps: float = 25.0
    """Effective host<->device bandwidth per GPU for offloaded states, GB/s."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""
    matmul_eff: float = 0.70
    """Fraction of the datasheet peak large bf16 GEMMs reach (assumed; the GPU check measures it)."""
    attn_eff: float = 0.40
    """Fraction of the peak flash-attention forward+backward reaches (FA2 on Hopper, assumed)."""
    comm_eff: float = 0.70
    """Fraction of link bandwidth collectives reach."""
    elementwise_overhead: float = 0.10
    """Time of norms, RoPE, SiLU, casts relative to the matmul time."""
    cpu_adam_params_per_s: float = 2.0e9
    """DeepSpeed CPU-Adam throughput per rank, parameters per second (assumed)."""
    reserve_gb: float = 2.5
    """CUDA context, NCCL and cuBLAS workspaces: memory the PyTorch allocator does not see."""
    fragmentation: float = 0.05
    """Allocator fragmentation, as a fraction of the allocated total."""
    counts_untouched: bool = True
    """An allocation counts in full as soon as it exists (true for the CUDA allocator). Host
    RSS counts only pages written, so a freshly allocated bucket counts only once filled."""


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", peak_tflops=312.0, link_gbps=300.0, internode_gbps=25.0),
    "h100": GpuSpec("h100", peak_tflops=989.0, link_gbps=450.0, pcie_gbps=40.0),
    "h200": GpuSpec("h200", peak_tflops=989.0, link_gbps=450.0, pcie_gbps=40.0),
}
# A CPU "device" for checking the memory model against real CPU runs: no runtime reserve, fp32.
CPU = GpuSpec(
    "cpu", peak_tflops=0.1, link_gbps=5.0, internode_gbps=5.0, reserve_gb=0.0, fragmentation=0.0,
    counts_untouched=False,
)  # fmt: skip


@dataclass
class PlanInput:
    """What the planner needs from a job: the model shape and the parallel layout."""

    model: ModelConfig
    """The network (a flavor with its overrides)."""
    seq_len: int
    """Tokens per window (the full sequence, before SP splits it)."""
    micro_batch: int = 1
    """Windows per micro-step per data-parallel rank."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    sp: int = 1
    """Ulysses sequence-parallel degree."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Optimizer state (and fp32 gradient partition) in host memory."""
    offload_params: bool = False
    """ZeRO-3 parameters in host memory between uses."""
    activation_checkpointing: str = "full"
    """none | selective | full."""
    loss_chunk: int = 4096
    """Tokens per chunk of the chunked cross-entropy."""
    precision: str = "bf16"
    """bf16 (mixed, GPU) or fp32 (CPU runs)."""
    attention: str = "flash"
    """Attention core (flash, torch_varlen, sdpa, reference); decides the copies kept of its output."""
    reduce_bucket: int = 500_000_000
    """DeepSpeed reduce_bucket_size in elements (the trainer's GPU setting)."""
    overlap_comm: bool = True
    """DeepSpeed overlap_comm (on for GPU in the trainer): ZeRO-1/2 keep two buckets."""
    zero3_max_live: int = 1_000_000_000
    """stage3_max_live_parameters: most parameters ZeRO-3 keeps gathered."""

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in CHECKPOINTING:
            raise LongtrainError(
                f"parallel.activation_checkpointing={self.activation_checkpointing!r}: "
                f"use one of {', '.join(CHECKPOINTING)}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise LongtrainError(f"parallel.zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise LongtrainError(
                "parallel.offload_optimizer=true needs parallel.zero_stage >= 1 (DeepSpeed)"
            )
        if self.offload_params and self.zero_stage != 3:
            raise LongtrainError("parallel.offload_params=true needs parallel.zero_stage=3")
        if self.precision not in ("bf16", "fp32"):
            raise LongtrainError(f"precision={self.precision!r}: use bf16 or fp32")
        for name in ("seq_len", "micro_batch", "grad_accum", "sp", "loss_chunk"):
            if getattr(self, name) < 1:
                raise LongtrainError(f"{name}={getattr(self, name)}: must be >= 1")


# ---------------------------------------------------------------------------------------------
# Model shape


def head_dim(m: ModelConfig) -> int:
    """Per-head size (``head_dim`` or ``dim // n_heads``)."""
    return m.head_dim or m.dim // m.n_heads


def layer_params(m: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d = head_dim(m)
    attn = m.dim * m.n_heads * d + 2 * m.dim * m.n_kv_heads * d + m.n_heads * d * m.dim
    return attn + 3 * m.dim * m.ffn_dim + 2 * m.dim


def total_params(m: ModelConfig) -> int:
    """All parameters: blocks, embeddings, LM head unless tied, final norm."""
    return m.num_params()


def sp_valid(m: ModelConfig, sp: int) -> str | None:
    """Why ``sp`` cannot run this model under Ulysses, or None when it can."""
    if m.n_heads % sp:
        return f"n_heads={m.n_heads} not divisible by sp={sp}"
    kv = m.n_kv_heads
    if kv % sp and sp % kv:
        return f"n_kv_heads={kv} and sp={sp}: one must divide the other"
    return None


# ---------------------------------------------------------------------------------------------
# Activations


def out_copies(core: str, sp: int) -> int:
    """How many copies of the attention output the backward keeps.

    flash/torch_varlen return a view that ``wo`` saves, so one copy; the per-document SDPA core
    (and the reference) concatenate per-document outputs the kernel also saved, and under
    Ulysses the core keeps the head-sharded output while ``wo`` keeps the all-to-all's result.
    """
    return 1 if core in ("flash", "torch_varlen") and sp == 1 else 2


def layer_activation_terms(
    m: ModelConfig, a: int, sp: int = 1, core: str = "flash"
) -> dict[str, float]:
    """Bytes one block keeps for its backward, per local token, by tensor (see module doc)."""
    h, f, d = m.dim, m.ffn_dim, head_dim(m)
    kv_heads = max(m.n_kv_heads, sp)  # replicated up to sp under Ulysses
    # RMSNorm works in fp32: it keeps the fp32 input, the normalised x before the weight (for
    # the weight's gradient), 1/rms per token, and the following linear keeps its output.
    norm = 4 * h + 2 * a * h + 4
    return {
        "attention_norm": norm,
        "q": a * m.n_heads * d,
        "k": a * kv_heads * d,
        "v": a * kv_heads * d,
        "attn_out": out_copies(core, sp) * a * m.n_heads * d,
        "lse": 4.0 * m.n_heads,
        "ffn_norm": norm,
        "swiglu": 4 * a * f,  # w1 out (SiLU input), SiLU out, w3 out, product (w2 input)
    }


def layer_activation_bytes(m: ModelConfig, a: int, sp: int = 1, core: str = "flash") -> float:
    """Sum of :func:`layer_activation_terms`: bytes per local token for one un-checkpointed block."""
    return sum(layer_activation_terms(m, a, sp, core).values())


def is_checkpointed(layer: int, policy: str) -> bool:
    """Whether block ``layer`` is recomputed (selective: every other block, from the first)."""
    return policy == "full" or (policy == "selective" and layer % 2 == 0)


def checkpointed_layers(n_layers: int, policy: str) -> int:
    """How many blocks the policy recomputes."""
    return sum(is_checkpointed(i, policy) for i in range(n_layers))


def backward_workspace_bytes(m: ModelConfig, a: int, sp: int = 1) -> float:
    """Gradient temporaries live while one block runs its backward, per local token.

    The widest point is the SwiGLU backward: gradients of w1 and w3 outputs and of the SiLU
    output/product (``3f``) plus the incoming and outgoing residual gradients (``2h``).
    """
    return a * (3 * m.ffn_dim + 2 * m.dim)


def loss_bytes(m: ModelConfig, a: int, chunk: float, tokens: float) -> float:
    """Peak extra bytes of the chunked loss (``longtrain.model.loss``).

    The loss computes its gradients in its forward, so from then until the backward consumes
    them it holds the fp32 head-weight gradient accumulator (``4Vh``) and the gradient of the
    hidden states (``a*h`` per token); on top, either one chunk's fp32 logits with the
    log-sum-exp's temporaries (bounded by ``12cV``), or one chunk's fp32 gradient (``4cV``)
    with the fp32 ``(V, h)`` product being added to the accumulator.
    """
    v, h = m.vocab_size, m.dim
    return 4 * v * h + a * h * tokens + max(12 * chunk * v, 4 * chunk * v + 4 * v * h)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Memory:
    """Per-GPU bytes by component (and host bytes per GPU when offloading)."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    loss: float = 0.0
    comm: float = 0.0
    reserve: float = 0.0
    host_offload: float = 0.0
    peak_phase: str = "backward"

    @property
    def total(self) -> float:
        """Predicted peak device memory, bytes.

        The loss's backward and a block's (recomputed) backward happen one after the other,
        so only the larger of ``loss`` and ``transient`` is on top of the kept activations.
        """
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + max(self.transient, self.loss)
            + self.comm
            + self.reserve
        )

    def as_gb(self) -> dict[str, Any]:
        """Components in GB (rounded), for tables and JSON."""
        out: dict[str, Any] = {
            k.name: round(getattr(self, k.name) / GB, 3)
            for k in dataclasses.fields(self)
            if k.name != "peak_phase"
        }
        out["total"] = round(self.total / GB, 3)
        out["peak_phase"] = self.peak_phase
        return out


def memory(p: PlanInput, gpus: int, gpu: GpuSpec) -> Memory:
    """Predicted peak memory of one GPU (see the module docstring for every term)."""
    m = p.model
    n = total_params(m)
    w = gpus  # ZeRO shards over the whole DP x SP group
    a = 2 if p.precision == "bf16" else 4
    # fp32 master copy: mixed precision always; in fp32 only inside DeepSpeed's ZeRO optimizers.
    master = 4 if (p.precision == "bf16" or p.zero_stage >= 1) else 0
    mem = Memory()
    mem.params = a * n / (w if p.zero_stage == 3 else 1)
    if p.offload_params:
        mem.host_offload += mem.params
        mem.params = 0.0
    mem.grads = a * n / (w if p.zero_stage >= 2 else 1)
    opt_shard = (master + 8) * n / (w if p.zero_stage >= 1 else 1)
    if p.offload_optimizer:
        mem.host_offload += opt_shard + (4 * n / w if p.zero_stage >= 2 else 0)
    else:
        mem.optimizer = opt_shard

    t = p.micro_batch * p.seq_len / p.sp  # local tokens
    block = layer_activation_bytes(m, a, p.sp, p.attention)
    kept = [a * m.dim if is_checkpointed(i, p.activation_checkpointing) else block
            for i in range(m.n_layers)]  # fmt: skip
    # Checkpointed blocks keep their input. Global terms: RoPE's fp32 cos/sin shared by all
    # layers, the final norm (as in a block) and the loss's fp32 log-sum-exp.
    glob = 8 * head_dim(m) + (4 * m.dim + 2 * a * m.dim + 4) + 4
    mem.activations = t * (sum(kept) + glob)
    # The backward walks the blocks from the last: at block i the blocks below still hold what
    # they kept, block i holds its whole set (kept or recomputed) plus gradient temporaries.
    ws = backward_workspace_bytes(m, a, p.sp)
    at_block = max(sum(kept[:i]) + block + ws for i in range(m.n_layers))
    mem.transient = t * max(0.0, at_block - sum(kept))
    mem.loss = loss_bytes(m, a, min(p.loss_chunk, t), t)

    comm = 0.0
    if p.sp > 1:  # all-to-all input and output of one layer's q, k, v
        comm += 2 * a * (m.n_heads + 2 * max(m.n_kv_heads, p.sp)) * head_dim(m) * t
    if p.zero_stage in (1, 2) and gpu.counts_untouched:
        # A fresh bucket every micro-step (fp32 accumulator for ZeRO-1), doubled by overlap.
        comm += p.reduce_bucket * (4 if p.zero_stage == 1 else a) * (2 if p.overlap_comm else 1)
    if p.zero_stage == 3:
        # One bucket allocated at start-up (on a CPU only the part gradients pass through is
        # resident), plus the gathered parameters: DeepSpeed keeps a parameter gathered while
        # its next use (e.g. the recompute) is within stage3_max_reuse_distance, bounded by
        # stage3_max_live_parameters (prefetching stays within that bound).
        bucket = p.reduce_bucket if gpu.counts_untouched else min(p.reduce_bucket, n)
        comm += bucket * a + min(n, p.zero3_max_live) * a
    mem.comm = comm
    # After the backward the activations are gone, and ZeRO-1/2 build the fp32 gradient
    # partition for the update; keep whichever phase is larger.
    step_extra = 4 * n / w if (not p.offload_optimizer and p.zero_stage in (1, 2)) else 0.0
    if step_extra > mem.activations + max(mem.transient, mem.loss):
        mem.activations, mem.transient, mem.loss = 0.0, step_extra, 0.0
        mem.peak_phase = "optimizer step"
    mem.reserve = gpu.reserve_gb * GB + gpu.fragmentation * mem.total
    return mem


@dataclass
class Timing:
    """Estimated step time and throughput of one GPU."""

    step_s: float
    compute_s: float
    a2a_s: float
    zero_exposed_s: float
    offload_s: float
    tokens_per_s_per_gpu: float
    mfu: float


def timing(p: PlanInput, gpus: int, gpu: GpuSpec) -> Timing:
    """Estimated optimizer-step time (see the module docstring for the model)."""
    m = p.model
    n = total_params(m)
    a = 2 if p.precision == "bf16" else 4
    t = p.micro_batch * p.seq_len / p.sp
    model_fpt = m.flops_per_token(p.seq_len, causal=True)
    dense_fpt = 6.0 * m.num_params(exclude_embeddings=True)
    attn_fpt = model_fpt - dense_fpt
    # Recomputation repeats the forward (1/3 of the FLOPs) of the checkpointed blocks.
    recompute = checkpointed_layers(m.n_layers, p.activation_checkpointing) / m.n_layers / 3
    peak = gpu.peak_tflops * 1e12
    dense_s = dense_fpt * (1 + recompute) * t / (peak * gpu.matmul_eff)
    attn_s = attn_fpt * (1 + recompute) * t / (peak * gpu.attn_eff)
    compute = (dense_s + attn_s) * (1 + gpu.elementwise_overhead)
    a2a = 0.0
    if p.sp > 1:  # q, k, v and output; forward, backward and any recomputed forward
        cross_node = p.sp > gpu.gpus_per_node
        bw = (gpu.internode_gbps if cross_node else gpu.link_gbps) * 1e9 * gpu.comm_eff
        kv = max(m.n_kv_heads, p.sp)
        per_layer = a * t * head_dim(m) * (2 * m.n_heads + 2 * kv) * (p.sp - 1) / p.sp
        a2a = m.n_layers * per_layer * (2 + 3 * recompute) / bw
    # ZeRO reduce-scatters gradients and all-gathers parameters (stage 3 gathers twice); the
    # collectives overlap the backward and only the excess shows.
    zero_s = 0.0
    if gpus > 1:
        bw = (gpu.internode_gbps if gpus > gpu.gpus_per_node else gpu.link_gbps) * 1e9
        volume = 3.0 if p.zero_stage == 3 else 2.0
        zero_s = volume * a * n * (gpus - 1) / gpus / (bw * gpu.comm_eff)
    micro = compute + a2a
    zero_exposed = max(0.0, zero_s - p.grad_accum * micro * 2.0 / 3.0)
    offload = 0.0
    if p.offload_optimizer:  # CPU Adam on this rank's shard; gradients down, parameters up
        shard = n / gpus
        offload = shard / gpu.cpu_adam_params_per_s + 2 * a * shard / (gpu.pcie_gbps * 1e9)
    if p.offload_params:  # every parameter crosses PCIe in forward, backward (and recompute)
        offload += a * n * (2 + 3 * recompute) / (gpu.pcie_gbps * 1e9)
    step = p.grad_accum * micro + zero_exposed + offload
    tps = p.grad_accum * t / step
    return Timing(
        step, p.grad_accum * compute, p.grad_accum * a2a, zero_exposed, offload, tps,
        model_fpt * tps / peak,
    )  # fmt: skip


def fits(p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec) -> bool:
    """Whether the predicted peak fits in ``gpu_mem_gb``."""
    return memory(p, gpus, gpu).total <= gpu_mem_gb * GB


def sp_degrees(m: ModelConfig, gpus: int) -> list[int]:
    """Ulysses degrees that divide the GPU count and the model's heads."""
    return [sp for sp in range(1, gpus + 1) if gpus % sp == 0 and sp_valid(m, sp) is None]


def max_seq_len(p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec, step: int = 1024) -> int:
    """Longest seq_len (a multiple of ``step`` and of SP) that fits; 0 if none does."""
    q = step * p.sp // math.gcd(step, p.sp)

    def ok(k: int) -> bool:
        return fits(dataclasses.replace(p, seq_len=k * q), gpus, gpu_mem_gb, gpu)

    if not ok(1):
        return 0
    hi = 1
    while ok(hi * 2) and hi < 2**24:
        hi *= 2
    lo, hi = hi, hi * 2  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * q


HEADROOM = 0.10
"""The recommendation keeps this fraction of GPU memory free: the model is an estimate (the CPU
check finds it within ~20%), and allocator behaviour varies across PyTorch/NCCL versions."""


def recommend(p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec) -> dict[str, Any] | None:
    """Fastest (SP, ZeRO stage, offload, checkpointing) that fits ``p.seq_len`` with
    :data:`HEADROOM` to spare; None if none does."""
    best: tuple[float, float, PlanInput] | None = None
    for sp in sp_degrees(p.model, gpus):
        if p.seq_len % sp:
            continue
        for zero in (0, 1, 2, 3):
            for offload in (False, True) if zero else (False,):
                for ckpt in CHECKPOINTING:
                    q = dataclasses.replace(
                        p, sp=sp, zero_stage=zero, offload_optimizer=offload,
                        offload_params=p.offload_params and zero == 3,  # ZeRO-3 only
                        activation_checkpointing=ckpt,
                    )  # fmt: skip
                    mem = memory(q, gpus, gpu).total
                    if mem > (1 - HEADROOM) * gpu_mem_gb * GB:
                        continue
                    tps = timing(q, gpus, gpu).tokens_per_s_per_gpu
                    key = (tps, -mem)
                    if best is None or key > best[:2]:
                        best = (tps, -mem, q)
    if best is None:
        return None
    q = best[2]
    return {
        "sp": q.sp,
        "zero_stage": q.zero_stage,
        "offload_optimizer": q.offload_optimizer,
        "activation_checkpointing": q.activation_checkpointing,
        "memory_gb": round(memory(q, gpus, gpu).total / GB, 2),
        "tokens_per_s_per_gpu": round(best[0], 1),
        "mfu": round(timing(q, gpus, gpu).mfu, 3),
    }


def make_plan(p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec) -> dict[str, Any]:
    """The whole answer as a JSON-ready dict."""
    if gpus % p.sp:
        raise LongtrainError(f"--gpus {gpus} is not divisible by parallel.sp={p.sp}")
    why = sp_valid(p.model, p.sp)
    if why:
        raise LongtrainError(f"parallel.sp={p.sp}: {why}; pick a divisor of the head count")
    if p.seq_len % p.sp:
        raise LongtrainError(f"data.seq_len={p.seq_len} is not divisible by parallel.sp={p.sp}")
    mem = memory(p, gpus, gpu)
    tim = timing(p, gpus, gpu)
    per_sp = {}
    for sp in sp_degrees(p.model, gpus):
        row = {}
        for ckpt in CHECKPOINTING:
            q = dataclasses.replace(p, sp=sp, activation_checkpointing=ckpt)
            row[ckpt] = max_seq_len(q, gpus, gpu_mem_gb, gpu)
        per_sp[sp] = row
    return {
        "gpu": gpu.name,
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "params": total_params(p.model),
        "config": {
            "seq_len": p.seq_len,
            "micro_batch": p.micro_batch,
            "grad_accum": p.grad_accum,
            "sp": p.sp,
            "dp": gpus // p.sp,
            "zero_stage": p.zero_stage,
            "offload_optimizer": p.offload_optimizer,
            "activation_checkpointing": p.activation_checkpointing,
            "loss_chunk": p.loss_chunk,
            "precision": p.precision,
        },
        "memory_gb": mem.as_gb(),
        "fits": mem.total <= gpu_mem_gb * GB,
        "time": {k: round(v, 4) for k, v in dataclasses.asdict(tim).items()},
        "max_seq_len_by_sp": per_sp,
        "recommended": recommend(p, gpus, gpu_mem_gb, gpu),
        "assumptions": dataclasses.asdict(gpu),
    }


# ---------------------------------------------------------------------------------------------
# Job config and CLI


def plan_input_from_job(job: Any) -> PlanInput:
    """Read a :class:`longtrain.train.config.JobConfig` into a :class:`PlanInput`.

    The vocabulary comes from the data's manifest when ``data.dir`` is prepared already, else
    from the flavor; ``parallel.dtype=auto`` plans bf16 (the GPU choice).
    """
    from longtrain.train.config import read_manifest, resolve_model_config

    manifest = None
    if job.data.dir and (Path(job.data.dir) / "manifest.json").is_file():
        manifest = read_manifest(job.data.dir)
    par = job.parallel
    return PlanInput(
        model=resolve_model_config(job, manifest),
        seq_len=job.data.seq_len,
        micro_batch=job.train.micro_batch,
        grad_accum=job.train.grad_accum,
        sp=par.sp,
        zero_stage=par.zero_stage,
        offload_optimizer=par.offload_optimizer,
        offload_params=par.offload_params,
        activation_checkpointing=par.activation_checkpointing,
        loss_chunk=job.train.loss_chunk_size,
        precision="fp32" if par.dtype == "fp32" else "bf16",
    )


def format_table(plan: dict[str, Any]) -> str:
    """Human-readable report of :func:`make_plan`'s result."""
    c, mem, t = plan["config"], plan["memory_gb"], plan["time"]
    lines = [
        f"{plan['params'] / 1e9:.2f}B params on {plan['gpus']} x {plan['gpu']} "
        f"({plan['gpu_mem_gb']:g} GB): seq_len {c['seq_len']}, micro_batch {c['micro_batch']}, "
        f"SP {c['sp']} x DP {c['dp']}, ZeRO-{c['zero_stage']}"
        f"{' + optimizer offload' if c['offload_optimizer'] else ''}, "
        f"checkpointing {c['activation_checkpointing']}",
        "",
        "memory per GPU (GB)",
    ]
    for k in ("params", "grads", "optimizer", "activations", "transient", "loss", "comm"):
        lines.append(f"  {k:<12} {mem[k]:>9.2f}")
    lines.append(f"  {'reserve':<12} {mem['reserve']:>9.2f}   (CUDA context, NCCL, fragmentation)")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<12} {mem['total']:>9.2f}   {verdict} (peak in {mem['peak_phase']})")
    if mem["host_offload"]:
        lines.append(f"  {'host (CPU)':<12} {mem['host_offload']:>9.2f}   per GPU, offloaded")
    lines += [
        "",
        f"step time {t['step_s']:.2f} s (compute {t['compute_s']:.2f}, all-to-all "
        f"{t['a2a_s']:.2f}, ZeRO exposed {t['zero_exposed_s']:.2f}, offload "
        f"{t['offload_s']:.2f}); {t['tokens_per_s_per_gpu']:.0f} tokens/s/GPU; MFU {t['mfu']:.1%}",
        "",
        "longest seq_len that fits, by SP degree and checkpointing (same ZeRO/offload)",
        f"  {'SP':>4} " + " ".join(f"{k:>11}" for k in CHECKPOINTING),
    ]
    for sp, row in plan["max_seq_len_by_sp"].items():
        lines.append(f"  {sp:>4} " + " ".join(f"{row[k]:>11,}" for k in CHECKPOINTING))
    r = plan["recommended"]
    lines.append("")
    if r is None:
        lines.append(
            f"recommended: nothing fits seq_len {c['seq_len']} on {plan['gpus']} GPUs with "
            f"{HEADROOM:.0%} memory to spare"
        )
    else:
        lines.append(
            f"recommended for seq_len {c['seq_len']} (fastest with {HEADROOM:.0%} memory to "
            f"spare): SP {r['sp']}, ZeRO-{r['zero_stage']}"
            f"{' + optimizer offload' if r['offload_optimizer'] else ''}, checkpointing "
            f"{r['activation_checkpointing']}: {r['memory_gb']:.1f} GB, "
            f"{r['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, MFU {r['mfu']:.1%}"
        )
    return "\n".join(lines)


def cli_plan(args: argparse.Namespace) -> int:
    """``longtrain plan --config FILE --gpus N --gpu-mem GB [--gpu h100] [--json]``."""
    from longtrain.train.config import load_job

    if args.gpus < 1:
        raise LongtrainError(f"--gpus {args.gpus}: must be >= 1")
    if args.gpu_mem <= 0:
        raise LongtrainError(f"--gpu-mem {args.gpu_mem}: must be > 0 (GB per GPU)")
    job = load_job(args.config, list(args.overrides or []))
    plan = make_plan(plan_input_from_job(job), args.gpus, args.gpu_mem, GPUS[args.gpu])
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0


__all__ = [
    "GPUS",
    "CPU",
    "GpuSpec",
    "PlanInput",
    "Memory",
    "Timing",
    "memory",
    "timing",
    "make_plan",
    "max_seq_len",
    "recommend",
    "layer_activation_terms",
    "total_params",
    "cli_plan",
]
