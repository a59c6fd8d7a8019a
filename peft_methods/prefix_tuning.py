"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022), as Hugging Face PEFT
implements prefix tuning.

At every layer, `m` learned key and value vectors are prepended to that layer's K and V; the
real tokens attend to them, they attend to nothing, and the attention mask grows by `m`
(METHODS.md §3). The prefixes reach the attention layers the way PEFT sends them: as a
pre-filled transformers `Cache` passed as the model's cache argument (`kv_cache.py`), so the
model needs no change.

The prefix table is `[m, L·2·d_kv]` (row j: layer 0 key, layer 0 value, layer 1 key, ...;
`d_kv = num_attention_heads × head_dim`, which for grouped-query attention is the KV width
`num_key_value_heads × head_dim`, as PEFT computes it):

- `prefix_tuning` (default `prefix_projection=True`): reparameterised while training by PEFT's
  MLP  `Embedding(m, d) -> Linear(d, h) -> Tanh -> Linear(h, L·2·d)`; saving collapses it to
  the plain table (`prompt_embeddings`), which is what a loaded adapter uses.
- `p_tuning_v2` (deep prompts): a separate set of `m` trainable vectors per layer, injected
  into every layer, without reparameterisation — prefix tuning with `prefix_projection=False`.
  Saved in PEFT's PREFIX_TUNING format (PEFT loads it, warning about our `distill_method` key).

PEFT quirks kept on purpose, so that outputs agree with PEFT's:
- encoder–decoder (T5, `num_transformer_submodules=2`): only the decoder's self-attention gets
  prefixes; PEFT builds the cross-attention copy and then discards it, and its layer layout
  (`cat([P, P])` split in chunks of 4) gives decoder layer i the key/value rows of layer
  `2i mod L` — half of the table is unused. The encoder gets no prefix.
- user `position_ids` are shifted by `m` (past the prefix); BERT-like classifiers whose head
  forward takes no cache run backbone -> (dropout) -> head, as PEFT does.

`encoder_prefix=True` (T5 family only; off by default) gives the encoder its own prefixes too,
as METHODS.md §3 asks: a second table (`extra["encoder_prefix"]`, with its own MLP when
`prefix_projection` is on) saved collapsed as the extra tensor `encoder_prompt_embeddings`
next to PEFT's `prompt_embeddings`, with `distill_method` and `"encoder_prefix": true` in the
config. The decoder part stays PEFT's exactly; PEFT itself loads such a file but ignores the
encoder part (its outputs then differ from ours). Mechanism: encoder_prefix.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from peft_methods.base import (
    HEAD_NAMES,
    AdaptedModel,
    Layout,
    MethodConfig,
    load_named,
    PeftMethodError,
    infer_task_type,
    register,
)
from peft_methods.encoder_prefix import (
    encoder_attentions,
    encoder_dims,
    encoder_prefixes,
)
from peft_methods.kv_cache import SPELLED, cache_arg, given_cache
from peft_methods.prompt_tuning import (
    PromptLearningConfig,
    PromptLearningMethod,
    PromptTable,
    check_choice,
    check_int,
)

INIT_WEIGHTS = (None, "zero")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's PrefixTuningConfig."""

    # Reparameterise the prefixes by an MLP while training (METHODS.md §3). PEFT's default is
    # False; ours is True, and `p_tuning_v2` is the method without it.
    prefix_projection: bool = True
    # Hidden width h of the projection MLP. None = token_dim.
    encoder_hidden_size: int | None = None
    # None: random init (N(0, 1), PEFT's). "zero": the prefixes start at zero (the table, or the
    # MLP's last layer) — zero keys still take attention weight, so this is not an identity.
    init_weights: str | None = None
    # Encoder–decoder (T5 family) only. False: PEFT-compatible, only the decoder's
    # self-attention gets prefixes. True: METHODS.md §3's separate encoder and decoder
    # prefixes — every encoder self-attention also gets m learned keys/values of its own
    # (a separate table; zero position bias for the prefix columns; see encoder_prefix.py).
    encoder_prefix: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prefix_projection", "encoder_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise PeftMethodError(f"Unsupported `{name}` {getattr(self, name)!r}. "
                                      f"Supported values are true, false")
        check_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_choice("init_weights", self.init_weights, INIT_WEIGHTS)


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """Deep prompts: PrefixTuningConfig without reparameterisation (`prefix_projection` must
    stay False; `encoder_hidden_size` is unused)."""

    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_projection:
            raise PeftMethodError("p_tuning_v2 has no reparameterisation (`prefix_projection` "
                                  "must be false); use method 'prefix_tuning' for the MLP")


