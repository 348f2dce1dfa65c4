"""Equivalence of the distributed training step against simple references (CPU, gloo, fp32).

- SP=2 (Ulysses, ZeRO-3) == SP=1 on packed multi-document windows with masked tokens: per-step
  loss and grad norm within 1e-5 relative for 6 steps, full gradients close after step 1; also
  with 1 K/V head (replicated up to SP=2).
- DP=2 == DP=1 with grad_accum=2 (the same windows per step) for ZeRO-1, ZeRO-2 and ZeRO-3.
- DeepSpeed at DP=1 == a plain PyTorch loop (AdamW, clipping, sum/count loss), so a scaling
  mistake common to both DeepSpeed runs cannot hide.
- ZeRO-3's layer-by-layer init equals ``Transformer.init_weights``; a NaN loss skips the update;
  full activation checkpointing (recompute with all-to-alls inside) changes nothing.

All scenarios of one world size run inside ONE launch (deepspeed costs seconds per import):
this file is also the worker, started by torchrun as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()
STEPS = 6
SEQ = 64
VOCAB = 256


def model_overrides(n_kv: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv,
        ffn_dim=128,
        max_seq_len=SEQ,
    )


# ---------------------------------------------------------------------------------------------
# Synthetic packed data, cut exactly like longtrain.data.loader (shift, then split for SP).


def make_stream(seed: int = 0, n_tokens: int = 6000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of many short documents, their start offsets, and a loss mask (SFT-like holes)."""
    rng = np.random.default_rng(seed)
    toks, starts, pos = [], [], 0
    while pos < n_tokens:
        n = int(rng.integers(3, 50))  # uneven documents, several per window
        starts.append(pos)
        toks.append(rng.integers(3, VOCAB, size=n))
        pos += n
    tokens = np.concatenate(toks).astype(np.int64)
    mask = (rng.random(len(tokens)) > 0.2).astype(np.uint8)  # ~20% of targets masked
    return tokens, np.asarray(starts, dtype=np.int64), mask


def batch_for(
    window_ids: list[int], sp_rank: int, sp: int, stream: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> dict[str, Any]:
    from longtrain.data.packing import pack

    tokens, doc_starts, mask = stream
    starts = np.asarray(window_ids, dtype=np.int64) * SEQ
    windows = np.stack([tokens[s : s + SEQ + 1] for s in starts])  # (B, L+1)
    masks = np.stack([mask[s : s + SEQ + 1] for s in starts])  # (B, L+1)
    p = pack(windows, starts, doc_starts, masks, "document")
    lo, hi = sp_rank * SEQ // sp, (sp_rank + 1) * SEQ // sp
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(p["input_ids"][:, lo:hi])),  # (B, L/sp)
        "labels": torch.from_numpy(np.ascontiguousarray(p["labels"][:, lo:hi])),  # (B, L/sp)
        "position_ids": torch.from_numpy(np.ascontiguousarray(p["position_ids"][:, lo:hi])),
        "cu_seqlens": torch.from_numpy(p["cu_seqlens"].astype(np.int32)),
        "max_seqlen": int(p["max_seqlen"]),
    }


def step_batches(step: int, micro: int, dp: int, accum: int, topo: Any, stream: Any) -> list:
    """This rank's micro-batches of ``step``: the loader's global order (DP block per micro)."""
    per_step = micro * dp * accum
    out = []
    for k in range(accum):
        first = step * per_step + k * micro * dp + topo.dp_rank * micro
        out.append(batch_for(list(range(first, first + micro)), topo.sp_rank, topo.sp, stream))
    return out


# ---------------------------------------------------------------------------------------------
# Worker side (runs under torchrun).


def _job(sp: int, zero: int, micro: int, accum: int, n_kv: int, ac: str = "none") -> Any:
    from longtrain.train.config import load_job

    return load_job(
        None,
        [
            "model.flavor=debug",
            "model.attention=sdpa",
            f"data.seq_len={SEQ}",
            f"train.steps={STEPS}",
            f"train.micro_batch={micro}",
            f"train.grad_accum={accum}",
            "train.lr=3e-3",
            "train.warmup=2",
            "train.grad_clip=0.5",  # small, so clipping is active and its norm must be right
            "train.loss_chunk_size=37",
            f"parallel.sp={sp}",
            f"parallel.zero_stage={zero}",
            "parallel.dtype=fp32",
            f"parallel.activation_checkpointing={ac}",
        ]
        + [f"model.overrides.{k}={v}" for k, v in model_overrides(n_kv).items()],
    )


def _full_grads(engine: Any) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}


def _param_sq_norm(engine: Any) -> float:
    from deepspeed.utils import safe_get_full_fp32_param

    return sum(
        float(safe_get_full_fp32_param(p).double().pow(2).sum()) for p in engine.module.parameters()
    )


