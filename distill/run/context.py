"""What the stages of one run share: recipe, run folder, data, tokenizer, accelerator, models.

Stages talk only through artifacts on disk; the context merely remembers *where* the current
teacher and the models made so far are, and caches the tokenized splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.kd import teacher_samples
from distill.models.loading import check_weights
from distill.train import sharding
from distill.train.precision import resolve
from distill.config.recipe import Recipe
from distill.data.batching import make_loader
from distill.data.text import sequence_prefix
from distill.errors import DistillError
from distill.files import cache_root
from distill.tasks.base import Task, TaskData

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
    task: Task
    console: Console = field(default_factory=Console)
    models: list[ModelRef] = field(default_factory=list)
    # Loads the run's frozen teacher (set by the pipeline): `data.teacher_samples` samples
    # from it when the training split is first tokenized.
    teacher_model: Callable[[], nn.Module] | None = None
    # What `data.teacher_samples` added (blocks, seconds, ...); None without it.
    samples_info: dict | None = None
    _tokenized: dict[str, Dataset] = field(default_factory=dict, repr=False)

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

    def tokenized(self, split: str) -> Dataset:
        """The split tokenized once per run (all stages share one tokenizer)."""
        if split not in self._tokenized:
            dataset = self.task.tokenize(self.data, split, self.tokenizer, self.recipe.data)
            if split == "train" and self.recipe.data.teacher_samples:
                dataset = self._with_teacher_samples(dataset)
            self._tokenized[split] = dataset
        return self._tokenized[split]

    def _with_teacher_samples(self, dataset: Dataset) -> Dataset:
        """The training split plus `data.teacher_samples` blocks sampled from the run's
        current teacher (`distill.kd.teacher_samples`), kept in the toolkit's cache (like
        tokenized data: later runs with the same teacher and settings read them): rank 0
        samples what the cache lacks, the other ranks then read it."""
        cfg = self.recipe.data
        assert cfg.teacher_samples is not None
        if self.teacher_model is None:
            raise DistillError("data.teacher_samples: this run has no teacher to sample from")
        problem = self.task.sample_problem(self.data)
        if problem:
            raise DistillError(problem)
        bf16 = self.from_main(resolve("auto", self.accelerator.device.type))
        files = check_weights(self.teacher_source, allow_pickle=True)  # hashed, never loaded
        key = teacher_samples.fingerprint(files, self.tokenizer.get_vocab(),
                                          cfg.teacher_samples, cfg.max_length, cfg.split_seed,
                                          bf16)
        if not files:  # a hub id: nothing local to hash, so its name stands for the weights
            key = hashlib.sha256(f"{self.teacher_source}\n{key}".encode()).hexdigest()
        pad = self.tokenizer.pad_token_id
        start = teacher_samples.start_token(self.tokenizer)
        # A tokenizer that opens every sequence with BOS: the samples open with it too.
        keep_start = sequence_prefix(self.tokenizer) == [start]
        if keep_start:
            key = hashlib.sha256(f"{key}\nkeep_start".encode()).hexdigest()

        def get() -> tuple[torch.Tensor, dict]:
            return teacher_samples.load_or_sample(
                cache_root() / "teacher_samples", key, self.teacher_model, start,
                cfg.teacher_samples, cfg.max_length, cfg.split_seed, bf16, pad,
                self.tokenizer.eos_token_id, keep_start)

        if self.is_main:
            self.console.print(f"  sampling {cfg.teacher_samples} training blocks of "
                               f"{cfg.max_length} tokens from the teacher (or reading them)")
        got = get() if self.is_main else None
        self.accelerator.wait_for_everyone()
        blocks, self.samples_info = got or get()
        return self.task.add_samples(dataset, blocks, cfg.split_seed)

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               seed: int = 0, group_by_length: bool = True, accumulate: int = 1
               ) -> DataLoader:
        return make_loader(self.tokenized(split), self.task.collate(self.tokenizer),
                           batch_size, shuffle, seed, group_by_length, accumulate)

    def stage_seed(self, stage_seed: int | None) -> int:
        """Seed everything for a stage: its own seed, else the recipe's."""
        seed = self.recipe.seed if stage_seed is None else stage_seed
        set_seed(seed)
        return seed

    def load_model(self, source: str, allow_pickle: bool | None = None,
                   load_options: dict | None = None) -> tuple[PreTrainedModel, bool]:
        """A model of the run's task from `source` (see `Task.load_model`): the teacher's
        `trust_remote_code`, and its `allow_pickle` unless given."""
        spec = self.recipe.teacher
        return self.task.load_model(
            source, self.data, trust_remote_code=spec.trust_remote_code,
            allow_pickle=spec.allow_pickle if allow_pickle is None else allow_pickle,
            load_options=load_options)

    def validation_metric(self, model: nn.Module, batch_size: int) -> float:
        """The task's metric of `model` on the validation split (picks the best epoch)."""
        return self.metrics(model, "validation", batch_size)[self.task.metric]

    def validation(self, model: nn.Module, batch_size: int) -> dict[str, Any]:
        """`train_loop` keywords that validate `model` each epoch with the task's metric."""
        return {"evaluate": lambda: self.validation_metric(model, batch_size),
                "metric_name": self.task.metric, "maximize": self.task.higher_is_better}

    @torch.inference_mode()
    def metrics(self, model: nn.Module, split: str, batch_size: int) -> dict[str, float]:
        """The task's metrics of `model` on a split; every rank must call it.

        With N processes rank r scores batches r, r+N, ... of the same batches one process
        would see, and the task's additive sums are added over the ranks: every rank gets the
        same numbers, equal to the 1-process ones. A model sharded by FSDP (validation inside
        a loop) gathers its weights in every forward, so there every rank runs the same
        number of forwards: a rank short of one batch repeats one and ignores its result."""
        model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        loader = self.loader(split, batch_size)
        n = self.accelerator.num_processes
        forwards = -(-len(loader) // n) if sharding.is_fsdp(model) else 0
        done, last, sums = 0, None, None
        try:
            for batch in self._shard(loader):
                scored = self.task.score_batch(model, batch)
                sums = scored if sums is None else sums + scored
                done, last = done + 1, batch
            for _ in range(forwards - done):  # collective forwards only, nothing counted
                self.task.score_batch(model, last if last is not None else next(iter(loader)))
        finally:
            model.train(was_training)
        if n > 1:
            size = torch.tensor([0 if sums is None else sums.numel()],
                                device=self.accelerator.device)
            width = int(self.accelerator.reduce(size, reduction="max"))
            sums = torch.zeros(width, dtype=torch.float64) if sums is None else sums
            sums = self.accelerator.reduce(sums.to(self.accelerator.device),
                                           reduction="sum").cpu()
        if sums is None:
            raise DistillError(f"the {split} split is empty: nothing to evaluate")
        return self.task.summarize(sums, self.data)

    def _shard(self, loader: DataLoader) -> Iterator[dict]:
        """This rank's share of a loader's batches (all of them with one process)."""
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        for i, batch in enumerate(loader):
            if i % n == rank:
                yield batch

