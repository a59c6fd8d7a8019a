"""Classification metrics (confusion matrix, accuracy, macro-F1) and forward-pass latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> torch.Tensor:
    """Counts [true class, predicted class] (int64, [C, C]) of predictions [N] vs labels [N];
    summable over batches and processes."""
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2)
    return flat.view(num_classes, num_classes)


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1; a class absent from both
    predictions and labels gives F1 = 0, as sklearn) from a [true, predicted] count matrix."""
    total = int(confusion.sum())
    tp = confusion.diag()
    # float32 division, as `(preds == labels).float().mean()` gives
    accuracy = float(torch.tensor(float(tp.sum())) / total) if total else float("nan")
    scores = []
    for c in range(confusion.shape[0]):
        t = int(tp[c])
        fp, fn = int(confusion[:, c].sum()) - t, int(confusion[c].sum()) - t
        denom = 2 * t + fp + fn
        scores.append(2 * t / denom if denom else 0.0)
    return {"accuracy": accuracy, "f1_macro": sum(scores) / len(scores)}


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
