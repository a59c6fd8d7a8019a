"""Task metrics, predictions and CPU latency of classifiers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable[dict], device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels over a loader.

    Returns:
        (predictions [N], labels [N]) as int64 CPU tensors.
    """
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for batch in loader:
        out = model(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device))
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


def f1_macro(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class absent from both gives F1 = 0, as sklearn)."""
    scores = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / num_classes


def classification_metrics(model: nn.Module, loader: DataLoader, num_classes: int,
                           device: torch.device | str = "cpu") -> dict[str, float]:
    """{"accuracy": …, "f1_macro": …} of `model` on `loader`."""
    preds, labels = predict(model, loader, device)
    return {"accuracy": accuracy(preds, labels), "f1_macro": f1_macro(preds, labels, num_classes)}


@torch.inference_mode()
def latency_ms(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of one forward pass, in milliseconds (fp32, current thread count).

    Args:
        input_ids / attention_mask: [B, n], already on the model's device.
    """
    model.eval()
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
