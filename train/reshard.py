"""Changing the shape of a checkpoint: universal conversion (new DP/SP size) and consolidation.

* :func:`ensure_universal` converts a verified DeepSpeed checkpoint once into DeepSpeed's
  universal format (``deepspeed.checkpoint.ds_to_universal``), which any ZeRO partition count
  can load with the optimizer state kept. One rank converts; the others wait on the result's
  commit marker instead of a collective, so a long conversion cannot trip a collective timeout.
* :func:`checkpoint_entries` / :func:`iter_state_dict` rebuild full fp32 tensors from ZeRO 0-3
  shards on the CPU one tensor at a time, reading memory-mapped shard files with
  ``weights_only=True``; peak memory is about one tensor plus ``remap_bytes`` of file pages,
  however large the model. ``longtrain.train.export`` streams them into model directories
  and transformers directories.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from longtrain.model.errors import LongtrainError
from longtrain.train.files import (
    COMMIT,
    UNIVERSAL,
    atomic_write_text,
    hash_file,
    resolve_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "checkpoint_entries",
    "consolidate_state_dict",
    "ensure_universal",
    "iter_state_dict",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- universal


def ensure_universal(path: Path, is_converter: bool, timeout_s: float = 3600.0) -> Path:
    """The universal form of checkpoint ``path`` (``../universal/<name>``), made if missing.

    ``path`` must already be verified. The converter writes into ``<name>.partial`` and renames
    it only after its own COMMIT marker is written; the others wait for that marker. Verify the
    result against it before loading.
    """
    out = path.parent / UNIVERSAL / path.name
    failed = out.with_name(out.name + ".FAILED")
    if is_converter and not (out / COMMIT).is_file():
        partial = out.with_name(out.name + ".partial")
        for p in (partial, out):
            shutil.rmtree(p, ignore_errors=True)
        failed.unlink(missing_ok=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            from deepspeed.checkpoint import ds_to_universal

            args = argparse.Namespace(
                input_folder=str(path),
                output_folder=str(partial),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
            t0 = time.monotonic()
            ds_to_universal.main(args)
            files = {
                f.relative_to(partial).as_posix(): hash_file(f)
                for f in sorted(partial.rglob("*"))
                if f.is_file()
            }
            atomic_write_text(partial / COMMIT, json.dumps({"source": str(path), "files": files}))
            os.replace(partial, out)
            log.warning(
                "converted %s to a universal checkpoint in %.1fs", path, time.monotonic() - t0
            )
        except Exception as e:
            failed.write_text(f"{type(e).__name__}: {e}\n")
            raise LongtrainError(
                f"{path}: conversion to a universal checkpoint failed ({type(e).__name__}: {e}); "
                "resume with the world size the checkpoint was saved with"
            ) from e
    deadline = time.monotonic() + timeout_s
    while not (out / COMMIT).is_file():
        if failed.is_file():
            raise LongtrainError(
                f"{path}: universal conversion failed on rank 0: {failed.read_text().strip()}"
            )
        if time.monotonic() > deadline:
            raise LongtrainError(
                f"{out}: universal conversion did not finish within {timeout_s:.0f}s"
            )
        time.sleep(0.5)
    return out  # the caller verifies it (collectively) before DeepSpeed unpickles it


# ----------------------------------------------------------------------------- consolidation


def _safe_globals() -> list[Any]:
    """The few DeepSpeed classes in optimizer shards, allowed for weights_only=True loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path, mmap: bool = True) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def _rank_key(p: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", p.name)
    return int(m.group(1)) if m else 0


class _Shards:
    """Lazily memory-mapped optimizer shards; mappings are dropped every ``budget`` bytes read
    so that file pages touched so far leave the process (bounded RSS, not just bounded heap)."""

    def __init__(self, files: list[Path], key: str, budget: int) -> None:
        self.files, self.key, self.budget = files, key, budget
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.used = 0

    def group(self, rank: int, g: int) -> torch.Tensor:
        if rank not in self.cache:
            self.cache[rank] = _load(self.files[rank])["optimizer_state_dict"][self.key]
        return self.cache[rank][g]

    def touched(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used > self.budget:
            self.cache.clear()
            self.used = 0
            gc.collect()


Entry = tuple[str, torch.Size, Callable[[], torch.Tensor]]
"""``(name, shape, fetch)``: a tensor known by its shape, materialised only by ``fetch()``."""


def checkpoint_entries(path: Path, remap_bytes: int) -> tuple[list[Entry], dict[str, str]]:
    """Every tensor of a (verified) checkpoint as an :data:`Entry`, in order, plus the
    shared-parameter aliases DeepSpeed stored once (``alias -> source``)."""
    optim = sorted(path.glob("*_optim_states.pt"), key=_rank_key)
    if not optim:  # no ZeRO: the full module lives in the one model file
        model = _load(path / "mp_rank_00_model_states.pt")
        return [
            (
                k,
                v.shape,
                lambda v=v: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True),
            )
            for k, v in model["module"].items()
        ], {}
    osd0 = _load(optim[0])["optimizer_state_dict"]
    stage = int(osd0["zero_stage"])
    world = len(optim)
    counts = osd0["partition_count"]
    count = max(counts) if isinstance(counts, list) else int(counts)
    if count != world:
        raise LongtrainError(
            f"{path}: {world} optimizer shard files but ZeRO partition count {count}"
        )
    if stage <= 2:
        model_files = [path / "mp_rank_00_model_states.pt"]
    else:
        model_files = sorted(path.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_key)
    model = _load(model_files[0])
    entries: list[Entry] = []
    for k, v in model["module"].items():
        if k in model["buffer_names"]:
            entries.append(
                (
                    k,
                    v.shape,
                    lambda v=v: v.to(
                        torch.float32 if v.is_floating_point() else v.dtype, copy=True
                    ),
                )
            )
    frozen = model.get("frozen_param_shapes") or {}
    for k, shape in frozen.items():
        if stage <= 2:
            entries.append(
                (k, shape, lambda k=k: model["frozen_param_fragments"][k].float().clone())
            )
        else:

            def fetch_frozen(k: str = k, shape: torch.Size = shape) -> torch.Tensor:
                frags = [_load(f)["frozen_param_fragments"][k].float() for f in model_files]
                return torch.cat(frags)[: shape.numel()].view(shape).clone()

            entries.append((k, shape, fetch_frozen))
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    shards = _Shards(optim, key, remap_bytes)

    def gather(
        pieces: Callable[[int], list[tuple[int, int, int]]], n: int, shape: torch.Size
    ) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            shards.touched(4 * n)  # may drop the mappings before this tensor's pages come in
            out = torch.empty(n, dtype=torch.float32)
            filled = 0
            for rank in range(world):
                for g, lo, hi in pieces(rank):
                    take = min(hi - lo, n - filled)
                    if take <= 0:
                        break
                    out[filled : filled + take] = shards.group(rank, g)[lo : lo + take]
                    filled += take
            return out.view(shape)

        return fetch

    if stage <= 2:
        # Each group is one flat fp32 vector cut into `world` equal partitions, rank-major;
        # parameters sit back to back in it, each followed by its alignment padding.
        paddings = osd0.get("param_alignment_paddings")
        for g, shapes in enumerate(model["param_shapes"]):
            part = osd0[key][g].numel()
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)

                def pieces(
                    rank: int, start: int = offset, n: int = n, part: int = part, g: int = g
                ) -> list[tuple[int, int, int]]:
                    lo, hi = max(start, rank * part), min(start + n, (rank + 1) * part)
                    return [(g, lo - rank * part, hi - rank * part)] if lo < hi else []

                entries.append((name, torch.Size(shape), gather(pieces, n, torch.Size(shape))))
                offset += n + (paddings[g][i] if paddings is not None else 0)
    else:
        # Every parameter is split into `world` slices of ceil(n/world) (last one padded); rank
        # r's slices of all parameters are concatenated, across its sub-groups, in order.
        sizes = [t.numel() for t in osd0[key]]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        offset = 0
        for shapes in model["param_shapes"]:
            for name, shape in shapes.items():
                n = math.prod(shape)
                pn = math.ceil(n / world)

                def pieces(
                    rank: int, start: int = offset, pn: int = pn
                ) -> list[tuple[int, int, int]]:
                    out = []
                    for g, (s, z) in enumerate(zip(starts, sizes)):
                        lo, hi = max(start, s), min(start + pn, s + z)
                        if lo < hi:
                            out.append((g, lo - s, hi - s))
                    return out

                entries.append((name, torch.Size(shape), gather(pieces, n, torch.Size(shape))))
                offset += pn
    del osd0
    return entries, dict(model.get("shared_params") or {})


