"""One prepared check of the GPU path: attention kernels, bf16 throughput/MFU, a short pretrain.

Run it through ``bench/gpu_check.sh`` on a machine with one CUDA GPU and PyTorch (it makes
``longtrain`` importable without installing it, and installs any wheels in ``$WHEELS_DIR``):

    bash bench/gpu_check.sh                    # the whole check, < 8 minutes on one H200
    bash bench/gpu_check.sh --skip-pretrain    # kernels and throughput only
    bash bench/gpu_check.sh --cpu-dry-run      # tiny shapes on CPU (what tests/ runs)

Stages, each reported even when an earlier one failed:

1. ``matmul``: the best bf16 GEMM rate over a few square sizes (the "measured peak").
2. ``cores`` (and ``ring``, the ring-attention block kernels in simulated rings of 2, 4, 8
   ranks, :func:`stage_ring`): every available attention core (flash3, flash, torch_varlen, sdpa) against
   ``reference`` on packed windows holding documents of uneven length (length-1 documents
   included), fresh random inputs, forward and backward. Tolerance as flash-attn's own tests:
   the core's error against the fp32 reference may be at most 2x (output) / 3x (gradients) the
   error of the reference itself run in bf16, plus 1e-4.
3. ``head_grad``: the chunked loss in bf16 at the 1b head's shape (vocab 128256, dim 2048):
   which fp32-output path its GEMMs take (``longtrain.model.loss.lowp_paths``), the dtypes
   every GEMM actually ran with (recorded at the dispatcher: none may be fp32), value and
   gradients against the same algorithm in fp32, and the time of both.
4. ``model``: forward + backward of the ``1b`` flavor (bf16 weights, no optimizer) at 8K and
   32K tokens, every block activation-checkpointed, chunked loss; timed with CUDA events after
   warm-up. Windows of one causal document, and at 32K also a window of 4 documents, so the
   two MFU conventions of ``longtrain.train.metrics`` part: ``mfu`` counts causal attention
   within each document (sum L_i^2 / 2, what the kernels compute), ``mfu_window`` over the
   whole window (T^2 / 2, ``ModelConfig.flops_per_token(T, causal=True)``); recompute is not
   counted. Reports tokens/s, model TFLOP/s and both MFUs against the measured bf16 GEMM peak
   and the datasheet peak, plus peak memory next to the planner's prediction.
5. ``levers``: the tiled MLP and activation offload, alone and together: step time against
   the run without them, whether the offload copies overlap compute, peak allocated memory
   against the planner's prediction, host bytes against the planner's.
6. ``pretrain``: when deepspeed and the trainer import, tokenizer + prepare on the embedded
   corpus, then ``longtrain pretrain`` with ZeRO-2 for 20 steps; its metrics.jsonl summarised.
7. ``compile``: the same job with ``model.compile=true``: losses against step 6's, tokens/s
   of both with the compile excluded, and the compile's seconds (:func:`stage_compile`).

A short table is printed last; everything goes to ``<out>/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def datasheet_peak(device_name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s for a CUDA device name, or None when unknown (the one
    table is ``longtrain.train.metrics.GPU_PEAKS``)."""
    from longtrain.train.metrics import datasheet_peak_flops

    flops = datasheet_peak_flops(device_name, torch.bfloat16)
    return None if flops is None else flops / 1e12


