"""`distill`: a student from a subset of the teacher's layers, trained with soft-label KD.

Loss (METHODS.md §1): `α·CE + (1−α)·T²·KL(teacher‖student)` plus optional hidden-state MSE,
attention KL and cosine terms over a layer map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.compress.arch import num_layers
from distill.run.context import RunContext, StageResult
from distill.errors import DistillError
from distill.kd.losses import DistillationLoss, LossWeights, default_layer_map
from distill.kd.token_losses import TopK, top_k
from distill.models.loading import (config_num_layers, load_config, save_model,
                                    teacher_load_options)
from distill.tasks.base import TeacherTarget
from distill.config.recipe import DistillStage, LossConfig, StudentSpec, TrainArgs
from distill.compress.depth import check_layers, evenly_spaced, keep_layers
from distill.train.loop import LoopResult, train_loop


class FrozenTeacher:
    """The run's frozen teacher, loaded on first use: a stage whose soft labels all come from
    the teacher cache never loads it."""

    def __init__(self, ctx: RunContext, eager_attention: bool = False) -> None:
        self._ctx, self._eager = ctx, eager_attention
        self._model: PreTrainedModel | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_frozen_teacher(self._ctx, self._eager)
        return self._model


class DistillUnit(nn.Module):
    """Student + loss (+ projections); the teacher is held outside the module tree so that it
    is neither optimized nor wrapped by DDP. Under FSDP the loop shards it as well
    (`frozen_models`), when it runs in the loop at all (not with a teacher cache)."""

    def __init__(self, student: nn.Module, loss: DistillationLoss, teacher: FrozenTeacher,
                 cached: Callable[[Tensor], TeacherTarget] | None, top_k: int | None = None
                 ) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self._teacher = [teacher]  # a list hides it from nn.Module registration
        self.cached = cached
        self.top_k = top_k

    @property
    def calls_teacher(self) -> bool:
        """Whether `forward` runs the teacher (no cache, or hidden/attention terms)."""
        loss = self.loss
        return loss.needs_hidden or loss.needs_attentions or (
            self.cached is None and loss.needs_teacher_logits)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        want_hidden, want_attn = self.loss.needs_hidden, self.loss.needs_attentions
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_out = self.student(**inputs, output_hidden_states=want_hidden,
                             output_attentions=want_attn)
        t_out, target = None, None
        if self.cached is not None and self.loss.needs_teacher_logits:
            target = _to(self.cached(batch["idx"].cpu()), s_out.logits.device)
        if self.calls_teacher:
            with torch.no_grad():
                t_out = self._teacher[0].get()(**inputs, output_hidden_states=want_hidden,
                                               output_attentions=want_attn)
            if target is None and self.top_k is not None:
                # The same top-k the cache would hold, from the live teacher.
                target = top_k(t_out.logits.detach(), self.top_k, self.loss.w.temperature)
        return self.loss(s_out, t_out, batch, target)

    def frozen_models(self) -> list[nn.Module]:
        """The models `forward` runs without training them (see `distill.train.sharding`)."""
        return [self._teacher[0].get()] if self.calls_teacher else []


def _to(target: TeacherTarget, device: torch.device) -> TeacherTarget:
    if isinstance(target, TopK):
        return TopK(target.log_probs.to(device), target.indices.to(device),
                    target.tail.to(device))
    return target.to(device)


def student_layers(spec: StudentSpec, teacher_layers: int) -> list[int]:
    """The teacher layers the student keeps, checked against the teacher's depth."""
    if spec.layers is not None:
        check_layers(spec.layers, teacher_layers, "student.layers")
        return list(spec.layers)
    assert spec.num_layers is not None
    return evenly_spaced(spec.num_layers, teacher_layers)


def plan_layers(cfg: DistillStage, depth: int, key: str = "") -> tuple[list[int], list[int]]:
    """(kept teacher layers, layer map) for a teacher of `depth` layers, or a clear error.

    Called by the pipeline before any training, from the teacher's config alone, so a bad
    index fails in seconds rather than after the teacher has been tuned.
    """
    prefix = f"{key}." if key else ""
    try:
        layers = student_layers(cfg.student, depth)
    except DistillError as exc:
        raise DistillError(f"{prefix}student.{exc}".replace("student.student.", "student.")
                           ) from None
    layer_map = cfg.loss.layer_map or default_layer_map(len(layers), depth)
    if len(layer_map) != len(layers) or any(not 0 <= j < depth for j in layer_map):
        raise DistillError(f"{prefix}loss.layer_map: {layer_map} must give one teacher layer "
                           f"(0..{depth - 1}) for each of the {len(layers)} student layers")
    return layers, layer_map


def load_frozen_teacher(ctx: RunContext, eager_attention: bool = False) -> PreTrainedModel:
    """The run's task teacher, frozen, in eval mode: on the run's device in the recipe's
    `teacher.dtype`, or spread over devices by `teacher.device_map` (one process only)."""
    spec = ctx.recipe.teacher
    if spec.device_map is not None and ctx.accelerator.num_processes > 1:
        raise DistillError(
            f"teacher.device_map: {spec.device_map!r} spreads one teacher over the devices of "
            f"one process, but this run has {ctx.accelerator.num_processes} processes; use "
            "`teacher.dtype: bfloat16` (half the memory) or run in one process")
    options = teacher_load_options(spec.dtype, spec.device_map, spec.offload_folder,
                                   spec.max_memory)
    teacher, _ = ctx.load_model(ctx.teacher_source, load_options=options)
    if eager_attention:
        # Fused attention kernels do not return attention maps.
        teacher.set_attn_implementation("eager")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    # A dispatched teacher stays where device_map put it; its hooks move inputs and outputs.
    return teacher if spec.device_map is not None else teacher.to(ctx.accelerator.device)


