"""Nothing lost: bad input and faults never destroy data or yield a silently wrong artifact.

Each test is a regression test of one path that lost data or produced a wrong artifact with
exit 0 (see docs/bad-input.md for the whole table). Runs are real subprocesses (one rank,
DeepSpeed on CPU, fp32); faults come from tests/hooked_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_finetune import SHAPE, base_cfg, metrics
from test_trainer import hooked, pretrain

from longtrain.launch.cli import main as cli_main
from longtrain.train.files import find_latest, list_checkpoints, verify_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pt_cfg(work: Path, run: Path, **sections) -> dict:
    c = base_cfg(run, work / "data", **sections)
    c.setdefault("checkpoint", {})
    return c


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()  # only what this command prints
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and "tb" not in p.relative_to(run).parts
    }


@pytest.fixture(scope="module")
def used_run(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step pretraining run (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("used") / "run"
    p = pretrain(pt_cfg(work, run, train={"steps": 4}, checkpoint={"interval": 2, "keep": 3}))
    assert p.returncode == 0, p.stderr[-3000:]
    return run


# ---- 2. resume=never in a used run_dir ------------------------------------------------------


def test_resume_never_into_a_used_run_dir_is_refused_and_changes_nothing(
    work: Path, used_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    before = snapshot(used_run)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(pt_cfg(work, used_run, train={"steps": 2})))
    err = one_line_error(capsys, ["pretrain", "--config", str(cfg), "checkpoint.resume=never"])
    assert f"run_dir {used_run} already holds a run" in err and "new run_dir" in err, err
    assert snapshot(used_run) == before  # no save skipped, nothing pruned, no metrics lost


# ---- 3. resume from an older checkpoint ------------------------------------------------------


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(
    work: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = pt_cfg(work, run, train={"steps": 6}, checkpoint={"interval": 2, "keep": 3})
    assert pretrain(cfg).returncode == 0
    bad = run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit's worth of damage
    bad.write_bytes(bytes(data))
    step4 = run / "checkpoints" / "step_00000004"
    cfg = pt_cfg(
        work,
        run,
        train={"steps": 8},
        checkpoint={"interval": 2, "keep": 2, "resume": str(step4)},
    )
    p = pretrain(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "abandoned future" in p.stdout + p.stderr
    committed = [s for s, _p, c in list_checkpoints(run) if c]
    assert committed == [6, 8], committed  # the new 6 and 8; 4 pruned only after both
    for s in committed:
        verify_checkpoint(run / "checkpoints" / f"step_{s:08d}")
    aside = run / "checkpoints" / "abandoned" / "step_00000006"
    assert aside.is_dir()  # the damaged future is kept, not deleted, not resumed from
    assert (aside / "mp_rank_00_model_states.pt").read_bytes() == bytes(data)
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # the abandoned rows 5-6 were replaced


# ---- 4. export into an existing export ---------------------------------------------------------


def test_export_replaces_an_old_export_whole_and_refuses_foreign_dirs(
    used_run: Path, tmp_path: Path, capsys
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    base = ["export-hf", "--checkpoint", str(used_run), "--out", str(out), "--dtype", "fp32"]
    assert cli_main(base) == 0
    assert (out / "model.safetensors").is_file()
    assert cli_main([*base, "--max-shard-size", "20KB"]) == 0  # now sharded, same --out
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    assert not list(tmp_path.glob(".hf.*"))  # no temporary or backup directory left
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the new shards, nothing stale
    shards = {}
    for f in out.glob("model-*.safetensors"):
        shards.update(load_file(str(f)))
    assert torch.equal(model.lm_head.weight, shards["lm_head.weight"])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    err = one_line_error(
        capsys, ["export-hf", "--checkpoint", str(used_run), "--out", str(foreign)]
    )
    assert "not empty and holds no longtrain export" in err and "--overwrite" in err
    assert (foreign / "todo.txt").read_text() == "mine"
    assert (
        cli_main(["export-hf", "--checkpoint", str(used_run), "--out", str(foreign), "--overwrite"])
        == 0
    )
    assert not (foreign / "todo.txt").exists() and (foreign / "config.json").is_file()


# ---- 5. tokenizer checks at export and eval ----------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tokenizer with the same vocabulary size as the run's but other pieces, and data."""
    from longtrain.data.corpus import CorpusSpec, iter_texts
    from longtrain.data.prepare import prepare
    from longtrain.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, (_doc_id, text) in enumerate(iter_texts(CorpusSpec(str(work / "corpus" / "*.txt")))):
        (corpus / f"{i}.txt").write_text(text.upper())
    docs = list(iter_texts(CorpusSpec(str(corpus / "*.txt"))))
    train_tokenizer(docs, root / "tok", vocab_size=512, sample_mb=1, progress=False)
    spec = CorpusSpec(str(corpus / "*.txt"))
    prepare(spec, root / "tok", root / "data", workers=1, val_fraction=0.1, progress=False)
    return root / "tok", root / "data"


