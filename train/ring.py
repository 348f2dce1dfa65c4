"""Ring attention across the ranks of a ring group: K/V blocks and their gradients travel.

The single-device math (the zigzag layout, the per-rank plan of block pairs, the varlen
kernels with LSE, the fp32 merge) is ``longtrain.model.ring_attention``; this module adds the
process group. Hybrid sequence parallelism (USP's layout, see ``parallel.py``) nests it inside
Ulysses: ``UlyssesAttention(RingAttention(kernel))``; the ring then runs on the Ulysses rank's
heads over its ring rank's whole portion.

Forward, ring rank ``r`` of ``R``: at step ``s`` it holds the K/V block of rank ``(r - s) % R``;
it posts the send of that block to ``r + 1`` and the receive of the next one from ``r - 1``
(``isend``/``irecv`` batched, so NCCL runs them on its own stream while the kernel computes),
computes the step's block pairs, merges them into its running (out, lse), then waits for the
next block. ``R - 1`` sends per layer.

Backward: the same walk. A block's dK/dV accumulator travels with it: at each step the rank
adds its share (computed into a fresh buffer while the accumulator is still in flight, so the
transfer overlaps compute), adds what the block's earlier holders sent, and passes the sum on.
After the last step one more hop brings every accumulator home to its block's owner. K/V go
around again instead of being saved in the forward (a rank keeps only its own block), so the
activation memory is that of the local tokens. dK/dV travel in fp32 (float64 for float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtrain.model.attention import Documents
from longtrain.model.ring_attention import (
    BlockKernel,
    RingPlan,
    acc_dtype,
    kernel_for_core,
    plan_for,
    step_backward,
    step_forward,
)

KV_TAG, DKV_TAG = 0, 1
"""P2P tags of the two kinds of messages in flight at once in the backward (gloo matches by
tag; NCCL keeps issue order, which is the same on every rank)."""


class RingComm:
    """Sends to the next ring rank and receives from the previous one, asynchronously."""

    def __init__(self, group: Any, ring: int, ring_rank: int) -> None:
        self.group, self.ring, self.ring_rank = group, ring, ring_rank
        self.next = (ring_rank + 1) % ring
        self.prev = (ring_rank - 1) % ring

    def exchange(self, send: torch.Tensor, tag: int = KV_TAG) -> _Pending:
        """Post ``send`` -> next and a receive of the same shape <- previous; returns at once."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, group=self.group, tag=tag, group_peer=self.next),
            dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=self.prev),
        ]
        return _Pending(recv, send, dist.batch_isend_irecv(ops))


class _Pending:
    """An exchange in flight: keeps the send buffer alive until both transfers are done."""

    def __init__(self, recv: torch.Tensor, send: torch.Tensor, works: list[Any]) -> None:
        self.recv, self.send, self.works = recv, send, works

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self.send = None
        return self.recv


class _RingAttentionFn(torch.autograd.Function):
    """Ring attention of this rank's queries against every rank's keys (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, comm, kernel, scale):  # type: ignore[no-untyped-def]
        B, T, Hq, D = q.shape  # T = L/R: this ring rank's portion (zigzag head + tail chunk)
        Hkv, R = k.shape[2], plan.ring
        qf = q.reshape(B * T, Hq, D)  # (B*L/R, Hq, D)
        # K and V travel as one message per step.
        kv = torch.stack([k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)])  # (2, B*L/R, Hkv, D)
        out = lse = None
        for s in range(R):
            pending = comm.exchange(kv, KV_TAG) if s + 1 < R else None  # overlaps the step
            out, lse = step_forward(plan, s, qf, kv[0], kv[1], out, lse, kernel, scale)
            if pending is not None:
                kv = pending.wait()
        o = out.to(q.dtype).view(B, T, Hq, D)  # (B, L/R, Hq, D)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (plan, comm, kernel, scale)
        return o

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def]
        q, k, v, o, lse = ctx.saved_tensors
        plan, comm, kernel, scale = ctx.meta
        B, T, Hq, D = q.shape  # T = L/R local
        Hkv, R = k.shape[2], plan.ring
        acc = acc_dtype(q.dtype)
        qf, of = q.reshape(B * T, Hq, D), o.reshape(B * T, Hq, D)  # (B*L/R, Hq, D)
        df = dout.contiguous().reshape(B * T, Hq, D)  # (B*L/R, Hq, D)
        kv = torch.stack([k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)])  # (2, B*L/R, Hkv, D)
        dq = torch.zeros(B * T, Hq, D, dtype=acc, device=q.device)
        arriving = None  # the accumulator of the block held next, on its way from r - 1
        for s in range(R):
            pending = comm.exchange(kv, KV_TAG) if s + 1 < R else None
            dkv = torch.zeros(2, B * T, Hkv, D, dtype=acc, device=q.device)  # (2, B*L/R, Hkv, D)
            step_backward(plan, s, df, qf, kv[0], kv[1], of, lse, dq, dkv[0], dkv[1], kernel, scale)
            if arriving is not None:
                dkv += arriving.wait()  # the earlier holders' shares of this block
            if R > 1:
                arriving = comm.exchange(dkv, DKV_TAG)  # on to r + 1; after step R-1: home
            if pending is not None:
                kv = pending.wait()
        if arriving is not None:
            dkv = arriving.wait()  # this rank's own block, back after a full turn
        dk = dkv[0].view(B, T, Hkv, D).to(k.dtype)  # (B, L/R, Hkv, D)
        dv = dkv[1].view(B, T, Hkv, D).to(v.dtype)  # (B, L/R, Hkv, D)
        dq_out = dq.view(B, T, Hq, D).to(q.dtype)  # (B, L/R, Hq, D)
        return dq_out, dk, dv, None, None, None, None


class RingAttention(nn.Module):
    """A model attention core run as ring attention over ``group``; same contract as a core.

    In: q (B, L/R, Hq', D), k/v (B, L/R, Hkv', D): this ring rank's portion of the window in
    its local (zigzag) order, for the heads this rank holds (all of them, or a Ulysses slice).
    Out: (B, L/R, Hq', D). ``cu_seqlens``/``max_seqlen`` describe the whole window (global
    offsets), as for every core. The wrapped core is kept for its name only: the ring computes
    with the block kernel that matches it (``kernel_for_core``).
    """

    def __init__(
        self,
        core: nn.Module,
        group: Any,
        ring: int,
        ring_rank: int,
        core_name: str,
        kernel: BlockKernel | None = None,
    ) -> None:
        super().__init__()
        self.inner = core
        self.ring, self.ring_rank = ring, ring_rank
        self.comm = RingComm(group, ring, ring_rank)
        if kernel is None:
            kernel, self.kernel_reason = kernel_for_core(core_name)
        else:
            self.kernel_reason = f"ring kernel {kernel.name} (given)"
        self.kernel = kernel

    def plan(self, cu_seqlens: torch.Tensor | Documents | None, batch: int, local: int) -> RingPlan:
        """This rank's plan for windows of ``local * ring`` tokens (cached across layers)."""
        return plan_for(cu_seqlens, batch, local * self.ring, self.ring, self.ring_rank)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        B, T = q.shape[:2]  # T = L/R local
        plan = self.plan(cu_seqlens, B, T)
        scale = 1.0 / math.sqrt(q.shape[-1])
        return _RingAttentionFn.apply(q, k, v, plan, self.comm, self.kernel, scale)


