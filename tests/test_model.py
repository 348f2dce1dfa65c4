"""Transformer: meta build, packing equivalence, loss path, replaceable cores; RMSNorm against
HF Llama's (bitwise forward, gradients, saved bytes; under checkpointing, no_grad and ZeRO-3).

This file is also the worker of the two-process ZeRO-3 test (``python tests/test_model.py
--zero3-worker OUT``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtrain.model.attention import ReferenceAttention, SDPAAttention
from longtrain.model.config import get_flavor
from longtrain.model.transformer import (
    RMSNorm,
    Transformer,
    _RMSNormFunction,
    positions_from_cu_seqlens,
)


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


# ---- RMSNorm: HF Llama's numbers, a lean autograd footprint -------------------------------


class AutogradRMSNorm(nn.Module):
    """The reference: HF Llama's ``LlamaRMSNorm`` (this repo's RMSNorm before the custom
    function), differentiated by autograd."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _norm_pair(dtype: torch.dtype, dim: int = 64, eps: float = 1e-5, tile_tokens: int = 0):
    torch.manual_seed(0)
    w = torch.randn(dim) * 0.3 + 1
    new, ref = RMSNorm(dim, eps).to(dtype), AutogradRMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        ref.weight.copy_(w)
    if tile_tokens:
        new.tile_elements = tile_tokens * dim
    return new, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run_norm(norm: nn.Module, x: torch.Tensor, g: torch.Tensor):
    xx = x.clone().requires_grad_()
    y = norm(xx)
    y.backward(g)
    out = (y.detach(), xx.grad, norm.weight.grad.clone())
    norm.weight.grad = None
    return out


