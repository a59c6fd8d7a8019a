"""Full fine-tuning: every parameter trains. The baseline the other methods are measured
against; saved in the same two-file layout (every tensor, `peft_type` "FULL")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peft_methods.base import AdaptedModel, Method, MethodConfig, load_named, register


@dataclass
class FullConfig(MethodConfig):
    """No options: everything trains."""


@register
class FullFineTune(Method):
    """Full fine-tuning: every parameter trains (the baseline)."""

    name = "full"
    peft_type = "FULL"
    config_cls = FullConfig

    def inject(self, adapted: AdaptedModel) -> None:
        for p in adapted.model.parameters():
            p.requires_grad_(True)

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        return {self.key_prefix() + n: t for n, t in adapted.model.state_dict().items()}

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        prefix = self.key_prefix()
        load_named(dict(adapted.model.state_dict(keep_vars=True)),
                   {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   what=self.name)
