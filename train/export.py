"""Writing models: model-only directories and transformers directories, streamed, all-or-nothing.

One writer per format, whatever the source:

- :func:`write_model_dir`: ``model_config.json`` + ``model.safetensors`` (longtrain names), the
  format of ``import-hf`` output and of a run's ``final/`` and ``best/``;
- :func:`write_hf`: a directory that ``AutoModelForCausalLM`` (or, for a classifier,
  ``AutoModelForSequenceClassification``) and ``AutoTokenizer`` load with no extra code:
  ``config.json`` (with RoPE scaling), ``generation_config.json``, ``model.safetensors`` or
  numbered shards plus their index, the tokenizer, and the ``README.md`` model card
  (``longtrain.train.model_card``);
- :func:`write_peft_adapter`: a LoRA run's adapters as a PEFT adapter directory.

All take tensors as entries ``(name, shape, fetch)`` (``longtrain.train.reshard.Entry``): a
training checkpoint's tensors are gathered from its ZeRO shards one at a time, mapped, converted
and written, so peak memory stays at about one tensor however large the model; an in-memory
model (:func:`save_hf`, :func:`save_model_dir`) goes through the same code. Each directory is
written beside its destination and renamed into place at the end (:func:`staged_dir`): a failed
export leaves the previous one untouched, and an old export can never leave stale files among
new ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longtrain.data.tokenizer import (
    Tokenizer,
    check_tokenizer_hash,
    save_hf_tokenizer,
    tokenizer_hash,
)
from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.model.heads import classifier_hf_config
from longtrain.model.hf import DTYPE_NAMES, KEY_MAP, TRANSFORMS, config_to_hf, key_rows
from longtrain.train.artifacts import Artifact, lora_scaling, open_artifact
from longtrain.train.files import (
    EXPORT_MARKER,
    HEAD_CONFIG,
    HF_CONFIG,
    HF_INDEX,
    LORA_CONFIG,
    MODEL_CARD,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SOURCE,
)
from longtrain.train.model_card import model_card
from longtrain.train.reshard import Entry

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
}


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '10KB', '123' -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(text).upper())
    if not m:
        raise LongtrainError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB, 200MB, 10KB")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    size = int(float(m.group(1)) * units[m.group(2)])
    if size < 1:
        raise LongtrainError(f"--max-shard-size: must be positive, got {text!r}")
    return size


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LongtrainError(f"--dtype: unknown {dtype!r}; use bf16, fp16 or fp32")
    return DTYPES[dtype]


def model_entries(model: torch.nn.Module) -> list[Entry]:
    """Entries of an in-memory model's state dict (CPU views, no copy)."""
    return [(k, v.shape, lambda v=v: v.detach().cpu()) for k, v in model.state_dict().items()]


# ---- files -----------------------------------------------------------------------------------


def write_safetensors(
    file: Path, items: list[Entry], dtype: torch.dtype, metadata: dict[str, str] | None = None
) -> int:
    """Stream ``items`` into one safetensors file; returns the bytes of tensor data.

    The header comes from the shapes alone; then each tensor is fetched, converted, written
    and dropped, so memory stays at about one tensor.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, shape, _ in items:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _name, _shape, fetch in items:
            t = fetch().to(dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no bytes copy
            del t
    return pos


def _is_export(path: Path) -> bool:
    return (path / EXPORT_MARKER).is_file() or (path / MODEL_CONFIG).is_file()


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; swapped in by rename only on success.

    An existing ``out`` is replaced when it is empty, an earlier longtrain export or model
    directory, or ``overwrite`` is set; anything else is refused before a byte is written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LongtrainError(f"{option} {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not (_is_export(out) or overwrite):
        raise LongtrainError(
            f"{option} {out} is not empty and holds no longtrain export; choose a new directory "
            "or pass --overwrite to replace its contents"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_model_dir(
    config: dict[str, Any],
    entries: list[Entry],
    out: str | Path,
    extra_files: dict[str, dict] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = True,
) -> Path:
    """A model-only directory: ``model_config.json`` + ``model.safetensors`` (+ extra JSON)."""
    with staged_dir(out, overwrite=overwrite) as tmp:
        write_safetensors(tmp / MODEL_WEIGHTS, entries, dtype, metadata={"format": "pt"})
        (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(out)


def save_model_dir(model: torch.nn.Module, out: str | Path) -> Path:
    """An in-memory model as a model-only directory."""
    return write_model_dir(model.cfg.to_dict(), model_entries(model), out)


def artifact_side_files(art: Artifact, extra: dict[str, Any] | None = None) -> dict[str, dict]:
    """The JSON files a model directory made from ``art`` carries (adapters, head, source)."""
    files: dict[str, dict] = {}
    if art.lora() is not None:
        lora = art.lora()
        keys = ("rank", "alpha", "dropout", "targets")
        files[LORA_CONFIG] = {k: lora[k] for k in keys if k in lora}
    if art.head() is not None:
        files[HEAD_CONFIG] = art.head()
    tok = art.tokenizer_dir()
    files[SOURCE] = {
        "checkpoint": str(art.path),
        "tokenizer": str(tok) if tok else None,
        "tokenizer_hash": art.tokenizer_hash(),
        "record": art.record(),  # what the model card of a later export says about the run
        **(extra or {}),
    }
    return files


def write_model_output(checkpoint: str | Path, out: str | Path, extra: dict[str, Any]) -> Path:
    """A run's ``final/`` or ``best/``: a committed checkpoint as a model-only directory."""
    art = open_artifact(checkpoint)
    return write_model_dir(art.config_dict(), art.entries(), out, artifact_side_files(art, extra))


