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
    python bench/bench_plan.py --levers        # tiled MLP, activation and optimizer offload
    python bench/bench_plan.py --json out.json

Not a test; ``tests/test_plan.py`` runs one small configuration through :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from longtrain.train.metrics import peak_rss_bytes

GB = 1e9


@dataclass
class Case:
    """One measured configuration (fp32, SDPA core).

    ``trainer=False``: one process, plain AdamW (ZeRO-0 semantics). ``trainer=True``:
    ``longtrain pretrain`` (DeepSpeed) on ``ranks`` processes with ``sp`` and ``zero``.
    """

    flavor: str
    seq_len: int
    checkpointing: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)
    micro_batch: int = 1
    loss_chunk: int = 1024
    steps: int = 3
    docs: int = 4
    trainer: bool = False
    ranks: int = 1
    sp: int = 1
    zero: int = 0
    mlp_chunk: int = 0
    offload_acts: bool = False
    offload_opt: bool = False

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        name = f"{self.flavor}{'(' + extra + ')' if extra else ''} s={self.seq_len} ac={self.checkpointing}"
        if self.mlp_chunk:
            name += f" mlp={self.mlp_chunk}"
        if self.offload_acts:
            name += " offload_acts"
        if self.offload_opt:
            name += " offload_opt"
        if self.trainer:
            name += f" pretrain ranks={self.ranks} sp={self.sp} zero={self.zero}"
        return name


CASES = [
    Case("debug", 8192, "none"),
    Case("tiny", 4096, "none"),
    Case("tiny", 8192, "full"),
    Case("tiny", 8192, "selective"),
    Case("125m", 2048, "none", {"n_layers": 2}),
    Case("125m", 4096, "full", {"n_layers": 4}),
    # The real trainer (DeepSpeed, fp32 on CPU): ZeRO stages, DP and SP over 2 ranks.
    Case("tiny", 4096, "none", trainer=True, ranks=1, zero=0),
    Case("125m", 2048, "full", {"n_layers": 4}, trainer=True, ranks=2, zero=1),
    Case("125m", 2048, "full", {"n_layers": 4}, trainer=True, ranks=2, zero=2),
    Case("125m", 2048, "full", {"n_layers": 4}, trainer=True, ranks=2, zero=3),
    Case("tiny", 8192, "none", trainer=True, ranks=2, sp=2, zero=2),
    Case("tiny", 16384, "full", trainer=True, ranks=2, sp=2, zero=3),
    # Added after the DeepSpeed bucket terms were revised (2026-11-29): held-out checks.
    Case("tiny", 8192, "selective", trainer=True, ranks=2, sp=1, zero=1),
    Case("125m", 4096, "full", {"n_layers": 2}, trainer=True, ranks=2, sp=2, zero=3),
    Case("125m", 4096, "selective", {"n_layers": 4}, trainer=True, ranks=2, sp=2, zero=2),
]
# The memory-ceiling levers (2026-12-01): the tiled MLP (a tile that does not divide the local
# length), activation offload (host and device are one memory on a CPU: the host copies count),
# optimizer offload (DeepSpeed's gradient partitions move to host buffers).
LEVERS = [
    Case("tiny", 16384, "full", {"ffn_dim": 2048}, mlp_chunk=300),
    Case("tiny", 8192, "none", {"ffn_dim": 2048}, mlp_chunk=300),
    Case(
        "tiny", 8192, "selective", {"ffn_dim": 2048}, mlp_chunk=300, trainer=True, ranks=2, zero=2
    ),  # fmt: skip
    Case(
        "tiny", 16384, "full", {"ffn_dim": 2048}, mlp_chunk=300, trainer=True, ranks=2, sp=2, zero=3
    ),  # fmt: skip
    Case(
        "tiny",
        16384,
        "full",
        {"ffn_dim": 2048},
        mlp_chunk=300,
        offload_acts=True,
        trainer=True,
        ranks=2,
        sp=2,
        zero=3,
    ),  # fmt: skip
    Case("125m", 2048, "full", {"n_layers": 4}, offload_opt=True, trainer=True, ranks=2, zero=3),
    Case("125m", 2048, "full", {"n_layers": 4}, offload_opt=True, trainer=True, ranks=2, zero=2),
]
CASES += LEVERS
QUICK = [CASES[1], CASES[2]]
HELDOUT = CASES[12:15]
DATA = os.path.join("runs", "bench_plan_data")


