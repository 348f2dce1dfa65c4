"""What a run reports: tokens/s, MFU, memory, losses -> metrics.jsonl, TensorBoard, W&B, a PNG.

MFU conventions (written here once, used everywhere). Model FLOPs are 6 x (matmul parameters,
LM head included, input embedding excluded) per token, plus the attention score/value matmuls
(QK^T and AV, forward + backward) counted for the causal triangle only. Activation
recomputation is NOT counted (it is work the hardware does but not model FLOPs), so turning
on activation checkpointing lowers MFU. The attention term comes in two conventions, and a
training row logs both:

- ``mfu`` (``mfu_convention: "document"``): causal within each packed document,
  ``12 * n_layers * n_heads * head_dim * sum(L_i^2) / 2`` per window, from the window's own
  ``cu_seqlens`` (:func:`flops_per_window`). This is what the varlen / per-document kernels
  compute under ``data.attention=document``.
- ``mfu_window``: causal over the whole window, ``T^2 / 2`` per row
  (``ModelConfig.flops_per_token(T, causal=True)``, the Megatron-LM / torchtitan convention).
  With long windows of short documents it overstates the work several-fold; it is the number
  to compare with other codebases, and equals ``mfu`` under ``data.attention=causal``.

MFU = model FLOPs per second over all ranks / (ranks x peak FLOP/s of one device). The peak
is the dense (no structured sparsity) tensor-core figure of the GPU's datasheet for the
compute dtype (:data:`GPU_PEAKS`); a GPU not in the table, or a MIG slice, gets a measured
large-GEMM rate (:func:`measure_matmul_flops`), or no MFU at all, with the reason, if that
fails. On CPU the peak is the fp32 matmul rate this process measured at start-up (so CPU MFU
says how close the run gets to a large matmul on the same cores, not to a datasheet).

Only rank 0 writes anything; other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtrain.model.config import ModelConfig


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peaks of one GPU part, dense (without 2:4 sparsity), TFLOP/s."""

    name: str
    pattern: str
    """Regex matched against ``torch.cuda.get_device_name()`` upper-cased; ``\\b`` keeps
    ``GH200`` from matching ``H200`` and ``GB200`` from matching ``B200``."""
    bf16: float
    """BF16/FP16 tensor cores with fp32 accumulation. TF32 tensor cores run at half of it."""
    fp32: float
    """FP32 on the CUDA cores (no TF32)."""


# NVIDIA datasheets quote tensor-core rates "with sparsity"; dense is half of that figure.
# Most specific patterns first: the first match wins.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    # GH200 Grace Hopper Superchip datasheet: BF16 990 TF (1,979 sparse), FP32 67 TF.
    GpuPeak("GH200", r"\bGH200\b", 989.4, 67.0),
    # H200 datasheet, H200 NVL column: BF16 1,671 TF sparse, FP32 60 TF.
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", 835.5, 60.0),
    # H200 datasheet, H200 SXM column: BF16 1,979 TF sparse, FP32 67 TF.
    GpuPeak("H200 SXM", r"\bH200\b", 989.4, 67.0),
    # H100 datasheet, H100 NVL column: BF16 1,671 TF sparse, FP32 60 TF.
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", 835.5, 60.0),
    # H100 datasheet, H100 PCIe column: BF16 1,513 TF sparse, FP32 51 TF.
    GpuPeak("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756.5, 51.0),
    # H100 datasheet, SXM column: BF16 1,979 TF sparse; H100 whitepaper: 989.4 dense, FP32 66.9.
    GpuPeak("H100 SXM", r"\bH100\b", 989.4, 66.9),
    # A100 datasheet (40/80 GB, SXM4 and PCIe alike): BF16 312 TF (624 sparse), FP32 19.5 TF.
    GpuPeak("A100", r"\bA100\b", 312.0, 19.5),
    # HGX B200 datasheet (8 GPUs): FP16/BF16 36 PF sparse -> 2.25 PF dense each, FP32 600 TF/8.
    GpuPeak("B200", r"\bB200\b", 2250.0, 75.0),
)


def set_tf32_policy(enabled: bool) -> str:
    """Set, once at start-up, whether fp32 matmuls and convolutions may use TF32 tensor cores.

    Uses the legacy switches (``torch.set_float32_matmul_precision`` and
    ``torch.backends.cudnn.allow_tf32``) on purpose: torch >= 2.9 raises if the legacy and the
    new ``fp32_precision`` APIs are mixed, and libraries (transformers, DeepSpeed, inductor)
    read the legacy ones. Also decides the fp32 peak :func:`device_peak_flops` uses. Returns a
    line to log.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    state = "on" if enabled else "off"
    return f"TF32 {state} for fp32 matmuls and convolutions (bf16/fp16 GEMMs are unaffected)"


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may run on TF32 tensor cores (torch's current setting)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # someone used the new API: read it back the same way
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The :data:`GPU_PEAKS` entry for a ``torch.cuda.get_device_name()`` string, or None.

    A MIG slice (``... MIG 1g.10gb``) has a fraction of the part's peak: None, so it is measured.
    """
    name = device_name.upper()
    if "MIG" in name.split():
        return None
    for peak in GPU_PEAKS:
        if re.search(peak.pattern, name):
            return peak
    return None


