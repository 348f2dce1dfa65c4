"""What a run reports: tokens/s, MFU, memory, losses -> metrics.jsonl, TensorBoard, W&B, a PNG.

MFU convention (written here once, used everywhere): model FLOPs per token are
``ModelConfig.flops_per_token(seq_len, causal=True)`` = 6 x (matmul parameters, LM head
included, input embedding excluded) + the attention score/value matmuls counted for the causal
lower triangle only, forward + backward. Activation recomputation is NOT counted (it is work
the hardware does but not model FLOPs), so turning on activation checkpointing lowers MFU.
MFU = model FLOPs per second over all ranks / (ranks x peak FLOP/s of one device), where the
peak is the dense bf16 tensor-core figure of the GPU (A100/H100/H200 table below) or, on CPU,
the fp32 matmul rate this process measured at start-up (so CPU MFU says how close the run gets
to a large matmul on the same cores, not to a datasheet).

Only rank 0 writes anything; other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s per device (NVIDIA datasheets, without structured sparsity).
GPU_PEAK_FLOPS: dict[str, float] = {
    "a100": 312e12,
    "h100": 989e12,  # SXM; the PCIe part is 756e12
    "h200": 989e12,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                if "h100" in name and "pcie" in name:
                    flops = 756e12
                if dtype == torch.float32:
                    flops = flops / 16  # fp32 without TF32 tensor cores, roughly
                return flops, f"{key} datasheet"
        return measure_matmul_flops(device, dtype), f"measured matmul on {name}"
    return measure_matmul_flops(device, torch.float32), "measured fp32 matmul on CPU"


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 512, seconds: float = 0.3
) -> float:
    """Sustained square-matmul FLOP/s on this device with this process's threads."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: allocator, thread pool
        a @ b
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        el = time.perf_counter() - start
        if el >= seconds and reps >= 3:
            return 2.0 * n**3 * reps / el


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
    """Peak memory of this rank: CUDA allocator peak on GPU, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1] (see the module docstring for the convention)."""
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
            for k, v in row.items():
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
