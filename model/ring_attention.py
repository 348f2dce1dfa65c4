"""Blockwise causal attention with log-sum-exp: the single-device math of ring attention.

Ring attention (Liu et al. 2023; the zigzag load balancing of Brandon et al. 2023, as in
ring-flash-attention and USP) splits one window of ``L`` tokens over ``R`` ring ranks. Each
rank keeps its queries and passes its K/V block around the ring; after ``R`` steps every query
has seen every key, and the partial results are merged with their log-sum-exp. This module
holds everything about that which is single-device math; ``longtrain.train.ring`` adds the
process group and the point-to-point sends.

**Layout** (:func:`ring_portion`). The window is cut into ``2R`` chunks of ``c = L / 2R``
tokens; ring rank ``r`` owns chunks ``r`` and ``2R-1-r`` (its *portion*, ``L / R`` tokens,
head chunk first). Under causal attention an early chunk has little to attend to and a late
one much; pairing chunk ``r`` with its mirror gives every rank the same work.

**Plan** (:func:`ring_plan`). With packed documents, query token ``t`` may attend key ``j``
iff both lie in the same document and ``j <= t``. For one rank the work splits exactly into

- the *diagonal*: each document piece inside each local chunk attends to itself, causally
  (varlen segments over the local portion), at step 0 only;
- *rectangles*: the first document piece of a chunk, when its document began in an earlier
  chunk, attends (non-causally) to that document's tokens in the earlier chunk. Every other
  piece starts its document inside the chunk, so it has nothing earlier to attend to. At most
  one rectangle per query chunk and ring step: the earlier chunk is held by exactly one rank.

Block pairs with nothing to attend (future chunks, other documents) produce no segment at all,
so no mask tensor is ever built and documents of any length need no padding.

**Kernels** (:class:`BlockKernel`). A kernel runs varlen segments (``cu_seqlens_q`` and
``cu_seqlens_k`` may differ) forward with the LSE and backward from the final output and LSE:
flash-attn's varlen functions (:class:`FlashBlockKernel`), PyTorch's own varlen flash kernel
(:class:`TorchVarlenBlockKernel`), or plain PyTorch math, blockwise over query tiles, on any
device (:class:`TorchBlockKernel`, the CPU path and the float64-capable reference).

**Merge** (:func:`merge_partial`): ``lse = logaddexp(lse_a, lse_b)`` and
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``, computed against the larger of
the two LSEs, in fp32 (float64 for float64 inputs): both weights are at most 1, nothing
overflows, and a row that has attended to nothing yet (-inf) takes the other side as it is.

:func:`simulate_ring` runs all ranks' steps of a ring in one process (tests, and the GPU check
of ``bench/gpu_check.py``); it is also a complete attention core on its own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from longtrain.model.attention import Documents, doc_offsets
from longtrain.model.errors import LongtrainError

KERNEL_NAMES = ("torch", "flash", "torch_varlen")


# ---- layout ----------------------------------------------------------------------------------


def ring_chunks(ring_rank: int, ring: int) -> tuple[int, int]:
    """The two chunks (of ``2 * ring``) that ring rank ``ring_rank`` owns: head, then tail."""
    return ring_rank, 2 * ring - 1 - ring_rank


def ring_portion(seq_len: int, ring_rank: int, ring: int) -> np.ndarray:
    """Window positions of ring rank ``ring_rank``'s portion, in its local order (int64).

    The one statement of the zigzag layout: the data loader cuts inputs, labels and positions
    with it (``longtrain.data.loader.sp_shard_indices``) and the plan maps local tokens back
    to window positions with it. ``ring=1`` is the whole window in order.
    """
    if ring < 1 or not 0 <= ring_rank < ring:
        raise ValueError(f"ring_rank={ring_rank} must be in [0, ring={ring})")
    if ring == 1:
        return np.arange(seq_len, dtype=np.int64)  # any length: no chunks to balance
    if seq_len % (2 * ring):
        raise ValueError(f"seq_len={seq_len} is not a multiple of 2 * ring = {2 * ring}")
    c = seq_len // (2 * ring)
    a, b = ring_chunks(ring_rank, ring)
    return np.concatenate([np.arange(a * c, (a + 1) * c), np.arange(b * c, (b + 1) * c)])


# ---- varlen segments and the plan ------------------------------------------------------------


class Segments:
    """Varlen segment boundaries: segment ``i`` pairs queries ``[cu_q[i], cu_q[i+1])`` with keys
    ``[cu_k[i], cu_k[i+1])`` of packed (N, H, D) tensors. Host lists plus int32 device copies
    made once per device (the flash kernels take tensors, the PyTorch kernel lists)."""

    __slots__ = ("cu_q", "cu_k", "max_q", "max_k", "_on")

    def __init__(self, cu_q: list[int], cu_k: list[int]) -> None:
        if len(cu_q) != len(cu_k) or cu_q[0] != 0 or cu_k[0] != 0:
            raise ValueError("segments: cu_q and cu_k must have the same length and start at 0")
        self.cu_q, self.cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
        lq = np.diff(self.cu_q) if len(cu_q) > 1 else np.zeros(1, np.int64)
        lk = np.diff(self.cu_k) if len(cu_k) > 1 else np.zeros(1, np.int64)
        self.max_q, self.max_k = int(lq.max()), int(lk.max())
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.cu_q) - 1

    def pairs(self) -> list[tuple[int, int, int, int]]:
        """``(q0, q1, k0, k1)`` of every segment."""
        q, k = self.cu_q, self.cu_k
        return [(q[i], q[i + 1], k[i], k[i + 1]) for i in range(len(self))]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cu_q, cu_k)`` as int32 tensors on ``device``."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (
                torch.tensor(self.cu_q, dtype=torch.int32, device=device),
                torch.tensor(self.cu_k, dtype=torch.int32, device=device),
            )
        return self._on[device]


@dataclass
class RingStep:
    """The rectangles of one ring step: queries ``q_rows`` of the local portion attend (not
    causally) to rows ``k_rows`` of the K/V block held at that step, packed as ``segments``."""

    q_rows: np.ndarray
    """Flat local query rows (b * L/R + position in the portion), packed order; unique."""
    k_rows: np.ndarray
    """Flat rows of the held K/V block, packed order (a row may repeat across rectangles)."""
    segments: Segments
    """Boundaries over the packed q_rows / k_rows."""
    _on: dict = field(default_factory=dict, repr=False)

    def rows_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_rows, k_rows)`` as int64 tensors on ``device`` (made once)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (
                torch.from_numpy(self.q_rows).to(device),
                torch.from_numpy(self.k_rows).to(device),
            )
        return self._on[device]


@dataclass
class RingPlan:
    """What ring rank ``rank`` computes at each of its ``ring`` steps (module docstring)."""

    batch: int
    """Windows in the micro-batch (rows)."""
    seq_len: int
    """Window length L (the global sequence)."""
    ring: int
    """Ring degree R."""
    rank: int
    """Ring rank r."""
    diag: Segments
    """Document pieces of the local chunks, causal on themselves (step 0)."""
    steps: list[RingStep]
    """``steps[s]``: the rectangles against the block of ring rank ``(rank - s) % ring``."""

    @property
    def local_len(self) -> int:
        """Tokens per row on this rank: L / R."""
        return self.seq_len // self.ring

    def pairs_computed(self) -> int:
        """Segments run in all (diagonal pieces + rectangles): a measure of skipped work."""
        return len(self.diag) + sum(len(s.segments) for s in self.steps)


@functools.lru_cache(maxsize=64)
def ring_plan(offsets: tuple[int, ...], batch: int, seq_len: int, ring: int, rank: int) -> RingPlan:
    """The plan of ring rank ``rank`` for windows with document ``offsets`` (cu_seqlens over the
    flattened ``batch * seq_len`` window tokens, a boundary at every row start).

    Cached: every layer of a forward asks for the same plan.
    """
    L, R = seq_len, ring
    offs = np.asarray(offsets, dtype=np.int64)
    if offs[0] != 0 or offs[-1] != batch * L or np.any(np.diff(offs) <= 0):
        raise ValueError(f"offsets must rise strictly from 0 to batch*seq_len={batch * L}")
    if R == 1:
        # One rank holds the whole window: its documents, causal, and nothing else.
        cu = [int(x) for x in offs]
        none = RingStep(np.zeros(0, np.int64), np.zeros(0, np.int64), Segments([0], [0]))
        return RingPlan(batch=batch, seq_len=L, ring=1, rank=0, diag=Segments(cu, cu), steps=[none])
    if L % (2 * R):
        raise ValueError(f"seq_len={L} is not a multiple of 2 * ring = {2 * R}")
    c, T = L // (2 * R), L // R
    mine = ring_chunks(rank, R)
    # Diagonal: every boundary inside a local chunk starts a piece (plus each chunk start).
    starts: list[int] = []
    for b in range(batch):
        for ci, chunk in enumerate(mine):
            g0 = b * L + chunk * c
            inner = offs[(offs > g0) & (offs < g0 + c)]
            base = b * T + ci * c
            starts.append(base)
            starts.extend(int(x - g0 + base) for x in inner)
    cu_diag = [*starts, batch * T]
    diag = Segments(cu_diag, cu_diag)
    steps = []
    for s in range(R):
        theirs = ring_chunks((rank - s) % R, R)
        q_rows: list[np.ndarray] = []
        k_rows: list[np.ndarray] = []
        for b in range(batch):
            for ci, chunk in enumerate(mine):
                g0 = b * L + chunk * c  # window start of this query chunk (flattened)
                d = int(np.searchsorted(offs, g0, side="right")) - 1
                doc_start, doc_end = int(offs[d]), int(offs[d + 1])
                if doc_start >= g0:
                    continue  # the chunk opens with a new document: nothing earlier to see
                n = min(doc_end, g0 + c) - g0  # the first piece: queries of that document
                lo = hi = -1
                for kj, kchunk in enumerate(theirs):
                    k0 = b * L + kchunk * c
                    a, e = max(doc_start, k0), min(g0, k0 + c)  # the document, before g0
                    if e > a:
                        la, le = b * T + kj * c + (a - k0), b * T + kj * c + (e - k0)
                        # Both chunks of the block hold a part only when the document spans
                        # the whole gap: the parts then meet in the block's local order.
                        assert lo < 0 or la == hi, "a document's keys must be contiguous"
                        lo, hi = (la if lo < 0 else lo), le
                if lo < 0:
                    continue
                q0 = b * T + ci * c
                q_rows.append(np.arange(q0, q0 + n))
                k_rows.append(np.arange(lo, hi))
        lq = [len(x) for x in q_rows]
        lk = [len(x) for x in k_rows]
        steps.append(
            RingStep(
                q_rows=np.concatenate(q_rows) if q_rows else np.zeros(0, np.int64),
                k_rows=np.concatenate(k_rows) if k_rows else np.zeros(0, np.int64),
                segments=Segments([0, *np.cumsum(lq).tolist()], [0, *np.cumsum(lk).tolist()]),
            )
        )
    return RingPlan(batch=batch, seq_len=L, ring=R, rank=rank, diag=diag, steps=steps)


def plan_for(
    cu_seqlens: torch.Tensor | Documents | None, batch: int, seq_len: int, ring: int, rank: int
) -> RingPlan:
    """:func:`ring_plan` from the window's ``cu_seqlens`` (None: one document per row)."""
    return ring_plan(tuple(doc_offsets(cu_seqlens, batch, seq_len)), batch, seq_len, ring, rank)


