"""Diff-tuning: learn a difference Δ on chosen frozen weights, kept small by a penalty.

    min_Δ  L(θ_pretrained + Δ) + λ ‖Δ‖                (METHODS.md §3, seed 000 §5)

Seed 000 writes the penalty as a plain ‖Δ‖ (no subscript) next to the constraint ‖Δ‖ ≤ ε and
calls the method diff *pruning*'s relative: the point is a diff that is mostly zero and cheap
to store. The L1 norm (sum of |Δ|) is the convex penalty that drives entries to exactly zero,
so it is the default; `norm: l2` gives the Euclidean norm ‖Δ‖₂ = sqrt(Σ Δ²) (not squared),
which only shrinks. The norm is taken over all diffs together, as if Δ were one vector.

Each targeted linear layer (default: all linear layers except the output layer/task head)
gets a dense `diff_weight` shaped like its weight ([out, in]; Conv1D [in, out]) and, when the
layer has a bias and `diff_bias` is on, a `diff_bias` [out] — seed 000's table diffs the biases
too. Δ starts at zero, so the model is unchanged at initialisation. The forward pass uses
W + Δ; merge writes W ← W + Δ and keeps Δ, so unmerge can subtract it again.

Saved in the PEFT two-file layout with `peft_type` "DIFF_TUNING", as
`base_model.model.<path>.diff_weight` (dense) or, with `save_format: sparse`, as
`<...>.diff_weight.indices` (flat positions, int32/int64) + `<...>.diff_weight.values` of the
entries with |Δ| > `sparse_threshold`. Loading reads either format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_methods.base import (
    AdaptedModel,
    Layout,
    Method,
    MethodConfig,
    PeftMethodError,
    WrapsBaseLayer,
    find_targets,
    load_named,
    register,
    replace_module,
)

NORMS = ("l1", "l2")
SAVE_FORMATS = ("dense", "sparse")
MARKERS = ("diff_weight", "diff_bias")


@dataclass
class DiffTuningConfig(MethodConfig):
    """Where Δ lives, how it is penalised and how it is saved."""

    # Layers that get a Δ: regex (fullmatch over the module path), a list of names (path
    # equals or ends with `.name`), or "all-linear" (every linear layer but the output
    # layer and task head).
    target_modules: list[str] | str = "all-linear"
    # λ ≥ 0, the weight of the penalty in `extra_loss`. 0 = plain (dense) fine-tuning of the
    # targeted weights.
    penalty: float = 1e-4
    # "l1": λ Σ|Δ| (sparse diffs, the default) or "l2": λ sqrt(Σ Δ²).
    norm: str = "l1"
    # Also learn a Δ for the biases of the targeted layers (those that have one).
    diff_bias: bool = True
    # "dense": every Δ entry; "sparse": indices + values of the entries above the threshold.
    save_format: str = "dense"
    # Sparse saving keeps entries with |Δ| > threshold. 0 = every non-zero entry (lossless);
    # a positive threshold drops small entries, so the loaded diff is an approximation.
    sparse_threshold: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.target_modules
        if not (isinstance(t, str) or (isinstance(t, (list, tuple)) and t
                                       and all(isinstance(v, str) for v in t))):
            raise PeftMethodError(f"`target_modules` must be 'all-linear', a regular "
                                  f"expression or a non-empty list of module names, got {t!r}")
        if isinstance(t, tuple):
            self.target_modules = list(t)
        if self.norm not in NORMS:
            raise PeftMethodError(f"Unsupported `norm` {self.norm!r}. Supported values are "
                                  f"{', '.join(repr(n) for n in NORMS)}")
        if self.save_format not in SAVE_FORMATS:
            raise PeftMethodError(f"Unsupported `save_format` {self.save_format!r}. Supported "
                                  f"values are {', '.join(repr(s) for s in SAVE_FORMATS)}")
        for key in ("penalty", "sparse_threshold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PeftMethodError(f"`{key}` must be a number >= 0, got {value!r}")
        if not isinstance(self.diff_bias, bool):
            raise PeftMethodError(f"`diff_bias` must be true or false, got {self.diff_bias!r}")


class DiffLayer(WrapsBaseLayer, nn.Module):
    """A frozen linear layer (nn.Linear or Conv1D) plus a dense trainable difference.

    `diff_weight` has the stored weight's shape ([out, in] for Linear, [in, out] for Conv1D);
    `diff_bias` is [out] or absent. forward: x [..., in] → x (W+Δ)^T + (b+Δb) [..., out].
    """

    is_peft_layer = True

    def __init__(self, base_layer: nn.Module, diff_bias: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.conv1d = type(base_layer).__name__ == "Conv1D"
        w = base_layer.weight
        self.diff_weight = nn.Parameter(torch.zeros_like(w))
        b = base_layer.bias
        self.diff_bias = nn.Parameter(torch.zeros_like(b)) if diff_bias and b is not None \
            else None
        self.merged = False
        # With a penalty, each training forward records this layer's share of ‖Δ‖ (Σ|Δ| or
        # ΣΔ²) while its weights are at hand -- under FSDP they are gathered only then.
        self.norm: str | None = None
        self.penalty_part: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        weight = self.base_layer.weight + self.diff_weight
        if self.norm is not None and torch.is_grad_enabled():
            self.penalty_part = norm_part([d for d in (self.diff_weight, self.diff_bias)
                                           if d is not None], self.norm)
        bias = self.base_layer.bias
        if self.diff_bias is not None:
            bias = bias + self.diff_bias
        if self.conv1d:  # Conv1D: y = x W + b with W stored [in, out]
            y = x.reshape(-1, x.shape[-1]) @ weight
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + Δ, b ← b + Δb; Δ is kept so `unmerge` can subtract it."""
        if not self.merged:
            self.base_layer.weight.add_(self.diff_weight)
            if self.diff_bias is not None:
                self.base_layer.bias.add_(self.diff_bias)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.diff_weight)
            if self.diff_bias is not None:
                self.base_layer.bias.sub_(self.diff_bias)
            self.merged = False


