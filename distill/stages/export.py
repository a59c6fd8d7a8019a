"""`export`: a model of the run written for serving, each artifact checked and timed.

The model (float32, as saved) is written in each of the stage's formats (`distill.serve`)
under `<stage>/<format>/`; then every artifact is loaded back as a server would load it and
scored on the evaluation split beside the float32 model, batch by batch: the task's metric,
the largest logit difference from the float32 model and the share of predictions (argmax over
the real positions) that agree with it; and timed at batch 1 and 32 with full-length inputs,
like the evaluate stage times models.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.config.recipe import ExportStage
from distill.errors import DistillError
from distill.models.loading import dir_size_mb, resolve_model_path
from distill.run.context import RunContext, StageResult
from distill.serve import formats, runtime, vocab
from distill.stages.adapt import base_model_source
from distill.stages.evaluate import latency_record


class Recorder(nn.Module):
    """`model`, keeping the float32 logits of its last call (what scoring computed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: Tensor | None = None

    def forward(self, **inputs: Tensor):
        out = self.model(**inputs)
        self.logits = out.logits.float().cpu()
        return out


class Renumbered(nn.Module):
    """`model` fed the run tokenizer's ids renumbered for a trimmed vocabulary (`lookup`)."""

    def __init__(self, model: nn.Module, lookup: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("lookup", lookup, persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor):
        return self.model(input_ids=self.lookup[input_ids], attention_mask=attention_mask)


def trimmed(ctx: RunContext, model: nn.Module
            ) -> tuple[nn.Module, object, Tensor, dict]:
    """A copy of `model` with the vocabulary of the task's data (`distill.serve.vocab`), its
    tokenizer and id lookup, and a record for the report; every split is tokenized again by
    the new tokenizer and must give the same tokens, renumbered."""
    splits = ("train", "validation", "test")
    keep = vocab.kept_ids(ctx.tokenizer, [ctx.tokenized(s) for s in splits])
    before = sum(p.numel() for p in model.parameters())
    old_rows = model.get_input_embeddings().weight.shape[0]
    small, tokenizer, lookup = vocab.trim(copy.deepcopy(model), ctx.tokenizer, keep)
    for split in splits:
        again = ctx.task.tokenize(ctx.data, split, tokenizer, ctx.recipe.data)
        for old, new in zip(ctx.tokenized(split), again):
            if lookup[torch.tensor(old["input_ids"])].tolist() != list(new["input_ids"]):
                raise DistillError(f"export.trim_vocabulary: the trimmed tokenizer splits a "
                                   f"{split} example differently (example {old['idx']}); "
                                   "leave trim_vocabulary off for this tokenizer")
    after = sum(p.numel() for p in small.parameters())
    ctx.console.print(f"  vocabulary: {len(keep):,} of {old_rows:,} tokens kept; "
                      f"{before:,} -> {after:,} parameters")
    return small, tokenizer, lookup, {"kept_tokens": len(keep), "of": old_rows,
                                      "params_before": before, "params_after": after}


def compare(ctx: RunContext, models: dict[str, nn.Module], split: str, batch_size: int
            ) -> dict[str, dict]:
    """Score every model on `split`, batch by batch, against the first (the reference).

    Returns, per model: the task's metrics, `max_logit_diff` (largest |logit − reference
    logit| over the real positions) and `agreement` (share of real positions whose argmax
    equals the reference's)."""
    recorders = {name: Recorder(model) for name, model in models.items()}
    sums: dict[str, Tensor] = {}
    diff = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    positions = 0
    reference = next(iter(models))
    with torch.inference_mode():
        for batch in ctx.loader(split, batch_size):
            logits = {}
            for name, rec in recorders.items():
                scored = ctx.task.score_batch(rec, batch)
                sums[name] = scored if name not in sums else sums[name] + scored
                logits[name] = rec.logits
            ref = logits[reference]
            # Per-token logits [B, n, V]: the real positions only; per-example [B, C]: all.
            real = (batch["attention_mask"].bool() if ref.dim() == 3
                    else torch.ones(ref.shape[0], dtype=torch.bool))
            positions += int(real.sum())
            for name, value in logits.items():
                diff[name] = max(diff[name], float((value - ref).abs()[real].max()))
                agree[name] += int((value.argmax(-1) == ref.argmax(-1))[real].sum())
    return {name: {**ctx.task.summarize(sums[name], ctx.data), "max_logit_diff": diff[name],
                   "agreement": agree[name] / positions} for name in models}


def run(ctx: RunContext, cfg: ExportStage, stage_dir: Path) -> StageResult:
    """Export the stage's model in each format and measure every artifact (main process; the
    others wait)."""
    source = base_model_source(ctx, cfg.model)
    if not ctx.is_main:
        return StageResult("done", None, {})
    ctx.stage_seed(None)  # a model without a trained head gets the same random one each run
    model, _ = ctx.load_model(source)
    model = model.float().eval()
    # What the ONNX export traces: two real rows (batch and sequence sizes stay free).
    example = ctx.task.latency_inputs(ctx.data, cfg.split, ctx.tokenizer, 2,
                                      min(16, ctx.recipe.data.max_length))
    exported, tokenizer, lookup, vocabulary = model, ctx.tokenizer, None, None
    if cfg.trim_vocabulary:
        exported, tokenizer, lookup, vocabulary = trimmed(ctx, model)
        example = {**example, "input_ids": lookup[example["input_ids"]]}
    served: dict[str, nn.Module] = {"fp32": model}
    for fmt in cfg.formats:
        ctx.console.print(f"  export {fmt} -> {stage_dir / fmt}")
        folder = formats.write(fmt, exported, tokenizer, stage_dir / fmt, example)
        artifact = runtime.load(fmt, folder, lambda path: ctx.load_model(str(path))[0])
        # Scored on the run's tokenization: the ids renumbered as the new tokenizer gives them.
        served[fmt] = artifact if lookup is None else Renumbered(artifact, lookup)
    scores = compare(ctx, served, cfg.split, cfg.batch_size)
    metric = ctx.task.metric
    rows = {}
    for name, model_like in served.items():
        folder = Path(resolve_model_path(source)) if name == "fp32" else stage_dir / name
        row = {"artifact": str(folder if name == "fp32" else folder.relative_to(ctx.run_dir)),
               "format": "pytorch fp32" if name == "fp32" else name,
               "size_mb": round(dir_size_mb(folder), 3),
               "metric": {"name": metric, "value": scores[name][metric], "split": cfg.split},
               "max_logit_diff": scores[name]["max_logit_diff"],
               "agreement": scores[name]["agreement"]}
        if cfg.latency:
            row["latency_ms"] = latency_record(ctx, model_like, cfg.split, cfg.latency_runs)
        rows[name] = row
        speed = (f", batch 32 {row['latency_ms']['batch32']:.1f} ms" if cfg.latency else "")
        ctx.console.print(f"  {name}: {metric} {row['metric']['value']:.4f}, max |Δlogit| "
                          f"{row['max_logit_diff']:.2e}, agreement {row['agreement']:.4f}, "
                          f"{row['size_mb']:.1f} MB{speed}")
    metrics = {"source": source, "exports": rows}
    if vocabulary is not None:
        metrics["vocabulary"] = vocabulary
    # No model of the run: later stages go on from the model it exported.
    return StageResult("done", None, metrics)