# ---- the merge -------------------------------------------------------------------------------


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (module docstring).

    out, block_out: (N, H, D); lse, block_lse: (H, N); all in the accumulation dtype.
    Returns the merged ``(out, lse)``; a row with -inf on both sides stays (0, -inf).
    """
    m = torch.maximum(lse, block_lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # both -inf: weights 0, not NaN
    w_a, w_b = torch.exp(lse - m), torch.exp(block_lse - m)  # (H, N), each <= 1
    total = w_a + w_b
    new_lse = m + torch.log(total)  # -inf where nothing was attended
    inv = torch.where(total > 0, 1.0 / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    a = (w_a * inv).t()[..., None]  # (N, H, 1)
    b = (w_b * inv).t()[..., None]  # (N, H, 1)
    return out * a + block_out * b, new_lse


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of outputs, LSEs and gradients: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- kernels ---------------------------------------------------------------------------------


class BlockKernel:
    """Varlen attention over segments, forward with LSE and backward from a given LSE.

    ``forward(q, k, v, seg, causal, scale) -> (out, lse)``: q (Nq, Hq, D), k/v (Nk, Hkv, D)
    packed; out (Nq, Hq, D) and lse (Hq, Nq) in the accumulation dtype. ``causal`` applies to
    square segments only (the diagonal); rectangles are never causal.
    ``backward(dout, q, k, v, out, lse, seg, causal, scale) -> (dq, dk, dv)`` with ``out``
    and ``lse`` the FINAL (merged) results of the queries, so each segment's share of the
    gradient is exact on its own; results in the accumulation dtype.
    """

    name = "base"

    def forward(self, q, k, v, seg: Segments, causal: bool, scale: float):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, seg: Segments, causal: bool, scale: float):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class TorchBlockKernel(BlockKernel):
    """Plain PyTorch math, one segment and one tile of query rows at a time.

    Scores exist for one tile only (``tile_elems`` scores at most), so memory stays linear in
    the sequence; computed in fp32 (float64 for float64 inputs) whatever the input dtype.
    """

    name = "torch"

    def __init__(self, tile_elems: int = 1 << 20) -> None:
        self.tile_elems = tile_elems

    def _tiles(self, q0: int, q1: int, m: int, heads: int) -> list[tuple[int, int]]:
        rows = max(1, self.tile_elems // max(1, m * heads))
        return [(t, min(q1, t + rows)) for t in range(q0, q1, rows)]

    @staticmethod
    def _scores(qs, ks, scale, causal, row0, n_seg, m):  # type: ignore[no-untyped-def]
        """(Hkv, g, n, m) scores of a query tile against a segment's keys, masked if causal."""
        s = torch.matmul(qs, ks.transpose(-1, -2)[:, None]) * scale  # (Hkv, g, n, m)
        if causal:
            # Bottom-right aligned: query i of the segment sees keys j <= i + (m - n_seg).
            i = torch.arange(row0, row0 + qs.shape[2], device=qs.device)[:, None]
            j = torch.arange(m, device=qs.device)[None, :]
            s = s.masked_fill(j > i + (m - n_seg), float("-inf"))
        return s

    def forward(self, q, k, v, seg, causal, scale):  # type: ignore[no-untyped-def]
        acc = acc_dtype(q.dtype)
        Nq, Hq, D = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv
        out = torch.zeros(Nq, Hq, D, dtype=acc, device=q.device)
        lse = torch.full((Hq, Nq), float("-inf"), dtype=acc, device=q.device)
        for q0, q1, k0, k1 in seg.pairs():
            m = k1 - k0
            if m == 0 or q1 == q0:
                continue
            ks = k[k0:k1].to(acc).transpose(0, 1)  # (Hkv, m, D)
            vs = v[k0:k1].to(acc).transpose(0, 1)  # (Hkv, m, D)
            for t0, t1 in self._tiles(q0, q1, m, Hq):
                n = t1 - t0
                qs = q[t0:t1].to(acc).view(n, Hkv, g, D).permute(1, 2, 0, 3)  # (Hkv, g, n, D)
                s = self._scores(qs, ks, scale, causal, t0 - q0, q1 - q0, m)
                ls = torch.logsumexp(s, dim=-1)  # (Hkv, g, n)
                p = torch.exp(s - torch.where(torch.isfinite(ls), ls, 0.0)[..., None])
                o = torch.matmul(p, vs[:, None])  # (Hkv, g, n, D)
                out[t0:t1] = o.permute(2, 0, 1, 3).reshape(n, Hq, D)  # (n, Hq, D)
                lse[:, t0:t1] = ls.reshape(Hq, n)  # (Hq, n): heads first, as flash
        return out, lse

    def backward(self, dout, q, k, v, out, lse, seg, causal, scale):  # type: ignore[no-untyped-def]
        acc = acc_dtype(q.dtype)
        Nq, Hq, D = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv
        dq = torch.zeros(Nq, Hq, D, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        # D_i = sum_d dO_i * O_i: the softmax backward's row term, from the final output.
        delta = (dout.to(acc) * out.to(acc)).sum(-1).t().contiguous()  # (Hq, Nq)
        for q0, q1, k0, k1 in seg.pairs():
            m = k1 - k0
            if m == 0 or q1 == q0:
                continue
            ks = k[k0:k1].to(acc).transpose(0, 1)  # (Hkv, m, D)
            vs = v[k0:k1].to(acc).transpose(0, 1)  # (Hkv, m, D)
            for t0, t1 in self._tiles(q0, q1, m, Hq):
                n = t1 - t0
                qs = q[t0:t1].to(acc).view(n, Hkv, g, D).permute(1, 2, 0, 3)  # (Hkv, g, n, D)
                do = dout[t0:t1].to(acc).view(n, Hkv, g, D).permute(1, 2, 0, 3)  # (Hkv, g, n, D)
                ls = lse[:, t0:t1].reshape(Hkv, g, n)  # (Hkv, g, n)
                s = self._scores(qs, ks, scale, causal, t0 - q0, q1 - q0, m)
                p = torch.exp(s - torch.where(torch.isfinite(ls), ls, 0.0)[..., None])
                p = torch.where(torch.isfinite(ls)[..., None], p, 0.0)  # (Hkv, g, n, m)
                dv[k0:k1] += torch.einsum("hgnm,hgnd->mhd", p, do)  # (m, Hkv, D)
                dp = torch.matmul(do, vs.transpose(-1, -2)[:, None])  # (Hkv, g, n, m)
                ds = p * (dp - delta[:, t0:t1].reshape(Hkv, g, n)[..., None])  # (Hkv, g, n, m)
                dqs = torch.matmul(ds, ks[:, None]) * scale  # (Hkv, g, n, D)
                dq[t0:t1] += dqs.permute(2, 0, 1, 3).reshape(n, Hq, D)  # (n, Hq, D)
                dk[k0:k1] += torch.einsum("hgnm,hgnd->mhd", ds, qs) * scale  # (m, Hkv, D)
        return dq, dk, dv


def _half(x: torch.Tensor) -> torch.Tensor:
    """The flash kernels take fp16/bf16 only: other dtypes run in bf16."""
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)


