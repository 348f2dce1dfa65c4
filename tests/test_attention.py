"""Attention cores against the float64 reference on packed windows, forward and backward;
document offsets read on the host once per forward, through DeepSpeed's wrapper too."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import longtrain.model.attention as attention
import longtrain.model.transformer as transformer
from longtrain.model.attention import (
    Documents,
    FlashAttention3,
    ReferenceAttention,
    available_cores,
    core_unavailable_reason,
    make_core,
)
from longtrain.model.config import get_flavor
from longtrain.model.errors import LongtrainError
from longtrain.model.transformer import Transformer

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


@pytest.mark.parametrize("name", ["sdpa", "torch_varlen", "flash", "flash3"])
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
            "flash3": "FlashAttention3",
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
    reason = core_unavailable_reason("flash3")
    if reason is not None:
        assert "flash3" not in available_cores()
        with pytest.raises(LongtrainError, match="'flash3' is not available"):
            make_core("flash3")


# ---------------------------------------------------------------------------------------------
# FlashAttention-3 glue, against a stand-in module with FA3's signature (no GPU here)


def _fake_fa3(returns_lse: bool) -> types.ModuleType:
    """``flash_attn_interface`` with FA3's real parameter order, computed by SDPA per document."""

    def flash_attn_varlen_func(  # type: ignore[no-untyped-def]
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        seqused_q=None, seqused_k=None, softmax_scale=None, causal=False, **rest,
    ):  # fmt: skip
        assert q.dim() == 3 and q.dtype in (torch.bfloat16, torch.float16)
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q is cu_seqlens_k
        offs = cu_seqlens_q.tolist()
        assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(offs, offs[1:]))
        outs = [
            F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=causal, enable_gqa=True,
            ).transpose(0, 1)  # (L, Hq, D)
            for s, e in zip(offs[:-1], offs[1:])
        ]  # fmt: skip
        out = torch.cat(outs)  # (total, Hq, D)
        lse = torch.zeros(q.shape[1], q.shape[0])  # (Hq, total)
        return (out, lse) if returns_lse else out

    mod = types.ModuleType("flash_attn_interface")
    mod.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    return mod


@pytest.mark.parametrize("returns_lse", [True, False], ids=["out_lse", "out"])
def test_flash3_glue(monkeypatch: pytest.MonkeyPatch, returns_lse: bool) -> None:
    """Argument order, ``causal`` by keyword, the (out, lse) return of the FA3 betas."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", _fake_fa3(returns_lse))
    q, k, v, dout = _inputs(4, 2, torch.float32)
    cu = torch.tensor(CU, dtype=torch.int32)
    got = _run(FlashAttention3(), q, k, v, dout, cu)
    ref = _run(ReferenceAttention(), *(t.double() for t in (q, k, v, dout)), cu)
    for g, r, what in zip(got, ref, ["out", "dq", "dk", "dv"]):
        assert g.dtype == torch.float32  # run in bf16, cast back
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2, msg=what)
    # Negative control: without causal=True the stand-in attends to the future and differs.
    fake = sys.modules["flash_attn_interface"].flash_attn_varlen_func
    flat = [t.reshape(48, t.shape[2], 16).bfloat16() for t in (q, k, v)]  # (B*T, H, D)
    acausal = fake(*flat, cu, cu, 22, 22, causal=False)
    acausal = acausal[0] if returns_lse else acausal
    assert (acausal.view(2, T, 4, 16).double() - ref[0]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# Document offsets reach the host once per forward


class HostReads:
    """Counts int32 tensors read on the host (``tolist``/``item``): cu_seqlens is the only
    int32 tensor of a forward, so these are exactly the device syncs it causes on a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        for meth in ("tolist", "item"):
            orig = getattr(torch.Tensor, meth)

            def counted(t, *a, _orig=orig, **kw):  # type: ignore[no-untyped-def]
                if t.dtype == torch.int32:
                    self.n += 1
                return _orig(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, meth, counted)


def _model(n_layers: int = 4) -> Transformer:
    cfg = get_flavor(
        "debug", vocab_size=97, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=128
    )
    torch.manual_seed(0)
    return Transformer(cfg, attention="sdpa")


