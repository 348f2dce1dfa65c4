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
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight gradient sums over all tokens: accumulate it in fp32.
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.t()).float()  # (C, V): the only big tensor alive
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
            if grad_h is not None:
                grad_h[s:e] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)  # (C, dim)
            if grad_w is not None:
                grad_w += grad_logits.t() @ hidden[s:e].float()  # (V, dim)
            del logits, grad_logits
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
