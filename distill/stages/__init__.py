"""One module per stage kind; each exposes `run(ctx, cfg, stage_dir) -> StageResult`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.run.context import RunContext, StageResult
from distill.stages import adapt, distill, evaluate, export, finetune, shrink


def _synced(run: Callable[..., StageResult]) -> Callable[..., StageResult]:
    """`run`, then a barrier: under `accelerate launch` no rank starts the next stage (or
    reads this stage's artifacts) before every rank has finished this one."""
    @functools.wraps(run)
    def wrapper(ctx: RunContext, cfg: Any, stage_dir: Path) -> StageResult:
        result = run(ctx, cfg, stage_dir)
        ctx.accelerator.wait_for_everyone()
        return result
    return wrapper


RUNNERS: dict[str, Callable[..., StageResult]] = {
    "finetune": _synced(finetune.run),
    "distill": _synced(distill.run),
    "shrink": _synced(shrink.run),
    "adapt": _synced(adapt.run),
    "evaluate": _synced(evaluate.run),
    "export": _synced(export.run),
}
