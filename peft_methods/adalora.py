"""AdaLoRA: LoRA in SVD form whose rank budget shrinks during training to the important
singular values (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning"). The math is PEFT's `peft.tuners.adalora`, line for line:

- **Layer.** `y = x Wᵀ + b + (α / (ranknum + 1e-5)) · dropout(x) (A ⊙ E)ᵀ Bᵀ`
  with P = B ∈ R^{out×r}, Λ = diag(E), E ∈ R^{r×1}, Q = A ∈ R^{r×in}; `ranknum` = init_r
  (kept when the rank is later cut, so the scale never jumps).
  Init: E = 0, A, B ~ N(0, 0.02²).
- **Importance** (`RankAllocator`, after each optimizer step, with the step's gradients):
  sensitivity I = |θ ⊙ ∇θ| of every entry of A, E, B, smoothed Ī ← β₁Ī + (1−β₁)I, its
  uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|, score s = Ī·Ū. The score of triplet i is
  s(E_i) + mean_j s(A_ij) + mean_k s(B_ki).
- **Budget.** Total rank b(t) = b₀ = init_r·n for t ≤ tinit, then a cubic decrease
  b(t) = ⌊(b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋
  with b_T = target_r·n, and b_T for the last tfinal steps. Every deltaT steps (and at
  t = T − tfinal) the b₀ − b(t) lowest-scoring triplets get E_i = 0 (masked, not removed,
  so the optimizer state keeps its shape); the mask is `rank_pattern`, re-applied every
  step after T − tfinal.
- **Orthogonality.** `orth_reg_weight · mean over matrices of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F`
  (PEFT adds it to the loss; the Frobenius norm is not squared), via `extra_loss`.

Saved as PEFT saves it: `base_model.model.<path>.lora_A` / `.lora_E` / `.lora_B` (no
`.weight`), cut to the kept triplets when `rank_pattern` is set, and `rank_pattern` in
adapter_config.json (`{"<path>.lora_E": [true, false, ...]}`).
"""

from __future__ import annotations

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
    linear_dims,
    load_named,
    register,
    replace_module,
)
from peft_methods.lora import (
    _UNSUPPORTED_PEFT_FIELDS,
    check_target_modules,
    file_target_modules,
    resolve_targets,
)


def _int(config: Any, key: str, minimum: int) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PeftMethodError(f"Unsupported `{key}` {value!r}. Supported values are integers "
                              f">= {minimum}")


