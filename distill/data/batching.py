"""Tokenized items -> padded batches -> seeded, reproducible loaders (every task uses these).

    loader = make_loader(dataset, task.collate(tokenizer), batch_size=32, shuffle=True, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from distill.errors import DistillError


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the pad token's, else the eos token's (decoder-only
    tokenizers often have no pad token; padded positions are masked, so either works)."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    if value is None:
        raise DistillError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos "
                           "token; set `tokenizer.pad_token` before batching")
    return int(value)


@dataclass
class PadCollator:
    """Pads a batch to its own longest example (dynamic padding: short batches stay short).

    Items: `input_ids`, `attention_mask` (lists of n_i ints), `labels` (an int, or a list of
    n_i ints for token-level tasks, padded with -100), `idx`. Batch: input_ids /
    attention_mask [B, n], labels [B] or [B, n], idx [B], all int64.
    """

    pad_id: int
    left: bool  # pad on the left (the tokenizer's padding_side), e.g. for decoder-only models
    ignore_index: int = -100

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        per_token = isinstance(items[0]["labels"], list)
        labels = (torch.full((len(items), width), self.ignore_index, dtype=torch.long)
                  if per_token else
                  torch.tensor([it["labels"] for it in items], dtype=torch.long))
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(width - n, width) if self.left else slice(0, n)
            input_ids[row, cols] = torch.tensor(it["input_ids"], dtype=torch.long)
            attention_mask[row, cols] = torch.tensor(it["attention_mask"], dtype=torch.long)
            if per_token:
                labels[row, cols] = torch.tensor(it["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "idx": torch.tensor([it["idx"] for it in items], dtype=torch.long)}


def make_loader(ds: Dataset, collate: Callable[[list[dict]], dict], batch_size: int,
                shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader of padded LongTensor batches (see `PadCollator`).

    Args:
        ds: a tokenized split (a task's `tokenize`).
        collate: the task's collator.
        batch_size: examples per batch (the last batch may be smaller).
        shuffle: reshuffle every pass. The order comes from a generator seeded with `seed`, so
            two loaders built with the same seed yield the same sequence of epochs.
        seed: the shuffle seed.
    """
    # Worker processes would buy nothing here (items are pre-tokenized lists) and cost start-up.
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate, num_workers=0)


def pad_collator(tokenizer: Any) -> PadCollator:
    """The collator for `tokenizer`: its pad id and padding side."""
    return PadCollator(pad_id(tokenizer), getattr(tokenizer, "padding_side", "right") == "left")
