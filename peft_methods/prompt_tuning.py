"""Prompt tuning (Lester et al. 2021), and what every prompt-learning method shares.

Prompt tuning prepends `m` trainable embeddings `P ∈ R^{m×d}` to the input embeddings; the
attention mask grows by `m` (METHODS.md §3). The prompt starts random, from the embeddings of
a text (its token ids repeated or cut to `m`), or from randomly sampled vocabulary rows.

The shared part (used by p_tuning.py and prefix_tuning.py) follows Hugging Face PEFT 0.21.2
(`peft_model.py`), so that adapters move between the two with the same outputs:
- `PromptLearningConfig`: PEFT's PromptLearningConfig fields, with the model dimensions
  (`token_dim`, `num_layers`, ...) filled in from the model as PEFT does (`resolve_dims`);
- the prompt module lives in `adapted.extra["prompt_encoder"]` and returns the whole prompt
  table `[total_virtual_tokens, width]`; it is saved collapsed as `prompt_embeddings`, and a
  loaded adapter is that fixed table (PEFT's `inference_mode`);
- `EmbeddingPromptMethod.forward/generate` prepend the prompt per task type exactly as PEFT's
  PeftModelFor{SequenceClassification,CausalLM,Seq2SeqLM,FeatureExtraction} do, including
  PEFT's quirks: `position_ids` are dropped (with a warning), BERT's `token_type_ids` get `m`
  zeros in front, causal-LM labels get `m` × -100, and for encoder–decoder models the table has
  `2m` rows of which only the first `m` are used (PEFT's `num_transformer_submodules=2`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    load_named,
    PeftMethodError,
    infer_task_type,
    register,
)
from peft_methods.kv_cache import given_cache

# Task types the prompt methods know how to feed (PEFT has its own forward for each).
PROMPT_TASKS = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
GENERATE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise PeftMethodError(f"Unsupported `{name}` {value!r}. Supported values are "
                              f"{', '.join(repr(a) for a in allowed)}")


def check_int(name: str, value: Any, *, optional: bool = False, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PeftMethodError(f"Unsupported `{name}` {value!r}. Supported values are integers "
                              f">= {minimum}" + (" or null (taken from the model)" if optional
                                                  else ""))


@dataclass
class PromptLearningConfig(MethodConfig):
    """PEFT's PromptLearningConfig fields (same names, so adapter_config.json is
    interchangeable). The dimensions left as None are read from the model on `apply`."""

    # Number of virtual tokens m (per transformer submodule).
    num_virtual_tokens: int = 20
    # Width of one virtual token. None = the model's hidden size; for prefix tuning on a model
    # with grouped KV heads (Llama), head_dim × num_key_value_heads, as PEFT computes it.
    token_dim: int | None = None
    # 1, or 2 for encoder–decoder models (the table then has 2m rows). None = from the task.
    num_transformer_submodules: int | None = None
    # Heads a prefix is split into. None = the model's (its KV heads for prefix tuning).
    num_attention_heads: int | None = None
    # Transformer layers (a prefix is made for each). None = the model's.
    num_layers: int | None = None
    # True for an adapter read from a file: the prompt is the saved, collapsed table (no prompt
    # encoder, no text init), as in PEFT. `load_adapter` sets it; leave it False for training.
    inference_mode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type is not None:
            check_choice("task_type", self.task_type, PROMPT_TASKS)
        check_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            check_int(name, getattr(self, name), optional=True)
        if self.num_transformer_submodules is not None:
            check_choice("num_transformer_submodules", self.num_transformer_submodules, (1, 2))
        if not isinstance(self.inference_mode, bool):
            raise PeftMethodError(f"Unsupported `inference_mode` {self.inference_mode!r}. "
                                  f"Supported values are true, false")


def resolve_dims(config: PromptLearningConfig, model: nn.Module, task_type: str, *,
                 kv_prefix: bool = False) -> PromptLearningConfig:
    """A copy of `config` with the dimensions PEFT fills in (`_prepare_prompt_learning_config`
    and `_setup_prompt_encoder`), read from the model's config in PEFT's order of keys.

    Virtual input tokens get the input embeddings' width. With `kv_prefix` (prefix tuning) a
    model with `num_key_value_heads` gets
    `token_dim = head_dim × num_key_value_heads` and `num_attention_heads = num_key_value_heads`,
    since its cached K/V have that width (grouped-query attention).
    """
    mc = model.config
    data = mc.to_dict()
    data = data.get("text_config", data)

    def first(keys: tuple[str, ...], what: str) -> int:
        for key in keys:
            if data.get(key) is not None:
                return data[key]
        for key in keys:  # PEFT stops above; aliases (DistilBERT's `dim`) are a bonus
            if getattr(mc, key, None) is not None:
                return getattr(mc, key)
        raise PeftMethodError(f"cannot tell `{what}` of {type(model).__name__} from its config; "
                              f"set `{what}` in the method options")

    updates: dict[str, Any] = {}
    if config.num_layers is None:
        layers = getattr(mc, "num_hidden_layers", None)
        updates["num_layers"] = layers if layers is not None else first(
            ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    token_dim = config.token_dim or first(("hidden_size", "n_embd", "d_model"), "token_dim")
    words = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not (config.token_dim or kv_prefix) and isinstance(words, nn.Embedding):
        # Virtual tokens are prepended to the input embeddings: their width, which differs
        # from the hidden size where embeddings are projected up (ELECTRA). PEFT reads the
        # hidden size here and fails on such models; the file records the width either way.
        token_dim = words.embedding_dim
    heads = config.num_attention_heads or first(
        ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
        "num_attention_heads")
    if kv_prefix and data.get("num_key_value_heads") is not None:
        head_dim = data.get("head_dim") or token_dim // heads
        token_dim, heads = head_dim * data["num_key_value_heads"], data["num_key_value_heads"]
    updates.update(token_dim=token_dim, num_attention_heads=heads)
    if config.num_transformer_submodules is None:
        updates["num_transformer_submodules"] = 2 if task_type == "SEQ_2_SEQ_LM" else 1
    if getattr(config, "encoder_hidden_size", 0) is None:  # p-tuning / prefix encoder width
        updates["encoder_hidden_size"] = token_dim
    return dataclasses.replace(config, **updates)


def total_virtual_tokens(config: PromptLearningConfig) -> int:
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


class PromptTable(nn.Module):
    """A plain prompt table: prompt tuning's parameters, or any method's collapsed prompt
    loaded from a file. Named `embedding` like PEFT's encoders (`embedding.weight`)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self) -> torch.Tensor:
        """The table, [rows, width]."""
        return self.embedding.weight


