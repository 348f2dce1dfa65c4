"""``model.compile``: compiled blocks compute what eager ones do, and really are compiled.

- ``longtrain pretrain`` with SP=2 + ZeRO-3 + full activation checkpointing + the tiled MLP,
  compiled against eager: the same per-step losses, gradient norms and validation losses
  (within 1e-5 relative), the compile time logged once.
- ``longtrain finetune`` with LoRA under ZeRO-3 (blocks become ZeRO-3 leaves; the first
  block's input, which needs no gradient, is handed over as one that does): the same.
- In one process: the compiled blocks ran compiled graphs (dynamo's counters), evaluation
  under ``torch.no_grad`` compiles nothing, and the negative controls: one weight 1% off is
  seen by the 1e-5 comparison, and torchtitan's order (compile over the
  checkpoint) would compile nothing at all, which is why ``apply_compile`` runs first.

Each compile costs tens of seconds on a CPU, so there are only these few.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch._dynamo
import torch._dynamo.utils
import yaml

from longtrain.model.config import get_flavor
from longtrain.model.transformer import Transformer
from longtrain.train.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    compile_seconds,
)

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
TIMEOUT = 420
COMPILE_LINE = "longtrain: torch.compile of the blocks took"


def _job(run: Path, data: Path, **sections: dict) -> dict:
    job = {
        "model": {
            "flavor": "debug",
            "attention": "sdpa",
            "overrides": {**SHAPE, "vocab_size": 512},
        },
        "data": {"dir": str(data), "seq_len": 128, "attention": "document", "val_batches": 2},
        "train": {"steps": 5, "lr": 3e-3, "warmup": 1, "mlp_chunk_size": 32},
        "parallel": {"zero_stage": 3, "dtype": "fp32", "timeout_s": 120},
        "checkpoint": {"interval": 0, "keep": 2, "resume": "never"},
        "log": {"interval": 1, "eval_interval": 5, "tensorboard": False, "progress": False},
        "run_dir": str(run),
    }
    for k, v in sections.items():
        job[k] = {**job.get(k, {}), **v}
    return job


def _run(command: str, job: dict, nproc: int, *overrides: str) -> str:
    """``longtrain COMMAND`` on ``nproc`` ranks (torchrun when > 1); returns its output."""
    path = Path(job["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(job))
    args = ["-m", "longtrain.launch", command, "--config", str(path), *overrides]
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *args]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _compare(eager: Path, compiled: Path, tol: float = 1e-5) -> float:
    """Worst relative difference of the per-step losses (and validation losses); gradient
    norms within 10x that. Returns the worst loss difference."""
    worst = 0.0
    a = [r for r in _rows(eager) if "compile_s" not in r]
    b = [r for r in _rows(compiled) if "compile_s" not in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key, t in (("loss", tol), ("val_loss", tol), ("grad_norm", 10 * tol)):
            if key in ra:
                rel = abs(ra[key] - rb[key]) / abs(ra[key])
                assert rel <= t, f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
                worst = max(worst, rel) if key != "grad_norm" else worst
    assert sum("loss" in r for r in a) == 5 and sum("val_loss" in r for r in a) == 2
    return worst


def _compiled_once(run: Path, out: str) -> None:
    timed = [r for r in _rows(run) if "compile_s" in r]
    assert len(timed) == 1 and timed[0]["step"] == 1 and timed[0]["compile_s"] > 1.0, timed
    assert out.count(COMPILE_LINE) == 1, out[-2000:]


def test_pretrain_sp2_zero3_checkpointed_compiled_equals_eager(work: Path, tmp_path: Path) -> None:
    ac = {"sp": 2, "activation_checkpointing": "full"}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    out_e = _run("pretrain", _job(eager, work / "data", parallel=ac), 2)
    out_c = _run("pretrain", _job(compiled, work / "data", parallel=ac), 2, "model.compile=true")
    assert "DP 1 x SP 2, ZeRO-3" in out_c
    worst = _compare(eager, compiled)
    print(f"\nSP=2 ZeRO-3 full AC tiled MLP: worst relative loss difference {worst:.1e}")
    _compiled_once(compiled, out_c)
    assert COMPILE_LINE not in out_e and not any("compile_s" in r for r in _rows(eager))


def test_lora_finetune_zero3_compiled_equals_eager(work: Path, tmp_path: Path) -> None:
    from longtrain.train.export import save_hf

    torch.manual_seed(0)
    init = tmp_path / "init"
    cfg = get_flavor("debug", **SHAPE, vocab_size=512, max_seq_len=128)
    save_hf(Transformer(cfg, attention="sdpa"), init, tokenizer=work / "tok", dtype="fp32")
    # Adapters on attention and MLP; the embedding is frozen, so block 0's input needs no grad.
    lora = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "w2"]}
    sections = dict(model={"init": str(init), "overrides": {}}, finetune={"lora": lora},
                    log={"eval_interval": 0})  # fmt: skip
    eager, compiled = tmp_path / "lora_eager", tmp_path / "lora_compiled"
    out_e = _run("finetune", _job(eager, work / "data", **sections), 1)
    out_c = _run("finetune", _job(compiled, work / "data", **sections), 1, "model.compile=true")
    worst = 0.0
    for ra, rb in zip(_rows(eager), [r for r in _rows(compiled) if "compile_s" not in r]):
        assert ra["step"] == rb["step"]
        worst = max(worst, abs(ra["loss"] - rb["loss"]) / ra["loss"])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * ra["grad_norm"], (ra, rb)
    print(f"\nLoRA ZeRO-3: worst relative loss difference {worst:.1e}")
    assert worst <= 1e-5 and len(_rows(eager)) == 5
    _compiled_once(compiled, out_c)
    assert COMPILE_LINE not in out_e


# ---- in one process -----------------------------------------------------------------------


def _model(ac: str, compiled: bool) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(get_flavor("debug", **SHAPE, vocab_size=97, max_seq_len=128), "sdpa")
    with torch.no_grad():  # far from uniform outputs, so that every weight shows in the loss
        for prm in m.parameters():
            prm.normal_(0, 0.15) if prm.dim() == 2 else prm.uniform_(0.5, 1.5)
    apply_compile(m, compiled)  # parallelize's order: compile, then checkpoint
    apply_activation_checkpointing(m, ac)
    return m


def _loss(m: Transformer, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 97, (1, 97), generator=g)
    cu = torch.tensor([0, 30 + step, 31 + step, 96], dtype=torch.int32)  # a new layout each step
    s, n = m.loss(ids[:, :-1], ids[:, 1:], cu_seqlens=cu, max_seqlen=65 - step, chunk_size=32)
    return s / n


def _graphs() -> int:
    """FX graphs dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_compiled_blocks_run_compiled_graphs_and_match() -> None:
    torch._dynamo.reset()
    eager, comp = _model("selective", False), _model("selective", True)
    graphs0 = _graphs()
    for step in range(2):  # the second step has a new document layout: no recompile needed
        le, lc = _loss(eager, step), _loss(comp, step)
        le.backward()
        lc.backward()
        assert abs(float(le.detach()) - float(lc.detach())) <= 1e-5 * float(le.detach())
        for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
            err = float((pc.grad - pe.grad).abs().max())  # fp32 sums in another order: ~1e-6
            assert err <= 1e-5 * float(pe.grad.abs().max()), (name, err)
        if step == 0:
            compiled_graphs = _graphs() - graphs0
    # Compiled once, for both blocks (they share the code), and not again for a new layout.
    assert compiled_graphs > 0 and _graphs() - graphs0 == compiled_graphs
    assert compile_seconds() is not None and compile_seconds() > 0
    with torch.no_grad():  # evaluation runs the eager forward: nothing new is compiled
        torch.testing.assert_close(_loss(comp, 5), _loss(eager, 5), rtol=1e-5, atol=0)
    assert _graphs() - graphs0 == compiled_graphs
    # Negative control: one weight 1% off is more than the comparison allows, and the graphs
    # read the live weights (parameters are graph inputs, not constants baked in).
    with torch.no_grad():
        before = float(_loss(eager, 0))
        for m in (comp, eager):
            m.layers[1].feed_forward.w1.weight.mul_(1.01)
        assert abs(float(_loss(comp, 0)) - before) > 1e-5 * before
        assert abs(float(_loss(comp, 0)) - float(_loss(eager, 0))) <= 1e-5 * before


def test_negative_control_compiling_over_the_checkpoint_compiles_nothing() -> None:
    """torchtitan's order, ``torch.compile`` over the checkpointed block: with the core's
    graph break inside the checkpoint region dynamo gives up on the whole block and runs it
    eagerly, silently; the counters show it (and ``apply_compile`` avoids it by going first)."""
    torch._dynamo.reset()
    m = _model("full", False)
    for block in m.layers:
        block.attention.core.forward = torch.compiler.disable(block.attention.core.forward)
        block.compile()  # over the checkpointing forward
    graphs0 = _graphs()
    _loss(m, 0).backward()
    assert _graphs() == graphs0
