"""Making students from the teacher's own weights (METHODS.md §2): depth cuts."""

from __future__ import annotations

import copy

from torch import nn
from transformers import PreTrainedModel

from distill.arch import arch_info, layer_stack
from distill.errors import DistillError


def evenly_spaced(num_keep: int, num_total: int) -> list[int]:
    """`num_keep` layer indices spread evenly over `num_total`, first layer always kept.

    Indices are `floor(i · L / k)`: 3 of 6 -> [0, 2, 4] (DistilBERT keeps every other
    layer), 4 of 6 -> [0, 1, 3, 4], 2 of 6 -> [0, 3].
    """
    if not 1 <= num_keep <= num_total:
        raise DistillError(f"num_layers: {num_keep} is out of range; the teacher has "
                           f"{num_total} layers, allowed: 1..{num_total}")
    return [int(i * num_total / num_keep) for i in range(num_keep)]


def check_layers(layers: list[int], num_total: int, key: str = "layers") -> None:
    """Raise a clear error if any index is outside the teacher's 0..L-1."""
    bad = [i for i in layers if not 0 <= i < num_total]
    if bad:
        raise DistillError(f"{key}: {bad} out of range; the teacher has {num_total} layers, "
                           f"allowed indices 0..{num_total - 1}")


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of `model` with only the blocks `layers` (in the given order), weights copied.

    The config's layer count and any per-layer lists are kept consistent, so the result
    saves and reloads as an ordinary Hugging Face model.
    """
    info = arch_info(model)
    check_layers(layers, len(layer_stack(model)))
    student = copy.deepcopy(model)
    stack = layer_stack(student)
    kept = nn.ModuleList([stack[i] for i in layers])
    parent_path, _, attr = info.layers_path.rpartition(".")
    parent = student.base_model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    setattr(parent, attr, kept)
    setattr(student.config, info.num_layers_key, len(layers))
    # Per-layer config lists (e.g. `layer_types`) must shrink with the stack.
    for key in ("layer_types",):
        values = getattr(student.config, key, None)
        if isinstance(values, list) and len(values) == len(stack):
            setattr(student.config, key, [values[i] for i in layers])
    return student
