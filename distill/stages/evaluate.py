"""`evaluate`: test metrics, size and CPU latency of every model of the run.

Each model is reloaded from its saved directory (what a user would ship), evaluated on the
chosen split, timed at batch 1 and 32 with full-length inputs, and compared to the teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.markup import escape
from torch import nn

from distill.run.context import ModelRef, RunContext, StageResult
from distill.tasks.metrics import latency_ms
from distill.models.loading import count_params, dir_size_mb, resolve_model_path
from distill.config.recipe import DataConfig, EvaluateStage


def untrained_head_warning(path: str) -> str:
    """The line printed beside the metrics of a model whose head was never trained."""
    return (f"warning: {path} has no trained classification head (none in its weights, so a "
            "random one was made): its accuracy is that of a random head; fine-tune it first "
            "(a recipe's `finetune` stage)")


def latency_record(ctx: RunContext, model: nn.Module, split: str, runs: int
                   ) -> dict[str, float]:
    """{"batch1", "batch32"}: median milliseconds of a forward pass of `model` on full-length
    inputs from `split` (`latency_ms`), on the device of its first parameter."""
    device = next(model.parameters()).device
    record = {}
    for b in (1, 32):
        inputs = ctx.task.latency_inputs(ctx.data, split, ctx.tokenizer, b,
                                         ctx.recipe.data.max_length)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        record[f"batch{b}"] = round(latency_ms(model, **inputs, runs=runs), 3)
    return record


def model_metrics(model: nn.Module, model_dir: str, *, ctx: RunContext, split: str,
                  batch_size: int, latency: bool, runs: int) -> dict:
    """The DESIGN.md model-metrics record of one model (without retention).

    Every rank must call it: the metrics are computed over the ranks' shares of the split;
    latency is timed on rank 0 alone (the others wait), so ranks do not share the cores.
    """
    params, non_emb = count_params(model)
    scores = ctx.metrics(model, split, batch_size)
    metric = ctx.task.metric
    record: dict = {
        "params": params, "params_non_embedding": non_emb,
        "size_mb": round(dir_size_mb(Path(resolve_model_path(model_dir))), 3),
        "metric": {"name": metric, "value": scores[metric], "split": split},
        **{k: v for k, v in scores.items() if k != metric},
    }
    if latency and ctx.is_main:
        record["latency_ms"] = latency_record(ctx, model, split, runs)
        record.update(ctx.task.serving_metrics(model, ctx.data, split, ctx.tokenizer, runs))
    return record


def evaluate_models(ctx: RunContext, refs: list[ModelRef], cfg: EvaluateStage
                    ) -> dict[str, dict]:
    """Metrics of each model in `refs`, keyed by label; `retention` vs the "teacher" entry."""
    results: dict[str, dict] = {}
    # The same task on other data: a context per dataset (its own tokenization cache).
    extra = [dataclasses.replace(ctx, recipe=dataclasses.replace(ctx.recipe, data=cfg_data),
                                 data=ctx.task.load_data(cfg_data), _tokenized={})
             for cfg_data in cfg.eval_data]
    for ref in refs:
        ctx.console.print(f"  evaluating {escape(ref.label)} ({escape(str(ref.path))}) on "
                          f"{cfg.split}")
        model, head_trained = ctx.load_model(ref.path)
        if not head_trained:
            ctx.console.print(f"  [yellow]{escape(untrained_head_warning(ref.path))}[/]",
                              soft_wrap=True)
        results[ref.label] = model_metrics(model, ref.path, ctx=ctx, split=cfg.split,
                                           batch_size=cfg.batch_size, latency=cfg.latency,
                                           runs=cfg.latency_runs)
        results[ref.label]["eval_data"] = [
            {"dataset": other.recipe.data.dataset, "split": cfg.split,
             **other.metrics(model, cfg.split, cfg.batch_size)} for other in extra]
    base = results.get("teacher", {})
    for rec in results.values():
        rec["retention"] = ctx.task.retention(rec["metric"]["value"],
                                              base["metric"]["value"]) if base else None
        for k, scored in enumerate(rec["eval_data"]):
            scored["retention"] = ctx.task.retention(
                scored[ctx.task.metric], base["eval_data"][k][ctx.task.metric]) \
                if base else None
    return results


def run(ctx: RunContext, cfg: EvaluateStage, stage_dir: Path) -> StageResult:
    """Evaluate the teacher and every model the run has made so far."""
    # The finetune stage's model *is* the teacher: evaluate it once, as "teacher".
    # Adapters were measured by their own stage, on their own task.
    refs = [ModelRef("teacher", ctx.teacher_source)] + [
        m for m in ctx.models if m.path != ctx.teacher_source and m.kind == "model"]
    return StageResult("done", None, {"split": cfg.split,
                                      "models": evaluate_models(ctx, refs, cfg)})


def evaluate_saved_model(model_path: str, data_cfg: DataConfig, split: str = "test",
                         latency: bool = True, batch_size: int = 64, runs: int = 10,
                         task: str | None = None) -> dict:
    """Evaluate one saved model on a dataset, outside any recipe (`distill eval`); its task
    is `task`, or the one its config was saved for."""
    from distill.config.recipe import ModelSpec, Recipe
    from distill.models.loading import head_is_fresh, load_config, load_tokenizer
    from distill.tasks import resolve_task
    from distill.train.loop import make_accelerator

    config = load_config(model_path)
    kind = resolve_task(task, config, model_path)
    if not data_cfg.dataset:  # the task's own default data
        data_cfg = dataclasses.replace(data_cfg, dataset=kind.default_dataset)
    data = kind.load_data(data_cfg)
    kind.check_model(config, data, model_path)
    model, head_trained = kind.load_model(model_path, data, key=None)
    ctx = RunContext(recipe=Recipe(name="eval", teacher=ModelSpec(model=model_path),
                                   data=data_cfg),
                     run_dir=Path("."), data=data, tokenizer=load_tokenizer(model_path),
                     accelerator=make_accelerator(), teacher_source=model_path, task=kind)
    # A head saved with generic names (LABEL_0, ...) is loaded as it is, though not "trained
    # for these labels": warn only when its weights are not in the files at all. The command
    # goes on (exit code 0), but the number means nothing.
    if not head_trained and head_is_fresh(model_path, model):
        ctx.console.print(f"[yellow]{escape(untrained_head_warning(model_path))}[/]",
                          soft_wrap=True)
    record = model_metrics(model, model_path, ctx=ctx, split=split, batch_size=batch_size,
                           latency=latency, runs=runs)
    standard = {"params", "params_non_embedding", "size_mb", "metric", "latency_ms"}
    return record | {"dataset": data_cfg.dataset, "task": kind.name,
                     "other_metrics": [k for k in record if k not in standard]}
