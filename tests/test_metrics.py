"""MFU conventions and peaks, per-interval peak memory, the TF32 policy (train/metrics.py)."""

from __future__ import annotations

import pytest
import torch

import longtrain.train.metrics as metrics
from longtrain.model.config import get_flavor
from longtrain.train.metrics import (
    FlopsMeter,
    attention_flops,
    datasheet_peak_flops,
    device_peak_flops,
    doc_lengths,
    flops_per_window,
    gpu_peak,
    mfu,
    peak_memory,
    reset_peak_memory,
    set_tf32_policy,
    tf32_enabled,
)

# Names exactly as torch.cuda.get_device_name() reports them -> dense bf16 TFLOP/s (datasheet:
# the "with sparsity" tensor-core figure halved; H100 SXM from the H100 whitepaper).
DATASHEET_BF16 = {
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 PCIe": 756.5,  # 1,513 sparse
    "NVIDIA H100 NVL": 835.5,  # 1,671 sparse
    "NVIDIA H200": 989.4,  # SXM, 1,979 sparse
    "NVIDIA H200 NVL": 835.5,  # 1,671 sparse
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA GH200 144G HBM3e": 989.4,
    "NVIDIA B200": 2250.0,  # HGX B200: 36 PF sparse over 8 GPUs
}


@pytest.mark.parametrize("name", sorted(DATASHEET_BF16))
def test_each_listed_gpu_maps_to_its_datasheet_number(name: str) -> None:
    assert datasheet_peak_flops(name, torch.bfloat16) == pytest.approx(DATASHEET_BF16[name] * 1e12)
    assert datasheet_peak_flops(name, torch.float16) == datasheet_peak_flops(name, torch.bfloat16)
    # fp32: TF32 tensor cores at half the bf16 rate, else the CUDA-core fp32 rate (far lower).
    tf32 = datasheet_peak_flops(name, torch.float32, tf32=True)
    fp32 = datasheet_peak_flops(name, torch.float32, tf32=False)
    assert tf32 == pytest.approx(DATASHEET_BF16[name] * 1e12 / 2)
    assert 0 < fp32 < tf32 / 4  # type: ignore[operator]


def test_names_that_contain_a_listed_name_are_not_mistaken_for_it() -> None:
    # The substring bugs of a naive table: GH200 is not an H200 SXM, NVL/PCIe are not SXM.
    assert gpu_peak("NVIDIA GH200 480GB").name == "GH200"  # type: ignore[union-attr]
    assert gpu_peak("NVIDIA H100 NVL").name == "H100 NVL"  # type: ignore[union-attr]
    assert gpu_peak("NVIDIA H200 NVL").name == "H200 NVL"  # type: ignore[union-attr]
    # Unlisted parts and MIG slices get no datasheet number (they are measured instead).
    for name in (
        "NVIDIA GB200",
        "NVIDIA H800",
        "NVIDIA H20",
        "NVIDIA A800-SXM4-80GB",
        "NVIDIA L40S",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
        "Some Other GPU",
    ):
        assert gpu_peak(name) is None, name
        assert datasheet_peak_flops(name, torch.bfloat16) is None


