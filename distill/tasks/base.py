"""The task interface: everything the stages, the evaluation, the teacher cache and pre-flight
need to know about *what* a model does, in one place.

A stage never asks "is this a classifier?": it asks its task for the data, the model class, the
hard loss, how teacher and student outputs line up for distillation, and the metric. Each task
is one module beside this one (`classification`, `causal_lm`); `distill.tasks.get_task` picks
one by name and `distill.tasks.infer_task` from a model's config.

Evaluation is additive so that it splits over processes: `score_batch` returns a vector of sums
for one batch (a confusion matrix, a token count and a summed NLL, ...), the sums of all
batches (and all ranks) are added, and `summarize` turns the total into metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.config.recipe import DataConfig
from distill.errors import DistillError
from distill.kd.token_losses import TopK

# What a teacher contributes to a logit loss: its logits, or its cached top-k (language models).
TeacherTarget = Tensor | TopK


@dataclass
class TeacherCache:
    """A teacher's soft labels computed once and kept on disk (see `Task.teacher_cache`)."""

    lookup: Callable[[Tensor], TeacherTarget]  # the batch's `idx` [B] -> its target
    info: dict[str, Any]  # what metrics.json records (kind, bytes per item, ...)


class TaskData(Protocol):
    """The splits of a task's data, as a task loaded them."""

    source: str

    def sizes(self) -> dict[str, int]:
        """Number of items per split (examples, or blocks of tokens)."""


