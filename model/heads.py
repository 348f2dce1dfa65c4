"""Task heads on the Transformer: sequence classification on the last token, and its HF export.

:class:`TransformerForClassification` is the decoder without its LM head plus ``score``, a
bias-free ``(num_labels, dim)`` linear applied to the hidden state of each sequence's last
token, exactly transformers' ``LlamaForSequenceClassification`` (which pools the rightmost
token that is not ``pad_token_id``). Parameter names stay the Transformer's, so the
attention cores can be wrapped for sequence parallelism and DeepSpeed/LoRA see the same
names; the head adds ``score.weight``.

The training loss rides on the same ``forward(..., labels=...)`` contract as language
modelling: ``labels`` is (B, T) with ``-100`` everywhere except at each sequence's last
token, where it holds the class. So the trainer's token counting, global normalisation and
sequence-parallel sharding apply unchanged: under SP only the rank that holds a sequence's
last token sees its label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.model.config import ModelConfig
from longtrain.model.errors import LongtrainError
from longtrain.model.transformer import Transformer

HEAD_CONFIG_FILE = "head_config.json"


class TransformerForClassification(Transformer):
    """Llama decoder + a linear classifier on the last token (no LM head)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, attention: str = "auto") -> None:
        super().__init__(cfg, attention=attention)
        # The LM head is dropped: an unused parameter would carry no gradient under ZeRO.
        self.output = None
        self.num_labels = num_labels
        self.score = nn.Linear(cfg.dim, num_labels, bias=False)
        if self.score.weight.device.type != "meta":
            self.init_score()

    @torch.no_grad()
    def init_score(self) -> None:
        """Normal(0, init_std) like the other projections (uses torch's RNG)."""
        nn.init.normal_(self.score.weight, std=self.cfg.init_std)

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "score"):
            self.init_score()

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        chunk_size: int = 1024,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Class logits at every position (B, T, num_labels); with ``labels`` (B, T), the
        ``(loss_sum fp32, count int64)`` of cross-entropy at the positions where labels != -100."""
        h = self.hidden(input_ids, position_ids, cu_seqlens, max_seqlen)  # (B, T/sp, dim)
        if labels is None:
            return self.score(h)  # (B, T/sp, num_labels)
        sel = labels != -100  # (B, T/sp): the last token of each sequence held by this rank
        # score runs even when nothing is selected: under ZeRO-3 every rank must join the
        # parameter gather of every module.
        logits = self.score(h[sel]).float()  # (n_selected, num_labels)
        loss_sum = F.cross_entropy(logits, labels[sel], reduction="sum")
        return loss_sum, sel.sum()


def last_token_logits(
    model: TransformerForClassification, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """(B, num_labels) logits at position ``lengths - 1`` of each right-padded row."""
    logits = model(input_ids)  # (B, T, num_labels)
    return logits[torch.arange(len(lengths)), lengths - 1]


# ---- Hugging Face export -----------------------------------------------------------------


def classifier_hf_config(cfg: ModelConfig, num_labels: int, pad_token_id: int) -> dict[str, Any]:
    """config.json of a ``LlamaForSequenceClassification`` for this model."""
    from longtrain.model.hf import config_to_hf

    d = config_to_hf(cfg)
    d["architectures"] = ["LlamaForSequenceClassification"]
    d["num_labels"] = num_labels
    d["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    d["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    d["pad_token_id"] = pad_token_id
    d["tie_word_embeddings"] = False
    return d


def save_hf_classifier(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    num_labels: int,
    out_dir: str | Path,
    pad_token_id: int,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Write a directory ``AutoModelForSequenceClassification`` loads with no extra code.

    ``state`` holds longtrain names (``layers.0.attention.wq.weight``... and ``score.weight``;
    an LM head, if present, is dropped). transformers pools the rightmost token that is not
    ``pad_token_id``, so inputs must be right-padded with it, as the trainer's are.
    """
    from longtrain.model.hf import save_sharded, state_dict_to_hf

    if "score.weight" not in state:
        raise LongtrainError("the weights have no score.weight: not a classification model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body_cfg = cfg.replace(tie_embeddings=True)  # no lm_head row in the key map
    body = {k: v for k, v in state.items() if k not in ("score.weight", "output.weight")}
    hf_sd = state_dict_to_hf(body, body_cfg)
    hf_sd["score.weight"] = state["score.weight"]
    hf_sd = {k: v.detach().to("cpu", dtype) for k, v in hf_sd.items()}
    hf_cfg = classifier_hf_config(cfg, num_labels, pad_token_id)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    files = ["config.json"] + save_sharded(hf_sd, out, 5 * 10**9)
    if tokenizer is not None:
        from longtrain.data.tokenizer import save_hf_tokenizer  # lazy: data/ builds it

        save_hf_tokenizer(tokenizer, out)
    return files


def read_head_config(model_dir: str | Path) -> dict[str, Any] | None:
    """``head_config.json`` of a model-only directory ({"task", "num_labels", "pad_token_id"})."""
    p = Path(model_dir) / HEAD_CONFIG_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def cli_export_hf(args: argparse.Namespace) -> int:
    """``longtrain export-hf``: classification model dirs here, everything else in model.hf."""
    from longtrain.model import hf

    src = Path(args.checkpoint)
    head = read_head_config(src) if src.is_dir() else None
    if head is None:
        return hf.cli_export_hf(args)
    from safetensors.torch import load_file

    cfg = ModelConfig.from_dict(json.loads((src / hf.MODEL_CONFIG_FILE).read_text()))
    sd = hf._lora_merged(load_file(str(src / hf.MODEL_WEIGHTS_FILE)), src, args.merge_lora)
    files = save_hf_classifier(
        sd,
        cfg,
        int(head["num_labels"]),
        args.out,
        pad_token_id=int(head["pad_token_id"]),
        tokenizer=args.tokenizer,
        dtype=hf.DTYPES[args.dtype],
    )
    print(f"exported {src} -> {args.out} (LlamaForSequenceClassification, {len(files)} files)")
    return 0