# --------------------------------------------------------------------------------------------
# what every prompt-learning method shares


class PromptLearningMethod(Method):
    """Base of the prompt-learning methods: the prompt module is `adapted.extra
    ["prompt_encoder"]` (returning `[rows, width]`); saved collapsed as `prompt_embeddings`."""

    prompt_learning = True
    identity_at_init = False
    kv_prefix = False  # prefix tuning: dimensions of the cached keys/values

    # -- to implement ------------------------------------------------------------------------
    def build_encoder(self, adapted: AdaptedModel, config: PromptLearningConfig) -> nn.Module:
        """The trainable prompt module for a fresh (not loaded) adapter."""
        raise NotImplementedError

    def table_width(self, config: PromptLearningConfig) -> int:
        return config.token_dim

    def table_rows(self, config: PromptLearningConfig) -> int:
        return total_virtual_tokens(config)

    # -- shared ------------------------------------------------------------------------------
    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        task = config.task_type or infer_task_type(model)
        if task not in PROMPT_TASKS:
            raise PeftMethodError(f"{self.name} supports task types {', '.join(PROMPT_TASKS)}; "
                                  f"{type(model).__name__} is {task}")
        if not hasattr(model, "config"):
            raise PeftMethodError(f"{self.name} needs a Hugging Face model (with a `config`); "
                                  f"got {type(model).__name__}")

    def inject(self, adapted: AdaptedModel) -> None:
        config = resolve_dims(adapted.peft_config, adapted.model, adapted.task_type,
                              kv_prefix=self.kv_prefix)
        adapted.peft_config = config
        if config.inference_mode:
            encoder = PromptTable(self.table_rows(config), self.table_width(config))
        else:
            encoder = self.build_encoder(adapted, config)
        device = next(adapted.model.parameters()).device
        adapted.extra["prompt_encoder"] = encoder.to(device)

    def prompt_table(self, adapted: AdaptedModel) -> torch.Tensor:
        """The prompt as the model sees it, [rows, width] (float32 parameters)."""
        return adapted.extra["prompt_encoder"]()

    def collapsed(self, adapted: AdaptedModel) -> torch.Tensor:
        """The prompt to save, [rows, width]: the encoder's output computed without dropout."""
        encoder = adapted.extra["prompt_encoder"]
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                return self.prompt_table(adapted).detach().clone()
        finally:
            encoder.train(was_training)

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        # A saved prompt is always the collapsed table, whatever the file says.
        return super().config_from_peft({**data, "inference_mode": True})

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.collapsed(adapted)}

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        if "prompt_embeddings" not in state:
            raise PeftMethodError(f"{self.name}: the adapter has no `prompt_embeddings` tensor; "
                                  f"it holds {', '.join(sorted(state)[:5]) or 'nothing'}")
        encoder = adapted.extra["prompt_encoder"]
        if not isinstance(encoder, PromptTable):
            raise PeftMethodError(f"{self.name}: a saved prompt loads only into an adapter built "
                                  f"with inference_mode=True (use load_adapter)")
        load_named({"prompt_embeddings": encoder.embedding.weight}, state, what=self.name)

    @staticmethod
    def extend_mask(mask: torch.Tensor | None, m: int) -> torch.Tensor | None:
        """[b, n] -> [b, m + n] with ones in front (the virtual tokens are always visible)."""
        if mask is None:
            return None
        if mask.dim() != 2:
            raise PeftMethodError(f"prompt methods need a 2-d attention mask [batch, length]; got "
                                  f"shape {tuple(mask.shape)} (static or compiled caches are "
                                  f"not supported)")
        return torch.cat((mask.new_ones(mask.shape[0], m), mask), dim=1)

    @staticmethod
    def drop_position_ids(kwargs: dict[str, Any], *, warn: bool = True) -> None:
        # PEFT ignores position ids with prompt methods: the model numbers the prompt + input
        # sequence itself (0 .. m+n-1), in training and generation alike.
        if kwargs.get("position_ids") is not None:
            if warn:
                warnings.warn("position_ids are not supported with prompt methods; ignoring "
                              "them (as PEFT does)", stacklevel=3)
            kwargs["position_ids"] = None

    @staticmethod
    @contextmanager
    def generation_hook(model: nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
        """Temporarily replace `model.prepare_inputs_for_generation` by `make(original)`: how
        PEFT puts the prompt into each generation step (the prompt needs the cache state)."""
        had_own = "prepare_inputs_for_generation" in vars(model)
        original = model.prepare_inputs_for_generation
        model.prepare_inputs_for_generation = make(original)
        try:
            yield
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def require_generate(self, adapted: AdaptedModel) -> None:
        if adapted.task_type not in GENERATE_TASKS:
            raise PeftMethodError(f"generate() needs task type {' or '.join(GENERATE_TASKS)}; "
                                  f"this adapter is {adapted.task_type}")


# --------------------------------------------------------------------------------------------
# prompts prepended to the input embeddings (prompt tuning, p-tuning)


class EmbeddingPromptMethod(PromptLearningMethod):
    """Prepends the prompt table to the input embeddings, as PEFT does for PROMPT_TUNING and
    P_TUNING."""

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        super().check_model(model, config, layout)
        if model.get_input_embeddings() is None:
            raise PeftMethodError(f"{self.name} needs the model's input embeddings; "
                                  f"{type(model).__name__} has none")

    def prompts(self, adapted: AdaptedModel, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The virtual tokens for the input side, [batch, m, d] (the first m rows)."""
        m = adapted.peft_config.num_virtual_tokens
        table = self.prompt_table(adapted)[:m].to(dtype)
        return table.unsqueeze(0).expand(batch, -1, -1)

    def with_prompt(self, adapted: AdaptedModel, input_ids: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[b, n] ids or [b, n, d] embeddings -> [b, m + n, d] with the prompt in front."""
        if inputs_embeds is None:
            if input_ids is None:
                raise PeftMethodError("pass input_ids or inputs_embeds")
            inputs_embeds = adapted.model.get_input_embeddings()(input_ids)
        prompts = self.prompts(adapted, inputs_embeds.shape[0], inputs_embeds.dtype)
        return torch.cat((prompts, inputs_embeds), dim=1)

    def forward(self, adapted: AdaptedModel, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs):
        m, task = adapted.peft_config.num_virtual_tokens, adapted.task_type
        self.drop_position_ids(kwargs)
        embeds = self.with_prompt(adapted, input_ids, inputs_embeds)
        batch = embeds.shape[0]
        if task == "SEQ_CLS":
            if kwargs.get("token_type_ids") is not None:  # the virtual tokens are segment 0
                tt = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = torch.cat((tt.new_zeros(batch, m), tt), dim=1)
        elif kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are not supported with prompt methods for this task; "
                          "ignoring them (as PEFT does)", stacklevel=2)
            kwargs["token_type_ids"] = None
        if task == "CAUSAL_LM" and labels is not None:  # no loss on the virtual tokens
            labels = torch.cat((labels.new_full((batch, m), -100), labels), dim=1)
        if labels is not None:
            kwargs["labels"] = labels
        # encoder–decoder: only the encoder input gets the prompt; decoder inputs pass as given
        return adapted.model(inputs_embeds=embeds,
                             attention_mask=self.extend_mask(attention_mask, m), **kwargs)

    def generate(self, adapted: AdaptedModel, *args, **kwargs):
        self.require_generate(adapted)
        model, m = adapted.model, adapted.peft_config.num_virtual_tokens
        if args or "input_ids" not in kwargs:
            raise PeftMethodError(f"{self.name}: call generate(input_ids=..., attention_mask=..., "
                                  f"...) with keyword arguments")
        self.drop_position_ids(kwargs)
        kwargs.pop("token_type_ids", None)
        if adapted.task_type == "SEQ_2_SEQ_LM":
            # The prompt goes into the encoder once; the decoder then runs as usual.
            input_ids = kwargs.pop("input_ids")
            kwargs["inputs_embeds"] = self.with_prompt(adapted, input_ids, None)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = self.extend_mask(kwargs["attention_mask"], m)
            return model.generate(**kwargs)

        def make(original: Callable) -> Callable:
            # (named `kwargs`: generate() inspects the signature for it)
            def prepare(*args, **kwargs) -> dict[str, Any]:
                inputs = original(*args, **kwargs)
                cache = given_cache(inputs)
                seen = cache.get_seq_length() if cache is not None else 0
                if seen and seen >= inputs["input_ids"].shape[1]:
                    inputs["input_ids"] = inputs["input_ids"][:, -1:]  # decode: newest token
                inputs["attention_mask"] = self.extend_mask(inputs.get("attention_mask"), m)
                self.drop_position_ids(inputs, warn=False)
                inputs.pop("token_type_ids", None)
                if not seen:  # prefill: the prompt enters the cache with the input
                    inputs["inputs_embeds"] = self.with_prompt(adapted, inputs["input_ids"], None)
                    inputs["input_ids"] = None
                inputs.pop("cache_position", None)  # numbered by the model (prompt included)
                return inputs
            return prepare

        with self.generation_hook(model, make):
            return model.generate(**kwargs)


# --------------------------------------------------------------------------------------------
# prompt tuning

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's PromptTuningConfig."""

    # How the prompt starts: "RANDOM" (N(0, 1), PEFT's default), "TEXT" (the embeddings of
    # `prompt_tuning_init_text`, its token ids repeated or cut to m), "SAMPLE_VOCAB" (the
    # embeddings of m random vocabulary ids).
    prompt_tuning_init: str = "RANDOM"
    # The text for "TEXT" init.
    prompt_tuning_init_text: str | None = None
    # The tokenizer (name or local path) for "TEXT" init.
    tokenizer_name_or_path: str | None = None
    # Extra keyword arguments for AutoTokenizer.from_pretrained ("TEXT" only;
    # `trust_remote_code` is always dropped: loading an adapter must not run code).
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value",
                                              self.prompt_tuning_init))
        check_choice("prompt_tuning_init", self.prompt_tuning_init, PROMPT_TUNING_INITS)
        text = self.prompt_tuning_init == "TEXT"
        if text and not self.tokenizer_name_or_path:
            raise PeftMethodError("prompt_tuning_init='TEXT' needs `tokenizer_name_or_path`")
        if text and not self.prompt_tuning_init_text:
            raise PeftMethodError("prompt_tuning_init='TEXT' needs `prompt_tuning_init_text`")
        if self.tokenizer_kwargs and not text:
            raise PeftMethodError("`tokenizer_kwargs` is only used with prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise PeftMethodError(f"Unsupported `tokenizer_kwargs` {self.tokenizer_kwargs!r}. "
                                  f"Supported values are a mapping or null")


