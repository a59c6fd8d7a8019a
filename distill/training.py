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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    broadcast_object_list,
    gather_object,
)
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from distill import sharding
from distill.checkpoint import load_latest, save_checkpoint
from distill.checkpoint import remove as remove_checkpoints
from distill.errors import DistillError
from distill.recipe import TrainArgs


def make_accelerator() -> Accelerator:
    """One Accelerator per run. CPU-only machines get `cpu=True`, which also lets
    `accelerate launch --multi_gpu --num_processes N` start N gloo ranks on one CPU box.
    Mixed precision is applied per stage with `torch.autocast`, so it is not set here.

    `split_batches=True`: a recipe's `batch_size` is the *global* batch. With N processes each
    rank trains on its 1/N slice of the same batch the 1-process run would see, so the number
    of optimizer steps, the schedule and (the gradients being averaged over ranks) the updates
    are those of the 1-process run, up to float summation order.

    Data parallelism with whole weights on every rank (DDP: `--multi_gpu`) and fully sharded
    data parallelism (FSDP2: `--use_fsdp --fsdp_version 2`, see `distill.sharding`) are what
    the loop supports, on CPU or GPU; DeepSpeed and Megatron-LM are refused up front (see
    `_check_distributed`)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    _check_distributed(accelerator.distributed_type)
    sharding.fsdp_plugin(accelerator)  # an unsupported FSDP setting fails here, not mid-run
    return accelerator


def _check_distributed(kind: DistributedType) -> None:
    """Refuse the launch modes whose optimizer steps the loop does not own: a DeepSpeed
    engine accumulates, clips and steps its own way, and Megatron-LM splits the model."""
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise DistillError(
            f"accelerate launch with {kind.value} is not supported: launch with --multi_gpu "
            "(DDP) or --use_fsdp --fsdp_version 2 (FSDP, weights and optimizer sharded)")


@dataclass
class LoopResult:
    """What a finished loop reports back to its stage."""

    steps: int
    seconds: float
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    last_loss: float | None = None
    checkpoint_seconds: float = 0.0  # time spent writing checkpoints (part of `seconds`)


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


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": _numpy_state()}


def _numpy_state() -> list | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with the stack
        return None
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _truncate_log(path: Path | None, steps: int, epoch: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be rewritten)."""
    if path is None or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if (rec.get("type") == "eval" and rec.get("epoch", 0) <= epoch) or \
                (rec.get("type") != "eval" and rec.get("step", 0) <= steps):
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def _check_global_batch(loader: DataLoader, accelerator: Accelerator, desc: str,
                        console: Console | None) -> None:
    """With N processes each rank takes batch_size / N examples of every (global) batch."""
    n, size = accelerator.num_processes, loader.batch_size
    if n == 1 or size is None:
        return
    if size % n:
        raise DistillError(f"{desc}: batch_size {size} must be a multiple of the {n} "
                           f"processes (each trains on batch_size / {n} of every batch)")
    rest = len(loader.dataset) % size  # type: ignore[arg-type]
    if rest and accelerator.is_main_process:
        (console or Console()).print(
            f"  {desc}: the last batch of each epoch has {rest} of {size} examples; with {n} "
            f"processes it is topped up with {size - rest} from the epoch's start, so that "
            "step differs slightly from a 1-process run")


def _mode(sharded: object) -> str:
    return "sharded (FSDP)" if sharded else "data-parallel or 1-process"