def test_unlisted_gpu_is_probed_with_a_large_gemm_or_gets_no_mfu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, torch.dtype, int | None]] = []

    def probe(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
        calls.append((device.type, dtype, n))
        return 123e12

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800")
    monkeypatch.setattr(metrics, "measure_matmul_flops", probe)
    peak, how = device_peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == 123e12 and "measured" in how and "H800" in how
    assert calls == [("cuda", torch.bfloat16, 8192)]
    # A listed one is not probed.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    peak, how = device_peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == pytest.approx(756.5e12) and "H100 PCIe datasheet" in how and len(calls) == 1

    def broken(*a: object, **k: object) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800")
    monkeypatch.setattr(metrics, "measure_matmul_flops", broken)
    peak, how = device_peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak is None and how.startswith("no MFU") and "OutOfMemoryError" in how
    assert mfu(1e9, 1e3, 8, peak) is None  # absent, never a guess
    assert FlopsMeter.row([1e12, 2e12], 1.0, 8, None)["mfu"] is None


def test_cpu_peak_is_a_short_measured_fp32_rate() -> None:
    peak, how = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak is not None and peak > 1e8 and how == "measured fp32 matmul on CPU"


# ---------------------------------------------------------------------------------------------
# Document-masked model FLOPs


def test_window_of_four_documents_counts_sum_of_squares() -> None:
    """Hand computation for one 1024-token window holding documents of 512, 256, 192, 64."""
    cfg = get_flavor("debug")  # 4 layers, 4 heads of 32
    lengths = [512, 256, 192, 64]
    cu = torch.tensor([0, 512, 768, 960, 1024], dtype=torch.int32)
    assert doc_lengths(cu) == lengths
    n = cfg.num_params(exclude_embeddings=True)
    sum_sq = 512**2 + 256**2 + 192**2 + 64**2  # 368,640
    by_hand = 6 * n * 1024 + 12 * 4 * 4 * 32 * sum_sq / 2
    assert attention_flops(cfg, lengths) == 12 * 4 * 4 * 32 * sum_sq / 2
    assert flops_per_window(cfg, lengths) == by_hand
    # The whole-window convention counts 1024^2 / 2 instead: 2.84x the attention work.
    whole = 1024 * cfg.flops_per_token(1024, causal=True)
    assert whole == 6 * n * 1024 + 12 * 4 * 4 * 32 * 1024**2 / 2
    assert (whole - 6 * n * 1024) / attention_flops(cfg, lengths) == pytest.approx(1024**2 / sum_sq)
    # Negative control: one document filling the window is the same under both conventions.
    assert flops_per_window(cfg, [1024]) == whole


def test_flops_meter_both_conventions_over_ranks() -> None:
    cfg = get_flavor("debug")
    n = cfg.num_params(exclude_embeddings=True)
    per_head = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim / 2
    # Two micro-batches of B=2 windows of T=512, as an SP rank of 2 sees them.
    sp2 = FlopsMeter(cfg, sp=2)
    sp2.add(torch.tensor([0, 100, 512, 612, 1024], dtype=torch.int32), seq_len=512, batch=2)
    sp2.add(None, seq_len=512, batch=2)  # causal windows: one document per row
    doc = (6 * n * 2048 + per_head * (100**2 + 412**2 + 100**2 + 412**2 + 2 * 512**2)) / 2
    window = (2048 * cfg.flops_per_token(512)) / 2
    assert sp2.totals() == pytest.approx([doc, window])
    totals = [2 * x for x in sp2.totals()]  # summed over the 2 SP ranks
    row = FlopsMeter.row(totals, seconds=2.0, n_devices=2, peak=1e12)
    assert row == {
        "mfu": pytest.approx(2 * doc / (2.0 * 2 * 1e12)),
        "mfu_window": pytest.approx(2 * window / (2.0 * 2 * 1e12)),
        "mfu_convention": "document",
    }
    assert row["mfu"] < row["mfu_window"]
    # Agrees with the old formula when every window is one causal document.
    one = FlopsMeter(cfg)
    one.add(None, seq_len=512, batch=4)
    r = FlopsMeter.row(one.totals(), seconds=1.0, n_devices=1, peak=1e12)
    assert r["mfu"] == pytest.approx(mfu(cfg.flops_per_token(512), 2048.0, 1, 1e12))
    assert r["mfu"] == pytest.approx(r["mfu_window"])
    one.reset()
    assert one.totals() == [0.0, 0.0]
    with pytest.raises(ValueError, match="covers 1024 tokens"):
        one.add(torch.tensor([0, 1024], dtype=torch.int32), seq_len=512, batch=1)


# ---------------------------------------------------------------------------------------------
# Peak memory per logged interval


def test_cpu_peak_memory_is_reset_per_interval() -> None:
    reset_peak_memory(torch.device("cpu"))
    base = peak_memory(torch.device("cpu"))["peak_mem_gb"]
    big = bytearray(400_000_000)
    big[:: 1 << 12] = b"\x01" * len(range(0, len(big), 1 << 12))  # touch every page
    del big
    high = peak_memory(torch.device("cpu"))  # freed, yet still the peak: until a reset
    assert set(high) == {"peak_mem_gb"} and high["peak_mem_gb"] > base + 0.35
    reset_peak_memory(torch.device("cpu"))
    after = peak_memory(torch.device("cpu"))["peak_mem_gb"]
    if after > high["peak_mem_gb"] - 0.3:
        pytest.skip("this kernel cannot reset VmHWM (/proc/self/clear_refs)")
    assert after < base + 0.1


def test_cuda_peak_memory_reports_reserved_and_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = {"allocated": 3e9, "reserved": 5e9}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: stats["reserved"])

    def reset(device: object = None) -> None:
        stats.update(allocated=1e9, reserved=2e9)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    dev = torch.device("cuda", 0)
    assert peak_memory(dev) == {"peak_mem_gb": 3.0, "peak_reserved_gb": 5.0}
    reset_peak_memory(dev)
    assert peak_memory(dev) == {"peak_mem_gb": 1.0, "peak_reserved_gb": 2.0}


# ---------------------------------------------------------------------------------------------
# TF32 policy


@pytest.fixture
def restore_tf32():  # type: ignore[no-untyped-def]
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_tf32_policy_is_explicit_and_decides_the_fp32_peak(
    restore_tf32: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert "TF32 on" in set_tf32_policy(True)
    assert tf32_enabled() and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    on, how = device_peak_flops(torch.device("cuda"), torch.float32)
    assert on == pytest.approx(494.7e12) and "tf32" in how
    assert "TF32 off" in set_tf32_policy(False)
    assert not tf32_enabled() and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    off, how = device_peak_flops(torch.device("cuda"), torch.float32)
    assert off == pytest.approx(67e12) and "fp32" in how
    # bf16 compute is unaffected by the policy.
    assert device_peak_flops(torch.device("cuda"), torch.bfloat16)[0] == pytest.approx(989.4e12)
