"""The ``longtrain pretrain`` command as users start it (CPU, gloo, fp32, tiny shapes).

- Bad configs fail before any process group with one line naming the key and the fix.
- Two "nodes" on localhost (torchrun --nnodes=2, one process each, c10d rendezvous) train,
  log metrics, and commit a checkpoint; the next job resumes from it; NaN losses K steps in a
  row stop that job with a clear message and the last good checkpoint intact.
- ``longtrain export-hf`` on the run directory gives a transformers model whose logits equal
  the trained weights' (consolidated from the ZeRO shards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain.launch.cli import main as cli_main
from longtrain.train.parallel import free_port

SEQ = 128
MODEL = [
    "model.flavor=debug",
    "model.attention=sdpa",
    "model.overrides.dim=64",
    "model.overrides.n_layers=2",
    "model.overrides.n_heads=4",
    "model.overrides.n_kv_heads=2",
    "model.overrides.ffn_dim=128",
]


def _docs(n: int = 400) -> list[dict]:
    """Synthetic documents with learnable structure (a small grammar over a word list)."""
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
    from longtrain.data.corpus import CorpusSpec
    from longtrain.data.prepare import prepare
    from longtrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    docs = _docs()
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_tokenizer(
        [(d["id"], d["text"]) for d in docs], root / "tok", vocab_size=320, progress=False
    )
    prepare(
        CorpusSpec(str(src)),
        root / "tok",
        root / "data",
        workers=1,
        val_fraction=0.1,
        progress=False,
    )
    return root / "data"


def _config(tmp: Path) -> Path:
    cfg = tmp / "job.yaml"
    cfg.write_text(
        "model: {flavor: debug, attention: sdpa}\n"
        f"data: {{seq_len: {SEQ}, val_batches: 2}}\n"
        "train: {steps: 3, lr: 3.0e-3, warmup: 1}\n"
        "log: {interval: 1, eval_interval: 3, progress: false}\n"
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# Bad configs: in-process (no process group is ever created), one line, exit code 2.


@pytest.mark.parametrize(
    "overrides, world, expect",
    [
        (["parallel.sp=3"], 3, "parallel.sp=3 does not divide the model's n_heads=4"),
        (
            ["parallel.sp=2", f"data.seq_len={SEQ + 1}"],
            2,
            f"data.seq_len={SEQ + 1} is not divisible",
        ),
        (["data.dir=/nonexistent/data"], 1, "data.dir /nonexistent/data: no such directory"),
        (["train.stepz=3"], 1, "unknown config key 'train.stepz'"),
        (["parallel.zero_stage=4"], 1, "parallel.zero_stage must be 0-3"),
        (["parallel.sp=2"], 3, "parallel.sp=2 does not divide the world size 3"),
    ],
)
def test_bad_config_fails_fast_with_one_line(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    overrides: list[str],
    world: int,
    expect: str,
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = ["pretrain", "--config", str(_config(tmp_path)), f"data.dir={data_dir}", *MODEL]
    args += [f"run_dir={tmp_path / 'run'}", *overrides]
    rc = cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("longtrain pretrain: error: "), err
    assert expect in err[0], err[0]
    assert not (tmp_path / "run").exists(), "nothing may be written for a job that cannot run"
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_tokenizer_mismatch_and_unknown_yaml_key(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from longtrain.data.tokenizer import train_tokenizer

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    other = tmp_path / "other_tok"
    train_tokenizer(
        [(d["id"], d["text"].upper()) for d in _docs(60)], other, vocab_size=300, progress=False
    )
    base = ["pretrain", "--config", str(_config(tmp_path)), f"data.dir={data_dir}", *MODEL]
    assert cli_main([*base, f"data.tokenizer={other}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the tokenizer" in err[0] and "data.tokenizer" in err[0]
    # The data's own tokenizer passes this check (the run then fails later for another reason
    # only if something else is wrong, which the unknown key below makes certain).
    bad = tmp_path / "bad.yaml"
    bad.write_text(_config(tmp_path).read_text() + "optim: {lr: 1.0}\n")
    assert cli_main(["pretrain", "--config", str(bad), f"data.dir={data_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'optim'" in err[0], err


# ---------------------------------------------------------------------------------------------
# Two nodes on localhost, resume, NaN stop, export.


def _torchrun_2nodes(args: list[str], env_extra: dict[str, str], log: Path) -> list[int]:
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    procs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=longtrain-test",
            "--max_restarts=0",
            "-m",
            "longtrain.launch",
            "pretrain",
            *args,
        ]
        out = open(log.with_suffix(f".node{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=240))
        except subprocess.TimeoutExpired:
            p.kill()
            rcs.append(-9)
    return rcs


def _logs(log: Path) -> str:
    return "\n".join(log.with_suffix(f".node{n}.log").read_text() for n in range(2))


@pytest.mark.slow
def test_two_node_torchrun_resume_nan_stop_and_export(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [
        "--config",
        str(_config(tmp_path)),
        f"data.dir={data_dir}",
        f"run_dir={run}",
        *MODEL,
        "parallel.zero_stage=2",
        "checkpoint.interval=3",
    ]
    rcs = _torchrun_2nodes(common + ["train.steps=3"], {}, tmp_path / "first")
    assert rcs == [0, 0], _logs(tmp_path / "first")[-5000:]
    ckpt = run / "checkpoints" / "step_00000003"
    assert (ckpt / "COMMIT").is_file() and (ckpt / "model_config.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_gb"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert train_rows[-1]["tokens"] == 3 * SEQ * 2  # 2 DP ranks x 1 window x 3 steps
    assert "val_loss" in rows[0] and "val_loss" in train_rows[-1]
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    assert (run / "loss_curve.png").stat().st_size > 0

    # Resume for more steps; steps 5 and 6 produce NaN losses, max_bad_steps=2 stops the job.
    rcs = _torchrun_2nodes(
        common + ["train.steps=8", "train.max_bad_steps=2"],
        {"LONGTRAIN_INJECT_NAN_STEPS": "5,6"},
        tmp_path / "second",
    )
    logs = _logs(tmp_path / "second")
    assert rcs != [0, 0], logs[-3000:]
    assert "resumed from" in logs and "step_00000003 at step 3" in logs
    errors = [ln for ln in logs.splitlines() if "longtrain pretrain: error:" in ln]
    assert len(errors) == 1, errors  # printed once (rank 0), not once per rank
    assert "NaN/Inf for 2 steps in a row" in errors[0] and "step_00000003" in errors[0]
    from longtrain.train.files import find_latest

    assert find_latest(run) == ckpt  # the last good checkpoint is intact and still the latest
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [5, 6]
    assert [r["step"] for r in rows if "loss" in r and not r.get("skipped")] == [1, 2, 3, 4]

    # Export the run directory and compare transformers' logits with the checkpoint's weights.
    out = tmp_path / "hf"
    assert (
        cli_main(["export-hf", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longtrain.model.config import ModelConfig
    from longtrain.model.transformer import Transformer
    from longtrain.train.reshard import consolidate_state_dict

    cfg = ModelConfig.from_dict(json.loads((ckpt / "model_config.json").read_text()))
    ours = Transformer(cfg, attention="sdpa")
    ours.load_state_dict(consolidate_state_dict(ckpt))
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("def f3(x):\n    alpha beta")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


PRESETS = {"tiny-cpu": 2, "1b-32k": 8, "8b-128k": 32, "8b-1m-offload": 32}


@pytest.mark.parametrize("name, world", sorted(PRESETS.items()))
def test_presets_are_valid_for_their_world_size(name: str, world: int) -> None:
    from longtrain.train.config import load_job, validate_job

    path = Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{name}.yaml"
    job = load_job(path)
    cfg = validate_job(job, world, check_data=False)
    assert cfg.max_seq_len >= job.data.seq_len
    assert job.data.seq_len % job.parallel.sp == 0 and world % job.parallel.sp == 0


def test_deepspeed_launcher_local_rank_is_accepted() -> None:
    from longtrain.launch.cli import build_parser

    # deepspeed puts it before the subcommand, older launchers after it.
    for argv in (
        ["--local_rank=1", "pretrain", "--config", "x.yaml", "train.steps=2"],
        ["pretrain", "--local_rank=1", "--config", "x.yaml"],
    ):
        args = build_parser().parse_args(argv)
        assert args.command == "pretrain" and args.config == "x.yaml"


@pytest.mark.slow
def test_single_process_without_launcher(data_dir: Path, tmp_path: Path) -> None:
    # No torchrun, no RANK/MASTER_ADDR: `longtrain pretrain` makes its own one-rank group.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}  # fmt: skip
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "longtrain.launch", "pretrain", "--config", str(_config(tmp_path))]
    cmd += [f"data.dir={data_dir}", f"run_dir={run}", *MODEL, "train.steps=2"]
    cmd += ["parallel.zero_stage=0", "log.eval_interval=0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000002" / "COMMIT").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["grad_norm"]) for r in rows)
