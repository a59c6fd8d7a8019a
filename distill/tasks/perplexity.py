"""Perplexity of a causal language model: exp of the mean next-token negative log-likelihood.

The mean is over every predicted token of every batch (token-weighted), not a mean of batch
means, so the number does not depend on how the blocks were batched. Logits are cast to
float32 before the softmax and the sums are kept in float64, so bf16 models and long
evaluations lose no precision in the reduction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from distill.kd.token_losses import IGNORE_INDEX, token_nll


def next_token_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unshifted labels of a causal-LM batch: `labels` if given, else `input_ids` with padding
    (attention_mask == 0) set to IGNORE_INDEX.

    Returns:
        (B, T) int64.
    """
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `batches`.

    The model runs in eval mode (dropout off) and is put back in its previous mode afterwards.

    Args:
        model: a causal LM whose output has `.logits` of shape (B, T, V).
        batches: dicts with `input_ids` (B, T), optional `attention_mask` (B, T) and optional
            unshifted `labels` (B, T) (IGNORE_INDEX where nothing is predicted), e.g. from
            `distill.data.text.lm_batches`.

    Returns:
        The perplexity (float('inf') if the NLL overflows exp).

    Raises:
        ValueError: the batches hold no token to predict.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            labels = next_token_labels(batch)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")
                      if k in batch}
            logits = model(**inputs, use_cache=False).logits
            nll, n = token_nll(logits, labels)
            total += float(nll.double())
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to predict: every batch is empty or fully masked")
    mean = total / count
    return math.exp(mean) if mean < 700 else float("inf")