@dataclass
class AdaLoraConfig(MethodConfig):
    """AdaLoRA options; names and defaults as PEFT's `AdaLoraConfig`."""

    # Rank of every adapted layer before pruning.
    init_r: int = 12
    # Average rank per layer after pruning (total budget = target_r · number of layers).
    target_r: int = 8
    # Warm-up steps before any pruning.
    tinit: int = 0
    # Final steps with the budget fixed at target_r (the mask is re-applied each step).
    tfinal: int = 0
    # Steps between two budget allocations in the pruning phase.
    deltaT: int = 1
    # EMA coefficient of the sensitivity (β₁).
    beta1: float = 0.85
    # EMA coefficient of the uncertainty (β₂).
    beta2: float = 0.85
    # Weight of the orthogonality regulariser on A and B.
    orth_reg_weight: float = 0.5
    # Optimizer steps of the whole run; the budget schedule needs it (required, as in PEFT).
    total_step: int | None = None
    # Kept triplets per layer, `{"<path>.lora_E": [bool] * init_r}`; set by the allocator.
    rank_pattern: dict[str, list[bool]] | None = None
    # α: the update is scaled by α / ranknum.
    lora_alpha: float = 8
    # Dropout probability on the adapter path's input.
    lora_dropout: float = 0.0
    # Layers to adapt: names, a regex, "all-linear", or None = the family default (bert:
    # query,value; gpt2: c_attn; llama: q_proj,v_proj; t5: q,k,v,o,wi,wo).
    target_modules: list[str] | str | None = None
    # True: E = 0 and A, B ~ N(0, 0.02²) (identity at init); False: all N(0, 1) (for tests).
    init_lora_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _int(self, "init_r", 1)
        _int(self, "target_r", 0)
        if self.target_r > self.init_r:
            raise PeftMethodError(f"Unsupported `target_r` {self.target_r}. Supported values "
                                  f"are 0..init_r ({self.init_r}); the budget only shrinks")
        for key in ("tinit", "tfinal"):
            _int(self, key, 0)
        _int(self, "deltaT", 1)
        if self.total_step is None:
            raise PeftMethodError("AdaLoRA needs `total_step`, the number of optimizer steps "
                                  "of the training run (its rank schedule depends on it)")
        _int(self, "total_step", 1)
        if self.tinit >= self.total_step - self.tfinal:
            raise PeftMethodError(f"`tinit` ({self.tinit}) + `tfinal` ({self.tfinal}) leave no "
                                  f"pruning phase in `total_step` ({self.total_step}) steps; "
                                  f"decrease them or increase total_step")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise PeftMethodError(f"Unsupported `{key}` {value!r}. Supported values are "
                                      f"numbers in (0, 1)")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise PeftMethodError(f"Unsupported `orth_reg_weight` {self.orth_reg_weight!r}. "
                                  f"Supported values are numbers >= 0")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise PeftMethodError(f"Unsupported `lora_alpha` {self.lora_alpha!r}. Supported "
                                  f"values are positive numbers")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise PeftMethodError(f"Unsupported `lora_dropout` {self.lora_dropout!r}. "
                                  f"Supported values are numbers in [0, 1)")
        self.target_modules = check_target_modules(self.target_modules)
        if not isinstance(self.init_lora_weights, bool):
            raise PeftMethodError(f"Unsupported `init_lora_weights` {self.init_lora_weights!r}"
                                  f". Supported values are true, false")
        if self.rank_pattern is not None and not (
                isinstance(self.rank_pattern, dict)
                and all(isinstance(v, list) for v in self.rank_pattern.values())):
            raise PeftMethodError("Unsupported `rank_pattern`. Supported values are null or "
                                  "{\"<path>.lora_E\": [true/false per triplet]}")


