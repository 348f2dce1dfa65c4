"""Distributed eval: SP=2 equals SP=1, the in-training long eval and validation loss, the optimizer.

Multi-process parts run the real commands under torchrun (2 CPU processes, gloo, fp32, free
ports, collective and subprocess timeouts) and compare with the single-process result; each
comparison is also shown to refuse a run with a known bug (a hooked entry point).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longtrain.launch.cli import main as cli_main
from longtrain.train.parallel import free_port

RTOL = 1e-5
SEQ = 320  # >= the shortest passkey prompt with the 320-token test tokenizer (287 tokens)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer, prepared data and a debug-sized model directory."""
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    root = tmp_path_factory.mktemp("evalsp")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow pass key remember here we go and back".split()
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(15)) for _ in range(rng.randint(10, 40))]
        lines.append(f"the pass key is {rng.randint(0, 99999)}.")
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    tok, data = root / "tok", root / "data"
    assert cli_main(["tokenizer", "--corpus", str(corpus / "*.txt"), "--vocab-size", "320",
                     "--out", str(tok)]) == 0  # fmt: skip
    assert cli_main(["prepare", "--corpus", str(corpus / "*.txt"), "--tokenizer", str(tok),
                     "--out", str(data), "--workers", "1", "--val-fraction", "0.3"]) == 0  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(get_flavor("debug", vocab_size=320, max_seq_len=512), attention="sdpa")
    save_model_dir(model, root / "ckpt")
    return {"tok": tok, "data": data, "ckpt": root / "ckpt", "root": root}


def _torchrun(args: list[str], log: Path, timeout: int = 240, script: Path | None = None) -> str:
    """``torchrun --nproc_per_node 2 -m longtrain.launch ARGS`` (or ``SCRIPT ARGS``); fails the
    test with the log."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    entry = [str(script)] if script else ["-m", "longtrain.launch"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *entry, *args]  # fmt: skip
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = -9
    text = log.read_text()
    if rc != 0:
        pytest.fail(f"torchrun {' '.join(args[:3])} failed (rc={rc}):\n{text[-5000:]}")
    return text


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


def _check_ppl(one: dict, two: dict) -> None:
    """The SP=2 loss-by-position result against one process's (AssertionError if not equal)."""
    assert (one["sp"], two["sp"]) == (1, 2) and one["windows"] == two["windows"] == 3
    assert [b["tokens"] for b in two["buckets"]] == [b["tokens"] for b in one["buckets"]]
    assert sum(b["tokens"] for b in one["buckets"]) == one["tokens"] > 500
    for b1, b2 in zip(one["buckets"], two["buckets"]):
        assert _close(b2["loss"], b1["loss"]), (b1, b2)
    assert _close(two["loss"], one["loss"])


# `longtrain` with the classic SP bug, for the negative control below: every SP rank but the
# first numbers the tokens of its first (partial) document from 0 at its shard start.
SHARD_POSITIONS_HOOK = """
import sys

import longtrain.data.loader as loader
from longtrain.launch.cli import main

to_batch = loader.to_batch


def restarting_positions(packed, sample_ids, sp_rank, sp_size, *args, **kwargs):
    batch = to_batch(packed, sample_ids, sp_rank, sp_size, *args, **kwargs)
    if sp_rank > 0:
        pos = batch["position_ids"].clone()
        for row in pos:
            starts = (row == 0).nonzero()
            end = int(starts[0]) if len(starts) else len(row)
            row[:end] -= int(row[0])
        batch["position_ids"] = pos
    return batch


loader.to_batch = restarting_positions
sys.exit(main(sys.argv[1:]))
"""


