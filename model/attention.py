"""Attention cores: causal attention over windows packed with several documents.

Every core is an ``nn.Module`` with one signature::

    forward(q, k, v, cu_seqlens=None, max_seqlen=None) -> out
    q: (B, T, Hq, D); k, v: (B, T, Hkv, D) with Hq % Hkv == 0; out: (B, T, Hq, D)

``cu_seqlens`` holds the document offsets into the flattened B*T tokens (every multiple of T
is a boundary, so no document spans two rows): an int32 (n_docs + 1,) tensor, or the
:class:`Documents` that :meth:`Transformer.hidden` builds once per forward from that tensor
and hands to every layer. None means plain causal attention over each row. ``max_seqlen`` is
the longest document (a python int) or None; a :class:`Documents` carries its own. Attention is
causal within each document and never crosses a boundary. The caller applies RoPE before the
core; under Ulysses sequence parallelism the core sees the whole window for a subset of the
heads (DeepSpeed's ``DistributedAttention`` passes ``cu_seqlens``/``max_seqlen`` through to the
core untouched), so it must not assume anything about the head count.

Why :class:`Documents`: the cores that loop over documents (``sdpa``, ``reference``) need the
offsets as python ints, and reading a CUDA tensor on the host is a device sync. Read per layer,
that is n_layers syncs and pipeline bubbles per forward; a :class:`Documents` reads them at
most once per forward (and not at all for the varlen kernels when ``max_seqlen`` is known).

Cores: ``flash3`` (FlashAttention-3, ``flash_attn_interface.flash_attn_varlen_func``, Hopper
only), ``flash`` (flash-attn 2 ``flash_attn.flash_attn_varlen_func``), ``torch_varlen``
(``torch.nn.attention.varlen.varlen_attn``), ``sdpa`` (``F.scaled_dot_product_attention`` per
document: memory linear in T), ``reference`` (plain math, float64-safe, for tests), and ``auto``
(the best available one, logged: ``flash3`` first on compute capability 9.x).
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

CORE_NAMES = ("flash3", "flash", "torch_varlen", "sdpa", "reference", "auto")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention core: bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention core: {q.shape[2]} query heads not a multiple of {k.shape[2]} kv heads"
        )


def _check_offsets(offs: list[int]) -> None:
    if not offs or offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0, got {offs[:8]}{'...' if len(offs) > 8 else ''}"
        )


class Documents:
    """The document boundaries of one forward, shared by every layer's attention core.

    Wraps the int32 ``cu_seqlens`` tensor (kept on its device, for the varlen kernels) and
    reads the host-side offsets from it lazily, at most once: the single place a core causes
    a device-to-host sync. Cores validate the offsets against their own (B, T) view, which
    under sequence parallelism is the whole window, not the caller's local shard.
    """

    __slots__ = ("cu_seqlens", "_max_seqlen", "_offsets", "_rows_ok", "_on")

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be a 1-D tensor, got {cu_seqlens!r}")
        self.cu_seqlens = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.int()
        self._max_seqlen = None if max_seqlen is None else int(max_seqlen)
        self._offsets: list[int] | None = None
        self._rows_ok: set[tuple[int, int]] = set()
        self._on: dict[torch.device, torch.Tensor] = {self.cu_seqlens.device: self.cu_seqlens}

    def offsets(self) -> list[int]:
        """Document offsets as python ints (read from the device on the first call only)."""
        if self._offsets is None:
            offs = [int(x) for x in self.cu_seqlens.tolist()]  # the one host sync
            _check_offsets(offs)
            self._offsets = offs
        return self._offsets

    def max_seqlen(self) -> int:
        """The longest document: the caller's value, else computed from the offsets."""
        if self._max_seqlen is None:
            offs = self.offsets()
            self._max_seqlen = max(b - a for a, b in zip(offs, offs[1:]))
        return self._max_seqlen

    def on(self, device: torch.device) -> torch.Tensor:
        """The int32 offsets tensor on ``device``, copied there once (a CPU tensor handed to a
        GPU model costs one copy per forward, not one per layer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._on:
            self._on[device] = self.cu_seqlens.to(device=device)
        return self._on[device]

    def row_offsets(self, batch: int, seq_len: int) -> list[int]:
        """The offsets, checked to cover B*T tokens with a boundary at every row start."""
        offs = self.offsets()
        if (batch, seq_len) in self._rows_ok:
            return offs
        total = batch * seq_len
        if offs[-1] != total:
            raise ValueError(f"cu_seqlens must end at B*T={total}, got {offs[-1]}")
        present = set(offs)
        bad = [o for o in range(seq_len, total, seq_len) if o not in present]
        if bad:
            raise ValueError(
                f"cu_seqlens must have a boundary at every row start (multiple of T={seq_len}); missing {bad[:4]}"
            )
        self._rows_ok.add((batch, seq_len))
        return offs


def as_documents(
    cu_seqlens: torch.Tensor | Documents | None, max_seqlen: int | None = None
) -> Documents | None:
    """``cu_seqlens`` as a :class:`Documents` (itself when it already is one; None stays None)."""
    if cu_seqlens is None or isinstance(cu_seqlens, Documents):
        return cu_seqlens
    return Documents(cu_seqlens, max_seqlen)


def doc_offsets(cu_seqlens: torch.Tensor | Documents | None, batch: int, seq_len: int) -> list[int]:
    """Document offsets over the flattened B*T tokens as a python list, validated.

    None means one document per row. A tensor is read on the host (a device sync); a
    :class:`Documents` is read once and then reused.
    """
    docs = as_documents(cu_seqlens)
    if docs is None:
        return list(range(0, batch * seq_len + 1, seq_len))
    return docs.row_offsets(batch, seq_len)


def _varlen_args(
    cu_seqlens: torch.Tensor | Documents | None,
    max_seqlen: int | None,
    batch: int,
    seq_len: int,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """(int32 offsets on ``device``, max_seqlen) for a varlen kernel; no host sync when the
    longest document is known (given, or already read by an earlier layer)."""
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        return cu, seq_len
    docs = as_documents(cu_seqlens, max_seqlen)
    return docs.on(device), docs.max_seqlen()


class ReferenceAttention(nn.Module):
    """Plain math with an explicit (B, Hq, T, T) block-diagonal causal mask. Tests only."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
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
        cu_seqlens: torch.Tensor | Documents | None = None,
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
        offs = doc_offsets(cu_seqlens, B, T)  # read on the host once per forward, not per layer
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
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        cu, m = _varlen_args(cu_seqlens, max_seqlen, B, T, q.device)
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
    """flash-attn 2 ``flash_attn.flash_attn_varlen_func`` (CUDA); GQA handled natively.

    fp32 inputs are run in bf16 and cast back (the kernel takes fp16/bf16 only).
    """

    module = "flash_attn"
    """The import name of the kernel's module."""

    def __init__(self) -> None:
        super().__init__()
        self._fn = importlib.import_module(self.module).flash_attn_varlen_func

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        _check_shapes(q, k, v)
        B, T, Hq, D = q.shape
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        cu, m = _varlen_args(cu_seqlens, max_seqlen, B, T, q.device)
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
        if isinstance(out, tuple):  # (out, softmax_lse) in the FA3 betas
            out = out[0]
        return out.view(B, T, Hq, D).to(q.dtype)  # (B, T, Hq, D)


