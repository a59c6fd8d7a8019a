"""`distill attach`: one adapt stage on a saved student, as a one-stage recipe.

The CLI command and `distill.attach(...)` build the same `Recipe` a YAML file would and run it
through the pipeline, so the run folder, report and adapter are exactly a recipe's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from distill.errors import DistillError
from distill.config.recipe import AdaptStage, DataConfig, ModelSpec, Recipe
from distill.config.loading import recipe_from_dict, recipe_to_dict
from distill.config.schema import YAMLInputError, load_yaml


def parse_options(items: list[str]) -> dict[str, Any]:
    """`["r=8", "target_modules=[query, value]"]` -> {"r": 8, "target_modules": [...]}; values
    are YAML scalars/lists."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"--option {item!r}: expected KEY=VALUE, e.g. r=8")
        try:  # the recipe file's strict loader: no tags, duplicate keys, alias bombs
            options[key.strip()] = load_yaml(raw) if raw.strip() else ""
        except YAMLInputError as exc:
            raise DistillError(f"--option {item!r}: {exc.problem}") from None
        except yaml.YAMLError:
            raise DistillError(f"--option {item!r}: {raw!r} is not a valid value") from None
    return options


def attach_recipe(student: str, method: str, data: DataConfig, options: dict[str, Any],
                  name: str | None = None, **train: Any) -> Recipe:
    """A validated one-stage recipe: `method` with `options` on `student` for `data`.

    `train` holds the adapt stage's training keys (epochs, learning_rate, batch_size, ...).
    """
    stage = {"kind": "adapt", "method": method, "config": options, "model": "teacher", **train}
    raw = recipe_to_dict(Recipe(name=name or f"attach-{method}", teacher=ModelSpec(model=student),
                                data=data, stages=[AdaptStage()]))
    raw["stages"] = [stage]
    return recipe_from_dict(raw, command="distill attach")


def attach(student: str, method: str, data: DataConfig, options: dict[str, Any] | None = None,
           output: str | Path | None = None, force: bool = False,
           console: Console | None = None, **train: Any) -> dict:
    """Train `method` on `student` for the task in `data`; returns the adapter's metrics
    (trainable parameters and share, test accuracy, seconds per step) and where it is."""
    from distill.run.pipeline import run_recipe

    recipe = attach_recipe(student, method, data, options or {}, **train)
    report = run_recipe(recipe, output=output, force=force, console=console)
    stage = report["stages"][-1]
    return {"run_dir": str(output or Path(recipe.output_dir) / recipe.name),
            "adapter": stage.get("artifact"), **(stage.get("model") or {})}
