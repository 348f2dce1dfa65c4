"""The memory-ceiling levers in the real trainer: ``longtrain pretrain`` under torchrun on two
ranks (gloo, CPU, fp32), SP=2 + ZeRO-3 + full activation checkpointing, five steps.

- ``train.mlp_chunk_size`` (a tile that does not divide the 98 local tokens: tiles of 33, 33,
  32) trains as without tiling: per-step losses within 1e-5, gradients after step 1 too.
- ``parallel.offload_activations`` trains as without offload: per-step losses and gradients
  after step 1 equal (offload is a copy), and every metrics row's ``offload_host_gb`` is the
  planner's host figure, ``train.offload.host_bytes_needed``.
- ``parallel.offload_optimizer``: DeepSpeed's gradient buffers, counted in the live engine
  after the first backward, are the ones ``train.plan.zero_buffers`` lists, with their sizes
  and their placement (the optimizer's offload flag).
- Negative controls: a tiled MLP that loses a tile's gradient and an offload whose host copy
  is perturbed by 1e-4 both fail the same comparisons.

Gradients are read by a test-only hook around ``engine.step`` (this file is the hooked
command: ``python tests/test_levers.py ARGS``), as ``tests/hooked_cli.py`` does for faults.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import longtrain.model.tiled as tiled
import longtrain.train.offload as offload_mod
import longtrain.train.trainer as trainer
from longtrain.data.corpus import CorpusSpec
from longtrain.data.prepare import prepare
from longtrain.data.tokenizer import train_tokenizer
from longtrain.launch.cli import main as cli_main
from longtrain.model.config import get_flavor
from longtrain.model.transformer import Transformer
from longtrain.train.config import load_job
from longtrain.train.offload import ActivationOffload, apply_activation_offload, host_bytes_needed
from longtrain.train.parallel import apply_activation_checkpointing, free_port
from longtrain.train.plan import CPU, PlanInput, memory, zero_buffers

HERE = Path(__file__).resolve()
SEQ, CHUNK = 196, 40  # SP=2: 98 local tokens; 40 does not divide them: tiles 33, 33, 32
STEPS = 5
RUNS: dict[str, dict[str, str]] = {
    "ref": {},
    "tiled": {"train.mlp_chunk_size": str(CHUNK)},
    "offload": {"parallel.offload_activations": "true"},
    "offload_opt": {"parallel.offload_optimizer": "true"},
    # Negative controls (test-only faults, see _install_hooks).
    "tiled_bug": {"train.mlp_chunk_size": str(CHUNK), "HOOK": "drop_tile"},
    "offload_bug": {"parallel.offload_activations": "true", "HOOK": "perturb_host"},
}


# ---- the hooked command (runs on every rank) ------------------------------------------------


def _install_hooks() -> None:
    """Test-only hooks, chosen by environment variables (no hook in the product code).

    ``LEVERS_OUT``: before the first ``engine.step``, every rank gathers each parameter's full
    gradient (ZeRO-3: a collective) and rank 0 writes them, with DeepSpeed's gradient buffers,
    to that directory. ``LEVERS_HOOK``: ``drop_tile`` (the tiled MLP's backward skips its first
    tile) or ``perturb_host`` (each offloaded block input is scaled by 1 + 1e-4 on the host).
    """
    hook = os.environ.get("LEVERS_HOOK", "")
    if hook == "drop_tile":
        real_bwd = tiled._TiledMLP.backward

        def bad_backward(ctx: Any, g: torch.Tensor) -> Any:
            ctx.tiles = ctx.tiles[1:]
            return real_bwd(ctx, g)

        tiled._TiledMLP.backward = staticmethod(bad_backward)
    if hook == "perturb_host":
        real_offload = offload_mod.ActivationOffload._offload

        def bad_offload(self: Any, t: torch.Tensor) -> Any:
            stash = real_offload(self, t)
            stash.host.mul_(1 + 1e-4)
            return stash

        offload_mod.ActivationOffload._offload = bad_offload
    out = os.environ.get("LEVERS_OUT")
    if not out:
        return
    real_step = trainer.train_step
    done = {"first": False}

    def step(engine: Any, *args: Any, **kwargs: Any) -> Any:
        if not done["first"]:
            done["first"] = True
            real = engine.step

            def dump_then_step(*a: Any, **k: Any) -> Any:
                _dump(engine, Path(out))
                engine.step = real
                return real(*a, **k)

            engine.step = dump_then_step
        return real_step(engine, *args, **kwargs)

    trainer.train_step = step


def _dump(engine: Any, out: Path) -> None:
    from deepspeed.utils import safe_get_full_grad

    grads = {n: safe_get_full_grad(p).detach().cpu().numpy().copy()
             for n, p in engine.module.named_parameters()}  # fmt: skip
    if dist.get_rank() != 0:
        return
    np.savez(out / "grads.npz", **grads)
    (out / "buffers.json").write_text(json.dumps(_count_buffers(engine.optimizer)))


def _nbytes(t: Any) -> int:
    return int(t.untyped_storage().nbytes()) if t is not None else 0


def _count_buffers(opt: Any) -> dict[str, Any]:
    """DeepSpeed ZeRO-3's gradient and optimizer buffers in the live engine, in bytes."""
    fp32 = opt.fp32_partitioned_groups_flat
    fp16 = opt.fp16_partitioned_groups_flat
    grad_storages = {g.grad.untyped_storage().data_ptr(): _nbytes(g.grad)
                     for g in fp32 if g.grad is not None}  # fmt: skip
    return {
        "offload_optimizer": bool(opt.offload_optimizer),
        "grad_partitions_flat_buffer": _nbytes(opt.grad_partitions_flat_buffer),
        "fp32_partitioned_groups_flat[i].grad": sum(grad_storages.values()),
        # The fp32 master partition is a separate tensor unless it is the parameter partition.
        "fp32_partitioned_groups_flat": sum(
            a.numel() * a.element_size()
            for a, b in zip(fp32, fp16)
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        ),
        "ipg bucket": sum(_nbytes(b.buffer) for b in opt.ipg_buckets.values()),
        "param_grads_alive": sum(_nbytes(p.grad) for g in opt.fp16_groups for p in g),
    }


