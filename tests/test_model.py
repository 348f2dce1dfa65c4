"""Transformer: meta build, packing equivalence, loss path, replaceable cores."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtrain.model.attention import ReferenceAttention, SDPAAttention
from longtrain.model.config import get_flavor
from longtrain.model.transformer import Transformer, positions_from_cu_seqlens


def _small(**kw):
    return get_flavor(
        "debug", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, **kw
    )


def _rss_mb() -> float:
    """Current (not peak) resident set size: a peak reached earlier could hide growth."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_8b_on_meta_allocates_nothing() -> None:
    rss0 = _rss_mb()
    with torch.device("meta"):
        m = Transformer(get_flavor("8b"), attention="sdpa")
    grown_mb = _rss_mb() - rss0
    # Control: the probe does see a real allocation of 256 MB.
    probe = torch.ones(64 * 2**20)
    assert _rss_mb() - rss0 - grown_mb > 200
    del probe
    assert all(p.is_meta for p in m.parameters()) and all(b.is_meta for b in m.buffers())
    assert sum(p.numel() for p in m.parameters()) == get_flavor("8b").num_params()
    assert grown_mb < 200, f"RSS grew {grown_mb:.0f} MB (fp32 8B would be 32000 MB)"


def test_meta_to_empty_init_matches_direct_build() -> None:
    cfg = _small(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    )
    with torch.device("meta"):
        m = Transformer(cfg, attention="sdpa")
    m.to_empty(device="cpu")
    torch.manual_seed(3)
    m.init_weights()
    ref = Transformer(cfg, attention="sdpa")  # built directly on CPU
    torch.manual_seed(3)
    ref.init_weights()
    x = torch.randint(0, 97, (1, 40))
    assert torch.isfinite(m(x)).all()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    # init statistics: residual projections are scaled down by sqrt(2 * n_layers)
    assert abs(m.layers[0].attention.wq.weight.std().item() - 0.02) < 0.003
    assert abs(m.layers[0].attention.wo.weight.std().item() - 0.01) < 0.002


def test_packed_window_equals_documents_run_separately() -> None:
    torch.manual_seed(0)
    m = Transformer(_small(), attention="sdpa").eval()
    docs = [torch.randint(0, 97, (n,)) for n in (7, 1, 12, 4)]
    window = torch.cat(docs)[None]  # (1, 24)
    cu = torch.tensor([0, 7, 8, 20, 24], dtype=torch.int32)
    packed = m(window, cu_seqlens=cu, max_seqlen=12)
    separate = torch.cat([m(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    # Negative control: without cu_seqlens the documents see each other.
    assert not torch.allclose(m(window)[:, 8:], separate[:, 8:], atol=1e-3)
    assert positions_from_cu_seqlens(cu, 1, 24)[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0]


@pytest.mark.parametrize("tie", [False, True])
def test_loss_equals_cross_entropy_of_logits(tie: bool) -> None:
    torch.manual_seed(0)
    m = Transformer(_small(tie_embeddings=tie), attention="sdpa")
    assert (m.output is None) == tie
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :3] = -100
    s, n = m.loss(x, y, chunk_size=5)
    s.backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = F.cross_entropy(m(x).view(-1, 97), y.view(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-4)
    assert int(n) == 29
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)
    s2, n2 = m(x, labels=y, chunk_size=5)
    torch.testing.assert_close(s2, s)


def test_set_attention_core() -> None:
    torch.manual_seed(0)
    m = Transformer(_small(), attention="sdpa")
    x = torch.randint(0, 97, (1, 10))
    before = m(x)

    class Counting(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, q, k, v, cu_seqlens=None, max_seqlen=None):
            self.calls += 1
            return self.inner(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    m.set_attention_core(Counting)
    assert all(isinstance(b.attention.core.inner, SDPAAttention) for b in m.layers)
    torch.testing.assert_close(m(x), before)
    assert [b.attention.core.calls for b in m.layers] == [1, 1]
    m.set_attention_core("reference")
    assert isinstance(m.layers[1].attention.core, ReferenceAttention)
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    m.layers[0].attention.core = nn.Identity()  # plain attribute replacement is honoured too
    with pytest.raises(TypeError):
        m(x)
