"""JobConfig parsing, the learning-rate schedules, the DeepSpeed config and the metrics writer.

In-process and fast: no process group, no DeepSpeed engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from longtrain.model.errors import LongtrainError
from longtrain.train.config import JobConfig, load_job, save_resolved
from longtrain.train.engine import deepspeed_adam, deepspeed_config, lr_at
from longtrain.train.metrics import MetricsLogger, mfu
from longtrain.train.parallel import Topology, kv_replication


def test_yaml_and_overrides_types(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    # "3e-4" is a string to PyYAML (YAML 1.1); people write learning rates that way.
    f.write_text("train:\n  lr: 3e-4\n  steps: 10\nparallel: {sp: 2}\n")
    job = load_job(
        f,
        ["train.steps=20", "log.wandb=true", "model.overrides.n_layers=3", "run_dir=runs/x"],
    )
    assert job.train.lr == pytest.approx(3e-4) and isinstance(job.train.lr, float)
    assert job.train.steps == 20 and job.parallel.sp == 2 and job.log.wandb is True
    assert job.model.overrides == {"n_layers": 3} and job.run_dir == "runs/x"
    out = save_resolved(job, tmp_path / "run")
    assert load_job(out).to_dict() == job.to_dict()  # the resolved file reloads as the same job


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", "'train.steps' must be an integer"),
        ("log.wandb=maybe", "'log.wandb' must be true or false"),
        ("train.schedule=linear", "train.schedule must be one of cosine, wsd, constant"),
        ("parallel.activation_checkpointing=some", "must be one of none, full, selective"),
        ("parallel.offload_params=true", "parallel.offload_params needs parallel.zero_stage=3"),
        ("parallel.bogus.deep=1", "unknown config key 'parallel.bogus'"),
        ("steps=3", "unknown config key 'steps'"),
        ("train.steps", "expected key.sub=value"),
        ("checkpoint.keep=1", "checkpoint.keep=1: keep at least 2"),
        ("checkpoint.preempt_deadline_s=0", "checkpoint.preempt_deadline_s=0.0: must be > 0"),
        ("checkpoint.async_save=sometimes", "'checkpoint.async_save' must be true or false"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(LongtrainError) as e:
        load_job(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: 3\n   lr: [\n")
    with pytest.raises(LongtrainError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_job(f)


def test_every_field_has_a_docstring() -> None:
    import ast
    import dataclasses
    import inspect

    import longtrain.train.config as mod

    tree = ast.parse(inspect.getsource(mod))
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        cls = getattr(mod, node.name)
        if not dataclasses.is_dataclass(cls):
            continue
        documented = {
            b.target.id
            for i, b in enumerate(body)
            if isinstance(b, ast.AnnAssign)
            and i + 1 < len(body)
            and isinstance(body[i + 1], ast.Expr)
            and isinstance(body[i + 1].value, ast.Constant)
        }
        missing = {f.name for f in dataclasses.fields(cls)} - documented
        assert not missing, f"{node.name}: fields without a docstring: {missing}"


def _job(**train: object) -> JobConfig:
    return load_job(None, [f"train.{k}={v}" for k, v in train.items()])


def test_lr_schedules() -> None:
    job = _job(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, job) == pytest.approx(0.1) and lr_at(9, job) == pytest.approx(1.0)
    assert lr_at(10, job) == pytest.approx(1.0)
    assert lr_at(60, job) == pytest.approx(0.55)  # half-way: mean of peak and floor
    assert lr_at(109, job) == pytest.approx(0.1, abs=1e-3) and lr_at(500, job) == pytest.approx(0.1)
    job = _job(lr=1.0, warmup=0, steps=100, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, job) == 1.0 and lr_at(79, job) == 1.0
    assert lr_at(90, job) == pytest.approx(0.5) and lr_at(100, job) == pytest.approx(0.0)
    job = _job(lr=2.0, warmup=4, schedule="constant")
    assert [lr_at(s, job) for s in (0, 3, 4, 1000)] == [0.5, 2.0, 2.0, 2.0]


def test_deepspeed_config_follows_the_job() -> None:
    topo = Topology(0, 8, 4, 2, 0, 0, None, None, None)
    job = load_job(
        None,
        [
            "train.micro_batch=2",
            "train.grad_accum=3",
            "train.grad_clip=0.7",
            "parallel.sp=4",
            "parallel.zero_stage=3",
            "parallel.offload_optimizer=true",
            "parallel.offload_params=true",
        ],
    )
    cpu = deepspeed_config(job, topo.world_size, torch.device("cpu"))
    assert cpu["train_micro_batch_size_per_gpu"] == 2 and cpu["gradient_accumulation_steps"] == 3
    # DeepSpeed sees all 8 ranks as data parallel (SP is applied by longtrain, see parallel.py).
    assert cpu["train_batch_size"] == 2 * 3 * 8
    assert cpu["gradient_clipping"] == 0.7 and cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "bf16" not in cpu and cpu["optimizer"]["params"]["torch_adam"] is True
    gpu = deepspeed_config(job, topo.world_size, torch.device("cuda"))
    assert gpu["bf16"]["enabled"] is True
    # Offloaded: DeepSpeed's CPU Adam where it can be built (tests/test_eval_sp.py covers the rule).
    assert gpu["optimizer"]["params"]["torch_adam"] is not deepspeed_adam(True)
    # Without offload a GPU run uses torch's AdamW (no JIT-compiled DeepSpeed op needed).
    job.parallel.offload_optimizer = job.parallel.offload_params = False
    gpu = deepspeed_config(job, topo.world_size, torch.device("cuda"))
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    assert "offload_param" not in gpu["zero_optimization"]


def test_kv_replication() -> None:
    assert kv_replication(8, 8) == 1 and kv_replication(8, 4) == 1
    assert kv_replication(8, 16) == 2 and kv_replication(8, 32) == 4
    with pytest.raises(LongtrainError, match="not a multiple of n_kv_heads"):
        kv_replication(3, 4)


def test_metrics_logger_rows_resume_and_plot(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    log.log({"step": 0, "val_loss": 5.0, "val_ppl": math.exp(5.0), "tokens": 0})
    for s in range(1, 5):
        log.log({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": float("nan")})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["grad_norm"] is None  # NaN is written as null: the file stays valid JSON
    assert any((tmp_path / "tb").iterdir())
    # Resuming at step 2 drops the rows a killed job wrote after its last checkpoint.
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=2)
    log.log({"step": 3, "loss": 4.0})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] == 4.0
    png = log.plot()
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    # Ranks other than 0 write nothing.
    other = MetricsLogger(tmp_path / "r1", enabled=False)
    other.log({"step": 1, "loss": 1.0})
    assert other.plot() is None and not (tmp_path / "r1").exists()


def test_mfu() -> None:
    # 1e9 FLOPs/token at 1000 tokens/s on 2 devices of 1e12 peak = 0.5.
    assert mfu(1e9, 1000.0, 2, 1e12) == pytest.approx(0.5)
    assert mfu(1e9, 1000.0, 2, 0.0) == 0.0