REMAP_BYTES = 256 << 20
"""Shard bytes read between drops of the memory mappings: bounds the file pages held (RSS) at
the cost of re-reading each shard's small pickle after every drop."""


def iter_state_dict(
    path: str | Path, dtype: torch.dtype = torch.float32, remap_bytes: int = REMAP_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` of a checkpoint one at a time (tied aliases excluded).

    Works for ZeRO stages 0-3 and any number of shards, on the CPU, after verifying every file
    against COMMIT. Only one full tensor is alive at a time (plus what the caller keeps).
    """
    path = resolve_checkpoint(path)
    verify_checkpoint(path)
    entries, _ = checkpoint_entries(path, remap_bytes)
    for name, _shape, fetch in entries:
        t = fetch()
        yield name, (t.to(dtype) if t.is_floating_point() else t)


def consolidate_state_dict(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Full state dict of a checkpoint on the CPU (ZeRO 0-3), built tensor by tensor.

    Tied parameters (DeepSpeed's ``shared_params``) map to the same tensor object.
    """
    path = resolve_checkpoint(path)
    sd = dict(iter_state_dict(path, dtype))
    for alias, source in checkpoint_entries(path, REMAP_BYTES)[1].items():
        if source in sd and alias not in sd:
            sd[alias] = sd[source]
    return sd