def predict(case: Case) -> dict[str, float]:
    """The planner's per-component prediction (GB) for ``case``: the job ``case`` runs, read
    by ``PlanInput.from_job`` on the CPU device (the engine's CPU DeepSpeed config, fp32)."""
    import tempfile

    from longtrain.train.config import load_job
    from longtrain.train.plan import CPU, PlanInput, memory

    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(_job_yaml(case, tmp))
    mem = memory(PlanInput.from_job(job, device="cpu"), case.ranks, CPU)
    return mem.as_gb()


def _data_vocab() -> int:
    with open(os.path.join(DATA, "data", "manifest.json")) as f:
        return int(json.load(f)["vocab_size"])


def ensure_data() -> str:
    """Tokenizer + prepared embedded corpus for the trainer cases (made once, under runs/)."""
    data = os.path.join(DATA, "data")
    if os.path.isfile(os.path.join(data, "manifest.json")):
        return data
    tok = os.path.join(DATA, "tok")
    for args in (
        [
            "tokenizer",
            "--corpus",
            "stdlib",
            "--vocab-size",
            "8000",
            "--sample-mb",
            "4",
            "--out",
            tok,
        ],
        ["prepare", "--corpus", "stdlib", "--tokenizer", tok, "--out", data, "--workers", "1"],
    ):
        subprocess.run([sys.executable, "-m", "longtrain.launch", *args], check=True,
                       capture_output=True, timeout=1800)  # fmt: skip
    return data


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
    """Train ``case`` in this process with plain AdamW (ZeRO-0 semantics); the parallelism
    (tiled MLP, checkpointing, activation offload) is applied by the trainer's own
    ``parallelize`` on a one-rank topology."""
    import tempfile

    import torch

    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.config import load_job
    from longtrain.train.parallel import Topology, parallelize

    cfg = get_flavor(case.flavor, **case.overrides)
    s = case.seq_len
    if warm:  # same code path at a toy size: kernels, thread pools and autograd get set up
        cfg = get_flavor("debug", max_seq_len=max(256, cfg.max_seq_len))
        s = 256
    elif cfg.max_seq_len < s:
        cfg = cfg.replace(max_seq_len=s)
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(_job_yaml(case, tmp))
    torch.manual_seed(0)
    model = Transformer(cfg, attention="sdpa")
    topo = Topology(0, 1, 1, 1, 0, 0, None, None, None)
    parallelize(model, topo, job)
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
    peak = peak_rss_bytes()
    print(json.dumps({"measured_gb": (peak - base) / GB, "seconds": time.perf_counter() - t0}))


def _job_yaml(case: Case, run_dir: str) -> str:
    """The job of ``case`` (what ``longtrain pretrain`` runs and the planner reads)."""
    import yaml

    data = os.path.abspath(os.path.join(DATA, "data")) if case.trainer else ""
    job = {
        "model": {"flavor": case.flavor, "attention": "sdpa", "overrides": dict(case.overrides)},
        "data": {"dir": data, "seq_len": case.seq_len},
        "train": {"steps": case.steps, "micro_batch": case.micro_batch, "warmup": 1,
                  "loss_chunk_size": case.loss_chunk, "mlp_chunk_size": case.mlp_chunk},
        "parallel": {"sp": case.sp, "zero_stage": case.zero,
                     "activation_checkpointing": case.checkpointing, "timeout_s": 300,
                     "offload_activations": case.offload_acts,
                     "offload_optimizer": case.offload_opt},
        "checkpoint": {"interval": 0, "resume": "never"},
        "log": {"interval": 1, "eval_interval": 0, "tensorboard": False, "progress": False},
        "run_dir": run_dir,
    }  # fmt: skip
    path = os.path.join(run_dir, "job.yaml")
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


