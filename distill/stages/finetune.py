"""`finetune`: full fine-tuning of the teacher on the task (the task's hard loss only)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from torch import Tensor, nn

from distill.run.context import RunContext, StageResult
from distill.models.loading import save_model
from distill.tasks.base import Task
from distill.config.recipe import FinetuneStage
from distill.train.loop import train_loop


class SupervisedUnit(nn.Module):
    """The task's hard loss (cross-entropy on labels or next tokens):
    `forward(batch) -> (loss, parts)`."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = self.task.hard_loss(out.logits, batch)
        return loss, {"loss_ce": float(loss.detach())}


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
    model.train()
    result = train_loop(
        SupervisedUnit(model, ctx.task),
        ctx.loader("train", cfg.batch_size, shuffle=True, seed=seed),
        cfg, accelerator=ctx.accelerator, keep=model,
        **ctx.validation(model, cfg.eval_batch_size), log_path=stage_dir / "log.jsonl",
        desc="finetune", console=ctx.console)
    out = stage_dir / "model"
    if ctx.is_main:
        save_model(ctx.accelerator.unwrap_model(model), ctx.tokenizer, out)
    ctx.accelerator.wait_for_everyone()
    ctx.teacher_source = str(out)
    return StageResult("done", out, {
        "steps": result.steps, "train_seconds": round(result.seconds, 2),
        "bf16": result.bf16,
        f"best_validation_{ctx.task.metric}": result.best_metric, "best_epoch": result.best_epoch,
        "history": result.history, "seed": seed})
