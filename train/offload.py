"""Memory ceiling, the distributed side: checkpointed block inputs in host memory, and ZeRO-3
gathering for the sequence-tiled MLP.

Activation offload (``parallel.offload_activations``). With activation checkpointing, what a
block keeps between its forward and its backward is its input, (B, T/sp, dim) per block: at 1M
tokens that is what is left of activation memory, and it grows with depth. :class:`ActivationOffload`
sends each checkpointed block's input to host memory during the forward and brings it back
during the backward, prefetching the next block to be recomputed (blocks run backward in
reverse order) while the current one recomputes (Megatron-Core's fine-grained activation
offloading; ALST's checkpoint offload, Bekman et al. 2025, arXiv:2506.13996). On CUDA the host
buffers are pinned and the copies run on a side stream, ordered by events, so they overlap
compute. On CPU the same code path runs and really copies (host and device are the same
memory there, so it saves nothing; it is tested for equivalence and byte counts).

How it hooks in: ``torch.utils.checkpoint`` (non-reentrant) keeps a block's inputs as autograd
saved tensors, saved before its own hooks take over the inside of the block. A
``torch.autograd.graph.saved_tensors_hooks`` context around the checkpoint call therefore sees
exactly those inputs and nothing from inside the block; :meth:`ActivationOffload.offloading`
moves the block input (and only it: the shared RoPE tables pass through) to host.

Tiled MLP under ZeRO-3 (:func:`gather_mlp_once_zero3`): the tiled MLP calls w1/w2/w3 once per
tile, without their module hooks, and hands their parameters to its autograd function, so the
MLP module itself gathers them, once for its whole forward and once for its backward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtrain.model.errors import LongtrainError

GIB = float(1 << 30)


# ---- tiled MLP under ZeRO-3 ------------------------------------------------------------------


def gather_mlp_once_zero3(model: nn.Module) -> int:
    """Make every block's MLP gather w1/w2/w3 (and their LoRA adapters) once per forward and
    once per backward, for all its tiles; returns the number of parameters registered.

    Call under ZeRO-3 when ``train.mlp_chunk_size > 0``, after LoRA is applied and before
    ``deepspeed.initialize``. The tiled MLP calls its projections without their module hooks
    (those would gather and release the weights at every tile), so each projection's
    parameters become "external parameters" of the MLP module: DeepSpeed gathers them when
    the MLP's forward (or its backward) starts and releases them when it ends. Without this
    the tiled MLP finds its weights still partitioned and says so. The gradients need
    nothing: the tiled MLP returns each parameter's gradient once, as an untiled one would.

    DeepSpeed's other mechanism, ``set_z3_leaf_modules``, is wrong here: a leaf module's
    gradients are reduced by a module backward hook, which fires before the MLP's backward
    when the MLP's input needs no gradient (LoRA on w1/w2/w3 only, first block): it fails.
    """
    import deepspeed

    n = 0
    for block in model.layers:
        ff = block.feed_forward
        for p in ff.parameters():  # the projections' (and adapters') parameters
            deepspeed.zero.register_external_parameter(ff, p)
            n += 1
    return n


# ---- activation offload: sizes and the host-memory check -------------------------------------


def checkpointed_blocks(n_layers: int, mode: str) -> list[int]:
    """Indices of the blocks ``parallel.activation_checkpointing`` recomputes.

    ``full``: every block; ``selective``: every other block, starting with the first; ``none``:
    no block. (The rule of ``train.parallel.apply_activation_checkpointing``.)
    """
    if mode == "none":
        return []
    every = 1 if mode == "full" else 2
    return list(range(0, n_layers, every))


def host_bytes_needed(
    n_layers: int,
    dim: int,
    local_tokens: int,
    micro_batch: int,
    dtype: torch.dtype,
    activation_checkpointing: str,
) -> int:
    """Host bytes one rank holds at the end of a micro-batch's forward with offload on.

    One (micro_batch, local_tokens, dim) block input per checkpointed block; ``local_tokens``
    is the rank's share of the window (seq_len / sp). Micro-batches run forward and backward
    one after the other, so only one micro-batch is on the host at a time.
    """
    blocks = len(checkpointed_blocks(n_layers, activation_checkpointing))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return blocks * micro_batch * local_tokens * dim * itemsize


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of this host in bytes (what can be allocated without swapping), or None
    where there is no such file (not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def check_host_memory(
    needed_per_rank: int,
    ranks_on_host: int,
    other_bytes: int = 0,
    headroom: float = 0.8,
    meminfo: str | Path = "/proc/meminfo",
) -> int | None:
    """Refuse ``parallel.offload_activations`` up front when this host would not hold it.

    All ``ranks_on_host`` ranks of a node share its memory, with whatever else the job keeps
    there (``other_bytes``: offloaded optimizer states or parameters). Only ``headroom`` of
    ``MemAvailable`` is counted on: the page cache, the data loader and pinned-memory
    rounding need the rest. Returns ``MemAvailable`` (None: not checked, no /proc/meminfo).
    """
    avail = mem_available_bytes(meminfo)
    if avail is None:
        return None
    total = needed_per_rank * ranks_on_host + other_bytes
    if total > headroom * avail:
        raise LongtrainError(
            f"parallel.offload_activations: the checkpointed block inputs need "
            f"{needed_per_rank / GIB:.2f} GiB of host memory per rank x {ranks_on_host} ranks on "
            f"this host"
            + (f" + {other_bytes / GIB:.2f} GiB of other offload" if other_bytes else "")
            + f" = {total / GIB:.2f} GiB, more than {headroom:.0%} of the "
            f"{avail / GIB:.2f} GiB available ({meminfo}: MemAvailable); set "
            "parallel.offload_activations=false, or lower data.seq_len or train.micro_batch, or "
            "raise parallel.sp / use more nodes"
        )
    return avail


# ---- activation offload: the saved-tensor hooks ----------------------------------------------


class _Stash:
    """One offloaded block input: its host copy, and its way back to the device."""

    def __init__(self, owner: ActivationOffload, host: torch.Tensor, device: torch.device) -> None:
        self.owner = owner
        self.host: torch.Tensor | None = host
        self.device = device
        self.nbytes = host.numel() * host.element_size()
        self.prefetched: tuple[torch.Tensor, Any] | None = None  # (device tensor, event)
        self.taken = False

    def __del__(self) -> None:
        # A forward whose backward never ran (an exception, a graph dropped) still frees host.
        if self.host is not None:
            self.owner.host_bytes -= self.nbytes


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies a tensor's data without holding it: a saved tensor with this key is
    (a view covering exactly) the same memory, read the same way."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


class ActivationOffload:
    """Checkpointed block inputs to host memory in the forward; back, one block ahead, in the
    backward (``parallel.offload_activations``).

    One instance per model, shared by all its blocks (it orders their prefetches). Use
    :meth:`offloading` around each checkpointed block call (what :func:`apply_activation_offload`
    does). Supports one backward per forward (no ``retain_graph``): a host copy is dropped as
    soon as it is back on the device.

    Counters (this rank): ``offloaded_bytes``/``restored_bytes``/``offloaded_tensors``/
    ``prefetched_tensors`` since :meth:`reset_counters`; ``host_bytes`` held now and
    ``peak_host_bytes`` (the figure to report, equal to :func:`host_bytes_needed`).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # Copies on a side stream overlap the default stream's compute; events order them.
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self.offloaded_bytes = 0
        self.restored_bytes = 0
        self.offloaded_tensors = 0
        self.prefetched_tensors = 0  # restores that found their copy already under way
        self._order: list[weakref.ref[_Stash]] = []  # pack order: the backward runs it in reverse

    def reset_counters(self) -> None:
        """Zero the cumulative counters and the peak (``host_bytes`` is a level, it stays)."""
        self.offloaded_bytes = self.restored_bytes = 0
        self.offloaded_tensors = self.prefetched_tensors = 0
        self.peak_host_bytes = self.host_bytes

    def stats(self) -> dict[str, float]:
        """This rank's figures in GB, for the metrics row."""
        return {
            "offload_host_gb": self.host_bytes / 1e9,
            "offload_peak_host_gb": self.peak_host_bytes / 1e9,
            "offload_moved_gb": self.offloaded_bytes / 1e9,
        }

    @contextlib.contextmanager
    def offloading(self, x: torch.Tensor) -> Iterator[None]:
        """Inside, when autograd saves ``x`` (a checkpoint saving its input), it goes to host.

        Any other saved tensor passes through as usual. With gradients on, ``x`` must be
        saved inside (otherwise the block is not checkpointed and offloading did nothing).

        The hooks recognise ``x`` by its key (data pointer, shape, strides, dtype, device) and
        hold no reference to it: autograd keeps the pack hook with every tensor it saves, so a
        closure over ``x`` would keep the device copy alive until the backward, and offload
        would free nothing.
        """
        key = _tensor_key(x)
        seen = [False]

        def pack(t: torch.Tensor) -> Any:
            if seen[0] or _tensor_key(t) != key:
                return t
            seen[0] = True
            return self._offload(t)

        def unpack(obj: Any) -> torch.Tensor:
            return self._restore(obj) if isinstance(obj, _Stash) else obj

        grad_on = torch.is_grad_enabled()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
        if grad_on and not seen[0]:
            raise LongtrainError(
                "parallel.offload_activations: a block's input was not saved by a checkpoint, "
                "so nothing was offloaded; it needs parallel.activation_checkpointing other "
                "than none, applied before the offload (apply_activation_checkpointing first)"
            )

    # -- forward: device -> host ------------------------------------------------------------

    def _offload(self, t: torch.Tensor) -> _Stash:
        src = t.detach()
        if not src.is_contiguous():
            src = src.contiguous()
        host = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self.cuda)
        stash = _Stash(self, host, src.device)
        self.host_bytes += stash.nbytes  # from here on, the stash gives it back when it goes
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
            with torch.cuda.stream(self.stream):
                # The way back runs on this stream too, so it follows this copy: no event.
                host.copy_(src, non_blocking=True)
            # The allocator must not hand t's memory to the default stream before the copy.
            src.record_stream(self.stream)
        else:
            host.copy_(src)
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        self.offloaded_bytes += stash.nbytes
        self.offloaded_tensors += 1
        self._order = [r for r in self._order if (s := r()) is not None and not s.taken]
        self._order.append(weakref.ref(stash))
        return stash

    # -- backward: host -> device, one block ahead ------------------------------------------

    def _fetch(self, stash: _Stash) -> tuple[torch.Tensor, Any]:
        """Start (CUDA) or do (CPU) the copy of ``stash`` back to the device."""
        host = stash.host
        if host is None:
            raise LongtrainError(
                "parallel.offload_activations supports one backward per forward (no "
                "retain_graph): this block input was already brought back and dropped"
            )
        dev = torch.empty(host.shape, dtype=host.dtype, device=stash.device)
        if not self.cuda:
            dev.copy_(host)
            return dev, None
        # The side stream waits for the default stream (the allocation, earlier work) and
        # already follows the device-to-host copy (same stream).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dev.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        dev.record_stream(self.stream)
        return dev, done

    def _restore(self, stash: _Stash) -> torch.Tensor:
        if stash.prefetched is not None:
            dev, done = stash.prefetched
            stash.prefetched = None
            self.prefetched_tensors += 1
        else:
            dev, done = self._fetch(stash)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.restored_bytes += stash.nbytes
        # The pinned buffer can go now: the caching host allocator keeps it until the copy
        # recorded on it has finished.
        stash.host = None
        stash.taken = True
        self.host_bytes -= stash.nbytes
        self._prefetch_before(stash)
        return dev

    def _prefetch_before(self, stash: _Stash) -> None:
        """Start bringing back the input saved just before ``stash``'s: the block whose
        recompute comes next in the backward."""
        idx = next((i for i, r in enumerate(self._order) if r() is stash), None)
        if idx is None:
            return
        for r in reversed(self._order[:idx]):
            prev = r()
            if prev is None or prev.taken:
                continue
            if prev.prefetched is None and prev.host is not None:
                prev.prefetched = self._fetch(prev)
            return


