"""Chunked cross-entropy equals F.cross_entropy in value and gradient, and stays chunked."""

import pytest
import torch
import torch.nn.functional as F

from longtrain.model.loss import chunked_cross_entropy


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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::mm")


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