def test_export_and_eval_refuse_another_tokenizer(
    used_run: Path, other_tokenizer: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    tok, data = other_tokenizer
    err = one_line_error(
        capsys,
        [
            "export-hf",
            "--checkpoint",
            str(used_run),
            "--out",
            str(tmp_path / "x"),
            "--tokenizer",
            str(tok),
        ],
    )
    assert "differs from the tokenizer of the weights" in err and "hash" in err, err
    assert not (tmp_path / "x").exists()
    err = one_line_error(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(used_run),
            "--task",
            "ppl",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert "differs from the tokenizer of the model" in err, err


# ---- 6. a refused resume keeps config.yaml --------------------------------------------------


def test_a_refused_resume_does_not_rewrite_config_yaml(
    work: Path, used_run: Path, tmp_path: Path
) -> None:
    before = (used_run / "config.yaml").read_bytes()
    cfg = pt_cfg(work, used_run, train={"steps": 6}, checkpoint={"interval": 2, "keep": 3})
    cfg["model"]["overrides"] = {**SHAPE, "n_layers": 3, "vocab_size": 512}
    p = pretrain(cfg)
    assert p.returncode != 0 and "n_layers" in p.stderr, p.stderr[-2000:]
    assert (used_run / "config.yaml").read_bytes() == before


# ---- data integrity, disk full, Ctrl-C ---------------------------------------------------------


def test_a_damaged_shard_is_refused_before_training(work: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    shard = sorted(data.glob("train_*.npy"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    cfg = base_cfg(tmp_path / "run", data)
    p = pretrain(cfg)
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and shard.name in err[0] and "prepare" in err[0], p.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save_names_the_device_and_keeps_the_last_checkpoint(
    work: Path, tmp_path: Path, async_save: bool
) -> None:
    run = tmp_path / "run"
    cfg = pt_cfg(work, run, checkpoint={"interval": 2, "keep": 3, "async_save": async_save})
    p = hooked("pretrain", cfg, {"HOOK_DISK_FULL_AT_SAVE": "2"})
    assert p.returncode == 2, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "no space left on /" in err[0], p.stderr[-2000:]
    assert "step_00000004" in err[0] and "GB per checkpoint" in err[0], err[0]
    assert "inline_container" not in err[0]
    latest = find_latest(run)
    assert latest is not None and latest.name == "step_00000002"
    verify_checkpoint(latest)  # the previous committed checkpoint is intact


def test_ctrl_c_saves_at_the_step_boundary_and_twice_exits_at_once(
    work: Path, tmp_path: Path
) -> None:
    run = tmp_path / "once"
    cfg = pt_cfg(work, run, checkpoint={"interval": 0, "keep": 2})
    p = hooked("pretrain", cfg, {"HOOK_SIGTERM_AT_CALL": "3", "HOOK_SIGNAL": "INT"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "press Ctrl-C again to exit at once" in p.stderr
    assert find_latest(run).name == "step_00000003"  # nothing since the last step is lost
    run = tmp_path / "twice"
    cfg = pt_cfg(work, run, checkpoint={"interval": 2, "keep": 2})
    p = hooked(
        "pretrain",
        cfg,
        {"HOOK_SIGTERM_AT_CALL": "3", "HOOK_SIGNAL": "INT", "HOOK_SIGNAL_TIMES": "2"},
    )
    assert p.returncode == 130, p.stderr[-3000:]
    assert "interrupted twice: exiting now; the steps after" in p.stderr
    assert "step_00000002" in p.stderr  # says what is kept, hence what is lost


# ---- one line where a traceback was ------------------------------------------------------------


def test_run_dir_that_is_a_file_is_one_line(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    f = tmp_path / "run"
    f.write_text("x")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(f, work / "data")))
    err = one_line_error(capsys, ["pretrain", "--config", str(cfg)])
    assert f"run_dir={f} is a file" in err
    err = one_line_error(capsys, ["export-hf", "--checkpoint", str(tmp_path), "--out", str(f)])
    assert "not an HF Llama directory" in err or "is a file" in err


def test_import_hf_with_a_wrong_hidden_size_is_one_line(tmp_path: Path, capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    conf["hidden_size"] = 64  # the weights are 32 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    err = one_line_error(
        capsys, ["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]
    )
    assert "has shape" in err and "config.json implies" in err, err
    assert not (tmp_path / "o").exists()


def test_eval_lengths_far_above_the_context_are_refused(used_run: Path, capsys) -> None:
    err = one_line_error(
        capsys, ["eval", "--checkpoint", str(used_run), "--task", "passkey", "--lengths", "100000"]
    )
    assert "--lengths 100000 is more than 8x the model's max_seq_len" in err, err


def test_plan_refuses_nan_and_inf_memory(capsys) -> None:
    preset = Path(__file__).resolve().parents[1] / "launch" / "configs" / "1b-32k.yaml"
    for bad in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit) as e:
            cli_main(["plan", "--config", str(preset), "--gpus", "8", "--gpu-mem", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--gpu-mem" in err and "finite number > 0" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.val_batches=-1", "data.val_batches=-1: must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip=-1.0: must be >= 0"),
        ("train.lr=inf", "train.lr=inf: must be a finite number"),
        ("train.beta1=2.0", "train.beta1=2.0: must be in [0, 1)"),
        ("parallel.offload_activations=true", "needs parallel.activation_checkpointing"),
    ],
)
def test_bad_values_are_refused_up_front(override: str, message: str) -> None:
    from longtrain.model.errors import LongtrainError
    from longtrain.train.config import load_job

    with pytest.raises(LongtrainError) as e:
        load_job(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


# ---- DeepSpeed's JIT-built ops -------------------------------------------------------------


def test_a_stale_extension_lock_is_named_instead_of_hanging(tmp_path: Path) -> None:
    from longtrain.model.errors import LongtrainError
    from longtrain.train.parallel import check_stale_build_locks

    build = tmp_path / "py311_cpu" / "fused_adam"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    check_stale_build_locks(tmp_path / "py311_cpu")  # a fresh lock: a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(LongtrainError) as e:
        check_stale_build_locks(tmp_path / "py311_cpu")
    assert str(lock) in str(e.value) and f"rm {lock}" in str(e.value)
    # A process working in the build directory owns the lock: not stale.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build)
    try:
        time.sleep(0.2)
        check_stale_build_locks(tmp_path / "py311_cpu")
    finally:
        proc.kill()


def test_deepspeed_ops_are_never_jit_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed
    import deepspeed.git_version_info as gv

    from longtrain.train.parallel import avoid_jit_ops

    monkeypatch.setattr(gv, "installed_ops", {"deepspeed_shm_comm": False})
    ops = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(ops, "deepspeed_shm_comm", True)
    avoid_jit_ops()
    assert ops["deepspeed_shm_comm"] is False  # DeepSpeed then uses plain gloo, no build
    monkeypatch.setattr(gv, "installed_ops", {"deepspeed_shm_comm": True})
    monkeypatch.setitem(ops, "deepspeed_shm_comm", True)
    avoid_jit_ops()
    assert ops["deepspeed_shm_comm"] is True  # a prebuilt op is used
