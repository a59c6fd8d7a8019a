"""`sequence-classification`: one label per text; accuracy (higher is better) and macro-F1.

Data: built-in tables, local files and folders (`distill.data.tables`). Model: an
`AutoModelForSequenceClassification` whose head is made for the data's labels. Distillation
compares the teacher's and the student's class distributions per example ([B, C] logits).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.config.recipe import DataConfig
from distill.data.batching import pad_collator
from distill.data.tables import TaskData, TokenizedSplit, load_task_data, tokenize_split
from distill.errors import DistillError
from distill.kd.losses import hard_ce_loss, kd_kl_loss
from distill.models.loading import load_checked, load_config
from distill.kd import teacher_cache
from distill.tasks.base import Task, TeacherCache, TeacherTarget, model_device
from distill.tasks.metrics import confusion_matrix, confusion_metrics


class SequenceClassification(Task):
    name: ClassVar[str] = "sequence-classification"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    head_from_data: ClassVar[bool] = True
    default_dataset: ClassVar[str] = "builtin:rotten_tomatoes"

    # ------------------------------------------------------------------ data
    def load_data(self, cfg: DataConfig) -> TaskData:
        return load_task_data(cfg)

    def tokenize(self, data: TaskData, split: str, tokenizer: PreTrainedTokenizerBase,
                 cfg: DataConfig) -> TokenizedSplit:
        return tokenize_split(getattr(data, split), tokenizer, cfg.max_length)

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict]:
        return pad_collator(tokenizer)

    def latency_inputs(self, data: TaskData, split: str, tokenizer: PreTrainedTokenizerBase,
                       batch: int, max_length: int) -> dict[str, Tensor]:
        texts = getattr(data, split).texts
        texts = [texts[i % len(texts)] for i in range(batch)]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ------------------------------------------------------------------ models
    def load_model(self, name: str, data: TaskData, *, trust_remote_code: bool = False,
                   allow_pickle: bool = False, load_options: dict[str, Any] | None = None,
                   key: str | None = "teacher.allow_pickle") -> tuple[PreTrainedModel, bool]:
        """A classifier with a head for the data's labels: the saved head when it was made for
        exactly these labels, else a fresh one (any other tensor must fit: `load_checked`)."""
        label_names = data.label_names
        id2label = dict(enumerate(label_names))
        config = load_config(name, trust_remote_code)
        old = getattr(config, "id2label", None) or {}
        same_labels = [old.get(i, old.get(str(i))) for i in range(len(old))] == label_names
        config.num_labels = len(label_names)
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
        model, fresh_head = load_checked(
            AutoModelForSequenceClassification, name, config=config, key=key,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            **(load_options or {}))
        return model.eval(), same_labels and not fresh_head

    def meta_model(self, config: PretrainedConfig, data: TaskData,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        num_labels = len(data.label_names)
        config = copy.deepcopy(config)
        config.num_labels = num_labels
        config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        try:
            with torch.device("meta"):
                return AutoModelForSequenceClassification.from_config(
                    config, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistillError(f"{config.model_type} models have no sequence-classification "
                               f"form in transformers ({first[:200]})") from None

    def accepts(self, config: PretrainedConfig) -> bool:
        return any(a.endswith("ForSequenceClassification")
                   for a in (config.architectures or ()))

    def data_name(self, data: TaskData) -> str:
        return str(data.label_names)

    # ------------------------------------------------------------------ losses
    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return hard_ce_loss(logits, batch["labels"])

    def kd_loss(self, student_logits: Tensor, teacher: TeacherTarget, batch: dict[str, Tensor],
                *, temperature: float, kind: str = "forward_kl", beta: float = 0.5,
                skew: float = 0.1) -> Tensor:
        """`T² · D(p_T, p_S)` averaged over the examples ([B, C] logits)."""
        assert isinstance(teacher, Tensor), "classifier teachers give logits"
        return kd_kl_loss(student_logits, teacher, temperature, kind=kind, beta=beta, skew=skew)

    def teacher_cache(self, folder: Path, teacher: Callable[[], nn.Module], dataset: Dataset,
                      loader: DataLoader, *, teacher_source: str,
                      tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                      temperature: float, top_k: int | None, accelerator: Accelerator,
                      bf16: bool = False) -> TeacherCache:
        """Every training example's full logits, [N, C] float32 (a few hundred KB), computed in
        float32 whatever `bf16` says: one forward of an encoder over the training split is
        seconds, and the classification recipes' numbers were measured with these logits."""
        key = teacher_cache.fingerprint(teacher_source, len(dataset), data_cfg.max_length,
                                        dataset[0]["input_ids"])
        logits = teacher_cache.load_or_compute(
            folder, key, teacher, loader, len(dataset), accelerator.device,
            write=accelerator.is_main_process, accelerator=accelerator)
        return TeacherCache(lambda idx: logits[idx],
                            {"kind": "logits", "bytes_per_example": 4 * logits.shape[-1]})

    # ------------------------------------------------------------------ evaluation
    def score_batch(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The batch's confusion matrix [true, predicted], flattened, as float64."""
        device = model_device(model)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        classes = logits.shape[-1]
        return confusion_matrix(logits.argmax(-1).cpu(), batch["labels"].cpu(),
                                classes).flatten().double()

    def summarize(self, sums: Tensor, data: TaskData) -> dict[str, float]:
        classes = len(data.label_names)
        return confusion_metrics(sums.round().long().view(classes, classes))

    def describe(self, data: TaskData) -> dict[str, Any]:
        return {"labels": data.label_names}

    def check_model(self, config: PretrainedConfig, data: TaskData, model_path: str) -> None:
        """The saved head must fit the data's labels (same count; same names when named)."""
        label_names = data.label_names
        id2label = getattr(config, "id2label", {}) or {}
        names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
        if len(names) != len(label_names):
            raise DistillError(f"{model_path} predicts {len(names)} labels {names} but the data "
                               f"has {len(label_names)}: {label_names}")
        generic = all(n.startswith("LABEL_") for n in names)
        if not generic and names != label_names:
            raise DistillError(f"{model_path} was trained for labels {names}, the data has "
                               f"{label_names}")

