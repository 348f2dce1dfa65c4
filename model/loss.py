"""Chunked cross-entropy through the LM head.

At long context the logits dominate activation memory: 128K tokens x 128256 vocab in fp32 is
64 GB. :func:`chunked_cross_entropy` computes the head matmul, log-sum-exp and target logit
``chunk_size`` tokens at a time. When gradients are needed, each chunk's logits are turned
into the gradients of the hidden states and of the head weight right there, in the forward
(the fused linear cross-entropy of Liger-Kernel), so the logits are never recomputed: three
head matmuls per token, as without chunking, and never more than one (chunk_size, vocab)
fp32 block alive. The backward pass only scales the stored gradients by the incoming one.

It returns ``(sum, count)`` rather than a mean: the trainer normalises by the number of
unmasked tokens of the whole global step (all DP/SP ranks and micro-batches), which a per-rank
mean would get wrong.

Precision. The three head matmuls run in the compute dtype (the head weight's: bf16 under
DeepSpeed bf16), never as fp32 GEMMs: with TF32 off, a (vocab x chunk) x (chunk x dim) fp32
GEMM runs at a sixteenth of the bf16 tensor-core rate. What stays fp32 is what needs it: the
logits' softmax, and the head-weight gradient, a sum over every token of the step, which is
accumulated in an fp32 buffer. How each low-precision GEMM writes fp32 depends on the backend
(:func:`lowp_paths` says which path runs, probed and checked once per device and dtype):

- CUDA: ``torch.baddbmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds the bf16 GEMM
  into the fp32 gradient in place, fp32 accumulation end to end and no temporary
  (``addmm``'s ``out_dtype`` form refuses an fp32 ``self`` with bf16 matrices); failing that,
  ``torch.mm(a, b, out_dtype=torch.float32)`` plus an fp32 add. Logits come out of
  ``torch.mm(..., out_dtype=torch.float32)``, never rounded to bf16.
- CPU (torch 2.13 has no CPU kernel for the ``out_dtype`` overloads): the bf16 GEMM
  accumulates in fp32 inside the kernel and rounds its (vocab, dim) result to bf16 once per
  chunk; the chunks are summed in the fp32 buffer. The per-token sum within a chunk is
  therefore fp32, and only chunk-sized partial sums see one bf16 rounding each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100

_LOWP = (torch.bfloat16, torch.float16)
_PATHS: dict[tuple[str, torch.dtype], dict[str, str]] = {}


def _baddbmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc3 = acc.unsqueeze(0)  # (1, M, N) view of the fp32 accumulator
    torch.baddbmm(acc3, a.unsqueeze(0), b.unsqueeze(0), out_dtype=torch.float32, out=acc3)


def _mm_fp32_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))


def _mm_lowp_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.add_(torch.mm(a, b))  # fp32 += bf16 (the GEMM's own accumulation is fp32)


_ACC_PATHS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = {
    "baddbmm_out_dtype": _baddbmm_into,
    "mm_out_dtype": _mm_fp32_into,
    "lowp_mm": _mm_lowp_into,
}


def _fp32_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b, out_dtype=torch.float32)


def _lowp_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b).float()


_LOGIT_PATHS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mm_out_dtype": _fp32_logits,
    "lowp_mm": _lowp_logits,
}


def _works(fn: Callable[[], torch.Tensor], want: torch.Tensor) -> bool:
    try:
        got = fn()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return got.dtype == torch.float32 and bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2))


def lowp_paths(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """How the chunked loss's GEMMs write fp32 for ``dtype`` inputs on ``device``.

    ``{"accumulate": ..., "logits": ...}``, each one of ``baddbmm_out_dtype``,
    ``mm_out_dtype``, ``lowp_mm`` (see the module docstring), or ``fp32`` when ``dtype`` is
    fp32. Decided once per (device type, dtype) by trying each path on a tiny problem and
    checking its result (one host sync, the first time only).
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if key in _PATHS:
        return _PATHS[key]
    if dtype not in _LOWP:
        _PATHS[key] = {"accumulate": "fp32", "logits": "fp32"}
        return _PATHS[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g).to(device, dtype)
    b = torch.randn(8, 12, generator=g).to(device, dtype)
    acc0 = torch.randn(16, 12, generator=g).to(device)
    prod = a.float() @ b.float()  # (16, 12) exact enough: inputs are already rounded
    paths = {"accumulate": "lowp_mm", "logits": "lowp_mm"}

    def accumulated(fn: Callable[..., None]) -> torch.Tensor:
        acc = acc0.clone()
        fn(acc, a, b)
        return acc

    for name in ("baddbmm_out_dtype", "mm_out_dtype"):
        if _works(lambda fn=_ACC_PATHS[name]: accumulated(fn), acc0 + prod):
            paths["accumulate"] = name
            break
    if _works(lambda: _fp32_logits(a, b), prod):
        paths["logits"] = "mm_out_dtype"
    _PATHS[key] = paths
    return paths


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a.float(), b.float())  # fp32 inputs: in place, no (V, dim) temporary


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over unmasked tokens of -log softmax(hidden @ weight.T)[label], chunked."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_size: int,
        need_h: bool,
        need_w: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        cdt = weight.dtype  # the compute dtype of all three head GEMMs
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight gradient sums over all tokens: accumulate it in fp32.
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        if cdt in _LOWP:
            paths = lowp_paths(weight.device, cdt)
            logits_of, accumulate = _LOGIT_PATHS[paths["logits"]], _ACC_PATHS[paths["accumulate"]]
        else:  # fp32 (or fp64 in tests): the GEMMs are already at least fp32
            logits_of, accumulate = _lowp_logits, _addmm_into
        wt = weight.t()  # (dim, V) view
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e].to(cdt)  # (C, dim)
            logits = logits_of(h, wt)  # (C, V) fp32: the only big tensor alive
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            lab = labels[s:e]
            valid = lab != IGNORE_INDEX
            target = logits.gather(1, lab.clamp(min=0)[:, None])[:, 0]  # (C,)
            total += torch.where(valid, lse - target, 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            # d(lse - logit[y]) / d logits = softmax - onehot(y), zero for masked tokens.
            grad_logits = logits.sub_(lse[:, None]).exp_()  # (C, V), in place of the logits
            grad_logits.scatter_add_(
                1, lab.clamp(min=0)[:, None], torch.full((e - s, 1), -1.0, device=hidden.device)
            )
            grad_logits *= valid.float()[:, None]
            g_lp = grad_logits.to(cdt)  # (C, V): both gradient GEMMs read it in the compute dtype
            if grad_h is not None:
                grad_h[s:e] = (g_lp @ weight).to(hidden.dtype)  # (C, dim)
            if grad_w is not None:
                accumulate(grad_w, g_lp.t(), h)  # (V, dim) fp32 += (V, C) @ (C, dim)
            del logits, grad_logits, g_lp
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        if getattr(ctx, "consumed", False):
            raise RuntimeError("chunked_cross_entropy supports one backward (no retain_graph)")
        ctx.consumed = True  # the stored gradients are scaled in place, once
        grad_h, grad_w = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grad_out.float()
        if grad_h is not None:
            grad_h = grad_h.mul_(g.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(g).to(ctx.weight_dtype)  # type: ignore[attr-defined]
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of ``hidden @ weight.T`` against ``labels``, and the count.

    Args:
        hidden: (..., dim) final hidden states (after the final norm).
        weight: (vocab, dim) LM head weight (the embedding matrix when tied).
        labels: (...) int64 targets, ALREADY shifted (label[t] is the target of position t);
            ``-100`` marks tokens that contribute nothing.
        chunk_size: tokens per chunk; peak extra memory is about chunk_size * vocab * 8 bytes.

    Returns:
        ``(loss_sum, count)``: fp32 scalar sum over unmasked tokens (differentiable), int64
        scalar number of unmasked tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim)  # (N, dim)
    lab = labels.reshape(-1)  # (N,)
    if h.shape[0] != lab.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} tokens but labels has {lab.shape[0]}")
    # Gradients are computed in the forward, so only when a backward can follow.
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h.requires_grad, grad_on and weight.requires_grad
    loss_sum = _ChunkedCrossEntropy.apply(h, weight, lab, int(chunk_size), need_h, need_w)
    count = (lab != IGNORE_INDEX).sum()
    return loss_sum, count
