"""``longtrain plan``: per-GPU and host memory, step time and MFU of a job before anyone books a
cluster, and the longest window a model can train on a given machine.

Everything here is arithmetic on a :class:`~longtrain.train.config.JobConfig` and the DeepSpeed
config the engine builds from it (``longtrain.train.engine.deepspeed_config``, a pure function):
stage, offload, bucket sizes and dtypes are read from that dict and resolved with DeepSpeed's own
defaults (``DeepSpeedZeroConfig``), the SP rule is ``train.parallel.sp_layout_problem``, the
activation-offload bytes are ``train.offload.host_bytes_needed``, the peaks are
``train.metrics.GPU_PEAKS``. Nothing is allocated. ``bench/bench_plan.py`` checks the totals
against measured peaks of real CPU runs; ``tests/test_plan.py`` checks the terms one by one.

Notation (per micro-step, per GPU): ``N`` parameters, ``L`` layers, ``h`` model dim, ``f`` FFN
dim, ``q = Hq*d`` and ``kv = Hkv'*d`` the query and K/V widths (``Hkv' = max(Hkv, U)``: K/V heads
are replicated up to the Ulysses degree ``U``), ``V`` vocabulary, ``s`` the window, ``b`` the
micro batch, ``P`` the SP degree (``U`` x ring), ``W`` GPUs, ``t = b*s/P`` tokens one GPU holds,
``a`` bytes of the compute dtype, ``g`` bytes of DeepSpeed's gradient-accumulation dtype,
``r`` bytes of its communication dtype, ``c`` the loss chunk and ``m`` the MLP tile in tokens.

1. Model states (Rajbhandari et al. 2020, "ZeRO", sections 3 and 5.1: ``2N + 2N + 12N``), as
   DeepSpeed 0.19.8 allocates them (:func:`zero_buffers` lists each buffer with the function
   that allocates it). ZeRO shards over all ``W`` ranks (no mpu: see ``train/parallel.py``).
   The engine sets ``grad_accum_dtype`` and ``communication_data_type`` to fp32 under bf16, so
   gradient partitions are fp32 (``g = 4``), not bf16: ZeRO-3 keeps ``g*N/W``
   (``grad_partitions_flat_buffer``) and builds one sub-group's fp32 gradient in the step;
   ZeRO-2 ``g*N/W`` (its compact partition); ZeRO-1 the whole ``g*N`` (BF16_Optimizer's flat
   fp32 gradients, or ``grad_accum`` per parameter under offload).
   **Under optimizer offload** DeepSpeed moves the reduced gradients to host bucket by bucket:
   ZeRO-3 allocates ``grad_partitions_flat_buffer`` on the offload device
   (``stage3.py::_setup_for_real_optimizer``, ``self.device = 'cpu'``) and the step's fp32
   gradients there too (``initialize_optimizer_states``), so the GPU keeps no gradient
   partition, only the reduce bucket; ZeRO-1/2 copy each reduced gradient into the host fp32
   partition (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``) and keep on the GPU only
   the compact fp32 partition when the accumulation dtype differs from the model's
   (``_use_compact_grad_partition_buffer``), plus a staging buffer of the largest parameter.
   Host per GPU: fp32 master + Adam ``12N/W`` and the fp32 gradients.
2. Activations per block (Korthikanti et al. 2022, section 4.1, re-derived for this model:
   RMSNorm normalising in fp32 as in HF Llama, RoPE, GQA, SwiGLU, no dropout, flash/varlen
   cores that keep a log-sum-exp instead of the ``s^2`` scores), per local token:
   ``2*(2ah + 4) + a*(q + 2kv) + k_o*a*q + 4Hq + 4af`` where each norm keeps its input and
   fp32 1/rms (``model.transformer.RMSNorm``) and the next linear its output, ``k_o`` copies
   of the attention output (1 for flash/varlen at U = 1, else 2), and ``4af`` the SwiGLU
   intermediates. ``tests/test_plan.py`` checks this list against the bytes autograd saves
   for one block of our Transformer.
   **Sequence-tiled MLP** (``train.mlp_chunk_size``; ALST, Bekman et al. 2025,
   arXiv:2506.13996, section 3.2): the MLP keeps only its input, so ``4af`` goes; its backward
   holds one tile: ``m*a*6f`` (recomputed intermediates and their gradients) plus the fp32
   parameter-gradient sums ``3hf*(4 + a)`` (``model/tiled.py``).
   Checkpointing (``full``: every block, ``selective``: every other one) keeps a block's input
   (``a*h``) instead of its set. **Activation offload** (``parallel.offload_activations``;
   Megatron-Core's fine-grained activation offloading, ALST section 3.4) moves those inputs to
   host: ``host_bytes_needed`` per GPU (``L_ckpt * t * h * a``); in the backward the restored
   input (in the block's set) and the prefetched input of the block below are on the device.
3. The backward of one block, phase by phase (the peak is the largest; each phase lists what
   is alive on top of the blocks below, per local token; measured per block on CPU in fp32
   and bf16 by ``tests/test_plan.py``): the incoming residual gradient ``a*h`` throughout;
   SwiGLU's product backward ``set + 2af`` (untiled) or the tile ``set + a*h`` plus the tile
   terms; the RMSNorm backward ``set - MLP - a*h + 2ah`` (the output's and the input's
   gradients) plus one tile of its fp32 work, ``(8 + a)h`` per tile token (``8h`` in fp32)
   for at most ``NORM_TILE_ELEMENTS / h`` tokens; the attention backward
   ``attn part + a*(2q + 2kv)`` (output and q/k/v gradients; Ulysses' copies live only around
   it), and ``4q`` for flash-attention's fp32 dq accumulator (flash-attn ``flash_api.cpp``,
   ``dq_accum``). The block's own input is in its set (the first norm keeps it), restored
   from the host or not.
4. Loss: the final norm's set (its input, 1/rms, and its output until the loss's forward
   returns) is kept; the chunked loss holds the fp32 head-weight gradient
   (``4Vh``), the hidden-state gradient (``a*h`` per token) and one chunk's fp32 logits with
   their temporaries (``max(12cV, 4cV + 4Vh)``), ``model/loss.py``.
5. Communication buffers (DeepSpeed 0.19.8): ZeRO-1/2 allocate a fresh ``reduce_bucket_size``
   bucket each micro-step (``setup_buckets``; two with ``overlap_comm``), filled during the
   backward by ZeRO-2's hooks and after it by plain ZeRO-1's ``reduce_gradients``; ZeRO-3 one
   at start in the communication dtype, the reduce-scatter outputs (1/W of it) and gathered
   parameters up to ``stage3_max_live_parameters``; on a CPU only pages written count, at most
   the model's size (``GpuSpec.counts_untouched``). Ring attention's K/V blocks and traffic
   come from ``train.ring.ring_p2p_bytes``.
6. Runtime reserve on GPU: 2.5 GB for the CUDA context, NCCL and cuBLAS workspaces, plus 5% of
   the allocator total for fragmentation (assumed; the GPU check records both).

Host memory per node = per GPU x the GPUs of one node; it must fit in ``--host-mem`` with the
headroom ``train.offload.check_host_memory`` applies.

Step time: model FLOPs per token ``ModelConfig.flops_per_token(s, causal=True)`` (PaLM,
appendix B: ``6N + 6*L*q*s`` causal). Executed FLOPs add one forward (a third of the block's
FLOPs) per checkpointed block, less its last matmul (``w2``: torch's checkpoint stops once the
last saved tensor is recomputed) unless the tiled MLP runs it, and with the tiled MLP one more
MLP forward; the LM head is not recomputed (the chunked loss computes its gradients in the
forward). ``tests/test_plan.py`` counts the FLOPs a checkpointed step executes. Matmuls run at
``matmul_eff`` of the datasheet peak, attention at ``attn_eff``; Ulysses' all-to-alls (q, k, v,
output: forward, backward, recompute) are exposed; ZeRO collectives overlap the backward and
only the excess shows; CPU Adam and PCIe traffic of an offloaded optimizer or parameters are
exposed; the activation copies overlap one block's compute and only the excess shows. MFU =
model FLOPs (no recompute) / (time x datasheet peak), the trainer's convention. Every constant
is in :class:`GpuSpec` and printed with ``--json``; they are assumptions until the GPU check
measures them (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.model.tiled import tile_bounds
from longtrain.model.transformer import NORM_TILE_ELEMENTS
from longtrain.train.config import (
    JobConfig,
    ModelSection,
    load_job,
    read_manifest,
    resolve_model_config,
)
from longtrain.train.engine import deepspeed_config
from longtrain.train.metrics import datasheet_peak_flops
from longtrain.train.offload import check_host_memory, checkpointed_blocks, host_bytes_needed
from longtrain.train.parallel import setup_accelerator_env, sp_layout_problem
from longtrain.train.ring import ring_p2p_bytes
from longtrain.train.stages import Stage

GB = 1e9
CHECKPOINTING = ("none", "selective", "full")
HOST_HEADROOM: float = inspect.signature(check_host_memory).parameters["headroom"].default
"""Fraction of a node's RAM the planner counts on: the activation-offload check's own figure."""
FLASH_CORES = ("flash", "flash3", "torch_varlen")
"""Cores whose backward keeps an fp32 dq accumulator (flash-attn's kernels)."""


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator type: its name in the peak table, and efficiency assumptions."""

    name: str
    """Short name (a100, h100, h200, cpu)."""
    device_name: str
    """What ``torch.cuda.get_device_name()`` reports: the key into ``metrics.GPU_PEAKS``."""
    link_gbps: float
    """Intra-node per-GPU unidirectional bandwidth (NVLink), GB/s."""
    internode_gbps: float = 50.0
    """Per-GPU network bandwidth across nodes (one 400 Gb/s NIC per GPU), GB/s."""
    pcie_gbps: float = 25.0
    """Effective host<->device bandwidth per GPU for offloaded states and activations, GB/s."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain and one host."""
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
    unified: bool = False
    """Host and device are one memory (a CPU run): offloaded bytes count in the device peak."""
    nominal_tflops: float = 0.0
    """Peak for a device without a datasheet entry (the CPU check; only memory is checked)."""

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Dense peak FLOP/s for ``dtype`` from ``metrics.GPU_PEAKS`` (or the nominal figure)."""
        if self.nominal_tflops:
            return self.nominal_tflops * 1e12
        peak = datasheet_peak_flops(self.device_name, dtype)
        if peak is None:
            raise LongtrainError(f"--gpu {self.name}: {self.device_name} is not in GPU_PEAKS")
        return peak


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", "NVIDIA A100-SXM4-80GB", link_gbps=300.0, internode_gbps=25.0),
    "h100": GpuSpec("h100", "NVIDIA H100 80GB HBM3", link_gbps=450.0, pcie_gbps=40.0),
    "h200": GpuSpec("h200", "NVIDIA H200", link_gbps=450.0, pcie_gbps=40.0),
}
# A CPU "device" for checking the memory model against real CPU runs: no runtime reserve, host
# and device the same memory.
CPU = GpuSpec(
    "cpu", "cpu", link_gbps=5.0, internode_gbps=5.0, reserve_gb=0.0, fragmentation=0.0,
    counts_untouched=False, unified=True, nominal_tflops=0.1,
)  # fmt: skip

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _offloaded(section: Any) -> bool:
    """Whether a DeepSpeed offload section sends something off the device."""
    if section is None:
        return False
    return str(getattr(section.device, "value", section.device)) != "none"


def _section_of(key: str) -> str:
    """The JobConfig section (data, train or parallel) that has a field named ``key``."""
    hints = typing.get_type_hints(JobConfig)
    found = [s for s in ("data", "train", "parallel")
             if key in {f.name for f in dataclasses.fields(hints[s])}]  # fmt: skip
    if len(found) != 1:
        raise LongtrainError(f"plan setting {key!r}: not a field of data, train or parallel")
    return found[0]


@dataclass(frozen=True)
class PlanInput:
    """A job as the planner sees it: the JobConfig, the model it trains, the device kind.

    Every setting is read from ``job`` (data, train, parallel) or from the DeepSpeed config
    the engine builds for it on ``device``; nothing is copied. :meth:`with_` changes settings
    through the config's own dataclasses, so an invalid layout fails their validation.
    """

    job: JobConfig
    """The job (its ``model`` section is resolved into :attr:`model`)."""
    model: ModelConfig
    """The network the job trains (flavor, overrides, vocabulary of the data)."""
    device: str = "cuda"
    """Device kind whose DeepSpeed config and dtype are planned: cuda or cpu."""

    @classmethod
    def from_job(cls, job: JobConfig, device: str = "cuda") -> PlanInput:
        """The job's model from its flavor and overrides, vocabulary from the data's manifest
        when ``data.dir`` is prepared already."""
        manifest = None
        if job.data.dir and (Path(job.data.dir) / "manifest.json").is_file():
            manifest = read_manifest(job.data.dir)
        return cls(job, resolve_model_config(job, manifest), device)

    @classmethod
    def of(
        cls, model: ModelConfig, device: str = "cuda", attention: str = "flash", **settings: Any
    ) -> PlanInput:
        """A default job training ``model`` with data/train/parallel fields set by name."""
        job = JobConfig(model=ModelSection(attention=attention, overrides=model.to_dict()))
        return cls(job, model, device).with_(**settings)

    def with_(self, **settings: Any) -> PlanInput:
        """A copy with data/train/parallel fields replaced, named by field (``sp=8``)."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in settings.items():
            by_section.setdefault(_section_of(key), {})[key] = value
        job = self.job
        changes = {s: dataclasses.replace(getattr(job, s), **kw) for s, kw in by_section.items()}
        return dataclasses.replace(self, job=dataclasses.replace(job, **changes))

    # -- the engine's DeepSpeed config -----------------------------------------------------

    @functools.cached_property
    def ds(self) -> dict[str, Any]:
        """``deepspeed_config(job, 1, device)``; only its batch size depends on the world."""
        return deepspeed_config(self.job, 1, torch.device(self.device))

    @functools.cached_property
    def zero(self) -> Any:
        """The ZeRO section resolved with DeepSpeed's own defaults (``DeepSpeedZeroConfig``)."""
        setup_accelerator_env()
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        return DeepSpeedZeroConfig(**self.ds["zero_optimization"])

    @property
    def a(self) -> int:
        """Bytes per element of the compute dtype (bf16 when the DeepSpeed config enables it)."""
        return 2 if self.ds.get("bf16", {}).get("enabled") else 4

    @property
    def accum_bytes(self) -> int:
        """Bytes of DeepSpeed's gradient-accumulation dtype (``data_types.grad_accum_dtype``)."""
        name = self.ds.get("data_types", {}).get("grad_accum_dtype")
        return _DTYPE_BYTES[name] if name else self.a

    @property
    def comm_bytes(self) -> int:
        """Bytes of DeepSpeed's gradient communication dtype (``communication_data_type``)."""
        name = self.ds.get("communication_data_type")
        return _DTYPE_BYTES[name] if name else self.a

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return torch.bfloat16 if self.a == 2 else torch.float32

    @property
    def zero_stage(self) -> int:
        """ZeRO stage of the DeepSpeed config."""
        return int(self.zero.stage)

    @property
    def offload_optimizer(self) -> bool:
        """Optimizer states (and the step) on the host."""
        return _offloaded(self.zero.offload_optimizer)

    @property
    def offload_params(self) -> bool:
        """ZeRO-3 parameters on the host between uses."""
        return _offloaded(self.zero.offload_param)

    # -- the job's own settings ------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        """Tokens per window."""
        return self.job.data.seq_len

    @property
    def micro_batch(self) -> int:
        """Windows per micro-step per data-parallel rank."""
        return self.job.train.micro_batch

    @property
    def grad_accum(self) -> int:
        """Micro-steps per optimizer step."""
        return self.job.train.grad_accum

    @property
    def sp(self) -> int:
        """Sequence-parallel degree in all (Ulysses x ring)."""
        return self.job.parallel.sp

    @property
    def ring(self) -> int:
        """Ring-attention degree inside the SP group."""
        return self.job.parallel.ring

    @property
    def ulysses(self) -> int:
        """Ulysses degree: the heads are split over this many ranks."""
        return self.sp // self.ring

    @property
    def checkpointing(self) -> str:
        """parallel.activation_checkpointing."""
        return self.job.parallel.activation_checkpointing

    @property
    def offload_activations(self) -> bool:
        """parallel.offload_activations."""
        return self.job.parallel.offload_activations

    @property
    def loss_chunk(self) -> int:
        """train.loss_chunk_size."""
        return self.job.train.loss_chunk_size

    @property
    def mlp_chunk(self) -> int:
        """train.mlp_chunk_size (0 = off)."""
        return self.job.train.mlp_chunk_size

    @property
    def core(self) -> str:
        """Attention core: model.attention, with ``auto`` taken as what the device runs (flash
        kernels on a GPU, per-document SDPA on a CPU)."""
        name = self.job.model.attention
        if name == "auto":
            return "flash" if self.device == "cuda" else "sdpa"
        return name

    @property
    def local_tokens(self) -> int:
        """``t``: tokens one GPU holds per micro-step."""
        return self.micro_batch * self.seq_len // self.sp

    @property
    def tiled(self) -> bool:
        """Whether the MLP runs in more than one tile (one tile is the plain MLP)."""
        return bool(self.mlp_chunk) and len(tile_bounds(self.local_tokens, self.mlp_chunk)) > 1

    @property
    def mlp_tile(self) -> int:
        """Tokens of the largest MLP tile (``local_tokens`` when not tiled)."""
        if not self.tiled:
            return self.local_tokens
        return max(e - s for s, e in tile_bounds(self.local_tokens, self.mlp_chunk))


# ---------------------------------------------------------------------------------------------
# Model shape


def head_dim(m: ModelConfig) -> int:
    """Per-head size (``head_dim`` or ``dim // n_heads``)."""
    return m.head_dim or m.dim // m.n_heads


def total_params(m: ModelConfig) -> int:
    """All parameters: blocks, embeddings, LM head unless tied, final norm."""
    return m.num_params()


def largest_param(m: ModelConfig) -> int:
    """Elements of the largest single parameter (embedding/head or an MLP matrix)."""
    return max(m.vocab_size * m.dim, m.dim * m.ffn_dim, m.dim * m.n_heads * head_dim(m))


def sp_valid(m: ModelConfig, ulysses: int) -> str | None:
    """Why ``ulysses``-way head splitting cannot run this model, or None (the one SP rule)."""
    return sp_layout_problem(m.n_heads, m.n_kv_heads, ulysses)


# ---------------------------------------------------------------------------------------------
# Activations


def out_copies(core: str, ulysses: int) -> int:
    """How many copies of the attention output the backward keeps.

    flash/torch_varlen return a view that ``wo`` saves, so one copy; the per-document SDPA core
    (and the reference) concatenate per-document outputs the kernel also saved, and under
    Ulysses the core keeps the head-sharded output while ``wo`` keeps the all-to-all's result.
    """
    return 1 if core in FLASH_CORES and ulysses == 1 else 2


def norm_bytes(m: ModelConfig, a: int) -> float:
    """What one RMSNorm keeps per token: its input and fp32 1/rms (what
    ``model.transformer.RMSNorm`` saves, ``a*h + 4``) and its output (saved by the next
    linear; the final norm's is alive until the loss's forward returns): ``2ah + 4``."""
    return 2 * a * m.dim + 4


def norm_backward_bytes(m: ModelConfig, a: int) -> float:
    """Per-token bytes alive in one RMSNorm's backward besides its saved set: the output's
    gradient and the input's gradient (``2ah``). Its fp32 work runs one tile at a time
    (:func:`norm_tile_bytes`)."""
    return 2 * a * m.dim


def norm_tile_bytes(m: ModelConfig, a: int, tokens: int) -> float:
    """Token-independent bytes of one RMSNorm backward tile (``RMSNorm.tile_elements``:
    ``NORM_TILE_ELEMENTS // dim`` tokens, at most ``tokens``): the fp32 normalised value and
    one fp32 buffer its products reuse (``8h`` per tile token), and in bf16 the normalised
    value rounded as the forward used it (``ah``)."""
    tile = min(tokens, max(1, NORM_TILE_ELEMENTS // m.dim))
    return (8 + (a if a < 4 else 0)) * m.dim * tile


def layer_activation_terms(
    m: ModelConfig, a: int, ulysses: int = 1, core: str = "flash", tiled: bool = False
) -> dict[str, float]:
    """Bytes one block keeps for its backward, per local token, by tensor (module doc, 2)."""
    d = head_dim(m)
    kv_heads = max(m.n_kv_heads, ulysses)  # replicated up to the Ulysses degree
    return {
        "attention_norm": norm_bytes(m, a),
        "q": a * m.n_heads * d,
        "k": a * kv_heads * d,
        "v": a * kv_heads * d,
        "attn_out": out_copies(core, ulysses) * a * m.n_heads * d,
        "lse": 4.0 * m.n_heads,
        "ffn_norm": norm_bytes(m, a),
        # w1 out (SiLU input), SiLU out, w3 out, product (w2 input); tiled: only the input.
        "swiglu": 0.0 if tiled else 4 * a * m.ffn_dim,
    }


def layer_activation_bytes(
    m: ModelConfig, a: int, ulysses: int = 1, core: str = "flash", tiled: bool = False
) -> float:
    """Sum of :func:`layer_activation_terms`: bytes per local token one block keeps."""
    return sum(layer_activation_terms(m, a, ulysses, core, tiled).values())


def mlp_tile_bytes(m: ModelConfig, a: int, tile: int) -> float:
    """Token-independent bytes of the tiled MLP's backward (``model/tiled.py``): one tile's
    recomputed intermediates at its widest point (w1, SiLU and w3 outputs, the product's
    gradient and the two gradients it splits into: ``6f`` per token; the product itself is
    freed by w2's backward), and the fp32 sums of the w1/w2/w3 gradients next to one tile's
    gradients (``3hf * (4 + a)``)."""
    return tile * a * 6 * m.ffn_dim + 3 * m.dim * m.ffn_dim * (4 + a)


def block_backward_phases(
    m: ModelConfig, a: int, ulysses: int = 1, core: str = "flash", tiled: bool = False
) -> dict[str, float]:
    """Per-token bytes alive on top of the blocks below while one block back-propagates,
    phase by phase (module doc, 3); the token-independent tile terms are separate."""
    terms = layer_activation_terms(m, a, ulysses, core, tiled)
    block = sum(terms.values())
    h, f, q = m.dim, m.ffn_dim, m.n_heads * head_dim(m)
    kv = max(m.n_kv_heads, ulysses) * head_dim(m)
    grad_in = a * h  # the residual stream's gradient, alive for the whole block
    mlp = block + grad_in + (a * h if tiled else 2 * a * f)
    norm = block - terms["swiglu"] - a * h + grad_in + norm_backward_bytes(m, a)
    attn_part = block - terms["swiglu"] - terms["ffn_norm"]
    # The core's backward: the output gradient and the q/k/v gradients it returns. Under
    # Ulysses the all-to-alls' copies live only around it (their inputs are freed first).
    attn = attn_part + grad_in + a * (2 * q + 2 * kv)
    if core in FLASH_CORES:
        attn += 4 * q  # flash-attn's fp32 dq accumulator
    return {"mlp": mlp, "norm": norm, "attention": attn}


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
# DeepSpeed's buffers


@dataclass(frozen=True)
class Buffer:
    """One allocation DeepSpeed 0.19.8 makes for a rank."""

    name: str
    """The attribute or tensor, as DeepSpeed names it."""
    component: str
    """params | grads | optimizer | comm | step (built for the optimizer step only)."""
    where: str
    """device | host."""
    bytes: float
    """Size per rank (as allocated; on a CPU, as written by the end of the backward)."""
    source: str
    """Where DeepSpeed allocates it."""
    fills: float = 0.0
    """Gradient elements the backward produces until this buffer is fully written (it takes
    them in backward order); 0 = written at once. Only a CPU sees the difference: its
    resident memory counts pages written, the CUDA allocator the whole allocation."""


def zero_buffers(p: PlanInput, gpus: int, gpu: GpuSpec) -> list[Buffer]:
    """The model-state and gradient-communication buffers of one rank (module doc, 1 and 5).

    Each entry names the DeepSpeed 0.19.8 attribute and the function allocating it
    (``runtime/zero/stage3.py``, ``stage_1_and_2.py``, ``runtime/bf16_optimizer.py``).
    """
    m = p.model
    n, w, a, acc, r = total_params(m), gpus, p.a, p.accum_bytes, p.comm_bytes
    z, stage, off = p.zero, p.zero_stage, p.offload_optimizer
    shard = n / w
    separate = acc != a  # fp32 gradient accumulation of bf16 parameters
    bucket = float(z.reduce_bucket_size)
    opt = "host" if off else "device"  # the optimizer's self.device
    b: list[Buffer] = []
    # fmt: off
    if stage == 3:
        b.append(Buffer("ds_tensor partitions", "params", "host" if p.offload_params else "device",
                        a * shard, "partition_parameters.py::_partition_param"))
        # A separate fp32 copy even when the partitions are fp32 already (counted on CPU by
        # tests/test_levers.py).
        b.append(Buffer("fp32_partitioned_groups_flat", "optimizer", opt, 4 * shard,
                        "stage3.py::_create_fp32_partitions"))
        b.append(Buffer("Adam exp_avg, exp_avg_sq", "optimizer", opt, 8 * shard, "AdamW state"))
        b.append(Buffer("grad_partitions_flat_buffer", "grads", opt, acc * shard,
                        "stage3.py::_setup_for_real_optimizer"))
        if off:  # one fp32 gradient buffer per sub-group for the host step, kept
            b.append(Buffer("fp32_partitioned_groups_flat[i].grad", "grads", "host", 4 * shard,
                            "stage3.py::initialize_optimizer_states"))
        else:  # built per sub-group in the step and dropped after it
            b.append(Buffer("fp32 gradient of one sub-group", "step", "device",
                            4 * min(shard, float(z.sub_group_size)),
                            "stage3.py::_prepare_fp32_grad_for_sub_group"))
        # Allocated once and kept: after the first backward its pages stay written.
        touched = bucket if gpu.counts_untouched else min(bucket, n)
        b.append(Buffer("ipg bucket", "comm", "device", r * touched,
                        "stage3.py::_setup_for_real_optimizer"))
        rs = (r + (acc if off else 0)) * min(bucket, n) / w  # sized by what is reduced
        b.append(Buffer("reduce-scatter outputs", "comm", "device", rs,
                        "stage3.py::partition_grads"))
        b.append(Buffer("gathered parameters", "comm", "device",
                        a * min(n, float(z.max_live_parameters)), "stage3_max_live_parameters"))
        return b
    b.append(Buffer("parameters", "params", "device", a * n, "the module's own"))
    if stage == 0:
        b.append(Buffer("gradients", "grads", "device", a * n, "param.grad"))
        b.append(Buffer("fp32 master + Adam", "optimizer", "device", (4 if separate or a != 4
                        else 0) * n + 8 * n, "optimizer state"))
        return b
    b.append(Buffer("single_partition_of_fp32_groups", "optimizer", opt, 4 * shard,
                    "stage_1_and_2.py::__init__"))
    b.append(Buffer("Adam exp_avg, exp_avg_sq", "optimizer", opt, 8 * shard, "AdamW state"))
    if stage == 1:  # gradients stay whole until the boundary (fp32: BF16_Optimizer/grad_accum)
        b.append(Buffer("whole-model gradients", "grads", "device", (acc if separate else a) * n,
                        "bf16_optimizer.py / stage_1_and_2.py::_fill_param_grad_accum_attribute"))
    if separate:
        b.append(Buffer("compact fp32 gradient partition", "grads", "device", acc * shard,
                        "stage_1_and_2.py::_build_compact_grad_partition_buffer"))
    elif stage == 2 and not off:  # this rank's share of each gradient, as it is reduced
        b.append(Buffer("grads_in_partition", "grads", "device", a * shard,
                        "stage_1_and_2.py::copy_grads_in_partition", fills=n))
    if off:
        big = float(largest_param(m))
        b.append(Buffer("single_partition_of_fp32_groups[i].grad", "grads", "host", 4 * shard,
                        "stage_1_and_2.py::initialize_optimizer_states"))
        b.append(Buffer("param_buffer_of_bit16_for_cpu_offload_groups", "params", "host",
                        a * shard, "stage_1_and_2.py::__init__"))
        b.append(Buffer("temp_grad_buffer_for_gpu_offload", "comm", "device", a * big,
                        "stage_1_and_2.py::__init__"))
        b.append(Buffer("temp_grad_buffer_for_cpu_offload", "grads", "host", a * big,
                        "stage_1_and_2.py::__init__"))
        if p.grad_accum > 1 and not separate:
            b.append(Buffer("accumulated_grads_in_cpu", "grads", "host", a * shard,
                            "stage_1_and_2.py::async_accumulate_grad_in_cpu_via_gpu"))
    elif not separate:  # the fp32 partition built at the boundary for the step
        b.append(Buffer("averaged_gradients", "step", "device", acc * shard,
                        "stage_1_and_2.py::get_flat_partition"))
    # A fresh bucket each micro-step (two with overlap_comm); a CPU counts the pages written,
    # up to the model's size. ZeRO-2 (and overlap_comm) reduce from the backward's hooks, so
    # the bucket fills during the backward; plain ZeRO-1 reduces after it (process_gradients).
    rb = acc if (stage == 1 and separate) else a  # _gradient_reduction_buffer_dtype
    touched = bucket if gpu.counts_untouched else min(bucket, float(n))
    during = stage == 2 or z.overlap_comm
    b.append(Buffer("ipg bucket", "comm" if during else "step", "device",
                    rb * touched * (2 if z.overlap_comm else 1), "stage_1_and_2.py::setup_buckets",
                    fills=min(bucket, float(n)) if during else 0.0))
    # fmt: on
    return b


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Memory:
    """Per-GPU bytes by component, and host bytes per GPU."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    loss: float = 0.0
    comm: float = 0.0
    reserve: float = 0.0
    host_params: float = 0.0
    host_grads: float = 0.0
    host_optimizer: float = 0.0
    host_activations: float = 0.0
    unified_extra: float = 0.0
    """Host bytes counted in :attr:`total` because host and device are one memory (CPU)."""
    peak_phase: str = "backward"

    @property
    def host(self) -> float:
        """Host bytes per GPU at their peak (end of a micro-batch's forward)."""
        return self.host_params + self.host_grads + self.host_optimizer + self.host_activations

    @property
    def total(self) -> float:
        """Predicted peak device memory, bytes.

        The loss's backward and a block's backward happen one after the other, so only the
        larger of ``loss`` and ``transient`` is on top of the kept activations.
        """
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + max(self.transient, self.loss)
            + self.comm
            + self.reserve
            + self.unified_extra
        )

    def as_gb(self) -> dict[str, Any]:
        """Components in GB (rounded), for tables and JSON."""
        out: dict[str, Any] = {
            k.name: round(getattr(self, k.name) / GB, 3)
            for k in dataclasses.fields(self)
            if k.name != "peak_phase"
        }
        out["total"] = round(self.total / GB, 3)
        out["host"] = round(self.host / GB, 3)
        out["peak_phase"] = self.peak_phase
        return out


def activation_host_bytes(p: PlanInput) -> int:
    """Host bytes of activation offload per GPU (``train.offload.host_bytes_needed``)."""
    if not p.offload_activations:
        return 0
    m = p.model
    return host_bytes_needed(m.n_layers, m.dim, p.seq_len // p.sp, p.micro_batch, p.dtype,
                             p.checkpointing)  # fmt: skip


def memory(p: PlanInput, gpus: int, gpu: GpuSpec) -> Memory:
    """Predicted peak memory of one GPU, and its host memory (module docstring, every term)."""
    m, a = p.model, p.a
    mem = Memory()
    step_extra = 0.0
    filling: list[Buffer] = []  # written as the backward produces gradients (CPU only)
    for buf in zero_buffers(p, gpus, gpu):
        if buf.component == "step":
            step_extra += buf.bytes
        elif buf.fills and not gpu.counts_untouched:
            filling.append(buf)
        elif buf.where == "host":
            attr = f"host_{buf.component}" if buf.component != "comm" else "host_grads"
            setattr(mem, attr, getattr(mem, attr) + buf.bytes)
        else:
            setattr(mem, buf.component, getattr(mem, buf.component) + buf.bytes)

    t = p.local_tokens
    u, core, tiled = p.ulysses, p.core, p.tiled
    block = layer_activation_bytes(m, a, u, core, tiled)
    ckpt = set(checkpointed_blocks(m.n_layers, p.checkpointing))
    off = p.offload_activations
    # Kept between forward and backward, per token: a checkpointed block its input (on the
    # host when offloaded), another block its whole set.
    kept = [(0.0 if off else a * m.dim) if i in ckpt else block for i in range(m.n_layers)]
    host_kept = [a * m.dim if (off and i in ckpt) else 0.0 for i in range(m.n_layers)]
    rope = 8 * head_dim(m)  # fp32 cos/sin, shared by every block
    # The final norm's input, 1/rms and output (alive until the loss's forward has consumed
    # it, where the loss peaks) and the loss's fp32 log-sum-exp.
    final = norm_bytes(m, a) + 4
    mem.activations = t * (sum(kept) + rope + final)
    mem.host_activations = float(activation_host_bytes(p))
    # The backward walks the blocks from the last: at block i the blocks below still hold
    # what they kept (on the device or, unified, on the host), block i holds its whole set
    # plus the widest phase of its backward (its own input is in that set: the first norm
    # keeps it), and the offloader's prefetch of the input below.
    ph = block_backward_phases(m, a, u, core, tiled)
    tile = mlp_tile_bytes(m, a, p.mlp_tile) if tiled else 0.0
    widest = max(
        t * ph["mlp"] + tile, t * ph["norm"] + norm_tile_bytes(m, a, t), t * ph["attention"]
    )
    # Gradients the backward has produced by the end of block i's: the head's (untied: its
    # gradient is complete after the loss) and the final norm's, then every block from the top.
    head = (0 if m.tie_embeddings else m.vocab_size * m.dim) + m.dim
    per_block = (m.num_params() - m.vocab_size * m.dim - head) / m.n_layers
    worst = 0.0
    for i in range(m.n_layers):
        done = head + per_block * (m.n_layers - i)
        here = t * (sum(kept[:i]) + rope) + widest
        here += sum(bf.bytes * min(1.0, done / bf.fills) for bf in filling)
        if off and i > 0 and (i - 1) in ckpt:
            here += t * a * m.dim  # the prefetched input of the block below
        if gpu.unified:
            here += t * sum(host_kept[:i])
        worst = max(worst, here)
    at_loss = mem.activations + (t * sum(host_kept) if gpu.unified else 0.0)
    mem.transient = max(0.0, worst - at_loss)
    mem.loss = loss_bytes(m, a, min(p.loss_chunk, t), t)
    if gpu.unified:
        mem.unified_extra = mem.host_params + mem.host_grads + mem.host_optimizer
        mem.unified_extra += t * sum(host_kept)
    mem.comm += ring_buffer_bytes(p)
    # After the backward the activations are gone and ZeRO-1/2 build the fp32 partition for
    # the update; keep whichever phase is larger.
    if step_extra > mem.activations + max(mem.transient, mem.loss):
        mem.activations, mem.transient, mem.loss = 0.0, step_extra, 0.0
        mem.peak_phase = "optimizer step"
    mem.reserve = gpu.reserve_gb * GB + gpu.fragmentation * mem.total
    return mem


def ring_buffer_bytes(p: PlanInput) -> float:
    """Device bytes of ring attention's K/V blocks in flight (``train.ring``), 0 without ring."""
    if p.ring == 1:
        return 0.0
    return float(_ring_bytes(p).get("buffer_bytes", 0.0))


def _ring_bytes(p: PlanInput) -> dict[str, float]:
    return ring_p2p_bytes(p.model, p.seq_len, p.micro_batch, p.ulysses, p.ring, p.a)


# ---------------------------------------------------------------------------------------------
# Time


@dataclass
class Flops:
    """FLOPs per token of one GPU's work, by part (module docstring, step time)."""

    model: float
    """Model FLOPs per token (the MFU numerator): ``flops_per_token(s, causal=True)``."""
    attention: float
    """The attention part of :attr:`model` (QK^T and AV, causal)."""
    recompute: float
    """Extra FLOPs of recomputed forwards (checkpointing) per token."""
    tiled_mlp: float
    """Extra FLOPs of the tiled MLP's second forward per token."""

    @property
    def executed(self) -> float:
        """What the GPU actually runs per token."""
        return self.model + self.recompute + self.tiled_mlp

    @property
    def recompute_share(self) -> float:
        """Recomputation (checkpointing and tiling) over model FLOPs."""
        return (self.recompute + self.tiled_mlp) / self.model

    @property
    def attention_share(self) -> float:
        """Attention over model FLOPs."""
        return self.attention / self.model


def flops(p: PlanInput) -> Flops:
    """Model and executed FLOPs per token (a forward is a third of forward + backward)."""
    m = p.model
    model = m.flops_per_token(p.seq_len, causal=True)
    dense = 6.0 * m.num_params(exclude_embeddings=True)
    attention = model - dense
    head = 6.0 * m.vocab_size * m.dim  # not recomputed: the loss's gradients come in its forward
    frac = len(checkpointed_blocks(m.n_layers, p.checkpointing)) / m.n_layers
    # torch's non-reentrant checkpoint stops recomputing once the last saved tensor is back
    # (checkpoint early stop, on by default): w2's output is saved by no one, so w2 is not
    # recomputed, unless the tiled MLP runs it inside its own forward.
    w2 = 0.0 if p.tiled else 2.0 * m.dim * m.ffn_dim * m.n_layers
    recompute = frac * ((dense - head + attention) / 3 - w2)
    tiled = 6.0 * 3 * m.dim * m.ffn_dim * m.n_layers / 3 if p.tiled else 0.0
    return Flops(model, attention, recompute, tiled)


def a2a_bytes(p: PlanInput) -> float:
    """Bytes one GPU sends in Ulysses all-to-alls per micro-step: q, k, v in and the output
    back, for the forward, the backward and each recomputed forward (a share (U-1)/U leaves)."""
    u = p.ulysses
    if u == 1:
        return 0.0
    m = p.model
    kv = max(m.n_kv_heads, u)
    per_layer = p.a * p.local_tokens * head_dim(m) * (2 * m.n_heads + 2 * kv) * (u - 1) / u
    frac = len(checkpointed_blocks(m.n_layers, p.checkpointing)) / m.n_layers
    return m.n_layers * per_layer * (2 + frac)


@dataclass
class Timing:
    """Estimated step time and throughput of one GPU."""

    step_s: float
    compute_s: float
    a2a_s: float
    ring_s: float
    zero_exposed_s: float
    offload_s: float
    act_offload_copy_s: float
    act_offload_exposed_s: float
    tokens_per_s_per_gpu: float
    mfu: float


def timing(p: PlanInput, gpus: int, gpu: GpuSpec) -> Timing:
    """Estimated optimizer-step time (see the module docstring for the model)."""
    m = p.model
    n = total_params(m)
    a, t = p.a, p.local_tokens
    fl = flops(p)
    peak = gpu.peak_flops(p.dtype)
    frac = len(checkpointed_blocks(m.n_layers, p.checkpointing)) / m.n_layers
    attn_exec = fl.attention * (1 + frac / 3)
    dense_s = (fl.executed - attn_exec) * t / (peak * gpu.matmul_eff)
    attn_s = attn_exec * t / (peak * gpu.attn_eff)
    compute = (dense_s + attn_s) * (1 + gpu.elementwise_overhead)
    a2a = 0.0
    if p.ulysses > 1:
        cross_node = p.ulysses > gpu.gpus_per_node
        bw = (gpu.internode_gbps if cross_node else gpu.link_gbps) * 1e9 * gpu.comm_eff
        a2a = a2a_bytes(p) / bw
    ring = 0.0
    if p.ring > 1:
        # K/V blocks travel the ring in the forward, the backward (with the fp32 dK/dV) and
        # each recomputed forward (train.ring.ring_p2p_bytes); ring peers are a Ulysses group
        # apart, so they cross nodes once SP spans more than one. The exchange overlaps the
        # attention compute; only the excess shows.
        rb = _ring_bytes(p)
        sent = rb["step_bytes"] + frac * rb["forward_bytes"]
        cross_node = p.sp > gpu.gpus_per_node
        bw = (gpu.internode_gbps if cross_node else gpu.link_gbps) * 1e9 * gpu.comm_eff
        ring = max(0.0, sent / bw - attn_s)
    zero_s = 0.0
    if gpus > 1:
        bw = (gpu.internode_gbps if gpus > gpu.gpus_per_node else gpu.link_gbps) * 1e9
        volume = 3.0 if p.zero_stage == 3 else 2.0
        zero_s = volume * a * n * (gpus - 1) / gpus / (bw * gpu.comm_eff)
    micro = compute + a2a + ring
    zero_exposed = max(0.0, zero_s - p.grad_accum * micro * 2.0 / 3.0)
    offload = 0.0
    pcie = gpu.pcie_gbps * 1e9
    if p.offload_optimizer:  # CPU Adam on this rank's shard; gradients down, parameters up
        shard = n / gpus
        offload = shard / gpu.cpu_adam_params_per_s + (p.accum_bytes + a) * shard / pcie
    if p.offload_params:  # every parameter crosses PCIe in forward, backward (and recompute)
        offload += a * n * (2 + frac) / pcie
    copy_s = exposed = 0.0
    n_ckpt = len(checkpointed_blocks(m.n_layers, p.checkpointing))
    if p.offload_activations and n_ckpt:
        # One block input down during the next block's forward, back during the block
        # above's recompute + backward (prefetch); only the excess over that compute shows.
        one = a * m.dim * t / pcie
        fwd = compute / m.n_layers / (3 + frac)
        bwd = compute / m.n_layers * (2 + frac) / (3 + frac)
        copy_s = 2 * one * n_ckpt * p.grad_accum
        exposed = n_ckpt * p.grad_accum * (max(0.0, one - fwd) + max(0.0, one - bwd))
    step = p.grad_accum * micro + zero_exposed + offload + exposed
    tps = p.grad_accum * t / step
    return Timing(
        step, p.grad_accum * compute, p.grad_accum * a2a, p.grad_accum * ring, zero_exposed,
        offload, copy_s, exposed, tps, fl.model * tps / peak,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Search


def host_per_node(p: PlanInput, gpus: int, gpu: GpuSpec, mem: Memory | None = None) -> float:
    """Host bytes one node holds: per GPU x the GPUs of a node."""
    mem = mem or memory(p, gpus, gpu)
    return mem.host * min(gpus, gpu.gpus_per_node)


def fits(
    p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec, host_mem_gb: float | None = None
) -> bool:
    """Whether the predicted peak fits ``gpu_mem_gb`` and the node's host memory its share of
    ``host_mem_gb`` (None: host memory not limited)."""
    mem = memory(p, gpus, gpu)
    if mem.total > gpu_mem_gb * GB:
        return False
    return (
        host_mem_gb is None or host_per_node(p, gpus, gpu, mem) <= HOST_HEADROOM * host_mem_gb * GB
    )


def sp_degrees(m: ModelConfig, gpus: int, ring: int = 1) -> list[int]:
    """SP degrees that divide the GPU count and whose Ulysses part the model's heads allow."""
    return [sp for sp in range(ring, gpus + 1, ring)
            if gpus % sp == 0 and sp_valid(m, sp // ring) is None]  # fmt: skip


def max_seq_len(
    p: PlanInput,
    gpus: int,
    gpu_mem_gb: float,
    gpu: GpuSpec,
    host_mem_gb: float | None = None,
    step: int = 1024,
) -> int:
    """Longest seq_len (a multiple of ``step`` and of SP) that fits; 0 if none does."""
    q = step * p.sp // math.gcd(step, p.sp)

    def ok(k: int) -> bool:
        return fits(p.with_(seq_len=k * q), gpus, gpu_mem_gb, gpu, host_mem_gb)

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
check finds it within ~15%), and allocator behaviour varies across PyTorch/NCCL versions."""

LEVERS = ("mlp_chunk_size", "offload_activations", "offload_optimizer", "offload_params")
"""The settings that trade time for memory, besides checkpointing and SP."""


def layouts(p: PlanInput, gpus: int) -> list[PlanInput]:
    """Every valid layout of ``p`` on ``gpus``: SP degree, ZeRO stage, offloads, checkpointing,
    tiled MLP (the job's tile, else ``dim`` as ``train.mlp_chunk_size`` advises)."""
    tile = p.mlp_chunk or p.model.dim
    out = []
    for sp in sp_degrees(p.model, gpus, p.ring):
        if p.seq_len % sp:
            continue
        for zero in (0, 1, 2, 3):
            for opt in (False, True) if zero else (False,):
                for par in (False, True) if zero == 3 else (False,):
                    for ckpt in CHECKPOINTING:
                        for chunk in (0, tile):
                            for act in (False, True) if ckpt != "none" else (False,):
                                out.append(p.with_(
                                    sp=sp, zero_stage=zero, offload_optimizer=opt,
                                    offload_params=par, activation_checkpointing=ckpt,
                                    mlp_chunk_size=chunk, offload_activations=act,
                                ))  # fmt: skip
    return out


def describe(p: PlanInput) -> dict[str, Any]:
    """The layout settings of ``p`` (what the search changes), for tables and JSON."""
    return {
        "sp": p.sp,
        "ring": p.ring,
        "zero_stage": p.zero_stage,
        "offload_optimizer": p.offload_optimizer,
        "offload_params": p.offload_params,
        "activation_checkpointing": p.checkpointing,
        "mlp_chunk_size": p.mlp_chunk,
        "offload_activations": p.offload_activations,
    }


def recommend(
    p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec, host_mem_gb: float | None = None
) -> dict[str, Any] | None:
    """Fastest layout (:func:`layouts`) that fits ``p.seq_len`` with :data:`HEADROOM` of GPU
    memory to spare and the host memory; None if none does."""
    best: tuple[float, float, PlanInput] | None = None
    for q in layouts(p, gpus):
        mem = memory(q, gpus, gpu)
        if mem.total > (1 - HEADROOM) * gpu_mem_gb * GB:
            continue
        if (
            host_mem_gb is not None
            and host_per_node(q, gpus, gpu, mem) > HOST_HEADROOM * host_mem_gb * GB
        ):
            continue
        tps = timing(q, gpus, gpu).tokens_per_s_per_gpu
        if best is None or (tps, -mem.total) > best[:2]:
            best = (tps, -mem.total, q)
    if best is None:
        return None
    q = best[2]
    mem = memory(q, gpus, gpu)
    return {
        **describe(q),
        "memory_gb": round(mem.total / GB, 2),
        "host_gb_per_node": round(host_per_node(q, gpus, gpu, mem) / GB, 1),
        "tokens_per_s_per_gpu": round(best[0], 1),
        "mfu": round(timing(q, gpus, gpu).mfu, 3),
    }


def _lever_off(q: PlanInput, lever: str) -> PlanInput:
    return q.with_(**{lever: 0 if lever == "mlp_chunk_size" else False})


def longest_window(
    p: PlanInput,
    gpus: int,
    gpu_mem_gb: float,
    gpu: GpuSpec,
    host_mem_gb: float | None = None,
    step: int = 1024,
) -> dict[str, Any]:
    """The longest window this model trains on ``gpus`` GPUs of ``gpu_mem_gb`` with
    ``host_mem_gb`` of RAM per node, over every layout, and which levers make it fit.

    For the winning layout (longest window, then fastest), each lever it uses is turned off
    alone and the ceiling searched again: the lever whose removal costs the most is the one
    that makes the window fit. ``without_levers`` is the best layout with none of them.
    """
    rows = []
    for q in layouts(p, gpus):
        s = max_seq_len(q, gpus, gpu_mem_gb, gpu, host_mem_gb, step)
        if s:
            rows.append((s, q))
    if not rows:
        return {"seq_len": 0}
    top = max(s for s, _ in rows)
    best_s, best = max(
        ((s, q) for s, q in rows if s == top),
        key=lambda r: timing(r[1].with_(seq_len=r[0]), gpus, gpu).tokens_per_s_per_gpu,
    )
    at = best.with_(seq_len=best_s)
    mem, tim = memory(at, gpus, gpu), timing(at, gpus, gpu)
    lever_cost = {}
    for lever in LEVERS:
        if describe(best)[lever]:
            lever_cost[lever] = max_seq_len(_lever_off(best, lever), gpus, gpu_mem_gb, gpu,
                                            host_mem_gb, step)  # fmt: skip
    plain = [s for s, q in rows if not any(describe(q)[k] for k in LEVERS)]
    key = min(lever_cost, key=lambda k: lever_cost[k]) if lever_cost else None
    return {
        "seq_len": best_s,
        "layout": describe(best),
        "memory_gb": mem.as_gb(),
        "host_gb_per_gpu": round(mem.host / GB, 1),
        "host_gb_per_node": round(host_per_node(at, gpus, gpu, mem) / GB, 1),
        "step_s": round(tim.step_s, 2),
        "mfu": round(tim.mfu, 3),
        "without": lever_cost,
        "without_levers": max(plain, default=0),
        "makes_it_fit": key,
    }


# ---------------------------------------------------------------------------------------------
# Report


def make_plan(
    p: PlanInput, gpus: int, gpu_mem_gb: float, gpu: GpuSpec, host_mem_gb: float | None = None
) -> dict[str, Any]:
    """The whole answer as a JSON-ready dict."""
    if gpus % p.sp:
        raise LongtrainError(f"--gpus {gpus} is not divisible by parallel.sp={p.sp}")
    why = sp_valid(p.model, p.ulysses)
    if why:
        raise LongtrainError(f"parallel.sp={p.sp} {why}")
    if p.seq_len % p.sp:
        raise LongtrainError(f"data.seq_len={p.seq_len} is not divisible by parallel.sp={p.sp}")
    mem = memory(p, gpus, gpu)
    tim = timing(p, gpus, gpu)
    fl = flops(p)
    per_sp = {}
    for sp in sp_degrees(p.model, gpus, p.ring):
        row = {}
        for ckpt in CHECKPOINTING:
            try:
                q = p.with_(sp=sp, activation_checkpointing=ckpt)
            except LongtrainError:  # e.g. activation offload without checkpointing
                row[ckpt] = 0
                continue
            row[ckpt] = max_seq_len(q, gpus, gpu_mem_gb, gpu, host_mem_gb)
        per_sp[sp] = row
    node = host_per_node(p, gpus, gpu, mem)
    return {
        "gpu": gpu.name,
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "host_mem_gb": host_mem_gb,
        "params": total_params(p.model),
        "config": {
            "seq_len": p.seq_len,
            "micro_batch": p.micro_batch,
            "grad_accum": p.grad_accum,
            **describe(p),
            "dp": gpus // p.sp,
            "loss_chunk": p.loss_chunk,
            "precision": "bf16" if p.a == 2 else "fp32",
            "attention": p.core,
        },
        "memory_gb": mem.as_gb(),
        "host_gb": {
            "per_gpu": round(mem.host / GB, 3),
            "per_node": round(node / GB, 3),
            "fits": host_mem_gb is None or node <= HOST_HEADROOM * host_mem_gb * GB,
        },
        "fits": fits(p, gpus, gpu_mem_gb, gpu, host_mem_gb),
        "time": {k: round(v, 4) for k, v in dataclasses.asdict(tim).items()},
        "flops": {
            "model_per_token": fl.model,
            "executed_per_token": fl.executed,
            "recompute_share": round(fl.recompute_share, 4),
            "attention_share": round(fl.attention_share, 4),
            "a2a_bytes": a2a_bytes(p),
        },
        "max_seq_len_by_sp": per_sp,
        "recommended": recommend(p, gpus, gpu_mem_gb, gpu, host_mem_gb),
        "deepspeed": {b.name: {"component": b.component, "where": b.where,
                               "gb": round(b.bytes / GB, 3)} for b in zero_buffers(p, gpus, gpu)},
        "assumptions": dataclasses.asdict(gpu),
    }  # fmt: skip


def _levers_text(d: dict[str, Any]) -> str:
    on = []
    if d["mlp_chunk_size"]:
        on.append(f"tiled MLP ({d['mlp_chunk_size']} tokens)")
    if d["offload_activations"]:
        on.append("activation offload")
    if d["offload_optimizer"]:
        on.append("optimizer offload")
    if d["offload_params"]:
        on.append("parameter offload")
    return ", ".join(on) or "no offload or tiling"


def format_table(plan: dict[str, Any]) -> str:
    """Human-readable report of :func:`make_plan`'s result."""
    c, mem, t = plan["config"], plan["memory_gb"], plan["time"]
    lines = [
        f"{plan['params'] / 1e9:.2f}B params on {plan['gpus']} x {plan['gpu']} "
        f"({plan['gpu_mem_gb']:g} GB): seq_len {c['seq_len']}, micro_batch {c['micro_batch']}, "
        f"SP {c['sp']} x DP {c['dp']}, ZeRO-{c['zero_stage']}, checkpointing "
        f"{c['activation_checkpointing']}; {_levers_text(c)}",
        "",
        "memory per GPU (GB)",
    ]
    for k in ("params", "grads", "optimizer", "activations", "transient", "loss", "comm"):
        lines.append(f"  {k:<12} {mem[k]:>9.2f}")
    lines.append(f"  {'reserve':<12} {mem['reserve']:>9.2f}   (CUDA context, NCCL, fragmentation)")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<12} {mem['total']:>9.2f}   {verdict} (peak in {mem['peak_phase']})")
    h = plan["host_gb"]
    lines.append(
        f"host memory (GB): {h['per_gpu']:.1f} per GPU (parameters {mem['host_params']:.1f}, "
        f"gradients {mem['host_grads']:.1f}, optimizer {mem['host_optimizer']:.1f}, "
        f"activations {mem['host_activations']:.1f}); {h['per_node']:.1f} per node"
        + ("" if plan["host_mem_gb"] is None else
           f" of {plan['host_mem_gb']:g} ({'fits' if h['fits'] else 'DOES NOT FIT'} in "
           f"{HOST_HEADROOM:.0%})")
    )  # fmt: skip
    lines += [
        "",
        f"step time {t['step_s']:.2f} s (compute {t['compute_s']:.2f}, all-to-all "
        f"{t['a2a_s']:.2f}, ZeRO exposed {t['zero_exposed_s']:.2f}, offload "
        f"{t['offload_s']:.2f}, activation copies {t['act_offload_copy_s']:.2f} of which "
        f"exposed {t['act_offload_exposed_s']:.2f}); {t['tokens_per_s_per_gpu']:.0f} "
        f"tokens/s/GPU; MFU {t['mfu']:.1%}",
        "",
        "longest seq_len that fits, by SP degree and checkpointing (same ZeRO/offload/tiling)",
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
            f"spare): SP {r['sp']}, ZeRO-{r['zero_stage']}, checkpointing "
            f"{r['activation_checkpointing']}, {_levers_text(r)}: {r['memory_gb']:.1f} GB, "
            f"host {r['host_gb_per_node']:.0f} GB/node, {r['tokens_per_s_per_gpu']:.0f} "
            f"tokens/s/GPU, MFU {r['mfu']:.1%}"
        )
    return "\n".join(lines)


def format_longest(res: dict[str, Any], gpus: int, gpu: str, gpu_mem: float,
                   host_mem: float | None) -> str:  # fmt: skip
    """Human-readable report of :func:`longest_window`."""
    where = f"{gpus} x {gpu} ({gpu_mem:g} GB)" + (
        f", {host_mem:g} GB host RAM per node" if host_mem is not None else ""
    )
    if not res["seq_len"]:
        return f"longest window on {where}: nothing fits"
    d, mem = res["layout"], res["memory_gb"]
    lines = [
        f"longest window on {where}: {res['seq_len']:,} tokens",
        f"  layout: SP {d['sp']}, ZeRO-{d['zero_stage']}, checkpointing "
        f"{d['activation_checkpointing']}, {_levers_text(d)}",
        f"  GPU {mem['total']:.1f} GB (peak in {mem['peak_phase']}); host "
        f"{res['host_gb_per_gpu']:.1f} GB per GPU, {res['host_gb_per_node']:.1f} GB per node; "
        f"step {res['step_s']:.1f} s, MFU {res['mfu']:.1%}",
    ]
    if res["makes_it_fit"]:
        lines.append(f"  what makes it fit: {res['makes_it_fit']} (each lever off alone:)")
        for lever, s in res["without"].items():
            lines.append(f"    without {lever:<20} {s:>11,} tokens")
    lines.append(f"  best layout without any lever: {res['without_levers']:,} tokens")
    return "\n".join(lines)


def check_offload_memory(
    job: JobConfig, cfg: ModelConfig, stages: list[Stage], world_size: int
) -> None:
    """Refuse activation offload when this host cannot hold what its ranks would put there
    (the trainer calls it before any process group, after ``validate_job``):
    the checkpointed block inputs of the longest stage, and the optimizer states, gradients
    and parameters DeepSpeed offloads (the planner's host states, ``train.plan.memory``)."""
    on_gpu = torch.cuda.is_available()
    bf16 = job.parallel.dtype == "bf16" or (job.parallel.dtype == "auto" and on_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    need = max(
        host_bytes_needed(cfg.n_layers, cfg.dim, st.seq_len // st.sp, st.micro_batch, dtype,
                          job.parallel.activation_checkpointing)
        for st in stages
    )  # fmt: skip
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, 8)))
    # Host buffers do not depend on the device's allocator model: any GpuSpec gives them.
    states = memory(PlanInput(job, cfg, "cuda" if on_gpu else "cpu"), world_size, CPU)
    per_rank = states.host_params + states.host_grads + states.host_optimizer
    check_host_memory(need, ranks_on_host=local, other_bytes=int(per_rank * local))


def cli_plan(args: argparse.Namespace) -> int:
    """``longtrain plan --config FILE --gpus N --gpu-mem GB [--host-mem GB] [--max-seq]
    [--gpu h100] [--json]``."""
    if args.gpus < 1:
        raise LongtrainError(f"--gpus {args.gpus}: must be >= 1")
    if args.gpu_mem <= 0:
        raise LongtrainError(f"--gpu-mem {args.gpu_mem}: must be > 0 (GB per GPU)")
    host = getattr(args, "host_mem", None)
    if host is not None and host <= 0:
        raise LongtrainError(f"--host-mem {host}: must be > 0 (GB of RAM per node)")
    job = load_job(args.config, list(args.overrides or []))
    p = PlanInput.from_job(job)
    gpu = GPUS[args.gpu]
    if getattr(args, "max_seq", False):
        res = longest_window(p, args.gpus, args.gpu_mem, gpu, host)
        out = json.dumps(res, indent=2) if args.json else format_longest(
            res, args.gpus, gpu.name, args.gpu_mem, host)  # fmt: skip
        print(out)
        return 0
    plan = make_plan(p, args.gpus, args.gpu_mem, gpu, host)
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0


__all__ = [
    "CPU",
    "GPUS",
    "Buffer",
    "Flops",
    "GpuSpec",
    "Memory",
    "PlanInput",
    "Timing",
    "a2a_bytes",
    "block_backward_phases",
    "cli_plan",
    "flops",
    "layer_activation_terms",
    "longest_window",
    "make_plan",
    "max_seq_len",
    "memory",
    "recommend",
    "timing",
    "total_params",
    "zero_buffers",
]
