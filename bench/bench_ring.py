"""Benchmark: activation memory per rank under ring attention against SP=1 at the same length.

One forward + backward of the ``tiny`` flavor on one packed window of ``--seq-len`` tokens
(documents of 200-3000 tokens, fp32, CPU, no activation checkpointing), measured in fresh
processes of the same invocation:

- the SP=1 baseline: one process, the whole window, the SDPA core;
- each layout ``SPxRING`` of ``--layouts`` (default ``4x4``, pure ring, and ``4x2``, hybrid
  Ulysses 2 x ring 2): ``torchrun`` with ``SP`` processes over gloo, the window cut by the
  loader's own ``to_batch`` (zigzag), the model parallelized by ``parallelize``.

Two figures per rank: *saved activations*, the bytes autograd keeps for the backward
(``saved_tensors_hooks``; distinct storages, parameters left out; the chunked loss's saved
gradients, including its fp32 head-weight accumulator, counted in), and *peak RSS growth*
during the forward + backward above the RSS before it (VmHWM reset just before; glibc mmap
threshold pinned at 64 KiB so freed tensors leave the process). The worst rank is compared
with the baseline. Target at (sp=4, ring=4): at most 0.35x.

    python bench/bench_ring.py                       # 8192 tokens, layouts 4x4 and 4x2
    python bench/bench_ring.py --seq-len 16384 --layouts 4x4

Prints a table and one JSON line; paste both into bench/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from longtrain.train.metrics import peak_rss_bytes, reset_peak_rss
from longtrain.train.parallel import free_port

TARGET = 0.35


def window(seq_len: int, vocab: int) -> dict[str, Any]:
    """One packed window (the loader's ``packed`` dict) of random documents, seeded."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths, total = [], 0
    while total < seq_len:
        n = min(int(rng.integers(200, 3000)), seq_len - total)
        lengths.append(n)
        total += n
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int64)  # (1, L)
    return {
        "input_ids": rng.integers(0, vocab, size=(1, seq_len)).astype(np.int64),
        "labels": rng.integers(0, vocab, size=(1, seq_len)).astype(np.int64),
        "position_ids": pos,
        "cu_seqlens": cu,
        "max_seqlen": int(max(lengths)),
    }


