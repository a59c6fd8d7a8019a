"""`evaluate`: test metrics, size and CPU latency of every model of the run.

Each model is reloaded from its saved directory (what a user would ship), evaluated on the
chosen split, timed at batch 1 and 32 with full-length inputs, and compared to the teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.markup import escape
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from distill.run.context import ModelRef, RunContext, StageResult
from distill.data.tables import Split
from distill.errors import DistillError
from distill.tasks.metrics import latency_ms
from distill.models.loading import count_params, dir_size_mb, load_checked, resolve_model_path
from distill.config.recipe import DataConfig, EvaluateStage


def load_saved_classifier(path: str, trust_remote_code: bool = False,
                          allow_pickle: bool = False, key: str | None = "teacher.allow_pickle"
                          ) -> tuple[nn.Module, bool]:
    """A saved sequence classifier in eval mode, and whether its head was never trained
    (not in its weights, so freshly initialised: a base model such as a sentence encoder).
    `key`: the recipe key that allows pickles, for messages (None: `distill eval`, no recipe).

    Raises:
        DistillError: weight files that may not be read, or weights that do not fit the
            config (anything but the head missing or of another shape).
    """
    model, fresh_head = load_checked(AutoModelForSequenceClassification, path,
                                     trust_remote_code=trust_remote_code,
                                     allow_pickle=allow_pickle, key=key)
    return model.eval(), fresh_head


def untrained_head_warning(path: str) -> str:
    """The line printed beside the metrics of a model whose head was never trained."""
    return (f"warning: {path} has no trained classification head (none in its weights, so a "
            "random one was made): its accuracy is that of a random head; fine-tune it first "
            "(a recipe's `finetune` stage)")


def latency_inputs(tokenizer: PreTrainedTokenizerBase, split: Split, batch: int,
                   max_length: int) -> dict[str, torch.Tensor]:
    """`batch` real texts padded/truncated to `max_length` (the worst case the model serves)."""
    texts = [split.texts[i % len(split.texts)] for i in range(batch)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def model_metrics(model: nn.Module, model_dir: str, *, ctx: RunContext, split: str,
                  batch_size: int, latency: bool, runs: int) -> dict:
    """The DESIGN.md model-metrics record of one model (without retention).

    Every rank must call it: the metrics are computed over the ranks' shares of the split;
    latency is timed on rank 0 alone (the others wait), so ranks do not share the cores.
    """
    params, non_emb = count_params(model)
    scores = ctx.metrics(model, split, batch_size)
    record: dict = {
        "params": params, "params_non_embedding": non_emb,
        "size_mb": round(dir_size_mb(Path(resolve_model_path(model_dir))), 3),
        "metric": {"name": "accuracy", "value": scores["accuracy"], "split": split},
        "f1_macro": scores["f1_macro"],
    }
    if latency and ctx.is_main:
        record["latency_ms"] = {}
        for b in (1, 32):
            inputs = latency_inputs(ctx.tokenizer, getattr(ctx.data, split), b,
                                    ctx.recipe.data.max_length)
            record["latency_ms"][f"batch{b}"] = round(latency_ms(model, **inputs, runs=runs), 3)
    return record


def evaluate_models(ctx: RunContext, refs: list[ModelRef], cfg: EvaluateStage
                    ) -> dict[str, dict]:
    """Metrics of each model in `refs`, keyed by label; `retention` vs the "teacher" entry."""
    results: dict[str, dict] = {}
    for ref in refs:
        ctx.console.print(f"  evaluating {escape(ref.label)} ({escape(str(ref.path))}) on "
                          f"{cfg.split}")
        model, fresh_head = load_saved_classifier(ref.path,
                                                    ctx.recipe.teacher.trust_remote_code,
                                                    ctx.recipe.teacher.allow_pickle)
        if fresh_head:
            ctx.console.print(f"  [yellow]{escape(untrained_head_warning(ref.path))}[/]",
                              soft_wrap=True)
        results[ref.label] = model_metrics(model, ref.path, ctx=ctx, split=cfg.split,
                                           batch_size=cfg.batch_size, latency=cfg.latency,
                                           runs=cfg.latency_runs)
    base = results.get("teacher", {}).get("metric", {}).get("value")
    for rec in results.values():
        value = rec["metric"]["value"]
        rec["retention"] = value / base if base else None
    return results


def run(ctx: RunContext, cfg: EvaluateStage, stage_dir: Path) -> StageResult:
    """Evaluate the teacher and every model the run has made so far."""
    # The finetune stage's model *is* the teacher: evaluate it once, as "teacher".
    # Adapters were measured by their own stage, on their own task.
    refs = [ModelRef("teacher", ctx.teacher_source)] + [
        m for m in ctx.models if m.path != ctx.teacher_source and m.kind == "model"]
    return StageResult("done", None, {"split": cfg.split,
                                      "models": evaluate_models(ctx, refs, cfg)})


def check_label_names(model: nn.Module, label_names: list[str], model_path: str) -> None:
    """The model's head must fit the data's labels (same count; same names when named)."""
    id2label = getattr(model.config, "id2label", {}) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if len(names) != len(label_names):
        raise DistillError(f"{model_path} predicts {len(names)} labels {names} but the data "
                           f"has {len(label_names)}: {label_names}")
    generic = all(n.startswith("LABEL_") for n in names)
    if not generic and names != label_names:
        raise DistillError(f"{model_path} was trained for labels {names}, the data has "
                           f"{label_names}")


def evaluate_saved_model(model_path: str, data_cfg: DataConfig, split: str = "test",
                         latency: bool = True, batch_size: int = 64, runs: int = 10) -> dict:
    """Evaluate one saved classifier on a dataset, outside any recipe (`distill eval`)."""
    from distill.data.tables import load_task_data
    from distill.models.loading import load_tokenizer
    from distill.config.recipe import ModelSpec, Recipe
    from distill.train.loop import make_accelerator

    data = load_task_data(data_cfg)
    model, fresh_head = load_saved_classifier(model_path, key=None)
    check_label_names(model, data.label_names, model_path)
    ctx = RunContext(recipe=Recipe(name="eval", teacher=ModelSpec(model=model_path),
                                   data=data_cfg),
                     run_dir=Path("."), data=data, tokenizer=load_tokenizer(model_path),
                     accelerator=make_accelerator(), teacher_source=model_path)
    if fresh_head:  # the run goes on (exit code 0), but the number means nothing
        ctx.console.print(f"[yellow]{escape(untrained_head_warning(model_path))}[/]",
                          soft_wrap=True)
    return model_metrics(model, model_path, ctx=ctx, split=split, batch_size=batch_size,
                         latency=latency, runs=runs)
