"""Distillation losses (METHODS.md §1).

Every loss computes softmax/log-softmax in float32 (bf16 logits lose the soft-label tail),
masks positions whose label is `ignore_index`, and returns an exact 0 (still attached to the
graph) when nothing is left to average over, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.kd.token_losses import IGNORE_INDEX, divergence


def _masked_mean(values: Tensor, mask: Tensor | None, like: Tensor) -> Tensor:
    """Mean of `values` [N] over `mask` [N] (bool); 0 attached to `like`'s graph if empty."""
    if mask is not None:
        values = values[mask]
    if values.numel() == 0:
        return like.sum() * 0.0
    return values.mean()


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               labels: Tensor | None = None, ignore_index: int = IGNORE_INDEX,
               kind: str = "forward_kl", beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """Soft-label KD (Hinton et al., 2015): `T² · KL(p_T ‖ p_S)` averaged over positions
    (or another divergence `kind`: see `distill.kd.token_losses.divergence`).

    `p_T = softmax(z_T / T)`, `p_S = softmax(z_S / T)`; the `T²` keeps the gradient size
    independent of `T`. For token-level KD the loss is per token, averaged over unmasked tokens.

    Args:
        student_logits: [..., C] (e.g. [B, C] or [B, n, C]).
        teacher_logits: [..., C'] with C' >= C; a padded teacher vocabulary of the same family
            is sliced to the student's C classes.
        temperature: T > 0.
        labels: [...] optional; positions equal to `ignore_index` are left out.
    Returns:
        scalar; exactly 0 when every position is masked.
    """
    n_cls = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :n_cls].float().reshape(-1, n_cls) / temperature
    t = teacher_logits[..., :n_cls].float().reshape(-1, n_cls) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    per_pos = divergence(log_p_t, log_p_s, kind, beta, skew)  # [N]
    mask = None if labels is None else labels.reshape(-1) != ignore_index
    return temperature**2 * _masked_mean(per_pos, mask, student_logits)


def hard_ce_loss(student_logits: Tensor, labels: Tensor,
                 ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy with the hard labels, float32, 0 (not NaN) when all are masked.

    Args:
        student_logits: [..., C]; labels: [...].
    """
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    flat = labels.reshape(-1)
    per_pos = F.cross_entropy(logits, flat.clamp_min(0), reduction="none")
    return _masked_mean(per_pos, flat != ignore_index, student_logits)


def hidden_mse_loss(student_hidden: Tensor, teacher_hidden: Tensor,
                    attention_mask: Tensor | None = None,
                    projection: nn.Module | None = None) -> Tensor:
    """Hidden-state MSE (TinyBERT), averaged over real (unpadded) tokens and channels.

    Args:
        student_hidden: [B, n, d_S]; teacher_hidden: [B, n, d_T].
        attention_mask: [B, n], 1 for real tokens.
        projection: learned `d_S -> d_T` map, needed when the widths differ.
    """
    s = student_hidden.float()
    if projection is not None:
        s = projection(s)
    per_tok = (s - teacher_hidden.float()).pow(2).mean(-1).reshape(-1)  # [B*n]
    mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
    return _masked_mean(per_tok, mask, student_hidden)


def attention_kl_loss(student_attn: Tensor, teacher_attn: Tensor,
                      attention_mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """KL(teacher ‖ student) between attention distributions (TinyBERT / MiniLM).

    Each query row of an attention map is a distribution over keys. When the head counts
    differ, both maps are averaged over heads first (METHODS.md §1).

    Args:
        student_attn: [B, h_S, n, n] softmax probabilities; teacher_attn: [B, h_T, n, n].
        attention_mask: [B, n]; padded query rows are left out (padded keys carry ~0 mass).
    Returns:
        mean over real query rows (and heads) of `Σ_k p_T log(p_T / p_S)`.
    """
    s, t = student_attn.float(), teacher_attn.float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    per_row = (t * (torch.log(t + eps) - torch.log(s + eps))).sum(-1)  # [B, h, n]
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, :].expand_as(per_row).reshape(-1)
    return _masked_mean(per_row.reshape(-1), mask, student_attn)


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor,
                attention_mask: Tensor | None = None,
                projection: nn.Module | None = None) -> Tensor:
    """Cosine embedding loss `1 − cos(h_S, h_T)` per token (DistilBERT), over real tokens.

    Args:
        student_hidden: [B, n, d_S]; teacher_hidden: [B, n, d_T]; attention_mask: [B, n].
    """
    s = student_hidden.float()
    if projection is not None:
        s = projection(s)
    per_tok = 1.0 - F.cosine_similarity(s, teacher_hidden.float(), dim=-1).reshape(-1)
    mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
    return _masked_mean(per_tok, mask, student_hidden)


def default_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Student layer i learns from the last teacher layer of the i-th of `num_student` blocks.

    TinyBERT's uniform map: 3 of 6 -> [1, 3, 5]; equal depths map one to one.
    """
    return [round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)]


