"""Task heads on the Transformer: sequence classification on the last token, and its HF config.

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longtrain.model.config import ModelConfig
from longtrain.model.hf import config_to_hf
from longtrain.model.transformer import Transformer


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

    def init_units(self) -> list[tuple[list[nn.Parameter], Any]]:
        """The decoder's units, then the head (``Transformer.__init__`` runs before it exists)."""
        units = super().init_units()
        if hasattr(self, "score"):
            units.append(([self.score.weight], self.init_score))
        return units

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


# ---- Hugging Face config -----------------------------------------------------------------


def classifier_hf_config(cfg: ModelConfig, num_labels: int, pad_token_id: int) -> dict[str, Any]:
    """config.json of a ``LlamaForSequenceClassification`` for this model."""
    d = config_to_hf(cfg)
    d["architectures"] = ["LlamaForSequenceClassification"]
    d["num_labels"] = num_labels
    d["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    d["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    d["pad_token_id"] = pad_token_id
    d["tie_word_embeddings"] = False
    return d
