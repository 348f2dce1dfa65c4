"""What is learned: a task supplies the model head, the batches and the validation metrics.

The trainer is the same for every task (in the spirit of torchtitan's TrainSpec): it asks the
task for a loader per stage and for validation numbers at each evaluation. Two tasks exist:

- :class:`LMTask`: next-token loss on a prepared data directory (pretraining, SFT data with
  loss masks, context extension), windows from :class:`~longtrain.data.curriculum.StagedLoader`
  so a curriculum of window lengths continues the data order without repeating a token;
- :class:`ClassifyTask`: a linear head on each sequence's last token over JSONL rows
  (``finetune.task=classify``), scored by loss, accuracy and macro-F1.

Both feed the model batches of the loader contract (``longtrain.data.loader``: inputs and
already-shifted labels cut for this rank's SP shard), so the step, the loss normalisation and
sequence parallelism are the task's business nowhere.
"""

from __future__ import annotations

from typing import Any

import torch

from longtrain.data.classify import ClassifyData, ClassifyLoader
from longtrain.data.curriculum import StagedLoader
from longtrain.data.mixture import MixtureLoader
from longtrain.train.config import JobConfig
from longtrain.train.eval.classify import evaluate_classify
from longtrain.train.eval.validator import validation_loss
from longtrain.train.parallel import Topology
from longtrain.train.stages import Stage


class LMTask:
    """Language modelling on ``data.dir``."""

    name = "lm"

    def __init__(self, job: JobConfig, tokenizer_hash: str | None, longest: int) -> None:
        self.job, self.tokenizer_hash, self.longest = job, tokenizer_hash, longest
        self.pad_token_id: int | None = None

    def loader(
        self, stage: Stage, topo: Topology, fresh: bool = False
    ) -> StagedLoader | MixtureLoader:
        """This rank's training micro-batches for ``stage`` (``fresh``: the stage starts now,
        so a mixture of its own continues a checkpoint made under the previous one)."""
        job = self.job
        mix = stage.mix or job.data.mix
        args = (self.longest, stage.seq_len, stage.micro_batch, topo.dp_rank, topo.dp,
                topo.sp_rank, topo.sp, job.seed, job.data.attention, self.tokenizer_hash,
                topo.ring)  # fmt: skip
        if not mix:
            return StagedLoader(job.data.dir, *args)
        loader = MixtureLoader(mix, *args)
        loader.new_segment_ok = fresh
        return loader

    def validate(
        self, engine: Any, stage_job: JobConfig, topo: Topology, device: torch.device
    ) -> dict[str, float]:
        """``val_loss`` and ``val_ppl`` over the held-out split at the stage's window length."""
        return validation_loss(engine, stage_job, topo, device)


class ClassifyTask:
    """Sequence classification of JSONL rows (``train.jsonl`` / ``val.jsonl`` in data.dir)."""

    name = "classify"

    def __init__(self, job: JobConfig, longest: int) -> None:
        self.job = job
        tok, n = job.data.tokenizer, job.finetune.num_labels
        self.train = ClassifyData(job.data.dir, "train", tok, longest, n)
        self.val = ClassifyData(job.data.dir, "val", tok, longest, n)
        self.pad_token_id: int | None = self.train.tok.pad_id
        self.tokenizer_hash: str | None = self.train.tok.hash

    def loader(self, stage: Stage, topo: Topology, fresh: bool = False) -> ClassifyLoader:
        """This rank's training micro-batches."""
        return ClassifyLoader(
            self.train, stage.micro_batch, topo.dp_rank, topo.dp, topo.sp_rank, topo.sp,
            self.job.seed, topo.ring,
        )  # fmt: skip

    def validate(
        self, engine: Any, stage_job: JobConfig, topo: Topology, device: torch.device
    ) -> dict[str, float]:
        """``val_loss``, ``val_acc`` and ``val_f1`` over every validation row."""
        n, mb = stage_job.finetune.num_labels, stage_job.train.micro_batch
        return evaluate_classify(engine, self.val, n, mb, topo, device)


Task = LMTask | ClassifyTask


def make_task(job: JobConfig, tokenizer_hash: str | None, longest: int) -> Task:
    """The job's task (``finetune.task``)."""
    if job.finetune.task == "classify":
        return ClassifyTask(job, longest)
    return LMTask(job, tokenizer_hash, longest)
