"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and adapters together, each behind a gate.

Each component's contribution is scaled by a learned gate `G = σ(W x + b)` (W ∈ R^{1×d_in})
computed from that component's own input x (METHODS.md §3):

- LoRA on the chosen linears:   y = x Wᵀ + b + G_L(x) · s · x Aᵀ Bᵀ,   G_L per token, from the
  linear's input x [..., d_in]. (The authors' code averages G_L over tokens and drops s = α/r;
  we follow the paper's formula, per token, and keep LoRA's scaling.)
- a Pfeiffer adapter after each feed-forward output projection (adapter.py's placement table):
  y ↦ y + G_A(y) · W_up f(W_down y),   G_A per token, from the adapter's input y [..., d].
- prefix tuning (prefix_tuning.py's prefixes, sent as a pre-filled KV cache):
  the `m` prefix keys and values of layer l are multiplied by G_P, computed from the input of
  that layer's self-attention (post-norm BERT: the layer input; pre-norm GPT-2/Llama/T5: the
  normed input), as in the authors' code (which scales both P_k and P_v).

The prefix gate is **one scalar per example and layer**, not per token: the prefix is a cache
entry that every query reads through Hugging Face's attention, which has no place for a
per-query factor on some key columns. A forward pre-hook on each self-attention module computes
`σ(W_P x_t + b_P)` for every token and pools it, then scales that layer's prefix entries in the
cache before the attention reads them (`prefix_gate_pool`):

- "mean" (default for classifiers / feature extraction): mean over the unpadded tokens — the
  authors' choice (they average over all tokens, padding included).
- "first" (default for CAUSAL_LM and SEQ_2_SEQ_LM): the gate of the first unpadded token. A mean
  would let every position see later tokens through the gate (a leak in LM training) and would
  differ between training (whole text) and generation (prompt only); the first token is seen by
  every position and is the same in both. For decoder-only models it is a function of the first
  token alone; for T5's decoder it also sees the encoder (cross-attention).

In generation the prefixes are gated once, at the prefill step, and stay gated in the cache.

Identity at init: B = 0 and W_up = 0 make the LoRA and adapter branches zero, but the prefix
changes the outputs from the start (as in prefix tuning), so `identity_at_init` is False; with
`components` without "prefix" the model is unchanged at init. Not mergeable (the gates depend on
the input). Saved with our own `peft_type` UNIPELT: `base_model.model.<path>.{lora_A, lora_B,
lora_gate, adapter_down, adapter_up, adapter_gate, prefix_gate}.*` plus the collapsed prefix
table `prompt_embeddings` [m, L·2·d_kv], as prefix tuning saves it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peft_methods.adapter import (
    AdapterConfig,
    AdapterLayer,
    adapter_sites,
    record_sites,
)
from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    compact_targets,
    layout_defaults,
    linear_dims,
    module_matches,
    register,
    replace_module,
)
from peft_methods.kv_cache import given_cache
from peft_methods.lora import (
    LoraConfig,
    LoraLinear,
    resolve_targets,
)
from peft_methods.prefix_tuning import PrefixTuning, PrefixTuningConfig
from peft_methods.prompt_tuning import check_choice

COMPONENTS = ("lora", "prefix", "adapter")
GATE_POOLS = ("mean", "first")
# Tasks whose stack reading the prefix is causal: the prefix gate must not look ahead.
CAUSAL_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


# --------------------------------------------------------------------------------------------
# config


