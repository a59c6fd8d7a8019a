"""Bottleneck adapters: Houlsby (two or three per layer) and Pfeiffer (one per layer).

    Adapter(y) = y + W_up · f(W_down · y)      y ∈ R^d, W_down ∈ R^{r×d}, W_up ∈ R^{d×r}, r ≪ d

(METHODS.md §3, seed 000 §3.) `W_up` starts at zero (or near zero), so every adapter is the
identity at initialisation and the adapted model equals the base model until it trains.

Placement. The adapter sits on the output of a sub-layer's output projection, before the
residual add and layer norm — Houlsby et al.'s position. We get it by wrapping the projection:
`y = proj(x); y + adapter(y)`. Houlsby puts one after the self-attention output and one after
the feed-forward output of every layer, and for encoder–decoder models (T5) a third after the
decoder's cross-attention output (seed 000: encoder 2 adapters, decoder 3). Pfeiffer puts a
single adapter after the feed-forward output.

PEFT has no bottleneck adapters, so the file uses the PEFT two-file layout with our own
`peft_type` (HOULSBY_ADAPTER / PFEIFFER_ADAPTER) and tensor names
`base_model.model.<projection path>.adapter_down.weight` / `.adapter_up.weight`. Not
mergeable: the non-linearity `f` cannot be folded into a weight.
"""

from __future__ import annotations

import difflib
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
    is_linear,
    linear_dims,
    module_matches,
    register,
    replace_module,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh,
}
DEFAULT_REDUCTION = 16

# The `Layout` field each adapter role defaults to: the sub-layer output projections.
ROLE_DEFAULTS: dict[str, str] = {"attention": "attention_output",
                                 "cross_attention": "cross_attention_output",
                                 "ffn": "ffn_output"}


# --------------------------------------------------------------------------------------------
# config


@dataclass
class AdapterConfig(MethodConfig):
    """Options shared by both adapter variants (Pfeiffer uses exactly these)."""

    # Bottleneck width r. Give this or `reduction_factor`, not both.
    bottleneck: int | None = None
    # r = max(1, d // reduction_factor) where d is the hidden size at the adapter.
    # None (and no `bottleneck`) = 16, Pfeiffer et al.'s default.
    reduction_factor: int | None = None
    # The non-linearity f between the two projections.
    activation: str = "relu"
    # Standard deviation of W_up's normal initialisation; 0 = exactly zero, so the adapter
    # is the identity at step 0 (W_down still gets gradient from step 1 on, via W_up).
    init_std: float = 0.0
    # Biases on W_down and W_up (zero-initialised). METHODS.md's formula has none.
    bias: bool = False
    # Feed-forward output projections to adapt: a regex (fullmatch over the module path) or
    # a list of names (path equals or ends with `.name`). None = the model's layout (its
    # feed-forward output projections); the modules used are written into the saved config.
    ffn_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise PeftMethodError("Can't provide both `bottleneck` and `reduction_factor`. "
                                  "Choose one.")
        for key in ("bottleneck", "reduction_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise PeftMethodError(f"`{key}` must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise PeftMethodError(f"Unsupported `activation` {self.activation!r}. Supported "
                                  f"values are {', '.join(repr(a) for a in ACTIVATIONS)}")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise PeftMethodError(f"`init_std` must be a number >= 0, got {self.init_std!r}")
        for key in self._pattern_fields():
            _check_pattern(key, getattr(self, key))

    def _pattern_fields(self) -> tuple[str, ...]:
        return ("ffn_modules",)

    def width(self, hidden: int) -> int:
        """The bottleneck r for hidden size d = `hidden`."""
        if self.bottleneck is not None:
            if self.bottleneck > hidden:
                raise PeftMethodError(f"`bottleneck` {self.bottleneck} is wider than the "
                                      f"hidden size {hidden}; an adapter needs r <= d")
            return self.bottleneck
        return max(1, hidden // (self.reduction_factor or DEFAULT_REDUCTION))


@dataclass
class HoulsbyConfig(AdapterConfig):
    """Houlsby adapters: after the attention output and the feed-forward output of every
    layer, and after the cross-attention output of decoder layers that have one."""

    # Self-attention output projections; same rules and default as `ffn_modules`.
    attention_modules: list[str] | str | None = None
    # Cross-attention output projections (encoder–decoder decoders). None = the model's
    # layout; an empty list = no cross-attention adapters.
    cross_attention_modules: list[str] | str | None = None

    def _pattern_fields(self) -> tuple[str, ...]:
        return ("ffn_modules", "attention_modules", "cross_attention_modules")


def _check_pattern(key: str, value: Any) -> None:
    ok = value is None or isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    if not ok:
        raise PeftMethodError(f"`{key}` must be a regular expression or a list of module "
                              f"names, got {value!r}")


# --------------------------------------------------------------------------------------------
# the layer


class AdapterLayer(WrapsBaseLayer, nn.Module):
    """An output projection followed by a bottleneck adapter.

    forward: x [..., d_in] → y = base_layer(x) [..., d] → y + W_up f(W_down y) [..., d].
    `adapter_down` is nn.Linear(d, r) (W_down [r, d]), `adapter_up` nn.Linear(r, d)
    (W_up [d, r]). Works for nn.Linear and GPT-2's Conv1D alike (only the output is touched).
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, activation: str = "relu",
                 bias: bool = False, init_std: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        _, d = linear_dims(base_layer)
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        self.adapter_down = nn.Linear(d, bottleneck, bias=bias, **kw)
        self.adapter_up = nn.Linear(bottleneck, d, bias=bias, **kw)
        self.act = ACTIVATIONS[activation]()
        with torch.no_grad():
            # W_down keeps nn.Linear's Kaiming-uniform init: it must be non-zero, or W_up
            # would get no gradient either. W_up zero (or tiny) makes the adapter ≈ identity.
            if init_std > 0:
                nn.init.normal_(self.adapter_up.weight, std=init_std)
            else:
                nn.init.zeros_(self.adapter_up.weight)
            for lin in (self.adapter_down, self.adapter_up):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def adapter(self, y: torch.Tensor) -> torch.Tensor:
        """W_up f(W_down y): y [..., d] → [..., d] (the residual branch only)."""
        h = self.adapter_down(y.to(self.adapter_down.weight.dtype))
        return self.adapter_up(self.act(h)).to(y.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y + self.adapter(y)


# --------------------------------------------------------------------------------------------
# placement


def adapter_sites(model: nn.Module, config: AdapterConfig, roles: tuple[str, ...],
                  exclude: set[str], method: str, layout: Layout | None) -> dict[str, str]:
    """{module path: role} for every projection that gets an adapter.

    Each role takes the user's patterns when given, else the model layout's output projections
    of that sub-layer (`ROLE_DEFAULTS`). A role the user asked for, or `attention`/`ffn` by
    default, must match at least one linear layer; cross-attention is optional (decoder-only
    and encoder-only models have none).
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n and n not in exclude
             and not any(n.startswith(e + ".") for e in exclude)]
    sites: dict[str, str] = {}
    for role in roles:
        user = getattr(config, f"{role}_modules", None)
        pattern = user if user is not None else (
            list(getattr(layout, ROLE_DEFAULTS[role])) if layout is not None else None)
        if pattern is None or (user is None and not pattern and role == "cross_attention"):
            if role == "cross_attention":
                continue  # the model has no cross-attention (or none is known)
            raise PeftMethodError(
                f"{method}: no default place for the {role} adapters in "
                f"{type(model).__name__}: pass `{role}_modules` (module names or a regular "
                f"expression), or apply the method with the model's `layout`")
        if isinstance(pattern, (list, tuple)):
            pattern = list(pattern)
            if not pattern:
                continue  # explicitly none
        found = [n for n in names if module_matches(n, pattern)]
        if not found and (user is not None or role != "cross_attention"):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if is_linear(modules[n])})
            wanted = pattern if isinstance(pattern, list) else [pattern]
            close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(
                str(w).rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)))  # best match first
            raise PeftMethodError(
                f"{method}: `{role}_modules` {pattern!r} match no module of "
                f"{type(model).__name__}" + (f"; close names: {', '.join(close)}" if close
                                             else f"; its linear layers are {', '.join(leaves)}"))
        for name in found:
            if not is_linear(modules[name]):
                raise PeftMethodError(f"{method}: {name} is a {type(modules[name]).__name__}; "
                                      f"adapters wrap linear output projections")
            if name in sites:
                raise PeftMethodError(
                    f"{method}: {name} matches both `{sites[name]}_modules` and "
                    f"`{role}_modules`; use a regular expression to tell them apart (a name "
                    f"list matches by suffix, and `attention.output.dense` ends with "
                    f"`output.dense`)")
            sites[name] = role
    return sites


