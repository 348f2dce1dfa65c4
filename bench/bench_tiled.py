"""Benchmark: peak memory of the sequence-tiled MLP against the whole-sequence MLP.

One training step at 16K tokens of the ``tiny`` flavor widened to ``ffn_dim`` 4096, with full
activation checkpointing, chunked loss and AdamW (fp32, CPU, batch 1), run twice in the same
invocation: ``train.mlp_chunk_size`` 0 (whole) and the tile size (default: ``dim``, ALST's
rule, see ``longtrain.model.tiled``). Each configuration runs in a fresh process; its peak is
that process's VmHWM (``train.metrics.peak_rss_bytes``), the glibc mmap threshold pinned at
64 KiB as in bench_plan so freed tensors leave the process at once. The figure above an
import-only process is reported too. Target: tiled peak <= 0.75x whole.

    python bench/bench_tiled.py                      # 16K tokens, ffn_dim 4096, 2 steps
    python bench/bench_tiled.py --seq-len 8192 --steps 1 --threads 2

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

from longtrain.train.metrics import peak_rss_bytes


def worker(seq_len: int, ffn_dim: int, chunk: int, steps: int, out: str) -> None:
    """One configuration: build, train ``steps`` steps, write peak RSS and step times."""
    import torch

    from longtrain.model.config import get_flavor
    from longtrain.model.tiled import apply_tiled_mlp
    from longtrain.model.transformer import Transformer
    from longtrain.train.parallel import apply_activation_checkpointing

    if chunk < 0:  # imports only
        Path(out).write_text(json.dumps({"peak_gb": peak_rss_bytes() / 1e9}))
        return
    cfg = get_flavor("tiny", ffn_dim=ffn_dim, max_seq_len=seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg, attention="sdpa")
    apply_tiled_mlp(model, chunk)
    apply_activation_checkpointing(model, "full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
        t0 = time.perf_counter()
        s, n = model.loss(ids, labels, chunk_size=1024)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(s.detach() / n))
    res = {"peak_gb": peak_rss_bytes() / 1e9, "step_s": times, "losses": losses}
    Path(out).write_text(json.dumps(res))


def _run(args: list[str], threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        DS_ACCELERATOR="cpu",
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    subprocess.run(
        [sys.executable, __file__, "--worker", *args, out], env=env, check=True, timeout=3600
    )
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--ffn-dim", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=0, help="tile size (default: the model's dim)")
    ap.add_argument("--steps", type=int, default=2, help="the 2nd step has the AdamW states too")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from longtrain.model.config import get_flavor

    cfg = get_flavor("tiny", ffn_dim=a.ffn_dim, max_seq_len=a.seq_len)
    chunk = a.chunk or cfg.dim
    common = [str(a.seq_len), str(a.ffn_dim)]
    _say("import-only process")
    base = _run([*common, "-1", "0"], a.threads)["peak_gb"]
    _say(f"whole MLP, {a.seq_len} tokens, ffn_dim {a.ffn_dim}")
    whole = _run([*common, "0", str(a.steps)], a.threads)
    _say(f"tiled MLP, {chunk} tokens per tile")
    tiled = _run([*common, str(chunk), str(a.steps)], a.threads)
    res = {
        "seq_len": a.seq_len,
        "flavor": "tiny",
        "ffn_dim": a.ffn_dim,
        "chunk": chunk,
        "steps": a.steps,
        "threads": a.threads,
        "import_only_gb": base,
        "whole_peak_gb": whole["peak_gb"],
        "tiled_peak_gb": tiled["peak_gb"],
        "peak_ratio": tiled["peak_gb"] / whole["peak_gb"],
        "above_imports_ratio": (tiled["peak_gb"] - base) / (whole["peak_gb"] - base),
        "whole_step_s": whole["step_s"],
        "tiled_step_s": tiled["step_s"],
        "first_loss_equal": whole["losses"][0] == tiled["losses"][0],
    }
    print(
        f"\ntiny, ffn_dim {a.ffn_dim}, {a.seq_len} tokens, full checkpointing, fp32, "
        f"{a.steps} steps, {a.threads} thread(s)"
    )
    print(f"{'':30}{'whole':>10}{'tiled':>10}{'ratio':>8}")
    print(
        f"{'peak RSS (GB)':30}{whole['peak_gb']:10.3f}{tiled['peak_gb']:10.3f}"
        f"{res['peak_ratio']:8.2f}"
    )
    print(
        f"{'peak RSS above imports (GB)':30}{whole['peak_gb'] - base:10.3f}"
        f"{tiled['peak_gb'] - base:10.3f}{res['above_imports_ratio']:8.2f}"
    )
    print(
        f"{'last step (s)':30}{whole['step_s'][-1]:10.1f}{tiled['step_s'][-1]:10.1f}"
        f"{tiled['step_s'][-1] / whole['step_s'][-1]:8.2f}"
    )
    verdict = "meets" if res["peak_ratio"] <= 0.75 else "MISSES"
    same = res["first_loss_equal"]
    print(f"target peak ratio <= 0.75: {verdict}; same first-step loss: {same}")
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        seq, ffn, chunk, steps, out = sys.argv[2:7]
        worker(int(seq), int(ffn), int(chunk), int(steps), out)
    else:
        main()
