"""`distill`: a student from a subset of the teacher's layers, trained with soft-label KD.

Loss (METHODS.md §1): `α·CE + (1−α)·T²·KL(teacher‖student)` plus optional hidden-state MSE,
attention KL and cosine terms over a layer map.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import peft_methods

from distill.arch import num_layers
from distill.compress.depth import check_layers, evenly_spaced, keep_layers
from distill.config.recipe import DistillStage, StudentSpec
from distill.errors import DistillError
from distill.kd.losses import default_layer_map
from distill.run.context import RunContext, StageResult
from distill.stages.adapt import adapter_metrics
from distill.stages.training import (frozen_teacher, kd_train, merged, save_student,
                                     student_source, with_method)


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


def run(ctx: RunContext, cfg: DistillStage, stage_dir: Path) -> StageResult:
    """Build the student from the teacher's layers and distill it: all its weights, or a PEFT
    method -- merged in at the end where it merges; otherwise the student is saved as it was
    cut (`model/`) and the method as an adapter on it (`adapter/`, PEFT format), measured by
    the stage like an adapt stage's."""
    teacher = frozen_teacher(ctx, eager_attention=cfg.loss.attention_kl > 0)
    layers, layer_map = plan_layers(cfg, num_layers(teacher.get()))
    student = keep_layers(student_source(ctx, teacher.get()), layers)
    keep_adapter = cfg.method != "full" and not peft_methods.get_method(cfg.method).mergeable
    if keep_adapter:  # the adapter's base: the cut student, frozen while the method trains
        base = save_student(ctx, student, stage_dir / "model")
        student.config._name_or_path = str(base)  # what adapter_config.json names
    seed = ctx.stage_seed(cfg.seed)  # before a PEFT method's weights are made
    student = with_method(ctx, student, cfg)
    loss_cfg = dataclasses.replace(cfg.loss, layer_map=layer_map)
    result, summary = kd_train(ctx, student, teacher, ctx.teacher_source, cfg, loss_cfg,
                               cache_teacher=cfg.cache_teacher,
                               cache_dir=ctx.run_dir / "teacher_cache",
                               log_path=stage_dir / "log.jsonl", desc="distill", seed=seed)
    metrics = {"layers": layers, "method": cfg.method, **summary}
    if not keep_adapter:
        out = save_student(ctx, merged(ctx.accelerator.unwrap_model(student)),
                           stage_dir / "model")
        return StageResult("done", out, metrics)
    adapted = ctx.accelerator.unwrap_model(student)
    out = stage_dir / "adapter"
    if ctx.is_main:
        peft_methods.save_adapter(adapted, out)
    ctx.accelerator.wait_for_everyone()
    with torch.no_grad():
        record = adapter_metrics(ctx, adapted, out, batch_size=cfg.eval_batch_size,
                                 seconds_per_step=result.seconds / max(result.steps, 1))
    record["base_model"] = str(stage_dir / "model")
    return StageResult("done", out, metrics | {"model": record}, model_metrics=record,
                       artifact_kind="adapter")