def prefix_width(config: PromptLearningConfig) -> int:
    """Width of one prefix row: a key and a value for every layer."""
    return config.num_layers * 2 * config.token_dim


class PrefixEncoder(nn.Module):
    """PEFT's PrefixEncoder (`embedding`, `transform`); forward() gives [m, L·2·d]."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        m, d, width = config.num_virtual_tokens, config.token_dim, prefix_width(config)
        if self.prefix_projection:
            self.embedding = nn.Embedding(m, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(m, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.prefix_projection else x


def backbone_of(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


@register
class PrefixTuning(PromptLearningMethod):
    # Registered before p_tuning_v2, so a PREFIX_TUNING file without `distill_method` (PEFT's)
    # loads as prefix_tuning (base.method_for_peft_type takes the first match).
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    config_cls = PrefixTuningConfig
    kv_prefix = True

    def table_rows(self, config: PromptLearningConfig) -> int:
        return config.num_virtual_tokens  # one set, whatever num_transformer_submodules says

    def table_width(self, config: PromptLearningConfig) -> int:
        return prefix_width(config)

    def build_encoder(self, adapted: AdaptedModel, config: PromptLearningConfig) -> nn.Module:
        return PrefixEncoder(config)

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        super().check_model(model, config, layout)
        what = f"{self.name} on {type(model).__name__}"
        task = config.task_type or infer_task_type(model)
        backbone = backbone_of(model)
        if not cache_arg(model) and not (task == "SEQ_CLS" and cache_arg(backbone)):
            raise PeftMethodError(f"{what}: the model's forward takes no KV cache ({SPELLED}), "
                                  f"which carries the prefixes; use prompt_tuning or p_tuning")
        if not cache_arg(model) and not any(hasattr(model, h) for h in HEAD_NAMES):
            raise PeftMethodError(f"{what}: no classification head named "
                                  f"{' or '.join(HEAD_NAMES)} to run after the backbone")
        if any(getattr(mod, "gradient_checkpointing", False) for mod in model.modules()):
            raise PeftMethodError(f"{what}: prefixes travel in the KV cache, which gradient "
                                  f"checkpointing does not support; turn it off")
        data = model.config.to_dict()
        if any(data.get(k) is not None for k in ("per_layer_config", "global_head_dim")):
            raise PeftMethodError(f"{what}: layers with different attention shapes are not "
                                  f"supported; use prompt_tuning or p_tuning")
        if getattr(config, "encoder_prefix", False):
            if task != "SEQ_2_SEQ_LM":
                raise PeftMethodError(f"{what}: encoder_prefix needs an encoder–decoder model "
                                      f"(task SEQ_2_SEQ_LM, T5 family); this one is {task} — "
                                      f"leave encoder_prefix false")
            encoder_attentions(model)  # T5 family, or a clear error
            if model.config._attn_implementation not in ("eager", "sdpa"):
                raise PeftMethodError(f"{what}: encoder_prefix supports eager and sdpa "
                                      f"attention, not {model.config._attn_implementation}")

    def inject(self, adapted: AdaptedModel) -> None:
        super().inject(adapted)
        cfg = adapted.peft_config
        if cfg.token_dim % cfg.num_attention_heads:
            raise PeftMethodError(f"{self.name}: token_dim {cfg.token_dim} is not divisible by "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        # One prefix per layer of the stack that reads the cache (the decoder of T5).
        decoder = getattr(adapted.model.config, "num_decoder_layers", None)
        if adapted.task_type == "SEQ_2_SEQ_LM" and decoder and decoder != cfg.num_layers:
            raise PeftMethodError(f"{self.name}: the decoder has {decoder} layers but "
                                  f"num_layers is {cfg.num_layers}; set num_layers={decoder}")
        if cfg.encoder_prefix:  # the encoder's own table, built after the decoder's
            enc = self.encoder_table_config(adapted)
            module = PromptTable(enc.num_virtual_tokens, prefix_width(enc)) \
                if cfg.inference_mode else PrefixEncoder(enc)
            adapted.extra["encoder_prefix"] = module.to(adapted.device)

    @staticmethod
    def encoder_table_config(adapted: AdaptedModel) -> PrefixTuningConfig:
        """The config of the encoder's table: the encoder's layers and attention width."""
        layers, heads, head_dim = encoder_dims(adapted.model)
        return dataclasses.replace(adapted.peft_config, num_layers=layers,
                                   token_dim=heads * head_dim, num_attention_heads=heads)

    def encoder_context(self, adapted: AdaptedModel):
        """Encoder prefixes in effect for one model call (a no-op when encoder_prefix is off)."""
        if not getattr(adapted.peft_config, "encoder_prefix", False):
            return nullcontext()
        return encoder_prefixes(adapted.model, adapted.extra["encoder_prefix"]())

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(adapted)
        if adapted.peft_config.encoder_prefix:  # collapsed, like prompt_embeddings
            module = adapted.extra["encoder_prefix"]
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    state["encoder_prompt_embeddings"] = module().detach().clone()
            finally:
                module.train(was_training)
        return state

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        super().load_adapter_state_dict(adapted, state)
        if not adapted.peft_config.encoder_prefix:
            return
        if "encoder_prompt_embeddings" not in state:
            raise PeftMethodError(f"{self.name}: the config says encoder_prefix but the adapter "
                                  f"has no `encoder_prompt_embeddings` tensor")
        load_named({"encoder_prompt_embeddings": adapted.extra["encoder_prefix"].embedding.weight},
                   state, what=self.name)

    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        out = super().peft_config_dict(adapted)
        if out.pop("encoder_prefix", False):  # off: exactly the PEFT file as before
            out.update(encoder_prefix=True, distill_method=self.name)
        return out

    def cache(self, adapted: AdaptedModel, batch: int):
        """The prefixes as a pre-filled cache: layer i holds keys and values
        [batch, heads, m, head_dim] (an EncoderDecoderCache for encoder–decoder models)."""
        from transformers import DynamicCache, EncoderDecoderCache

        cfg = adapted.peft_config
        m, layers, heads = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
        table = self.prompt_table(adapted).to(adapted.model.dtype)  # [m, L·2·d]
        kv = table.unsqueeze(0).expand(batch, -1, -1).reshape(
            batch, m, 2 * layers, heads, cfg.token_dim // heads)
        kv = kv.permute(2, 0, 3, 1, 4)  # [2L, batch, heads, m, head_dim]
        if cfg.num_transformer_submodules == 1:
            return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
        # PEFT: cat([P, P]) split in chunks of 4 = (self k, self v, cross k, cross v) per layer;
        # chunk i starts at row 4i of the doubled list, i.e. row 4i mod 2L of the table.
        rows = torch.cat((kv, kv), dim=0)
        self_attn = DynamicCache([(rows[4 * i], rows[4 * i + 1]) for i in range(layers)])
        # The cross-attention part is left empty: it is filled from the encoder output.
        return EncoderDecoderCache(self_attn, DynamicCache())

    @staticmethod
    def shift_position_ids(kwargs: dict[str, Any], m: int) -> None:
        if kwargs.get("position_ids") is not None:  # positions continue after the prefix
            kwargs["position_ids"] = kwargs["position_ids"] + m

    def forward(self, adapted: AdaptedModel, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs):
        model, task = adapted.model, adapted.task_type
        m = adapted.peft_config.num_virtual_tokens
        if given_cache(kwargs) is not None:
            raise PeftMethodError(f"{self.name} passes its prefixes as the model's KV cache; do "
                                  f"not pass your own (use generate() for decoding)")
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise PeftMethodError("pass input_ids or inputs_embeds")
        self.shift_position_ids(kwargs, m)
        if task != "SEQ_CLS" and kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are not supported with prompt methods for this task; "
                          "ignoring them (as PEFT does)", stacklevel=2)
            kwargs["token_type_ids"] = None
        if task == "SEQ_2_SEQ_LM":  # the prefix is on the decoder side only
            kwargs["decoder_attention_mask"] = self.extend_mask(
                kwargs.get("decoder_attention_mask"), m)
        else:
            attention_mask = self.extend_mask(attention_mask, m)
        # A classifier whose forward takes no cache runs its backbone, which does.
        name = cache_arg(model) or cache_arg(backbone_of(model))
        kwargs.update({"input_ids": input_ids, "inputs_embeds": inputs_embeds,
                       "attention_mask": attention_mask,
                       name: self.cache(adapted, source.shape[0])})
        if task == "SEQ_CLS" and not cache_arg(model):
            return self.classify_via_backbone(model, labels, kwargs)
        if labels is not None:
            kwargs["labels"] = labels
        with self.encoder_context(adapted):
            return model(**kwargs)

    @staticmethod
    def classify_via_backbone(model: nn.Module, labels: torch.Tensor | None,
                              kwargs: dict[str, Any]):
        """PEFT's `_prefix_tuning_forward` for a classifier whose forward takes no cache:
        backbone -> pooled output -> dropout (if any) -> head; PEFT's loss choice."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        kwargs.pop("return_dict", None)
        outputs = backbone_of(model)(**kwargs, return_dict=True)
        pooled = outputs[1] if len(outputs) > 1 else outputs[0]
        if "dropout" in dict(model.named_children()):
            pooled = model.dropout(pooled)
        head = next(getattr(model, h) for h in HEAD_NAMES if hasattr(model, h))
        logits = head(pooled)
        loss = None
        if labels is not None:
            n = model.num_labels
            problem = model.config.problem_type or (
                "regression" if n == 1 else "single_label_classification"
                if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
            if problem == "regression":
                loss = MSELoss()(logits.squeeze(), labels.squeeze()) if n == 1 else \
                    MSELoss()(logits, labels)
            elif problem == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, n), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)

    def generate(self, adapted: AdaptedModel, *args, **kwargs):
        self.require_generate(adapted)
        model, m = adapted.model, adapted.peft_config.num_virtual_tokens
        if args or "input_ids" not in kwargs:
            raise PeftMethodError(f"{self.name}: call generate(input_ids=..., attention_mask=..., "
                                  f"...) with keyword arguments")
        decoder_only = adapted.task_type == "CAUSAL_LM"
        name = cache_arg(model)  # prepare_inputs_for_generation returns forward's arguments
        if not decoder_only:  # (decoder-only: shifted in each step below, as PEFT does)
            self.shift_position_ids(kwargs, m)
        kwargs.pop("token_type_ids", None)

        def make(original: Callable) -> Callable:
            # (named `kwargs`: generate() inspects the signature for it)
            def prepare(*args, **kwargs) -> dict[str, Any]:
                inputs = original(*args, **kwargs)
                ids_key = "input_ids" if decoder_only else "decoder_input_ids"
                cache = inputs.get(name)
                seen = cache.get_seq_length() if cache is not None else 0
                if decoder_only:
                    if seen and seen >= inputs["input_ids"].shape[1]:
                        inputs["input_ids"] = inputs["input_ids"][:, -1:]
                    inputs["attention_mask"] = self.extend_mask(inputs.get("attention_mask"), m)
                    self.shift_position_ids(inputs, m)
                    inputs.pop("token_type_ids", None)
                if not seen:  # prefill: start from the prefixes instead of an empty cache
                    inputs[name] = self.cache(adapted, inputs[ids_key].shape[0])
                return inputs
            return prepare

        with self.generation_hook(model, make), self.encoder_context(adapted):
            return model.generate(**kwargs)


@register
class PTuningV2(PrefixTuning):
    name = "p_tuning_v2"
    peft_type = "PREFIX_TUNING"
    config_cls = PTuningV2Config

    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        # PEFT ignores unknown config keys (with a warning); ours picks the method back up.
        return super().peft_config_dict(adapted) | {"distill_method": self.name}

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        # The file holds the collapsed table, so a projection it mentions no longer exists.
        return super().config_from_peft({**data, "prefix_projection": False})