class Task(ABC):
    """One kind of model output (see the module docstring). Instances hold no state."""

    name: ClassVar[str]
    # The metric that picks the best epoch and that `retention` compares, and its direction.
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    # Whether the head is made for the data (a classifier's labels): a teacher whose head was
    # never trained for them teaches noise, and pre-flight refuses it.
    head_from_data: ClassVar[bool] = False
    # Whether teacher and student are compared per token (top-k KD applies).
    token_level: ClassVar[bool] = False
    # What `distill shrink` calibrates on when no --data is given, and in batches of how many.
    default_dataset: ClassVar[str]
    calibration_batch_size: ClassVar[int] = 32

    # ------------------------------------------------------------------ data
    @abstractmethod
    def load_data(self, cfg: DataConfig) -> TaskData:
        """Read and split the data `cfg` names (errors name the file, column or key)."""

    @abstractmethod
    def tokenize(self, data: TaskData, split: str, tokenizer: PreTrainedTokenizerBase,
                 cfg: DataConfig) -> Dataset:
        """A split as a dataset whose item i is a dict with at least `input_ids`,
        `attention_mask`, `labels` and `idx` = i (the teacher cache's row); `cfg` gives the
        length and the caps."""

    @abstractmethod
    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
        """Items -> a batch of tensors: input_ids / attention_mask [B, n], labels, idx [B]."""

    def batch_items(self, batch: dict[str, Tensor]) -> int:
        """Examples in a batch (calibration counts them)."""
        return int(batch["input_ids"].shape[0])

    def sample_problem(self, data: TaskData) -> str | None:
        """Why `data.teacher_samples` cannot extend this data's training split (None: it
        can). Only language models train on text sampled from the teacher."""
        return (f"data.teacher_samples: adds text sampled from the teacher, for causal-lm; "
                f"this run's task is {self.name}")

    def add_samples(self, dataset: Dataset, blocks: Tensor, seed: int) -> Dataset:
        """The training split with `blocks` [N, n] of token ids sampled from the teacher
        added, shuffled in with `seed` (only where `sample_problem` is None)."""
        raise DistillError(self.sample_problem(dataset) or "data.teacher_samples: unsupported")

    @abstractmethod
    def latency_inputs(self, data: TaskData, split: str, tokenizer: PreTrainedTokenizerBase,
                       batch: int, max_length: int) -> dict[str, Tensor]:
        """`batch` real inputs of `max_length` tokens (the worst case the model serves)."""

    # ------------------------------------------------------------------ models
    @abstractmethod
    def load_model(self, name: str, data: TaskData, *, trust_remote_code: bool = False,
                   allow_pickle: bool = False, load_options: dict[str, Any] | None = None,
                   key: str | None = "teacher.allow_pickle") -> tuple[PreTrainedModel, bool]:
        """The model with this task's head (safetensors only, unless `allow_pickle`).

        Returns:
            (model in eval mode, whether its head holds trained weights for this data).
        """

    @abstractmethod
    def meta_model(self, config: PretrainedConfig, data: TaskData,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        """The task's model of `config` on the meta device (shapes, no memory)."""

    def check_model(self, config: PretrainedConfig, data: TaskData, model_path: str) -> None:
        """Raise a `DistillError` when a saved model (its config) cannot be evaluated on
        `data` (a head for other labels); by default every model of the task can."""

    @abstractmethod
    def accepts(self, config: PretrainedConfig) -> bool:
        """Whether a model of this config was saved for this task (its `architectures`)."""

    def already_tuned(self, head_trained: bool) -> bool:
        """Whether a `finetune` stage with `skip_if_tuned` has nothing to do for a teacher
        whose head was (`head_trained`) loaded trained for this data."""
        return head_trained

    def data_name(self, data: TaskData) -> str:
        """The data in a few words, for messages."""
        return data.source

    # ------------------------------------------------------------------ losses
    @abstractmethod
    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The task's own loss on the labels, a float32 scalar (0 when nothing is labelled)."""

    @abstractmethod
    def kd_loss(self, student_logits: Tensor, teacher: TeacherTarget, batch: dict[str, Tensor],
                *, temperature: float, kind: str = "forward_kl", beta: float = 0.5,
                skew: float = 0.1) -> Tensor:
        """`T² · divergence(p_T, p_S)` over what carries loss (examples, or target tokens)."""

    @abstractmethod
    def teacher_cache(self, folder: Path, teacher: Callable[[], nn.Module], dataset: Dataset,
                      loader: DataLoader, *, teacher_source: str,
                      tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                      temperature: float, top_k: int | None, accelerator: Accelerator,
                      bf16: bool = False) -> TeacherCache | None:
        """The teacher's soft labels for every item of `dataset` (the loader's batches, in
        order), read from `folder` when they are there and belong to this teacher and data,
        else computed (`teacher()` loads it) and stored; None when this task caches nothing
        for these settings. `bf16`: the stage trains under bf16 autocast, so a live teacher
        would run under it too (a task may compute its cache so). Every process calls it."""

    def token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, n] bool: the positions whose hidden states are compared (real tokens)."""
        return batch["attention_mask"].bool()

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def score_batch(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """float64 vector of additive sums for one batch (see the module docstring)."""

    @abstractmethod
    def summarize(self, sums: Tensor, data: TaskData) -> dict[str, float]:
        """Metrics from the summed vector; `self.metric` is among them."""

    def serving_metrics(self, model: nn.Module, data: TaskData, split: str,
                        tokenizer: PreTrainedTokenizerBase, runs: int) -> dict[str, Any]:
        """What the evaluation adds beside the forward latency (a language model's generation
        speed and greedy samples); nothing by default."""
        return {}

    @abstractmethod
    def describe(self, data: TaskData) -> dict[str, Any]:
        """What `report.json` records about the data beyond its sizes (labels, tokens, ...)."""

    def retention(self, student: float, teacher: float) -> float | None:
        """How much of the teacher's quality the student keeps (1.0 = all): metric ratio for
        higher-is-better metrics, teacher / student for lower-is-better ones (perplexity)."""
        if not teacher or not student:
            return None
        return student / teacher if self.higher_is_better else teacher / student

    def better(self, new: float, best: float | None) -> bool:
        """Whether `new` beats `best` (None: nothing yet)."""
        if best is None:
            return True
        return new > best if self.higher_is_better else new < best


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live: batches go there."""
    return next(model.parameters()).device