def student_source(ctx: RunContext, teacher: PreTrainedModel) -> PreTrainedModel:
    """The model a student is cut from: the frozen teacher itself, or a float32 copy on the
    run's device when the teacher is kept in another dtype or spread by a device map."""
    spec = ctx.recipe.teacher
    if spec.dtype in (None, "float32") and spec.device_map is None:
        return teacher
    full, _ = ctx.load_model(ctx.teacher_source, load_options={"dtype": torch.float32})
    return full.to(ctx.accelerator.device)


def kd_train(ctx: RunContext, student: PreTrainedModel, teacher: FrozenTeacher,
             args: TrainArgs, loss_cfg: LossConfig, *, cache_teacher: bool, cache_dir: Path,
             log_path: Path, desc: str) -> tuple[LoopResult, dict]:
    """Distill `teacher` into `student` in place (best validation weights kept).

    Shared by the `distill` stage and the heal phases of `shrink`. With logit losses only,
    the teacher's soft labels come from a cache in `cache_dir` (computed once, reused by every
    epoch and every later call with the same teacher and data; what it stores is the task's
    choice: a classifier's logits, a language model's top-k).

    Returns:
        (the loop's result, a summary for metrics.json).
    """
    config = load_config(ctx.teacher_source, ctx.recipe.teacher.trust_remote_code)
    depth_s, depth_t = num_layers(student), config_num_layers(config)
    layer_map = loss_cfg.layer_map or default_layer_map(depth_s, depth_t)
    if len(layer_map) != depth_s or any(not 0 <= j < depth_t for j in layer_map):
        raise DistillError(f"loss.layer_map: {layer_map} must give one teacher layer "
                           f"(0..{depth_t - 1}) for each of the {depth_s} student layers")
    weights = LossWeights(loss_cfg.alpha, loss_cfg.temperature, loss_cfg.hidden_mse,
                          loss_cfg.attention_kl, loss_cfg.cosine, loss_cfg.divergence,
                          loss_cfg.beta, loss_cfg.skew)
    seed = ctx.stage_seed(args.seed)
    loss = DistillationLoss(ctx.task, weights, layer_map, student.config.hidden_size,
                            config.hidden_size)
    cached, cache_info = None, None
    if cache_teacher and loss.needs_teacher_logits and not (
            loss.needs_hidden or loss.needs_attentions):
        cache = ctx.task.teacher_cache(
            cache_dir, teacher.get, ctx.tokenized("train"),
            ctx.loader("train", args.eval_batch_size), teacher_source=ctx.teacher_source,
            data_cfg=ctx.recipe.data, temperature=loss_cfg.temperature, top_k=loss_cfg.top_k,
            accelerator=ctx.accelerator)
        if cache is not None:
            cached, cache_info = cache.lookup, cache.info
    student.train()
    result = train_loop(
        DistillUnit(student, loss, teacher, cached, loss_cfg.top_k),
        ctx.loader("train", args.batch_size, shuffle=True, seed=seed), args,
        accelerator=ctx.accelerator, keep=student,
        log_path=log_path, desc=desc, console=ctx.console,
        **ctx.validation(student, args.eval_batch_size))
    return result, {
        "layer_map": layer_map, "loss": vars(weights) | {"top_k": loss_cfg.top_k},
        "teacher": ctx.teacher_source, "teacher_cache": cache_info,
        "teacher_loaded": teacher.loaded, "steps": result.steps,
        "train_seconds": round(result.seconds, 2), "bf16": result.bf16,
        f"best_validation_{ctx.task.metric}": result.best_metric,
        "best_epoch": result.best_epoch, "history": result.history, "seed": seed}


def save_student(ctx: RunContext, student: PreTrainedModel, out: Path) -> Path:
    """Save in HF format from the main process; every process waits for it."""
    if ctx.is_main:
        save_model(ctx.accelerator.unwrap_model(student), ctx.tokenizer, out)
    ctx.accelerator.wait_for_everyone()
    return out


def run(ctx: RunContext, cfg: DistillStage, stage_dir: Path) -> StageResult:
    """Build the student from the teacher's layers and distill it; save it in HF format."""
    teacher = FrozenTeacher(ctx, eager_attention=cfg.loss.attention_kl > 0)
    layers, layer_map = plan_layers(cfg, num_layers(teacher.get()))
    student = keep_layers(student_source(ctx, teacher.get()), layers)
    for p in student.parameters():
        p.requires_grad_(True)
    loss_cfg = dataclasses.replace(cfg.loss, layer_map=layer_map)
    _, summary = kd_train(ctx, student, teacher, cfg, loss_cfg,
                          cache_teacher=cfg.cache_teacher,
                          cache_dir=ctx.run_dir / "teacher_cache",
                          log_path=stage_dir / "log.jsonl", desc="distill")
    out = save_student(ctx, student, stage_dir / "model")
    return StageResult("done", out, {"layers": layers, **summary})
