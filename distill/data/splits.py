"""The one rule that splits whole units (documents, conversations) into train/validation/test.

The units, in a fixed order, are shuffled with `numpy.random.default_rng(split_seed)`: test is
the first int(0.1·n), validation the next int(0.1·n), train the rest; within a split the units
keep their original order. Fixed by the seed, so numbers from different runs compare. A source
that brings some splits of its own (a hub dataset with train and test) keeps them, and only the
missing ones are carved out of its train split by the same rule (`carve_missing`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from distill.config.schema import check_seed
from distill.errors import DistillError

EVAL_FRACTION = 0.1


def holdout_split(n: int, split_seed: int, source: str, units: str) -> dict[str, list[int]]:
    """Indices of the `n` units in each split, in their original order.

    Raises:
        DistillError: fewer than 10 units (too few to hold out 10 % twice), naming `source`.
    """
    check_seed(split_seed, "split_seed")
    k = int(EVAL_FRACTION * n)
    if k == 0:
        raise DistillError(f"{source} has {n} {units}, too few to hold out 10 % for test and "
                           f"10 % for validation; give at least 10")
    order = np.random.default_rng(split_seed).permutation(n)
    parts = {"test": order[:k], "validation": order[k:2 * k], "train": order[2 * k:]}
    return {split: sorted(idx.tolist()) for split, idx in parts.items()}


T = TypeVar("T")


def carve_missing(splits: dict[str, list[T]], split_seed: int, source: str, units: str
                  ) -> dict[str, list[T]]:
    """All three splits: those `splits` has, the missing ones carved out of its train split.

    The train units are shuffled with `split_seed`; each missing split takes the next
    int(0.1·n) of them (test first, then validation, as in `holdout_split`), train keeps the
    rest; every split keeps its units' original order.

    Raises:
        DistillError: a split to carve from fewer than 10 train units, naming `source`.
    """
    train = splits["train"]
    missing = [s for s in ("test", "validation") if s not in splits]
    if not missing:
        return dict(splits)
    n = len(train)
    k = int(EVAL_FRACTION * n)
    if k == 0:
        raise DistillError(f"{source} has {n} {units} in train, too few to hold out 10 % for "
                           f"{' and '.join(missing)}; give at least 10")
    order = np.random.default_rng(split_seed).permutation(n)
    out: dict[str, Any] = dict(splits)
    for j, split in enumerate(missing):
        out[split] = [train[i] for i in sorted(order[j * k:(j + 1) * k].tolist())]
    out["train"] = [train[i] for i in sorted(order[len(missing) * k:].tolist())]
    return out