def ring_p2p_bytes(
    cfg: Any, seq_len: int, micro_batch: int, ulysses: int, ring: int, dtype_bytes: int
) -> dict[str, int]:
    """Point-to-point bytes that ring attention sends per rank for one micro-batch (pure).

    ``cfg`` is a ``ModelConfig`` (``n_layers``, ``n_kv_heads``, ``head_dim``); ``ulysses`` x
    ``ring`` is the SP degree; ``dtype_bytes`` the compute dtype's size (2 for bf16).
    A rank holds ``max(n_kv_heads, ulysses) / ulysses`` K/V heads (K/V are replicated up to
    the Ulysses degree) for ``seq_len / ring`` tokens of each of ``micro_batch`` windows; one
    such K/V pair is a *block*. Per layer, the forward sends the block ``ring - 1`` times; the
    backward sends it ``ring - 1`` times again (K/V are not kept from the forward) plus its
    dK/dV accumulator ``ring`` times, in fp32 (the last hop brings it home). Every rank sends
    as much as it receives. Returned (bytes per rank; ``*_layer`` for one layer):

    - ``steps``: ring steps per layer and pass (``ring``), ``sends_forward`` /
      ``sends_backward``: messages per rank for all layers;
    - ``block_bytes``: one K/V block; ``forward_bytes`` / ``backward_bytes`` for all layers,
      and ``forward_bytes_layer`` / ``backward_bytes_layer``; ``step_bytes``: both together
      (one forward and one backward of the micro-batch);
    - ``buffer_bytes``: the most device memory the ring's buffers hold at once (one layer at a
      time: the held block and the one arriving, and in the backward three fp32 dK/dV
      accumulators -- this step's, the one arriving, the one leaving): 2 blocks + 3 gradient
      blocks.

    Activation checkpointing replays the forward in the backward: a planner adds
    ``forward_bytes`` once more per recomputed pass. With ``ring=1`` everything is 0 (but
    ``steps``, 1).
    """
    if ring < 1 or ulysses < 1 or seq_len % ring:
        raise ValueError(f"ring={ring}, ulysses={ulysses}, seq_len={seq_len}: not a layout")
    kv_heads = max(cfg.n_kv_heads, ulysses) // ulysses
    elems = micro_batch * (seq_len // ring) * kv_heads * cfg.head_dim  # one of K or V
    block = 2 * elems * dtype_bytes
    grad_block = 2 * elems * max(4, dtype_bytes)  # accumulated in fp32 (float64 for float64)
    fwd = (ring - 1) * block
    bwd = (ring - 1) * block + (ring * grad_block if ring > 1 else 0)
    L = cfg.n_layers
    return {
        "steps": ring,
        "block_bytes": block if ring > 1 else 0,
        "forward_bytes_layer": fwd,
        "backward_bytes_layer": bwd,
        "forward_bytes": L * fwd,
        "backward_bytes": L * bwd,
        "step_bytes": L * (fwd + bwd),
        "buffer_bytes": 2 * block + 3 * grad_block if ring > 1 else 0,
        "sends_forward": L * (ring - 1),
        "sends_backward": L * (2 * ring - 1) if ring > 1 else 0,
    }