@dataclass
class LossWeights:
    """Weights of the terms of `DistillationLoss` (see `distill.config.recipe.LossConfig`)."""

    alpha: float = 0.5
    temperature: float = 2.0
    hidden_mse: float = 0.0
    attention_kl: float = 0.0
    cosine: float = 0.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1


class DistillationLoss(nn.Module):
    """`α·CE + (1−α)·T²·KL + w_h·MSE_hidden + w_a·KL_attn + w_c·cos`.

    The task supplies the hard loss and the soft-label term (per example for classifiers, per
    target token for language models: `distill.tasks`); the intermediate terms are shared.
    Holds the learned projections `d_S -> d_T` for hidden-state losses when widths differ, so
    they train with the student (and are dropped with the loss after distillation).

    Args:
        task: the run's task (`distill.tasks.base.Task`).
        weights: the term weights.
        layer_map: teacher layer for each student layer (0-based).
        student_width / teacher_width: hidden sizes d_S, d_T.
    """

    def __init__(self, task: Any, weights: LossWeights, layer_map: Sequence[int],
                 student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.task = task
        self.w = weights
        self.layer_map = list(layer_map)
        self.projection: nn.Module | None = None
        uses_hidden = weights.hidden_mse > 0 or weights.cosine > 0
        if uses_hidden and student_width != teacher_width:
            self.projection = nn.Linear(student_width, teacher_width)

    @property
    def needs_hidden(self) -> bool:
        return self.w.hidden_mse > 0 or self.w.cosine > 0

    @property
    def needs_attentions(self) -> bool:
        return self.w.attention_kl > 0

    @property
    def needs_teacher_logits(self) -> bool:
        return self.w.alpha < 1

    def forward(self, student_out: Any, teacher_out: Any | None, batch: dict[str, Tensor],
                teacher_target: Any | None = None) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its parts.

        Args:
            student_out / teacher_out: model outputs with `.logits` ([B, C] or [B, n, V]) and,
                when the intermediate losses are on, `.hidden_states` (L+1 tensors [B, n, d])
                and `.attentions` (L tensors [B, h, n, n]). `teacher_out` may be None when
                the cached `teacher_target` (logits, or a language model's top-k) is given.
            batch: the loader's batch (`labels`, `attention_mask`, ...).
        Returns:
            (scalar loss, {"loss_ce": …, "loss_kd": …, …} as floats for logging).
        """
        w = self.w
        z_s = student_out.logits
        attention_mask = batch["attention_mask"]
        parts: dict[str, Tensor] = {}
        if w.alpha > 0:
            parts["loss_ce"] = w.alpha * self.task.hard_loss(z_s, batch)
        if w.alpha < 1:
            target = teacher_target if teacher_target is not None \
                else teacher_out.logits.detach()
            parts["loss_kd"] = (1 - w.alpha) * self.task.kd_loss(
                z_s, target, batch, temperature=w.temperature, kind=w.divergence,
                beta=w.beta, skew=w.skew)
        if self.needs_hidden or self.needs_attentions:
            assert teacher_out is not None, "intermediate losses need a teacher forward pass"
        if w.hidden_mse > 0:
            terms = [hidden_mse_loss(student_out.hidden_states[i + 1],
                                     teacher_out.hidden_states[j + 1].detach(),
                                     attention_mask, self.projection)
                     for i, j in enumerate(self.layer_map)]
            parts["loss_hidden"] = w.hidden_mse * torch.stack(terms).mean()
        if w.attention_kl > 0:
            terms = [attention_kl_loss(student_out.attentions[i],
                                       teacher_out.attentions[j].detach(), attention_mask)
                     for i, j in enumerate(self.layer_map)]
            parts["loss_attn"] = w.attention_kl * torch.stack(terms).mean()
        if w.cosine > 0:
            parts["loss_cos"] = w.cosine * cosine_loss(student_out.hidden_states[-1],
                                                       teacher_out.hidden_states[-1].detach(),
                                                       attention_mask, self.projection)
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