def run_ds(scn: dict[str, Any], topo_cache: dict[int, Any], stream: Any) -> dict[str, Any]:
    """Train one scenario with DeepSpeed; returns per-step losses/grad norms and step-1 grads."""
    from longtrain.model.config import get_flavor
    from longtrain.train import engine as eng
    from longtrain.train.parallel import build_topology
    from longtrain.train.trainer import train_step

    sp, zero, micro, accum, n_kv = scn["sp"], scn["zero"], scn["micro"], scn["accum"], scn["kv"]
    job = _job(sp, zero, micro, accum, n_kv, scn.get("ac", "none"))
    cfg = get_flavor("debug", **model_overrides(n_kv))
    if sp not in topo_cache:
        topo_cache[sp] = build_topology(sp)
    topo = topo_cache[sp]
    device = torch.device("cpu")
    ds_config = eng.deepspeed_config(job, topo.world_size, device)
    model = eng.build_model(job, cfg, topo, ds_config, device)
    engine = eng.initialize_engine(job, model, topo, ds_config)
    losses, norms, grads, params0, pnorms = [], [], None, None, []
    if scn.get("check_init"):
        from deepspeed.utils import safe_get_full_fp32_param

        params0 = {
            n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()
        }
    for step in range(STEPS):
        batches = step_batches(step, micro, topo.dp, accum, topo, stream)
        if step == 0:
            # Capture gradients at the boundary, before the optimizer consumes them.
            orig = engine.step
            captured: dict[str, Any] = {}

            def hooked(*a: Any, _orig: Any = orig, _cap: dict = captured, **k: Any) -> Any:
                if engine.is_gradient_accumulation_boundary():
                    _cap.update(_full_grads(engine))
                return _orig(*a, **k)

            engine.step = hooked
        inject = scn.get("nan_step") == step
        res = train_step(
            engine, batches, topo, job, device, eng.lr_at(step, job), inject_nan=inject
        )
        if step == 0:
            engine.step = orig
            grads = captured
        losses.append(res.loss)
        norms.append(res.grad_norm if not res.skipped else None)
        if "nan_step" in scn:
            pnorms.append(_param_sq_norm(engine))
    out = {"losses": losses, "norms": norms, "grads": grads, "params0": params0, "pnorms": pnorms}
    engine.destroy()
    return out