class Shapes:
    """Problem sizes: the real ones on GPU, tiny ones for the CPU dry run."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        # Error baseline dtype and the "exact" reference dtype for the core check.
        self.low, self.high = (
            (torch.float32, torch.float64) if dry else (torch.bfloat16, torch.float32)
        )
        self.matmul_sizes = [128, 256] if dry else [4096, 8192, 16384]
        self.core_shape = (2, 96, 4, 2, 16) if dry else (2, 4096, 16, 4, 128)  # B, T, Hq, Hkv, D
        self.flavor = "debug" if dry else "1b"
        # (window length, documents in it): one causal document, and a packed window.
        self.model_cases = (
            [(128, 1), (256, 1), (256, 4)] if dry else [(8192, 1), (32768, 1), (32768, 4)]
        )
        # The head GEMMs of the chunked loss: tokens, vocab, dim, chunk (bf16 on CPU too).
        self.head_shape = (256, 512, 64, 64) if dry else (8192, 128256, 2048, 2048)
        self.warmup = 1 if dry else 2
        self.iters = 2 if dry else 4
        self.loss_chunk = 64 if dry else 2048


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn``: CUDA events on GPU (after warm-up), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def stage_matmul(sh: Shapes) -> dict[str, Any]:
    """Best GEMM rate over square sizes in the compute dtype (the measured peak)."""
    rows = []
    for n in sh.matmul_sizes:
        a = torch.randn(n, n, device=sh.device, dtype=sh.dtype)
        b = torch.randn(n, n, device=sh.device, dtype=sh.dtype)
        sec = time_it(lambda a=a, b=b: a @ b, sh.device, warmup=3, iters=10 if not sh.dry else 3)
        rows.append({"n": n, "tflops": 2 * n**3 / sec / 1e12})
        del a, b
    best = max(rows, key=lambda r: r["tflops"])
    return {"sizes": rows, "peak_tflops": best["tflops"], "dtype": str(sh.dtype)}


# ---------------------------------------------------------------------------------------------
# Attention cores


def packed_offsets(batch: int, seq_len: int, gen: torch.Generator) -> list[int]:
    """Document offsets over B*T tokens: uneven random documents, a length-1 one in each row."""
    offs = [0]
    for r in range(batch):
        base = r * seq_len
        cuts = torch.randperm(seq_len - 3, generator=gen)[:3].add(2).sort().values.tolist()
        row = sorted({base, base + 1, *(base + c for c in cuts)})  # [base, base+1): length 1
        offs += [o for o in row if o != 0]
    offs.append(batch * seq_len)
    return offs


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    return (a.double() - b.double()).abs().max().item()


def check_core(name: str, sh: Shapes, seed: int) -> dict[str, Any]:
    """One core vs the reference, forward and backward, at the compute dtype's tolerance."""
    from longtrain.model.attention import make_core

    B, T, Hq, Hkv, D = sh.core_shape
    gen = torch.Generator().manual_seed(seed)
    offs = packed_offsets(B, T, gen)
    cu = torch.tensor(offs, dtype=torch.int32, device=sh.device)
    max_len = max(e - s for s, e in zip(offs, offs[1:]))
    q0 = torch.randn(B, T, Hq, D, generator=gen).to(sh.device, sh.low)
    k0 = torch.randn(B, T, Hkv, D, generator=gen).to(sh.device, sh.low)
    v0 = torch.randn(B, T, Hkv, D, generator=gen).to(sh.device, sh.low)
    g0 = torch.randn(B, T, Hq, D, generator=gen).to(sh.device, sh.low)

    def run(core: torch.nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
        q, k, v = (x.detach().to(dtype).clone().requires_grad_(True) for x in (q0, k0, v0))
        out = core(q, k, v, cu_seqlens=cu, max_seqlen=max_len)
        out.backward(g0.to(dtype))
        return [out.detach(), q.grad, k.grad, v.grad]

    ref = make_core("reference")
    exact = run(ref, sh.high)
    base = run(ref, sh.low)
    got = run(make_core(name), sh.low)
    names = ["out", "dq", "dk", "dv"]
    res: dict[str, Any] = {"core": name, "docs": len(offs) - 1, "shape": [B, T, Hq, Hkv, D]}
    ok = True
    for i, n in enumerate(names):
        err, ref_err = max_abs(got[i], exact[i]), max_abs(base[i], exact[i])
        tol = (2.0 if n == "out" else 3.0) * ref_err + 1e-4
        res[n] = {"err": err, "ref_err": ref_err, "tol": tol}
        ok &= math.isfinite(err) and err <= tol
    res["ok"] = bool(ok)
    return res


def stage_cores(sh: Shapes) -> dict[str, Any]:
    """Every available core except the reference itself, with fresh inputs each."""
    from longtrain.model.attention import available_cores, core_unavailable_reason

    out: dict[str, Any] = {"results": [], "skipped": {}}
    for name in ("flash3", "flash", "torch_varlen", "sdpa"):
        reason = core_unavailable_reason(name)
        if reason is not None:
            out["skipped"][name] = reason
            continue
        seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run, seed recorded
        try:
            r = check_core(name, sh, seed)
        except Exception as e:  # one broken kernel must not hide the others
            r = {"core": name, "ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        r["seed"] = seed
        out["results"].append(r)
    out["available"] = available_cores()
    out["ok"] = all(r["ok"] for r in out["results"]) and bool(out["results"])
    return out


def stage_ring(sh: Shapes) -> dict[str, Any]:
    """Ring attention's block kernels at the compute dtype, every rank's steps of rings of 2, 4
    and 8 simulated in one process (``longtrain.model.ring_attention.simulate_ring``: the
    per-rank plans, varlen forward with LSE, fp32 merges, backward from the final LSE), forward
    and backward against the reference on the cores' packed windows, with the cores' tolerance
    (2x / 3x the reference's own error in the compute dtype, plus 1e-4)."""
    from longtrain.model.attention import make_core
    from longtrain.model.ring_attention import make_block_kernel, simulate_ring

    B, T, Hq, Hkv, D = sh.core_shape
    ref = make_core("reference")

    def run(fn: Callable[..., torch.Tensor], x0: list[torch.Tensor], dtype: torch.dtype) -> list:
        q, k, v = (x.detach().to(dtype).clone().requires_grad_(True) for x in x0[:3])
        o = fn(q, k, v)
        o.backward(x0[3].to(dtype))
        return [o.detach(), q.grad, k.grad, v.grad]

    out: dict[str, Any] = {"results": [], "skipped": {}, "shape": [B, T, Hq, Hkv, D]}
    for name in ["torch"] if sh.dry else ["flash", "torch_varlen", "torch"]:
        try:
            kernel = make_block_kernel(name)
        except Exception as e:  # not installed here: say why, check the others
            out["skipped"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            continue
        for ring in (2, 4, 8):
            seed = int.from_bytes(os.urandom(4), "little")
            gen = torch.Generator().manual_seed(seed)
            offs = packed_offsets(B, T, gen)
            cu = torch.tensor(offs, dtype=torch.int32, device=sh.device)
            x0 = [torch.randn(B, T, h, D, generator=gen).to(sh.device, sh.low)
                  for h in (Hq, Hkv, Hkv, Hq)]  # fmt: skip
            r: dict[str, Any] = {"kernel": name, "ring": ring, "seed": seed, "docs": len(offs) - 1}
            try:
                exact = run(lambda q, k, v, c=cu: ref(q, k, v, cu_seqlens=c), x0, sh.high)
                base = run(lambda q, k, v, c=cu: ref(q, k, v, cu_seqlens=c), x0, sh.low)
                got = run(lambda q, k, v, c=cu, n=ring, kn=kernel: simulate_ring(q, k, v, c, n, kn),
                          x0, sh.low)  # fmt: skip
                ok = True
                for i, n in enumerate(("out", "dq", "dk", "dv")):
                    err, ref_err = max_abs(got[i], exact[i]), max_abs(base[i], exact[i])
                    tol = (2.0 if n == "out" else 3.0) * ref_err + 1e-4
                    r[n] = {"err": err, "ref_err": ref_err, "tol": tol}
                    ok &= math.isfinite(err) and err <= tol
                r["ok"] = bool(ok)
            except Exception as e:  # one broken kernel must not hide the others
                r.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            out["results"].append(r)
    out["ok"] = bool(out["results"]) and all(r["ok"] for r in out["results"])
    return out


# ---------------------------------------------------------------------------------------------
# The LM head's GEMMs in the chunked loss

_GEMMS = {"mm", "addmm", "addmm_", "baddbmm", "baddbmm_", "bmm"}


class GemmDtypes(TorchDispatchMode):
    """The input dtypes of every matmul-family op that reaches the dispatcher, and the dtype of
    whatever the head-weight gradient, shape ``acc_shape``, is accumulated into."""

    def __init__(self, acc_shape: tuple[int, int]) -> None:
        super().__init__()
        self.acc_shape = acc_shape
        self.seen: list[str] = []
        self.acc: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _GEMMS:
            dts = ",".join(str(a.dtype).replace("torch.", "") for a in args if torch.is_tensor(a))
            self.seen.append(f"{name}({dts})")
            out = kwargs.get("out")
            if out is not None and tuple(out.shape[-2:]) == self.acc_shape:  # in-place GEMM
                self.acc.add(str(out.dtype).replace("torch.", ""))
        elif name == "add_" and tuple(args[0].shape) == self.acc_shape:  # GEMM result added in
            self.acc.add(str(args[0].dtype).replace("torch.", ""))
        return func(*args, **kwargs)


def stage_head_grad(sh: Shapes) -> dict[str, Any]:
    """The chunked loss in bf16: GEMM paths and dtypes, error against fp32, time of both."""
    from longtrain.model.loss import chunked_cross_entropy, lowp_paths

    n, vocab, dim, chunk = sh.head_shape
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, dim, generator=gen).to(sh.device, torch.bfloat16)
    w0 = (torch.randn(vocab, dim, generator=gen) * dim**-0.5).to(sh.device, torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(sh.device)
    labels[::9] = -100

    def run(dtype: torch.dtype) -> list[torch.Tensor]:
        h = h0.to(dtype).clone().requires_grad_(True)  # the same bf16-representable numbers
        w = w0.to(dtype).clone().requires_grad_(True)
        s, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
        s.backward()
        return [s.detach(), h.grad, w.grad]

    paths = lowp_paths(sh.device, torch.bfloat16)  # probed before anything is recorded
    rec = GemmDtypes((vocab, dim))
    with rec:
        got = run(torch.bfloat16)
    ref = run(torch.float32)
    errs = {
        name: max_abs(g, r) / max(r.double().abs().max().item(), 1e-30)
        for name, g, r in zip(("loss", "d_hidden", "d_head"), got, ref)
    }
    fp32_gemms = [g for g in rec.seen if "float32" in g.split("(")[1]]
    res: dict[str, Any] = {
        "shape": {"tokens": n, "vocab": vocab, "dim": dim, "chunk": chunk},
        "paths": paths,
        "head_grad_accumulator": ",".join(sorted(rec.acc)) or "?",
        "gemms": sorted(set(rec.seen)),
        "fp32_gemms": len(fp32_gemms),
        "rel_err": errs,
        "bf16_s": time_it(lambda: run(torch.bfloat16), sh.device, 1, sh.iters),
        "fp32_s": time_it(lambda: run(torch.float32), sh.device, 1, sh.iters),
    }
    res["ok"] = (
        not fp32_gemms
        and rec.acc == {"float32"}
        and len(rec.seen) == 3 * math.ceil(n / chunk)
        and errs["loss"] < 1e-3
        and errs["d_hidden"] < 2e-2
        and errs["d_head"] < 2e-2
    )
    return res


# ---------------------------------------------------------------------------------------------
# Model throughput


def planner_prediction(cfg: Any, seq_len: int, chunk: int, precision: str, core: str) -> float:
    """The planner's peak (GB) for weights + grads + activations, no optimizer, no reserve."""
    from longtrain.train.plan import CPU, PlanInput, memory

    p = PlanInput.of(
        cfg, device="cuda" if precision == "bf16" else "cpu", attention=core, seq_len=seq_len,
        zero_stage=0, activation_checkpointing="full", loss_chunk_size=chunk,
    )  # fmt: skip
    m = memory(p, 1, CPU)
    return (m.total - m.optimizer) / 1e9


def stage_model(sh: Shapes, matmul_peak: float | None) -> dict[str, Any]:
    """fwd+bwd of the flavor at each (seq_len, documents): tokens/s, TFLOP/s, both MFUs, memory."""
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.metrics import flops_per_window
    from longtrain.train.parallel import apply_activation_checkpointing

    device_name = torch.cuda.get_device_name() if sh.device.type == "cuda" else platform.processor()
    sheet = datasheet_peak(device_name) if sh.device.type == "cuda" else None
    cfg = get_flavor(sh.flavor, max_seq_len=max(T for T, _ in sh.model_cases))
    with torch.device("meta"):
        model = Transformer(cfg, attention="auto")
    model.to_empty(device=sh.device)
    model.init_weights()
    model.to(sh.dtype)
    apply_activation_checkpointing(model, "full")  # the trainer's own wrapping
    rows = []
    for T, n_docs in sh.model_cases:
        gen = torch.Generator().manual_seed(T)
        ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=gen).to(sh.device)
        lengths = [T // n_docs] * (n_docs - 1)
        lengths.append(T - sum(lengths))
        offs = [0]
        for n in lengths:
            offs.append(offs[-1] + n)
        cu = torch.tensor(offs, dtype=torch.int32, device=sh.device)

        def step(ids: torch.Tensor = ids, cu: torch.Tensor = cu, m: int = max(lengths)) -> None:
            loss_sum, count = model.loss(
                ids[:, :-1], ids[:, 1:], cu_seqlens=cu, max_seqlen=m, chunk_size=sh.loss_chunk
            )
            (loss_sum / count).backward()
            for p in model.parameters():
                p.grad = None

        if sh.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = time_it(step, sh.device, sh.warmup, sh.iters)
        tflops_doc = flops_per_window(cfg, lengths) / sec / 1e12
        tflops_window = T * cfg.flops_per_token(T, causal=True) / sec / 1e12

        def ratio(x: float, peak: float | None) -> float | None:
            return x / peak if peak else None

        row: dict[str, Any] = {
            "seq_len": T,
            "docs": n_docs,
            "step_s": sec,
            "tokens_per_s": T / sec,
            "model_tflops": tflops_doc,
            "model_tflops_window": tflops_window,
            "mfu_vs_measured": ratio(tflops_doc, matmul_peak),
            "mfu_window_vs_measured": ratio(tflops_window, matmul_peak),
            "mfu_vs_datasheet": ratio(tflops_doc, sheet),
            "mfu_window_vs_datasheet": ratio(tflops_window, sheet),
            "planner_gb": planner_prediction(
                cfg, T, sh.loss_chunk, "bf16" if sh.dtype == torch.bfloat16 else "fp32",
                model.attention_core,
            ),
        }  # fmt: skip
        if sh.device.type == "cuda":
            row["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        rows.append(row)
    return {
        "flavor": sh.flavor,
        "params": cfg.num_params(),
        "core": model.attention_core,
        "device": device_name,
        "datasheet_tflops": sheet,
        "mfu_conventions": {
            "mfu": "causal within each document: sum L_i^2 / 2 (what the kernels compute)",
            "mfu_window": "causal over the whole window: T^2 / 2 (flops_per_token)",
        },
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# The memory-ceiling levers: tiled MLP and activation offload


def stage_levers(sh: Shapes) -> dict[str, Any]:
    """Per lever: step time with and without it, whether the offload copies overlap compute,
    and peak allocated memory against the planner's prediction.

    The model stage's flavor (bf16 weights, no optimizer) with every block checkpointed, at
    one window (32K tokens on GPU), in four builds: no lever, the tiled MLP (``dim`` tokens per
    tile), activation offload, both. Prediction: ``plan.memory`` for that job with ZeRO-0 on
    this GPU kind without the runtime reserve (what ``max_memory_allocated`` sees), less the
    optimizer. Overlap: the offload run's extra time against the time the same copies take
    alone (pinned buffers, measured here): 1.0 means fully hidden behind compute.
    """
    import dataclasses

    from longtrain.model.config import get_flavor
    from longtrain.model.tiled import apply_tiled_mlp
    from longtrain.model.transformer import Transformer
    from longtrain.train.offload import ActivationOffload, apply_activation_offload
    from longtrain.train.parallel import apply_activation_checkpointing
    from longtrain.train.plan import CPU, GPUS, PlanInput, memory, timing

    T = 256 if sh.dry else 32768
    cfg = get_flavor(sh.flavor, max_seq_len=T)
    dev = sh.device
    gpu = CPU if sh.dry else dataclasses.replace(GPUS["h100"], reserve_gb=0.0, fragmentation=0.0)
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    rows = []
    for name, chunk, offload in (
        ("baseline", 0, False), ("tiled_mlp", cfg.dim, False), ("offload", 0, True),
        ("both", cfg.dim, True),
    ):  # fmt: skip
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(cfg, attention="auto")
        model.to_empty(device=dev)
        model.init_weights()
        model.to(sh.dtype)
        apply_tiled_mlp(model, chunk)  # the order of train.parallel.parallelize
        apply_activation_checkpointing(model, "full")
        off = ActivationOffload(dev) if offload else None
        apply_activation_offload(model, off, "full")

        def step(model: Any = model) -> None:
            s, n = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=sh.loss_chunk)
            (s / n).backward()
            for prm in model.parameters():
                prm.grad = None

        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = time_it(step, dev, sh.warmup, sh.iters)
        p = PlanInput.of(
            cfg, device=dev.type, attention=model.attention_core, seq_len=T, zero_stage=0,
            activation_checkpointing="full", loss_chunk_size=sh.loss_chunk, mlp_chunk_size=chunk,
            offload_activations=offload,
        )  # fmt: skip
        mem = memory(p, 1, gpu)
        row: dict[str, Any] = {
            "lever": name,
            "seq_len": T,
            "step_s": sec,
            "planner_gb": (mem.total - mem.optimizer) / 1e9,
            "planner_host_gb": mem.host_activations / 1e9,
            "planner_copy_s": None if sh.dry else timing(p, 1, GPUS["h100"]).act_offload_copy_s,
        }
        if dev.type == "cuda":
            row["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if off is not None:
            row["offload_peak_host_gb"] = off.peak_host_bytes / 1e9
            row["prefetched_per_step"] = off.prefetched_tensors / (sh.warmup + sh.iters)
        rows.append(row)
        del model, off
    base = {r["lever"]: r for r in rows}
    # The copies alone: one block input down and back per checkpointed block, pinned buffers.
    x = torch.randn(1, T, cfg.dim, device=dev, dtype=sh.dtype)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=dev.type == "cuda")

    def copies() -> None:
        for _ in range(cfg.n_layers):
            host.copy_(x, non_blocking=True)
            x.copy_(host, non_blocking=True)

    copy_s = time_it(copies, dev, 1, sh.iters)
    for r in rows:
        ref = base["tiled_mlp" if r["lever"] == "both" else "baseline"]
        r["slowdown"] = r["step_s"] / ref["step_s"]
        if r["lever"] in ("offload", "both"):
            r["copy_s"] = copy_s
            hidden = 1.0 - (r["step_s"] - ref["step_s"]) / max(copy_s, 1e-9)
            r["overlap"] = min(1.0, max(0.0, hidden))
    ok = all(r.get("offload_peak_host_gb", r["planner_host_gb"]) == r["planner_host_gb"]
             for r in rows)  # fmt: skip
    return {"flavor": sh.flavor, "rows": rows, "ok": ok}


# ---------------------------------------------------------------------------------------------
# longtrain pretrain


def pretrain_job(work: Path, dry: bool) -> dict[str, Any]:
    """The job config the pretrain stage runs (contract field names only)."""
    return {
        "model": {"flavor": "debug" if dry else "1b"},
        "data": {"dir": str(work / "data"), "seq_len": 256 if dry else 8192},
        "train": {"steps": 3 if dry else 20, "micro_batch": 1, "grad_accum": 1, "warmup": 2},
        "parallel": {
            "sp": 1,
            "zero_stage": 2,
            "activation_checkpointing": "full",
            "offload_optimizer": False,
        },
        "checkpoint": {"interval": 0},
        "log": {"interval": 1, "eval_interval": 0},
        "run_dir": str(work / "run"),
        "seed": 0,
    }


def summarize_metrics(path: Path) -> dict[str, Any]:
    """First/last loss and the steady-state throughput of a metrics.jsonl (steps past the first)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "step" in r]
    if not train:
        raise ValueError(f"{path}: no training rows")
    steady = train[1:] or train

    def mean(key: str) -> float | None:
        vals = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    return {
        "steps": train[-1]["step"],
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "tokens_per_s": mean("tokens_per_s"),
        "mfu": mean("mfu"),
        "mfu_window": mean("mfu_window"),
        "mfu_convention": train[-1].get("mfu_convention"),
        "peak_mem_gb": max((r.get("peak_mem_gb") or 0.0) for r in train),
        "peak_reserved_gb": max((r.get("peak_reserved_gb") or 0.0) for r in train) or None,
    }


def _cli(args: list[str], timeout: float, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "longtrain.launch", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"`longtrain {args[0]}` exited {r.returncode}: " + " | ".join(tail))


def stage_pretrain(sh: Shapes, out: Path, budget_s: float) -> dict[str, Any]:
    """tokenizer -> prepare -> pretrain (ZeRO-2, 20 steps) on this device; its metrics."""
    import importlib.util

    for mod in ("deepspeed", "sentencepiece", "yaml", "numpy", "longtrain.train.trainer"):
        if importlib.util.find_spec(mod) is None:
            return {"skipped": f"{mod} is not installed"}
    import yaml

    if budget_s < 60:
        return {"skipped": f"only {budget_s:.0f} s of the time budget left"}
    deadline = time.monotonic() + budget_s
    work = out / "pretrain"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if sh.dry:
        env["DS_ACCELERATOR"] = "cpu"

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    t0 = time.monotonic()
    tok, data = work / "tokenizer", work / "data"
    vocab = "1024" if sh.dry else "8000"
    _cli(["tokenizer", "--corpus", "stdlib", "--vocab-size", vocab, "--sample-mb", "4",
          "--out", str(tok)], left(), env)  # fmt: skip
    _cli(
        ["prepare", "--corpus", "stdlib", "--tokenizer", str(tok), "--out", str(data)], left(), env
    )
    cfg_path = work / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(pretrain_job(work, sh.dry)))
    t1 = time.monotonic()
    _cli(["pretrain", "--config", str(cfg_path)], left(), env)
    res = summarize_metrics(work / "run" / "metrics.jsonl")
    res.update({"data_s": t1 - t0, "pretrain_s": time.monotonic() - t1, "zero_stage": 2})
    return res


def stage_compile(sh: Shapes, out: Path, budget_s: float, eager: dict[str, Any]) -> dict[str, Any]:
    """``model.compile=true``: the pretrain stage's job again with every block compiled.

    Per-step losses against that eager run (bf16 on GPU: within 2e-2 relative; fp32 in the
    dry run: 1e-5), tokens/s of both over the steps past the first (the compile excluded),
    and the seconds the compile took (the run's ``compile_s`` row).
    """
    work = out / "pretrain"
    if "tokens_per_s" not in eager:
        return {"skipped": "needs the eager run of the pretrain stage"}
    if budget_s < eager["pretrain_s"] + 90:
        return {"skipped": f"only {budget_s:.0f} s of the time budget left"}
    env = dict(os.environ)
    if sh.dry:
        env["DS_ACCELERATOR"] = "cpu"
    run = work / "run_compiled"
    t0 = time.monotonic()
    _cli(["pretrain", "--config", str(work / "job.yaml"), "model.compile=true", f"run_dir={run}"],
         budget_s, env)  # fmt: skip

    def rows(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    loss_e = {r["step"]: r["loss"] for r in rows(work / "run" / "metrics.jsonl") if "loss" in r}
    compiled = rows(run / "metrics.jsonl")
    loss_c = {r["step"]: r["loss"] for r in compiled if "loss" in r}
    diff = max(abs(loss_c[k] - loss_e[k]) / abs(loss_e[k]) for k in loss_e)
    res = summarize_metrics(run / "metrics.jsonl")
    tol = 1e-5 if sh.dry else 2e-2
    res.update(
        {
            "compile_s": next((r["compile_s"] for r in compiled if "compile_s" in r), None),
            "eager_tokens_per_s": eager["tokens_per_s"],
            "speedup": (res["tokens_per_s"] or 0.0) / eager["tokens_per_s"],
            "max_rel_loss_diff": diff,
            "tolerance": tol,
            "run_s": time.monotonic() - t0,
            "ok": sorted(loss_c) == sorted(loss_e) and diff <= tol,
        }
    )
    return res


# ---------------------------------------------------------------------------------------------
# Driver


def _run_stage(name: str, fn: Callable[[], dict[str, Any]], report: dict[str, Any]) -> None:
    t0 = time.monotonic()
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = {
            "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
            "traceback": traceback.format_exc()[-3000:],
        }
    report[name]["seconds"] = round(time.monotonic() - t0, 1)
    print(f"[gpu_check] {name}: {report[name]['seconds']} s", file=sys.stderr, flush=True)


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(report: dict[str, Any]) -> str:
    """The short table printed last."""
    lines = [
        f"gpu_check on {report['device']} (torch {report['torch']}, dry run: {report['dry_run']})"
    ]
    mm = report.get("matmul", {})
    lines.append(
        f"  matmul peak ({mm.get('dtype', '?')}): {_fmt(mm.get('peak_tflops'), '.4g')} TFLOP/s"
    )
    cores = report.get("cores", {})
    for r in cores.get("results", []):
        if "error" in r:
            lines.append(f"  core {r['core']:<13} FAIL  {r['error']}")
            continue
        errs = " ".join(
            f"{k}={r[k]['err']:.1e}/{r[k]['tol']:.1e}" for k in ("out", "dq", "dk", "dv")
        )
        lines.append(f"  core {r['core']:<13} {'ok  ' if r['ok'] else 'FAIL'}  err/tol {errs}")
    for name, why in cores.get("skipped", {}).items():
        lines.append(f"  core {name:<13} skip  {why}")
    if "error" in cores:
        lines.append(f"  cores: ERROR {cores['error']}")
    for r in report.get("ring", {}).get("results", []):
        errs = r.get("error") or " ".join(
            f"{k}={r[k]['err']:.1e}/{r[k]['tol']:.1e}" for k in ("out", "dq", "dk", "dv")
        )
        label = f"ring {r['kernel']} x{r['ring']}"
        lines.append(f"  {label:<18} {'ok  ' if r['ok'] else 'FAIL'}  err/tol {errs}")
    for name, why in report.get("ring", {}).get("skipped", {}).items():
        lines.append(f"  ring {name:<13} skip  {why}")
    if "error" in report.get("ring", {}):
        lines.append(f"  ring: ERROR {report['ring']['error']}")
    hg = report.get("head_grad", {})
    if "paths" in hg:
        e = hg["rel_err"]
        lines.append(
            f"  head GEMMs bf16 {'ok  ' if hg['ok'] else 'FAIL'}  accumulate={hg['paths']['accumulate']}"
            f" logits={hg['paths']['logits']} fp32 GEMMs={hg['fp32_gemms']} (grad accumulator "
            f"{hg['head_grad_accumulator']}); rel err loss {e['loss']:.1e} dh {e['d_hidden']:.1e} "
            f"dW {e['d_head']:.1e}; {hg['bf16_s'] * 1e3:.1f} ms vs fp32 {hg['fp32_s'] * 1e3:.1f} ms"
        )
    elif "error" in hg:
        lines.append(f"  head_grad: ERROR {hg['error']}")
    model = report.get("model", {})
    if "rows" in model:
        lines.append(
            f"  {model['flavor']} fwd+bwd ({model['core']}, full AC, chunked loss); MFU = per-document"
            " causal, window = whole-window causal:"
        )
        lines.append(
            f"  {'seq':>6} {'docs':>4} {'tok/s':>9} {'TFLOP/s':>8} {'MFU meas':>8} {'window':>7}"
            f" {'MFU sheet':>9} {'window':>7} {'mem GB':>7} {'plan GB':>7}"
        )
        for r in model["rows"]:
            lines.append(
                f"  {r['seq_len']:>6} {r['docs']:>4} {r['tokens_per_s']:>9.0f} {r['model_tflops']:>8.1f} "
                f"{_fmt(r['mfu_vs_measured'], '.1%'):>8} {_fmt(r['mfu_window_vs_measured'], '.1%'):>7} "
                f"{_fmt(r['mfu_vs_datasheet'], '.1%'):>9} {_fmt(r['mfu_window_vs_datasheet'], '.1%'):>7} "
                f"{_fmt(r.get('max_allocated_gb'), '.1f'):>7} {r['planner_gb']:>7.1f}"
            )
    elif "error" in model:
        lines.append(f"  model: ERROR {model['error']}")
    lev = report.get("levers", {})
    for r in lev.get("rows", []):
        extra = (
            f", copies {r['copy_s']:.2f} s alone, overlap {r['overlap']:.0%}"
            if "overlap" in r
            else ""
        )
        lines.append(
            f"  lever {r['lever']:<10} {r['seq_len']} tokens: {r['step_s']:.3f} s "
            f"(x{r['slowdown']:.2f}){extra}; mem {_fmt(r.get('max_allocated_gb'), '.2f')} GB vs "
            f"plan {r['planner_gb']:.2f} GB"
        )
    if "error" in lev:
        lines.append(f"  levers: ERROR {lev['error']}")
    pt = report.get("pretrain", {})
    if "skipped" in pt:
        lines.append(f"  pretrain: skipped ({pt['skipped']})")
    elif "error" in pt:
        lines.append(f"  pretrain: ERROR {pt['error']}")
    elif pt:
        lines.append(
            f"  pretrain ZeRO-{pt['zero_stage']} {pt['steps']} steps: loss {pt['loss_first']:.3f} -> "
            f"{pt['loss_last']:.3f}, {_fmt(pt['tokens_per_s'], '.0f')} tok/s, MFU "
            f"{_fmt(pt['mfu'], '.1%')} (window {_fmt(pt.get('mfu_window'), '.1%')}), peak "
            f"{_fmt(pt['peak_mem_gb'])} GB (reserved {_fmt(pt.get('peak_reserved_gb'))})"
        )
    cp = report.get("compile", {})
    if "skipped" in cp or "error" in cp:
        lines.append(f"  compiled pretrain: {cp.get('skipped') or 'ERROR ' + cp['error']}")
    elif cp:
        lines.append(
            f"  compiled pretrain {'ok  ' if cp['ok'] else 'FAIL'} {cp['steps']} steps: "
            f"{_fmt(cp['tokens_per_s'], '.0f')} tok/s vs eager {cp['eager_tokens_per_s']:.0f} "
            f"(x{cp['speedup']:.2f}, compile excluded: {_fmt(cp['compile_s'])} s); loss diff "
            f"{cp['max_rel_loss_diff']:.1e} (tol {cp['tolerance']:.0e})"
        )
    lines.append(f"  total {report['seconds']:.0f} s; JSON: {report['json']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check the GPU path (see bench/gpu_check.py).")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU, fp32")
    ap.add_argument("--out", default=None, help="output directory (default runs/gpu_check/<time>)")
    ap.add_argument(
        "--skip-pretrain", action="store_true", help="skip the `longtrain pretrain` stage"
    )
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible; use --cpu-dry-run on a CPU machine", file=sys.stderr
        )
        return 2
    t_start = time.monotonic()
    out = Path(args.out or f"runs/gpu_check/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    sh = Shapes(dry)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": dry,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if not dry else f"CPU ({platform.machine()})",
        "host": platform.node(),
        "json": str(out / "gpu_check.json"),
    }
    try:
        import flash_attn

        report["flash_attn"] = flash_attn.__version__
    except Exception as e:
        report["flash_attn"] = f"not importable ({type(e).__name__})"
    try:
        from longtrain.train.metrics import tf32_enabled

        report["tf32"] = tf32_enabled()  # the policy this process runs under (fp32 GEMMs only)
    except Exception as e:
        report["tf32"] = f"unknown ({type(e).__name__})"
    _run_stage("matmul", lambda: stage_matmul(sh), report)
    _run_stage("cores", lambda: stage_cores(sh), report)
    _run_stage("ring", lambda: stage_ring(sh), report)
    _run_stage("head_grad", lambda: stage_head_grad(sh), report)
    peak = report["matmul"].get("peak_tflops")
    _run_stage("model", lambda: stage_model(sh, peak), report)
    _run_stage("levers", lambda: stage_levers(sh), report)
    if args.skip_pretrain:
        report["pretrain"] = {"skipped": "--skip-pretrain"}
    else:
        budget = args.budget_s - (time.monotonic() - t_start)
        _run_stage("pretrain", lambda: stage_pretrain(sh, out, budget), report)
        budget = args.budget_s - (time.monotonic() - t_start)
        _run_stage("compile", lambda: stage_compile(sh, out, budget, report["pretrain"]), report)
    report["seconds"] = time.monotonic() - t_start
    # A pretrain stage that ran and failed fails the check; a skipped one (no deepspeed) does not.
    report["ok"] = (
        bool(report["cores"].get("ok"))
        and bool(report["ring"].get("ok"))
        and bool(report["head_grad"].get("ok"))
        and "rows" in report["model"]
        and bool(report["levers"].get("ok"))
        and "error" not in report["pretrain"]
        and report.get("compile", {}).get("ok", True)  # skipped (no budget, no data): not a failure
    )
    Path(report["json"]).write_text(json.dumps(report, indent=2, default=str))
    print(summary_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