def measure(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Saved-activation bytes of one forward, peak RSS growth of forward + backward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    before = peak_rss_bytes()
    reset_peak_rss()
    base = _rss()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, n = model.loss(batch["input_ids"], batch["labels"], batch["position_ids"],
                          batch["cu_seqlens"], batch["max_seqlen"], 1024)  # fmt: skip
    (s / n).backward()
    seconds = time.perf_counter() - t0
    return {
        "saved_bytes": sum(seen.values()),
        "peak_growth_bytes": max(0, peak_rss_bytes() - base),
        "rss_before_bytes": base,
        "peak_before_bytes": before,
        "loss_sum": float(s.detach()),
        "tokens": int(n),
        "seconds": seconds,
    }


def warm_up(model: Any, batch: dict[str, Any]) -> None:
    """One pass first, in every configuration: the ring plan, the gloo buffers, the kernels'
    first calls and the allocator's first pages are start-up costs, not activations."""
    s, _ = model.loss(batch["input_ids"], batch["labels"], batch["position_ids"],
                      batch["cu_seqlens"], batch["max_seqlen"], 1024)  # fmt: skip
    s.backward()
    model.zero_grad(set_to_none=True)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _model(seq_len: int) -> Any:
    import torch

    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer

    cfg = get_flavor("tiny", max_seq_len=seq_len)
    torch.manual_seed(0)
    return Transformer(cfg, attention="sdpa")


def worker(kind: str, seq_len: int, sp: int, ring: int, out: str) -> None:
    """``base``: SP=1 in this process; ``ring``: one rank of an ``sp`` x ``ring`` layout."""
    import torch

    from longtrain.data.loader import to_batch

    model = _model(seq_len)
    packed = window(seq_len, model.cfg.vocab_size)
    if kind == "base":
        batch = {k: (torch.from_numpy(v) if hasattr(v, "dtype") else v) for k, v in packed.items()}
        warm_up(model, batch)
        res = measure(model, batch)
        Path(out).write_text(json.dumps({"ranks": [res]}))
        return
    import torch.distributed as dist

    from longtrain.train.parallel import build_topology, init_distributed, parallelize

    rank, world, _ = init_distributed(timeout_s=600)
    topo = build_topology(sp, ring)
    parallelize(model, topo, job=None)
    batch = to_batch(packed, [0], topo.sp_rank, sp, ring)
    warm_up(model, batch)
    dist.barrier()
    res = measure(model, batch)
    res["rank"] = rank
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


def _run(cmd: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(
        os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536"
    )
    subprocess.run([*cmd, out], env=env, check=True, timeout=3600)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--layouts", default="4x4,4x2", help="comma-separated SPxRING layouts")
    a = ap.parse_args()
    layouts = [tuple(int(x) for x in s.split("x")) for s in a.layouts.split(",") if s]
    _say(f"SP=1 baseline, {a.seq_len} tokens")
    base_cmd = [sys.executable, __file__, "--worker", "base", str(a.seq_len), "1", "1"]
    base = _run(base_cmd)["ranks"][0]
    rows = []
    for sp, ring in layouts:
        _say(f"sp={sp} ring={ring} ({sp} processes)")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker",
               "ring", str(a.seq_len), str(sp), str(ring)]  # fmt: skip
        ranks = _run(cmd)["ranks"]
        worst_saved = max(r["saved_bytes"] for r in ranks)
        worst_peak = max(r["peak_growth_bytes"] for r in ranks)
        loss = sum(r["loss_sum"] for r in ranks) / sum(r["tokens"] for r in ranks)
        rows.append({
            "sp": sp, "ring": ring, "ulysses": sp // ring,
            "saved_mb": [r["saved_bytes"] / 2**20 for r in ranks],
            "peak_growth_mb": [r["peak_growth_bytes"] / 2**20 for r in ranks],
            "saved_ratio": worst_saved / base["saved_bytes"],
            "peak_ratio": worst_peak / base["peak_growth_bytes"],
            "loss_rel_diff": abs(loss - base["loss_sum"] / base["tokens"])
            / (base["loss_sum"] / base["tokens"]),
            "seconds": max(r["seconds"] for r in ranks),
        })  # fmt: skip
    res = {
        "seq_len": a.seq_len,
        "flavor": "tiny",
        "base_saved_mb": base["saved_bytes"] / 2**20,
        "base_peak_growth_mb": base["peak_growth_bytes"] / 2**20,
        "base_seconds": base["seconds"],
        "rows": rows,
    }
    print(f"\ntiny, {a.seq_len} tokens in one packed window, fp32, fwd+bwd, no checkpointing")
    print(f"{'layout':>18}{'saved MB':>10}{'ratio':>7}{'peak MB':>9}{'ratio':>7}{'loss rel':>10}")
    print(f"{'SP=1':>18}{res['base_saved_mb']:10.1f}{1:7.2f}{res['base_peak_growth_mb']:9.1f}"
          f"{1:7.2f}{0:10.1e}")  # fmt: skip
    for r in rows:
        name = f"sp={r['sp']} ring={r['ring']}"
        print(f"{name:>18}{max(r['saved_mb']):10.1f}{r['saved_ratio']:7.2f}"
              f"{max(r['peak_growth_mb']):9.1f}{r['peak_ratio']:7.2f}{r['loss_rel_diff']:10.1e}")  # fmt: skip
    for r in rows:
        if r["sp"] == 4 and r["ring"] == 4:
            ok = r["saved_ratio"] <= TARGET and r["peak_ratio"] <= TARGET
            print(f"target (sp=4, ring=4) <= {TARGET}x SP=1: {'meets' if ok else 'MISSES'}")
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, seq, sp, ring, out = sys.argv[2:7]
        worker(kind, int(seq), int(sp), int(ring), out)
    else:
        main()