# ---- the test side -----------------------------------------------------------------------------


def _docs(n: int = 300) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta import return value index count total list data".split()
    docs = []
    for i in range(n):
        k = int(rng.integers(20, 120))
        body = " ".join(words[(j * 3 + i) % len(words)] for j in range(k))
        docs.append({"id": f"doc{i}", "text": f"def f{i}(x):\n    {body}\n"})
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("levers_data")
    docs = _docs()
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_tokenizer([(d["id"], d["text"]) for d in docs], root / "tok", vocab_size=320,
                    progress=False)  # fmt: skip
    prepare(CorpusSpec(str(src)), root / "tok", root / "data", workers=1, val_fraction=0.1,
            progress=False)  # fmt: skip
    return root / "data"


def _job_yaml(path: Path, data: Path, run_dir: Path) -> Path:
    path.write_text(
        "model: {flavor: debug, attention: sdpa, overrides: {dim: 64, n_layers: 2, n_heads: 4,"
        " n_kv_heads: 2, ffn_dim: 128}}\n"
        f"data: {{dir: {data}, seq_len: {SEQ}, val_batches: 1}}\n"
        f"train: {{steps: {STEPS}, lr: 3.0e-3, warmup: 1, loss_chunk_size: 64}}\n"
        "parallel: {sp: 2, zero_stage: 3, activation_checkpointing: full, timeout_s: 120}\n"
        "checkpoint: {interval: 0, resume: never}\n"
        "log: {interval: 1, eval_interval: 0, tensorboard: false, progress: false}\n"
        f"run_dir: {run_dir}\n"
    )
    return path


def _run(name: str, data: Path, root: Path) -> dict[str, Any]:
    """``longtrain pretrain`` (hooked) under torchrun on 2 ranks; its rows, gradients, buffers."""
    settings = dict(RUNS[name])
    hook = settings.pop("HOOK", "")
    work = root / name
    work.mkdir()
    cfg = _job_yaml(work / "job.yaml", data, work / "run")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "LEVERS_OUT": str(work), "LEVERS_HOOK": hook}  # fmt: skip
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(HERE), "pretrain",
           "--config", str(cfg), *(f"{k}={v}" for k, v in settings.items())]  # fmt: skip
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    if rc != 0:
        pytest.fail(f"{name}: pretrain exited {rc}:\n{(work / 'log.txt').read_text()[-4000:]}")
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    with np.load(work / "grads.npz") as z:
        grads = {k: z[k] for k in z.files}
    buffers = json.loads((work / "buffers.json").read_text())
    return {"rows": [r for r in rows if "loss" in r], "grads": grads, "buffers": buffers,
            "cfg": cfg}  # fmt: skip


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("levers")
    return {name: _run(name, data_dir, root) for name in RUNS}


def assert_same_training(got: dict[str, Any], ref: dict[str, Any], rtol: float) -> None:
    """Per-step losses and the gradients after step 1 within ``rtol`` (relative)."""
    a = [r["loss"] for r in got["rows"]]
    b = [r["loss"] for r in ref["rows"]]
    assert len(a) == len(b) == STEPS, (a, b)
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: loss {x!r} vs {y!r}"
    assert got["grads"].keys() == ref["grads"].keys()
    for k, g0 in ref["grads"].items():
        err = float(np.linalg.norm(got["grads"][k] - g0) / max(np.linalg.norm(g0), 1e-30))
        assert err <= rtol, f"gradient of {k} after step 1: relative difference {err:.3g}"