def run_torch_reference(stream: Any, accum: int, micro: int) -> dict[str, Any]:
    """The simplest trainer: one device, AdamW, clip, loss = sum / count over the step."""
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train import engine as eng
    from longtrain.train.parallel import Topology

    job = _job(1, 0, micro, accum, 2)
    cfg = get_flavor("debug", **model_overrides(2))
    with torch.device("meta"):
        model = Transformer(cfg, attention="sdpa")
    model.to_empty(device="cpu")
    torch.manual_seed(job.seed)
    model.init_weights()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    t = job.train
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
    )
    topo = Topology(0, 1, 1, 1, 0, 0, None, None, None)
    losses, norms = [], []
    for step in range(STEPS):
        batches = step_batches(step, micro, 1, accum, topo, stream)
        n = sum(int((b["labels"] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            s, _ = model.loss(
                b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], 37
            )
            (s / n).backward()
            total += float(s)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = eng.lr_at(step, job)
        opt.step()
        opt.zero_grad()
        losses.append(total / n)
        norms.append(float(norm))
    return {"losses": losses, "norms": norms}


def worker(out_dir: str, which: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from longtrain.train.parallel import init_distributed

    rank, world, _ = init_distributed(timeout_s=120)
    from longtrain.train.trainer import quiet_libraries

    quiet_libraries(rank)
    stream = make_stream()
    topo_cache: dict[int, Any] = {}
    if which == "world2":
        scenarios = {
            "sp2_z3": dict(sp=2, zero=3, micro=2, accum=1, kv=2, check_init=True),
            "sp2_z1_kv1": dict(sp=2, zero=1, micro=2, accum=1, kv=1),
            "dp2_z3": dict(sp=1, zero=3, micro=1, accum=1, kv=2),
            "dp2_z1": dict(sp=1, zero=1, micro=1, accum=1, kv=2),
            "dp2_z2": dict(sp=1, zero=2, micro=1, accum=1, kv=2),
            "nan_z3": dict(sp=2, zero=3, micro=1, accum=1, kv=2, nan_step=2),
            "sp2_z3_ac": dict(sp=2, zero=3, micro=2, accum=1, kv=2, ac="full"),
        }
    else:
        scenarios = {
            "sp1_z3": dict(sp=1, zero=3, micro=2, accum=1, kv=2, check_init=True),
            "sp1_z1_kv1": dict(sp=1, zero=1, micro=2, accum=1, kv=1),
            "acc2_z3": dict(sp=1, zero=3, micro=1, accum=2, kv=2),
            "acc2_z1": dict(sp=1, zero=1, micro=1, accum=2, kv=2),
            "acc2_z2": dict(sp=1, zero=2, micro=1, accum=2, kv=2),
            "acc2_z0": dict(sp=1, zero=0, micro=1, accum=2, kv=2),
        }
    results: dict[str, Any] = {}
    for name, scn in scenarios.items():
        results[name] = run_ds(scn, topo_cache, stream)
    if which == "world1":
        results["torch_acc2"] = run_torch_reference(stream, accum=2, micro=1)
        from longtrain.model.config import get_flavor
        from longtrain.model.transformer import Transformer

        torch.manual_seed(0)
        m = Transformer(get_flavor("debug", **model_overrides(2)), attention="sdpa")
        torch.manual_seed(0)
        m.init_weights()
        results["init_weights"] = {n: p.detach().clone() for n, p in m.named_parameters()}
    if rank == 0:
        torch.save(results, Path(out_dir) / f"{which}.pt")


def _launch(nproc: int, out_dir: Path, which: str) -> subprocess.Popen:
    from longtrain.train.parallel import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(HERE),
        "--worker",
        str(out_dir),
        which,
    ]
    log = open(out_dir / f"{which}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("equiv")
    procs = {w: _launch(n, out, w) for w, n in (("world2", 2), ("world1", 1))}
    for w, p in procs.items():
        try:
            rc = p.wait(timeout=420)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = -9
        if rc != 0:
            pytest.fail(f"{w} launch failed (rc={rc}):\n{(out / f'{w}.log').read_text()[-6000:]}")
    res: dict[str, Any] = {}
    for w in procs:
        res.update(torch.load(out / f"{w}.pt", weights_only=False))
    return res


def _close(a: list[float], b: list[float], rtol: float = 1e-5) -> None:
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rel = np.abs(a_ - b_) / np.abs(b_)
    assert rel.max() <= rtol, f"max relative difference {rel.max():.3g}\n{a}\n{b}"


def _grads_close(ga: dict, gb: dict, rtol: float = 1e-4) -> None:
    assert ga.keys() == gb.keys()
    for n in ga:
        scale = float(gb[n].abs().max()) + 1e-12
        err = float((ga[n] - gb[n]).abs().max()) / scale
        assert err <= rtol, f"gradient of {n}: relative difference {err:.3g}"


@pytest.mark.slow
def test_sp2_equals_sp1(results: dict[str, Any]) -> None:
    a, b = results["sp2_z3"], results["sp1_z3"]
    assert len(a["losses"]) >= 5
    _close(a["losses"], b["losses"])
    _close(a["norms"], b["norms"])
    _grads_close(a["grads"], b["grads"])
    # Adam is nearly invariant to a uniform gradient scale, so equal losses alone would not
    # catch a wrong normalisation (DeepSpeed's SP ZeRO-3 path once halved every gradient): the
    # grad norms and raw gradients above do.


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing(results: dict[str, Any]) -> None:
    # Recomputing every block (with Ulysses all-to-alls inside, under ZeRO-3) is exact.
    a, b = results["sp2_z3_ac"], results["sp1_z3"]
    _close(a["losses"], b["losses"])
    _close(a["norms"], b["norms"])
    _grads_close(a["grads"], b["grads"])


@pytest.mark.slow
def test_sp2_with_replicated_kv_heads(results: dict[str, Any]) -> None:
    a, b = results["sp2_z1_kv1"], results["sp1_z1_kv1"]
    _close(a["losses"], b["losses"])
    _close(a["norms"], b["norms"])
    _grads_close(a["grads"], b["grads"])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_dp2_equals_dp1_accum2(results: dict[str, Any], zero: int) -> None:
    a, b = results[f"dp2_z{zero}"], results[f"acc2_z{zero}"]
    _close(a["losses"], b["losses"])
    _close(a["norms"], b["norms"])
    _grads_close(a["grads"], b["grads"])


@pytest.mark.slow
def test_deepspeed_equals_plain_torch(results: dict[str, Any]) -> None:
    ref = results["torch_acc2"]
    for name in ("acc2_z0", "acc2_z1", "acc2_z3"):
        _close(results[name]["losses"], ref["losses"])
        _close(results[name]["norms"], ref["norms"])


@pytest.mark.slow
def test_zero3_init_matches_init_weights(results: dict[str, Any]) -> None:
    ref = results["init_weights"]
    for name in ("sp2_z3", "sp1_z3"):
        got = results[name]["params0"]
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)


@pytest.mark.slow
def test_nan_loss_skips_the_update(results: dict[str, Any]) -> None:
    nan = results["nan_z3"]
    assert np.isnan(nan["losses"][2]) and nan["norms"][2] is None
    p = nan["pnorms"]
    assert p[2] == p[1], "the NaN step changed the weights"
    assert p[1] != p[0] and p[3] != p[2], "normal steps must change the weights"
    assert all(np.isfinite(x) for i, x in enumerate(nan["losses"]) if i != 2)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3])
