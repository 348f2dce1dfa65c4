"""bench/gpu_check.py in its CPU dry-run mode, so the GPU check cannot rot unseen."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(gpu_check)  # type: ignore[union-attr]


def test_dry_run_through_the_shell_script(tmp_path: Path) -> None:
    out = tmp_path / "gc"
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--skip-pretrain",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"]
    assert report["matmul"]["peak_tflops"] > 0
    sdpa = [c for c in report["cores"]["results"] if c["core"] == "sdpa"]
    assert sdpa and sdpa[0]["ok"] and sdpa[0]["docs"] > 2
    assert "flash3" in report["cores"]["skipped"] or any(
        c["core"] == "flash3" for c in report["cores"]["results"]
    )
    # The head GEMMs ran in bf16 with an fp32 gradient accumulator, matching fp32.
    hg = report["head_grad"]
    assert hg["ok"] and hg["fp32_gemms"] == 0 and hg["head_grad_accumulator"] == "float32"
    assert hg["gemms"] == ["mm(bfloat16,bfloat16)"]  # CPU: no out_dtype kernels in torch 2.13
    rows = report["model"]["rows"]
    assert [(row["seq_len"], row["docs"]) for row in rows] == [(128, 1), (256, 1), (256, 4)]
    assert all(row["tokens_per_s"] > 0 and row["planner_gb"] > 0 for row in rows)
    # Both MFU conventions: equal for one document, the whole-window one larger when packed.
    for row in rows[:2]:
        assert row["mfu_vs_measured"] == pytest.approx(row["mfu_window_vs_measured"])
    assert rows[2]["mfu_window_vs_measured"] > rows[2]["mfu_vs_measured"] > 0
    # The levers stage: all four builds ran, and offload's host bytes are the planner's.
    lev = report["levers"]
    names = [row["lever"] for row in lev.get("rows", [])]
    assert lev["ok"] and names == ["baseline", "tiled_mlp", "offload", "both"], lev
    assert r.stdout.strip().splitlines()[-1].startswith("  total")  # the table comes last


class CrossDocumentSDPA(torch.nn.Module):
    """A broken core: ignores document boundaries (plain causal over the whole row)."""

    def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):  # type: ignore[no-untyped-def]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )  # (B, Hq, T, D)
        return o.transpose(1, 2)  # (B, T, Hq, D)


def test_core_check_catches_a_broken_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import longtrain.model.attention as attention

    sh = gpu_check.Shapes(dry=True)
    assert gpu_check.check_core("sdpa", sh, seed=1)["ok"]
    real = attention.make_core
    monkeypatch.setattr(
        attention, "make_core", lambda n: CrossDocumentSDPA() if n == "sdpa" else real(n)
    )
    res = gpu_check.check_core("sdpa", sh, seed=1)
    assert not res["ok"] and res["out"]["err"] > 10 * res["out"]["tol"]


def test_packed_offsets_have_length_one_documents() -> None:
    offs = gpu_check.packed_offsets(2, 96, torch.Generator().manual_seed(0))
    lengths = [b - a for a, b in zip(offs, offs[1:])]
    assert offs[0] == 0 and offs[-1] == 192 and 96 in offs and min(lengths) == 1
    assert all(n > 0 for n in lengths)


def test_summarize_metrics(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 9.0, "tokens_per_s": 100.0, "mfu": 0.1, "peak_mem_gb": 3.0},
        {"step": 2, "loss": 8.0, "tokens_per_s": 200.0, "mfu": 0.4, "peak_mem_gb": 5.0},
        {"step": 2, "val_loss": 8.5},
        {"step": 3, "loss": 7.0, "tokens_per_s": 400.0, "mfu": 0.5, "peak_mem_gb": 4.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = gpu_check.summarize_metrics(path)
    assert (s["steps"], s["loss_first"], s["loss_last"]) == (3, 9.0, 7.0)
    assert s["tokens_per_s"] == pytest.approx(300.0)  # the first (warm-up) step left out
    assert s["mfu"] == pytest.approx(0.45) and s["peak_mem_gb"] == 5.0
    assert s["mfu_window"] is None and s["peak_reserved_gb"] is None  # rows without them


def test_datasheet_peaks() -> None:
    # The one table is longtrain.train.metrics.GPU_PEAKS (tests/test_metrics.py covers it all).
    assert gpu_check.datasheet_peak("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_check.datasheet_peak("NVIDIA H200 NVL") == pytest.approx(835.5)
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe") == pytest.approx(756.5)
    assert gpu_check.datasheet_peak("NVIDIA H100 NVL") == pytest.approx(835.5)
    assert gpu_check.datasheet_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert gpu_check.datasheet_peak("Some Other GPU") is None


def test_pretrain_job_is_a_valid_job_config(tmp_path: Path) -> None:
    import yaml

    from longtrain.train.config import load_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(gpu_check.pretrain_job(tmp_path, dry=False)))
    job = load_job(path)  # unknown keys or bad values raise
    assert (job.model.flavor, job.parallel.zero_stage, job.train.steps) == ("1b", 2, 20)
    assert job.data.seq_len == 8192 and job.parallel.activation_checkpointing == "full"


def test_head_grad_check_catches_an_fp32_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    import longtrain.model.loss as loss

    sh = gpu_check.Shapes(dry=True)
    assert gpu_check.stage_head_grad(sh)["ok"]
    # The old behaviour: bf16 weights, yet the head-weight gradient as an fp32 GEMM.
    monkeypatch.setattr(loss, "_LOWP", ())
    res = gpu_check.stage_head_grad(sh)
    assert not res["ok"] and res["fp32_gemms"] == 4  # one per chunk of 64 of the 256 tokens
