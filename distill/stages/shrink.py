"""`shrink`: progressive shrinking — cut, heal with KD from the teacher, measure; repeat.

Each step of the schedule cuts the current model (fewer layers and/or narrower widths, units
ranked on a calibration batch of training examples), then heals it by distillation from the
run's teacher, then saves it under `steps/<k>-<desc>/model`. Every step is a model of the
run: the evaluate stage measures each one, so the user sees where quality falls off.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from distill.arch import num_layers
from distill.train.checkpoint import remove_all
from distill.run.context import RunContext, StageResult
from distill.errors import DistillError
from distill.files import atomic_write
from distill.compress.importance import resolve_score, select_layers
from distill.models.loading import count_params
from distill.config.recipe import ShrinkStage, ShrinkStep
from distill.compress.depth import keep_layers
from distill.train.precision import autocast
from distill.stages.training import (frozen_teacher, kd_train, merged, save_student,
                                     stage_precision, with_method)
from distill.compress.width import shrink_width, width_importance


def first_batches(loader: Iterable[dict[str, torch.Tensor]], examples: int
                  ) -> list[dict[str, torch.Tensor]]:
    """Batches of an unshuffled loader until `examples` examples are in (without `idx`)."""
    batches, seen = [], 0
    for batch in loader:
        batches.append({k: v for k, v in batch.items() if k != "idx"})
        seen += len(batch["input_ids"])
        if seen >= examples:
            break
    return batches


def calibration_batches(ctx: RunContext, examples: int) -> list[dict[str, torch.Tensor]]:
    """The first `examples` training examples (a fixed set: the split is already shuffled),
    in batches of the task's calibration size (32 texts, or 8 blocks of a language model)."""
    return first_batches(ctx.loader("train", ctx.task.calibration_batch_size,
                                    group_by_length=False), examples)


def cut(model: PreTrainedModel, step: ShrinkStep, batches: list[dict[str, torch.Tensor]],
        strategy: str = "importance", score: str = "auto",
        agree: Callable[[Any], Any] | None = None) -> tuple[PreTrainedModel, dict]:
    """Apply one schedule step to `model` (depth first, then width); returns a new model.

    Args:
        model: with a task head (classifier, causal LM) or without one (a base model).
        step: the targets (layers and/or hidden, heads, intermediate).
        batches: calibration batches (model inputs: `input_ids` (B, T), `attention_mask`
            (B, T), ...; `labels` for the loss-based score).
        strategy / score: how a depth cut picks its layers (see `distill.compress.importance`);
            score `auto` is `loss` for a model with a task head, `hidden` for one without.
        agree: makes every process use the same choice (`RunContext.from_main`: rank 0's),
            so that all ranks cut the same units even if their scores differed in a tie.

    Returns:
        (the cut model, info): info has `kept_layers` for a depth cut and, when the layers
        were ranked by importance, `score`: the score that ranked them (`auto` resolved).
    """
    info: dict = {}
    agree = agree or (lambda value: value)
    model.eval()
    if step.layers is not None:
        depth = num_layers(model)
        if step.layers > depth:
            raise DistillError(f"shrink step {step.describe()}: the model has only {depth} "
                               f"layers; allowed: 1..{depth}")
        if strategy == "importance":
            # Resolved here (not only inside select_layers) so the record says which ran.
            score = info["score"] = resolve_score(model, score)
        kept = agree(select_layers(model, step.layers, strategy, batches, score))
        info["kept_layers"] = kept
        model = keep_layers(model, kept)
    if any(v is not None for v in (step.hidden, step.heads, step.intermediate)):
        importance = agree(width_importance(model, batches))
        model = shrink_width(model, hidden=step.hidden, heads=step.heads,
                             intermediate=step.intermediate, importance=importance)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, info


