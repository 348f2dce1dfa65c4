"""Checkpoints: exact resume, atomic commit under kill -9, keep-last-k, async == sync,
integrity, ZeRO 0-3 consolidation, resharding 2 <-> 1, preemption agreement.

Three process launches (tests/test_checkpoint_worker.py) do all the DeepSpeed work once per
module; the tests below compare what they wrote. The workers train on the trainer's loader
over a data directory written here, step with ``train_step`` and save and resume through the
``CheckpointManager``, so the loader position in a checkpoint is the real one, and a resume
that lost it (or the RNG) is shown to fail the same comparisons. The peak memory of
consolidation on a model big enough to tell is measured by bench/bench_checkpoint.py (see
bench/RESULTS.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint_worker import GLOBAL_BATCH, SEQ, TOKENIZER_HASH, VOCAB, data_dir
from test_train_parallel import make_stream, write_data_dir

from longtrain.model.errors import LongtrainError
from longtrain.train.checkpoint import (
    _prune,
    load_checkpoint,
    plan_resume,
    save_checkpoint,
)
from longtrain.train.export import write_model_output
from longtrain.train.files import find_latest, list_checkpoints, verify_checkpoint
from longtrain.train.preempt import PreemptionHandler
from longtrain.train.reshard import consolidate_state_dict, iter_state_dict

WORKER = Path(__file__).with_name("test_checkpoint_worker.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    n: int, scenario: str, out: Path, fault: str | None = None, timeout: float = 240
) -> dict:
    """Start ``n`` worker ranks; with ``fault`` ("point:rank:4") that rank must die by SIGKILL."""
    port = _free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
        env.pop("LONGTRAIN_CKPT_FAULT", None)
        if fault:
            env["LONGTRAIN_CKPT_FAULT"] = fault
        log = open(out / f"{scenario}.rank{r}.log", "w")
        cmd = [sys.executable, str(WORKER), scenario, str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        rcs = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((out / f"{scenario}.rank{r}.log").read_text()[-3000:] for r in range(n))
    if fault:
        killed = int(fault.split(":")[1])
        assert rcs[killed] == -signal.SIGKILL, f"rcs={rcs}\n{logs}"
    else:
        assert rcs == [0] * n, f"rcs={rcs}\n{logs}"
    return json.loads((out / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ckpt")
    tokens, doc_starts, _ = make_stream(n_tokens=3000, vocab=VOCAB)  # 187 windows, no mask
    write_data_dir(data_dir(out), (tokens, doc_starts, None), TOKENIZER_HASH, VOCAB)
    res = {"out": out}
    # Rank 0 dies after the other ranks finished, just before COMMIT.
    res["main"] = _launch(2, "main", out, fault="before_commit:0:4")
    shutil.move(out / "fault", out / "fault_before_commit")
    # Single rank dies after COMMIT, before `latest` moved.
    res["single"] = _launch(1, "single", out, fault="after_commit:0:4")
    shutil.move(out / "fault", out / "fault_after_commit")
    # Rank 1 dies after writing its shard, before its marker: rank 0 never commits.
    res["resume"] = _launch(2, "resume", out, fault="after_rank_files:1:4")
    shutil.move(out / "fault", out / "fault_rank_files")
    return res


def _load_any(p: Path):
    # Files written by this test's own workers, so full unpickling is fine here.
    if p.suffix == ".pt":
        return torch.load(p, weights_only=False)
    return json.loads(p.read_text())


def _diffs(a, b, where: str = "") -> list[str]:
    if torch.is_tensor(a):
        ok = torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where} keys"]
        return [d for k in a for d in _diffs(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{where} len"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diffs(x, y, f"{where}[{i}]")]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return _diffs(vars(a), vars(b), where)
    return [] if a == b else [where]


def _same_checkpoint(a: Path, b: Path) -> list[str]:
    files_a = set(json.loads((a / "COMMIT").read_text())["files"])
    files_b = set(json.loads((b / "COMMIT").read_text())["files"])
    assert files_a == files_b
    return [d for f in sorted(files_a) for d in _diffs(_load_any(a / f), _load_any(b / f), f)]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


# ----------------------------------------------------------------------------- exact resume


def test_exact_resume_bitwise_and_same_final_state(runs: dict) -> None:
    straight = runs["main"]["exact_losses"][3:6]
    resumed = runs["resume"]["resume_losses"]
    assert resumed == straight  # bitwise: CPU fp32, dropout drawn from the restored RNG
    state = runs["resume"]["resume_state"]
    # 12 windows consumed (the loader counts tokens), exactly where the straight run was.
    assert state["step"] == 3 and state["loader"]["cursor"] == 12 * SEQ
    assert state["loader"] == runs["main"]["loader_at_3"]
    progress = state["progress"]
    assert progress["step"] == 3 and progress["tokens_seen"] == 3 * GLOBAL_BATCH * SEQ
    # Weights, optimizer moments, LR scheduler, step counters, RNG of both ranks, loader state.
    out = runs["out"]
    assert _same_checkpoint(_ckpt(out / "exact", 6), _ckpt(out / "resumed", 6)) == []


def test_checkpoint_comparison_sees_a_different_state(runs: dict) -> None:
    # Negative control of _same_checkpoint (the resume, async and e2e comparisons): two saves
    # of one run, 3 steps apart, differ in the loader position, progress, weights, optimizer
    # and RNG, and it names each of them.
    exact = runs["out"] / "exact"
    diffs = _same_checkpoint(_ckpt(exact, 3), _ckpt(exact, 6))
    for what in ("parts.loader.cursor", "parts.progress.step", "model_states", "optim_states"):
        assert any(what in d for d in diffs), (what, diffs)
    assert any(d.startswith("rng_state_rank00000") for d in diffs), diffs
    assert any(d.startswith("rng_state_rank00001") for d in diffs), diffs


def test_workers_use_the_engines_optimizer_rule(runs: dict) -> None:
    # deepspeed_config's rule on CPU: torch's AdamW (DeepSpeed's own Adam would be JIT-built).
    assert runs["main"]["optimizer"].startswith("torch.optim."), runs["main"]["optimizer"]


def test_resume_without_rng_restore_would_differ(runs: dict) -> None:
    # Guards the test above: dropout makes the losses depend on the RNG (the same run without
    # dropout gives other losses) ...
    assert runs["main"]["exact_losses"][3:6] != runs["main"]["plain_losses"][3:6]
    # ... and the same resume that skipped restoring the RNG fails its comparison.
    assert runs["resume"]["forgot_rng_losses"] != runs["main"]["exact_losses"][3:6]


def test_resume_without_the_data_position_would_differ(runs: dict) -> None:
    # Negative control of the exact and the resharded resumes: the same resume with the loader
    # left at the start of the data (weights, optimizer and RNG restored) trains on other
    # windows, and misses both comparisons (bitwise, and 1e-5 relative) by far.
    forgot = runs["resume"]["forgot_loader_losses"]
    straight = runs["main"]["exact_losses"][3:6]
    assert forgot != straight
    assert max(abs(x - y) / abs(y) for x, y in zip(forgot, straight)) > 1e-3, (forgot, straight)


# ----------------------------------------------------------------------------- atomic commit


def test_kill9_mid_save_resumes_from_previous_complete(runs: dict, caplog) -> None:
    out = runs["out"]
    for name in ("fault_before_commit", "fault_rank_files"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="longtrain.train.checkpoint"):
            latest = find_latest(out / name)
        assert latest == _ckpt(out / name, 2), name
        assert [(s, c) for s, _, c in list_checkpoints(out / name)] == [(2, True), (4, False)]
        text = caplog.text
        assert "step_00000004 is incomplete" in text and "previous complete checkpoint" in text
        verify_checkpoint(latest)
        with pytest.raises(LongtrainError, match="incomplete"):
            load_checkpoint(None, _ckpt(out / name, 4))


def test_kill9_after_commit_takes_committed_and_says_pointer_is_stale(runs: dict, caplog) -> None:
    run = runs["out"] / "fault_after_commit"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    with caplog.at_level(logging.WARNING, logger="longtrain.train.checkpoint"):
        assert find_latest(run) == _ckpt(run, 4)
    assert "newest committed checkpoint is step_00000004" in caplog.text
    verify_checkpoint(_ckpt(run, 4))


# ----------------------------------------------------------------------------- keep / async


def test_keep_last_k(runs: dict, tmp_path: Path) -> None:
    run = runs["out"] / "keep"
    assert [(s, c) for s, _, c in list_checkpoints(run)] == [(8, True), (9, True)]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000009"
    # Incomplete directories (a save in flight, a crash) are never pruned.
    for step, committed in ((1, False), (2, True), (3, True), (4, True)):
        d = _ckpt(tmp_path, step)
        d.mkdir(parents=True)
        if committed:
            (d / "COMMIT").write_text('{"files": {}}')
    _prune(tmp_path, 2)
    assert [(s, c) for s, _, c in list_checkpoints(tmp_path)] == [(1, False), (3, True), (4, True)]
    with pytest.raises(LongtrainError, match="checkpoint.keep=1"):
        save_checkpoint(None, tmp_path, 5, {}, {}, keep=1)


def test_async_save_equals_sync_save(runs: dict) -> None:
    out = runs["out"]
    # The async copy was taken at step 9 and written while steps 10-11 changed every tensor.
    assert _same_checkpoint(_ckpt(out / "sync", 9), _ckpt(out / "async", 9)) == []
    verify_checkpoint(_ckpt(out / "async", 9))


# ----------------------------------------------------------------------------- integrity


class _Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["EVIL_MARKER"],))


class _UnpicklingEngine:
    """Stands in for DeepSpeed's loader, which unpickles with weights_only=False."""

    _config = type("C", (), {"load_universal_checkpoint": False})()
    dp_world_size = 2

    def zero_optimization_stage(self) -> int:
        return 2

    def load_checkpoint(self, load_dir: str, tag: str, **kw):
        for f in sorted((Path(load_dir) / tag).glob("*.pt")):
            torch.load(f, weights_only=False)
        return None, None


