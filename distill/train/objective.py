"""What every training stage optimizes: one module for finetune, distill, heal and adapt.

    objective = Objective(model, loss)                         # finetune: the task's hard loss
    objective = Objective(student, loss, teacher, cache)       # distill / heal: + the KD terms
    objective = Objective(adapted, loss, teacher)              # adapt (PEFT), with or without KD

`model` is a plain Hugging Face model or one a PEFT method wraps (`peft_methods.apply`); the
stages differ only by the loss weights (`DistillationLoss`: alpha = 1 and no teacher is plain
fine-tuning) and by which parameters train. The method's regulariser (AdaLoRA's
orthogonality, diff-tuning's λ‖Δ‖), optimizer groups (LoRA+) and per-step hook (AdaLoRA's
rank budget) pass through to the training loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill.kd.losses import DistillationLoss
from distill.kd.token_losses import TopK, top_k
from distill.tasks.base import TeacherTarget


class FrozenTeacher:
    """A frozen teacher loaded on first use (`load()` builds it): a stage whose soft labels all
    come from the teacher cache never loads it."""

    def __init__(self, load: Callable[[], nn.Module]) -> None:
        self._load = load
        self._model: nn.Module | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> nn.Module:
        if self._model is None:
            self._model = self._load()
        return self._model


class Objective(nn.Module):
    """`forward(batch) -> (loss, parts)` for the training loop (see the module docstring).

    The teacher is held outside the module tree, so that it is neither optimized nor wrapped by
    DDP; under FSDP the loop shards it as well (`frozen_models`) when it runs in the loop at all.

    Args:
        model: the model that trains (plain or PEFT-adapted).
        loss: the task's hard loss and the KD terms, with their weights.
        teacher: the frozen teacher (None: no KD term may need it).
        cached: the teacher cache's lookup, batch `idx` [B] -> the teacher's target (logits, or
            a language model's top-k), for the logit term.
        top_k: distill from the teacher's top-k (computed from the live teacher when there is
            no cache, so both routes learn from the same target).
    """

    def __init__(self, model: nn.Module, loss: DistillationLoss,
                 teacher: FrozenTeacher | None = None,
                 cached: Callable[[Tensor], TeacherTarget] | None = None,
                 top_k: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self._teacher = [teacher]  # a list hides it from nn.Module registration
        self.cached = cached
        self.top_k = top_k
        if self.calls_teacher and teacher is None:
            raise ValueError("the loss needs a teacher's outputs and none was given")

    @property
    def calls_teacher(self) -> bool:
        """Whether `forward` runs the teacher (logits not cached, or hidden/attention terms)."""
        loss = self.loss
        return loss.needs_hidden or loss.needs_attentions or (
            self.cached is None and loss.needs_teacher_logits)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        want_hidden, want_attn = self.loss.needs_hidden, self.loss.needs_attentions
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        extra_outputs = {}
        if want_hidden:
            extra_outputs["output_hidden_states"] = True
        if want_attn:
            extra_outputs["output_attentions"] = True
        s_out = self.model(**inputs, **extra_outputs)
        t_out, target = None, None
        if self.cached is not None and self.loss.needs_teacher_logits:
            target = _to(self.cached(batch["idx"].cpu()), s_out.logits.device)
        if self.calls_teacher:
            teacher = self._teacher[0]
            assert teacher is not None
            with torch.no_grad():
                t_out = teacher.get()(**inputs, **extra_outputs)
            if target is None and self.top_k is not None and self.loss.needs_teacher_logits:
                target = top_k(t_out.logits.detach(), self.top_k, self.loss.w.temperature)
        total, parts = self.loss(s_out, t_out, batch, target)
        extra = self.model.extra_loss() if hasattr(self.model, "extra_loss") else None
        if extra is not None:
            parts["loss_reg"] = float(extra.detach())
            total = total + extra
        return total, parts

    def frozen_models(self) -> list[nn.Module]:
        """The models `forward` runs without training them (see `distill.train.sharding`)."""
        teacher = self._teacher[0]
        return [teacher.get()] if self.calls_teacher and teacher is not None else []

    # PEFT methods' hooks, passed through to the loop
    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict] | None:
        groups = getattr(self.model, "optimizer_groups", None)
        return groups(lr, weight_decay) if groups is not None else None

    def on_step(self, step: int) -> None:
        hook = getattr(self.model, "on_step", None)
        if hook is not None:
            hook(step)

    @property
    def reads_gradients(self) -> bool:
        """Whether `on_step` needs whole gradients (refused under FSDP and DeepSpeed)."""
        method = getattr(self.model, "method", None)
        return bool(getattr(method, "reads_gradients", False))


def _to(target: TeacherTarget, device: torch.device) -> TeacherTarget:
    if isinstance(target, TopK):
        return TopK(target.log_probs.to(device), target.indices.to(device),
                    target.tail.to(device))
    return target.to(device)
