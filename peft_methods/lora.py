"""LoRA and LoRA+: a trainable low-rank update next to each frozen linear layer.

For a frozen `W ∈ R^{out×in}` the wrapped layer computes (METHODS.md §3, Hu et al. 2021)

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,    A ∈ R^{r×in}, B ∈ R^{out×r},
    s = α / r   (rsLoRA, Kalajdzievski 2023: s = α / √r)

with A random (Kaiming-uniform as `nn.Linear`, or Gaussian with std 1/r) and B zero, so the
model is unchanged at step 0. `merge()` folds `s·B A` into W; `unmerge()` subtracts it again.

LoRA+ (Hayou et al. 2024) is the same model trained with B's learning rate λ times A's.

The layer mirrors PEFT's `lora.Linear` (attributes `base_layer`, `lora_A`, `lora_B`,
`lora_dropout`, the same forward and init), so the adapter tensors are named
`base_model.model.<path>.lora_A.weight` exactly as PEFT names them and either side loads the
other's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Method,
    MethodConfig,
    PeftMethodError,
    WrapsBaseLayer,
    compact_targets,
    find_targets,
    is_linear,
    layout_defaults,
    linear_dims,
    register,
    replace_module,
)

INIT_CHOICES = (True, False, "gaussian")

# PEFT config fields that change the math or the tensors of a LoRA adapter and that this
# implementation does not have; an adapter using any of them is refused rather than loaded
# wrongly. Value = the field's "off" value.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "bias": "none", "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
    "trainable_token_indices": None, "target_parameters": None, "layer_replication": None,
    "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None,
    "monteclora_config": None, "velora_config": None, "kasa_config": None,
}


def check_target_modules(value: Any) -> list[str] | str | None:
    """Validate a `target_modules` value: None, a regex / "all-linear" string, or names."""
    if value is None or isinstance(value, str):
        if value == "":
            raise PeftMethodError("`target_modules` is empty; give module names, a regular "
                                  "expression or 'all-linear'")
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise PeftMethodError(f"Unsupported `target_modules` {value!r}. Supported values are a "
                          f"non-empty list of module names, a regular expression string, "
                          f"'all-linear', or None (the model family's default)")


# What LoRA adapts when `target_modules` is not given: the attention's query and value
# projections (PEFT's default for most families), read from the model's `Layout`.
DEFAULT_ROLES = ("query", "value")


def resolve_targets(adapted: AdaptedModel, target: list[str] | str | None, *,
                    method: str) -> list[str]:
    """Paths of the linear layers to adapt. None = the query and value projections of the
    model's layout; modules that train fully (`modules_to_save`) are never adapted, as in
    PEFT, which would otherwise nest an adapter inside a module it also saves whole."""
    model = adapted.model
    if target is None:
        target = layout_defaults(adapted.layout, DEFAULT_ROLES, method=method,
                                 option="target_modules")
    saved = adapted.modules_to_save
    inside = [n for n, _ in model.named_modules()
              if any(n == s or n.startswith(s + ".") for s in saved)]
    return find_targets(model, target, method=method, exclude=inside)


def file_target_modules(adapted: AdaptedModel, wrapped: list[str]) -> list[str] | str:
    """`target_modules` for adapter_config.json: what the user gave, the default spelled out
    (module names where they match exactly the adapted layers, as PEFT writes its defaults,
    else paths), or for "all-linear" the adapted paths themselves (PEFT resolves "all-linear"
    to paths too; paths cannot drift if the two rules ever differ)."""
    target = adapted.peft_config.target_modules
    if target is None:
        return compact_targets(adapted.model, wrapped)
    if target == "all-linear":
        return sorted(wrapped)
    return target


# --------------------------------------------------------------------------------------------
# config


@dataclass
class LoraConfig(MethodConfig):
    """LoRA options; names and defaults as PEFT's `LoraConfig`."""

    # Rank of the update (rows of A, columns of B).
    r: int = 8
    # α: the update is scaled by α/r (or α/√r with use_rslora).
    lora_alpha: float = 8
    # Dropout probability on the LoRA path's input (not on the frozen path).
    lora_dropout: float = 0.0
    # Which linear layers to adapt: module names (a path equal to or ending with `.name`), a
    # regular expression over the full path, "all-linear" (every linear layer but the output
    # layer / task head), or None = the family default (bert: query,value; gpt2: c_attn;
    # llama: q_proj,v_proj; t5: q,v).
    target_modules: list[str] | str | None = None
    # rsLoRA: scale by α/√r instead of α/r, so the update's size does not shrink as r grows.
    use_rslora: bool = False
    # A's init: True = Kaiming-uniform (nn.Linear's default), "gaussian" = N(0, 1/r²),
    # False = leave random and B random too (the model changes at init; for tests). B = 0
    # otherwise.
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PeftMethodError(f"Unsupported `r` {self.r!r}. Supported values are "
                                  f"positive integers")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or self.lora_alpha <= 0:
            raise PeftMethodError(f"Unsupported `lora_alpha` {self.lora_alpha!r}. Supported "
                                  f"values are positive numbers")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise PeftMethodError(f"Unsupported `lora_dropout` {self.lora_dropout!r}. "
                                  f"Supported values are numbers in [0, 1)")
        self.target_modules = check_target_modules(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise PeftMethodError(f"Unsupported `use_rslora` {self.use_rslora!r}. Supported "
                                  f"values are true, false")
        if not any(self.init_lora_weights is c or (isinstance(c, str)
                                                   and self.init_lora_weights == c)
                   for c in INIT_CHOICES):
            raise PeftMethodError(f"Unsupported `init_lora_weights` {self.init_lora_weights!r}."
                                  f" Supported values are true, false, 'gaussian'")


# --------------------------------------------------------------------------------------------
# the layer


def _dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear, a Conv1D, or a quantized linear with in/out_features."""
    if is_linear(base):
        return linear_dims(base)
    return base.in_features, base.out_features


class LoraLinear(WrapsBaseLayer, nn.Module):
    """`base_layer(x) + scaling · lora_B(lora_A(lora_dropout(x)))`.

    Args:
        base_layer: the frozen nn.Linear / Conv1D (weight [in, out], `fan_in_fan_out`), or a
            quantized linear (QLoRA) exposing `in_features`/`out_features`.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights: as in `LoraConfig`.

    Shapes: x [..., in] -> [..., out]; lora_A.weight [r, in]; lora_B.weight [out, r].
    """

    is_peft_layer = True

    def __init__(self, base_layer: nn.Module, *, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: bool | str = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = _dims(base_layer)
        self.in_features, self.out_features = in_features, out_features
        # GPT-2's Conv1D stores W as [in, out]; merging must transpose the update (PEFT's
        # fan_in_fan_out). A quantized base remembers whether it came from a Conv1D.
        self.fan_in_fan_out = (type(base_layer).__name__ == "Conv1D"
                               or bool(getattr(base_layer, "fan_in_fan_out", False)))
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Adapters train in float32 even on a half-precision base (PEFT's autocast_adapter_dtype).
        ref = next(iter(base_layer.parameters()), None)
        if ref is None:
            ref = next(iter(base_layer.buffers()))
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        self.lora_A = nn.Linear(in_features, r, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=ref.device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init: bool | str) -> None:
        """PEFT's init: A Kaiming-uniform(a=√5) or N(0, 1/r²); B zero (`init=False`: both
        keep nn.Linear's random init, so the layer is not the identity)."""
        if init is False:
            return
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # [..., r]
        if h.dtype == dtype:
            # result + (s·h)·Bᵀ as one matrix product accumulated into the base output: the
            # scaling touches the rank-r activations, and no [..., out] temporaries are made
            # for the product and its scaled copy (PEFT's form, below, makes both).
            flat = torch.addmm(result.reshape(-1, self.out_features),
                               (h * self.scaling).reshape(-1, self.r), self.lora_B.weight.t())
            return flat.view(result.shape)
        return (result + self.lora_B(h) * self.scaling).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """`scaling · B A`, laid out like the base weight: [out, in] ([in, out] for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """W ← W + scaling · B A (computed in float32, cast to W's dtype)."""
        if self.merged:
            return
        if not is_linear(self.base_layer):
            raise PeftMethodError(f"cannot merge LoRA into a {type(self.base_layer).__name__} "
                                  f"(a quantized base has no full-precision weight)")
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W ← W − scaling · B A: undoes `merge` up to float rounding."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


# --------------------------------------------------------------------------------------------
# the methods


@register
class LoRA(Method):
    """LoRA on the chosen linear layers; mergeable; saved exactly as PEFT saves LoRA."""

    name = "lora"
    peft_type = "LORA"
    config_cls = LoraConfig
    mergeable = True
    markers = ("lora_A", "lora_B")

    def make_layer(self, base: nn.Module, config: LoraConfig) -> LoraLinear:
        return LoraLinear(base, r=config.r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                          init_lora_weights=config.init_lora_weights)

    def inject(self, adapted: AdaptedModel) -> None:
        config = adapted.peft_config
        for name in resolve_targets(adapted, config.target_modules, method=self.name):
            replace_module(adapted.model, name,
                           self.make_layer(adapted.model.get_submodule(name), config))

    @staticmethod
    def wrapped(adapted: AdaptedModel) -> dict[str, LoraLinear]:
        return {n: m for n, m in adapted.model.named_modules() if isinstance(m, LoraLinear)}

    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        """A LoraConfig PEFT reads without warnings; subclasses add their own keys (PEFT
        ignores unknown keys with a warning) plus `distill_method` so we reload the variant."""
        out = super().peft_config_dict(adapted)
        layers = self.wrapped(adapted)
        out["target_modules"] = file_target_modules(adapted, list(layers))
        # PEFT flips this itself for Conv1D (with a warning); write what it will use.
        out["fan_in_fan_out"] = any(m.fan_in_fan_out for m in layers.values())
        out["bias"] = "none"
        if self.name != LoRA.name:
            out["distill_method"] = self.name
        return out

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        """Our config from an adapter_config.json; PEFT features we lack are refused by name.
        An init scheme we lack is irrelevant here (the saved weights replace the init)."""
        used = [k for k, off in _UNSUPPORTED_PEFT_FIELDS.items()
                if data.get(k, off) not in (off, None, {}, [], False)]
        if used:
            raise PeftMethodError(f"{self.name}: this adapter uses PEFT option(s) "
                                  f"{', '.join(f'{k}={data[k]!r}' for k in used)}, which "
                                  f"peft_methods does not implement; load it with peft")
        data = dict(data)
        if data.get("init_lora_weights") not in INIT_CHOICES:
            data["init_lora_weights"] = True
        return super().config_from_peft(data)


@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA options plus LoRA+'s learning-rate ratio."""

    # λ = lr(B) / lr(A). The LoRA+ paper's default is 16.
    loraplus_lr_ratio: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.loraplus_lr_ratio, bool) or not isinstance(
                self.loraplus_lr_ratio, (int, float)) or self.loraplus_lr_ratio <= 0:
            raise PeftMethodError(f"Unsupported `loraplus_lr_ratio` {self.loraplus_lr_ratio!r}"
                                  f". Supported values are positive numbers (λ, usually 2-32)")


@register
class LoRAPlus(LoRA):
    """LoRA whose B matrices learn λ times faster. Saved as plain LoRA (`peft_type` LORA)
    plus `loraplus_lr_ratio` and `distill_method`, which PEFT ignores (with a warning)."""

    name = "lora_plus"
    config_cls = LoraPlusConfig

    def optimizer_groups(self, adapted: AdaptedModel, lr: float, weight_decay: float
                         ) -> list[dict]:
        """Three AdamW groups: A matrices and other trainable matrices at `lr`; B matrices at
        `lr · λ`; 1-D tensors (biases, norm weights of `modules_to_save`) at `lr` without
        weight decay. PEFT's `create_loraplus_optimizer` also puts 1-D tensors at `lr · λ`;
        the paper's argument is about B only, so they keep the base rate here."""
        ratio = adapted.peft_config.loraplus_lr_ratio
        groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "no_decay": []}
        for name, p in adapted.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in name.split("."):
                groups["lora_B"].append(p)
            elif p.ndim <= 1:
                groups["no_decay"].append(p)
            else:
                groups["lora_A"].append(p)
        spec = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay),
                "no_decay": (lr, 0.0)}
        return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1], "name": k}
                for k, ps in groups.items() if ps]
