"""Worker of tests/test_ring.py (holds no tests): run by torchrun on 4 CPU processes (gloo, fp32).

``python -m torch.distributed.run --nproc_per_node 4 tests/test_ring_worker.py OUT_DIR`` runs,
in one launch (deepspeed costs seconds per import):

- ``attention``: the ring attention op alone (ring 1, 2 and 4) in fp32 against the float64
  reference on packed windows, over a few seeds: output and gradient errors, the number of
  merge steps, the pairs computed; plus the negative control (dK/dV sent the wrong way round
  the ring, at ring 4);
- ``train``: DeepSpeed runs through the trainer's own loader (``LMTask.loader``) and step
  (``train_step``) at (sp=4, ring=2) and (sp=4, ring=4), and a 2-head model at (sp=4, ring=4),
  each against a plain single-process PyTorch run of the same job (SP=1, AdamW, clipping,
  sum / global count); plus the negative control (the loader's contiguous layout under a
  zigzag ring).

Every rank writes what it owns into OUT_DIR as ``torch.save`` files the test reads back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

import longtrain.train.ring as ring_mod
from longtrain.data.passkey import PasskeySample
from longtrain.model.attention import ReferenceAttention
from longtrain.model.config import get_flavor
from longtrain.model.ring_attention import ring_plan, ring_portion, simulate_ring
from longtrain.model.transformer import Transformer
from longtrain.train import engine as eng
from longtrain.train.config import load_job
from longtrain.train.eval.passkey import answer_scores
from longtrain.train.parallel import Topology, build_topology, init_distributed, parallelize
from longtrain.train.ring import RingAttention
from longtrain.train.stages import resolve_stages
from longtrain.train.tasks import make_task
from longtrain.train.trainer import quiet_libraries, train_step

SEQ = 64  # 8 zigzag chunks of 8 tokens at ring 4; 4 chunks of 16, cut in 2 pieces, at ring 2
STEPS = 6
MICRO = 2
VOCAB = 256
# Document lengths cycled through the stream: odd ones, ones shorter than a chunk (1, 2, 3, 5,
# 7), and ones crossing several chunk and rank edges (26, 30, 41, 64, 90).
DOC_LENGTHS = (3, 13, 1, 30, 17, 5, 41, 2, 9, 26, 7, 64, 11, 4, 19, 90, 6, 15)


def model_overrides(n_heads: int, n_kv: int) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                ffn_dim=128, max_seq_len=SEQ)  # fmt: skip


def make_stream(n_tokens: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of documents of ``DOC_LENGTHS`` (cycled), their starts, and an SFT-like mask."""
    rng = np.random.default_rng(seed)
    lengths, pos = [], 0
    while pos < n_tokens:
        n = DOC_LENGTHS[len(lengths) % len(DOC_LENGTHS)]
        lengths.append(n)
        pos += n
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = rng.integers(3, VOCAB, size=pos).astype(np.int64)
    mask = (rng.random(pos) > 0.2).astype(np.uint8)  # ~20% of targets masked
    return tokens, starts, mask