def record_sites(model: nn.Module, config: AdapterConfig, roles: tuple[str, ...],
                 sites: dict[str, str]) -> None:
    """Write the defaults used into the config, so the saved file names its modules (by name
    where the names match exactly these modules, else by path) and loads without a layout."""
    for role in roles:
        if getattr(config, f"{role}_modules", None) is None:
            paths = [n for n, r in sites.items() if r == role]
            setattr(config, f"{role}_modules", compact_targets(model, paths) if paths else [])


# --------------------------------------------------------------------------------------------
# the methods


class _BottleneckAdapter(Method):
    """Shared injection; subclasses choose the roles that get adapters."""

    config_cls = AdapterConfig
    markers = ("adapter_down", "adapter_up")
    roles: tuple[str, ...] = ("ffn",)

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        # Every misfit is raised here, before `apply` freezes or wraps anything.
        for name in adapter_sites(model, config, self.roles, set(), self.name, layout):
            config.width(linear_dims(model.get_submodule(name))[1])

    def inject(self, adapted: AdaptedModel) -> None:
        config: AdapterConfig = adapted.peft_config
        model = adapted.model
        sites = adapter_sites(model, config, self.roles, set(adapted.modules_to_save),
                              self.name, adapted.layout)
        record_sites(model, config, self.roles, sites)
        for name in sites:
            base = model.get_submodule(name)
            r = config.width(linear_dims(base)[1])
            replace_module(model, name, AdapterLayer(base, r, config.activation, config.bias,
                                                     config.init_std))

    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        out = super().peft_config_dict(adapted)
        out["distill_method"] = self.name  # two methods could share a peft_type one day
        return out


@register
class Houlsby(_BottleneckAdapter):
    """Houlsby et al. 2019: adapters after attention, cross-attention and feed-forward."""

    name = "houlsby"
    peft_type = "HOULSBY_ADAPTER"
    config_cls = HoulsbyConfig
    roles = ("attention", "cross_attention", "ffn")


@register
class Pfeiffer(_BottleneckAdapter):
    """Pfeiffer et al. 2021: one adapter per layer, after the feed-forward output."""

    name = "pfeiffer"
    peft_type = "PFEIFFER_ADAPTER"
    config_cls = AdapterConfig
    roles = ("ffn",)