def start_model(ctx: RunContext, cfg: ShrinkStage) -> tuple[PreTrainedModel, str]:
    """The model the first cut starts from: the run's latest model, or the teacher."""
    models = [m for m in ctx.models if m.kind == "model"]  # an adapter is not a model to cut
    source = models[-1].path if cfg.start == "previous" and models else ctx.teacher_source
    model, _ = ctx.load_model(source)
    return model, source


def run(ctx: RunContext, cfg: ShrinkStage, stage_dir: Path) -> StageResult:
    """Run every step of the schedule; each step's model becomes a model of the run."""
    model, source = start_model(ctx, cfg)
    teacher = frozen_teacher(ctx, eager_attention=cfg.heal.loss.attention_kl > 0)
    batches = calibration_batches(ctx, cfg.calibration_examples)
    # Which layers of the starting model survive, so each step can say so in its terms.
    origin = list(range(num_layers(model)))
    steps, outputs = [], []
    # One precision for the stage (every heal and ranking), decided on its starting model.
    precision = stage_precision(ctx, model, cfg.heal, stage_dir, "shrink")
    for k, step in enumerate(cfg.schedule):
        name = f"{k}-{step.describe()}"
        step_dir = stage_dir / "steps" / name
        if (step_dir / "step.json").is_file() and (step_dir / "model").is_dir():
            # Resuming: this step finished before the run was interrupted.
            ctx.console.print(f"  shrink step {name}: done earlier, reloading")
            record = json.loads((step_dir / "step.json").read_text(encoding="utf-8"))
            model, _ = ctx.load_model(str(step_dir / "model"), allow_pickle=False)
            origin = record["start_layers"]
            outputs.append((name, step_dir / "model"))
            steps.append(record)
            continue
        ctx.console.print(f"  shrink step {name}: cutting")
        # Ranking runs in the heal's precision: under bf16 on a machine where it pays (the
        # 30 -> 20 ranking of SmolLM2 on 64 blocks: 218 s instead of 397 s, the same layers).
        with autocast(precision.bf16, ctx.accelerator.device.type):
            model, info = cut(model, step, batches, cfg.depth_strategy, cfg.importance_score,
                              agree=ctx.from_main)
        info["calibration_bf16"] = precision.bf16
        if "kept_layers" in info:
            origin = [origin[i] for i in info["kept_layers"]]
        info["start_layers"] = list(origin)
        params, non_emb = count_params(model)
        # This step's heal: the stage's, for the step's own number of epochs if it sets one.
        heal = (cfg.heal if step.heal_epochs is None
                else dataclasses.replace(cfg.heal, epochs=step.heal_epochs))
        before = ctx.validation_metric(model, heal.eval_batch_size)
        seed = ctx.stage_seed(heal.seed)  # before a PEFT method's weights are made
        healing = with_method(ctx, model, heal)
        _, summary = kd_train(ctx, healing, teacher, ctx.teacher_source, heal,
                              heal.loss, cache_teacher=heal.cache_teacher,
                              cache_dir=ctx.run_dir / "teacher_cache",
                              log_path=stage_dir / "steps" / name / "log.jsonl",
                              desc=f"heal {name}", seed=seed, precision=precision)
        # The next step cuts the healed model: a PEFT method is merged in first.
        model = merged(ctx.accelerator.unwrap_model(healing))
        out = save_student(ctx, model, stage_dir / "steps" / name / "model")
        outputs.append((name, out))
        steps.append({"step": k, "name": name, "target": step.targets(),
                      "heal_epochs": heal.epochs,
                      **info, "layers": num_layers(model),
                      "hidden_size": model.config.hidden_size,
                      "params": params, "params_non_embedding": non_emb,
                      "validation_before_heal": before, "method": cfg.heal.method, **summary})
        if ctx.is_main:  # written last: marks the step as finished for --resume
            atomic_write(step_dir / "step.json", json.dumps(steps[-1], default=str))
            remove_all(step_dir)  # the step's result is durable: its checkpoints may go
    metrics = {"start": source, "steps": steps, "precision": precision.record()}
    return StageResult("done", outputs[-1][1], metrics, step_models=outputs)