def datasheet_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Dense datasheet FLOP/s of a named GPU for ``dtype`` compute, or None when not listed."""
    peak = gpu_peak(device_name)
    if peak is None:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return peak.bf16 * 1e12
    return (peak.bf16 / 2 if tf32 else peak.fp32) * 1e12


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, how it was obtained); None when there is no honest peak.

    A listed GPU: its datasheet figure for ``dtype`` (fp32: the TF32 figure when TF32 is on).
    Another GPU: a measured large GEMM in ``dtype``. CPU: measured fp32 matmul (CPU trains in
    fp32). The reason is part of the returned string either way; log it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = dtype == torch.float32 and tf32_enabled()
        flops = datasheet_peak_flops(name, dtype, tf32=tf32)
        if flops is not None:
            kind = "tf32" if tf32 else ("bf16" if dtype != torch.float32 else "fp32")
            return flops, f"{gpu_peak(name).name} datasheet, dense {kind}"  # type: ignore[union-attr]
        try:
            n = 8192
            return measure_matmul_flops(device, dtype, n=n), (
                f"measured {dtype} GEMM n={n} on {name} (not in the datasheet table)"
            )
        except Exception as e:  # OOM on a small slice, a broken driver: no MFU, say why
            return (
                None,
                f"no MFU: {name} is not in the datasheet table and the GEMM probe failed ({type(e).__name__})",
            )
    return measure_matmul_flops(device, torch.float32), "measured fp32 matmul on CPU"


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, seconds: float = 0.3
) -> float:
    """Sustained square-matmul FLOP/s on this device with this process's threads.

    CUDA: n >= 8192 (a smaller GEMM does not fill the GPU), timed with CUDA events around a
    batch of GEMMs and one synchronisation. CPU: n=512 for ``seconds`` (the suite runs this at
    every start-up, so it stays short).
    """
    device = torch.device(device)
    if device.type == "cuda":
        n = max(8192, n or 8192)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
            torch.mm(a, b, out=out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        start.record()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()  # the one sync
        el = start.elapsed_time(end) / 1e3
        del a, b, out
        return 2.0 * n**3 * reps / el
    n = n or 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: allocator, thread pool
        a @ b
    reps, start_t = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        el = time.perf_counter() - start_t
        if el >= seconds and reps >= 3:
            return 2.0 * n**3 * reps / el


# ---------------------------------------------------------------------------------------------
# Model FLOPs of packed windows


def doc_lengths(cu_seqlens: torch.Tensor | np.ndarray | Sequence[int]) -> list[int]:
    """Document lengths from offsets over the flattened B*T tokens.

    Pass the loader's CPU tensor (before it is moved to the GPU): reading it is then free.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        offs = cu_seqlens.tolist()
    else:
        offs = [int(x) for x in cu_seqlens]
    return [int(b) - int(a) for a, b in zip(offs, offs[1:])]


def attention_flops(cfg: ModelConfig, lengths: Sequence[int]) -> float:
    """Forward + backward FLOPs of causal attention within each document of ``lengths``.

    ``12 * n_layers * n_heads * head_dim * sum(L_i^2) / 2``: 4 L^2 h d per layer for QK^T and
    AV forward (2 FLOPs a multiply-add), times 3 for the backward, halved for the causal
    triangle -- the same term as ``ModelConfig.flops_per_token`` for one document of L = T.
    """
    sq = sum(int(n) * int(n) for n in lengths)
    return 6.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * sq  # type: ignore[operator]


def flops_per_window(cfg: ModelConfig, lengths: Sequence[int]) -> float:
    """Model FLOPs (forward + backward) of the documents ``lengths`` with document masking:
    6 x matmul parameters per token plus :func:`attention_flops`."""
    tokens = sum(int(n) for n in lengths)
    return 6.0 * cfg.num_params(exclude_embeddings=True) * tokens + attention_flops(cfg, lengths)


