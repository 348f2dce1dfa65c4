"""Ulysses at SP=4 (4 CPU ranks, gloo, fp32) against one device: what SP=2 cannot show.

- K/V head replication order: 2 K/V heads at SP=4 are replicated to 4 before the exchange.
  ``k0 k0 k1 k1`` (repeat_interleave) keeps query heads 0-1 on K/V head 0 and 2-3 on head 1;
  ``k0 k1 k0 k1`` (repeat) is equally shaped and wrong. With one K/V head at SP=2 (the only
  replicated case of tests/test_train_parallel.py) both layouts are the same tensor.
- Dynamic-NTK RoPE through the whole model: the frequencies come from the window's longest
  document (``max_seqlen``), which the rank holding the first quarter cannot see in its
  positions.

Each case trains 6 steps through the trainer's loader, ``build_model``/``parallelize`` and
``train_step`` (DeepSpeed, ZeRO-1 and ZeRO-3) and is compared with a plain single-device
PyTorch loop on the same windows: per-step loss and grad norm within 1e-5 relative, step-1
gradients within 1e-4. Negative controls: the same runs with the known bug injected
(replication by repeat; RoPE without the window length) must miss by orders of magnitude.
The harness (loader, known bugs, comparisons) is tests/test_train_parallel.py's; this file is
also its own worker, started by torchrun as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_parallel import (
    DYNAMIC,
    _equivalent,
    _job,
    _misses,
    make_stream,
    model_overrides,
    place,
    run_ds,
    run_torch_reference,
    skewed_pattern,
    trainer_loader,
    write_data_dir,
)

HERE = Path(__file__).resolve()
pytestmark = pytest.mark.slow

# Every quarter of a 64-token window is one SP rank's shard: 2, 1, ~13 and ~13 targets, and
# the targets at the first two shard boundaries are kept.
PATTERN = skewed_pattern(sparse=(7, 15, 31))
SCENARIOS = {
    "sp4_z1_kv2": dict(sp=4, zero=1, micro=2, accum=1, kv=2),
    "sp4_z1_kv2_tiled": dict(sp=4, zero=1, micro=2, accum=1, kv=2, bug="kv_heads_tiled"),
    "sp4_z3_dyn": dict(sp=4, zero=3, micro=2, accum=1, kv=4, model=DYNAMIC),
    "sp4_z3_dyn_bug": dict(
        sp=4, zero=3, micro=2, accum=1, kv=4, model=DYNAMIC, bug="rope_without_window_length"
    ),
}
# Single-device references: (n_kv_heads, model overrides), on the SP=4 runs' windows.
REFERENCES = {"ref_kv2": (2, {}), "ref_dyn": (4, DYNAMIC)}


def reference(data_dir: str, n_kv: int, model: dict[str, Any]) -> dict[str, Any]:
    from longtrain.model.config import get_flavor

    job = _job(1, 0, 2, 1, data_dir)
    cfg = get_flavor("debug", **model_overrides(n_kv, **model))
    loader, stage = trainer_loader(job, place())
    return run_torch_reference(
        job, cfg, lambda step: [next(loader) for _ in range(stage.grad_accum)]
    )


def worker(out_dir: str, data_dir: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from longtrain.train.parallel import init_distributed
    from longtrain.train.trainer import quiet_libraries

    rank, world, _ = init_distributed(timeout_s=120)
    quiet_libraries(rank)
    topo_cache: dict[int, Any] = {}
    results = {name: run_ds(scn, topo_cache, data_dir) for name, scn in SCENARIOS.items()}
    if rank == 0:
        torch.save(results, Path(out_dir) / "world4.pt")
    # The references need no collective: one rank each, at the same time.
    for i, (name, (n_kv, model)) in enumerate(REFERENCES.items()):
        if i % world == rank:
            torch.save(reference(data_dir, n_kv, model), Path(out_dir) / f"{name}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from longtrain.train.parallel import free_port

    out = tmp_path_factory.mktemp("sp4")
    data = write_data_dir(out / "data", make_stream(pattern=PATTERN))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(HERE), "--worker", str(out), str(data)]  # fmt: skip
    with open(out / "world4.log", "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = -9
    if rc != 0:
        pytest.fail(f"4-rank launch failed (rc={rc}):\n{(out / 'world4.log').read_text()[-6000:]}")
    res = torch.load(out / "world4.pt", weights_only=False)
    for name in REFERENCES:
        res[name] = torch.load(out / f"{name}.pt", weights_only=False)
    return res


def test_sp4_replicated_kv_heads_equal_one_device(results: dict[str, Any]) -> None:
    _equivalent(results["sp4_z1_kv2"], results["ref_kv2"])


def test_sp4_kv_replication_negative_control(results: dict[str, Any]) -> None:
    # The same shapes with the heads in the other order: query heads attend to the wrong keys.
    miss = _misses(results["sp4_z1_kv2_tiled"], results["ref_kv2"])
    assert miss["loss"] >= 100, miss


def test_sp4_dynamic_rope_equals_one_device(results: dict[str, Any]) -> None:
    _equivalent(results["sp4_z3_dyn"], results["ref_dyn"])


def test_sp4_dynamic_rope_negative_control(results: dict[str, Any]) -> None:
    _misses(results["sp4_z3_dyn_bug"], results["ref_dyn"])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3])
