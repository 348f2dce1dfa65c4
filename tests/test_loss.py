"""Chunked cross-entropy equals F.cross_entropy in value and gradient, and stays chunked."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.model.loss import chunked_cross_entropy, lowp_paths

GEMMS = {"mm", "addmm", "addmm_", "baddbmm", "baddbmm_", "bmm"}


class GemmRecorder(TorchDispatchMode):
    """Every matmul-family op that reaches the dispatcher, with its tensors' dtypes and shapes,
    plus every in-place add (how the CPU path sums a chunk's bf16 GEMM into the fp32 buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple[str, list[torch.dtype], list[tuple[int, ...]]]] = []
        self.adds: list[tuple[torch.dtype, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in GEMMS:
            self.gemms.append((name, [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]))
        elif name == "add_" and len(tensors) == 2:
            self.adds.append((tensors[0].dtype, tensors[1].dtype, tuple(tensors[0].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_cross_entropy(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[0, :5] = -100
    labels[1, 10:30] = -100
    s, n = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    (s * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), labels.view(-1), reduction="sum")
    (ref * 0.5).backward()
    assert n.dtype == torch.int64 and int(n) == 74 - 5 - 20
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_all_masked_is_zero() -> None:
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    s, n = chunked_cross_entropy(h, w, torch.full((4,), -100), chunk_size=3)
    s.backward()
    assert float(s.detach()) == 0.0 and int(n) == 0
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_never_allocates_full_logits() -> None:
    """The largest fp32 block allocated in forward+backward is a (chunk, vocab) one."""
    n, vocab, dim, chunk = 512, 4096, 8, 64
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        s, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
        s.backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    full = n * vocab * 4
    assert biggest <= chunk * vocab * 4 < full / 4, (biggest, full)
    # Control: the plain path does allocate the full logits, so the probe can see them.
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        F.cross_entropy(h @ w.t(), labels, reduction="sum").backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= full


def _matmuls(fn) -> int:  # type: ignore[no-untyped-def]
    """GEMMs of any form (mm, addmm_ into the fp32 gradient, baddbmm...) that ``fn`` runs."""
    rec = GemmRecorder()
    with rec:
        fn()
    return len(rec.gemms)


def test_three_head_matmuls_per_chunk_with_grad_one_without() -> None:
    """Gradients come out of the forward: no logits are recomputed in the backward."""
    n, vocab, dim, chunk = 40, 30, 8, 16  # 3 chunks
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))

    def train() -> None:
        s, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
        s.backward()

    def evaluate() -> None:
        with torch.no_grad():
            chunked_cross_entropy(h, w, labels, chunk_size=chunk)

    mm_train, mm_eval = _matmuls(train), _matmuls(evaluate)
    assert mm_eval == 3, mm_eval  # one logits matmul per chunk, no gradient work
    assert mm_train == 9, mm_train  # logits, d hidden, d weight per chunk; backward adds none


def test_second_backward_is_refused() -> None:
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    s, _ = chunked_cross_entropy(h, w, torch.randint(0, 5, (6,)), chunk_size=4)
    s.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        s.backward()


def _bf16_case(n: int = 192, vocab: int = 96, dim: int = 64):  # type: ignore[no-untyped-def]
    """Inputs already on the bf16 grid, so an fp32/fp64 run sees exactly the same numbers."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=g).bfloat16()
    w = (torch.randn(vocab, dim, generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    return h, w, labels


def _loss_and_grads(h, w, labels, chunk):  # type: ignore[no-untyped-def]
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    s, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    (s * 0.5).backward()
    return s.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 24, 1000])
def test_bf16_matches_fp32_reference(chunk: int) -> None:
    """bf16 compute at dim 64: value and both gradients within bf16 tolerance of fp64 math on
    the same (bf16-representable) inputs, for 1 to 192 chunks."""
    h, w, labels = _bf16_case()
    s, gh, gw = _loss_and_grads(h, w, labels, chunk)
    assert s.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = F.cross_entropy(hd @ wd.t(), labels, reduction="sum")
    (ref * 0.5).backward()
    # The value: logits of bf16 GEMMs (fp32 inside, rounded once), softmax in fp32.
    torch.testing.assert_close(s.double(), ref.detach(), rtol=5e-4, atol=0)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want).abs().max() / want.abs().max())

    for got, want in ((gh, hd.grad), (gw, wd.grad)):
        assert rel(got, want) < 1e-2, rel(got, want)
        # Negative control: a gradient 2% off (a wrong scale, a lost token) fails the bound.
        assert rel(got * 1.02, want) > 1e-2


def test_head_weight_gradient_is_accumulated_in_fp32() -> None:
    """192 one-token chunks: an fp32 buffer keeps the head gradient at bf16's relative error
    (each token's term rounded once); a bf16 buffer, the negative control, does not."""
    h, w, labels = _bf16_case()
    _, _, gw = _loss_and_grads(h, w, labels, chunk=1)
    hd, wd = h.double(), w.double().requires_grad_(True)
    (F.cross_entropy(hd @ wd.t(), labels, reduction="sum") * 0.5).backward()
    want = wd.grad

    def rel(x: torch.Tensor) -> float:
        return float((x.double() - want).abs().max() / want.abs().max())

    # Negative control: the same per-token terms summed in a bf16 buffer.
    p = torch.softmax(hd @ wd.detach().t(), dim=-1)  # (N, V)
    p[torch.arange(len(labels)), labels.clamp(min=0)] -= 1.0
    p[labels == -100] = 0.0
    acc = torch.zeros(w.shape, dtype=torch.bfloat16)
    for t in range(len(labels)):
        acc += (0.5 * p[t, :, None] * hd[t][None, :]).bfloat16()  # (V, dim) term of token t
    assert rel(gw) < 8e-3 < rel(acc), (rel(gw), rel(acc))


def test_bf16_head_gemms_do_not_run_in_fp32() -> None:
    """With a bf16 compute dtype every head GEMM reads bf16, and the fp32 buffer receives the
    head-weight gradient: no (V x C) x (C x dim) GEMM at the fp32 rate."""
    n, vocab, dim, chunk = 96, 80, 64, 32  # 3 chunks
    h, w, labels = _bf16_case(n, vocab, dim)
    paths = lowp_paths(torch.device("cpu"), torch.bfloat16)  # probe outside the recording
    rec = GemmRecorder()
    with rec:
        _loss_and_grads(h, w, labels, chunk)
    assert len(rec.gemms) == 9, rec.gemms  # 3 per chunk: logits, d hidden, d weight
    assert all(dt == torch.bfloat16 for _, dtypes, _ in rec.gemms for dt in dtypes), rec.gemms
    if paths["accumulate"] == "lowp_mm":  # CPU: the chunk's bf16 GEMM is added into fp32
        assert paths == {"accumulate": "lowp_mm", "logits": "lowp_mm"}  # torch 2.13 CPU
        into_grad = [a for a in rec.adds if a[2] == (vocab, dim)]
        assert into_grad == [(torch.float32, torch.bfloat16, (vocab, dim))] * 3, rec.adds

    # Negative control: the recorder does see fp32 head GEMMs when they happen, in this
    # function with fp32 inputs and in the formula this module used to run on bf16 inputs.
    rec32 = GemmRecorder()
    with rec32:
        _loss_and_grads(h.float(), w.float(), labels, chunk)
    assert sum(torch.float32 in dtypes for _, dtypes, _ in rec32.gemms) == 9
    old = GemmRecorder()
    with old:
        grad_logits = torch.softmax((h @ w.t()).float(), dim=-1)  # (C, V) fp32
        _ = grad_logits.t() @ h.float()  # the old head-gradient GEMM
    assert ("mm", [torch.float32, torch.float32], [(vocab, n), (n, dim)]) in old.gemms


def test_lowp_path_probe_checks_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32-output paths are used only where they run AND give the right numbers (the CUDA
    ones cannot run here, so stand-ins play them): a path that drops the accumulator is
    refused, the next correct one is taken, and the loss it computes is unchanged."""
    import longtrain.model.loss as loss

    def drops_acc(acc, a, b):  # type: ignore[no-untyped-def]
        acc.copy_(a.float() @ b.float())  # a broken in-place kernel: overwrites

    def fp32_out(acc, a, b):  # type: ignore[no-untyped-def]
        acc.add_(a.float() @ b.float())

    h, w, labels = _bf16_case(64, 40, 64)
    want = _loss_and_grads(h, w, labels, 16)
    monkeypatch.setattr(loss, "_PATHS", {})
    monkeypatch.setitem(loss._ACC_PATHS, "baddbmm_out_dtype", drops_acc)
    monkeypatch.setitem(loss._ACC_PATHS, "mm_out_dtype", fp32_out)
    assert loss.lowp_paths(torch.device("cpu"), torch.bfloat16)["accumulate"] == "mm_out_dtype"
    got = _loss_and_grads(h, w, labels, 16)
    torch.testing.assert_close(got[0], want[0])
    err = (got[2].float() - want[2].float()).abs().max() / want[2].float().abs().max()
    assert err < 1e-2  # the two paths round differently, one bf16 ulp apart at most
    # Negative control: with both stand-ins broken the probe falls back to the bf16 GEMM.
    monkeypatch.setattr(loss, "_PATHS", {})
    monkeypatch.setitem(loss._ACC_PATHS, "mm_out_dtype", drops_acc)
    assert loss.lowp_paths(torch.device("cpu"), torch.bfloat16)["accumulate"] == "lowp_mm"
    assert loss.lowp_paths(torch.device("cpu"), torch.float32) == {
        "accumulate": "fp32",
        "logits": "fp32",
    }
