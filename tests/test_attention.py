"""Attention cores against the float64 reference on packed windows, forward and backward."""

import pytest
import torch

from longtrain.model.attention import (
    ReferenceAttention,
    available_cores,
    core_unavailable_reason,
    make_core,
)
from longtrain.model.errors import LongtrainError

# Two rows of T=24; row 0 holds docs of 5, 1, 11, 7 tokens, row 1 holds 1, 1, 22 (length-1 docs).
T = 24
CU = [0, 5, 6, 17, 24, 25, 26, 48]


def _inputs(hq: int, hkv: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, T, hq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, T, hkv, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, hkv, 16, generator=g, dtype=torch.float64)
    dout = torch.randn(2, T, hq, 16, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _run(core, q, k, v, dout, cu):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = core(q, k, v, cu_seqlens=cu, max_seqlen=None if cu is None else 22)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _naive_per_doc(q, k, v, cu):
    """Independent check of the reference: causal softmax attention doc by doc, loops only."""
    out = torch.zeros_like(q)
    qf, kf, vf = (t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v))
    of = out.view(-1, q.shape[2], q.shape[3])
    rep = q.shape[2] // k.shape[2]
    for s, e in zip(cu[:-1], cu[1:]):
        for i in range(s, e):
            for h in range(q.shape[2]):
                sc = kf[s : i + 1, h // rep] @ qf[i, h] / q.shape[3] ** 0.5
                of[i, h] = torch.softmax(sc, 0) @ vf[s : i + 1, h // rep]
    return out


def test_reference_matches_naive_loops() -> None:
    q, k, v, _ = _inputs(4, 2, torch.float64)
    cu = torch.tensor(CU, dtype=torch.int32)
    ref = ReferenceAttention()(q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(ref, _naive_per_doc(q, k, v, CU), rtol=0, atol=1e-12)
    # Negative control: without boundaries (one causal doc per row) the result must differ.
    assert not torch.allclose(ReferenceAttention()(q, k, v), ref)


@pytest.mark.parametrize("name", ["sdpa", "torch_varlen", "flash"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "causal"])
def test_core_matches_reference(name: str, heads: tuple[int, int], packed: bool) -> None:
    reason = core_unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    device = "cpu" if name == "sdpa" else "cuda"
    # GPU kernels run in bf16: compare with a bf16-sized tolerance, fp32 ones tightly.
    dtype = torch.float32 if name == "sdpa" else torch.bfloat16
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    q, k, v, dout = _inputs(*heads, dtype, device)
    cu = torch.tensor(CU, dtype=torch.int32, device=device) if packed else None
    got = _run(make_core(name), q, k, v, dout, cu)
    ref = _run(ReferenceAttention(), *(t.double() for t in (q, k, v, dout)), cu)
    for g, r, what in zip(got, ref, ["out", "dq", "dk", "dv"]):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=f"{name} {what}")


def test_sdpa_rejects_boundaries_off_row_starts() -> None:
    q, k, v, _ = _inputs(2, 2, torch.float32)
    with pytest.raises(ValueError, match="row start"):
        make_core("sdpa")(q, k, v, cu_seqlens=torch.tensor([0, 30, 48], dtype=torch.int32))


def test_auto_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert "sdpa" in available_cores() and available_cores()[-1] == "reference"
    with caplog.at_level("INFO", logger="longtrain.model.attention"):
        core = make_core("auto")
    assert (
        type(core).__name__
        == {
            "flash": "FlashAttention",
            "torch_varlen": "TorchVarlenAttention",
            "sdpa": "SDPAAttention",
        }[available_cores()[0]]
    )
    assert f"auto -> {available_cores()[0]}" in caplog.text
    with pytest.raises(LongtrainError, match="unknown core 'xformers'"):
        make_core("xformers")
    if not torch.cuda.is_available():
        with pytest.raises(LongtrainError, match="'torch_varlen' is not available.*CUDA"):
            make_core("torch_varlen")
