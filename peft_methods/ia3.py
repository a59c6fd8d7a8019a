"""(IA)³ (Liu et al. 2022), exactly as Hugging Face PEFT implements it.

Learned vectors rescale the keys, the values and the feed-forward intermediate activation
(METHODS.md §3). Each targeted linear layer gets one vector `ia3_l`, initialised to 1 (so the
model is unchanged at step 0):

- ordinary target (keys, values):   y = (x W^T + b) ⊙ l      l: [out, 1]  (rescales the output)
- feed-forward target (FFN output): y = (x ⊙ l) W^T + b      l: [1, in]   (rescales its input,
  which is the intermediate activation)

Merge folds the vector into the weight (`W ← W ⊙ l`, and `b ← b ⊙ l` for ordinary targets);
unmerge divides it out again. File format and tensor names are PEFT's
(`base_model.model.<path>.ia3_l`, `peft_type` "IA3"), so `peft.PeftModel.from_pretrained`
loads what we save and we load what PEFT saves.

PEFT quirks kept on purpose, so that outputs agree with PEFT's:
- the default targets per model type are PEFT's (table below); for BERT the name list
  `output.dense` matches by suffix, so the attention output `attention.output.dense` is a
  (feed-forward-style, input-scaled) target too;
- a list of `feedforward_modules` matches by plain suffix (`key.endswith(name)`), while a
  list of `target_modules` needs a whole name part (`.name`);
- GPT-2's fused `c_attn` gets one vector over all of q, k and v.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    WrapsBaseLayer,
    compact_targets,
    find_targets,
    layout_defaults,
    linear_dims,
    module_matches,
    register,
    replace_module,
)

# What IA3 rescales when its modules are not given, read from the model's `Layout`: the keys,
# the values and the feed-forward output projection, whose *input* (the intermediate
# activation) is the one rescaled. PEFT's per-family table says the same for Llama, Mistral,
# T5, GPT-2 and GPT-NeoX; for BERT-style models its `output.dense` also matches the attention
# output projection, and for some families it picks the query instead of the key.
DEFAULT_ROLES = ("key", "value", "ffn_output")
FEEDFORWARD_ROLES = ("ffn_output",)


@dataclass
class IA3Config(MethodConfig):
    """PEFT's IA3Config fields (same names, so adapter_config.json is interchangeable)."""

    # Layers that get a vector: a regex (fullmatch over the module path), a list of names
    # (path equals or ends with `.name`), or "all-linear". None = PEFT's default for the
    # model's layout (DEFAULT_ROLES).
    target_modules: list[str] | str | None = None
    # Layers, among the targets, whose *input* is rescaled (the FFN output layer, whose input
    # is the intermediate activation). Regex (fullmatch) or names (plain suffix match, as
    # PEFT). None = the model's layout (FEEDFORWARD_ROLES).
    feedforward_modules: list[str] | str | None = None
    # Layers never targeted: regex (fullmatch) or names (path equals or ends with `.name`).
    exclude_modules: list[str] | str | None = None
    # Whether targets store their weight as [in, out] (GPT-2's Conv1D). Informational: each
    # layer's kind is detected; we write True for Conv1D models so PEFT does not warn.
    fan_in_fan_out: bool = False
    # Initialise the vectors to 1 (identity). False = random normal, as PEFT (testing only).
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, key, value)
            if not (value is None or isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise PeftMethodError(f"`{key}` must be a regular expression or a list of "
                                      f"module names, got {value!r}")
        for key in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, key), bool):
                raise PeftMethodError(f"`{key}` must be true or false, got "
                                      f"{getattr(self, key)!r}")
        # PEFT's rule: with both given as name lists, every feed-forward name is a target name
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise PeftMethodError(f"`feedforward_modules` must be a subset of "
                                      f"`target_modules`; not in it: {', '.join(extra)}")


