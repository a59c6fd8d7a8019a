"""What loading a cut model back would build, to check a cut against it.

`save_pretrained` writes the config and the tensors; `from_pretrained` builds the class from the
config and fills it. A cut is only sound if that fresh build has exactly the cut model's tensor
names and shapes (else the reload has missing, unexpected or mismatched weights), so both depth
and width cuts compare against a fresh model built on the meta device (no memory, no init).
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel


def fresh_like(model: PreTrainedModel) -> PreTrainedModel:
    """A new model of `model`'s class from (a copy of) its config, on the meta device."""
    with torch.device("meta"):
        return type(model)(copy.deepcopy(model.config))


def shape_mismatches(model: PreTrainedModel, fresh: PreTrainedModel) -> list[str]:
    """`name: ours vs rebuilt` for each tensor whose presence or shape differs."""
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return [f"{k}: {got.get(k)} vs {want.get(k)}" for k in sorted(want.keys() | got.keys())
            if got.get(k) != want.get(k)]