def test_sp2_eval_equals_sp1(setup: dict[str, Path]) -> None:
    """The same per-bucket losses and passkey scores from 2 Ulysses ranks as from one process;
    negative control: the same comparison refuses shards that restart their positions."""
    root, ckpt = setup["root"], str(setup["ckpt"])
    ppl = ["eval", "--checkpoint", ckpt, "--task", "ppl", "--data", str(setup["data"]),
           "--seq-len", "256", "--bucket", "64", "--samples", "3"]  # fmt: skip
    # 301 is odd: the SP path pads the prompt to a multiple of 2 with a separate document.
    pk = ["eval", "--checkpoint", ckpt, "--task", "passkey", "--tokenizer", str(setup["tok"]),
          "--lengths", "301,512", "--depths", "0,0.5,1", "--samples", "2"]  # fmt: skip
    for args in (ppl, pk):
        assert cli_main([*args, "--out", str(root / "sp1")]) == 0
        log = _torchrun([*args, "--out", str(root / "sp2"), "--sp", "2", "--timeout", "120"],
                        root / f"{args[4]}.log")  # fmt: skip
        assert "on 2 ranks (DP 1 x SP 2)" in log

    one = json.loads((root / "sp1" / "ppl_by_position.json").read_text())
    two = json.loads((root / "sp2" / "ppl_by_position.json").read_text())
    _check_ppl(one, two)
    hook = root / "shard_positions_hook.py"
    hook.write_text(SHARD_POSITIONS_HOOK)
    _torchrun([*ppl, "--out", str(root / "sp2_bug"), "--sp", "2", "--timeout", "120"],
              root / "ppl_bug.log", script=hook)  # fmt: skip
    bad = json.loads((root / "sp2_bug" / "ppl_by_position.json").read_text())
    with pytest.raises(AssertionError):
        _check_ppl(one, bad)

    one = json.loads((root / "sp1" / "passkey.json").read_text())
    two = json.loads((root / "sp2" / "passkey.json").read_text())
    assert two["accuracy"] == one["accuracy"] and two["token_accuracy"] == one["token_accuracy"]
    # The key's NLL moves with every logit: a shard scored with wrong positions shifts it ~1e-4.
    flat1 = [x for row in one["key_nll"] for x in row]
    flat2 = [x for row in two["key_nll"] for x in row]
    assert len(flat1) == 6 and all(_close(b, a) for a, b in zip(flat1, flat2)), (flat1, flat2)
    assert sorted(p.name for p in (root / "sp2").iterdir()) == [
        "passkey.json", "passkey.png", "ppl_by_position.json", "ppl_by_position.png",
    ]  # fmt: skip