def _mean_over_ranks(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (unchanged with one process)."""
    if accelerator.num_processes == 1:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(values, t.tolist()))


def train_loop(unit: nn.Module, train_loader: DataLoader, args: TrainArgs, *,
               accelerator: Accelerator, keep: nn.Module,
               evaluate: Callable[[], float] | None = None, metric_name: str = "accuracy",
               log_path: Path | None = None, desc: str = "train",
               console: Console | None = None,
               checkpoint_dir: Path | None = None) -> LoopResult:
    """Train `unit` for `args.epochs` epochs; leave the best-on-validation weights in `keep`.

    Args:
        unit: module whose `forward(batch: dict[str, Tensor]) -> (loss, parts)` computes the
            stage's loss; its parameters with `requires_grad` are optimized. It may define
            `optimizer_groups(lr, weight_decay) -> list[dict] | None` (its own AdamW groups)
            and `on_step(step)` (called after each optimizer step, before gradients clear;
            with `reads_gradients = True` when it needs whole gradients, refused under FSDP).
        train_loader: batches of `input_ids` [B, n], `attention_mask` [B, n], `labels` [B],
            `idx` [B]; shuffled by its own seeded generator.
        keep: the sub-module whose weights are the stage's result (e.g. the student).
        evaluate: returns the validation metric (higher is better) of `keep`; called at each
            epoch end. Without it, the last weights are kept.
        log_path: where `log.jsonl` lines go (main process only).
        checkpoint_dir: where checkpoints go (default: `checkpoint/` beside `log_path`). Every
            `args.checkpoint_every` optimizer steps and at each epoch end the loop saves its
            whole state; a loop started again finds the newest complete checkpoint there and
            continues from it, reproducing the uninterrupted run bit for bit on CPU. The
            checkpoints are removed when the loop finishes.
    """
    main = accelerator.is_main_process
    if checkpoint_dir is None and log_path is not None:
        checkpoint_dir = log_path.parent / "checkpoint"
    log = JsonlLog(log_path if main else None)
    if not any(p.requires_grad for p in unit.parameters()):
        raise DistillError(f"{desc}: nothing to train (no parameter requires a gradient)")
    # Called after each optimizer step while the gradients still exist (AdaLoRA's rank budget).
    on_step = getattr(unit, "on_step", None)
    plugin = sharding.fsdp_plugin(accelerator)
    if plugin is not None and getattr(unit, "reads_gradients", False):
        raise DistillError(f"{desc}: {type(unit).__name__} reallocates ranks from whole "
                           "gradients after each step, which FSDP shards; launch it with "
                           "--multi_gpu (DDP) instead")
    ckpt = load_latest(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        if ckpt["loop"].get("sharded", False) != (plugin is not None):
            raise DistillError(
                f"{desc}: {ckpt['path']} was written by a {_mode(not plugin)} run and this "
                f"is a {_mode(plugin)} launch; resume with the launch that wrote it")
        # Whole weights, loaded before sharding (every rank reads the same file).
        unit.load_state_dict(ckpt["weights"])
    if plugin is not None:
        sharding.shard(unit, keep, plugin)
    # A unit may ask for its own parameter groups (LoRA+ gives B a larger learning rate).
    groups = (unit.optimizer_groups(args.learning_rate, args.weight_decay)
              if hasattr(unit, "optimizer_groups") else None)
    optimizer = torch.optim.AdamW(groups or _param_groups(unit, args.weight_decay),
                                  lr=args.learning_rate)
    params = [p for p in unit.parameters() if p.requires_grad]  # sharded ones under FSDP
    # The shuffle order of every epoch comes from this generator (data.make_loader).
    generator = train_loader.generator
    _check_global_batch(train_loader, accelerator, desc, console)
    if plugin is not None:  # already sharded: accelerate must not wrap it in DDP as well
        optimizer, train_loader = accelerator.prepare(optimizer, train_loader)
    else:
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
    micro, epoch, skip = 0, 0, 0
    epoch_generator_state = generator.get_state() if generator is not None else None
    resumed_rng = None
    if ckpt is not None:
        loop = ckpt["loop"]
        sharding.load_optimizer_state(unit, optimizer, ckpt["state"]["optimizer"],
                                      plugin is not None)
        scheduler.load_state_dict(ckpt["state"]["scheduler"])
        best_state = ckpt["best"]
        micro, epoch, skip = loop["micro"], loop["epoch"], loop["micro_in_epoch"]
        result.steps, result.history = loop["steps"], loop["history"]
        result.best_metric, result.best_epoch = loop["best_metric"], loop["best_epoch"]
        result.last_loss, start = loop["last_loss"], start - loop["seconds"]
        epoch_generator_state = ckpt["state"]["epoch_generator"]
        # Each process continues its own random stream (its own dropout masks).
        ranks = ckpt["state"].get("rng_ranks") or []
        resumed_rng = (ranks[accelerator.process_index]
                       if len(ranks) == accelerator.num_processes else ckpt["state"]["rng"])
        _truncate_log(log_path if main else None, result.steps, epoch)
        if main:
            (console or Console()).print(f"  {desc}: resuming from {ckpt['path'].name} "
                                         f"(step {result.steps} of {total_steps})")

    def checkpoint(micro_in_epoch: int) -> None:
        if checkpoint_dir is None:
            return
        began = time.perf_counter()
        # Under FSDP every rank takes part in gathering the whole weights and optimizer state.
        weights = (sharding.full_state_dict(unit) if plugin is not None
                   else accelerator.unwrap_model(unit).state_dict())
        optimizer_state = sharding.optimizer_state(unit, optimizer, plugin is not None)
        rng_ranks = (gather_object([_rng_state()]) if accelerator.num_processes > 1
                     else [_rng_state()])
        if main:
            save_checkpoint(checkpoint_dir, result.steps, weights, {
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": rng_ranks[0], "rng_ranks": rng_ranks,
                "epoch_generator": epoch_generator_state,
            }, {"micro": micro, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                "steps": result.steps, "history": result.history,
                "best_metric": result.best_metric, "best_epoch": result.best_epoch,
                "last_loss": result.last_loss, "sharded": plugin is not None,
                "seconds": round(time.perf_counter() - start, 3)}, best_state)
        accelerator.wait_for_everyone()
        result.checkpoint_seconds += time.perf_counter() - began

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not main)
    with progress:
        task = progress.add_task(desc, total=total_steps, loss="—",
                                 completed=result.steps)
        while micro < micro_total:
            unit.train()
            if generator is not None and epoch_generator_state is not None:
                # Resuming: the same epoch order as the interrupted run.
                generator.set_state(epoch_generator_state)
            epoch_generator_state = generator.get_state() if generator is not None else None
            if resumed_rng is not None and skip == 0:
                # Resuming at an epoch boundary: the RNG state from before this epoch began.
                _set_rng_state(resumed_rng)
                resumed_rng = None
            micro_in_epoch = 0
            for batch in train_loader:
                if micro_in_epoch < skip:  # batches the checkpoint had already trained on
                    micro_in_epoch += 1
                    continue
                if resumed_rng is not None:  # mid-epoch: dropout masks continue from here
                    _set_rng_state(resumed_rng)
                    resumed_rng = None
                if micro >= micro_total:
                    break
                micro += 1
                micro_in_epoch += 1
                boundary = micro % args.grad_accum_steps == 0 or micro == micro_total
                # Skip the gradient all-reduce on micro-batches that do not step.
                sync = (contextlib.nullcontext() if boundary else sharding.no_sync(unit)
                        if plugin is not None else accelerator.no_sync(unit))
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
                if args.max_grad_norm is not None and plugin is not None:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # DTensor-aware
                elif args.max_grad_norm is not None:
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
                    # Every rank logs at the same steps: the logged means span all ranks.
                    means = _mean_over_ranks(accelerator, {
                        "loss": result.last_loss,
                        **{k: sum(v) / len(v) for k, v in window_parts.items()}})
                    log.write({"type": "train", "step": result.steps,
                               "epoch": round(micro / len(train_loader), 4),
                               "loss": means.pop("loss"), "lr": scheduler.get_last_lr()[0],
                               **means, "seconds": round(time.perf_counter() - start, 3)})
                    window, window_parts = [], {}
                if args.checkpoint_every and result.steps % args.checkpoint_every == 0 \
                        and micro_in_epoch < len(train_loader) and micro < micro_total:
                    checkpoint(micro_in_epoch)
            skip = 0
            epoch += 1
            if evaluate is not None and args.keep_best:
                value = evaluate()
                if accelerator.num_processes > 1:  # one verdict, or keep_best would differ
                    value = broadcast_object_list([value], from_process=0)[0]
                result.history.append({"epoch": epoch, "step": result.steps, metric_name: value})
                log.write({"type": "eval", "step": result.steps, "epoch": epoch,
                           "metric_name": metric_name, "metric": value})
                if main:
                    progress.console.print(f"  {desc} epoch {epoch}: validation "
                                           f"{metric_name} {value:.4f}")
                if result.best_metric is None or value > result.best_metric:
                    result.best_metric, result.best_epoch = value, epoch
                    best_state = (sharding.full_state_dict(keep) if plugin is not None else
                                  {k: v.detach().clone() for k, v in
                                   accelerator.unwrap_model(keep).state_dict().items()})
            if micro < micro_total:
                epoch_generator_state = generator.get_state() if generator is not None else None
                checkpoint(0)
    if plugin is not None:  # the stage gets back plain modules with whole weights
        sharding.unshard_in_place(unit)
    if best_state is not None:
        keep.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    if checkpoint_dir is not None and main:
        remove_checkpoints(checkpoint_dir)
    accelerator.free_memory()
    return result


