"""Where each architecture keeps its layer stack.

Only what depth cuts need for now: the path of the `nn.ModuleList` of blocks (relative to the
model's `base_model`) and the config key that counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.errors import DistillError


@dataclass(frozen=True)
class ArchInfo:
    """Layout facts of one model family."""

    family: str
    layers_path: str  # dotted path from `model.base_model` to the ModuleList of blocks
    num_layers_key: str  # config attribute holding the number of blocks


_FAMILIES: dict[str, ArchInfo] = {
    "bert": ArchInfo("bert", "encoder.layer", "num_hidden_layers"),
    "roberta": ArchInfo("roberta", "encoder.layer", "num_hidden_layers"),
    "xlm-roberta": ArchInfo("xlm-roberta", "encoder.layer", "num_hidden_layers"),
    "electra": ArchInfo("electra", "encoder.layer", "num_hidden_layers"),
}


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def arch_info(model: nn.Module) -> ArchInfo:
    """The layout of `model`'s family, or a clear error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise DistillError(f"architecture {model_type!r} is not supported for layer selection; "
                           f"supported: {', '.join(supported_families())}")
    return _FAMILIES[model_type]


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of `model`."""
    node: nn.Module = model.base_model
    for part in arch_info(model).layers_path.split("."):
        node = getattr(node, part)
    assert isinstance(node, nn.ModuleList), f"expected a ModuleList, got {type(node)}"
    return node


def num_layers(model: nn.Module) -> int:
    return len(layer_stack(model))
