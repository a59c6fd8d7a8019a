"""The one rule that splits whole units (documents, conversations) into train/validation/test.

The units, in a fixed order, are shuffled with `numpy.random.default_rng(split_seed)`: test is
the first int(0.1·n), validation the next int(0.1·n), train the rest; within a split the units
keep their original order. Fixed by the seed, so numbers from different runs compare.
"""

from __future__ import annotations

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