def _train_step(m: Transformer, cu: torch.Tensor | None) -> None:
    ids = torch.randint(0, 97, (2, T + 1), generator=torch.Generator().manual_seed(1))
    loss, n = m.loss(ids[:, :-1], ids[:, 1:], cu_seqlens=cu, chunk_size=16)
    (loss / n).backward()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_offsets_reach_the_host_once_per_forward(
    monkeypatch: pytest.MonkeyPatch, checkpointed: bool
) -> None:
    """4 layers of the per-document SDPA core, positions derived from cu_seqlens, forward and
    backward (with every block recomputed in the backward when checkpointed): one read."""
    from longtrain.train.parallel import apply_activation_checkpointing

    m = _model()
    if checkpointed:
        assert apply_activation_checkpointing(m, "full") == 4
    cu = torch.tensor(CU, dtype=torch.int32)
    reads = HostReads(monkeypatch)
    _train_step(m, cu)
    assert reads.n == 1, reads.n
    # Negative control: the blocks handed the raw tensor, as the forward used to: one read
    # per layer (and again per recomputed layer), for the same hidden states.
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    pos = transformer.positions_from_cu_seqlens(cu, 2, T)  # (B, T)
    reads.n = 0
    cos, sin = m.rope(pos, None)
    h = m.tok_embeddings(ids)  # (B, T, dim)
    for block in m.layers:
        h = block(h, cos, sin, cu_seqlens=cu)
    h.sum().backward()
    assert reads.n == (8 if checkpointed else 4), reads.n
    torch.testing.assert_close(m.norm(h), m.hidden(ids, pos, cu))


def test_varlen_kernels_read_nothing_when_max_seqlen_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = HostReads(monkeypatch)
    cu = torch.tensor(CU, dtype=torch.int32)
    docs = Documents(cu, max_seqlen=22)
    for _ in range(3):  # three layers
        t, m = attention._varlen_args(docs, None, 2, T, torch.device("cpu"))
        assert t is cu and m == 22
    assert reads.n == 0
    docs = Documents(cu)  # unknown: computed from the offsets once, then reused
    lengths = [attention._varlen_args(docs, None, 2, T, torch.device("cpu"))[1] for _ in range(3)]
    assert lengths == [22, 22, 22]
    assert reads.n == 1
    # Negative control: a raw tensor without max_seqlen is read by every layer.
    for _ in range(3):
        attention._varlen_args(cu, None, 2, T, torch.device("cpu"))
    assert reads.n == 1 + 3


def test_documents_pass_through_deepspeed_distributed_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's cores wrapped in DeepSpeed's own ``DistributedAttention`` (through the
    trainer's UlyssesAttention), its all-to-alls the identity of a 1-rank group: the
    Documents object reaches the local core as its ``cu_seqlens`` keyword, read once."""
    layer = pytest.importorskip("deepspeed.sequence.layer")
    from longtrain.train.parallel import UlyssesAttention

    class Identity:
        @staticmethod
        def apply(group, x, *args):  # type: ignore[no-untyped-def]
            return x

    monkeypatch.setattr(layer, "_SeqAllToAll", Identity)
    m = _model()
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor(CU, dtype=torch.int32)
    plain = m.hidden(ids, cu_seqlens=cu)
    seen: list[object] = []

    class Spy(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):  # type: ignore[no-untyped-def]
            seen.append(cu_seqlens)
            return self.inner(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    m.set_attention_core(lambda core: UlyssesAttention(Spy(core), None, 1, m.cfg.n_kv_heads))
    assert all(
        type(b.attention.core.dist_attn).__name__ == "DistributedAttention" for b in m.layers
    )
    reads = HostReads(monkeypatch)
    torch.testing.assert_close(m.hidden(ids, cu_seqlens=cu), plain)
    assert reads.n == 1 and len(seen) == 4
    assert all(isinstance(d, Documents) and d is seen[0] for d in seen)
    # Negative control: the same window without its boundaries is a different computation.
    assert (m.hidden(ids) - plain).abs().max() > 1e-3
