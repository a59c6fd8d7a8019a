"""What the stages of one run share: recipe, run folder, data, tokenizer, accelerator, models.

Stages talk only through artifacts on disk; the context merely remembers *where* the current
teacher and the models made so far are, and caches the tokenized splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.train import sharding
from distill.data.tables import TaskData, TokenizedSplit, make_loader, tokenize_split
from distill.tasks.metrics import confusion_matrix, confusion_metrics, predict
from distill.config.recipe import Recipe

T = TypeVar("T")


@dataclass
class ModelRef:
    """A model the run produced (or started from)."""

    label: str  # "teacher" or "NN-kind"
    path: str  # HF directory, built-in name or hub id
    stage_index: int | None = None
    step_index: int | None = None  # for models made by the steps of a shrink stage
    kind: str = "model"  # "model" (an HF directory) or "adapter" (a PEFT adapter folder)


@dataclass
class StageResult:
    """What a stage returns to the pipeline."""

    status: str  # "done" | "skipped"
    model_dir: Path | None = None
    metrics: dict = field(default_factory=dict)  # written to the stage's metrics.json
    # Stages that make several models (shrink steps): (step name, model dir), in order;
    # `model_dir` is then the last of them.
    step_models: list[tuple[str, Path]] = field(default_factory=list)
    # Metrics the stage measured itself (adapt: on its own task), for the report.
    model_metrics: dict | None = None
    artifact_kind: str = "model"  # what `model_dir` holds: "model" or "adapter"


@dataclass
class RunContext:
    """Shared state of one run (see module docstring)."""

    recipe: Recipe
    run_dir: Path
    data: TaskData
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    teacher_source: str
    console: Console = field(default_factory=Console)
    models: list[ModelRef] = field(default_factory=list)
    _tokenized: dict[str, TokenizedSplit] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Under `accelerate launch` every rank runs the same code: only rank 0 talks.
        if not self.is_main:
            self.console.quiet = True

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank (a decision all ranks must share); picklable values."""
        if self.accelerator.num_processes == 1:
            return value
        return broadcast_object_list([value], from_process=0)[0]

    def tokenized(self, split: str) -> TokenizedSplit:
        """The split tokenized once per run (all stages share one tokenizer)."""
        if split not in self._tokenized:
            self._tokenized[split] = tokenize_split(getattr(self.data, split), self.tokenizer,
                                                    self.recipe.data.max_length)
        return self._tokenized[split]

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               seed: int = 0) -> DataLoader:
        return make_loader(self.tokenized(split), self.tokenizer, batch_size, shuffle, seed)

    def stage_seed(self, stage_seed: int | None) -> int:
        """Seed everything for a stage: its own seed, else the recipe's."""
        seed = self.recipe.seed if stage_seed is None else stage_seed
        set_seed(seed)
        return seed

    @property
    def num_labels(self) -> int:
        return len(self.data.label_names)

    def validation_accuracy(self, model: nn.Module, batch_size: int) -> float:
        """Validation accuracy of `model` (the metric that picks the best epoch)."""
        return self.metrics(model, "validation", batch_size)["accuracy"]

    def metrics(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float]:
        """{"accuracy", "f1_macro"} of `model` on a split; every rank must call it.

        With N processes rank r predicts batches r, r+N, ... of the same batches one process
        would see, and the confusion matrices are summed over the ranks: every rank gets the
        same numbers, equal to the 1-process ones (the predictions are computed on identical
        batches). A model sharded by FSDP (validation inside a loop) gathers its weights in
        every forward, so there every rank runs the same number of forwards: a rank short of
        one batch repeats one and ignores its predictions."""
        model = self.accelerator.unwrap_model(model)
        device = next(model.parameters()).device
        confusion = torch.zeros(self.num_labels * self.num_labels, dtype=torch.int64)
        loader = self.loader(split, batch_size)
        n = self.accelerator.num_processes
        forwards = -(-len(loader) // n) if sharding.is_fsdp(model) else 0
        done, last = 0, None
        for batch in self._shard(loader):
            preds, labels = predict(model, [batch], device)
            confusion += confusion_matrix(preds, labels, self.num_labels).flatten()
            done, last = done + 1, batch
        for _ in range(forwards - done):  # collective forwards only, nothing counted
            predict(model, [last if last is not None else next(iter(loader))], device)
        if self.accelerator.num_processes > 1:
            confusion = self.accelerator.reduce(confusion.to(self.accelerator.device),
                                                reduction="sum").cpu()
        return confusion_metrics(confusion.view(self.num_labels, self.num_labels))

    def _shard(self, loader: DataLoader) -> Iterator[dict]:
        """This rank's share of a loader's batches (all of them with one process)."""
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        for i, batch in enumerate(loader):
            if i % n == rank:
                yield batch