def test_integrity_names_the_file_and_runs_before_unpickling(
    runs: dict, tmp_path: Path, monkeypatch
) -> None:
    good = _ckpt(runs["out"] / "exact", 3)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))

    def damaged(name: str) -> Path:
        d = tmp_path / name / "step_00000003"
        shutil.copytree(good, d)
        return d

    d = damaged("truncated")
    f = d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(
        LongtrainError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: size .*truncated"
    ):
        load_checkpoint(_UnpicklingEngine(), d)

    d = damaged("altered")
    f = d / "mp_rank_00_model_states.pt"
    torch.save(_Evil(), f)
    with open(f, "ab") as fh:  # same size as the original, so only the hash can tell
        fh.write(b"\0" * (good.joinpath(f.name).stat().st_size - f.stat().st_size))
    with pytest.raises(LongtrainError, match=r"mp_rank_00_model_states\.pt: sha256 differs"):
        load_checkpoint(_UnpicklingEngine(), d)
    assert not marker.exists()

    d = damaged("extra")
    torch.save(_Evil(), d / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(
        LongtrainError, match=r"zero_pp_rank_2_mp_rank_00_optim_states\.pt: file not listed"
    ):
        load_checkpoint(_UnpicklingEngine(), d)
    assert not marker.exists()

    with pytest.raises(
        LongtrainError, match=r"model config differs: model\.dim=27 in the checkpoint but 64"
    ):
        load_checkpoint(_UnpicklingEngine(), good, model_config={"dim": 64})
    with pytest.raises(LongtrainError, match=r"tokenizer_hash='tok0' in the checkpoint but 'tok1'"):
        load_checkpoint(_UnpicklingEngine(), good, tokenizer_hash="tok1")
    # The harness itself is able to unpickle (so the checks above are what stopped it).
    torch.load(d / "zero_pp_rank_2_mp_rank_00_optim_states.pt", weights_only=False)
    assert marker.exists()


def test_every_rank_refuses_a_file_another_rank_hashed(runs: dict) -> None:
    # Ranks split the hashing (each file read once in total) and share the verdict.
    victim = sorted(json.loads((_ckpt(runs["out"] / "exact", 3) / "COMMIT").read_text())["files"])[
        1
    ]
    errors = runs["resume"]["corrupt_errors"]
    assert len(errors) == 2
    for err in errors:
        assert err.startswith("LongtrainError: ") and f"{victim}: sha256 differs" in err, err


def test_verify_parts_split_the_hashing(runs: dict, tmp_path: Path) -> None:
    d = tmp_path / "step_00000003"
    shutil.copytree(_ckpt(runs["out"] / "exact", 3), d)
    victim = sorted(json.loads((d / "COMMIT").read_text())["files"])[1]
    data = bytearray((d / victim).read_bytes())
    data[-1] ^= 0xFF
    (d / victim).write_bytes(bytes(data))
    verify_checkpoint(d, part=(0, 2))  # rank 0's share does not include the altered file
    with pytest.raises(LongtrainError, match="sha256 differs"):
        verify_checkpoint(d, part=(1, 2))


def test_our_files_load_with_weights_only(runs: dict) -> None:
    d = _ckpt(runs["out"] / "exact", 3)
    for f in d.glob("rng_state_rank*.pt"):
        torch.load(f, weights_only=True)
    json.loads((d / "client_state.json").read_text())
    json.loads((d / "model_config.json").read_text())


# ----------------------------------------------------------------------------- consolidation


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidate_equals_unsharded_weights(runs: dict, stage: int, tmp_path: Path) -> None:
    run = runs["out"] / f"zero{stage}"
    ref = torch.load(run / "ref.pt", weights_only=True)
    sd = consolidate_state_dict(run)  # a run directory resolves to its latest checkpoint
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], ref[k]), k
    assert [k for k, _ in iter_state_dict(_ckpt(run, 2))] == list(sd)
    from safetensors.torch import load_file

    written = load_file(write_model_output(run, tmp_path / "m", {}) / "model.safetensors")
    assert all(torch.equal(written[k], ref[k]) for k in ref) and set(written) == set(ref)


