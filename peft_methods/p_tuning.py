"""P-tuning v1 (Liu et al. 2021, "GPT Understands, Too"), as Hugging Face PEFT implements it.

The `m` virtual-token embeddings come from a prompt encoder and are prepended to the input
embeddings as in prompt tuning (METHODS.md §3):

    LSTM:  P = MLP(BiLSTM(E))   E ∈ R^{T×d}; BiLSTM: d -> 2h per token; MLP: 2h -> 2h -> ReLU -> d
    MLP:   P = MLP(E)           MLP: d -> h -> ReLU -> h -> ReLU -> d

with `T = m · num_transformer_submodules` rows (the encoder sees them all, so for encoder–decoder
models the first m outputs depend on all 2m rows, as in PEFT), `h = encoder_hidden_size`.
Module and tensor names are PEFT's PromptEncoder (`embedding`, `lstm_head`, `mlp_head`).

Saving collapses the encoder to its output table `prompt_embeddings` [T, d], as PEFT does; a
loaded adapter is that fixed prompt (the encoder is a training-time reparameterisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_methods.base import AdaptedModel, PeftMethodError, register
from peft_methods.prompt_tuning import (
    EmbeddingPromptMethod,
    PromptLearningConfig,
    check_choice,
    check_int,
    total_virtual_tokens,
)

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # PEFT's default `encoder_num_layers`; the MLP encoder has a fixed depth


@dataclass
class PTuningConfig(PromptLearningConfig):
    """PEFT's PromptEncoderConfig."""

    # The prompt encoder: "MLP" (PEFT's default) or "LSTM" (bidirectional LSTM, then an MLP).
    encoder_reparameterization_type: str = "MLP"
    # Hidden width h of the encoder. None = token_dim.
    encoder_hidden_size: int | None = None
    # LSTM layers (the MLP encoder always has three linear layers; leave this at 2 for it).
    encoder_num_layers: int = MLP_LAYERS
    # Dropout between LSTM layers (needs encoder_num_layers > 1 to have an effect).
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = str(getattr(
            self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        check_choice("encoder_reparameterization_type", self.encoder_reparameterization_type,
                     ENCODER_TYPES)
        check_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_int("encoder_num_layers", self.encoder_num_layers)
        if (self.encoder_reparameterization_type == "MLP" and not self.inference_mode
                and self.encoder_num_layers != MLP_LAYERS):
            # PEFT only warns; an option that silently does nothing is worse than an error.
            raise PeftMethodError(f"`encoder_num_layers` {self.encoder_num_layers} applies to the "
                                  f"LSTM encoder only; the MLP encoder has a fixed depth (leave "
                                  f"it at {MLP_LAYERS})")
        if isinstance(self.encoder_dropout, bool) or not isinstance(
                self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise PeftMethodError(f"Unsupported `encoder_dropout` {self.encoder_dropout!r}. "
                                  f"Supported values are numbers in [0, 1)")


class PromptEncoder(nn.Module):
    """The p-tuning prompt encoder; forward() gives the prompt table [T, d]."""

    def __init__(self, config: PTuningConfig) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total_virtual_tokens(config), d)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h,
                                     num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(),
                                          nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        """[T, d]. The LSTM runs over the T rows as one sequence (batch of 1), as in PEFT."""
        x = self.embedding.weight.unsqueeze(0)  # [1, T, d]
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]  # [1, T, 2h]
        return self.mlp_head(x)[0]


@register
class PTuning(EmbeddingPromptMethod):
    """P-tuning: a prompt encoder (LSTM or MLP) makes m virtual tokens, prepended to the input."""

    name = "p_tuning"
    peft_type = "P_TUNING"
    config_cls = PTuningConfig

    def build_encoder(self, adapted: AdaptedModel, config: PromptLearningConfig) -> nn.Module:
        return PromptEncoder(config)
