"""`distill export`: one export stage on a saved model, as a one-stage recipe.

The CLI command and `distill.export(...)` build the recipe a YAML file would and run it
through the pipeline: the artifacts, their checks and timings land in a run folder and its
report like any recipe's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.config.loading import recipe_from_dict, recipe_to_dict
from distill.config.recipe import DataConfig, ExportStage, ModelSpec, Recipe
from distill.models.loading import load_config


def export_recipe(model: str, data: DataConfig, formats: list[str] | None = None,
                  name: str | None = None, task: str | None = None, **stage: Any) -> Recipe:
    """A validated one-stage recipe exporting `model` (checked on `data`; its task's default
    data when `data.dataset` is empty) in `formats` (default: the stage's, all of them)."""
    if not data.dataset:
        from distill.tasks import resolve_task

        kind = resolve_task(task, load_config(model), model)
        data = dataclasses.replace(data, dataset=kind.default_dataset)
    raw = recipe_to_dict(Recipe(name=name or "export", teacher=ModelSpec(model=model, task=task),
                                data=data, stages=[ExportStage()]))
    if formats is not None:
        stage["formats"] = formats
    raw["stages"] = [{"kind": "export", "model": "teacher", **stage}]
    return recipe_from_dict(raw, command="distill export")


def export(model: str, data: DataConfig, formats: list[str] | None = None,
           output: str | Path | None = None,
           force: bool = False, console: Console | None = None, task: str | None = None,
           **stage: Any) -> dict:
    """Export `model` in `formats`, check every artifact against it on `data` and time it;
    returns {"run_dir", "exports": {format: record}} (the report's record, fp32 first)."""
    from distill.run.pipeline import run_recipe

    recipe = export_recipe(model, data, formats, task=task, **stage)
    report = run_recipe(recipe, output=output, force=force, console=console)
    return {"run_dir": str(output or Path(recipe.output_dir) / recipe.name),
            "exports": report["stages"][-1].get("exports", {})}
