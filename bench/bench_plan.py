"""Checks ``longtrain plan``'s memory model against the peak memory of real CPU training runs.

Each configuration runs in a fresh process (so its peak is its own): build the model, train a
few steps with AdamW (gradients kept between steps, as DeepSpeed keeps them), and report the
peak resident memory above the process's resident memory just before the model was built
(after torch and its kernels were warmed up on a throw-away model). glibc's dynamic mmap
threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS at once
and the peak RSS is the peak of live tensors, not of malloc's caches. The prediction is
:func:`longtrain.train.plan.memory` with the CPU "device" (fp32, no runtime reserve).

    python bench/bench_plan.py                 # the whole table (a few minutes on 2 cores)
    python bench/bench_plan.py --quick         # two small configurations
    python bench/bench_plan.py --json out.json

Not a test; ``tests/test_plan.py`` runs one small configuration through :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

GB = 1e9


@dataclass
class Case:
    """One measured configuration (single process, fp32, SDPA core, ZeRO-0 semantics)."""

    flavor: str
    seq_len: int
    checkpointing: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)
    micro_batch: int = 1
    loss_chunk: int = 1024
    steps: int = 3
    docs: int = 4

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.flavor}{'(' + extra + ')' if extra else ''} s={self.seq_len} ac={self.checkpointing}"


CASES = [
    Case("debug", 8192, "none"),
    Case("tiny", 4096, "none"),
    Case("tiny", 8192, "full"),
    Case("tiny", 8192, "selective"),
    Case("125m", 2048, "none", {"n_layers": 2}),
    Case("125m", 4096, "full", {"n_layers": 4}),
]
QUICK = [CASES[1], CASES[2]]


def predict(case: Case) -> dict[str, float]:
    """The planner's per-component prediction (GB) for ``case`` on one CPU process."""
    from longtrain.model.config import get_flavor
    from longtrain.train.plan import CPU, PlanInput, memory

    p = PlanInput(
        model=get_flavor(case.flavor, **case.overrides),
        seq_len=case.seq_len,
        micro_batch=case.micro_batch,
        zero_stage=0,
        activation_checkpointing=case.checkpointing,
        loss_chunk=case.loss_chunk,
        precision="fp32",
        attention="sdpa",
    )
    return memory(p, 1, CPU).as_gb()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _checkpoint(model: Any, policy: str) -> None:
    """Wrap blocks in non-reentrant activation checkpointing (all, or every other one)."""
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, *args: Any) -> Any:
            return checkpoint(self.block, *args, use_reentrant=False)

    for i, block in enumerate(model.layers):
        if policy == "full" or (policy == "selective" and i % 2 == 0):
            model.layers[i] = Ckpt(block)


def _batch(vocab: int, b: int, s: int, docs: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    cuts = sorted(torch.randperm(s - 1, generator=g)[: docs - 1].add(1).tolist())
    offs = [r * s + c for r in range(b) for c in [0, *cuts]] + [b * s]
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "cu_seqlens": torch.tensor(offs, dtype=torch.int32),
        "max_seqlen": max(e - a for a, e in zip(offs, offs[1:])),
    }


def _train(case: Case, warm: bool) -> None:
    import torch

    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer

    cfg = get_flavor(case.flavor, **case.overrides)
    s = case.seq_len
    if warm:  # same code path at a toy size: kernels, thread pools and autograd get set up
        cfg = get_flavor("debug", max_seq_len=max(256, cfg.max_seq_len))
        s = 256
    elif cfg.max_seq_len < s:
        cfg = cfg.replace(max_seq_len=s)
    torch.manual_seed(0)
    model = Transformer(cfg, attention="sdpa")
    _checkpoint(model, case.checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for step in range(1 if warm else case.steps):
        batch = _batch(cfg.vocab_size, case.micro_batch, s, case.docs, step)
        loss_sum, count = model.loss(
            batch["input_ids"],
            batch["labels"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            chunk_size=case.loss_chunk,
        )
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # DeepSpeed keeps its gradient buffers too


def _worker(spec: str) -> None:
    import gc

    import torch

    torch.set_num_threads(1)
    case = Case(**json.loads(spec))
    _train(case, warm=True)
    gc.collect()
    base = _rss_bytes()
    t0 = time.perf_counter()
    _train(case, warm=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux
    print(json.dumps({"measured_gb": (peak - base) / GB, "seconds": time.perf_counter() - t0}))


def measure(case: Case, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``case`` in a fresh process; predicted and measured peak (GB) and their ratio."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case.name}: worker failed:\n{out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    pred = predict(case)
    return {
        "case": case.name,
        "predicted_gb": pred["total"],
        "measured_gb": round(got["measured_gb"], 3),
        "ratio": round(pred["total"] / got["measured_gb"], 3),
        "seconds": round(got["seconds"], 1),
        "components_gb": pred,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small configurations")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    rows = []
    print(f"{'configuration':<44} {'predicted':>9} {'measured':>9} {'pred/meas':>9} {'s':>6}")
    for case in QUICK if args.quick else CASES:
        r = measure(case)
        rows.append(r)
        print(
            f"{r['case']:<44} {r['predicted_gb']:>9.3f} {r['measured_gb']:>9.3f} "
            f"{r['ratio']:>9.3f} {r['seconds']:>6.1f}",
            flush=True,
        )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst deviation {worst:.1%} (target: within 20%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
