"""BitFit (Ben Zaken et al. 2022): only the model's bias terms train.

The biases of the query/key/value and attention-output projections, of both feed-forward
layers and the LayerNorm shifts β (METHODS.md §3, seed 000 §4), plus the `modules_to_save`
(the task head). Nothing is added to the model, so the adapted model is the base model at
initialisation, and merging is a no-op: the trained biases *are* the model's weights.

Many modern decoders have no biases at all (Llama, Mistral; T5 neither) — BitFit cannot adapt
them, and says so instead of silently training nothing.

Saved in the PEFT two-file layout with `peft_type` "BITFIT": one tensor per trained bias,
`base_model.model.<module path>.bias`, plus the modules_to_save.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    load_named,
    module_matches,
    register,
)


@dataclass
class BitFitConfig(MethodConfig):
    """Which biases train."""

    # Modules whose `bias` trains: a regular expression (fullmatch over the module path) or
    # a list of names (path equals or ends with `.name`, e.g. ["query", "value",
    # "LayerNorm"]). None = every bias in the model outside `modules_to_save`.
    bias_patterns: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.bias_patterns
        ok = value is None or isinstance(value, str) or (
            isinstance(value, (list, tuple)) and value
            and all(isinstance(v, str) for v in value))
        if not ok:
            raise PeftMethodError(f"`bias_patterns` must be a regular expression or a "
                                  f"non-empty list of module names, got {value!r}")
        if isinstance(value, tuple):
            self.bias_patterns = list(value)


def modules_with_bias(model: nn.Module) -> list[str]:
    """Paths of the modules that own a `bias` parameter (Linear, Conv1D, LayerNorm, ...)."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m._parameters.get("bias"), nn.Parameter)]


def selected_biases(model: nn.Module, config: BitFitConfig, modules_to_save: list[str],
                    method: str = "bitfit") -> list[str]:
    """Paths of the modules whose bias BitFit trains. The modules_to_save are left out: they
    train fully and are saved whole anyway. Raises when the selection is empty."""
    owners = modules_with_bias(model)
    if not owners:
        raise PeftMethodError(
            f"{method}: {type(model).__name__} has no bias terms (its linear layers and norms "
            f"are bias-free), so BitFit has nothing to train; use a model with biases (BERT, "
            f"GPT-2) or another method such as lora or ia3")
    saved = tuple(modules_to_save)
    candidates = [n for n in owners
                  if not any(n == s or n.startswith(s + ".") for s in saved)]
    if not candidates:
        raise PeftMethodError(f"{method}: the only biases of {type(model).__name__} are in "
                              f"modules_to_save ({', '.join(saved)}); BitFit has nothing else "
                              f"to train")
    if config.bias_patterns is None:
        return candidates
    found = [n for n in candidates if module_matches(n, config.bias_patterns)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        wanted = config.bias_patterns if isinstance(config.bias_patterns, list) \
            else [config.bias_patterns]
        close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(
            w.rsplit(".", 1)[-1], leaves, n=3)))  # best match first
        raise PeftMethodError(
            f"{method}: `bias_patterns` {config.bias_patterns!r} match no module with a bias"
            + (f"; close names: {', '.join(close)}" if close else "")
            + f"; modules with biases: {', '.join(leaves)}")
    return found


@register
class BitFit(Method):
    """BitFit: only the bias terms train (all, or those matching `bias_patterns`)."""

    name = "bitfit"
    peft_type = "BITFIT"
    config_cls = BitFitConfig
    mergeable = True  # trivially: the trained biases already live in the base model

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        if not modules_with_bias(model):
            selected_biases(model, config, [], self.name)  # raises: no bias terms at all

    def inject(self, adapted: AdaptedModel) -> None:
        for name in selected_biases(adapted.model, adapted.peft_config,
                                    adapted.modules_to_save, self.name):
            adapted.model.get_submodule(name).bias.requires_grad_(True)

    def merge(self, adapted: AdaptedModel) -> None:
        """Nothing to fold: the forward pass already uses the trained biases."""

    def unmerge(self, adapted: AdaptedModel) -> None:
        """Nothing to undo (see `merge`)."""

    def _own(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        """{`<path>.bias`: the live bias parameter [features]} for every trained bias."""
        model = adapted.model
        return {f"{n}.bias": model.get_submodule(n).bias
                for n in selected_biases(model, adapted.peft_config, adapted.modules_to_save,
                                         self.name)}

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        prefix = self.key_prefix()
        return {prefix + k: t for k, t in self._own(adapted).items()}

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        prefix = self.key_prefix()
        load_named(self._own(adapted),
                   {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   what=self.name)