def text_init_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """The init text's token ids (special tokens included, as PEFT), repeated or cut to `rows`."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise PeftMethodError("prompt_tuning_init_text tokenizes to nothing")
    return (ids * math.ceil(rows / len(ids)))[:rows]


@register
class PromptTuning(EmbeddingPromptMethod):
    """Prompt tuning: m trainable embeddings prepended to the input (random or text init)."""

    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    config_cls = PromptTuningConfig

    def build_encoder(self, adapted: AdaptedModel, config: PromptLearningConfig) -> nn.Module:
        rows = self.table_rows(config)
        table = PromptTable(rows, config.token_dim)
        words = adapted.model.get_input_embeddings()
        if config.prompt_tuning_init == "RANDOM":
            return table
        if config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(text_init_ids(config, rows), dtype=torch.long)
        else:  # SAMPLE_VOCAB
            ids = torch.randint(0, words.num_embeddings, (rows,), dtype=torch.long)
        if int(ids.max()) >= words.num_embeddings:
            raise PeftMethodError(f"the init tokenizer gives id {int(ids.max())} but the model "
                                  f"has only {words.num_embeddings} embeddings")
        if words.weight.shape[1] != config.token_dim:
            raise PeftMethodError(f"token_dim {config.token_dim} differs from the embedding width "
                                  f"{words.weight.shape[1]}; cannot init from embeddings")
        with torch.no_grad():
            table.embedding.weight.copy_(words(ids.to(words.weight.device)).float())
        return table
