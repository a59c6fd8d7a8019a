"""What the stages of one run share: recipe, run folder, data, tokenizer, accelerator, models.

Stages talk only through artifacts on disk; the context merely remembers *where* the current
teacher and the models made so far are, and caches the tokenized splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from distill.data import TaskData, TokenizedSplit, make_loader, tokenize_split
from distill.metrics import classification_metrics
from distill.recipe import Recipe


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

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

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
        loader = self.loader("validation", batch_size)
        return classification_metrics(self.accelerator.unwrap_model(model), loader,
                                      self.num_labels, self.accelerator.device)["accuracy"]
