"""One module per stage kind; each exposes `run(ctx, cfg, stage_dir) -> StageResult`."""

from __future__ import annotations

from collections.abc import Callable

from distill.stages import distill, evaluate, finetune

RUNNERS: dict[str, Callable] = {
    "finetune": finetune.run,
    "distill": distill.run,
    "evaluate": evaluate.run,
}
