"""The one training loop every training stage uses (finetune, distill, heal, adapt).

Stages differ only by the `nn.Module` they hand in: its `forward(batch)` returns
`(loss, parts)`, and its trainable parameters are what trains. The loop owns the optimizer
(AdamW, no decay on biases and norms), the linear warm-up schedule, gradient accumulation,
optional bf16 autocast, per-epoch validation with the best weights kept, a rich progress bar
and one JSON line per logged step in `log.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from distill.errors import DistillError
from distill.recipe import TrainArgs


def make_accelerator() -> Accelerator:
    """One Accelerator per run. CPU-only machines get `cpu=True`, which also lets
    `accelerate launch --multi_gpu --num_processes N` start N gloo ranks on one CPU box.
    Mixed precision is applied per stage with `torch.autocast`, so it is not set here."""
    return Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class LoopResult:
    """What a finished loop reports back to its stage."""

    steps: int
    seconds: float
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    last_loss: float | None = None


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class JsonlLog:
    """Appends one JSON object per line; flushed at once so a killed run keeps its log."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def train_loop(unit: nn.Module, train_loader: DataLoader, args: TrainArgs, *,
               accelerator: Accelerator, keep: nn.Module,
               evaluate: Callable[[], float] | None = None, metric_name: str = "accuracy",
               log_path: Path | None = None, desc: str = "train",
               console: Console | None = None) -> LoopResult:
    """Train `unit` for `args.epochs` epochs; leave the best-on-validation weights in `keep`.

    Args:
        unit: module whose `forward(batch: dict[str, Tensor]) -> (loss, parts)` computes the
            stage's loss; its parameters with `requires_grad` are optimized. It may define
            `optimizer_groups(lr, weight_decay) -> list[dict] | None` (its own AdamW groups)
            and `on_step(step)` (called after each optimizer step, before gradients clear).
        train_loader: batches of `input_ids` [B, n], `attention_mask` [B, n], `labels` [B],
            `idx` [B].
        keep: the sub-module whose weights are the stage's result (e.g. the student).
        evaluate: returns the validation metric (higher is better) of `keep`; called at each
            epoch end. Without it, the last weights are kept.
        log_path: where `log.jsonl` lines go (main process only).
    """
    main = accelerator.is_main_process
    log = JsonlLog(log_path if main else None)
    params = [p for p in unit.parameters() if p.requires_grad]
    if not params:
        raise DistillError(f"{desc}: nothing to train (no parameter requires a gradient)")
    # A unit may ask for its own parameter groups (LoRA+ gives B a larger learning rate).
    groups = (unit.optimizer_groups(args.learning_rate, args.weight_decay)
              if hasattr(unit, "optimizer_groups") else None)
    optimizer = torch.optim.AdamW(groups or _param_groups(unit, args.weight_decay),
                                  lr=args.learning_rate)
    # Called after each optimizer step while the gradients still exist (AdaLoRA's rank budget).
    on_step = getattr(unit, "on_step", None)
    unit, optimizer, train_loader = accelerator.prepare(unit, optimizer, train_loader)

    micro_total = max(1, math.ceil(args.epochs * len(train_loader)))
    total_steps = max(1, math.ceil(micro_total / args.grad_accum_steps))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * total_steps), total_steps)
    autocast = (torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16)
                if args.bf16 else contextlib.nullcontext())

    result = LoopResult(steps=0, seconds=0.0)
    best_state: dict[str, torch.Tensor] | None = None
    start = time.perf_counter()
    window: list[float] = []
    window_parts: dict[str, list[float]] = {}
    micro = 0
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not main)
    with progress:
        task = progress.add_task(desc, total=total_steps, loss="—")
        epoch = 0
        while micro < micro_total:
            unit.train()
            for batch in train_loader:
                if micro >= micro_total:
                    break
                micro += 1
                boundary = micro % args.grad_accum_steps == 0 or micro == micro_total
                # Skip the gradient all-reduce on micro-batches that do not step.
                sync = contextlib.nullcontext() if boundary else accelerator.no_sync(unit)
                with sync:
                    with autocast:
                        loss, parts = unit(batch)
                    if not torch.isfinite(loss):
                        raise DistillError(
                            f"{desc}: the loss became {float(loss.detach())} at step {result.steps + 1}; "
                            f"lower learning_rate (now {args.learning_rate:g}) or check the data")
                    accelerator.backward(loss / args.grad_accum_steps)
                window.append(float(loss.detach()))
                for k, v in parts.items():
                    window_parts.setdefault(k, []).append(v)
                if not boundary:
                    continue
                if args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                result.steps += 1
                if on_step is not None:
                    on_step(result.steps)
                optimizer.zero_grad(set_to_none=True)
                result.last_loss = sum(window) / len(window)
                progress.update(task, advance=1, loss=f"{result.last_loss:.4f}")
                if result.steps % args.log_every == 0 or result.steps == total_steps:
                    log.write({"type": "train", "step": result.steps,
                               "epoch": round(micro / len(train_loader), 4),
                               "loss": result.last_loss, "lr": scheduler.get_last_lr()[0],
                               **{k: sum(v) / len(v) for k, v in window_parts.items()},
                               "seconds": round(time.perf_counter() - start, 3)})
                    window, window_parts = [], {}
            epoch += 1
            if evaluate is not None and args.keep_best:
                value = evaluate()
                result.history.append({"epoch": epoch, "step": result.steps, metric_name: value})
                log.write({"type": "eval", "step": result.steps, "epoch": epoch,
                           "metric_name": metric_name, "metric": value})
                if main:
                    progress.console.print(f"  {desc} epoch {epoch}: validation "
                                           f"{metric_name} {value:.4f}")
                if result.best_metric is None or value > result.best_metric:
                    result.best_metric, result.best_epoch = value, epoch
                    best_state = {k: v.detach().clone()
                                  for k, v in accelerator.unwrap_model(keep).state_dict().items()}
    if best_state is not None:
        keep.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    accelerator.free_memory()
    return result


