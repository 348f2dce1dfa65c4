"""A Llama-shaped decoder-only transformer on one device.

Names follow torchtitan (``tok_embeddings``, ``layers[i].attention.wq``, ``feed_forward.w1``...);
the map to transformers' names lives in ``longtrain.model.hf``. Parallelism is applied from
outside: sequence parallelism replaces ``layers[i].attention.core`` (see
:meth:`Transformer.set_attention_core`), DeepSpeed shards the parameters.

Build big models without allocating them::

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from longtrain.model.attention import (
    Documents,
    as_documents,
    doc_offsets,
    make_core,
    resolve_core_name,
)
from longtrain.model.config import ModelConfig
from longtrain.model.loss import chunked_cross_entropy
from longtrain.model.rope import RotaryEmbedding, apply_rotary
from longtrain.model.tiled import has_active_dropout, tile_bounds, tiled_mlp

NORM_TILE_ELEMENTS = 1 << 22
"""Elements (tokens x dim) of one :class:`RMSNorm` tile: its fp32 temporaries are a few tiles
(16 MB each; 1024 tokens at dim 4096), whatever the sequence length."""


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``, keeping for the
    backward only ``x`` (its own dtype) and ``1/rms`` (fp32, one value per token).

    Autograd through that expression (HF Llama's ``LlamaRMSNorm``) keeps an fp32 copy of
    ``x`` (bf16 inputs), the normalised value and ``1/rms``, and its backward allocates fp32
    gradients of the whole input along both paths. Here forward and backward run over
    balanced token tiles (``tile`` elements at most), in fp32; each token's arithmetic is the
    expression's own in the forward (same operations, same order: the output is bitwise the
    same), and the closed form of the input gradient in the backward (Zhang & Sennrich 2019,
    "Root Mean Square Layer Normalization", section 3; the form fused kernels use, e.g.
    Apex's ``fused_rms_norm``). With ``n = x * r``, ``r = 1/rms``, ``gn = g * weight``:

        dL/dx = r * (gn - n * mean(gn * n)),    dL/dweight = sum over tokens of g * n,

    where ``n`` in ``dL/dweight`` is the normalised value rounded to ``x``'s dtype, as the
    forward multiplied it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, tile: int
    ) -> torch.Tensor:
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim)  # (tokens, dim): tokens = B*T/sp
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        r = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)  # (tokens, 1)
        for s, e in tile_bounds(x2.shape[0], max(1, tile // dim)):
            xs = x2[s:e]
            xf = xs.float()  # (tile, dim): a copy, unless x is fp32
            r[s:e] = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            # The same multiplication, in place on a copy, never on x itself.
            xf = xf * r[s:e] if xs.dtype == torch.float32 else xf.mul_(r[s:e])
            torch.mul(weight, xf.to(x.dtype), out=y[s:e])
        ctx.save_for_backward(x, weight, r)
        ctx.tile = tile
        return y.view(*x.shape[:-1], dim)  # (..., dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, r = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim)  # (tokens, dim)
        g2 = g.reshape(-1, dim)  # (tokens, dim)
        w32 = weight.float()
        gx = torch.empty_like(x2) if need_x else None
        gw = torch.zeros(dim, dtype=torch.float32, device=x.device) if need_w else None
        for s, e in tile_bounds(x2.shape[0], max(1, ctx.tile // dim)):
            xs, gs, rs = x2[s:e], g2[s:e], r[s:e]
            n = torch.mul(xs, rs)  # (tile, dim) fp32: the forward's x.float() * r
            buf = torch.empty_like(n)  # (tile, dim) fp32, reused by every product below
            if gw is not None:
                buf.copy_(n.to(x.dtype))  # what the forward multiplied the weight by
                gw += buf.mul_(gs).sum(0)
            if gx is not None:
                c = torch.mul(n, w32, out=buf).mul_(gs).mean(-1, keepdim=True)  # mean(gn * n)
                gn = torch.mul(gs, w32, out=buf)  # (tile, dim): the normalised value's gradient
                gx[s:e] = gn.sub_(n.mul_(c)).mul_(rs)
        gx = gx.view(x.shape) if gx is not None else None  # (..., dim)
        gw = gw.to(weight.dtype) if gw is not None else None
        return gx, gw, None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as in HF Llama:
    ``LlamaRMSNorm``), with a lean backward (:class:`_RMSNormFunction`).

    Autograd keeps the input and the fp32 ``1/rms`` (``a*h + 4`` bytes per token); the fp32
    work of forward and backward runs ``tile_elements`` at a time. The weight is handed to the
    function as the module's own parameter, so a sharding engine's module hooks (ZeRO-3)
    gather it for the forward and the backward as for any other module.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.tile_elements = NORM_TILE_ELEMENTS
        """Most elements (tokens x dim) per tile of the fp32 work (``NORM_TILE_ELEMENTS``)."""

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.tile_elements)


class Attention(nn.Module):
    """Grouped-query attention: projections + RoPE here, the softmax part in ``self.core``."""

    def __init__(self, cfg: ModelConfig, core: nn.Module) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)
        self.core = core

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape  # T is the local sequence length (T/sp under sequence parallelism)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T/sp, Hq, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T/sp, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T/sp, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # (B, T/sp, Hq, D)
        return self.wo(out.reshape(B, T, -1))  # (B, T/sp, Hq*D) -> (B, T/sp, dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``, sequence-tiled when ``chunk_size > 0``.

    Tiled, the forward runs ``chunk_size`` tokens at a time and the backward recomputes each
    tile, so the MLP's intermediates exist for one tile only (``longtrain.model.tiled``).
    Works as well with LoRA adapters on w1/w2/w3 (their parameters are the trainable ones).
    """

    def __init__(self, dim: int, hidden: int, chunk_size: int = 0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.chunk_size = chunk_size
        """Most tokens per tile (``train.mlp_chunk_size``); 0 computes the whole input at once."""

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP itself, on any number of tokens: (..., dim) -> (..., dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def _swiglu_tile(self, x: torch.Tensor) -> torch.Tensor:
        # The projections' forward without their module hooks, which would run once per tile:
        # a sharding engine gathers their weights once for this whole module instead (ZeRO-3,
        # see tiled_mlp), and its record of the module order stays independent of the tiles.
        w1, w2, w3 = self.w1.forward, self.w2.forward, self.w3.forward
        return w2(F.silu(w1(x)) * w3(x))  # (tile, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_size <= 0:
            return self.swiglu(x)
        # Every parameter the tiles use is handed over: the trainable ones get their gradient
        # summed over the tiles inside, and come out once (see tiled_mlp).
        params = list(self.parameters())
        return tiled_mlp(self._swiglu_tile, x, self.chunk_size, params, has_active_dropout(self))


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, cfg: ModelConfig, core: nn.Module) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, core)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        # Documents by keyword: ZeRO-3's module hooks walk positional inputs and warn on objects.
        h = x + self.attention(
            self.attention_norm(x), cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        )
        return h + self.feed_forward(self.ffn_norm(h))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) for the input projections, Normal(0, out_std) for the residual
        outputs (wo, w2), ones for the norms; one fixed RNG order (ZeRO-3 init relies on it)."""
        a, f = self.attention, self.feed_forward
        for lin in (a.wq, a.wk, a.wv, f.w1, f.w3):
            nn.init.normal_(lin.weight, std=std)
        for lin in (a.wo, f.w2):
            nn.init.normal_(lin.weight, std=out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


def positions_from_cu_seqlens(
    cu_seqlens: torch.Tensor | Documents, batch: int, seq_len: int
) -> torch.Tensor:
    """(B, T) positions restarting at 0 at every document start in ``cu_seqlens``."""
    docs = as_documents(cu_seqlens)
    offs = doc_offsets(docs, batch, seq_len)
    device = docs.cu_seqlens.device
    idx = torch.arange(batch * seq_len, device=device)
    starts = torch.tensor(offs[:-1], device=device)
    doc = torch.searchsorted(starts, idx, right=True) - 1  # (B*T,) document of each token
    return (idx - starts[doc]).view(batch, seq_len)  # (B, T)


class Transformer(nn.Module):
    """Llama-shaped decoder. ``attention`` names the core (see ``longtrain.model.attention``)."""

    def __init__(self, cfg: ModelConfig, attention: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.attention_core = resolve_core_name(attention)  # resolved once, logged once
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(
            Block(cfg, make_core(self.attention_core)) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    # ---- construction --------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (works after ``to_empty``); uses torch's RNG.

        Normal(0, init_std) for embeddings and projections; the residual output projections
        (wo, w2) use init_std / sqrt(2 * n_layers) so the residual stream's variance does not
        grow with depth (GPT-2, Megatron-LM); norms start at 1.
        """
        for _params, fill in self.init_units():
            fill()
        self.rope.reset_parameters()

    def init_units(self) -> list[tuple[list[nn.Parameter], Callable[[], None]]]:
        """``(parameters, fill)`` pairs in the one fixed initialisation order.

        :meth:`init_weights` runs every ``fill`` in turn; a sharded builder (ZeRO-3) gathers
        each unit's parameters, fills them on one rank and scatters them, one unit at a time,
        so the order and the RNG draws are the same whichever way the model is built.
        Subclasses with more parameters (a task head) append their own units.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        emb = self.tok_embeddings.weight
        units: list[tuple[list[nn.Parameter], Callable[[], None]]] = [
            ([emb], lambda: nn.init.normal_(emb, std=std))
        ]
        for block in self.layers:
            units.append((list(block.parameters()), lambda b=block: b.init_weights(std, out_std)))
        units.append(([self.norm.weight], self.norm.reset_parameters))
        if self.output is not None:
            out = self.output.weight
            units.append(([out], lambda: nn.init.normal_(out, std=std)))
        return units

    def set_attention_core(self, fn: str | nn.Module | Callable[[nn.Module], nn.Module]) -> None:
        """Replace every layer's attention core.

        ``fn`` is a core name (``sdpa``...), one module shared by all layers, or a callable
        that receives a layer's current core and returns its replacement (e.g. a Ulysses
        wrapper: ``model.set_attention_core(lambda core: DistributedAttention(core, group))``).
        """
        for block in self.layers:
            if isinstance(fn, str):
                new = make_core(resolve_core_name(fn))
            elif isinstance(fn, nn.Module):
                new = fn
            else:
                new = fn(block.attention.core)
            block.attention.core = new
        if isinstance(fn, str):
            self.attention_core = resolve_core_name(fn)

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, dim) LM head weight: the embedding matrix when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    # ---- forward ---------------------------------------------------------------------------

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) hidden states after the final norm.

        ``position_ids`` default to 0..T-1 per row, or to positions restarting at every
        document start when ``cu_seqlens`` is given. Under sequence parallelism pass the
        local shard's ids and positions and the full window's ``cu_seqlens``.

        ``cu_seqlens`` becomes one :class:`~longtrain.model.attention.Documents` shared by all
        layers, so its offsets reach the host at most once per forward (and again not at all
        when activation checkpointing recomputes a block: the same object is passed back in).
        """
        B, T = input_ids.shape  # T is local (T/sp) under sequence parallelism
        docs = as_documents(cu_seqlens, max_seqlen)
        if position_ids is None:
            if docs is not None:
                position_ids = positions_from_cu_seqlens(docs, B, T)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids, max_seqlen)  # (B, T/sp, D) fp32 each
        h = self.tok_embeddings(input_ids)  # (B, T/sp, dim)
        for block in self.layers:
            h = block(h, cos, sin, cu_seqlens=docs, max_seqlen=max_seqlen)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Documents | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        chunk_size: int = 1024,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with ``labels``, the chunked loss ``(sum, count)`` instead.

        The ``labels`` path exists so a wrapping engine (DeepSpeed) that only calls
        ``forward`` gets the memory-saving loss; it is the same as :meth:`loss`.
        """
        if labels is not None:
            return self.loss(input_ids, labels, position_ids, cu_seqlens, max_seqlen, chunk_size)
        h = self.hidden(input_ids, position_ids, cu_seqlens, max_seqlen)
        return F.linear(h, self.head_weight)  # (B, T/sp, vocab)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        chunk_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum fp32 scalar, count int64 scalar)`` over tokens whose label != -100.

        ``labels`` (B, T) are already shifted: label[t] is the target for input[t].
        Never materialises fp32 logits for the whole sequence (see ``longtrain.model.loss``).
        """
        h = self.hidden(input_ids, position_ids, cu_seqlens, max_seqlen)  # (B, T/sp, dim)
        return chunked_cross_entropy(h, self.head_weight, labels, chunk_size)
