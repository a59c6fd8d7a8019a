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
from rich.markup import escape
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

from distill.data.batching import loader_batch_size
from distill.train import parallel
from distill.train.checkpoint import load_latest, save_checkpoint
from distill.train.compiling import CompiledForward
from distill.errors import DistillError
from distill.files import json_lines
from distill.train.precision import autocast as bf16_autocast
from distill.config.recipe import TrainArgs


def make_accelerator() -> Accelerator:
    """One Accelerator per run. CPU-only machines get `cpu=True`, which also lets
    `accelerate launch --multi_gpu --num_processes N` start N gloo ranks on one CPU box.
    Mixed precision is applied per stage with `torch.autocast`, so it is not set here.

    `split_batches=True`: a recipe's `batch_size` is the *global* batch. With N processes each
    rank trains on its 1/N slice of the same batch the 1-process run would see, so the number
    of optimizer steps, the schedule and (the gradients being averaged over ranks) the updates
    are those of the 1-process run, up to float summation order.

    DDP (`--multi_gpu`), FSDP2 (`--use_fsdp --fsdp_version 2`) and DeepSpeed ZeRO 0-2
    (`--use_deepspeed`) are what the loop supports, on CPU or GPU (see `distill.train.parallel`);
    Megatron-LM is refused up front (see `_check_distributed`)."""
    parallel.name_deepspeed_device()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    _check_distributed(accelerator.distributed_type)
    parallel.strategy_for(accelerator)  # an unsupported FSDP/DeepSpeed setting fails here
    return accelerator


def _check_distributed(kind: DistributedType) -> None:
    """Refuse Megatron-LM: it splits the model's matrices, which the stages cut and save."""
    if kind == DistributedType.MEGATRON_LM:
        raise DistillError(
            f"accelerate launch with {kind.value} is not supported: launch with --multi_gpu "
            "(DDP), --use_fsdp --fsdp_version 2 (FSDP) or --use_deepspeed (ZeRO 0-2)")


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
    for _, line in json_lines(path.read_bytes().decode("utf-8")):
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
    n, size = accelerator.num_processes, loader_batch_size(loader)
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


def _finite_everywhere(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process. One verdict for all: a process that
    stopped alone would leave the others waiting in their next collective."""
    finite = bool(torch.isfinite(loss.detach()))
    if accelerator.num_processes == 1:
        return finite
    bad = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    return float(accelerator.reduce(bad, reduction="sum")) == 0.0


def _loss_values(accelerator: Accelerator, loss: torch.Tensor) -> str:
    """This process's loss, or every process's (`[nan, 0.69]`) when there are several."""
    value = loss.detach().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes == 1:
        return f"{float(value)}"
    return str([round(v, 4) for v in accelerator.gather(value).tolist()])


def _mean_over_ranks(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (unchanged with one process)."""
    if accelerator.num_processes == 1:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(values, t.tolist()))


def _load_checkpoint(directory: Path | None, strategy: parallel.Strategy, unit: nn.Module,
                     desc: str, console: Console | None) -> dict | None:
    """The loop's newest complete checkpoint (see `checkpoint.load_latest`), its whole weights
    already in `unit` (loaded before any wrapping; every rank reads the same file).

    Damaged checkpoints are named on `console` (when given: the main process), with what the
    loop does instead, before it starts.
    """
    damaged: list[Path] = []
    ckpt = load_latest(directory, damaged) if directory is not None else None
    if damaged and console is not None:
        names = ", ".join(p.name for p in damaged)
        then = (f"resuming from the older {ckpt['path'].name}" if ckpt is not None
                else "no complete checkpoint is left: the stage starts again from step 0")
        console.print(f"  [yellow]{desc}: damaged checkpoint(s) in {escape(str(directory))} "
                      f"skipped ({names}: a file missing, cut short or changed); {then}[/]")
    if ckpt is None:
        return None
    written_by = ckpt["loop"].get("parallel", "data-parallel")
    if written_by != strategy.name:
        raise DistillError(
            f"{desc}: {ckpt['path']} was written by a {written_by} launch and this is a "
            f"{strategy.name} launch; resume with the launch that wrote it")
    unit.load_state_dict(ckpt["weights"])
    return ckpt