def apply_activation_offload(
    model: nn.Module, offload: ActivationOffload | None, activation_checkpointing: str
) -> int:
    """Route every checkpointed block's saved input through ``offload``; returns blocks wrapped.

    Call right after ``apply_activation_checkpointing(model, mode)`` with the same mode: it
    wraps the checkpointing wrapper (itself set as the block instance's ``forward``) in
    :meth:`ActivationOffload.offloading`, so the hooks are active while the checkpoint saves
    its inputs and the inside of the block is left to the checkpoint.
    """
    if offload is None:
        return 0
    if activation_checkpointing == "none":
        raise LongtrainError(
            "parallel.offload_activations=true needs parallel.activation_checkpointing=full or "
            "selective (got none): only the inputs of checkpointed blocks are offloaded"
        )
    n = 0
    for i in checkpointed_blocks(len(model.layers), activation_checkpointing):
        block = model.layers[i]
        if "forward" not in vars(block):
            raise LongtrainError(
                f"parallel.offload_activations: block {i} is not checkpointed; call "
                "apply_activation_checkpointing before apply_activation_offload"
            )
        inner = block.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs["x"]
            with offload.offloading(x):
                return _inner(*args, **kwargs)

        block.forward = forward
        n += 1
    return n


__all__ = [
    "ActivationOffload",
    "apply_activation_offload",
    "check_host_memory",
    "checkpointed_blocks",
    "gather_mlp_once_zero3",
    "host_bytes_needed",
    "mem_available_bytes",
]