def test_consolidation_drops_mappings_every_budget(runs: dict, monkeypatch) -> None:
    # Bounded memory comes from reading shards through mappings that are dropped every
    # `remap_bytes`; bench/bench_checkpoint.py measures the resulting peak RSS on a big model.
    import longtrain.train.reshard as rs

    clears = []
    orig = rs._Shards.touched

    def spy(self, nbytes: int) -> None:
        before = len(self.cache)
        orig(self, nbytes)
        if before and not self.cache:
            clears.append(nbytes)

    monkeypatch.setattr(rs._Shards, "touched", spy)
    run = runs["out"] / "zero3"
    ref = torch.load(run / "ref.pt", weights_only=True)
    sd = dict(iter_state_dict(run, remap_bytes=1))  # drop after every tensor
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert len(clears) >= 3


# ----------------------------------------------------------------------------- resharding


def _close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_reshard_2_to_1_keeps_optimizer_and_data_order(runs: dict) -> None:
    resumed = runs["single"]["resharded_losses"]
    assert _close(resumed, runs["main"]["plain_losses"][3:6]), resumed
    assert runs["single"]["resharded_state"]["loader"]["cursor"] == 12 * SEQ
    assert (
        runs["out"] / "plain2" / "checkpoints" / "universal" / "step_00000003" / "COMMIT"
    ).is_file()