def write_data_dir(d: Path, streams: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """``streams`` (split name -> stream) as a data directory in ``longtrain prepare``'s
    layout, one shard per split."""
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, (tokens, starts, mask) in streams.items():
        name = f"{split}_00000"
        np.save(d / f"{name}.npy", tokens.astype(np.uint16))
        np.save(d / f"{name}.idx.npy", np.append(starts, len(tokens)).astype(np.int64))
        np.save(d / f"{name}.mask.npy", mask)
        shard = {"tokens": f"{name}.npy", "index": f"{name}.idx.npy", "mask": f"{name}.mask.npy",
                 "documents": len(starts), "stored_tokens": len(tokens), "sha256": {}}  # fmt: skip
        splits[split] = {"shards": [shard]}
    manifest = {"tokenizer_hash": "synthetic", "vocab_size": VOCAB, "dtype": "uint16",
                "splits": splits}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def job_for(data_dir: str, sp: int, ring: int, n_heads: int, n_kv: int, zero: int,
            ac: str = "none") -> Any:  # fmt: skip
    overrides = [
        "model.flavor=debug", "model.attention=sdpa", f"data.dir={data_dir}",
        f"data.seq_len={SEQ}", f"train.steps={STEPS}", f"train.micro_batch={MICRO}",
        "train.lr=3e-3", "train.warmup=2", "train.grad_clip=0.5", "train.loss_chunk_size=37",
        f"parallel.sp={sp}", f"parallel.ring={ring}", f"parallel.zero_stage={zero}",
        "parallel.dtype=fp32", f"parallel.activation_checkpointing={ac}",
    ] + [f"model.overrides.{k}={v}" for k, v in model_overrides(n_heads, n_kv).items()]  # fmt: skip
    return load_job(None, overrides)


def loader_for(job: Any, topo: Any) -> Any:
    """The loader ``Trainer`` builds for the job's one stage (``LMTask.loader``)."""

    stage = resolve_stages(job)[0]
    return make_task(job, None, stage.seq_len).loader(stage, topo)


def run_ds(job: Any, topo: Any, loader_topo: Any | None = None) -> dict[str, Any]:
    """Train ``job`` with DeepSpeed on ``topo``; per-step losses / grad norms, step-1 grads."""

    cfg = get_flavor("debug", **job.model.overrides)
    device = torch.device("cpu")
    ds_config = eng.deepspeed_config(job, topo.world_size, device)
    engine = eng.initialize_engine(job, eng.build_model(job, cfg, topo, ds_config, device), topo,
                                   ds_config)  # fmt: skip
    loader = loader_for(job, loader_topo or topo)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        batches = [next(loader)]
        if step == 0:  # capture the reduced gradients before the optimizer consumes them
            orig = engine.step

            def hooked(*a: Any, _orig: Any = orig, **k: Any) -> Any:
                if engine.is_gradient_accumulation_boundary():
                    grads.update({n: safe_get_full_grad(p).detach().clone()
                                  for n, p in engine.module.named_parameters()})  # fmt: skip
                return _orig(*a, **k)

            engine.step = hooked
        res = train_step(engine, batches, topo, job, device, eng.lr_at(step, job))
        if step == 0:
            engine.step = orig
        losses.append(res.loss)
        norms.append(res.grad_norm)
    engine.destroy()
    return {"losses": losses, "norms": norms, "grads": grads}


def run_reference(job: Any) -> dict[str, Any]:
    """The simplest trainer of the same job: one process, SP=1, AdamW, clip, sum / count."""

    cfg = get_flavor("debug", **job.model.overrides)
    with torch.device("meta"):
        model = Transformer(cfg, attention="sdpa")
    model.to_empty(device="cpu")
    torch.manual_seed(job.seed)
    model.init_weights()
    t = job.train
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
         {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
    )  # fmt: skip
    one = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, sp=1, ring=1))
    loader = loader_for(one, Topology(0, 1, 1, 1, 0, 0, None, None, None))
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        b = next(loader)
        n = int((b["labels"] != -100).sum())
        s, _ = model.loss(b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"],
                          b["max_seqlen"], t.loss_chunk_size)  # fmt: skip
        (s / n).backward()
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = eng.lr_at(step, job)
        opt.step()
        opt.zero_grad()
        losses.append(float(s.detach()) / n)
        norms.append(float(norm))
    return {"losses": losses, "norms": norms, "grads": grads}


# ---- the attention op alone ------------------------------------------------------------------

ATT_SHAPE = (2, 256, 4, 2, 32)  # B, L, Hq, Hkv, D
ATT_DOCS = (1, 3, 8, 9, 16, 2, 33, 70, 5, 41, 6, 62)  # row 0; row 1 is one causal document
ATT_SEEDS = (0, 1, 2)


def att_offsets() -> list[int]:
    B, L = ATT_SHAPE[:2]
    assert sum(ATT_DOCS) == L
    return [0, *np.cumsum(ATT_DOCS).tolist(), 2 * L][: len(ATT_DOCS) + 2]


