"""The ``longtrain`` command: parses arguments and dispatches to the room that does the work.

Each subcommand names a ``module:function`` that takes the parsed :class:`argparse.Namespace`.
Bad input raises :class:`~longtrain.model.errors.LongtrainError`, printed here as one line with
a non-zero exit. ``python -m longtrain.launch`` is the same command, so that ``torchrun -m`` and
the ``deepspeed`` launcher can start it.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence

from longtrain.model.errors import LongtrainError

DISPATCH: dict[str, str] = {
    "tokenizer": "longtrain.data.tokenizer:cli_tokenizer",
    "prepare": "longtrain.data.prepare:cli_prepare",
    "pretrain": "longtrain.train.trainer:cli_pretrain",
    "finetune": "longtrain.train.trainer:cli_finetune",
    "export-hf": "longtrain.train.export:cli_export_hf",
    "import-hf": "longtrain.train.export:cli_import_hf",
    "eval": "longtrain.train.eval.cli:cli_eval",
    "plan": "longtrain.train.plan:cli_plan",
}


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        required=True,
        help="'stdlib' (the embedded default), a file, a glob, a directory saved by "
        "datasets.save_to_disk; .txt/.jsonl/.json/.parquet/.csv",
    )
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument(
        "--txt-per-line",
        action="store_true",
        help="for .txt sources: one document per line instead of one per file",
    )
    p.add_argument(
        "--streaming", action="store_true", help="stream the corpus instead of loading it whole"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML job config (see launch/configs/)")
    p.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 parallel.sp=2"
    )
    # The deepspeed launcher appends --local_rank=N; accept and ignore it (LOCAL_RANK is set too).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (NaN and inf are refused, with the reason)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each subcommand has its own ``--help``."""
    parser = argparse.ArgumentParser(
        prog="longtrain", description="Distributed long-context pretraining."
    )
    # The deepspeed launcher puts --local_rank=N before the subcommand (`-m longtrain.launch
    # --local_rank=0 pretrain ...`); accept and ignore it there too (LOCAL_RANK is set as well).
    parser.add_argument(
        "--local_rank", "--local-rank", dest="launcher_local_rank", type=int, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer on a corpus")
    _corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--sample-mb",
        type=float,
        default=64.0,
        help="train on a deterministic sample of at most this many MB of text (default 64)",
    )
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped shards")
    _corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="directory written by `longtrain tokenizer`")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out fraction")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="target tokens per shard")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records, report counts")
    p.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="non-UTF-8 bytes: stop (strict) or replace them",
    )
    p.add_argument("--sft", action="store_true", help="chat/instruction records with loss masks")
    p.add_argument(
        "--group-by",
        choices=["file", "directory"],
        default="file",
        help="'directory': the files of one directory become one document, in path order, each "
        "after a header line with its path (stdlib and .txt trees; default: file)",
    )
    p.add_argument(
        "--min-doc-tokens",
        type=int,
        default=0,
        metavar="N",
        help="keep only documents of at least N tokens; the manifest counts the dropped ones",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset in --out made with other options (built beside it, swapped in "
        "when complete)",
    )

    p = sub.add_parser("pretrain", help="pretrain a model (torchrun / deepspeed / single process)")
    _train_args(p)
    p = sub.add_parser("finetune", help="fine-tune: SFT, context extension, LoRA, classification")
    _train_args(p)

    p = sub.add_parser("export-hf", help="write a Hugging Face model directory")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, one checkpoint of it, or a model directory (final/, import-hf)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to include")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--max-shard-size", default="5GB", help="safetensors shard size, e.g. 5GB, 200MB, 10KB"
    )
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into weights")
    p.add_argument(
        "--lora-adapter",
        default=None,
        metavar="DIR",
        help="also write a LoRA run's adapters to DIR as a PEFT adapter directory; --out then "
        "holds the merged model with --merge-lora, else the base weights the adapter applies to",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the contents of a non-empty --out that is not a longtrain export",
    )

    p = sub.add_parser("import-hf", help="read a transformers Llama directory into a checkpoint")
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pytorch_model.bin files (with weights_only=True)",
    )

    p = sub.add_parser("eval", help="long-context evaluation: perplexity by position, passkey")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run directory or one checkpoint of it")
    src.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--task", choices=["ppl", "passkey"], required=True)
    p.add_argument("--data", default=None, help="prepared data directory (ppl)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (passkey)")
    p.add_argument("--out", default=None, help="where JSON and PNG go")
    p.add_argument("--seq-len", type=int, default=None, help="context length (ppl)")
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (passkey)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1.0", help="passkey depths in [0,1]")
    p.add_argument("--bucket", type=int, default=1024, help="position bucket size (ppl)")
    p.add_argument("--samples", type=int, default=8, help="windows or trials per cell")
    p.add_argument(
        "--sp",
        type=int,
        default=1,
        help="sequence-parallel degree; > 1 under torchrun --nproc_per_node N (N divisible by it)",
    )
    p.add_argument(
        "--ring",
        type=int,
        default=1,
        help="ring-attention degree inside --sp (sp = ulysses x ring; --ring equal to --sp is pure ring)",
    )
    p.add_argument(
        "--timeout", type=int, default=1800, help="collective timeout in seconds (distributed)"
    )
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("plan", help="predict memory, step time and MFU before booking a cluster")
    p.add_argument("--config", required=True, help="YAML job config")
    p.add_argument("--gpus", type=_positive(int), required=True, help="number of GPUs")
    p.add_argument("--gpu-mem", type=_positive(float), required=True, help="memory per GPU in GB")
    p.add_argument("--gpu", choices=["a100", "h100", "h200"], default="h100")
    p.add_argument(
        "--host-mem", type=_positive(float), default=None, help="host RAM per node in GB"
    )
    p.add_argument(
        "--max-seq", action="store_true", help="the longest window over every layout and lever"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longtrain`` console script."""
    args = build_parser().parse_args(argv)
    try:
        rc = _resolve(DISPATCH[args.command])(args)
    except LongtrainError as e:
        print(f"longtrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longtrain {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