def is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """PEFT's `_check_target_module_feedforward`: regex fullmatch, or plain suffix match."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)


class IA3Layer(WrapsBaseLayer, nn.Module):
    """A linear layer (nn.Linear or Conv1D) with an (IA)³ vector.

    `ia3_l` is [out, 1] for an ordinary target (scales the output [..., out]) and [1, in] for
    a feed-forward target (scales the input [..., in]) — PEFT's shapes.
    """

    is_peft_layer = True

    def __init__(self, base_layer: nn.Module, feedforward: bool, init_ones: bool = True
                 ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = feedforward
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"  # weight is [in, out]
        d_in, d_out = linear_dims(base_layer)
        shape = (1, d_in) if feedforward else (d_out, 1)
        w = base_layer.weight
        init = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l = nn.Parameter(init.to(w.device, w.dtype if w.is_floating_point()
                                          else torch.float32))
        self.merged = False
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """ia3_l shaped to multiply the stored weight: [out, in] for Linear, [in, out] for
        Conv1D, so an output vector scales rows (Linear) or columns (Conv1D), and an input
        vector the other way round."""
        scale = self.ia3_l.detach()
        return scale.T if self.fan_in_fan_out else scale

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W ⊙ l (and b ← b ⊙ l for an ordinary target): outputs stay the same."""
        if self.merged:
            return
        base = self.base_layer
        bias = base.bias if not self.is_feedforward else None
        # Dividing by l undoes the merge, except where l is exactly 0 (that information is
        # gone): only then keep a copy of the original tensors so unmerge stays exact.
        if bool((self.ia3_l == 0).any()):
            self._backup = (base.weight.detach().clone(),
                            None if bias is None else bias.detach().clone())
        base.weight.mul_(self._weight_scale().to(base.weight.dtype))
        if bias is not None:
            bias.mul_(self.ia3_l.detach().reshape(bias.shape).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """The inverse of `merge`: W ← W / l (b ← b / l)."""
        if not self.merged:
            return
        base = self.base_layer
        bias = base.bias if not self.is_feedforward else None
        if self._backup is not None:
            base.weight.copy_(self._backup[0])
            if bias is not None:
                bias.copy_(self._backup[1])
            self._backup = None
        else:
            base.weight.div_(self._weight_scale().to(base.weight.dtype))
            if bias is not None:
                bias.div_(self.ia3_l.detach().reshape(bias.shape).to(bias.dtype))
        self.merged = False


def resolve_modules(model: nn.Module, config: IA3Config, layout: Layout | None
                    ) -> tuple[list[str] | str, list[str] | str]:
    """(target_modules, feedforward_modules): the config's, or the defaults of the model's
    layout (DEFAULT_ROLES, FEEDFORWARD_ROLES) as full paths; without a layout both must be
    given."""
    target, feedforward = config.target_modules, config.feedforward_modules
    if target is None:
        target = layout_defaults(layout, DEFAULT_ROLES, method="ia3", option="target_modules")
    if feedforward is None:
        feedforward = layout_defaults(layout, FEEDFORWARD_ROLES, method="ia3",
                                      option="feedforward_modules")
    return target, feedforward


def ia3_targets(model: nn.Module, config: IA3Config, target: list[str] | str,
                modules_to_save: list[str]) -> list[str]:
    """Paths of the layers that get a vector. As PEFT: exclude_modules and anything inside a
    modules_to_save module is never targeted."""
    skip = set()
    for name, _ in model.named_modules():
        if config.exclude_modules and module_matches(name, config.exclude_modules):
            skip.add(name)
        if any(name == s or name.startswith(s + ".") for s in modules_to_save):
            skip.add(name)
    return find_targets(model, target, method="ia3", exclude=skip)


@register
class IA3(Method):
    """IA3: learned vectors (init 1) rescale keys, values and the FFN activation, as PEFT."""

    name = "ia3"
    peft_type = "IA3"
    config_cls = IA3Config
    mergeable = True
    markers = ("ia3_l",)

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        resolve_modules(model, config, layout)

    def inject(self, adapted: AdaptedModel) -> None:
        config: IA3Config = adapted.peft_config
        model = adapted.model
        given = config.target_modules, config.feedforward_modules
        target, feedforward = resolve_modules(model, config, adapted.layout)
        # Record what was used (as PEFT's _prepare_adapter_config does), so the saved
        # adapter_config.json names the modules explicitly: defaults by their names where
        # those match exactly these modules (as PEFT writes its defaults), else by path.
        config.target_modules, config.feedforward_modules = (
            value if user is not None else compact_targets(model, value)
            for value, user in zip((target, feedforward), given))
        conv1d = False
        for name in ia3_targets(model, config, target, adapted.modules_to_save):
            base = model.get_submodule(name)
            conv1d |= type(base).__name__ == "Conv1D"
            replace_module(model, name, IA3Layer(base, is_feedforward(name, feedforward),
                                                 config.init_ia3_weights))
        config.fan_in_fan_out = config.fan_in_fan_out or conv1d