@dataclass
class UniPeltConfig(PrefixTuningConfig):
    """UniPELT options: which components are on, plus each component's own options (same names
    and meaning as in `lora`, `pfeiffer` and `prefix_tuning`). The prefix fields inherited from
    PrefixTuningConfig (`prefix_projection`, `encoder_hidden_size`, `init_weights`, and the
    model dimensions filled in on `apply`) apply to the prefix component. Task types are those
    prefix tuning supports, even with the prefix off."""

    # Number of virtual tokens m per layer (the paper's prefix length is 10).
    num_virtual_tokens: int = 10
    # The components that are on: any non-empty subset of 'lora', 'prefix', 'adapter'.
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))
    # LoRA rank r.
    r: int = 8
    # LoRA α: the update is scaled by α / r (then by the gate).
    lora_alpha: float = 16
    # Dropout probability on the LoRA path's input.
    lora_dropout: float = 0.0
    # Linear layers that get gated LoRA: names, a regex, "all-linear", or None = the query and
    # value projections of the model's layout (as `lora`).
    target_modules: list[str] | str | None = None
    # Adapter bottleneck width r. Give this or `reduction_factor`, not both.
    bottleneck: int | None = None
    # Adapter width = max(1, d // reduction_factor); None (and no bottleneck) = 16.
    reduction_factor: int | None = None
    # The adapter's non-linearity f.
    activation: str = "relu"
    # Feed-forward output projections that get an adapter (regex or names); None = the model's
    # layout. The modules used are written into the saved config.
    ffn_modules: list[str] | str | None = None
    # Self-attention modules that read the prefix, one per cache layer (regex or names); None
    # = the model's layout (the decoder's self-attention in an encoder–decoder model). The
    # modules used are written into the saved config.
    prefix_modules: list[str] | str | None = None
    # How the prefix gate pools its per-token values into one per example: "mean" (over the
    # unpadded tokens) or "first" (first unpadded token). None = "first" for CAUSAL_LM and
    # SEQ_2_SEQ_LM (causal, see the module docstring), "mean" otherwise.
    prefix_gate_pool: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        comps = self.components
        if not isinstance(comps, (list, tuple)) or not comps:
            raise PeftMethodError(f"Unsupported `components` {comps!r}. Supported values are a "
                                  f"non-empty list of {', '.join(map(repr, COMPONENTS))}")
        for c in comps:
            check_choice("components", c, COMPONENTS)
        # Canonical order and no duplicates, so that equal configs write equal files.
        self.components = [c for c in COMPONENTS if c in comps]
        self.target_modules = self.lora_config().target_modules  # validates the LoRA fields
        self.adapter_config()                                    # validates the adapter ones
        if self.prefix_gate_pool is not None:
            check_choice("prefix_gate_pool", self.prefix_gate_pool, GATE_POOLS)

    def lora_config(self) -> LoraConfig:
        """The LoRA options as a LoraConfig (its validation and messages)."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules)

    def adapter_config(self) -> AdapterConfig:
        """The adapter options as a (Pfeiffer) AdapterConfig."""
        return AdapterConfig(bottleneck=self.bottleneck, reduction_factor=self.reduction_factor,
                             activation=self.activation, ffn_modules=self.ffn_modules)

    def gate_pool(self, task_type: str) -> str:
        return self.prefix_gate_pool or ("first" if task_type in CAUSAL_TASKS else "mean")


# --------------------------------------------------------------------------------------------
# gated layers


def make_gate(d_in: int, like: torch.Tensor) -> nn.Linear:
    """Linear(d_in → 1) for σ(w·x + b), with nn.Linear's init (σ ≈ 0.5 at the start, as in the
    authors' code), on `like`'s device and dtype (the component's own float32 weights)."""
    return nn.Linear(d_in, 1, device=like.device, dtype=like.dtype)


class GatedLoraLinear(LoraLinear):
    """`base_layer(x) + σ(lora_gate(x)) · scaling · lora_B(lora_A(dropout(x)))`.

    Shapes: x [..., in] → [..., out]; the gate σ(lora_gate(x)) is [..., 1] (one per token);
    lora_gate.weight [1, in]. Not mergeable: the gate depends on x.
    """

    def __init__(self, base_layer: nn.Module, **lora: Any) -> None:
        super().__init__(base_layer, **lora)
        self.lora_gate = make_gate(self.in_features, self.lora_A.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)  # LoRA and its gate train in float32
        gate = torch.sigmoid(self.lora_gate(x))
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return (result + gate * update).to(dtype)

    def merge(self) -> None:
        raise PeftMethodError("a gated LoRA layer cannot be merged: its gate depends on the input")


class GatedAdapterLayer(AdapterLayer):
    """An output projection followed by a gated bottleneck adapter.

    forward: x → y = base_layer(x) [..., d] → y + σ(adapter_gate(y)) · W_up f(W_down y); the gate
    is [..., 1] (one per token), adapter_gate.weight [1, d].
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, activation: str = "relu") -> None:
        super().__init__(base_layer, bottleneck, activation)
        self.adapter_gate = make_gate(self.adapter_down.in_features, self.adapter_down.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        gate = torch.sigmoid(self.adapter_gate(y.to(self.adapter_gate.weight.dtype)))
        return y + gate.to(y.dtype) * self.adapter(y)


# --------------------------------------------------------------------------------------------
# the gated prefix


class GateRun:
    """One forward pass (or one generate call): how to pool the prefix gate, the real-token
    mask [batch, n] of the stack that reads the prefix (None = all real), and which layers
    have had their prefix gated (each exactly once, so decoding steps never re-scale)."""

    def __init__(self, pool: str, mask: torch.Tensor | None) -> None:
        self.pool, self.mask = pool, mask
        self.gated: set[int] = set()
        self.built = False  # a prefix cache was made in this run


# The run in progress; the prefix cache made during it carries it to the attention hooks.
_RUN: contextvars.ContextVar[GateRun | None] = contextvars.ContextVar("unipelt_run", default=None)
_CACHE_ATTR = "_unipelt_gate_run"


def pooled_gate(gates: torch.Tensor, mask: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Per-token gates [b, n] → one per example [b]: the mean over the real tokens, or the
    gate of the first real token (mask [b, n], 1 = real; None = all real)."""
    if mask is None:
        return gates.mean(dim=1) if pool == "mean" else gates[:, 0]
    if mask.shape != gates.shape:
        raise PeftMethodError(f"unipelt: the prefix gate got hidden states for "
                              f"{tuple(gates.shape)} tokens but an attention mask of shape "
                              f"{tuple(mask.shape)}")
    real = mask.to(gates.dtype)
    if pool == "mean":
        return (gates * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    first = mask.to(torch.int64).argmax(dim=1)  # first 1 (0 for an all-padding row)
    return gates.gather(1, first.unsqueeze(1)).squeeze(1)


def gate_prefix_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on a self-attention module: scale its layer's prefix keys and values
    [b, heads, m, head_dim] by G_P [b] before the attention reads them."""
    cache = given_cache(kwargs)
    run: GateRun | None = getattr(cache, _CACHE_ATTR, None)
    idx = module.layer_idx
    if run is None or idx in run.gated:
        return  # not our prefix cache, or already gated (decoding steps)
    hidden = args[0] if args else kwargs["hidden_states"]  # [b, n, d]
    gate_layer = module.prefix_gate
    gates = torch.sigmoid(gate_layer(hidden.to(gate_layer.weight.dtype))).squeeze(-1)  # [b, n]
    gate = pooled_gate(gates, run.mask, run.pool)
    layers = getattr(cache, "self_attention_cache", cache).layers
    layer = layers[idx]
    scale = gate.to(layer.keys.dtype).view(-1, 1, 1, 1)
    layer.keys, layer.values = layer.keys * scale, layer.values * scale
    run.gated.add(idx)


class GatedPrefix(PrefixTuning):
    """Prefix tuning whose cache carries the current GateRun (not registered: UniPELT uses it
    for the prefix component; its forward/generate are prefix tuning's)."""

    name = "unipelt"

    def cache(self, adapted: AdaptedModel, batch: int):
        cache = super().cache(adapted, batch)
        run = _RUN.get()
        assert run is not None, "the prefix cache is made inside UniPELT's forward/generate"
        setattr(cache, _CACHE_ATTR, run)
        run.built = True
        return cache

    def run(self, adapted: AdaptedModel, mask: torch.Tensor | None, call, *args, **kwargs):
        """`call(adapted, *args, **kwargs)` with a GateRun in place; checks that every layer's
        prefix was gated (a transformers change that bypasses the hooks must not pass silently)."""
        config: UniPeltConfig = adapted.peft_config
        run = GateRun(config.gate_pool(adapted.task_type), mask)
        token = _RUN.set(run)
        try:
            out = call(adapted, *args, **kwargs)
        finally:
            _RUN.reset(token)
        missing = sorted(set(range(config.num_layers)) - run.gated)
        if run.built and missing:
            raise PeftMethodError(f"unipelt: the prefix gate did not run on layer(s) {missing} of "
                                  f"{type(adapted.model).__name__}")
        return out

    def forward(self, adapted: AdaptedModel, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs):
        # The stack that reads the prefix: T5's decoder, or the only one.
        seq2seq = adapted.task_type == "SEQ_2_SEQ_LM"
        mask = kwargs.get("decoder_attention_mask") if seq2seq else attention_mask
        return self.run(adapted, mask, super().forward, input_ids, attention_mask,
                        inputs_embeds, labels, **kwargs)

    def generate(self, adapted: AdaptedModel, *args, **kwargs):
        # The prefill step reads the whole prompt (decoder-only) or the decoder start tokens.
        key = "attention_mask" if adapted.task_type == "CAUSAL_LM" else "decoder_attention_mask"
        return self.run(adapted, kwargs.get(key), super().generate, *args, **kwargs)


def prefix_attention_sites(model: nn.Module, layers: int | None, given: list[str] | str | None,
                           layout: Layout | None) -> list[str]:
    """Paths of the self-attention modules that read the prefix, one per cache layer: `given`
    (the config's `prefix_modules`), else the model layout's."""
    pattern = given if given is not None else layout_defaults(
        layout, ("prefix_attention",), method="unipelt", option="prefix_modules")
    found = {n: m for n, m in model.named_modules() if n and module_matches(n, pattern)}
    indices = sorted(getattr(m, "layer_idx", -1) for m in found.values())
    if layers is not None and indices != list(range(layers)):
        raise PeftMethodError(f"unipelt: expected {layers} self-attention layers (layer_idx 0.."
                              f"{layers - 1}) reading the prefix in {type(model).__name__}, "
                              f"found layer_idx {indices}; drop 'prefix' from `components`")
    return list(found)


# --------------------------------------------------------------------------------------------
# the method


@register
class UniPELT(Method):
    """Gated LoRA + gated Pfeiffer adapters + gated prefixes (any non-empty subset)."""

    name = "unipelt"
    peft_type = "UNIPELT"
    config_cls = UniPeltConfig
    # The prefix (on by default) changes the outputs at init; without it the model is
    # unchanged (tests/test_peft_unipelt.py checks both).
    identity_at_init = False
    markers = ("lora_A", "lora_B", "lora_gate", "adapter_down", "adapter_up", "adapter_gate",
               "prefix_gate")

    def __init__(self) -> None:
        self.prefix = GatedPrefix()

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        # Misfits are raised here, before `apply` freezes or wraps anything.
        if "prefix" in config.components:
            self.prefix.check_model(model, config)
            prefix_attention_sites(model, None, config.prefix_modules, layout)
        if "adapter" in config.components:
            adapter_cfg = config.adapter_config()
            for name in adapter_sites(model, adapter_cfg, ("ffn",), set(), self.name, layout):
                adapter_cfg.width(linear_dims(model.get_submodule(name))[1])

    def inject(self, adapted: AdaptedModel) -> None:
        model, comps = adapted.model, adapted.peft_config.components
        # Resolve every site on the untouched model first: "all-linear" must not pick up the
        # adapters' or gates' own linears, and a bad pattern fails before anything is wrapped.
        lora_targets = resolve_targets(adapted, adapted.peft_config.target_modules,
                                       method=self.name) if "lora" in comps else []
        config: UniPeltConfig = adapted.peft_config
        sites = adapter_sites(model, config.adapter_config(), ("ffn",),
                              set(adapted.modules_to_save), self.name, adapted.layout) \
            if "adapter" in comps else {}
        if "adapter" in comps:
            record_sites(model, config, ("ffn",), sites)  # the saved file names them
        if "prefix" in comps:
            self.prefix.inject(adapted)  # the prefix table; fills in the model dimensions
            config = adapted.peft_config  # (a new config object, with those dimensions)
            attention = prefix_attention_sites(model, config.num_layers, config.prefix_modules,
                                               adapted.layout)
            if config.prefix_modules is None:
                config.prefix_modules = compact_targets(model, attention)
        for name in sites:
            base = model.get_submodule(name)
            width = config.adapter_config().width(linear_dims(base)[1])
            replace_module(model, name, GatedAdapterLayer(base, width, config.activation))
        for name in lora_targets:
            # A target that also got an adapter: LoRA goes on the projection inside it, so the
            # adapter reads the LoRA-adapted output (as in the paper's Figure 1).
            if name in sites:
                name += ".base_layer"
            replace_module(model, name, GatedLoraLinear(
                model.get_submodule(name), r=config.r, lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout))
        if "prefix" in comps:
            for name in attention:
                module = model.get_submodule(name)
                # float32, like the other components (LoRA's autocast_adapter_dtype)
                module.prefix_gate = nn.Linear(model.config.hidden_size, 1,
                                               device=next(model.parameters()).device)
                module.register_forward_pre_hook(gate_prefix_hook, with_kwargs=True)

    # -- forward / generate: the prefix component owns the inputs when it is on -------------
    def forward(self, adapted: AdaptedModel, *args, **kwargs):
        if "prefix" in adapted.peft_config.components:
            return self.prefix.forward(adapted, *args, **kwargs)
        return adapted.model(*args, **kwargs)

    def generate(self, adapted: AdaptedModel, *args, **kwargs):
        if "prefix" in adapted.peft_config.components:
            return self.prefix.generate(adapted, *args, **kwargs)
        return adapted.model.generate(*args, **kwargs)

    # -- file format -------------------------------------------------------------------------
    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        out = super().peft_config_dict(adapted)
        if "lora" in adapted.peft_config.components:
            out["target_modules"] = self.file_targets(adapted)
        return out

    @staticmethod
    def file_targets(adapted: AdaptedModel) -> list[str] | str:
        """`target_modules` as the file records it: the user's names or pattern, or the paths of
        the adapted layers in the untouched model (a LoRA inside an adapter sits at
        `<path>.base_layer`): for "all-linear", and for the default, by their names where
        those match exactly these layers (as PEFT writes its defaults)."""
        target = adapted.peft_config.target_modules
        if target is not None and target != "all-linear":
            return target
        paths = [n for n, m in adapted.model.named_modules() if isinstance(m, GatedLoraLinear)]
        paths = sorted(n.removesuffix(".base_layer") for n in paths)
        if target is None:  # names are looked up on the model with its wrappers undone
            return compact_targets(adapted.model, paths) if not any(
                isinstance(m, GatedAdapterLayer) for m in adapted.model.modules()) else paths
        return paths

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        # A saved prefix is the collapsed table (as prefix tuning loads it).
        return super().config_from_peft({**data, "inference_mode": True})

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict(adapted)
        if "prefix" in adapted.peft_config.components:
            state.update(self.prefix.adapter_state_dict(adapted))  # prompt_embeddings
        return state

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        super().load_adapter_state_dict(adapted, state)
        if "prefix" in adapted.peft_config.components:
            self.prefix.load_adapter_state_dict(adapted, state)