def diff_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """{`<path>.diff_weight` / `<path>.diff_bias`: Δ} for every diff layer of `model`."""
    return {n: p for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1] in MARKERS}


def norm_part(diffs: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Σ|Δ| ("l1") or ΣΔ² ("l2") over `diffs` (0-d): the additive part of ‖Δ‖."""
    if norm == "l1":
        return sum(d.abs().sum() for d in diffs)
    return sum(d.pow(2).sum() for d in diffs)


def diff_penalty(diffs: list[torch.Tensor], norm: str) -> torch.Tensor:
    """‖Δ‖ over all diffs as one vector: Σ|Δ| ("l1") or sqrt(Σ Δ²) ("l2"). Returns [] (0-d)."""
    return combine_parts(norm_part(diffs, norm), norm)


def combine_parts(total: torch.Tensor, norm: str) -> torch.Tensor:
    """‖Δ‖ from the summed parts of `norm_part`."""
    if norm == "l1":
        return total
    squares = total
    # sqrt has an infinite derivative at 0 — exactly where Δ starts — which would turn the
    # first backward pass into NaN. Below a tiny value we use the (zero) subgradient instead.
    return torch.where(squares > 1e-30, squares.clamp_min(1e-30).sqrt(),
                       squares * 0.0)


def sparse_encode(delta: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices [nnz], values [nnz]) of the entries of Δ with |Δ| > threshold. Indices
    are int32 when they fit (half the bytes), else int64."""
    flat = delta.detach().reshape(-1)
    idx = torch.nonzero(flat.abs() > threshold).flatten()
    dtype = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
    return idx.to(dtype), flat[idx].clone()


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, like: torch.Tensor,
                  what: str) -> torch.Tensor:
    """The dense Δ shaped like `like` from its sparse encoding."""
    if indices.shape != values.shape or indices.dim() != 1:
        raise PeftMethodError(f"{what}: sparse diff has {tuple(indices.shape)} indices but "
                              f"{tuple(values.shape)} values")
    if indices.numel() and int(indices.max()) >= like.numel():
        raise PeftMethodError(f"{what}: sparse diff index {int(indices.max())} is outside a "
                              f"tensor of shape {tuple(like.shape)} — saved for another model?")
    out = torch.zeros(like.numel(), dtype=values.dtype)
    out[indices.long()] = values
    return out.reshape(like.shape)


@register
class DiffTuning(Method):
    """Diff-tuning: a dense difference Δ on chosen weights, penalty λ‖Δ‖; dense or sparse file."""

    name = "diff_tuning"
    peft_type = "DIFF_TUNING"
    config_cls = DiffTuningConfig
    mergeable = True
    markers = MARKERS

    def check_model(self, model: nn.Module, config: MethodConfig,
                    layout: Layout | None = None) -> None:
        find_targets(model, config.target_modules, method=self.name)

    def inject(self, adapted: AdaptedModel) -> None:
        config: DiffTuningConfig = adapted.peft_config
        model = adapted.model
        saved = adapted.modules_to_save
        skip = {n for n, _ in model.named_modules()
                if any(n == s or n.startswith(s + ".") for s in saved)}
        for name in find_targets(model, config.target_modules, method=self.name,
                                 exclude=skip):
            layer = DiffLayer(model.get_submodule(name), config.diff_bias)
            layer.norm = config.norm if config.penalty > 0 else None
            replace_module(model, name, layer)

    def extra_loss(self, adapted: AdaptedModel) -> torch.Tensor | None:
        """λ‖Δ‖ (0-d tensor), added by the training loop to the task loss.

        After a training forward, from the parts every diff layer recorded then (the weights
        that forward used; read once); otherwise from the parameters directly."""
        config: DiffTuningConfig = adapted.peft_config
        if config.penalty == 0:
            return None
        layers = [m for m in adapted.model.modules() if isinstance(m, DiffLayer)]
        parts = [m.penalty_part for m in layers]
        if layers and all(p is not None for p in parts):
            for m in layers:
                m.penalty_part = None
            return config.penalty * combine_parts(sum(parts), config.norm)
        return config.penalty * diff_penalty(list(diff_tensors(adapted.model).values()),
                                             config.norm)

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        config: DiffTuningConfig = adapted.peft_config
        prefix = self.key_prefix()
        out: dict[str, torch.Tensor] = {}
        for name, delta in diff_tensors(adapted.model).items():
            if config.save_format == "dense":
                out[prefix + name] = delta
            else:
                idx, values = sparse_encode(delta, config.sparse_threshold)
                out[f"{prefix}{name}.indices"] = idx
                out[f"{prefix}{name}.values"] = values
        return out

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        """Dense tensors load as they are; sparse pairs are scattered into zeros first, so a
        folder in either format loads (whatever this config's `save_format` says)."""
        prefix = self.key_prefix()
        own = diff_tensors(adapted.model)
        source: dict[str, torch.Tensor] = {}
        for name, delta in own.items():
            key = prefix + name
            if key in state:
                source[name] = state[key]
            elif f"{key}.indices" in state and f"{key}.values" in state:
                source[name] = sparse_decode(state[f"{key}.indices"], state[f"{key}.values"],
                                             delta, f"{self.name}: {key}")
        load_named(own, source, what=self.name)
