"""`finetune`: full fine-tuning of the teacher on the task (the task's hard loss only)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from distill.config.recipe import FinetuneStage, LossConfig
from distill.run.context import RunContext, StageResult
from distill.stages.training import kd_train, merged, save_student, with_method


def run(ctx: RunContext, cfg: FinetuneStage, stage_dir: Path) -> StageResult:
    """Tune the current teacher on the task; it becomes the teacher of later stages."""
    # Seed first: a new head is initialised while loading, and must not depend on whatever
    # ran before in this process.
    seed = ctx.stage_seed(cfg.seed)
    model, head_trained = ctx.load_model(ctx.teacher_source)
    if cfg.skip_if_tuned and ctx.task.already_tuned(head_trained):
        ctx.console.print(f"  finetune skipped: {escape(str(ctx.teacher_source))} already "
                          f"has a trained head for {escape(ctx.task.data_name(ctx.data))}")
        return StageResult("skipped", metrics={"reason": "teacher already tuned"})
    trained = with_method(ctx, model, cfg)
    _, summary = kd_train(ctx, trained, None, ctx.teacher_source, cfg, LossConfig(alpha=1.0),
                          cache_teacher=False, cache_dir=ctx.run_dir / "teacher_cache",
                          log_path=stage_dir / "log.jsonl", desc="finetune", seed=seed)
    out = save_student(ctx, merged(ctx.accelerator.unwrap_model(trained)), stage_dir / "model")
    ctx.teacher_source = str(out)
    return StageResult("done", out, {"method": cfg.method, **summary})