def test_sp_without_launcher_is_one_line(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(["eval", "--checkpoint", str(setup["ckpt"]), "--task", "ppl", "--sp", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--sp 2" in err[0] and "torchrun" in err[0], err
    rc = cli_main(["eval", "--checkpoint", str(setup["ckpt"]), "--task", "ppl", "--sp", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--sp 0: must be >= 1" in err[0], err


def test_long_eval_in_training_loop(setup: dict[str, Path]) -> None:
    """SP=2 + ZeRO-3 pretrain with log.long_eval_interval=2 logs long_eval/* rows (jsonl + TB)
    whose last row equals `longtrain eval` of the final checkpoint on one process."""
    root = setup["root"]
    run = root / "run"
    cfg = root / "job.yaml"
    cfg.write_text(
        "model: {flavor: debug, attention: sdpa, overrides: {dim: 64, n_layers: 2, n_heads: 4,"
        " n_kv_heads: 2, ffn_dim: 128}}\n"
        f"data: {{seq_len: {SEQ}, val_batches: 2}}\n"
        "train: {steps: 4, lr: 3.0e-3, warmup: 1}\n"
        "parallel: {sp: 2, zero_stage: 3, dtype: fp32, timeout_s: 120}\n"
        "checkpoint: {interval: 0}\n"
        "log: {interval: 1, eval_interval: 0, progress: false, long_eval_interval: 2,"
        " long_eval_bucket: 64, long_eval_passkey: [300]}\n"
    )
    _torchrun(["pretrain", "--config", str(cfg), f"data.dir={setup['data']}", f"run_dir={run}"],
              root / "pretrain.log")  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    long_rows = [r for r in rows if "long_eval/loss" in r]
    assert [r["step"] for r in long_rows] == [2, 4]
    labels = ["0-64", "64-128", "128-192", "192-256", "256-320"]
    for r in long_rows:
        assert sorted(r) == sorted(
            ["step", "long_eval/loss", "long_eval/passkey_300"]
            + [f"long_eval/loss_{b}" for b in labels]
        )
        assert 0.0 <= r["long_eval/passkey_300"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("long_eval/loss_0-64")] == [2, 4]
    assert "long_eval/passkey_300" in ea.Tags()["scalars"]

    out = root / "ev_run"
    assert cli_main(["eval", "--checkpoint", str(run), "--task", "ppl", "--bucket", "64",
                     "--seq-len", str(SEQ), "--samples", "2", "--out", str(out)]) == 0  # fmt: skip
    ref = json.loads((out / "ppl_by_position.json").read_text())
    last = long_rows[-1]
    for b, label in zip(ref["buckets"], labels):
        assert _close(last[f"long_eval/loss_{label}"], b["loss"]), (label, last, b)
    assert _close(last["long_eval/loss"], ref["loss"])


# `longtrain` with one addition, for the negative control of the test below: every validation
# row also carries the value a validator without its all-reduce would report (this rank's own
# windows and sequence shard only).
VALIDATION_HOOK = """
import sys

import longtrain.train.eval.validator as validator
import longtrain.train.tasks as tasks
from longtrain.launch.cli import main


def with_control(engine, job, topo, device):
    row = validator.validation_loss(engine, job, topo, device)
    reduce = validator.all_reduce_sum
    validator.all_reduce_sum = lambda values, device, group=None: [float(v) for v in values]
    try:
        row["val_loss_unreduced"] = validator.validation_loss(engine, job, topo, device)["val_loss"]
    finally:
        validator.all_reduce_sum = reduce
    return row


tasks.validation_loss = with_control
sys.exit(main(sys.argv[1:]))
"""


def test_validation_loss_under_sp2_and_dp2_equals_one_process(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """``val_loss`` of ``longtrain pretrain`` on 2 ranks, as SP=2 and as DP=2, equals the
    single-process value within 1e-6 before training and within 1e-5 after a step. Negative
    control: what a validator without its all-reduce reports misses by orders of magnitude."""
    hook = tmp_path / "hooked_validation.py"
    hook.write_text(VALIDATION_HOOK)
    cfg = tmp_path / "val.yaml"
    cfg.write_text(
        "model: {flavor: debug, attention: sdpa, overrides: {dim: 64, n_layers: 2, n_heads: 4,"
        " n_kv_heads: 2, ffn_dim: 128, init_std: 0.2}}\n"  # windows' losses differ widely
        "data: {seq_len: 64, val_batches: 0}\n"  # every validation window, whatever the DP size
        "train: {steps: 1, micro_batch: 2, lr: 3.0e-3, warmup: 1}\n"
        "parallel: {dtype: fp32, timeout_s: 120}\n"
        "checkpoint: {interval: 0}\n"
        "log: {interval: 1, eval_interval: 1, progress: false, tensorboard: false}\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    # The same 2 windows per step in all three runs (DP=2 takes one each).
    runs = {"one": [], "sp2": ["parallel.sp=2"], "dp2": ["train.micro_batch=1"]}
    procs = {}
    for name, extra in runs.items():
        args = ["pretrain", "--config", str(cfg), f"data.dir={setup['data']}",
                f"run_dir={tmp_path / name}", *extra]  # fmt: skip
        cmd = [sys.executable, "-m", "longtrain.launch", *args]  # the reference: one process
        if name != "one":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(hook), *args]  # fmt: skip
        with open(tmp_path / f"{name}.log", "w") as log:  # the three runs at the same time
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        for name, p in procs.items():
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"{name}: rc={rc}\n{(tmp_path / f'{name}.log').read_text()[-5000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    rows = {}
    for name in runs:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = {r["step"]: r for r in map(json.loads, lines) if "val_loss" in r}
    ref = rows["one"]
    assert sorted(ref) == [0, 1] and sorted(rows["sp2"]) == sorted(rows["dp2"]) == [0, 1]
    for name in ("sp2", "dp2"):
        for step, rtol in ((0, 1e-6), (1, 1e-5)):
            got, want = rows[name][step]["val_loss"], ref[step]["val_loss"]
            assert abs(got - want) <= rtol * want, (name, step, got, want)
        bad, want = rows[name][0]["val_loss_unreduced"], ref[0]["val_loss"]
        miss = abs(bad - want) / (1e-6 * want)
        print(f"{name}: val_loss {rows[name][0]['val_loss']!r}, one process {want!r}, "
              f"without the all-reduce {bad!r} ({miss:.0f}x the tolerance)")  # fmt: skip
        assert miss >= 100, (name, bad, want)


@pytest.mark.parametrize(
    "offload, prebuilt, cxx, cuda_home, uses_torch",
    [
        (False, {}, "/usr/bin/c++", "/usr/local/cuda", True),  # never JIT the fused Adam
        (False, {"fused_adam": True}, None, None, False),  # prebuilt: DeepSpeed's FusedAdam
        (True, {}, None, "/usr/local/cuda", True),  # offload, no compiler: torch's AdamW
        (True, {}, "/usr/bin/c++", None, True),  # offload, no CUDA toolkit: torch's AdamW
        (True, {}, "/usr/bin/c++", "/usr/local/cuda", True),  # never JIT the CPU Adam either
        (True, {"cpu_adam": True}, None, None, False),
    ],
)
def test_gpu_optimizer_is_never_jit_built(
    monkeypatch: pytest.MonkeyPatch,
    offload: bool,
    prebuilt: dict,
    cxx: str | None,
    cuda_home: str | None,
    uses_torch: bool,
) -> None:
    import deepspeed.git_version_info as gv
    from torch.utils import cpp_extension

    from longtrain.train.config import load_job
    from longtrain.train.engine import deepspeed_config

    monkeypatch.setattr(gv, "installed_ops", prebuilt)
    monkeypatch.setattr(shutil, "which", lambda name: cxx)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    job = load_job(None, ["parallel.zero_stage=2", f"parallel.offload_optimizer={offload}"])
    gpu = deepspeed_config(job, 2, torch.device("cuda"))
    assert gpu["optimizer"]["params"]["torch_adam"] is uses_torch
    assert deepspeed_config(job, 2, torch.device("cpu"))["optimizer"]["params"]["torch_adam"]