# ---- transformers directories ---------------------------------------------------------------


def _token_ids(tokenizer: str | Path | None) -> tuple[int | None, int | None, int | None]:
    if tokenizer is None:
        return None, None, None
    tok = Tokenizer.load(tokenizer)

    def ok(i: int) -> int | None:
        return i if i is not None and i >= 0 else None

    return ok(tok.bos_id), ok(tok.eos_id), ok(tok.pad_id)


def hf_config_files(
    cfg: ModelConfig,
    out: Path,
    tokenizer: str | Path | None,
    dtype: torch.dtype,
    head: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``config.json`` (and, for a language model, ``generation_config.json``)."""
    import transformers  # heavy; only exports need it

    bos, eos, pad = _token_ids(tokenizer)
    if head is not None:
        hf_cfg = classifier_hf_config(cfg, int(head["num_labels"]), head.get("pad_token_id"))
    else:
        hf_cfg = config_to_hf(cfg, bos, eos)
        hf_cfg["pad_token_id"] = pad
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = DTYPE_NAMES[dtype]  # 4.4x / 5 spellings
    hf_cfg["transformers_version"] = transformers.__version__
    (out / HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if head is not None:
        return [HF_CONFIG]
    gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    gen.update(pad_token_id=pad, transformers_version=transformers.__version__)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return [HF_CONFIG, "generation_config.json"]


def peft_target_modules(targets: list[str] | tuple[str, ...]) -> list[str]:
    """transformers module names of our LoRA targets (``wq`` -> ``q_proj``...), from the key map."""
    out = []
    for t in targets:
        theirs = [th for ours, th, _ in KEY_MAP if ours.endswith(f".{t}.weight")]
        if len(theirs) != 1:
            raise LongtrainError(f"LoRA target {t!r} has no transformers module in the key map")
        out.append(theirs[0][: -len(".weight")].rsplit(".", 1)[-1])
    return sorted(out)


def write_peft_adapter(
    cfg: ModelConfig,
    entries: list[Entry],
    out: str | Path,
    lora: dict[str, Any],
    dtype: torch.dtype | str = torch.float32,
    base_model: str | None = None,
    overwrite: bool = False,
    source: str = "",
) -> list[str]:
    """A PEFT LoRA adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`` loads
    it onto the base weights (what the LoRA run froze). Tensor names go through the same key
    map as the model (``layers.{i}.attention.wq.lora_a`` -> ``base_model.model.model.layers.
    {i}.self_attn.q_proj.lora_A.weight``); our ``lora_a`` (r, in) and ``lora_b`` (out, r) are
    peft's ``lora_A`` and ``lora_B`` as they are, and its scaling is the same alpha / r.
    Streamed and staged like :func:`write_hf`.
    """
    dtype = parse_dtype(dtype)
    shapes = {name: shape for name, shape, _ in entries}
    fetch = {name: f for name, _, f in entries}
    items: list[Entry] = []
    for ours, theirs, _ in key_rows(cfg):
        prefix = ours[: -len(".weight")]
        if prefix + ".lora_a" not in fetch:
            continue
        module = "base_model.model." + theirs[: -len(".weight")]
        for mine, peft_name in ((".lora_a", ".lora_A.weight"), (".lora_b", ".lora_B.weight")):
            items.append((module + peft_name, shapes[prefix + mine], fetch[prefix + mine]))
    if not items:
        raise LongtrainError(
            f"--lora-adapter: {source or 'the weights'} hold no LoRA adapters (a run with "
            "finetune.lora.rank > 0 has them)"
        )
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(lora["alpha"]),
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(lora["rank"]),
        "rank_pattern": {},
        "revision": None,
        "target_modules": peft_target_modules(lora["targets"]),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    files = [PEFT_CONFIG, PEFT_WEIGHTS]
    with staged_dir(out, overwrite=overwrite, option="--lora-adapter") as tmp:
        write_safetensors(tmp / PEFT_WEIGHTS, items, dtype, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": 1, "files": files}) + "\n")
    return files


def write_hf(
    cfg: ModelConfig,
    entries: list[Entry],
    out: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    lora: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
    overwrite: bool = False,
    source: str = "",
    record: dict[str, Any] | None = None,
    drop_lora: bool = False,
) -> list[str]:
    """The one transformers writer; returns the file names written (tokenizer files aside).

    Tensors are renamed by ``longtrain.model.hf``'s key map (plus ``score.weight`` for a
    classification ``head``), LoRA adapters are folded into their weights as they are written
    when ``lora`` is given, left out with ``drop_lora`` (the base weights, for a separate
    PEFT adapter) and refused otherwise, and shards are cut like transformers'
    ``save_pretrained``: a new file when the next tensor would pass ``max_shard_size``.
    ``README.md`` is the :func:`model_card`, from ``record`` (what the run recorded).
    """
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    fetch = {name: f for name, _, f in entries}
    shapes = {name: shape for name, shape, _ in entries}
    adapters = {n[: -len(".lora_a")] for n in fetch if n.endswith(".lora_a")}
    card_lora = (lora, "merged in") if adapters and lora else None
    if drop_lora:
        card_lora = (lora, "not included: base weights") if adapters and lora else None
        adapters, lora = set(), None
    if adapters and lora is None:
        raise LongtrainError(
            f"{source or 'the weights'}: the weights hold LoRA adapters; pass --merge-lora to "
            "fold them in"
        )
    scaling = lora_scaling(lora) if adapters and lora else 0.0
    rows = key_rows(cfg, lm_head=head is None)
    if head is not None:
        rows.append(("score.weight", "score.weight", "identity"))
    names = {n for n in fetch if not n.endswith((".lora_a", ".lora_b"))}
    if head is not None:
        names.discard("output.weight")
    missing = [ours for ours, _, _ in rows if ours not in names]
    extra = sorted(names - {ours for ours, _, _ in rows})
    if missing or extra:
        raise LongtrainError(
            f"{source or 'the weights'}: weights do not match {MODEL_CONFIG} (missing "
            f"{missing[:3]}, unexpected {extra[:3]})"
        )
    bar = tqdm(total=len(rows), desc="export-hf", unit="tensor", disable=len(rows) < 64)

    def hf_tensor(ours: str, transform: str) -> Any:
        def get() -> torch.Tensor:
            w = fetch[ours]()
            prefix = ours[: -len(".weight")]
            if ours.endswith(".weight") and prefix in adapters:
                a, b = fetch[prefix + ".lora_a"]().float(), fetch[prefix + ".lora_b"]().float()
                w = (w.float() + scaling * (b @ a)).to(w.dtype)
            bar.update(1)
            return TRANSFORMS[transform][0](w, cfg)

        return get

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[Entry]] = [[]]
    size = total = 0
    params = sum(math.prod(shapes[ours]) for ours, _, _ in rows)
    for ours, theirs, transform in rows:
        nbytes = math.prod(shapes[ours]) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((theirs, shapes[ours], hf_tensor(ours, transform)))
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        names_out = [MODEL_WEIGHTS]
    else:
        names_out = [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
    with staged_dir(out, overwrite=overwrite) as tmp:
        files = hf_config_files(cfg, tmp, tokenizer, dtype, head)
        weight_map: dict[str, str] = {}
        for fname, shard in zip(names_out, shards):
            write_safetensors(tmp / fname, shard, dtype, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys((n for n, _, _ in shard), fname))
        bar.close()
        files += names_out
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            files.append(HF_INDEX)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp)
        card = model_card(cfg, params, dtype, head, record, card_lora)
        (tmp / MODEL_CARD).write_text(card)
        files.append(MODEL_CARD)
        # Deterministic (no paths, no times): two exports of the same weights are equal.
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": 1, "files": files}) + "\n")
    return files


def save_hf(
    model: torch.nn.Module,
    out: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
) -> list[str]:
    """An in-memory Transformer as a transformers directory (:func:`write_hf`); ``record``
    is what a run recorded about these weights, for the model card (none: the model only)."""
    return write_hf(
        model.cfg,
        model_entries(model),
        out,
        tokenizer,
        dtype,
        max_shard_size,
        overwrite=overwrite,
        record=record,
    )


def export(
    src: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    merge_lora: bool = False,
    overwrite: bool = False,
    lora_adapter: str | Path | None = None,
) -> tuple[Artifact, list[str], Path | None]:
    """``longtrain export-hf``: any artifact (checkpoint, run dir, model dir) -> transformers.

    Without ``tokenizer`` the one the weights were trained with is included when it can be
    found; a given tokenizer must be that one when the artifact records its hash. With
    ``lora_adapter`` the run's adapters also go there as a PEFT adapter directory, and
    ``out`` holds the merged model (``merge_lora``) or else the base weights the adapter
    applies to (which the adapter's ``base_model_name_or_path`` then names).
    """
    art = open_artifact(src)
    if art.kind == "hf":
        raise LongtrainError(f"--checkpoint {src}: already a transformers directory")
    if lora_adapter is not None:
        if art.lora() is None:
            raise LongtrainError(
                f"--lora-adapter: {art.path} holds no LoRA adapters (a run with "
                "finetune.lora.rank > 0 has them)"
            )
        if art.head() is not None:
            raise LongtrainError(
                "--lora-adapter: a classifier's head trains in full besides the adapters; "
                "export it merged with --merge-lora instead"
            )
        if Path(lora_adapter).resolve() == Path(out).resolve():
            raise LongtrainError("--lora-adapter must be another directory than --out")
    if tokenizer is None:
        tok = art.tokenizer_dir()
    else:
        tok = Path(tokenizer)
        if not tok.is_dir():
            raise LongtrainError(f"--tokenizer {tokenizer}: not a directory")
        check_tokenizer_hash(
            art.tokenizer_hash(),
            tokenizer_hash(tok),
            f"the weights in {art.path}",
            f"--tokenizer {tok}",
            "pass the tokenizer the run was trained with (its data dir's tokenizer/)",
        )
    lora = art.lora() if merge_lora or lora_adapter is not None else None
    record, entries = art.record(), art.entries()
    if lora_adapter is not None and lora is not None:
        # First: the small adapter fails fast (a non-empty --lora-adapter) before --out moves.
        init = str((record.get("job") or {}).get("model", {}).get("init") or "")
        if not merge_lora:
            base: str | None = str(Path(out).resolve())
        else:  # the model the run started from, when transformers can load it by that path
            base = init if init and (Path(init) / HF_CONFIG).is_file() else None
        write_peft_adapter(
            art.config(), entries, lora_adapter, lora, dtype, base, overwrite, str(art.path)
        )
    files = write_hf(
        art.config(),
        entries,
        out,
        tokenizer=tok,
        dtype=dtype,
        max_shard_size=max_shard_size,
        lora=lora,
        head=art.head(),
        overwrite=overwrite,
        source=str(art.path),
        record=record,
        drop_lora=lora_adapter is not None and not merge_lora,
    )
    return art, files, tok


def cli_export_hf(args: argparse.Namespace) -> int:
    """``longtrain export-hf --checkpoint RUN_DIR|CHECKPOINT|MODEL_DIR --out DIR``."""
    adapter = args.lora_adapter
    art, files, tok = export(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        merge_lora=args.merge_lora,
        overwrite=args.overwrite,
        lora_adapter=adapter,
    )
    kind = "LlamaForSequenceClassification" if art.head() else "LlamaForCausalLM"
    if adapter is not None:
        kind += ", LoRA merged" if args.merge_lora else ", base weights without the LoRA adapters"
    tok_note = f", tokenizer from {tok}" if tok else ", no tokenizer"
    print(f"exported {art.path} -> {args.out} ({kind}, {len(files)} files, {args.dtype}{tok_note})")
    if adapter is not None:
        print(f"exported the LoRA adapters of {art.path} -> {adapter} (PEFT adapter directory)")
    return 0


def cli_import_hf(args: argparse.Namespace) -> int:
    """``longtrain import-hf --hf DIR --out DIR``: transformers Llama -> model-only directory."""
    hf_dir = Path(args.hf)
    if not (hf_dir / HF_CONFIG).is_file():
        raise LongtrainError(
            f"{hf_dir / HF_CONFIG}: file not found; --hf takes a transformers Llama directory"
        )
    art = open_artifact(hf_dir, allow_pickle=args.allow_pickle, option="--hf")
    cfg = art.config()
    entries = art.entries()
    art.check_shapes(entries)
    write_model_dir(cfg.to_dict(), entries, args.out, overwrite=False)
    print(f"imported {args.hf} -> {args.out} ({cfg.num_params():,} parameters)")
    return 0