@pytest.mark.slow
def test_tiled_mlp_trains_as_the_whole_mlp(runs: dict[str, dict[str, Any]]) -> None:
    assert_same_training(runs["tiled"], runs["ref"], rtol=1e-5)


@pytest.mark.slow
def test_activation_offload_trains_as_without(runs: dict[str, dict[str, Any]]) -> None:
    assert_same_training(runs["offload"], runs["ref"], rtol=1e-6)


@pytest.mark.slow
def test_negative_controls_fail_the_same_comparisons(runs: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(AssertionError, match="loss|gradient"):
        assert_same_training(runs["tiled_bug"], runs["ref"], rtol=1e-5)
    with pytest.raises(AssertionError, match="loss|gradient"):
        assert_same_training(runs["offload_bug"], runs["ref"], rtol=1e-6)


@pytest.mark.slow
def test_metrics_report_the_planners_host_bytes(runs: dict[str, dict[str, Any]]) -> None:
    job = load_job(runs["offload"]["cfg"], ["parallel.offload_activations=true"])
    planned = memory(PlanInput.from_job(job, device="cpu"), 2, CPU).host_activations
    need = host_bytes_needed(2, 64, SEQ // 2, 1, torch.float32, "full")
    assert planned == need == 2 * 98 * 64 * 4
    rows = runs["offload"]["rows"]
    assert len(rows) == STEPS and all(r["offload_host_gb"] == need / 1e9 for r in rows), rows
    assert all("offload_host_gb" not in r for r in runs["ref"]["rows"])


@pytest.mark.slow
def test_deepspeed_gradient_buffers_are_the_planners(runs: dict[str, dict[str, Any]]) -> None:
    alloc = dataclasses.replace(CPU, counts_untouched=True)  # sizes as allocated
    for name, offload in (("ref", False), ("offload_opt", True)):
        counted = runs[name]["buffers"]
        assert counted["offload_optimizer"] is offload
        job = load_job(runs[name]["cfg"], [f"parallel.offload_optimizer={str(offload).lower()}"])
        planned = {b.name: b for b in zero_buffers(PlanInput.from_job(job, device="cpu"), 2, alloc)}
        for key in ("grad_partitions_flat_buffer", "fp32_partitioned_groups_flat[i].grad",
                    "ipg bucket"):  # fmt: skip
            # ZeRO-3 pads each parameter to a multiple of the world size: a few elements.
            want = planned[key].bytes if key in planned else 0.0
            assert counted[key] == pytest.approx(want, rel=1e-3), (name, key)
        # Where they live follows DeepSpeed's own offload flag.
        assert planned["grad_partitions_flat_buffer"].where == ("host" if offload else "device")
        master = planned["fp32_partitioned_groups_flat"]
        assert counted["fp32_partitioned_groups_flat"] == pytest.approx(master.bytes, rel=1e-3)
        # After the backward no parameter holds a gradient of its own: all went to the buckets.
        assert counted["param_grads_alive"] == 0
    # Offload keeps a second fp32 gradient (the host step's) as large as the partition; without
    # it the step builds one sub-group's at a time and drops it (none is alive here).
    assert runs["offload_opt"]["buffers"]["fp32_partitioned_groups_flat[i].grad"] == pytest.approx(
        runs["ref"]["buffers"]["grad_partitions_flat_buffer"], rel=1e-3
    )
    assert runs["ref"]["buffers"]["fp32_partitioned_groups_flat[i].grad"] == 0


def test_offloaded_block_inputs_leave_the_device() -> None:
    """What the planner's offload term assumes: after the forward, an offloaded block input
    exists only on the host. Here the "device" is the CPU, so the test asks whether the
    block inputs the forward made are still referenced (they are, without offload)."""
    cfg = get_flavor("debug", n_layers=3, max_seq_len=64)
    alive = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg, attention="sdpa")
        apply_activation_checkpointing(model, "full")
        apply_activation_offload(model, ActivationOffload("cpu") if offload else None, "full")
        refs: list[weakref.ref] = []
        for block in model.layers[1:]:  # block 0's input is the embedding output
            block.register_forward_pre_hook(
                lambda _m, args, refs=refs: refs.append(weakref.ref(args[0]))
            )
        ids = torch.randint(0, cfg.vocab_size, (1, 65))
        s, n = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=32)
        gc.collect()
        alive[offload] = sum(r() is not None for r in refs)
        (s / n).backward()
    assert alive[False] == 2  # negative control: checkpointing keeps them on the device
    assert alive[True] == 0, f"{alive[True]} offloaded block inputs still on the device"


if __name__ == "__main__":
    _install_hooks()
    sys.exit(cli_main(sys.argv[1:]))
