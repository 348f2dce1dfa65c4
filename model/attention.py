"""Attention cores: causal attention over windows packed with several documents.

Every core is an ``nn.Module`` with one signature::

    forward(q, k, v, cu_seqlens=None, max_seqlen=None) -> out
    q: (B, T, Hq, D); k, v: (B, T, Hkv, D) with Hq % Hkv == 0; out: (B, T, Hq, D)

``cu_seqlens`` is an int32 (n_docs + 1,) tensor of document offsets into the flattened
B*T tokens (every multiple of T is a boundary, so no document spans two rows); None means
plain causal attention over each row. ``max_seqlen`` is the longest document (a python int)
or None. Attention is causal within each document and never crosses a boundary. The caller
applies RoPE before the core; under Ulysses sequence parallelism the core sees the whole
window for a subset of the heads, so it must not assume anything about the head count.

Cores: ``flash`` (flash-attn varlen kernel), ``torch_varlen``
(``torch.nn.attention.varlen.varlen_attn``), ``sdpa`` (``F.scaled_dot_product_attention`` per
document: memory linear in T), ``reference`` (plain math, float64-safe, for tests), and
``auto`` (the best available one, logged).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtrain.model.errors import LongtrainError

logger = logging.getLogger(__name__)

CORE_NAMES = ("flash", "torch_varlen", "sdpa", "reference", "auto")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention core: bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention core: {q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads"
        )


def doc_offsets(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Document offsets over the flattened B*T tokens as a python list, validated.

    None means one document per row. Host sync: cores that loop over documents need the list.
    """
    total = batch * seq_len
    if cu_seqlens is None:
        return list(range(0, total + 1, seq_len))
    offs = [int(x) for x in cu_seqlens.tolist()]
    if not offs or offs[0] != 0 or offs[-1] != total or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to B*T={total}, got {offs[:8]}{'...' if len(offs) > 8 else ''}"
        )
    present = set(offs)
    bad = [o for o in range(seq_len, total, seq_len) if o not in present]
    if bad:
        raise ValueError(
            f"cu_seqlens must have a boundary at every row start (multiple of T={seq_len}); missing {bad[:4]}"
        )
    return offs


def _full_cu_seqlens(
    cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32)
    return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)


def _max_seqlen(cu: torch.Tensor, max_seqlen: int | None) -> int:
    return int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max().item())


class ReferenceAttention(nn.Module):
    """Plain math with an explicit (B, Hq, T, T) block-diagonal causal mask. Tests only."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        offs = doc_offsets(cu_seqlens, B, T)
        doc = torch.zeros(B * T, dtype=torch.long, device=q.device)
        for i, start in enumerate(offs[:-1]):
            doc[start:] = i  # later starts overwrite: doc[t] = index of t's document
        doc = doc.view(B, T)  # (B, T)
        pos = torch.arange(T, device=q.device)
        allowed = (doc[:, :, None] == doc[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
        rep = Hq // k.shape[2]
        kr = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, Hq, T, D)
        vr = v.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, Hq, T, D)
        qt = q.transpose(1, 2)  # (B, Hq, T, D)
        scores = (qt @ kr.transpose(-1, -2)) / math.sqrt(D)  # (B, Hq, T, T)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vr  # (B, Hq, T, D)
        return out.transpose(1, 2)  # (B, T, Hq, D)


class SDPAAttention(nn.Module):
    """``F.scaled_dot_product_attention`` called once per document with ``is_causal=True``.

    No mask tensor exists at all, so memory is linear in T (the fused kernels never hold a
    (L, L) score matrix). GQA via ``enable_gqa=True``: K/V are not repeated in memory.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        gqa = Hq != k.shape[2]
        if cu_seqlens is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                enable_gqa=gqa,
            )  # (B, Hq, T, D)
            return out.transpose(1, 2)  # (B, T, Hq, D)
        offs = doc_offsets(cu_seqlens, B, T)
        if len(offs) == B + 1:  # one document per row: a single batched call
            return self.forward(q, k, v, None, None)
        qf = q.reshape(B * T, Hq, D)  # (B*T, Hq, D): documents are contiguous slices
        kf = k.reshape(B * T, k.shape[2], D)  # (B*T, Hkv, D)
        vf = v.reshape(B * T, v.shape[2], D)  # (B*T, Hkv, D)
        outs = []
        for s, e in zip(offs[:-1], offs[1:]):
            o = F.scaled_dot_product_attention(
                qf[s:e].transpose(0, 1)[None],  # (1, Hq, L, D)
                kf[s:e].transpose(0, 1)[None],  # (1, Hkv, L, D)
                vf[s:e].transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=gqa,
            )
            outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
        return torch.cat(outs, dim=0).view(B, T, Hq, D)  # (B, T, Hq, D)