def test_reshard_1_to_2_keeps_optimizer_and_data_order(runs: dict) -> None:
    resumed = runs["resume"]["resharded_losses"]
    assert _close(resumed, runs["single"]["plain_losses"][3:6]), resumed
    assert runs["resume"]["resharded_state"]["loader"]["cursor"] == 12 * SEQ


def test_reshard_guard_is_not_vacuous(runs: dict) -> None:
    # Steps 4-6 from a fresh optimizer would differ: a lost Adam state could not pass above.
    assert not _close(runs["main"]["plain_losses"][3:6], runs["main"]["plain_losses"][0:3])


def test_unsupported_reshard_fails_before_training() -> None:
    saved = {"zero_stage": 3, "zero_partitions": 2, "world_size": 2}
    with pytest.raises(LongtrainError, match="parallel.zero_stage=3"):
        plan_resume(saved, zero_stage=2, zero_partitions=1, path="ckpt")
    assert plan_resume(saved, 3, 1) is True
    assert plan_resume(saved, 3, 2) is False
    assert plan_resume({"zero_stage": 1, "zero_partitions": 2}, 2, 2) is False


# ----------------------------------------------------------------------------- preemption


def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(runs: dict) -> None:
    # Rank 1 got SIGUSR1 during step 3; both ranks leave before step 4.
    assert runs["main"]["stopped_at"] == [3, 3]
    assert runs["resume"]["stopped_at"] == [3, 3]


def test_preemption_handler_single_process_and_deadline() -> None:
    h = PreemptionHandler(deadline_s=30).install()
    try:
        assert not h.should_stop() and h.time_left() == float("inf")
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.should_stop() and h.should_stop() and 0 < h.time_left() <= 30
        assert h.received == signal.SIGTERM
    finally:
        h.finish()
        h.uninstall()
    code = (
        "import os, signal, time\n"
        "from longtrain.train.preempt import PreemptionHandler\n"
        "h = PreemptionHandler(deadline_s=1).install()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(30)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 124 and "deadline" in r.stderr