class FlashAttention3(FlashAttention):
    """FlashAttention-3 ``flash_attn_interface.flash_attn_varlen_func`` (Hopper, CUDA 9.x).

    The module comes from flash-attn's ``hopper/`` build (``pip install`` there, or the
    ``flash_attn_3`` wheel). Its signature is FA2's for what we pass: q, k, v, cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k positionally, then ``causal`` by keyword (FA3
    inserts ``seqused_q/k`` after the lengths, so nothing else may be positional). The 2.7-era
    betas return ``(out, softmax_lse)``, later releases ``out`` unless ``return_attn_probs``:
    both are taken. fp32 inputs are run in bf16 and cast back; GQA handled natively.
    """

    module = "flash_attn_interface"


def _import_reason(module: str, label: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken build raises all sorts of errors at import
        return f"{label} fails to import: {type(e).__name__}: {e}".splitlines()[0]
    return None


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
        return _import_reason("flash_attn", "flash_attn")
    if name == "flash3":
        if importlib.util.find_spec("flash_attn_interface") is None:
            return (
                "flash_attn_interface (FlashAttention-3) is not installed (build flash-attn's "
                "hopper/ directory)"
            )
        if not torch.cuda.is_available():
            return "flash3 needs a CUDA GPU (none visible)"
        major, minor = torch.cuda.get_device_capability()
        if major != 9:
            # FA3's kernels are Hopper's (wgmma, TMA); elsewhere flash-attn 2 is the kernel.
            return (
                f"flash3 needs a Hopper GPU (compute capability 9.x), this one is {major}.{minor}"
            )
        return _import_reason("flash_attn_interface", "flash_attn_interface")
    raise LongtrainError(f"attention: unknown core {name!r}; choose one of {', '.join(CORE_NAMES)}")


def available_cores() -> list[str]:
    """Cores that can run on this machine, best first (``reference`` last).

    ``flash3`` leads where it runs at all (Hopper): there it is the fastest kernel.
    """
    return [
        n
        for n in ("flash3", "flash", "torch_varlen", "sdpa", "reference")
        if core_unavailable_reason(n) is None
    ]


_CORES: dict[str, type[nn.Module]] = {
    "flash3": FlashAttention3,
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