def merges(ring: int) -> int:
    """Most partial results any query merges at ring ``ring`` (1 = nothing to merge)."""

    B, L = ATT_SHAPE[:2]
    most = 1
    for r in range(ring):
        plan = ring_plan(tuple(att_offsets()), B, L, ring, r)
        count = np.ones(B * L // ring, dtype=np.int64)
        for st in plan.steps:
            np.add.at(count, st.q_rows, 1)
        most = max(most, int(count.max()))
    return most - 1


def attention_errors(topos: dict[int, Any], rank: int) -> dict[str, Any]:
    """fp32 ring attention against the float64 reference, for ring 1 (one process), 2, 4."""

    B, L, Hq, Hkv, D = ATT_SHAPE
    cu = torch.tensor(att_offsets(), dtype=torch.int32)
    out: dict[str, Any] = {"shape": list(ATT_SHAPE), "docs": len(att_offsets()) - 1, "rows": {}}
    for ring in (1, 2, 4):
        errs = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
        for seed in ATT_SEEDS:
            gen = torch.Generator().manual_seed(seed)
            # fp32 inputs, and the reference in float64 on exactly those values: the errors
            # are the computation's own, not the rounding of the inputs to fp32.
            x = [torch.randn(B, L, h, D, generator=gen).double() for h in (Hq, Hkv, Hkv, Hq)]
            q, k, v = (t.clone().requires_grad_(True) for t in x[:3])
            o = ReferenceAttention()(q, k, v, cu)
            o.backward(x[3])
            ref = [o.detach(), q.grad, k.grad, v.grad]
            q, k, v = (t.float().requires_grad_(True) for t in x[:3])
            if ring == 1:
                o = simulate_ring(q, k, v, cu, 1)
                o.backward(x[3].float())
                got = [o.detach(), q.grad, k.grad, v.grad]
            else:
                topo = topos[ring]
                idx = torch.from_numpy(ring_portion(L, topo.ring_rank, ring))
                ql, kl, vl = (t.detach()[:, idx].clone().requires_grad_(True) for t in (q, k, v))
                att = RingAttention(torch.nn.Identity(), topo.ring_group, ring, topo.ring_rank,
                                    "sdpa")  # fmt: skip
                o = att(ql, kl, vl, cu, None)  # (B, L/R, Hq, D)
                o.backward(x[3].float()[:, idx])
                got = []
                for t in (o.detach(), ql.grad, kl.grad, vl.grad):
                    parts = [torch.empty_like(t) for _ in range(ring)]
                    dist.all_gather(parts, t.contiguous(), group=topo.ring_group)
                    full = torch.empty(B, L, *t.shape[2:], dtype=t.dtype)
                    for r, part in enumerate(parts):
                        full[:, torch.from_numpy(ring_portion(L, r, ring))] = part
                    got.append(full)
            for name, a, b in zip(errs, got, ref):
                e = float((a.double() - b).abs().max() / b.abs().max())
                errs[name] = max(errs[name], e)
        out["rows"][ring] = {"errors": errs, "grad_error": max(errs["dq"], errs["dk"], errs["dv"]),
                             "merges": merges(ring)}  # fmt: skip
    return out


def wrong_way_control(topo: Any) -> dict[str, float]:
    """Negative control: dK/dV accumulators sent to the previous rank instead of the next one
    (ring 4; at ring 2 both neighbours are the same rank). Gradient errors must blow up."""

    orig = ring_mod.RingComm.exchange

    def wrong_way(self: Any, send: torch.Tensor, tag: int = ring_mod.KV_TAG) -> Any:
        if tag != ring_mod.DKV_TAG:
            return orig(self, send, tag)
        self.next, self.prev = self.prev, self.next
        try:
            return orig(self, send, tag)
        finally:
            self.next, self.prev = self.prev, self.next

    B, L, Hq, Hkv, D = ATT_SHAPE
    cu = torch.tensor(att_offsets(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(B, L, h, D, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]
    q, k, v = (t.clone().requires_grad_(True) for t in x[:3])
    ReferenceAttention()(q, k, v, cu).backward(x[3])
    idx = torch.from_numpy(ring_portion(L, topo.ring_rank, 4))
    ql, kl, vl = (t.detach()[:, idx].float().requires_grad_(True) for t in x[:3])
    att = ring_mod.RingAttention(torch.nn.Identity(), topo.ring_group, 4, topo.ring_rank, "sdpa")
    ring_mod.RingComm.exchange = wrong_way
    try:
        att(ql, kl, vl, cu, None).backward(x[3].float()[:, idx])
    finally:
        ring_mod.RingComm.exchange = orig
    errs = {}
    for name, got, ref in (("dk", kl.grad, k.grad), ("dv", vl.grad, v.grad)):
        e = torch.tensor([float((got.double() - ref[:, idx]).abs().max() / ref.abs().max())])
        dist.all_reduce(e, op=dist.ReduceOp.MAX, group=topo.ring_group)
        errs[name] = float(e)
    return errs


def passkey_check(topos: dict[int, Any]) -> dict[str, Any]:
    """Passkey scoring (``answer_scores``) of a 301-token prompt (odd: padded to a multiple of
    2 x sp with a separate document) at (sp=4, ring=2) and (4, 4) against one process."""

    torch.manual_seed(0)
    model = Transformer(get_flavor("debug", **{**model_overrides(4, 2), "max_seq_len": 512}),
                        attention="sdpa").eval()  # fmt: skip
    ids = torch.randint(3, VOCAB, (301,), generator=torch.Generator().manual_seed(1)).tolist()
    sample = PasskeySample(input_ids=ids, answer_start=296, answer_ids=ids[296:], key="",
                           needle_start=100, depth=0.5, actual_depth=0.5, length=301)  # fmt: skip
    device = torch.device("cpu")
    res: dict[str, Any] = {"sp1": answer_scores(model, sample, device, None)}
    for ring, topo in topos.items():
        m = parallelize(copy.deepcopy(model), topo, job=None)
        res[f"sp4_ring{ring}"] = answer_scores(m, sample, device, topo)
    return res


# ---- driver ----------------------------------------------------------------------------------

TRAIN = {  # name: (sp, ring, n_heads, n_kv_heads, zero stage, activation checkpointing)
    "sp4_ring2": (4, 2, 4, 2, 3, "none"),
    "sp4_ring4": (4, 4, 4, 2, 1, "none"),
    # SP beyond the head count, every block recomputed (the ring's sends replayed in backward)
    "sp4_ring4_2heads": (4, 4, 2, 2, 2, "full"),
}


def main(out_dir: str) -> None:
    rank, world, _ = init_distributed(timeout_s=120)
    quiet_libraries(rank)
    assert world == 4, world
    out = Path(out_dir)
    data = out / "data"
    if rank == 0:
        write_data_dir(data, {"train": make_stream()})
    dist.barrier()
    topos = {2: build_topology(4, 2), 4: build_topology(4, 4)}
    t0 = time.perf_counter()
    att = attention_errors(topos, rank)
    att["wrong_way"] = wrong_way_control(topos[4])
    att["seconds"] = time.perf_counter() - t0
    att["passkey"] = passkey_check(topos)
    if rank == 0:
        torch.save(att, out / "attention.pt")
    # References: one process each, spread over the ranks (they run side by side).
    for i, (name, (sp, ring, h, kv, zero, _)) in enumerate(TRAIN.items()):
        if i % world == (rank + 1) % world:
            ref = run_reference(job_for(str(data), sp, ring, h, kv, zero))
            torch.save(ref, out / f"ref_{name}.pt")
    for name, (sp, ring, h, kv, zero, ac) in TRAIN.items():
        t0 = time.perf_counter()
        res = run_ds(job_for(str(data), sp, ring, h, kv, zero, ac), topos[ring])
        res["seconds"] = time.perf_counter() - t0
        if rank == 0:
            torch.save(res, out / f"ds_{name}.pt")
    # Negative control: the loader cuts windows contiguously (the ring=1 layout) while the
    # model runs a zigzag ring of 4.
    topo = topos[4]
    flat = dataclasses.replace(topo, ring=1, ulysses=0, ulysses_rank=-1, ulysses_group=None)
    sp, ring, h, kv, zero, _ = TRAIN["sp4_ring4"]
    res = run_ds(job_for(str(data), sp, ring, h, kv, zero), topo, loader_topo=flat)
    if rank == 0:
        torch.save(res, out / "ds_layout_bug.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
