"""GPU readiness checked on the CPU: the DeepSpeed config under bf16, a bf16 smoke run,
evaluation without autograd, eval --sp validation, the CUDA RNG of one device.

(The loss, MFU, peak-table and attention-core rows of the same work are in test_loss.py,
test_metrics.py and test_attention.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import SHAPE, base_cfg, metrics
from test_loss import GemmRecorder
from test_trainer import pretrain

from longtrain.train.config import load_job
from longtrain.train.engine import deepspeed_config


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_config_accumulates_and_reduces_gradients_in_fp32(zero: int) -> None:
    job = load_job(None, [f"parallel.zero_stage={zero}", "parallel.dtype=bf16"])
    cfg = deepspeed_config(job, 8, torch.device("cuda"))
    assert cfg["bf16"]["enabled"] is True
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"
    # fp32 jobs need neither; stage 0 (no ZeRO optimizer) can only reduce in fp32.
    fp32 = deepspeed_config(load_job(None, [f"parallel.zero_stage={zero}"]), 8, torch.device("cpu"))
    assert "data_types" not in fp32 and "communication_data_type" not in fp32
    z0 = deepspeed_config(
        load_job(None, ["parallel.zero_stage=0", "parallel.dtype=bf16"]), 8, torch.device("cuda")
    )
    assert z0["communication_data_type"] == "fp32" and "data_types" not in z0


def test_bf16_zero2_smoke_run_on_cpu(work: Path, tmp_path: Path) -> None:
    run = tmp_path / "bf16"
    cfg = base_cfg(
        run, work / "data", train={"steps": 3}, parallel={"zero_stage": 2, "dtype": "bf16"}
    )
    p = pretrain(cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows), rows
    import json

    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"


class _Engine:
    """The engine interface validation uses (forward, eval, train) over a plain model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model

    def __call__(self, **kw):  # type: ignore[no-untyped-def]
        return self.module(**kw)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


def _head_gemms(rec: GemmRecorder, vocab: int) -> int:
    return sum(any(vocab in shape for shape in shapes) for _n, _d, shapes in rec.gemms)


# The negative control runs validation with autograd on, as it ran before: the warning is it.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_validation_builds_no_autograd_graph(work: Path) -> None:
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.eval.validator import validation_loss
    from longtrain.train.parallel import Topology

    job = load_job(
        None,
        [f"data.dir={work / 'data'}", "data.seq_len=64", "data.val_batches=1",
         "train.loss_chunk_size=1000", "data.attention=causal"],
    )  # fmt: skip
    vocab = 512
    model = Transformer(get_flavor("debug", **SHAPE, vocab_size=vocab), attention="sdpa")
    topo = Topology(0, 1, 1, 1, 0, 0, None, None, None)
    rec = GemmRecorder()
    with rec:
        row = validation_loss(_Engine(model), job, topo, torch.device("cpu"))
    assert np.isfinite(row["val_loss"])
    assert _head_gemms(rec, vocab) == 1, rec.gemms  # the logits only: one chunk, one matmul
    # Negative control: the same evaluation with autograd on does the fused-loss backward
    # work in its forward (what evaluation did before it ran under no_grad): 3 per chunk.
    from longtrain.train.eval import validator

    rec = GemmRecorder()
    with rec, torch.enable_grad():
        validator.validation_loss.__wrapped__(_Engine(model), job, topo, torch.device("cpu"))
    assert _head_gemms(rec, vocab) == 3


def test_eval_sp_with_indivisible_heads_gets_the_training_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from longtrain.launch.cli import main as cli_main
    from longtrain.model.config import get_flavor
    from longtrain.model.transformer import Transformer
    from longtrain.train.export import save_model_dir

    save_model_dir(Transformer(get_flavor("debug", **SHAPE, vocab_size=64)), tmp_path / "m")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = ["eval", "--checkpoint", str(tmp_path / "m"), "--task", "ppl", "--sp", "3"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sp 3 does not divide the model's n_heads=4" in err[0], err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_only_the_current_devices_cuda_rng_is_saved_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mocked single-device CUDA RNG: srun with one visible GPU per task and torchrun with
    all visible save the same thing (this rank's device), and both restore it."""
    from longtrain.train import checkpoint as ck

    states = {
        0: torch.tensor([1, 2, 3], dtype=torch.uint8),
        1: torch.tensor([4], dtype=torch.uint8),
    }
    current = {"dev": 1}
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["dev"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[current["dev"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))

    def everything() -> None:
        raise AssertionError("the RNG of every visible device must not be touched")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", everything)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: everything())
    snap = ck._rng_snapshot()
    assert torch.equal(snap["cuda"], states[1])
    ck._rng_restore(snap)
    assert len(restored) == 1 and torch.equal(restored[0], states[1])
    # A checkpoint of the earlier format (every device's state) restores this rank's one.
    old = dict(snap, cuda=[states[0], states[1]])
    current["dev"] = 0
    ck._rng_restore(old)
    assert torch.equal(restored[-1], states[0])