def _lse_heads_first(lse: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """A varlen kernel's LSE as (H, N) fp32; refuses layouts we cannot read unambiguously."""
    if tuple(lse.shape) == (heads, n):
        return lse.float()
    if tuple(lse.shape) == (n, heads):
        return lse.float().t()  # (N, H) -> (H, N)
    raise LongtrainError(
        f"ring attention: the varlen kernel returned an LSE of shape {tuple(lse.shape)}, "
        f"expected ({heads}, {n}) (flash-attn >= 2.4 layout); upgrade flash-attn or use "
        "model.attention=sdpa"
    )


class FlashBlockKernel(BlockKernel):
    """flash-attn 2: ``flash_attn_varlen_func(..., return_attn_probs=True)`` for the forward
    with its LSE, ``flash_attn_interface._flash_attn_varlen_backward`` for the backward (its
    arguments are passed by name: they moved between releases)."""

    name = "flash"

    def __init__(self) -> None:
        fa = importlib.import_module("flash_attn")
        iface = importlib.import_module("flash_attn.flash_attn_interface")
        self._fwd = fa.flash_attn_varlen_func
        self._bwd = iface._flash_attn_varlen_backward
        # 2.7+ registers it as a torch custom op; its Python function keeps the names.
        fn = getattr(self._bwd, "_init_fn", self._bwd)
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            params = []
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self._bwd_params = {p.name for p in params if p.kind in named}
        if not {"dout", "softmax_lse", "cu_seqlens_q", "causal"} <= self._bwd_params:
            raise LongtrainError(
                f"flash_attn {getattr(fa, '__version__', '?')}: _flash_attn_varlen_backward has "
                "no readable signature; the ring uses PyTorch's varlen kernel instead"
            )

    def forward(self, q, k, v, seg, causal, scale):  # type: ignore[no-untyped-def]
        cu_q, cu_k = seg.on(q.device)
        out, lse, _ = self._fwd(
            _half(q), _half(k), _half(v), cu_q, cu_k, seg.max_q, seg.max_k,
            dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True,
        )  # fmt: skip
        return out.float(), _lse_heads_first(lse, q.shape[1], q.shape[0])

    def backward(self, dout, q, k, v, out, lse, seg, causal, scale):  # type: ignore[no-untyped-def]
        cu_q, cu_k = seg.on(q.device)
        qh, kh, vh = _half(q).contiguous(), _half(k).contiguous(), _half(v).contiguous()
        dq, dk, dv = torch.empty_like(qh), torch.empty_like(kh), torch.empty_like(vh)
        args = {
            "dout": _half(dout).to(qh.dtype).contiguous(), "q": qh, "k": kh, "v": vh,
            "out": out.to(qh.dtype).contiguous(), "softmax_lse": lse.float().contiguous(),
            "dq": dq, "dk": dk, "dv": dv, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": seg.max_q, "max_seqlen_k": seg.max_k, "dropout_p": 0.0,
            "softmax_scale": scale, "causal": causal, "window_size": (-1, -1),
            "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
            "alibi_slopes": None, "deterministic": False, "rng_state": None,
        }  # fmt: skip
        self._bwd(**{k_: v_ for k_, v_ in args.items() if k_ in self._bwd_params})
        return dq.float(), dk.float(), dv.float()


class TorchVarlenBlockKernel(BlockKernel):
    """PyTorch's varlen flash kernel: ``varlen_attn(..., return_aux=AuxRequest(lse=True))``
    forward and its registered backward op ``torch.ops.torch_attn._varlen_attn_backward``."""

    name = "torch_varlen"

    def __init__(self) -> None:
        from torch.nn.attention import varlen

        if "return_aux" not in inspect.signature(varlen.varlen_attn).parameters:
            raise LongtrainError(f"torch {torch.__version__}: varlen_attn returns no LSE")
        self._mod = varlen
        self._bwd = torch.ops.torch_attn._varlen_attn_backward

    def forward(self, q, k, v, seg, causal, scale):  # type: ignore[no-untyped-def]
        cu_q, cu_k = seg.on(q.device)
        out, lse = self._mod.varlen_attn(
            _half(q), _half(k), _half(v), cu_q, cu_k, seg.max_q, seg.max_k,
            return_aux=self._mod.AuxRequest(lse=True), scale=scale,
            window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        return out.float(), _lse_heads_first(lse, q.shape[1], q.shape[0])

    def backward(self, dout, q, k, v, out, lse, seg, causal, scale):  # type: ignore[no-untyped-def]
        cu_q, cu_k = seg.on(q.device)
        qh = _half(q).contiguous()
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: unused
        dq, dk, dv = self._bwd(
            dout.to(qh.dtype).contiguous(), qh, _half(k).contiguous(), _half(v).contiguous(),
            out.to(qh.dtype).contiguous(), lse.float().contiguous(), cu_q, cu_k,
            seg.max_q, seg.max_k, causal, rng, scale, [-1, 0] if causal else [-1, -1],
        )  # fmt: skip
        return dq.float(), dk.float(), dv.float()


def make_block_kernel(name: str) -> BlockKernel:
    """A kernel by name: ``torch`` (any device), ``flash`` or ``torch_varlen`` (CUDA)."""
    if name == "torch":
        return TorchBlockKernel()
    if name == "flash":
        return FlashBlockKernel()
    if name == "torch_varlen":
        return TorchVarlenBlockKernel()
    raise LongtrainError(f"ring attention: unknown kernel {name!r}; one of {KERNEL_NAMES}")


def kernel_for_core(core_name: str) -> tuple[BlockKernel, str]:
    """The ring kernel for a model attention core name, and why it was chosen (for the log).

    flash/flash3 -> flash-attn 2's varlen kernel (FA3 exposes no backward from a given LSE)
    or PyTorch's varlen kernel; torch_varlen -> PyTorch's; sdpa/reference -> plain PyTorch
    math (the CPU path). A GPU kernel that cannot load falls back to the next, with the reason.
    """
    order = {
        "flash3": ["flash", "torch_varlen"],
        "flash": ["flash", "torch_varlen"],
        "torch_varlen": ["torch_varlen"],
    }.get(core_name, [])
    reasons = []
    if torch.cuda.is_available():
        for name in order:
            try:
                return make_block_kernel(name), f"core {core_name} -> ring kernel {name}"
            except Exception as e:  # a missing or broken build: say so and try the next
                reasons.append(f"{name}: {type(e).__name__}: {e}".splitlines()[0])
    why = f"core {core_name} -> ring kernel torch"
    return TorchBlockKernel(), why + (f" ({'; '.join(reasons)})" if reasons else "")


# ---- one ring step ---------------------------------------------------------------------------


def step_forward(
    plan: RingPlan,
    s: int,
    q: torch.Tensor,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    kernel: BlockKernel,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring step ``s`` forward: local queries against the block held at step ``s``.

    q (B*L/R, Hq, D) flat local portion; k_blk, v_blk (B*L/R, Hkv, D) the block of ring rank
    ``(plan.rank - s) % R``; out (B*L/R, Hq, D) and lse (Hq, B*L/R) the running results (None
    before step 0, which starts them from the diagonal: it covers every query).
    """
    if s == 0:
        out, lse = kernel.forward(q, k_blk, v_blk, plan.diag, True, scale)
    assert out is not None and lse is not None
    st = plan.steps[s]
    if len(st.segments):
        qi, ki = st.rows_on(q.device)
        o, ls = kernel.forward(
            q.index_select(0, qi), k_blk.index_select(0, ki), v_blk.index_select(0, ki),
            st.segments, False, scale,
        )  # fmt: skip
        mo, ml = merge_partial(out.index_select(0, qi), lse.index_select(1, qi), o, ls)
        out.index_copy_(0, qi, mo)
        lse.index_copy_(1, qi, ml)
    return out, lse


def step_backward(
    plan: RingPlan,
    s: int,
    dout: torch.Tensor,
    q: torch.Tensor,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk_blk: torch.Tensor,
    dv_blk: torch.Tensor,
    kernel: BlockKernel,
    scale: float,
) -> None:
    """Ring step ``s`` backward: adds this step's share to ``dq`` (local queries) and to
    ``dk_blk``/``dv_blk`` (the held block's), all in the accumulation dtype, in place.
    ``out``/``lse`` are the final forward results of the local queries."""
    if s == 0:
        g = kernel.backward(dout, q, k_blk, v_blk, out, lse, plan.diag, True, scale)
        dq += g[0]
        dk_blk += g[1]
        dv_blk += g[2]
    st = plan.steps[s]
    if len(st.segments):
        qi, ki = st.rows_on(q.device)
        gq, gk, gv = kernel.backward(
            dout.index_select(0, qi), q.index_select(0, qi), k_blk.index_select(0, ki),
            v_blk.index_select(0, ki), out.index_select(0, qi), lse.index_select(1, qi),
            st.segments, False, scale,
        )  # fmt: skip
        dq.index_add_(0, qi, gq.to(dq.dtype))
        dk_blk.index_add_(0, ki, gk.to(dk_blk.dtype))  # a key row may serve two rectangles
        dv_blk.index_add_(0, ki, gv.to(dv_blk.dtype))


# ---- the whole ring in one process ------------------------------------------------------------


class _SimulatedRing(torch.autograd.Function):
    """Every rank's steps of a ring, one after the other, on the whole window."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, ring, kernel, scale):  # type: ignore[no-untyped-def]
        B, L, Hq, D = q.shape
        Hkv, T = k.shape[2], L // ring
        idx = [torch.from_numpy(ring_portion(L, r, ring)).to(q.device) for r in range(ring)]

        def local(x: torch.Tensor, r: int) -> torch.Tensor:
            return x.index_select(1, idx[r]).reshape(B * T, x.shape[2], D)  # (B*L/R, H, D)

        out = torch.empty(B, L, Hq, D, dtype=q.dtype, device=q.device)
        lses = []
        for r in range(ring):
            plan = ring_plan(offsets, B, L, ring, r)
            o = lse = None
            for s in range(ring):
                src = (r - s) % ring
                o, lse = step_forward(plan, s, local(q, r), local(k, src), local(v, src), o, lse,
                                      kernel, scale)  # fmt: skip
            out[:, idx[r]] = o.to(q.dtype).view(B, T, Hq, D)  # (B, L/R, Hq, D) into the window
            lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.meta = (offsets, ring, kernel, scale, Hkv)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def]
        q, k, v, out, *lses = ctx.saved_tensors
        offsets, ring, kernel, scale, Hkv = ctx.meta
        B, L, Hq, D = q.shape
        T = L // ring
        acc = acc_dtype(q.dtype)
        idx = [torch.from_numpy(ring_portion(L, r, ring)).to(q.device) for r in range(ring)]

        def local(x: torch.Tensor, r: int) -> torch.Tensor:
            return x.index_select(1, idx[r]).reshape(B * T, x.shape[2], D)  # (B*L/R, H, D)

        dq = torch.zeros(B, L, Hq, D, dtype=acc, device=q.device)
        dkv = [torch.zeros(2, B * T, Hkv, D, dtype=acc, device=q.device) for _ in range(ring)]
        for r in range(ring):
            plan = ring_plan(offsets, B, L, ring, r)
            dq_r = torch.zeros(B * T, Hq, D, dtype=acc, device=q.device)
            for s in range(ring):
                src = (r - s) % ring
                step_backward(plan, s, local(dout, r), local(q, r), local(k, src), local(v, src),
                              local(out, r), lses[r], dq_r, dkv[src][0], dkv[src][1], kernel,
                              scale)  # fmt: skip
            dq[:, idx[r]] = dq_r.view(B, T, Hq, D)  # (B, L/R, Hq, D) into the window
        dk = torch.zeros(B, L, Hkv, D, dtype=acc, device=q.device)
        dv = torch.zeros(B, L, Hkv, D, dtype=acc, device=q.device)
        for r in range(ring):
            dk[:, idx[r]] = dkv[r][0].view(B, T, Hkv, D)  # (B, L/R, Hkv, D) into the window
            dv[:, idx[r]] = dkv[r][1].view(B, T, Hkv, D)  # (B, L/R, Hkv, D)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def simulate_ring(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Documents | None = None,
    ring: int = 1,
    kernel: BlockKernel | None = None,
) -> torch.Tensor:
    """Causal document attention computed as a ring of ``ring`` ranks would, in one process.

    q (B, L, Hq, D), k/v (B, L, Hkv, D) in window order, ``cu_seqlens`` over the B*L tokens
    (the contract of ``longtrain.model.attention``); out (B, L, Hq, D), differentiable.
    Exactly the per-rank plans, steps, merges and gradient accumulation of the distributed
    ring (``longtrain.train.ring``), without the sends.
    """
    B, L = q.shape[:2]
    offsets = tuple(doc_offsets(cu_seqlens, B, L))
    kernel = kernel or TorchBlockKernel()
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _SimulatedRing.apply(q, k, v, offsets, ring, kernel, scale)


class BlockwiseAttention(torch.nn.Module):
    """A model attention core (``longtrain.model.attention`` contract) on the blockwise kernel:
    the ring of one rank. Memory linear in T; useful as the CPU reference of the ring path."""

    def __init__(self, kernel: BlockKernel | None = None) -> None:
        super().__init__()
        self.kernel = kernel or TorchBlockKernel()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        return simulate_ring(q, k, v, cu_seqlens, 1, self.kernel)
