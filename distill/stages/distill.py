"""`distill`: a student from a subset of the teacher's layers, trained with soft-label KD.

Loss (METHODS.md §1): `α·CE + (1−α)·T²·KL(teacher‖student)` plus optional hidden-state MSE,
attention KL and cosine terms over a layer map.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.kd import teacher_cache
from distill.compress.arch import num_layers
from distill.run.context import RunContext, StageResult
from distill.errors import DistillError
from distill.kd.losses import DistillationLoss, LossWeights, default_layer_map
from distill.models.loading import load_classifier, save_model, teacher_load_options
from distill.config.recipe import DistillStage, LossConfig, StudentSpec, TrainArgs
from distill.compress.depth import check_layers, evenly_spaced, keep_layers
from distill.train.loop import LoopResult, train_loop


class DistillUnit(nn.Module):
    """Student + loss (+ projections); the teacher is held outside the module tree so that it
    is neither optimized nor wrapped by DDP. Under FSDP the loop shards it as well
    (`frozen_models`), when it runs in the loop at all (not with cached logits)."""

    def __init__(self, student: nn.Module, loss: DistillationLoss, teacher: nn.Module,
                 cached_logits: Tensor | None) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self._teacher = [teacher]  # a list hides it from nn.Module registration
        self.cached_logits = cached_logits

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        want_hidden, want_attn = self.loss.needs_hidden, self.loss.needs_attentions
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_out = self.student(**inputs, output_hidden_states=want_hidden,
                             output_attentions=want_attn)
        t_out, t_logits = None, None
        if self.cached_logits is not None:
            t_logits = self.cached_logits[batch["idx"].cpu()].to(s_out.logits.device)
        elif self.loss.needs_teacher_logits or want_hidden or want_attn:
            with torch.no_grad():
                t_out = self._teacher[0](**inputs, output_hidden_states=want_hidden,
                                         output_attentions=want_attn)
        return self.loss(s_out, t_out, batch["labels"], batch["attention_mask"], t_logits)

    def frozen_models(self) -> list[nn.Module]:
        """The models `forward` runs without training them (see `distill.train.sharding.shard`)."""
        calls_teacher = self.cached_logits is None and (
            self.loss.needs_teacher_logits or self.loss.needs_hidden
            or self.loss.needs_attentions)
        return [self._teacher[0]] if calls_teacher else []


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
    teacher, _ = load_classifier(ctx.teacher_source, ctx.data.label_names,
                                 spec.trust_remote_code, spec.allow_pickle, load_options=options)
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
    full, _ = load_classifier(ctx.teacher_source, ctx.data.label_names, spec.trust_remote_code,
                              spec.allow_pickle, load_options={"dtype": torch.float32})
    return full.to(ctx.accelerator.device)


def kd_train(ctx: RunContext, student: PreTrainedModel, teacher: PreTrainedModel,
             args: TrainArgs, loss_cfg: LossConfig, *, cache_teacher: bool, cache_dir: Path,
             log_path: Path, desc: str) -> tuple[LoopResult, dict]:
    """Distill `teacher` into `student` in place (best validation weights kept).

    Shared by the `distill` stage and the heal phases of `shrink`. With logit losses only,
    the teacher's logits come from a cache in `cache_dir` (computed once, reused by every
    epoch and every later call with the same teacher and data).

    Returns:
        (the loop's result, a summary for metrics.json).
    """
    depth_s, depth_t = num_layers(student), num_layers(teacher)
    layer_map = loss_cfg.layer_map or default_layer_map(depth_s, depth_t)
    if len(layer_map) != depth_s or any(not 0 <= j < depth_t for j in layer_map):
        raise DistillError(f"loss.layer_map: {layer_map} must give one teacher layer "
                           f"(0..{depth_t - 1}) for each of the {depth_s} student layers")
    weights = LossWeights(loss_cfg.alpha, loss_cfg.temperature, loss_cfg.hidden_mse,
                          loss_cfg.attention_kl, loss_cfg.cosine)
    seed = ctx.stage_seed(args.seed)
    loss = DistillationLoss(weights, layer_map, student.config.hidden_size,
                            teacher.config.hidden_size)
    cached = None
    if cache_teacher and loss.needs_teacher_logits and not (
            loss.needs_hidden or loss.needs_attentions):
        train = ctx.tokenized("train")
        key = teacher_cache.fingerprint(ctx.teacher_source, len(train),
                                        ctx.recipe.data.max_length, train[0]["input_ids"])
        cached = teacher_cache.load_or_compute(
            cache_dir, key, teacher, ctx.loader("train", args.eval_batch_size), len(train),
            ctx.accelerator.device, write=ctx.is_main, accelerator=ctx.accelerator)
    student.train()
    result = train_loop(
        DistillUnit(student, loss, teacher, cached),
        ctx.loader("train", args.batch_size, shuffle=True, seed=seed), args,
        accelerator=ctx.accelerator, keep=student,
        evaluate=lambda: ctx.validation_accuracy(student, args.eval_batch_size),
        log_path=log_path, desc=desc, console=ctx.console)
    return result, {
        "layer_map": layer_map, "loss": vars(weights), "teacher": ctx.teacher_source,
        "teacher_cache": cached is not None, "steps": result.steps,
        "train_seconds": round(result.seconds, 2), "bf16": result.bf16,
        "best_validation_accuracy": result.best_metric, "best_epoch": result.best_epoch,
        "history": result.history, "seed": seed}


def save_student(ctx: RunContext, student: PreTrainedModel, out: Path) -> Path:
    """Save in HF format from the main process; every process waits for it."""
    if ctx.is_main:
        save_model(ctx.accelerator.unwrap_model(student), ctx.tokenizer, out)
    ctx.accelerator.wait_for_everyone()
    return out


def run(ctx: RunContext, cfg: DistillStage, stage_dir: Path) -> StageResult:
    """Build the student from the teacher's layers and distill it; save it in HF format."""
    teacher = load_frozen_teacher(ctx, eager_attention=cfg.loss.attention_kl > 0)
    layers, layer_map = plan_layers(cfg, num_layers(teacher))
    student = keep_layers(student_source(ctx, teacher), layers)
    for p in student.parameters():
        p.requires_grad_(True)
    loss_cfg = dataclasses.replace(cfg.loss, layer_map=layer_map)
    _, summary = kd_train(ctx, student, teacher, cfg, loss_cfg,
                          cache_teacher=cfg.cache_teacher, cache_dir=stage_dir / "teacher_cache",
                          log_path=stage_dir / "log.jsonl", desc="distill")
    out = save_student(ctx, student, stage_dir / "model")
    return StageResult("done", out, {"layers": layers, **summary})
