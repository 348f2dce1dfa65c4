"""Sequence-tiled MLP: the MLP's working memory is one tile of tokens, not the local sequence.

At long context the SwiGLU intermediates dominate a block's activation memory: for every token
the MLP holds ``w1 x``, ``silu(w1 x)``, ``w3 x`` and their product, four ``ffn_dim`` vectors
(3.5-4x ``dim`` each in Llama shapes), plus as many gradients in the backward. With activation
checkpointing they are not kept between forward and backward, but they are still all alive at
once while one block recomputes and back-propagates. Tokens do not interact in the MLP, so
:func:`tiled_mlp` runs it ``chunk_size`` tokens at a time: the forward keeps only the MLP's
input, and the backward recomputes each tile's intermediates right before differentiating
them (ALST, Bekman et al. 2025, arXiv:2506.13996, section 3.2; DeepSpeed's ``TiledMLP``).
The cost is one more MLP forward per step.

Unlike DeepSpeed's ``TiledMLP``, the parameters are inputs of the autograd function and their
gradients are summed over the tiles inside it, then returned once. So the engine sees one
gradient per parameter per step, as without tiling: gradient-reduction hooks (DDP, ZeRO-1/2/3)
fire once, with the whole gradient, and need no "not ready yet" flags. The recompute uses
``torch.autograd.grad``, which hands the tile's gradients back instead of accumulating them
into ``.grad`` (no hook fires inside the loop). The MLP module calls its projections without
their module hooks per tile (``FeedForward._swiglu_tile``); a parameter-sharding engine
gathers them once for the whole module instead (ZeRO-3: ``train.offload.gather_mlp_once_zero3``),
so the weights are gathered once per block and pass, whatever the number of tiles. (Under
ZeRO-3 every rank must still run as many tiles as the others: ZeRO-3 checks that all ranks
record the same module order, and a LoRA adapter's dropout module is called per tile. Fixed
windows give that: every rank has micro_batch x seq_len / sp tokens.)

Choice of tile size. A tile's intermediates are about ``chunk_size x ffn_dim`` elements, so a
tile of ``dim`` tokens (ALST's rule) holds as much as one MLP weight matrix: the MLP's working
memory stops growing with the sequence and is comparable to a layer's weights, while each
matmul is still ``dim x dim x ffn_dim`` large, big enough to keep a GPU busy. Smaller tiles
save little more (the block's other activations are ``dim``-wide and already dominate) and
make matmuls inefficient; larger ones give back memory. Tiles are balanced: ``n`` tokens make
``ceil(n / chunk_size)`` tiles whose sizes differ by at most one, so there is no tiny last tile.

Numerics: each token's output is computed by the same kernels as without tiling, so on CPU
(MKL) the forward is bitwise equal as long as tiles have at least 16 tokens (MKL takes another
kernel below that). Parameter gradients are sums over tiles, accumulated in fp32, so they
differ from the one-matmul sum by rounding only (1e-6 relative in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from longtrain.model.errors import LongtrainError

Tile = tuple[int, int]


def tile_bounds(n: int, chunk_size: int) -> list[Tile]:
    """``[start, end)`` of ``ceil(n / chunk_size)`` balanced tiles covering ``n`` tokens."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n == 0:
        return []
    count = -(-n // chunk_size)
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU RNG state and, for an accelerator, that device's: what a dropout inside draws from."""
    if device.type == "cpu":
        return torch.get_rng_state(), None
    return torch.get_rng_state(), torch.get_device_module(device).get_rng_state(device)


class _TiledMLP(torch.autograd.Function):
    """``fn`` over token tiles of ``x``; the backward recomputes one tile at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tiles: list[Tile],
        preserve_rng: bool,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        ctx.fn, ctx.tiles, ctx.params = fn, tiles, params
        ctx.rng = _rng_states(x.device) if preserve_rng else None
        # The recompute must compute the same function: same autocast state as this forward.
        dt = x.device.type
        ctx.autocast = (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
        ctx.save_for_backward(x)  # the only activation kept: the tiles are recomputed from it
        return _run_tiles(fn, x, tiles)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        need_p = ctx.needs_input_grad[4:]
        wrt_params = [p for p, need in zip(ctx.params, need_p) if need]
        dim = x.shape[-1]
        flat = x.detach().reshape(-1, dim)  # (B*T/sp, dim)
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (B*T/sp, dim_out)
        grad_x = torch.empty_like(flat) if need_x else None
        # Summed over tiles in fp32 (a bf16 running sum would round once per tile).
        acc: list[torch.Tensor | None] = [None] * len(wrt_params)
        devices = [] if x.device.type == "cpu" else [x.device]
        device_type = "cuda" if x.device.type == "cpu" else x.device.type
        autocast_type, autocast_on, autocast_dtype = ctx.autocast
        with (
            torch.random.fork_rng(
                devices=devices, enabled=ctx.rng is not None, device_type=device_type
            ),
            torch.autocast(autocast_type, dtype=autocast_dtype, enabled=autocast_on),
        ):
            if ctx.rng is not None:
                # Tiles run in the forward's order from the forward's RNG state, so a dropout
                # inside draws the same masks as in the forward.
                cpu_state, dev_state = ctx.rng
                torch.set_rng_state(cpu_state)
                if dev_state is not None:
                    torch.get_device_module(x.device).set_rng_state(dev_state, x.device)
            for s, e in ctx.tiles:
                with torch.enable_grad():
                    xt = flat[s:e].detach().requires_grad_(need_x)  # (tile, dim)
                    out = ctx.fn(xt)  # (tile, dim_out): the tile's graph, freed below
                    inputs = ([xt] if need_x else []) + wrt_params
                    grads = torch.autograd.grad(out, inputs, g[s:e], allow_unused=True)
                if need_x:
                    gx, grads = grads[0], grads[1:]
                    if gx is None:
                        grad_x[s:e].zero_()
                    else:
                        grad_x[s:e] = gx
                for i, gp in enumerate(grads):
                    if gp is None:
                        continue
                    if acc[i] is None:
                        acc[i] = gp.float() if gp.dtype != torch.float32 else gp
                    else:
                        acc[i].add_(gp)
                del out, grads
        it = iter(acc)
        param_grads = []
        for p, need in zip(ctx.params, need_p):
            gp = next(it) if need else None
            param_grads.append(None if gp is None else gp.to(p.dtype))
        gx_out = None if grad_x is None else grad_x.view(x.shape)  # (B, T/sp, dim)
        return (None, gx_out, None, None, *param_grads)


def _run_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: list[Tile]
) -> torch.Tensor:
    """``fn`` on each tile of ``x``'s tokens, written into one output tensor."""
    flat = x.reshape(-1, x.shape[-1])  # (B*T/sp, dim)
    out: torch.Tensor | None = None
    for s, e in tiles:
        y = fn(flat[s:e])  # (tile, dim_out)
        if out is None:
            out = y.new_empty((flat.shape[0], y.shape[-1]))  # (B*T/sp, dim_out)
        out[s:e] = y
        del y
    assert out is not None
    return out.view(*x.shape[:-1], out.shape[-1])  # (B, T/sp, dim_out)


def tiled_mlp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk_size: int,
    params: Sequence[torch.Tensor] = (),
    preserve_rng: bool = False,
) -> torch.Tensor:
    """``fn(x)`` computed ``chunk_size`` tokens at a time, forward and backward.

    Args:
        fn: a token-wise function (each output row depends only on its input row), e.g. a
            module's own MLP forward. It is called on (tile, dim) slices, once per tile in the
            forward and once more per tile in the backward.
        x: (..., dim) input; all leading dimensions are tokens (B x T/sp under SP).
        chunk_size: most tokens per tile (>= 1).
        params: the parameters ``fn`` uses. The trainable ones get their gradients out of
            this function once, summed over tiles, so they must be listed: a trainable tensor
            used by ``fn`` but missing here gets no gradient. All of them are checked to be
            materialised (not a ZeRO-3 shard that nobody gathered).
        preserve_rng: replay the forward's RNG state in the backward (``fn`` has dropout).

    Returns:
        (..., dim_out), equal to ``fn(x)``.
    """
    n = x.numel() // x.shape[-1]
    tiles = tile_bounds(n, int(chunk_size))
    if len(tiles) <= 1:
        return fn(x)  # one tile is the whole input: nothing to save by recomputing
    if any(p.numel() == 0 for p in params):
        # A ZeRO-3 shard that is not gathered for the whole MLP. Gathering per projection
        # call (per tile) is what this module avoids; and a trainable one's summed gradient
        # would not match the empty shape autograd recorded for it.
        raise LongtrainError(
            "tiled MLP (train.mlp_chunk_size > 0): a parameter of the MLP is empty when the "
            "MLP runs (partitioned by ZeRO-3 and not gathered); the MLP module must gather its "
            "projections for its whole forward and backward "
            "(longtrain.train.offload.gather_mlp_once_zero3)"
        )
    trainable = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or trainable):
        return _run_tiles(fn, x, tiles)  # no backward follows: tiling alone bounds memory
    return _TiledMLP.apply(fn, x, tiles, preserve_rng, *trainable)


def has_active_dropout(module: nn.Module) -> bool:
    """Whether a forward of ``module`` draws random numbers (a dropout with p > 0, training)."""
    return module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def apply_tiled_mlp(model: nn.Module, chunk_size: int) -> int:
    """Set the tile size of every block's MLP (``train.mlp_chunk_size``; 0 turns tiling off).

    Returns the number of MLPs set. Called from ``parallelize()``, before DeepSpeed wraps the
    model; under ZeRO-3 the MLPs must also gather their weights once per block (see
    ``longtrain.train.offload.gather_mlp_once_zero3``).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 0:
        raise LongtrainError(
            f"train.mlp_chunk_size: must be an int >= 0 (0 = off), got {chunk_size!r}; "
            "a good value is the model's dim (e.g. 4096 for an 8B model)"
        )
    n = 0
    for block in model.layers:
        ff = block.feed_forward
        if not hasattr(ff, "chunk_size"):
            raise LongtrainError(
                f"train.mlp_chunk_size: {type(ff).__name__} does not support tiling"
            )
        ff.chunk_size = chunk_size
        n += 1
    return n


__all__ = ["apply_tiled_mlp", "has_active_dropout", "tile_bounds", "tiled_mlp"]
