"""One trainer: fine-tuning and pretraining share the loop's logging, NaN, preemption, saving
and evaluation policies, and a pretraining job can be a curriculum of stages.

Each run is a real subprocess (one rank, DeepSpeed on CPU, fp32) on a 0.2M-parameter model;
faults a cluster produces (SIGTERM mid-stage, a stalled save) come from tests/hooked_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_finetune import SHAPE, base_cfg, finetune, load_state, metrics

HOOKED = Path(__file__).resolve().parent / "hooked_cli.py"
TIMEOUT = 300


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hooked(
    cmd: str, cfg: dict, env: dict, overrides: list[str] = ()
) -> subprocess.CompletedProcess:
    """``longtrain CMD --config`` through the fault hooks of tests/hooked_cli.py."""
    path = Path(cfg["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    args = [sys.executable, str(HOOKED), cmd, "--config", str(path), *overrides]
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=full)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r and not r.get("skipped")}


@pytest.fixture(scope="module")
def init_dir(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-only directory to fine-tune from."""
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("init") / "model"
    save_model_dir(Transformer(get_flavor("debug", **SHAPE, vocab_size=512)), out)
    return out


def ft_cfg(work: Path, run: Path, init: Path, **sections) -> dict:
    return base_cfg(run, work / "data", model={"init": str(init), "overrides": {}}, **sections)


# ---- logging ----------------------------------------------------------------------------------


def test_finetune_logged_loss_is_the_window_mean(
    work: Path, init_dir: Path, tmp_path: Path
) -> None:
    every = tmp_path / "every"
    finetune(ft_cfg(work, every, init_dir, log={"interval": 1}))
    pairs = tmp_path / "pairs"
    finetune(ft_cfg(work, pairs, init_dir, log={"interval": 2}))
    one, two = losses(every), losses(pairs)
    assert sorted(one) == list(range(1, 7)) and sorted(two) == [2, 4, 6]
    for s in (2, 4, 6):  # the same steps (same seed), so the row is the mean of its window
        assert two[s] == pytest.approx((one[s - 1] + one[s]) / 2, rel=1e-12, abs=0), s
    # Negative control: the last step's loss alone is not the row (the windows really differ).
    assert any(abs(two[s] - one[s]) > 1e-6 * abs(one[s]) for s in (2, 4, 6))


def test_finetune_prints_no_library_warnings(work: Path, init_dir: Path, tmp_path: Path) -> None:
    p = finetune(ft_cfg(work, tmp_path / "quiet", init_dir, parallel={"zero_stage": 3}))
    out = p.stdout + p.stderr
    warned = [ln for ln in out.splitlines() if re.search(r"\b\w*Warning\b", ln)]
    assert not warned, "\n".join(warned[:10])
    assert "longtrain finetune:" in out  # our own lines are still there


# ---- NaN policy, long eval, async save ----------------------------------------------------------


