"""Peak memory and time of an attention core against sequence length, documents held fixed.

    python bench/bench_attention.py                      # sdpa on CPU, T = 2K..16K, 4 documents
    python bench/bench_attention.py --lengths 4096,8192 --docs 8 --core reference

Each length runs forward + backward in a fresh subprocess, so the peak resident set size
(VmHWM, see ``train.metrics.peak_rss_bytes``) belongs to that length alone; the figure reported is the growth of the peak
over the process's resident size just before the attention call (inputs already allocated).
On CUDA it is ``torch.cuda.max_memory_allocated`` instead. With a fixed number of documents
each document grows with T: a core that materialises (L, L) scores grows 4x per doubling,
a linear-memory core about 2x. Exits 1 if a doubling of T grows memory by more than
``--max-ratio`` (default 2.3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from longtrain.train.metrics import peak_rss_bytes


def measure(
    core: str, seq_len: int, docs: int, heads: int, kv_heads: int, head_dim: int, device: str
) -> dict:
    """One measurement, run inside the child process."""
    import torch

    from longtrain.model.attention import make_core

    torch.manual_seed(0)
    # Uneven documents: lengths proportional to 1, 2, ..., docs.
    weights = list(range(1, docs + 1))
    lens = [seq_len * w // sum(weights) for w in weights]
    lens[-1] += seq_len - sum(lens)
    cu = torch.tensor(
        [0] + [sum(lens[: i + 1]) for i in range(docs)], dtype=torch.int32, device=device
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype)
    attn = make_core(core)
    # Warm-up on a tiny window so one-time kernel setup is neither timed nor counted.
    w = [t[:, :64].detach().requires_grad_(True) for t in (q, k, v)]
    attn(*w, cu_seqlens=None).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    t0 = time.perf_counter()
    out = attn(q, k, v, cu_seqlens=cu, max_seqlen=max(lens))
    out.backward(dout)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    return {"T": seq_len, "seconds": time.perf_counter() - t0, "peak_mb": (peak - base) / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--core", default="sdpa")
    p.add_argument("--lengths", default="2048,4096,8192,16384")
    p.add_argument("--docs", type=int, default=4, help="documents per window (fixed across T)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-ratio", type=float, default=2.3)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        r = measure(a.core, a.child, a.docs, a.heads, a.kv_heads, a.head_dim, a.device)
        print(json.dumps(r))
        return 0
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(T)] + [
            f"--core={a.core}", f"--docs={a.docs}", f"--heads={a.heads}", f"--kv-heads={a.kv_heads}",
            f"--head-dim={a.head_dim}", f"--device={a.device}",
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"core={a.core} device={a.device} docs={a.docs} heads={a.heads}/{a.kv_heads} "
        f"head_dim={a.head_dim} (forward + backward)"
    )
    print(f"{'T':>8} {'peak MB':>10} {'x prev':>7} {'seconds':>9} {'x prev':>7}")
    ok = True
    for i, r in enumerate(rows):
        mem_ratio = r["peak_mb"] / rows[i - 1]["peak_mb"] if i else float("nan")
        t_ratio = r["seconds"] / rows[i - 1]["seconds"] if i else float("nan")
        doubled = i and r["T"] == 2 * rows[i - 1]["T"]
        if doubled and mem_ratio > a.max_ratio:
            ok = False
        print(
            f"{r['T']:>8} {r['peak_mb']:>10.1f} {mem_ratio:>7.2f} {r['seconds']:>9.3f} {t_ratio:>7.2f}"
        )
    print(f"memory per doubling of T <= {a.max_ratio}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