def _trainer_worker(spec: str, out_dir: str) -> None:
    """One rank of ``longtrain pretrain``; records its own peak RSS at the last logged step."""
    import gc

    import torch

    torch.set_num_threads(1)
    case = Case(**json.loads(spec))
    # Everything the trainer imports, and the kernels it runs, before the baseline.
    import deepspeed  # noqa: F401
    import matplotlib.pyplot  # noqa: F401

    import longtrain.data.loader  # noqa: F401
    import longtrain.train.trainer as trainer
    from longtrain.launch.cli import main as cli_main

    _train(case, warm=True)
    gc.collect()
    base = _rss_bytes()
    seen: dict[str, int] = {}
    real = trainer.peak_memory

    def probe(device: Any) -> dict[str, float]:  # called at every logged row
        seen["peak"] = peak_rss_bytes()
        return real(device)

    trainer.peak_memory = probe
    t0 = time.perf_counter()
    rc = cli_main(["pretrain", "--config", _job_yaml(case, os.path.join(out_dir, "run"))])
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rc": rc, "measured_gb": (seen["peak"] - base) / GB,
                   "seconds": time.perf_counter() - t0}, f)  # fmt: skip


def _measure_trainer(case: Case, timeout: float) -> dict[str, Any]:
    import shutil
    import tempfile

    ensure_data()
    out_dir = tempfile.mkdtemp(prefix="bench_plan_")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")  # fmt: skip
    me = [
        os.path.abspath(__file__),
        "--trainer-worker",
        json.dumps(asdict(case)),
        "--out-dir",
        out_dir,
    ]
    if case.ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={case.ranks}", *me]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{case.name}: worker failed:\n{(out.stderr or out.stdout)[-3000:]}")
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(case.ranks)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    worst = max(ranks, key=lambda r: r["measured_gb"])
    return {"measured_gb": worst["measured_gb"], "seconds": worst["seconds"],
            "per_rank_gb": [round(r["measured_gb"], 3) for r in ranks]}  # fmt: skip


def measure(case: Case, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``case`` in a fresh process; predicted and measured peak (GB) and their ratio."""
    if case.trainer:
        got = _measure_trainer(case, timeout)
    else:
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
    ap.add_argument("--heldout", action="store_true", help="the three held-out trainer cases")
    ap.add_argument("--levers", action="store_true", help="the tiled-MLP and offload cases")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument(
        "--rescore",
        default=None,
        help="re-predict the measurements stored in this --json file with the current planner",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trainer-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    if args.trainer_worker:
        _trainer_worker(args.trainer_worker, args.out_dir)
        return
    rows = []
    print(f"{'configuration':<70} {'predicted':>9} {'measured':>9} {'pred/meas':>9} {'s':>6}")
    cases = QUICK if args.quick else HELDOUT if args.heldout else LEVERS if args.levers else CASES
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    stored = {}
    if args.rescore:
        with open(args.rescore) as f:
            stored = {r["case"]: r for r in json.load(f)}
        cases = [c for c in CASES if c.name in stored]
    for case in cases:
        if args.rescore:
            r = dict(stored[case.name])
            pred = predict(case)
            r.update(predicted_gb=pred["total"], components_gb=pred)
            r["ratio"] = round(pred["total"] / r["measured_gb"], 3)
        else:
            r = measure(case)
        rows.append(r)
        print(
            f"{r['case']:<70} {r['predicted_gb']:>9.3f} {r['measured_gb']:>9.3f} "
            f"{r['ratio']:>9.3f} {r['seconds']:>6.1f}",
            flush=True,
        )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst deviation {worst:.1%} (target: within 20%; levers within 15%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
