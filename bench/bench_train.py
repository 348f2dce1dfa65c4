"""Benchmark: ``longtrain pretrain`` against a plain transformers training loop, and SP=2 vs SP=1.

Same run, same machine, same shape (dims, seq_len, batch 1, AdamW, fp32 on CPU):

1. tokens/s and peak memory of ``longtrain pretrain`` (DeepSpeed ZeRO-3, chunked loss, one
   process) against a ``LlamaForCausalLM`` loop (``model(ids, labels=ids).loss.backward()``,
   ``torch.optim.AdamW``), printed as ratios. Targets: tokens/s >= 1.0x, memory <= 0.5x.
2. per-rank peak memory of ``longtrain pretrain`` at SP=2 (2 ranks) against SP=1 for the same
   total sequence. Activation memory is isolated as peak(long) - peak(short): everything that
   does not grow with the sequence (imports, weights, optimizer states) cancels. Target: <= 0.6x.
3. the compiled row: ``longtrain pretrain model.compile=true`` (each block's forward through
   ``torch.compile``), tokens/s against the same transformers loop, the compile excluded (the
   first step, which compiles, is left out of every row's median) and reported on its own:
   the seconds ``torch.compile`` took and the steps after which it has paid for itself.
   Target on CPU: >= 1.25x the transformers loop. ``--repeats N`` runs the three timed
   configurations N times, interleaved, and takes each one's median (a shared machine's noise
   moves them together then, not one of them).

Memory on CPU is the peak RSS of each process (VmHWM, see ``train.metrics.peak_rss_bytes``), every configuration in a fresh
process; the figure above an import-only process of the same libraries is reported too.
On GPU the same script compares ``torch.cuda.max_memory_allocated``.

    python bench/bench_train.py --data runs/demo/data            # after `make demo`
    python bench/bench_train.py --data DIR --seq-len 16384 --steps 3 --vocab 32000
    python bench/bench_train.py --data DIR --flavor tiny --seq-len 2048 --steps 10 --skip-sp

Prints a table and one JSON line; paste both into bench/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longtrain.train.metrics import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
# Small enough that a 16K-token step takes seconds on a CPU core, large enough to be a real net.
SHAPE = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)


def _rss_gb() -> float:
    return peak_rss_bytes() / 1e9


def _shape(flavor: str) -> tuple[str, dict[str, int]]:
    """(flavor, overrides) of the benchmarked model: ``SHAPE`` on the debug flavor by
    default, or a named flavor as it is (``--flavor tiny``: the CPU demo's model)."""
    return ("debug", dict(SHAPE)) if flavor == "shape" else (flavor, {})


def hf_worker(
    data_dir: str, seq_len: int, steps: int, vocab: int, out: str, flavor: str = "shape"
) -> None:
    """The baseline: a plain transformers training loop of the same shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtrain.model.config import get_flavor
    from longtrain.model.hf import config_to_hf

    data_vocab = json.loads((Path(data_dir) / "manifest.json").read_text())["vocab_size"]
    name, shape = _shape(flavor)
    cfg = get_flavor(name, vocab_size=vocab, max_seq_len=seq_len, **shape)
    base = _rss_gb()
    hf_cfg = LlamaConfig.from_dict(config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, data_vocab, (1, seq_len), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tps = seq_len / statistics.median(times[1:] if len(times) > 1 else times)
    Path(out).write_text(json.dumps({"tokens_per_s": tps, "peak_gb": _rss_gb(), "base_gb": base}))


def import_worker(kind: str, out: str) -> None:
    """RSS of a process that imports what a run imports and builds nothing."""
    import torch  # noqa: F401

    if kind == "hf":
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401
    else:
        import deepspeed  # noqa: F401

        import longtrain.train.trainer  # noqa: F401
    Path(out).write_text(json.dumps({"peak_gb": _rss_gb()}))


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_longtrain(
    data_dir: str,
    seq_len: int,
    steps: int,
    sp: int,
    threads: int,
    tmp: Path,
    vocab: int,
    flavor: str = "shape",
    compile: bool = False,
) -> dict[str, float]:
    """``longtrain pretrain`` as users run it; figures from its metrics.jsonl."""
    _say(f"longtrain pretrain seq_len={seq_len} sp={sp}{' compiled' if compile else ''}")
    run_dir = tmp / f"lt_sp{sp}_{seq_len}{'_compiled' if compile else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)  # --repeats: a fresh run each time
    name, shape = _shape(flavor)
    overrides = [
        f"model.flavor={name}",
        "model.attention=sdpa",
        f"model.compile={str(compile).lower()}",
        *[f"model.overrides.{k}={v}" for k, v in shape.items()],
        f"model.overrides.vocab_size={vocab}",
        f"data.dir={data_dir}",
        f"data.seq_len={seq_len}",
        "data.attention=causal",  # one causal window, like the baseline
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.warmup=0",
        f"parallel.sp={sp}",
        "parallel.zero_stage=3",
        "parallel.dtype=fp32",
        "checkpoint.interval=0",
        "checkpoint.resume=never",
        "log.interval=1",
        "log.eval_interval=0",
        "log.progress=false",
        "log.tensorboard=false",
        f"run_dir={run_dir}",
    ]
    cfg = REPO / "launch" / "configs" / "tiny-cpu.yaml"
    args = ["-m", "longtrain.launch", "pretrain", "--config", str(cfg), *overrides]
    if sp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={sp}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    if compile:  # an empty inductor cache: the compile time a first run pays
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=tmp)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()][:5]
        sys.exit(f"longtrain pretrain failed: {' '.join(cmd)}\n" + "\n".join(errors))
    all_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if "tokens_per_s" in r]
    # The first step is left out: it builds (and, compiled, compiles) what the others reuse.
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)
    res = {"tokens_per_s": tps, "peak_gb": max(r["peak_mem_gb"] for r in rows)}
    res["first_step_s"] = seq_len / rows[0]["tokens_per_s"]  # log.interval=1: one step per row
    compiled = [r["compile_s"] for r in all_rows if "compile_s" in r]
    if compiled:
        res["compile_s"] = compiled[0]
    return res


def _worker(args: list[str], threads: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, __file__, *args, out], env=env, check=True, timeout=1800)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the repeats (memory included: it barely moves)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/demo/data", help="prepared data dir (make demo)")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--short-seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of a single-process run")
    ap.add_argument(
        "--vocab", type=int, default=0, help="model vocabulary (default: the data's); >= the data's"
    )
    ap.add_argument(
        "--flavor", default="shape", help="'shape' (the SHAPE above, default) or a model flavor"
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed configurations, interleaved")
    ap.add_argument("--skip-sp", action="store_true", help="skip the SP=2 vs SP=1 memory rows")
    a = ap.parse_args()
    if not (Path(a.data) / "manifest.json").is_file():
        sys.exit(f"--data {a.data}: no prepared data; run `make demo` or `longtrain prepare`")
    data_vocab = json.loads((Path(a.data) / "manifest.json").read_text())["vocab_size"]
    V = max(a.vocab, data_vocab)
    t, L, S, F = a.threads, a.seq_len, a.short_seq_len, a.flavor
    sp_rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs: dict[str, list[dict[str, float]]] = {"hf": [], "eager": [], "compiled": []}
        for i in range(a.repeats):
            _say(f"transformers loop seq_len={L} (repeat {i + 1}/{a.repeats})")
            runs["hf"].append(_worker(["--hf", a.data, str(L), str(a.steps), str(V), F], t))
            runs["eager"].append(run_longtrain(a.data, L, a.steps, 1, t, tmp, V, F))
            runs["compiled"].append(run_longtrain(a.data, L, a.steps, 1, t, tmp, V, F, True))
        hf, ours, comp = (_median_run(runs[k]) for k in ("hf", "eager", "compiled"))
        imp_hf = _worker(["--import", "hf"], t)["peak_gb"]
        imp_lt = _worker(["--import", "longtrain"], t)["peak_gb"]
        if not a.skip_sp:
            sp_rows["sp1_long"] = ours
            sp_rows["sp1_short"] = run_longtrain(a.data, S, a.steps, 1, t, tmp, V, F)
            sp_rows["sp2_long"] = run_longtrain(a.data, L, a.steps, 2, max(1, t // 2), tmp, V, F)
            sp_rows["sp2_short"] = run_longtrain(a.data, S, a.steps, 2, max(1, t // 2), tmp, V, F)
    name, shape = _shape(F)
    # Seconds per step eager and compiled; the compile pays for itself after this many steps.
    step_e, step_c = L / ours["tokens_per_s"], L / comp["tokens_per_s"]
    payback = comp.get("compile_s", float("nan")) / (step_e - step_c) if step_e > step_c else None
    res = {
        "seq_len": L,
        "flavor": name,
        "shape": {**shape, "vocab_size": V},
        "repeats": a.repeats,
        "hf_tokens_per_s": hf["tokens_per_s"],
        "longtrain_tokens_per_s": ours["tokens_per_s"],
        "tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
        "compiled_tokens_per_s": comp["tokens_per_s"],
        "compiled_tokens_per_s_ratio": comp["tokens_per_s"] / hf["tokens_per_s"],
        "compiled_over_eager": comp["tokens_per_s"] / ours["tokens_per_s"],
        "compile_s": comp.get("compile_s"),
        "compiled_first_step_s": comp["first_step_s"],
        "compile_payback_steps": payback,
        "per_repeat_tokens_per_s": {k: [r["tokens_per_s"] for r in v] for k, v in runs.items()},
        "hf_peak_gb": hf["peak_gb"],
        "longtrain_peak_gb": ours["peak_gb"],
        "compiled_peak_gb": comp["peak_gb"],
        "peak_mem_ratio": ours["peak_gb"] / hf["peak_gb"],
        "peak_mem_above_imports_ratio": (ours["peak_gb"] - imp_lt) / (hf["peak_gb"] - imp_hf),
        "import_only_gb": {"hf": imp_hf, "longtrain": imp_lt},
    }
    model = f"flavor {name}" + (f", shape {res['shape']}" if shape else f", vocab {V}")
    print(f"\nseq_len {L}, {model}, fp32, batch 1, {t} threads per single process")
    print(f"{'':38}{'transformers':>14}{'longtrain':>12}{'ratio':>8}")
    print(
        f"{'tokens/s':38}{hf['tokens_per_s']:14.0f}{ours['tokens_per_s']:12.0f}"
        f"{res['tokens_per_s_ratio']:8.2f}"
    )
    print(
        f"{'tokens/s, model.compile=true':38}{hf['tokens_per_s']:14.0f}"
        f"{comp['tokens_per_s']:12.0f}{res['compiled_tokens_per_s_ratio']:8.2f}"
    )
    print(
        f"{'peak RSS (GB)':38}{hf['peak_gb']:14.2f}{ours['peak_gb']:12.2f}"
        f"{res['peak_mem_ratio']:8.2f}"
    )
    print(
        f"{'peak RSS above import-only (GB)':38}{hf['peak_gb'] - imp_hf:14.2f}"
        f"{ours['peak_gb'] - imp_lt:12.2f}{res['peak_mem_above_imports_ratio']:8.2f}"
    )
    back = f"pays for itself after {payback:.0f} steps" if payback else "does not pay back"
    print(
        f"\ncompile: {res['compile_s'] or float('nan'):.1f} s (first step {comp['first_step_s']:.1f}"
        f" s; then {step_c:.3f} s/step vs {step_e:.3f} eager, x{res['compiled_over_eager']:.2f}): "
        f"{back}"
    )
    if sp_rows:
        act1 = sp_rows["sp1_long"]["peak_gb"] - sp_rows["sp1_short"]["peak_gb"]
        act2 = sp_rows["sp2_long"]["peak_gb"] - sp_rows["sp2_short"]["peak_gb"]
        res.update(
            {
                "sp1_peak_gb": {k: sp_rows[f"sp1_{k}"]["peak_gb"] for k in ("long", "short")},
                "sp2_peak_gb_per_rank": {
                    k: sp_rows[f"sp2_{k}"]["peak_gb"] for k in ("long", "short")
                },
                "sp2_tokens_per_s": sp_rows["sp2_long"]["tokens_per_s"],
                "sp2_over_sp1_activation_ratio": act2 / act1 if act1 > 0 else float("nan"),
            }
        )
        print(f"\nper-rank activation memory, peak({L}) - peak({S}):")
        print(
            f"  SP=1: {act1:.3f} GB   SP=2: {act2:.3f} GB   "
            f"ratio {res['sp2_over_sp1_activation_ratio']:.2f}"
        )
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--hf":
        data, seq, steps, vocab, flavor, out = sys.argv[2:8]
        hf_worker(data, int(seq), int(steps), int(vocab), out, flavor)
    elif len(sys.argv) > 1 and sys.argv[1] == "--import":
        import_worker(sys.argv[2], sys.argv[3])
    else:
        main()