class FlopsMeter:
    """Model FLOPs this rank did since the last logged row, under both MFU conventions.

    Feed it every micro-batch (:meth:`add`, with the batch's CPU ``cu_seqlens``: no device
    sync), and at a logged row sum :meth:`totals` over all ranks and call :meth:`row`. Under
    sequence parallelism every SP rank sees the whole window's ``cu_seqlens`` but does 1/sp of
    its work, so it counts 1/sp of the window: the sum over ranks is the true total.
    """

    def __init__(self, cfg: ModelConfig, sp: int = 1) -> None:
        self.cfg = cfg
        self.sp = int(sp)
        self.reset()

    def reset(self) -> None:
        """Start a new interval (call after each logged row)."""
        self.doc = 0.0
        self.window = 0.0

    def add(
        self, cu_seqlens: torch.Tensor | Sequence[int] | None, seq_len: int, batch: int = 1
    ) -> None:
        """One micro-batch of ``batch`` windows of ``seq_len`` tokens (the full window, not the
        SP shard); ``cu_seqlens`` over its B*T tokens, None for one causal document per row."""
        lengths = [seq_len] * batch if cu_seqlens is None else doc_lengths(cu_seqlens)
        total = sum(lengths)
        if total != batch * seq_len:
            raise ValueError(
                f"cu_seqlens covers {total} tokens, expected batch * seq_len = {batch * seq_len}"
            )
        self.doc += flops_per_window(self.cfg, lengths) / self.sp
        self.window += self.cfg.flops_per_token(seq_len, causal=True) * total / self.sp

    def totals(self) -> list[float]:
        """``[doc, window]`` FLOPs of this rank, to be summed over all ranks."""
        return [self.doc, self.window]

    @staticmethod
    def row(
        totals: Sequence[float], seconds: float, n_devices: int, peak: float | None
    ) -> dict[str, Any]:
        """The MFU fields of a logged row from the all-rank ``totals`` over ``seconds``."""
        doc, window = totals
        denom = seconds * n_devices * peak if peak else 0.0
        return {
            "mfu": doc / denom if denom > 0 else None,
            "mfu_window": window / denom if denom > 0 else None,
            "mfu_convention": "document",
        }


# ---------------------------------------------------------------------------------------------
# Memory


def peak_rss_bytes() -> int:
    """Peak resident memory of this process, in bytes.

    Read from VmHWM rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec,
    so a rank started from a large parent (a pytest process, a launcher) would report the
    parent's peak. VmHWM belongs to the process's own address space and starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    # No procfs (macOS): ru_maxrss is in bytes there, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Lower VmHWM to the current RSS (Linux >= 4.0), so a later peak is the peak since now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank since the last :func:`reset_peak_memory` (or the start): CUDA
    allocator peak on GPU, peak RSS of the process on CPU."""
    return peak_memory(device)["peak_mem_gb"]


def peak_memory(device: torch.device) -> dict[str, float]:
    """This rank's peaks since the last :func:`reset_peak_memory`, in GB (1e9 bytes).

    CUDA: ``peak_mem_gb`` (allocated by tensors) and ``peak_reserved_gb`` (held by the caching
    allocator: what the GPU really lost, fragmentation included). CPU: ``peak_mem_gb``, the
    process's peak resident set.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {"peak_mem_gb": peak_rss_bytes() / 1e9}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory interval (call right after logging a row)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def mfu(
    flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1] (see the module docstring for the convention); None
    when there is no peak to divide by."""
    if peak is None:
        return None
    if peak <= 0 or n_devices <= 0:
        return 0.0
    return flops_per_token * tokens_per_s / (n_devices * peak)


class MetricsLogger:
    """metrics.jsonl + TensorBoard (tb/) + optional W&B; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # A job killed after its last checkpoint logged steps that will be redone: drop them.
            keep = [r for r in self._read() if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except ImportError:  # tensorboard not installed: jsonl still works
                self.tb = None
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=wandb_project,
                    dir=str(self.run_dir),
                    config=config or {},
                    resume="allow",
                )
            except Exception as e:  # no network / no login: keep training, say why once
                print(f"wandb disabled: {e.__class__.__name__}: {e}")
                self.wandb = None

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (a JSON object with at least ``step``) everywhere."""
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(row["step"])
        if self.tb is not None:
            flat: dict[str, Any] = {}
            for k, v in row.items():  # a mapping (tokens_by_source) becomes one tag per entry
                flat.update(
                    {f"{k}/{s}": x for s, x in v.items()} if isinstance(v, dict) else {k: v}
                )
            for k, v in flat.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    # val_* and long_eval/* keep their names; the rest go under train/.
                    tag = k if k.startswith(("val", "long_eval/")) else f"train/{k}"
                    self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if k != "step"}, step=step)

    def plot(self) -> Path | None:
        """Write loss_curve.png (train loss and validation loss against step)."""
        if not self.enabled:
            return None
        rows = self._read()
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if not train and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.run_dir / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