def _optimizer_factory(args: TrainArgs, fused: bool) -> parallel.OptimizerFactory:
    """AdamW over a module's trainable parameters; a unit may ask for its own parameter
    groups (`optimizer_groups`: LoRA+ gives B a larger learning rate).

    `fused`: PyTorch's fused AdamW kernel where every parameter is a plain float tensor on a
    CPU or CUDA device (a sharded launch's parameters are not: it keeps the default). On the
    MiniLM-L6 student (17.4 M parameters, 2 cores) one step took 8.7 ms fused against 35.3 ms
    in the default multi-tensor form: the difference is 7 % of a bare fp32 distill step
    (bench/results/floor.json).
    """

    def make(module: nn.Module) -> torch.optim.Optimizer:
        groups = (module.optimizer_groups(args.learning_rate, args.weight_decay)
                  if hasattr(module, "optimizer_groups") else None)
        groups = groups or _param_groups(module, args.weight_decay)
        params = [p for g in groups for p in g["params"]]
        use_fused = fused and all(
            type(p) is nn.Parameter and p.device.type in ("cpu", "cuda")
            and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        return torch.optim.AdamW(groups, lr=args.learning_rate, fused=use_fused or None)

    return make


def train_loop(unit: nn.Module, train_loader: DataLoader, args: TrainArgs, *,
               accelerator: Accelerator, keep: nn.Module, bf16: bool = False,
               evaluate: Callable[[], float] | None = None, metric_name: str = "accuracy",
               maximize: bool = True, log_path: Path | None = None, desc: str = "train",
               console: Console | None = None,
               checkpoint_dir: Path | None = None) -> LoopResult:
    """Train `unit` for `args.epochs` epochs; leave the best-on-validation weights in `keep`.

    Args:
        unit: module whose `forward(batch: dict[str, Tensor]) -> (loss, parts)` computes the
            stage's loss; its parameters with `requires_grad` are optimized. It may define
            `optimizer_groups(lr, weight_decay) -> list[dict] | None` (its own AdamW groups)
            and `on_step(step)` (called after each optimizer step, before gradients clear;
            with `reads_gradients = True` when it needs whole gradients: refused under FSDP
            and DeepSpeed).
        train_loader: batches of `input_ids` [B, n], `attention_mask` [B, n], `labels` [B],
            `idx` [B]; shuffled by its own seeded generator.
        keep: the sub-module whose weights are the stage's result (e.g. the student).
        bf16: train under bf16 autocast (the stage's decision, `precision.decide`; the loop
            does not read `args.bf16`).
        evaluate: returns the validation metric of `keep`; called at each epoch end. Without
            it, the last weights are kept.
        metric_name / maximize: what `evaluate` measures, and whether higher is better
            (accuracy) or lower (perplexity).
        log_path: where `log.jsonl` lines go (main process only).
        checkpoint_dir: where checkpoints go (default: `checkpoint/` beside `log_path`). Every
            `args.checkpoint_every` optimizer steps and at each epoch end the loop saves its
            whole state; a loop started again finds the newest complete checkpoint there and
            continues from it, reproducing the uninterrupted run bit for bit on CPU. The
            checkpoints outlive the loop: the caller removes them once the result is saved
            (`checkpoint.remove_all`), so a kill before that retrains nothing finished.
    """
    main = accelerator.is_main_process
    if checkpoint_dir is None and log_path is not None:
        checkpoint_dir = log_path.parent / "checkpoint"
    log = JsonlLog(log_path if main else None)
    if not any(p.requires_grad for p in unit.parameters()):
        raise DistillError(f"{desc}: nothing to train (no parameter requires a gradient)")
    # Called after each optimizer step while the gradients still exist (AdaLoRA's rank budget).
    on_step = getattr(unit, "on_step", None)
    strategy = parallel.strategy_for(accelerator)
    if strategy.shards_gradients and getattr(unit, "reads_gradients", False):
        raise DistillError(f"{desc}: {type(unit).__name__} reads whole gradients after each "
                           f"step, which a {strategy.name} launch partitions; launch it with "
                           "--multi_gpu (DDP) instead")
    ckpt = _load_checkpoint(checkpoint_dir, strategy, unit, desc,
                            (console or Console()) if main else None)
    # The shuffle order of every epoch comes from this generator (data.make_loader).
    generator = train_loader.generator
    _check_global_batch(train_loader, accelerator, desc, console)
    # Fused AdamW for whole parameters (one process, DDP); FSDP and DeepSpeed keep the default.
    make_optimizer = _optimizer_factory(args, fused=strategy.name == "data-parallel")
    # Pre-flight refuses compile under FSDP and DeepSpeed (preflight.sharding_problems).
    compiled = CompiledForward(keep, args.compile)  # the training steps' forward, not eval's
    unit, optimizer, train_loader = strategy.setup(unit, keep, make_optimizer,
                                                   train_loader, args.max_grad_norm)

    micro_total = max(1, math.ceil(args.epochs * len(train_loader)))
    total_steps = max(1, math.ceil(micro_total / args.grad_accum_steps))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * total_steps), total_steps)
    autocast = bf16_autocast(bf16, accelerator.device.type)

    result = LoopResult(steps=0, seconds=0.0)
    best_state: dict[str, torch.Tensor] | None = None
    start = time.perf_counter()
    window: list[float] = []
    window_parts: dict[str, list[float]] = {}
    micro, epoch, skip = 0, 0, 0
    epoch_generator_state = generator.get_state() if generator is not None else None
    resumed_rng = None
    if ckpt is None and main and log_path is not None:
        # A loop that starts at step 0 writes its log afresh: lines there are from an earlier
        # attempt killed before its first checkpoint, and would be logged twice.
        log_path.unlink(missing_ok=True)
    if ckpt is not None:
        loop = ckpt["loop"]
        strategy.load_optimizer_state(ckpt["state"]["optimizer"])
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
        # Every rank takes part: sharded weights and optimizer state are gathered.
        weights = strategy.weights()
        optimizer_state = strategy.optimizer_state()
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
                "last_loss": result.last_loss, "parallel": strategy.name,
                "seconds": round(time.perf_counter() - start, 3)}, best_state)
        accelerator.wait_for_everyone()
        result.checkpoint_seconds += time.perf_counter() - began

    # Redrawn from this thread, at most twice a second, instead of by rich's refresh thread:
    # that thread woke 10 times a second and took a core from the training step's threads.
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not main, auto_refresh=False)
    drawn = [0.0]

    def redraw_due() -> bool:
        now = time.monotonic()
        if now - drawn[0] < 0.5:
            return False
        drawn[0] = now
        return True

    with progress, compiled.active():
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
                sync = contextlib.nullcontext() if boundary else strategy.no_sync()
                with sync:
                    with autocast:
                        loss, parts = unit(batch)
                    if not _finite_everywhere(accelerator, loss):
                        raise DistillError(
                            f"{desc}: the loss became {_loss_values(accelerator, loss)} at step "
                            f"{result.steps + 1}; lower learning_rate (now "
                            f"{args.learning_rate:g}) or check the data")
                    strategy.backward(loss / args.grad_accum_steps)
                window.append(float(loss.detach()))
                for k, v in parts.items():
                    window_parts.setdefault(k, []).append(v)
                if not boundary:
                    continue
                result.steps += 1
                strategy.step(args.max_grad_norm, None if on_step is None
                              else lambda: on_step(result.steps))
                scheduler.step()
                result.last_loss = sum(window) / len(window)
                progress.update(task, advance=1, loss=f"{result.last_loss:.4f}",
                                refresh=redraw_due() or result.steps == total_steps)
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
                with compiled.paused():
                    value = evaluate()
                if accelerator.num_processes > 1:  # one verdict, or keep_best would differ
                    value = broadcast_object_list([value], from_process=0)[0]
                result.history.append({"epoch": epoch, "step": result.steps, metric_name: value})
                log.write({"type": "eval", "step": result.steps, "epoch": epoch,
                           "metric_name": metric_name, "metric": value})
                if main:
                    progress.console.print(f"  {desc} epoch {epoch}: validation "
                                           f"{metric_name} {value:.4f}")
                if result.best_metric is None or (value > result.best_metric if maximize
                                                  else value < result.best_metric):
                    result.best_metric, result.best_epoch = value, epoch
                    best_state = strategy.kept_weights(keep)
            if micro < micro_total:
                epoch_generator_state = generator.get_state() if generator is not None else None
                checkpoint(0)
    strategy.finish()  # the stage gets back plain modules with whole weights
    if best_state is not None:
        keep.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    # The checkpoints stay: whoever saves the loop's result removes them once it is durable
    # (the pipeline after the stage's state, the shrink stage after a step's step.json).
    return result
