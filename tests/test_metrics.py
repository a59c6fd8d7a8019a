"""Accuracy and macro-F1 from confusion counts, against formulas written on the predictions
themselves (sklearn's definition of macro-F1: a class absent from both counts 0)."""

from __future__ import annotations

import pytest
import torch

from distill.tasks.metrics import confusion_matrix, confusion_metrics


def hand_metrics(preds: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, float]:
    scores = []
    for c in range(classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    return {"accuracy": float((preds == labels).float().mean()),
            "f1_macro": sum(scores) / classes}


@pytest.mark.parametrize("seed", range(20))
def test_confusion_metrics_match_the_formulas(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    classes = int(torch.randint(2, 6, (1,), generator=g))
    n = int(torch.randint(1, 300, (1,), generator=g))
    labels = torch.randint(0, classes, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.7, labels,
                        torch.randint(0, classes, (n,), generator=g))
    got = confusion_metrics(confusion_matrix(preds, labels, classes))
    assert got == hand_metrics(preds, labels, classes)  # exactly: same float32 accuracy


def test_counts_add_up_over_batches() -> None:
    labels, preds = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 2, 2, 1, 1])
    whole = confusion_matrix(preds, labels, 3)
    parts = confusion_matrix(preds[:2], labels[:2], 3) + confusion_matrix(preds[2:], labels[2:], 3)
    assert torch.equal(whole, parts) and int(whole.sum()) == 5 and int(whole.trace()) == 3