def test_finetune_skips_a_nan_step_and_goes_on(work: Path, init_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "nan"
    cfg = ft_cfg(work, run, init_dir, train={"max_bad_steps": 2})
    finetune(cfg, env={"LONGTRAIN_INJECT_NAN_STEPS": "3"})  # exits 0: one NaN is not two
    rows = metrics(run)
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert sorted(losses(run)) == [1, 2, 4, 5, 6]
    assert all(np.isfinite(v) for v in losses(run).values())
    assert (run / "final" / "model.safetensors").is_file()
    # Two in a row stop the run, naming the last good checkpoint.
    p = finetune(
        ft_cfg(work, tmp_path / "nan2", init_dir, train={"max_bad_steps": 2}),
        env={"LONGTRAIN_INJECT_NAN_STEPS": "3,4"},
        check=False,
    )
    assert p.returncode == 2 and "NaN/Inf for 2 steps in a row" in p.stderr, p.stderr[-2000:]


def test_finetune_logs_the_long_context_eval(work: Path, init_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "long"
    cfg = ft_cfg(
        work,
        run,
        init_dir,
        log={"long_eval_interval": 3, "long_eval_bucket": 32},
        data={"val_batches": 1},
    )
    finetune(cfg)
    rows = [r for r in metrics(run) if "long_eval/loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(
        np.isfinite(r["long_eval/loss_0-32"]) and np.isfinite(r["long_eval/loss_32-64"])
        for r in rows
    )


def test_finetune_async_save_is_async_and_equals_sync(
    work: Path, init_dir: Path, tmp_path: Path
) -> None:
    runs = {}
    for mode in (False, True):
        run = tmp_path / f"async_{mode}"
        record = tmp_path / f"saves_{mode}.jsonl"
        cfg = ft_cfg(work, run, init_dir, checkpoint={"interval": 2, "keep": 2, "async_save": mode})
        p = hooked("finetune", cfg, {"HOOK_RECORD_SAVES": str(record)})
        assert p.returncode == 0, p.stderr[-3000:]
        flags = [json.loads(x)["async_save"] for x in record.read_text().splitlines()]
        assert flags and all(f is mode for f in flags), flags
        runs[mode] = run
    assert losses(runs[True]) == losses(runs[False])
    a, b = load_state(runs[True] / "final"), load_state(runs[False] / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- preemption -----------------------------------------------------------------------------


def test_finetune_honours_the_preemption_deadline(
    work: Path, init_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "deadline"
    cfg = ft_cfg(
        work, run, init_dir, checkpoint={"interval": 2, "keep": 2, "preempt_deadline_s": 1.0}
    )
    t0 = time.monotonic()
    # SIGTERM during step 3; the save that follows stalls for 60 s (a hung filesystem).
    p = hooked("finetune", cfg, {"HOOK_SIGTERM_AT_CALL": "3", "HOOK_SLOW_SAVE_S": "60"})
    took = time.monotonic() - t0
    assert p.returncode == 124, (p.returncode, p.stderr[-2000:])
    assert took < 50, f"the watchdog did not end the process at the deadline ({took:.0f}s)"
    assert "preemption deadline of 1s passed" in p.stderr
    from longtrain.train.files import find_latest

    assert find_latest(run).name == "step_00000002"  # the previous checkpoint is the latest


STAGES = [
    {"name": "short", "steps": 3, "seq_len": 32, "micro_batch": 2},
    {"name": "long", "steps": 4, "seq_len": 64, "micro_batch": 1, "lr": 1e-3,
     "rope_scaling": {"type": "linear", "factor": 2.0}},
]  # fmt: skip


def test_finetune_sigterm_mid_stage_saves_exits_0_and_resumes_bitwise(
    work: Path,
    init_dir: Path,
    tmp_path: Path,
) -> None:
    def cfg(run: Path) -> dict:
        return ft_cfg(
            work, run, init_dir, checkpoint={"interval": 0, "keep": 3}, train={"stages": STAGES}
        )

    full, cut = tmp_path / "full", tmp_path / "cut"
    finetune(cfg(full))
    p = hooked("finetune", cfg(cut), {"HOOK_SIGTERM_AT_CALL": "5"})  # step 5: inside stage 2
    assert p.returncode == 0, p.stderr[-3000:]
    assert "preempted; saved" in p.stdout + p.stderr
    from longtrain.train.files import find_latest

    assert find_latest(cut).name == "step_00000005"  # saved at the step boundary
    assert not (cut / "final").exists()
    finetune(cfg(cut))  # relaunch: continues inside stage 2
    lf, lc = losses(full), losses(cut)
    assert sorted(lf) == sorted(lc) == list(range(1, 8))
    assert all(lc[s] == lf[s] for s in lf), {s: (lf[s], lc[s]) for s in lf}
    a, b = load_state(full / "final"), load_state(cut / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- a pretraining curriculum -------------------------------------------------------------------


def pretrain(cfg: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    path = Path(cfg["run_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "longtrain.launch", "pretrain", "--config", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full)


def test_pretrain_two_stages_resume_exactly_inside_stage2(work: Path, tmp_path: Path) -> None:
    stages = [
        {"steps": 3, "seq_len": 256, "micro_batch": 1},
        {"steps": 3, "seq_len": 512, "micro_batch": 1},
    ]

    def cfg(run: Path) -> dict:
        c = base_cfg(
            run, work / "data", train={"stages": stages}, checkpoint={"interval": 1, "keep": 2}
        )
        c["model"]["overrides"]["max_seq_len"] = 512
        return c

    full, cut = tmp_path / "full", tmp_path / "cut"
    p = pretrain(cfg(full))
    assert p.returncode == 0, p.stderr[-3000:]
    p = pretrain(cfg(cut), env={"LONGTRAIN_CRASH_AFTER_STEP": "4"})  # killed inside stage 2
    assert p.returncode == 17, p.stderr[-3000:]
    p = pretrain(cfg(cut))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr and "at step 4" in p.stdout + p.stderr
    lf, lc = losses(full), losses(cut)
    assert sorted(lf) == sorted(lc) == list(range(1, 7))
    assert all(lc[s] == lf[s] for s in lf), {s: (lf[s], lc[s]) for s in lf}
    rows = [r for r in metrics(full) if "loss" in r]
    assert [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # The second stage trains on windows twice as long: twice the tokens per step.
    t = [r["tokens"] for r in rows]
    assert t[3] - t[2] == 2 * (t[2] - t[1])


# ---- the presets' combinations build --------------------------------------------------------


def test_context_extension_preset_auto_core_with_zero3_builds(
    work: Path,
    init_dir: Path,
    tmp_path: Path,
) -> None:
    preset = Path(__file__).resolve().parents[1] / "launch" / "configs" / "context-extension.yaml"
    job = yaml.safe_load(preset.read_text())
    assert job["model"]["attention"] == "auto" and job["parallel"]["zero_stage"] == 3
    run = tmp_path / "ctx"
    stages = [{"steps": 1, "seq_len": 64, "sp": 1, "lr": 1e-4,
               "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}}]  # fmt: skip
    overrides = [
        f"model.init={init_dir}",
        f"data.dir={work / 'data'}",
        "data.val_batches=1",
        f"finetune.stages={json.dumps(stages)}",
        "parallel.sp=1",
        "parallel.dtype=fp32",
        "log.progress=false",
        "log.tensorboard=false",
        f"run_dir={run}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "longtrain.launch",
        "finetune",
        "--config",
        str(preset),
        *overrides,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ZeRO-3" in p.stdout and "attention core sdpa" in p.stdout
    assert (run / "final" / "model.safetensors").is_file()
