"""``longtrain eval``: long-context evaluation of a checkpoint, a model dir or an HF directory.

Tasks: ``ppl`` writes the validation loss by position bucket (``ppl_by_position.json`` and
``.png``); ``passkey`` writes retrieval accuracy by context length x depth (``passkey.json``
and the heatmap ``passkey.png``).

Distributed: ``torchrun --nproc_per_node N -m longtrain.launch eval ... --sp P [--ring R]``
splits every window (and every passkey prompt) over ``P`` sequence-parallel ranks with the
same Ulysses / ring wrapping and token layout as training (``parallelize``,
``longtrain.data.loader.sp_shard_indices``), for contexts whose activations do not fit one device; the ``N / P`` data-parallel groups share the windows /
samples. Every rank holds the whole model (evaluation keeps no optimizer state; SP splits the
activations, which is what grows with the context). Only rank 0 writes and prints. The model
runs on the GPU in bf16 when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from longtrain.data.loader import load_manifest, validation_batches
from longtrain.data.passkey import passkey_grid
from longtrain.data.tokenizer import Tokenizer, check_tokenizer_hash
from longtrain.model.errors import LongtrainError
from longtrain.train.artifacts import Artifact, open_artifact
from longtrain.train.eval.passkey import eval_passkey, plot_passkey
from longtrain.train.eval.ppl import eval_ppl, plot_ppl
from longtrain.train.files import CHECKPOINTS, TOKENIZER_DIR
from longtrain.train.parallel import (
    build_topology,
    env_world,
    init_distributed,
    parallelize,
    setup_accelerator_env,
    sp_layout_problem,
)

if TYPE_CHECKING:
    from longtrain.train.parallel import Topology

EXTRAPOLATION_LIMIT = 8
"""Contexts above this many times the model's max_seq_len are refused (hours of compute for
a number that says nothing); above 1x they run with a notice (an extrapolation test)."""


class _HFEncoder:
    """``encode(text)`` over a transformers tokenizer, without special tokens."""

    def __init__(self, directory: str) -> None:
        from transformers import AutoTokenizer  # heavy; only passkey on HF dirs needs it

        self.tok = AutoTokenizer.from_pretrained(directory)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def _parse_list(text: str, kind: type, option: str) -> list[Any]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LongtrainError(f"{option} {text}: expected comma-separated numbers") from None
    if not values:
        raise LongtrainError(f"{option}: empty list")
    return values


def _default_out(art: Artifact, given: str) -> Path:
    if art.kind == "hf":
        return Path("runs") / "eval" / Path(given).name
    if art.kind == "model_dir":
        return art.path / "eval"
    run_dir = art.path.parent.parent if art.path.parent.name == CHECKPOINTS else art.path
    return run_dir / "eval" / art.path.name


def _check_length(n: int, max_seq_len: int, option: str, main: bool) -> None:
    if n > EXTRAPOLATION_LIMIT * max_seq_len:
        raise LongtrainError(
            f"{option} {n} is more than {EXTRAPOLATION_LIMIT}x the model's max_seq_len="
            f"{max_seq_len}; evaluate at most {EXTRAPOLATION_LIMIT * max_seq_len} tokens"
        )
    if n > max_seq_len and main:
        print(f"longtrain eval: {option} {n} is above max_seq_len={max_seq_len} (extrapolation)")


def cli_eval(args: argparse.Namespace) -> int:
    """``longtrain eval --checkpoint PATH | --hf DIR --task ppl|passkey [--sp P]``.

    One process, or every rank of ``torchrun --nproc_per_node N -m longtrain.launch eval``:
    the world is laid out as ``N / P`` data-parallel x ``P`` sequence-parallel ranks.
    """
    if args.samples < 1:
        raise LongtrainError(f"--samples {args.samples}: must be >= 1")
    if args.sp < 1:
        raise LongtrainError(f"--sp {args.sp}: must be >= 1")
    ring = getattr(args, "ring", 1)  # callers that build their own Namespace may omit it
    if ring < 1 or args.sp % ring:
        raise LongtrainError(f"--ring {ring}: must divide --sp {args.sp} (sp = ulysses x ring)")
    rank, world, _ = env_world()
    if world % args.sp != 0:
        hint = f"; launch with torchrun --nproc_per_node {args.sp} -m longtrain.launch eval ..."
        raise LongtrainError(
            f"--sp {args.sp} does not divide the number of processes ({world})"
            + (hint if world == 1 else "")
        )
    if args.seq_len is not None and args.seq_len % args.sp != 0:
        raise LongtrainError(f"--seq-len {args.seq_len}: must be divisible by --sp {args.sp}")
    if args.seq_len is not None and ring > 1 and args.seq_len % (2 * args.sp):
        raise LongtrainError(
            f"--seq-len {args.seq_len}: with --ring {ring} it must be a multiple of 2 x --sp = "
            f"{2 * args.sp} (2 x ring zigzag chunks, split over the Ulysses ranks)"
        )
    setup_accelerator_env()  # before anything imports deepspeed (shard consolidation does)
    src = args.hf or args.checkpoint
    art = open_artifact(src, option="--hf" if args.hf else "--checkpoint")
    cfg = art.config()
    problem = sp_layout_problem(cfg.n_heads, cfg.n_kv_heads, args.sp, ring) if args.sp > 1 else None
    if problem:  # the training's rule and message, before any process group exists
        raise LongtrainError(f"--sp {args.sp} {problem.replace('parallel.ring', '--ring')}")
    if world == 1:
        return _run_eval(args, art, None)
    owns_group = not dist.is_initialized()
    try:
        init_distributed(args.timeout)
        return _run_eval(args, art, build_topology(args.sp, ring))
    except LongtrainError:
        if rank != 0:
            sys.exit(2)  # the job's one line is printed by rank 0 only
        raise
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run_eval(args: argparse.Namespace, art: Artifact, topo: Topology | None) -> int:
    """The eval itself, on one rank (``topo`` None: a single process)."""
    main = topo is None or topo.rank == 0
    model = art.model(attention="auto")
    if model.output is None and hasattr(model, "score"):
        raise LongtrainError(f"{art.path}: a classification model; eval measures language models")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.eval()
    if topo is not None:
        parallelize(model, topo, job=None)
    out = Path(args.out) if args.out else _default_out(art, args.hf or args.checkpoint)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    run = _run_ppl if args.task == "ppl" else _run_passkey
    return run(args, art, model, device, topo, out, main)


def _ranks(topo: Topology | None) -> tuple[int, int, int, int, str]:
    dp, dp_rank = (topo.dp, topo.dp_rank) if topo else (1, 0)
    sp, sp_rank = (topo.sp, topo.sp_rank) if topo else (1, 0)
    ring = f", ring {topo.ring}" if topo and topo.ring > 1 else ""
    note = f" on {topo.world_size} ranks (DP {dp} x SP {sp}{ring})" if topo else ""
    return dp, dp_rank, sp, sp_rank, note


def _run_ppl(args: argparse.Namespace, art: Artifact, model: Any, device: torch.device,
             topo: Topology | None, out: Path, main: bool) -> int:  # fmt: skip
    dp, dp_rank, sp, sp_rank, note = _ranks(topo)
    info = art.data_info()
    data = args.data or info.get("dir")
    if not data:
        raise LongtrainError("eval ppl: pass --data DIR (a directory from `longtrain prepare`)")
    check_tokenizer_hash(
        art.tokenizer_hash(),
        load_manifest(data).get("tokenizer_hash"),
        f"the model {art.path}",
        f"--data {data}",
        "evaluate on data prepared with the model's tokenizer",
    )
    seq_len = args.seq_len or int(info.get("seq_len") or model.cfg.max_seq_len)
    _check_length(seq_len, model.cfg.max_seq_len, "--seq-len", main)
    ring = topo.ring if topo else 1
    step = sp if ring == 1 else 2 * sp
    if seq_len % step != 0:
        raise LongtrainError(
            f"eval ppl: seq_len {seq_len} is not divisible by {'--sp' if ring == 1 else '2 x --sp'}"
            f" {step}; pass --seq-len"
        )
    batches = validation_batches(
        data, seq_len, 1, dp_rank=dp_rank, dp_size=dp, sp_rank=sp_rank, sp_size=sp,
        max_batches=-(-args.samples // dp), attention=info.get("attention", "document"),
        ring=ring,
    )  # fmt: skip
    res = eval_ppl(model, batches, seq_len, args.bucket, device, topo, progress=main)
    name = args.checkpoint or args.hf
    res.update({"model": str(name), "data": str(data), "dp": dp, "sp": sp,
                "ring": topo.ring if topo else 1})  # fmt: skip
    if not main:
        return 0
    json_path, png = out / "ppl_by_position.json", out / "ppl_by_position.png"
    json_path.write_text(json.dumps(res, indent=2))
    plot_ppl(res, png, f"{Path(str(name)).name}: loss by position (seq_len {seq_len})")
    for r in res["buckets"]:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        print(f"  positions {r['start']:>7}-{r['end']:<7} tokens {r['tokens']:>9}  loss {loss}")
    print(f"eval ppl{note}: loss {res['loss']:.4f} (ppl {res['ppl']:.2f}) -> {json_path}, {png}")
    return 0


def _encoder(args: argparse.Namespace, art: Artifact) -> Any:
    if args.tokenizer:
        if not Path(args.tokenizer).is_dir():
            raise LongtrainError(f"--tokenizer {args.tokenizer}: not a directory")
        tok = Tokenizer.load(args.tokenizer)
        check_tokenizer_hash(
            art.tokenizer_hash(),
            tok.hash,
            f"the model {art.path}",
            f"--tokenizer {args.tokenizer}",
            "pass the tokenizer the model was trained with",
        )
        return tok
    found = art.tokenizer_dir()
    if found is None and args.data:
        cand = Path(args.data) / TOKENIZER_DIR
        found = cand if cand.is_dir() else None
    if found is not None:
        return Tokenizer.load(found)
    if art.kind == "hf":
        return _HFEncoder(str(art.path))
    raise LongtrainError("eval passkey: pass --tokenizer DIR (written by `longtrain tokenizer`)")


def _run_passkey(args: argparse.Namespace, art: Artifact, model: Any, device: torch.device,
                 topo: Topology | None, out: Path, main: bool) -> int:  # fmt: skip
    dp, _, sp, _, note = _ranks(topo)
    encoder = _encoder(args, art)
    top = model.cfg.max_seq_len
    lengths = (
        _parse_list(args.lengths, int, "--lengths")
        if args.lengths
        else sorted({max(256, top // 8), max(256, top // 4), max(256, top // 2), top})
    )
    for n in lengths:
        _check_length(n, top, "--lengths", main)
    depths = _parse_list(args.depths, float, "--depths")
    samples = passkey_grid(encoder, lengths, depths, args.samples, args.seed)
    res = eval_passkey(model, samples, lengths, depths, device, topo, progress=main)
    name = args.checkpoint or args.hf
    res.update({"model": str(name), "seed": args.seed, "dp": dp, "sp": sp,
                "ring": topo.ring if topo else 1})  # fmt: skip
    if not main:
        return 0
    json_path, png = out / "passkey.json", out / "passkey.png"
    json_path.write_text(json.dumps(res, indent=2))
    plot_passkey(res, png, f"{Path(str(name)).name}: passkey ({res['trials']} per cell)")
    print(f"  {'length':>8} " + " ".join(f"{d:>6g}" for d in depths))
    for n, row in zip(lengths, res["accuracy"]):
        print(f"  {n:>8} " + " ".join(f"{a:>6.2f}" for a in row))
    print(f"eval passkey{note}: accuracy {res['overall']:.3f} -> {json_path}, {png}")
    return 0