class SVDLinear(WrapsBaseLayer, nn.Module):
    """`base_layer(x) + α/(ranknum + 1e-5) · lora_B (lora_A ⊙ lora_E) dropout(x)` (PEFT's
    `adalora.SVDLinear`).

    Parameters: lora_A [r, in] (Q), lora_E [r, 1] (Λ), lora_B [out, r] (P).
    Shapes: x [..., in] -> [..., out]. Conv1D bases (weight [in, out]) merge transposed.
    """

    is_peft_layer = True

    def __init__(self, base_layer: nn.Module, *, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, init_lora_weights: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling = float(lora_alpha)
        # the rank the scale divides by: init_r, kept when triplets are later cut (PEFT)
        self.ranknum = float(r)
        self.merged = False
        self.set_rank(r, init_lora_weights)

    def set_rank(self, r: int, init: bool = True) -> None:
        """(Re)create A, E, B with `r` triplets (new parameters: rebuild the optimizer)."""
        ref = self.base_layer.weight
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        kw = {"device": ref.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw))
        self.lora_E = nn.Parameter(torch.randn(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw))
        if init:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        update = self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        return result + (update * self.scaling / (self.ranknum + 1e-5)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight, laid out like the base weight ([in, out] for Conv1D)."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, ranknum={self.ranknum:g}, scaling={self.scaling:g}"


class RankAllocator:
    """PEFT's `RankAllocator`: importance EMAs and the budget schedule.

    Args:
        layers: the SVD layers by module path (their order does not matter).
        config: the AdaLoRA config (its schedule fields).
    """

    def __init__(self, layers: dict[str, SVDLinear], config: AdaLoraConfig) -> None:
        self.config = config
        self.init_bgt = sum(layer.r for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to re-mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @staticmethod
    def _params(layers: dict[str, SVDLinear]) -> list[tuple[str, nn.Parameter]]:
        return [(f"{path}.{k}", getattr(layer, k)) for path, layer in layers.items()
                for k in ("lora_A", "lora_E", "lora_B")]

    @torch.no_grad()
    def update_ipt(self, layers: dict[str, SVDLinear]) -> None:
        """Sensitivity |θ·∇θ| and its EMAs, per entry of every A, E, B."""
        b1, b2 = self.config.beta1, self.config.beta2
        for n, p in self._params(layers):
            if n not in self.ipt:
                self.ipt[n] = torch.zeros_like(p)
                self.exp_avg_ipt[n] = torch.zeros_like(p)
                self.exp_avg_unc[n] = torch.zeros_like(p)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            self.ipt[n] = (p * grad).abs().detach()
            self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
            self.exp_avg_unc[n] = (b2 * self.exp_avg_unc[n]
                                   + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs())

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, SVDLinear], budget: int
                       ) -> dict[str, list[bool]]:
        """Zero E of all but the `budget` highest-scoring triplets; returns the kept mask."""
        triplet: dict[str, torch.Tensor] = {}
        for path in layers:
            ipt_a = self._score(f"{path}.lora_A").mean(dim=1, keepdim=True)     # [r, 1]
            ipt_b = self._score(f"{path}.lora_B").mean(dim=0).view(-1, 1)       # [r, 1]
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1)               # [r]
            triplet[path] = (self._score(f"{path}.lora_E").view(-1) + ipt_ab).view(-1, 1)
        k = self.init_bgt - budget
        pattern: dict[str, list[bool]] = {}
        if k <= 0:  # nothing to cut (PEFT's kthvalue would fail on k = 0)
            return {f"{p}.lora_E": [True] * layers[p].r for p in layers}
        threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=k
                                   )[0].item()
        for path, layer in layers.items():
            drop = triplet[path] <= threshold
            layer.lora_E.masked_fill_(drop, 0.0)
            pattern[f"{path}.lora_E"] = (~drop).view(-1).tolist()
        return pattern

    def update_and_allocate(self, layers: dict[str, SVDLinear], step: int,
                            force_mask: bool = False) -> tuple[int, dict | None]:
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt(layers)
        budget, mask_ind = self.budget_schedule(step)
        pattern = self.mask_to_budget(layers, budget) if mask_ind or force_mask else None
        return budget, pattern

    @staticmethod
    @torch.no_grad()
    def mask_using_rank_pattern(layers: dict[str, SVDLinear], pattern: dict[str, list[bool]]
                                ) -> None:
        for path, layer in layers.items():
            keep = torch.tensor(pattern[f"{path}.lora_E"], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


@register
class AdaLoRA(Method):
    """AdaLoRA; call `on_step(step)` after every optimizer step (the training loop does)."""

    name = "adalora"
    peft_type = "ADALORA"
    config_cls = AdaLoraConfig
    mergeable = True
    markers = ("lora_A", "lora_E", "lora_B")
    reads_gradients = True

    def inject(self, adapted: AdaptedModel) -> None:
        c: AdaLoraConfig = adapted.peft_config
        # Default targets: LoRA's (the query and value projections; PEFT's per-family AdaLoRA
        # table adds more projections for some families, e.g. every one of T5's).
        targets = resolve_targets(adapted, c.target_modules, method=self.name)
        for name in targets:
            replace_module(adapted.model, name, SVDLinear(
                adapted.model.get_submodule(name), r=c.init_r, lora_alpha=c.lora_alpha,
                lora_dropout=c.lora_dropout, init_lora_weights=c.init_lora_weights))
        # per-model state (the Method object is shared by every model using it)
        adapted.rank_allocator = RankAllocator(self.layers(adapted), c)

    @staticmethod
    def layers(adapted: AdaptedModel) -> dict[str, SVDLinear]:
        return {n: m for n, m in adapted.model.named_modules() if isinstance(m, SVDLinear)}

    # -- training hooks ----------------------------------------------------------------------
    def extra_loss(self, adapted: AdaptedModel) -> torch.Tensor | None:
        """orth_reg_weight · mean_M ‖M_cov − I‖_F over every A (AAᵀ) and B (BᵀB)."""
        weight = adapted.peft_config.orth_reg_weight
        layers = self.layers(adapted)
        if weight == 0 or not layers:
            return None
        terms = []
        for layer in layers.values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        return weight * torch.stack(terms).sum() / len(terms)

    def on_step(self, adapted: AdaptedModel, step: int) -> None:
        """PEFT's `update_and_allocate(global_step)`: update importance, prune to the budget,
        and after `total_step - tfinal` keep the final mask."""
        c: AdaLoraConfig = adapted.peft_config
        allocator: RankAllocator = adapted.rank_allocator
        layers = self.layers(adapted)
        end = c.total_step - c.tfinal
        if step < end:
            _, pattern = allocator.update_and_allocate(layers, step)
            if pattern:
                c.rank_pattern = pattern
        elif step == end or c.rank_pattern is None:
            _, c.rank_pattern = allocator.update_and_allocate(layers, step, force_mask=True)
            allocator.reset_ipt()
        else:
            allocator.mask_using_rank_pattern(layers, c.rank_pattern)

    def budget(self, adapted: AdaptedModel) -> dict[str, int]:
        """Triplets kept per layer (rank after pruning), by module path."""
        pattern = adapted.peft_config.rank_pattern or {}
        return {p: sum(pattern.get(f"{p}.lora_E", [True] * layer.r))
                for p, layer in self.layers(adapted).items()}

    # -- file format -------------------------------------------------------------------------
    def peft_config_dict(self, adapted: AdaptedModel) -> dict[str, Any]:
        out = super().peft_config_dict(adapted)
        layers = self.layers(adapted)
        out["target_modules"] = file_target_modules(adapted, list(layers))
        out["fan_in_fan_out"] = any(m.fan_in_fan_out for m in layers.values())
        out["bias"] = "none"
        return out

    def adapter_state_dict(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        """A, E, B per layer, cut to the kept triplets of `rank_pattern` (as PEFT saves)."""
        pattern = adapted.peft_config.rank_pattern or {}
        out = {}
        for path, layer in self.layers(adapted).items():
            keep = pattern.get(f"{path}.lora_E")
            idx = (torch.tensor(keep, device=layer.lora_E.device)
                   if keep is not None and sum(keep) != layer.r else None)
            a, e, b = layer.lora_A, layer.lora_E, layer.lora_B
            if idx is not None:
                a, e, b = a[idx], e[idx], b[:, idx]
            prefix = f"{self.key_prefix()}{path}."
            out.update({prefix + "lora_A": a, prefix + "lora_E": e, prefix + "lora_B": b})
        return out

    def load_adapter_state_dict(self, adapted: AdaptedModel, state: dict[str, torch.Tensor]
                                ) -> None:
        """Load A, E, B; a layer saved with fewer triplets (pruned) is cut to that rank first,
        keeping `ranknum` = init_r so its scale is the one it trained with (PEFT does too)."""
        prefix = self.key_prefix()
        own = {}
        for path, layer in self.layers(adapted).items():
            saved = state.get(f"{prefix}{path}.lora_A")
            if saved is not None and saved.shape[0] != layer.r:
                layer.set_rank(saved.shape[0])
            own.update({f"{path}.{k}": getattr(layer, k) for k in self.markers})
        load_named(own, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   what=self.name)
        adapted.rank_allocator = RankAllocator(self.layers(adapted), adapted.peft_config)

    def config_from_peft(self, data: dict[str, Any]) -> MethodConfig:
        used = [k for k, off in _UNSUPPORTED_PEFT_FIELDS.items()
                if k != "rank_pattern" and data.get(k, off) not in (off, None, {}, [], False)]
        if used:
            raise PeftMethodError(f"{self.name}: this adapter uses PEFT option(s) "
                                  f"{', '.join(f'{k}={data[k]!r}' for k in used)}, which "
                                  f"peft_methods does not implement; load it with peft")
        data = dict(data)
        if not isinstance(data.get("init_lora_weights", True), bool):
            data["init_lora_weights"] = True
        return super().config_from_peft(data)
