"""What a path holds, and loading it: the one model-loading entry point of every command.

:func:`open_artifact` says what a directory is and gives its config, its tensors (streamed,
one at a time), its LoRA adapters, its task head and its tokenizer. Kinds:

- ``hf``: a transformers Llama directory (``config.json`` + safetensors; pickled
  ``pytorch_model.bin`` only with ``allow_pickle``, and then with ``weights_only=True``);
- ``model_dir``: ``model_config.json`` + ``model.safetensors`` in longtrain names
  (``import-hf`` output, a run's ``final/`` and ``best/``);
- ``checkpoint``: a committed training checkpoint (DeepSpeed shards of any ZeRO stage,
  verified against its ``COMMIT`` before anything is read); a run directory stands for its
  newest committed checkpoint.

Fine-tuning's ``model.init``, ``longtrain eval``, ``export-hf`` and ``import-hf`` all come
through here, so a path means the same thing to every command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from longtrain.data.loader import MANIFEST, load_manifest
from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.model.heads import TransformerForClassification
from longtrain.model.hf import config_from_hf, state_dict_from_hf
from longtrain.model.lora import merge_lora_state_dict
from longtrain.model.transformer import Transformer
from longtrain.train.files import (
    CHECKPOINTS,
    COMMANDS,
    COMMIT,
    HEAD_CONFIG,
    HF_CONFIG,
    HF_INDEX,
    LORA_CONFIG,
    METRICS,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    SOURCE,
    TOKENIZER_DIR,
    UNIVERSAL,
    read_client_state,
    read_json,
    resolve_checkpoint,
    verify_checkpoint,
)
from longtrain.train.reshard import REMAP_BYTES, Entry, checkpoint_entries

KINDS = ("hf", "model_dir", "checkpoint")


def artifact_kind(path: str | Path, option: str = "--checkpoint") -> str:
    """``hf``, ``model_dir`` or ``checkpoint`` (a run directory counts as its checkpoint)."""
    p = Path(path)
    if not p.is_dir():
        raise LongtrainError(f"{option} {p}: no such directory")
    if (p / HF_CONFIG).is_file():
        return "hf"
    if (p / MODEL_CONFIG).is_file() and (p / MODEL_WEIGHTS).is_file():
        return "model_dir"
    if (p / COMMIT).is_file() or (p / CHECKPOINTS).is_dir() or p.name.startswith("step_"):
        return "checkpoint"
    raise LongtrainError(
        f"{option} {p}: not an HF Llama directory ({HF_CONFIG}), a model directory "
        f"({MODEL_CONFIG} + {MODEL_WEIGHTS}) or a training checkpoint/run directory ({COMMIT} "
        f"or {CHECKPOINTS}/)"
    )


def load_hf_weights(hf_dir: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory: single or sharded safetensors; pickles only
    with ``allow_pickle`` and then with ``weights_only=True`` (no code runs)."""
    single, index = hf_dir / MODEL_WEIGHTS, hf_dir / HF_INDEX
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        return _load_indexed(hf_dir, index, lambda p: load_file(str(p)))
    pickles = [hf_dir / "pytorch_model.bin", hf_dir / "pytorch_model.bin.index.json"]
    if any(p.is_file() for p in pickles):
        if not allow_pickle:
            raise LongtrainError(
                f"{hf_dir}: only pytorch_model.bin (pickle) weights found; pass --allow-pickle to "
                "read them with torch.load(weights_only=True), or convert them to safetensors"
            )

        def load_pickle(p: Path) -> dict[str, torch.Tensor]:
            return torch.load(p, map_location="cpu", weights_only=True)

        if pickles[0].is_file():
            return load_pickle(pickles[0])
        return _load_indexed(hf_dir, pickles[1], load_pickle)
    raise LongtrainError(
        f"{hf_dir}: no weights found ({MODEL_WEIGHTS}, {HF_INDEX} or pytorch_model.bin)"
    )


