"""End to end through ``longtrain pretrain`` (2 ranks, gloo, CPU fp32, ZeRO-2):

* an uninterrupted 8-step run (the reference) and, at the same time, a long run started by
  launch/slurm/pretrain.sbatch (srun and scontrol replaced by shims; srun + torchrun + 2 ranks
  are real) that gets SIGTERM after step 2, as SLURM's ``--signal=B:TERM`` sends it: the ranks
  must save and exit 0 within the deadline, and the script must requeue the job;
* the requeued job (the same script again) resumes by itself: losses bitwise equal to the
  reference, and the final checkpoint equal to the reference's (weights, optimizer, step,
  loader position);
* relaunched on 1 rank (DP 2 -> 1, same tokens per step) it reshards through the universal
  checkpoint: losses within 1e-5 relative of the reference; the same for a run saved with
  SP=2 and resumed with SP=1;
* ``checkpoint.async_save=true`` writes the same checkpoints as the synchronous reference;
* ``longtrain export-hf`` of a training checkpoint, streamed tensor by tensor, writes the same
  files as ``save_hf`` of the consolidated model (sharded, fp32 and bf16).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from longtrain.train.files import find_latest, list_checkpoints

pytestmark = pytest.mark.slow

STEPS = 8
JOB = {
    "model": {
        "flavor": "debug",
        "attention": "sdpa",
        "overrides": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
    },
    "data": {"seq_len": 64},
    "train": {
        "steps": STEPS,
        "micro_batch": 2,
        "grad_accum": 1,
        "lr": 3e-3,
        "warmup": 2,
        # Constant after warm-up: the LR of a step does not depend on train.steps, so the long
        # preempted run and the 8-step reference see the same schedule.
        "schedule": "constant",
    },
    "parallel": {"sp": 1, "zero_stage": 2, "timeout_s": 120},
    "checkpoint": {"interval": 3, "keep": 2, "resume": "auto"},
    "log": {"interval": 1, "eval_interval": 0, "tensorboard": False, "progress": False},
    "seed": 0,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sysconfig

    from longtrain.data.corpus import CorpusSpec, iter_texts
    from longtrain.data.prepare import prepare
    from longtrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("e2e-data")
    corpus = root / "corpus"
    corpus.mkdir()
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted((lib / "json").glob("*.py")) + sorted((lib / "email").glob("*.py")):
        shutil.copy(f, corpus / f"{f.parent.name}_{f.stem}.txt")
    spec = CorpusSpec(str(corpus / "*.txt"))
    train_tokenizer(iter_texts(spec), root / "tok", vocab_size=400, progress=False)
    # No validation split: these runs never evaluate (log.eval_interval 0).
    prepare(spec, root / "tok", root / "data", workers=1, val_fraction=0.0, progress=False)
    return root / "data"


def _start(n: int, run_dir: Path, data: Path, *overrides: str) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(JOB, data=dict(JOB["data"], dir=str(data)))))
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n))
        env.update(LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "longtrain.launch", "pretrain", "--config", str(cfg)]
        cmd += [f"run_dir={run_dir}", *overrides]
        log = open(run_dir.parent / f"{run_dir.name}.rank{r}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], run_dir: Path, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _logs(run_dir: Path, n: int) -> str:
    return "\n".join(
        (run_dir.parent / f"{run_dir.name}.rank{r}.log").read_text()[-2500:] for r in range(n)
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


SBATCH = Path(__file__).resolve().parent.parent / "launch" / "slurm" / "pretrain.sbatch"
SHIMS = {
    # srun: drop its own options and run the task (one node, one task).
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; exit 0; fi\n'
    'echo "$@" >> "$SCONTROL_LOG"\n',
}
# torchrun does not report the ranks' exit codes after it forwards a signal; the ranks record
# theirs (`python -m longtrain.launch` ends in sys.exit(main())). An exception leaves no file.
SITECUSTOMIZE = """
import os, sys
if "RANK" in os.environ and "EXIT_LOG_DIR" in os.environ:
    _exit = sys.exit
    def _record(code=0):
        path = os.path.join(os.environ["EXIT_LOG_DIR"], "rank" + os.environ["RANK"])
        with open(path, "w") as f:
            f.write(str(code))
        _exit(code)
    sys.exit = _record