# fp32: 1e-6 relative. bf16: two bf16 roundings (2^-7), as both sides round once: autograd's
# reference rounds the normalised value's gradient to bf16, ours the input's gradient only.
NORM_TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("tile_tokens", [0, 7])  # 7: tiles of 7-8 tokens, none dividing 150
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_hf_llama_rmsnorm(dtype: torch.dtype, tile_tokens: int) -> None:
    new, ref = _norm_pair(dtype, tile_tokens=tile_tokens)
    x = (torch.randn(3, 50, 64) * torch.rand(3, 50, 1) * 4).to(dtype)
    g = torch.randn(3, 50, 64).to(dtype)
    y, gx, gw = _run_norm(new, x, g)
    y0, gx0, gw0 = _run_norm(ref, x, g)
    assert y.dtype == y0.dtype == dtype and torch.equal(y, y0)  # bitwise
    assert gx.dtype == dtype and gw.dtype == dtype
    assert _rel(gx, gx0) <= NORM_TOL[dtype] and _rel(gw, gw0) <= NORM_TOL[dtype]
    if dtype == torch.bfloat16:
        # Against float64 ours is at least as close as autograd's (its backward rounds the
        # normalised value's gradient to bf16; ours stays fp32).
        xd = x.double().requires_grad_()
        wd = ref.weight.detach().double().requires_grad_()
        (wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(g.double())
        assert _rel(gx, xd.grad) <= _rel(gx0, xd.grad)
    # A weight kept in fp32 with bf16 activations (promotion as in HF): still the same.
    if dtype == torch.bfloat16:
        new32, ref32 = _norm_pair(torch.float32, tile_tokens=tile_tokens)
        y, gx, gw = _run_norm(new32, x, g.float())
        y0, gx0, gw0 = _run_norm(ref32, x, g.float())
        assert y.dtype == torch.float32 and torch.equal(y, y0) and gw.dtype == torch.float32
        assert _rel(gx, gx0) <= NORM_TOL[dtype] and _rel(gw, gw0) <= 1e-6


def test_rmsnorm_equivalence_negative_control() -> None:
    """The same comparisons reject a norm that is off by a little: eps 1e-4 for 1e-5."""
    bad, ref = _norm_pair(torch.float32, eps=1e-4)
    x, g = torch.randn(3, 50, 64) * 0.05, torch.randn(3, 50, 64)
    y, gx, gw = _run_norm(bad, x, g)
    y0, gx0, gw0 = _run_norm(ref, x, g)
    assert not torch.equal(y, y0) and _rel(gx, gx0) > 1e-6 and _rel(gw, gw0) > 1e-6


def test_rmsnorm_under_checkpoint_and_no_grad() -> None:
    from torch.utils.checkpoint import checkpoint

    new, ref = _norm_pair(torch.float32, tile_tokens=16)
    x, g = torch.randn(2, 40, 64), torch.randn(2, 40, 64)
    y, gx, gw = _run_norm(new, x, g)
    # Non-reentrant checkpoint: the recompute is the same computation, bit for bit.
    xx = x.clone().requires_grad_()
    checkpoint(new, xx, use_reentrant=False).backward(g)
    assert torch.equal(xx.grad, gx) and torch.equal(new.weight.grad, gw)
    new.weight.grad = None
    y0, gx0, gw0 = _run_norm(ref, x, g)
    assert _rel(gx, gx0) <= 1e-6 and _rel(gw, gw0) <= 1e-6
    # no_grad: the same output, no graph, nothing saved.
    saved = []
    with (
        torch.no_grad(),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        out = new(x.clone().requires_grad_())
    assert torch.equal(out, y0) and out.grad_fn is None and not saved


def _saved_bytes(norm: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for ``norm(x)``: distinct storages saved, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in norm.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        norm(x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_saves_its_input_and_fp32_inverse_rms(dtype: torch.dtype) -> None:
    new, ref = _norm_pair(dtype, tile_tokens=16)
    B, T, dim = 2, 40, 64
    x = torch.randn(B, T, dim).to(dtype).requires_grad_()
    a = x.element_size()
    assert _saved_bytes(new, x) == B * T * (a * dim + 4)  # x itself and 1/rms in fp32
    # Negative control: autograd through HF's expression keeps the fp32 input (x itself in
    # fp32), the normalised value in x's dtype and 1/rms: more.
    old = _saved_bytes(ref, x)
    assert old == B * T * ((4 + a) * dim + 4) and old > _saved_bytes(new, x)


# ---- RMSNorm under ZeRO-3, two processes -----------------------------------------------------

Z3_IDS = 48


def _z3_model(old_norm: bool) -> Transformer:
    """The test model with every block checkpointed; ``old_norm``: HF's autograd expression."""
    from longtrain.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    m = Transformer(_small(), attention="sdpa")
    with torch.no_grad():  # norm weights away from 1, so their gradients matter
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    if old_norm:
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.forward = AutogradRMSNorm.forward.__get__(mod)
    apply_activation_checkpointing(m, "full")
    return m


def _z3_ids() -> torch.Tensor:
    return torch.randint(0, 97, (1, Z3_IDS + 1), generator=torch.Generator().manual_seed(5))


def _z3_worker(out_dir: str) -> None:
    """ZeRO-3 (every parameter partitioned, the norms' too) on two ranks with the same batch:
    the averaged gradients are one batch's. Scenario ``detached`` hands the function the
    weight's data instead of the parameter (the bug ZeRO-3 must not tolerate)."""

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from longtrain.train.parallel import init_distributed

    init_distributed(timeout_s=90)  # gloo, and no JIT-built DeepSpeed op (avoid_jit_ops)
    results = {}
    real_forward = RMSNorm.forward
    for name in ("ours", "detached"):
        if name == "detached":
            RMSNorm.forward = lambda self, x: _RMSNormFunction.apply(
                x, self.weight.detach(), self.eps, self.tile_elements
            )
        model = _z3_model(old_norm=False)
        for mod in model.modules():
            if isinstance(mod, RMSNorm):
                mod.tile_elements = 16 * mod.weight.shape[0]  # several tiles per norm
        ds = {
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": 2,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds)  # fmt: skip
        ids = _z3_ids()
        s, c = engine(input_ids=ids[:, :-1], labels=ids[:, 1:], chunk_size=16)
        engine.backward(s / c)
        grads = {}
        for n, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)
            grads[n] = None if g is None else g.tolist()
        results[name] = {"loss": float(s / c), "grads": grads}
        engine.destroy()
        RMSNorm.forward = real_forward
    if dist.get_rank() == 0:
        (Path(out_dir) / "z3.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_rmsnorm_under_zero3_equals_hf_rmsnorm(tmp_path: Path) -> None:
    from longtrain.train.parallel import free_port

    port, procs = free_port(), []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS="1")  # fmt: skip
        log = open(tmp_path / f"rank{r}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--zero3-worker", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if rcs != [0, 0]:
        logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-4000:] for r in range(2))
        pytest.fail(f"ZeRO-3 workers failed (rc={rcs}):\n{logs}")
    res = json.loads((tmp_path / "z3.json").read_text())
    # The reference: one process, HF's autograd RMSNorm, the same checkpointed model and batch.
    ref = _z3_model(old_norm=True)
    ids = _z3_ids()
    s, c = ref.loss(ids[:, :-1], ids[:, 1:], chunk_size=16)
    loss = s / c
    loss.backward()
    ours = res["ours"]
    assert abs(ours["loss"] - loss.item()) <= 1e-6 * abs(loss.item())
    norms = [n for n, _ in ref.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 2 * 2 + 1
    for n, p in ref.named_parameters():
        err = _rel(torch.tensor(ours["grads"][n]), p.grad)
        assert err <= 1e-6, (n, err)
    # Negative control: a norm weight handed over detached gets no gradient under ZeRO-3.
    bad = res["detached"]["grads"]
    for n in norms:
        g = bad[n]
        assert g is None or _rel(torch.tensor(g), ref.get_parameter(n).grad) > 1e-3, n


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--zero3-worker":
    _z3_worker(sys.argv[2])