def _load_indexed(
    hf_dir: Path, index: Path, load: Callable[[Path], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise LongtrainError(f"{index}: no 'weight_map'")
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        path = hf_dir / fname
        if not path.is_file():
            raise LongtrainError(f"{index}: shard {fname} is listed but missing")
        out.update(load(path))
    return out


def _safetensors_entries(file: Path) -> list[Entry]:
    """Lazy entries of one safetensors file: shapes from its header, tensors on demand."""
    handle = safe_open(str(file), framework="pt")
    out: list[Entry] = []
    for name in handle.keys():
        shape = torch.Size(handle.get_slice(name).get_shape())
        out.append((name, shape, lambda n=name: handle.get_tensor(n)))
    return out


@dataclass
class Artifact:
    """A model on disk, opened: config, tensors, adapters, head and tokenizer."""

    path: Path
    """The directory read (a run directory resolves to its newest committed checkpoint)."""
    kind: str
    """One of :data:`KINDS`."""
    allow_pickle: bool = False
    """hf only: also read pickled ``pytorch_model.bin`` weights (with weights_only=True)."""
    _hf_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    # ---- what it is ---------------------------------------------------------------------

    def config(self) -> ModelConfig:
        """The ModelConfig of the weights (from config.json for HF directories)."""
        if self.kind == "hf":
            return config_from_hf(
                read_json(self.path / HF_CONFIG), where=str(self.path / HF_CONFIG)
            )
        f = self.path / MODEL_CONFIG
        if not f.is_file():
            raise LongtrainError(f"{self.path}: no {MODEL_CONFIG}; not a longtrain checkpoint")
        try:
            return ModelConfig.from_dict(read_json(f))
        except LongtrainError as e:
            raise LongtrainError(f"{f}: {e}") from None

    def config_dict(self) -> dict[str, Any]:
        """The model config as stored (``model_config.json``), without interpreting it."""
        if self.kind == "hf":
            return self.config().to_dict()
        return read_json(self.path / MODEL_CONFIG)

    def client_state(self) -> dict[str, Any]:
        """The training run's client state (checkpoints only; {} otherwise)."""
        return read_client_state(self.path) if self.kind == "checkpoint" else {}

    def _run_job(self) -> dict[str, Any]:
        return self.client_state().get("config") or {}

    def lora(self) -> dict[str, Any] | None:
        """``{"rank", "alpha", "targets"}`` (and ``dropout`` where the run recorded it) when the
        weights hold LoRA adapters, else None."""
        f = self.path / LORA_CONFIG
        lora = (self._run_job().get("finetune") or {}).get("lora") or {}
        if f.is_file():
            # A checkpoint's lora_config.json predates the dropout; its job config has it.
            return {**{k: lora[k] for k in ("dropout",) if k in lora}, **read_json(f)}
        return dict(lora) if lora.get("rank") else None

    def head(self) -> dict[str, Any] | None:
        """``{"task": "classify", "num_labels", "pad_token_id"}`` for a classifier, else None."""
        f = self.path / HEAD_CONFIG
        if f.is_file():
            return read_json(f)
        ft = self._run_job().get("finetune") or {}
        if ft.get("task") != "classify":
            return None
        pad = (self.client_state().get("finetune") or {}).get("pad_token_id")
        return {"task": "classify", "num_labels": int(ft.get("num_labels", 2)), "pad_token_id": pad}

    def data_info(self) -> dict[str, Any]:
        """What the training run recorded of its data (``dir``, ``seq_len``, ``attention``)."""
        if self.kind == "model_dir" and (self.path / SOURCE).is_file():
            return dict(read_json(self.path / SOURCE).get("data") or {})
        return dict(self._run_job().get("data") or {})

    def record(self) -> dict[str, Any]:
        """What the training run recorded about these weights ({} when nothing was): the
        model card's figures (``longtrain.train.export.model_card``).

        ``step``, ``tokens`` (seen by the run so far), ``world_size``, ``job`` (the resolved
        config), ``commands`` (the run's invocations up to this step from its
        ``commands.jsonl``: the first one started it, later ones resumed it),
        ``val_loss``/``val_step`` and ``loss``/``loss_step`` (the last evaluation and training
        row at or before ``step`` in its ``metrics.jsonl``) and ``manifest`` (a summary of the
        data's ``manifest.json``, when it can still be read). A model directory carries the
        record of the checkpoint it was made from.
        """
        if self.kind == "model_dir":
            src = self.path / SOURCE
            return dict(read_json(src).get("record") or {}) if src.is_file() else {}
        if self.kind != "checkpoint":
            return {}
        state = self.client_state()
        progress = (state.get("parts") or {}).get("progress") or state  # format 2, else 1
        rec: dict[str, Any] = {
            "step": int(progress.get("step", state.get("step", 0))),
            "tokens": int(progress.get("tokens_seen", 0)),
            "world_size": state.get("world_size"),
            "job": state.get("config") or {},
        }
        run_dir = _run_dir_of(self.path)
        rec["commands"] = [
            row for row in _jsonl(run_dir / COMMANDS) if int(row.get("start_step", 0)) < rec["step"]
        ]
        rec.update(_last_rows(run_dir / METRICS, rec["step"]))
        data_dir = (rec["job"].get("data") or {}).get("dir")
        if data_dir and (Path(data_dir) / MANIFEST).is_file():
            rec["manifest"] = manifest_summary(load_manifest(data_dir))
        return rec

    def tokenizer_dir(self) -> Path | None:
        """The longtrain tokenizer the weights were trained with, when it can be found."""
        if self.kind == "model_dir":
            src = self.path / SOURCE
            tok = read_json(src).get("tokenizer") if src.is_file() else None
            if tok and Path(tok).is_dir():
                return Path(tok)
        data = self.data_info()
        for cand in (
            data.get("tokenizer"),
            Path(data["dir"]) / TOKENIZER_DIR if data.get("dir") else None,
        ):
            if cand and (Path(cand) / "tokenizer_meta.json").is_file():
                return Path(cand)
        return None

    def tokenizer_hash(self) -> str | None:
        """The hash of the tokenizer the weights were trained with, when recorded."""
        if self.kind == "checkpoint":
            return self.client_state().get("tokenizer_hash")
        if self.kind == "model_dir" and (self.path / SOURCE).is_file():
            return read_json(self.path / SOURCE).get("tokenizer_hash")
        return None

    # ---- the tensors ----------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every tensor in longtrain names as ``(name, shape, fetch)``, fetched one at a time.

        Checkpoints are verified against COMMIT first and read from memory-mapped ZeRO shards
        (tied parameters DeepSpeed stored once appear under both names).
        """
        if self.kind == "checkpoint":
            verify_checkpoint(self.path)
            entries, aliases = checkpoint_entries(self.path, REMAP_BYTES)
            by_name = {name: (shape, fetch) for name, shape, fetch in entries}
            for alias, source in aliases.items():
                if source in by_name and alias not in by_name:
                    entries.append((alias, *by_name[source]))
            return entries
        if self.kind == "model_dir":
            return _safetensors_entries(self.path / MODEL_WEIGHTS)
        if self._hf_state is None:
            cfg = self.config()
            raw = load_hf_weights(self.path, self.allow_pickle)
            self._hf_state = state_dict_from_hf(raw, cfg, where=str(self.path))
        return [(k, v.shape, lambda v=v: v) for k, v in self._hf_state.items()]

    def check_shapes(self, entries: list[Entry] | None = None) -> None:
        """Refuse tensors whose shapes differ from what the config implies, naming one."""
        cfg = self.config()
        head = self.head()
        with torch.device("meta"):
            ref = (
                TransformerForClassification(cfg, int(head["num_labels"]))
                if head is not None
                else Transformer(cfg)
            )
        want = {k: v.shape for k, v in ref.state_dict().items()}
        where = HF_CONFIG if self.kind == "hf" else MODEL_CONFIG
        for name, shape, _ in entries if entries is not None else self.entries():
            if name in want and tuple(want[name]) != tuple(shape):
                raise LongtrainError(
                    f"{self.path}: tensor {name} has shape {tuple(shape)} but {where} implies "
                    f"{tuple(want[name])}; the config and the weights are of different models"
                )

    def state_dict(self, merge_lora: bool = False) -> dict[str, torch.Tensor]:
        """All tensors, fp32 on the CPU; adapters folded in with ``merge_lora``."""
        sd = {name: fetch().float() for name, _shape, fetch in self.entries()}
        if any(k.endswith((".lora_a", ".lora_b")) for k in sd):
            lora = self.lora()
            if not merge_lora:
                raise LongtrainError(
                    f"{self.path}: the weights hold LoRA adapters; pass --merge-lora to fold them in"
                )
            if lora is None:
                raise LongtrainError(
                    f"{self.path}: holds LoRA adapters but no rank/alpha ({LORA_CONFIG}) to merge them"
                )
            sd = merge_lora_state_dict(sd, lora_scaling(lora))
        return sd

    def model(
        self, attention: str = "auto", merge_lora: bool = False
    ) -> Transformer | TransformerForClassification:
        """The fp32 CPU model (a classifier when the artifact has a classification head)."""
        cfg = self.config()
        sd = self.state_dict(merge_lora=merge_lora)
        head = self.head()
        with torch.device("meta"):
            if head is not None:
                model: Transformer = TransformerForClassification(
                    cfg, int(head["num_labels"]), attention=attention
                )
            else:
                model = Transformer(cfg, attention=attention)
        # assign=True adopts the loaded tensors: the model never exists twice.
        try:
            _, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        except RuntimeError as e:
            raise LongtrainError(
                f"{self.path}: weights do not match {MODEL_CONFIG}: {str(e).splitlines()[0]}"
            ) from None
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        if unexpected or still_meta:
            raise LongtrainError(
                f"{self.path}: weights do not match the model config (missing {still_meta[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        model.rope.to_empty(device="cpu")
        model.rope.reset_parameters()
        return model


def _run_dir_of(checkpoint: Path) -> Path:
    """The run directory of ``run_dir/checkpoints[/universal]/step_XXXXXXXX``."""
    up = checkpoint.parent
    if up.name == UNIVERSAL:
        up = up.parent
    return up.parent


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file of the run ([] when it is absent); a last line
    cut short by a killed process is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _last_rows(metrics: Path, step: int) -> dict[str, Any]:
    """The last validation and training losses logged at or before ``step`` (a resumed run
    may have logged past the checkpoint it is exported from, then been stopped)."""
    out: dict[str, Any] = {}
    for row in _jsonl(metrics):
        if int(row.get("step", step + 1)) > step:
            continue
        if isinstance(row.get("val_loss"), (int, float)):
            out["val_loss"], out["val_step"] = float(row["val_loss"]), int(row["step"])
        if isinstance(row.get("loss"), (int, float)) and not row.get("skipped"):
            out["loss"], out["loss_step"] = float(row["loss"]), int(row["step"])
    return out


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a model card says about the data: counts, vocabulary, tokenizer, source, splits."""
    keys = ("documents", "tokens", "vocab_size", "dtype", "tokenizer_hash", "sft", "group_by")
    out = {k: manifest[k] for k in keys if k in manifest}
    source = manifest.get("source") or {}
    if "corpus" in source:
        out["corpus"] = source["corpus"]
    out["splits"] = {
        name: {k: split[k] for k in ("documents", "tokens") if k in split}
        for name, split in sorted((manifest.get("splits") or {}).items())
    }
    return out


def lora_scaling(lora: dict[str, Any]) -> float:
    """alpha / rank of a LoRA config mapping."""
    return float(lora["alpha"]) / float(lora["rank"])


def open_artifact(
    path: str | Path, allow_pickle: bool = False, option: str = "--checkpoint"
) -> Artifact:
    """Say what ``path`` is and open it (see the module docstring for the kinds)."""
    kind = artifact_kind(path, option)
    p = Path(path)
    if kind == "checkpoint":
        p = resolve_checkpoint(p)
    return Artifact(path=p, kind=kind, allow_pickle=allow_pickle)


def read_model_config(path: str | Path, option: str = "model.init") -> ModelConfig:
    """The ModelConfig of whatever ``path`` holds (nothing else is read)."""
    return open_artifact(path, option=option).config()


__all__ = [
    "KINDS",
    "Artifact",
    "artifact_kind",
    "load_hf_weights",
    "lora_scaling",
    "manifest_summary",
    "open_artifact",
    "read_model_config",
]