"""


def _sbatch(root: Path, run_dir: Path, data: Path, *overrides: str) -> subprocess.Popen:
    """Run the sbatch template as SLURM would on one node with 2 ranks."""
    bin_dir = root / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        for name, text in SHIMS.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        (bin_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(JOB, data=dict(JOB["data"], dir=str(data)))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    env.update(SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2")
    env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.update(SCONTROL_LOG=str(root / "scontrol.log"))
    exits = run_dir.parent / f"{run_dir.name}.exits"
    exits.mkdir()
    env.update(EXIT_LOG_DIR=str(exits), PYTHONPATH=f"{bin_dir}:{env.get('PYTHONPATH', '')}")
    log = open(run_dir.parent / f"{run_dir.name}.rank0.log", "w")
    cmd = ["bash", str(SBATCH), str(cfg), f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def e2e(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    ref, pre = root / "ref", root / "pre"
    ref_procs = _start(2, ref, data_dir)
    # The reference job again with asynchronous saves: the same checkpoints are expected.
    asy = root / "async"
    async_procs = _start(2, asy, data_dir, "checkpoint.async_save=true")
    # SP=2 x DP=1 with 2 accumulation steps: the same 4 windows per step as DP=2.
    sp = root / "sp"
    sp_procs = _start(2, sp, data_dir, "parallel.sp=2", "train.grad_accum=2", "train.steps=3")
    job = _sbatch(root, pre, data_dir, "train.steps=100000")
    # SIGTERM to the batch script once step 2 is logged, as SLURM sends it before the limit.
    deadline = time.monotonic() + 180
    while not (pre / "metrics.jsonl").is_file() or max(_losses(pre), default=0) < 2:
        assert time.monotonic() < deadline and job.poll() is None, _logs(pre, 1)
        time.sleep(0.05)
    t_signal = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _wait([job], pre)
    exit_s = time.monotonic() - t_signal
    assert _wait(ref_procs, ref) == [0, 0], _logs(ref, 2)
    assert _wait(async_procs, asy) == [0, 0], _logs(asy, 2)
    assert _wait(sp_procs, sp) == [0, 0], _logs(sp, 2)
    stopped = find_latest(pre)
    requeued = (root / "scontrol.log").read_text() if (root / "scontrol.log").is_file() else ""
    # Both continuations start from copies of the preempted run.
    exact, resharded = root / "exact", root / "resharded"
    shutil.copytree(pre, exact)
    shutil.copytree(pre, resharded)
    exact_job = _sbatch(root, exact, data_dir)  # the requeued job: the same script again
    reshard_procs = _start(1, resharded, data_dir, "train.grad_accum=2")
    sp_resumed = root / "sp_resumed"
    shutil.copytree(sp, sp_resumed)
    sp_procs = _start(1, sp_resumed, data_dir, "train.grad_accum=2")
    assert _wait([exact_job], exact) == [0], _logs(exact, 1)
    assert _wait(reshard_procs, resharded) == [0], _logs(resharded, 1)
    assert _wait(sp_procs, sp_resumed) == [0], _logs(sp_resumed, 1)
    return {
        "ref": ref,
        "async": asy,
        "pre": pre,
        "exact": exact,
        "resharded": resharded,
        "stopped": stopped,
        "exit_s": exit_s,
        "pre_log": _logs(pre, 1),
        "requeued": requeued,
        "sp": sp,
        "sp_resumed": sp_resumed,
        "rank_exits": {f.name: f.read_text() for f in (root / "pre.exits").iterdir()},
    }


def test_sigterm_saves_exits_0_in_time_and_requeues(e2e: dict) -> None:
    stopped = e2e["stopped"]
    k = int(stopped.name[5:])
    assert 2 <= k < 1000, k
    log = e2e["pre_log"]
    # The handler's deadline is 300 s; the tiny run must be far inside it.
    assert e2e["exit_s"] < 60, e2e["exit_s"]
    assert "preempted; saved" in log, log
    # Every rank exited 0, by itself (torchrun did not have to SIGKILL anyone).
    assert e2e["rank_exits"] == {"rank0": "0", "rank1": "0"}, log
    assert "forcefully exiting" not in log, log
    assert e2e["requeued"].split() == ["requeue", "4242"]
    assert [c for _, _, c in list_checkpoints(e2e["pre"])][-1] is True
    # The last logged step is the saved one: no step was trained after the agreement.
    assert max(_losses(e2e["pre"])) == k


def test_relaunch_resumes_bitwise_and_ends_in_the_same_state(e2e: dict) -> None:
    from test_checkpoint import _same_checkpoint  # the same comparison as the unit tests

    k = int(e2e["stopped"].name[5:])
    ref, exact = _losses(e2e["ref"]), _losses(e2e["exact"])
    assert k < STEPS, f"preempted at step {k}: too late to test a resume"
    assert [exact[s] for s in range(k + 1, STEPS + 1)] == [ref[s] for s in range(k + 1, STEPS + 1)]
    a = e2e["ref"] / "checkpoints" / f"step_{STEPS:08d}"
    b = e2e["exact"] / "checkpoints" / f"step_{STEPS:08d}"
    diffs = [d for d in _same_checkpoint(a, b) if not d.startswith("rng_state")]
    # The resolved job config names each run's own run_dir; nothing else may differ.
    assert diffs == ["client_state.json.config.run_dir"], diffs
    sa = json.loads((a / "client_state.json").read_text())
    sb = json.loads((b / "client_state.json").read_text())
    assert sa["parts"]["loader"] == sb["parts"]["loader"]
    assert sa["step"] == STEPS


def test_relaunch_ends_with_the_same_rng_state(e2e: dict) -> None:
    # python/numpy/torch are seeded at start-up and the checkpoint's RNG is restored after the
    # start-up draws (the MFU matmul probe), right before the first resumed step.
    from test_checkpoint import _same_checkpoint

    a = e2e["ref"] / "checkpoints" / f"step_{STEPS:08d}"
    b = e2e["exact"] / "checkpoints" / f"step_{STEPS:08d}"
    assert [d for d in _same_checkpoint(a, b) if d.startswith("rng_state")] == []


def test_relaunch_on_fewer_ranks_reshards_and_continues(e2e: dict) -> None:
    k = int(e2e["stopped"].name[5:])
    ref, res = _losses(e2e["ref"]), _losses(e2e["resharded"])
    steps = range(k + 1, STEPS + 1)
    rel = [abs(res[s] - ref[s]) / abs(ref[s]) for s in steps]
    assert max(rel) <= 1e-5, rel
    log = (e2e["resharded"].parent / "resharded.rank0.log").read_text()
    assert "has 2 ZeRO partitions, this run 1: loading through a universal checkpoint" in log


def test_relaunch_with_another_sp_degree_reshards_and_continues(e2e: dict) -> None:
    # Saved at step 3 by SP=2 x DP=1 (2 ZeRO partitions), resumed by a single rank (SP=1).
    ref, sp, res = _losses(e2e["ref"]), _losses(e2e["sp"]), _losses(e2e["sp_resumed"])
    rel = [abs(res[s] - ref[s]) / abs(ref[s]) for s in range(4, STEPS + 1)]
    assert max(rel) <= 1e-5, rel
    # And the SP=2 steps themselves matched DP=2 (the trainer's SP equivalence).
    assert max(abs(sp[s] - ref[s]) / abs(ref[s]) for s in (1, 2, 3)) <= 1e-5
    log = (e2e["sp_resumed"].parent / "sp_resumed.rank0.log").read_text()
    assert "has 2 ZeRO partitions, this run 1: loading through a universal checkpoint" in log


# ---------------------------------------------------------------------------------------------
# checkpoint.async_save through `longtrain pretrain`, and export-hf streamed from the shards.


def test_async_save_through_pretrain_equals_sync(e2e: dict) -> None:
    from test_checkpoint import _same_checkpoint

    ref, asy = e2e["ref"], e2e["async"]
    assert _losses(asy) == _losses(ref) and sorted(_losses(ref)) == list(range(1, STEPS + 1))
    assert find_latest(asy) == asy / "checkpoints" / f"step_{STEPS:08d}"
    # Step 6 was written while steps 7-8 trained, step 8 while the run was ending.
    for step in (6, STEPS):
        a = ref / "checkpoints" / f"step_{step:08d}"
        b = asy / "checkpoints" / f"step_{step:08d}"
        # Weights, optimizer, loader, RNG of both ranks: equal; the config says how it saved.
        assert sorted(_same_checkpoint(a, b)) == [
            "client_state.json.config.checkpoint.async_save",
            "client_state.json.config.run_dir",
        ]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_hf_streams_the_files_save_hf_writes(
    e2e: dict, data_dir: Path, tmp_path: Path, dtype: str
) -> None:
    # Reference: the whole consolidated model through the model room's save_hf.
    from safetensors.torch import load_file

    from longtrain.launch.cli import main as cli_main
    from longtrain.model.config import ModelConfig
    from longtrain.model.transformer import Transformer
    from longtrain.train.artifacts import open_artifact
    from longtrain.train.export import save_hf
    from longtrain.train.reshard import consolidate_state_dict

    ckpt = find_latest(e2e["ref"])  # ZeRO-2 shards of 2 ranks
    cfg = ModelConfig.from_dict(json.loads((ckpt / "model_config.json").read_text()))
    model = Transformer(cfg, attention="sdpa")
    model.load_state_dict(consolidate_state_dict(ckpt))
    ref, out = tmp_path / "ref", tmp_path / "out"
    shard = "20KB"  # the 400 x 32 embedding alone is 51 KB: several shards and an index
    record = open_artifact(ckpt).record()  # the run's figures: the model card is the same
    save_hf(model, ref, data_dir / "tokenizer", dtype, shard, record=record)
    args = ["export-hf", "--checkpoint", str(e2e["ref"]), "--out", str(out)]
    assert cli_main([*args, "--dtype", dtype, "--max-shard-size", shard]) == 0
    files = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    for f in files:
        if f.endswith(".safetensors"):
            a, b = load_file(ref / f), load_file(out / f)
            assert sorted(a) == sorted(b), f
            assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), f
        else:  # config, generation config, index, tokenizer: byte for byte
            assert (ref / f).read_bytes() == (out / f).read_bytes(), f