def _varlen_fn():  # type: ignore[no-untyped-def]
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


class TorchVarlenAttention(nn.Module):
    """PyTorch's own varlen flash kernel (``torch.nn.attention.varlen.varlen_attn``, CUDA).

    The kernel takes fp16/bf16 only; fp32 inputs are run in bf16 and cast back.
    """

    def __init__(self) -> None:
        super().__init__()
        fn = _varlen_fn()
        params = inspect.signature(fn).parameters
        # torch 2.10+ spells causal as window_size=(-1, 0); the first release had is_causal.
        self._causal_kw = (
            {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        )
        self._has_gqa = "enable_gqa" in params

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        cu = _full_cu_seqlens(cu_seqlens, B, T, q.device)
        m = _max_seqlen(cu, max_seqlen)
        if not self._has_gqa and Hq != k.shape[2]:
            k = k.repeat_interleave(Hq // k.shape[2], dim=2)  # (B, T, Hq, D)
            v = v.repeat_interleave(Hq // v.shape[2], dim=2)
        extra = {"enable_gqa": Hq != k.shape[2]} if self._has_gqa else {}
        out = _varlen_fn()(
            q.reshape(B * T, Hq, D).to(dtype),  # (B*T, Hq, D)
            k.reshape(B * T, k.shape[2], D).to(dtype),  # (B*T, Hkv, D)
            v.reshape(B * T, v.shape[2], D).to(dtype),
            cu,
            cu,
            m,
            m,
            **self._causal_kw,
            **extra,
        )
        return out.view(B, T, Hq, D).to(q.dtype)  # (B, T, Hq, D)


class FlashAttention(nn.Module):
    """flash-attn 2/3 ``flash_attn_varlen_func`` (CUDA); GQA handled natively by the kernel.

    fp32 inputs are run in bf16 and cast back (the kernel takes fp16/bf16 only).
    """

    def __init__(self) -> None:
        super().__init__()
        self._fn = importlib.import_module("flash_attn").flash_attn_varlen_func

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        cu = _full_cu_seqlens(cu_seqlens, B, T, q.device)
        m = _max_seqlen(cu, max_seqlen)
        out = self._fn(
            q.reshape(B * T, Hq, D).to(dtype),  # (B*T, Hq, D)
            k.reshape(B * T, k.shape[2], D).to(dtype),  # (B*T, Hkv, D)
            v.reshape(B * T, v.shape[2], D).to(dtype),
            cu,
            cu,
            m,
            m,
            causal=True,
        )
        return out.view(B, T, Hq, D).to(q.dtype)  # (B, T, Hq, D)


def core_unavailable_reason(name: str) -> str | None:
    """Why core ``name`` cannot run here, or None when it can."""
    if name in ("sdpa", "reference"):
        return None
    if name == "torch_varlen":
        try:
            _varlen_fn()
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if not torch.cuda.is_available():
            return "torch_varlen needs a CUDA GPU (none visible)"
        return None
    if name == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed (pip install longtrain[gpu])"
        if not torch.cuda.is_available():
            return "flash needs a CUDA GPU (none visible)"
        try:
            importlib.import_module("flash_attn")
        except Exception as e:  # a broken build raises all sorts of errors at import
            return f"flash_attn fails to import: {type(e).__name__}: {e}".splitlines()[0]
        return None
    raise LongtrainError(f"attention: unknown core {name!r}; choose one of {', '.join(CORE_NAMES)}")


def available_cores() -> list[str]:
    """Cores that can run on this machine, best first (``reference`` last)."""
    return [
        n
        for n in ("flash", "torch_varlen", "sdpa", "reference")
        if core_unavailable_reason(n) is None
    ]


_CORES: dict[str, type[nn.Module]] = {
    "flash": FlashAttention,
    "torch_varlen": TorchVarlenAttention,
    "sdpa": SDPAAttention,
    "reference": ReferenceAttention,
}


def resolve_core_name(name: str) -> str:
    """``auto`` -> the best available core (logged); other names are checked and returned."""
    if name == "auto":
        avail = available_cores()
        logger.info("attention core: auto -> %s (available: %s)", avail[0], ", ".join(avail))
        return avail[0]
    reason = core_unavailable_reason(name)
    if reason is not None:
        raise LongtrainError(
            f"attention: core {name!r} is not available: {reason}; use 'auto' or 'sdpa'"
        )
    return name


def make_core(name: str) -> nn.Module:
    """A new core by name; ``auto`` picks the first of :func:`available_cores` and logs it."""
    if name == "auto":
        return _CORES[resolve_core_name(name)]()
    reason = core_unavailable_reason(name)
    if reason is not None:
        raise LongtrainError(
            f"attention: core {name!r} is not available: {reason}; use 'auto' or 'sdpa'"
        )
    return _CORES[name]()
