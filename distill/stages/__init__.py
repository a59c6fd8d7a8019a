"""One module per stage kind; each exposes `run(ctx, cfg, stage_dir) -> StageResult`."""

from __future__ import annotations

from collections.abc import Callable

from distill.stages import adapt, distill, evaluate, finetune, shrink

RUNNERS: dict[str, Callable] = {
    "finetune": finetune.run,
    "distill": distill.run,
    "shrink": shrink.run,
    "adapt": adapt.run,
    "evaluate": evaluate.run,
}
