"""`adapt`: a PEFT method on a model of the run, maybe for a new task with a new head.

The base model is frozen; the method's parameters and the `modules_to_save` (the new head and
the pooler, METHODS.md §3) train in the shared loop, on the task's hard loss and, with
`loss.alpha` < 1, the KD terms against the run's teacher or a named one. The adapter is
saved in PEFT's format in `stages/NN-adapt/adapter/`, and the stage evaluates itself on its own
data's test split: the task's metric, trainable parameters and their share, seconds per
optimizer step, latency.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from rich.markup import escape

import peft_methods
from distill.config.recipe import AdaptStage
from distill.errors import DistillError
from distill.models.loading import count_params, dir_size_mb
from distill.run.context import RunContext, StageResult
from distill.stages.evaluate import latency_record
from distill.stages.training import apply_method, frozen_teacher, kd_train


def base_model_source(ctx: RunContext, choice: str) -> str:
    """The model the adapter goes on: the run's latest model, the teacher, or a path."""
    if choice == "teacher":
        return ctx.teacher_source
    if choice == "previous":
        models = [m for m in ctx.models if m.kind == "model"]
        return models[-1].path if models else ctx.teacher_source
    return choice


def adapter_metrics(ctx: RunContext, adapted: peft_methods.AdaptedModel, adapter_dir: Path,
                    *, seconds_per_step: float, batch_size: int) -> dict:
    """The DESIGN.md model record of an adapted model, plus the adapter fields."""
    adapted.eval()
    report = peft_methods.trainable_report(adapted)
    # Quantized base weights (QLoRA) live in buffers; the report counts their elements.
    params = report["total_params"]
    total, non_emb = count_params(adapted)
    non_emb = params - (total - non_emb)
    scores = ctx.metrics(adapted, "test", batch_size)  # every rank takes part
    # Timed on rank 0 alone.
    latency = latency_record(ctx, adapted, "test", runs=5) if ctx.is_main else {}
    return {
        "params": params, "params_non_embedding": non_emb,
        "size_mb": round(dir_size_mb(adapter_dir), 3), "latency_ms": latency,
        "metric": {"name": ctx.task.metric, "value": scores[ctx.task.metric], "split": "test"},
        **{k: v for k, v in scores.items() if k != ctx.task.metric},
        # A new task has no teacher score to retain; the report leaves it blank.
        "retention": None,
        "method": adapted.method.name, "trainable_params": report["trainable_params"],
        "trainable_percent": round(report["trainable_percent"], 4),
        "seconds_per_step": round(seconds_per_step, 4),
    }


def with_step_count(cfg: AdaptStage, batches: int) -> dict:
    """The method options, with `total_step` (AdaLoRA's budget schedule) set to the stage's
    number of optimizer steps when the method has that option and the recipe left it out."""
    options = dict(cfg.config)
    fields = {f.name for f in dataclasses.fields(peft_methods.get_method(cfg.method).config_cls)}
    if "total_step" in fields and options.get("total_step") is None:
        # Every process steps once per global batch (make_accelerator: split_batches).
        options["total_step"] = max(1, math.ceil(
            math.ceil(cfg.epochs * batches) / cfg.grad_accum_steps))
    return options


def task_context(ctx: RunContext, cfg: AdaptStage) -> RunContext:
    """The run context with the stage's own data (and a fresh tokenization cache)."""
    if cfg.data is None:
        return ctx
    recipe = dataclasses.replace(ctx.recipe, data=cfg.data)
    return dataclasses.replace(ctx, recipe=recipe, data=ctx.task.load_data(cfg.data),
                               samples_info=None, _tokenized={})


def run(ctx: RunContext, cfg: AdaptStage, stage_dir: Path) -> StageResult:
    """Attach `cfg.method` to the base model, train it on the stage's task, save, measure."""
    task = task_context(ctx, cfg)
    source = base_model_source(ctx, cfg.model)
    seed = ctx.stage_seed(cfg.seed)  # before loading: a new head is initialised here
    # A `model` path of the stage's own uses its `allow_pickle`; the run's models, the teacher's.
    allow_pickle = cfg.allow_pickle if source == cfg.model else ctx.recipe.teacher.allow_pickle
    model, _ = task.load_model(source, allow_pickle=allow_pickle)
    loader = task.loader("train", cfg.batch_size, shuffle=True, seed=seed)
    adapted = apply_method(model, cfg.method, with_step_count(cfg, len(loader)))
    share = peft_methods.trainable_report(adapted)
    ctx.console.print(f"  {cfg.method} on {escape(str(source))}: "
                      f"{share['trainable_params']:,} trainable "
                      f"parameters ({share['trainable_percent']:.2f} % of "
                      f"{share['total_params']:,})")
    eval_seconds = [0.0]

    def validate() -> float:
        start = time.perf_counter()
        value = task.validation_metric(adapted, cfg.eval_batch_size)
        eval_seconds[0] += time.perf_counter() - start
        return value

    # With loss.alpha < 1 the stage distills from its teacher while it adapts.
    teacher_source = ctx.teacher_source if cfg.teacher == "run" else cfg.teacher
    teacher = frozen_teacher(task, cfg.loss.attention_kl > 0, teacher_source) \
        if cfg.loss.alpha < 1 or cfg.loss.hidden_mse or cfg.loss.attention_kl \
        or cfg.loss.cosine else None
    if teacher is not None and task.task.head_from_data and \
            not task.load_model(teacher_source)[1]:
        raise DistillError(f"stages.{stage_dir.name[:2].lstrip('0') or '0'}.teacher: "
                           f"{teacher_source} has no trained head for "
                           f"{task.task.data_name(task.data)}, so it would teach noise; give a "
                           "teacher fine-tuned on this stage's data")
    result, summary = kd_train(
        task, adapted, teacher, teacher_source, cfg, cfg.loss, cache_teacher=True,
        cache_dir=ctx.run_dir / "teacher_cache", log_path=stage_dir / "log.jsonl",
        desc=f"adapt {cfg.label or cfg.method}", validate=validate, seed=seed)
    # Training time only: validation passes and checkpoint writes are not steps.
    seconds_per_step = (result.seconds - eval_seconds[0] - result.checkpoint_seconds) \
        / max(result.steps, 1)
    out = stage_dir / "adapter"
    adapted = ctx.accelerator.unwrap_model(adapted)
    if ctx.is_main:
        peft_methods.save_adapter(adapted, out)
    ctx.accelerator.wait_for_everyone()
    with torch.no_grad():
        record = adapter_metrics(task, adapted, out, seconds_per_step=seconds_per_step,
                                 batch_size=cfg.eval_batch_size)
    record["base_model"] = source
    ctx.console.print(f"  {cfg.label or cfg.method}: test {task.task.metric} "
                      f"{record['metric']['value']:.4f}, {seconds_per_step:.3f} s/step")
    return StageResult("done", out, {
        "method": cfg.method, "label": cfg.label or cfg.method, "base_model": source,
        "dataset": task.recipe.data.dataset, **task.task.describe(task.data), **summary,
        "model": record}, model_metrics=record, artifact_kind="adapter")
