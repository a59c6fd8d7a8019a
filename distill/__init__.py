"""distill: compress transformer models.

The Python API does everything the CLI does:

    import distill
    recipe = distill.load_recipe("recipes/minilm-rotten-tomatoes.yaml",
                                 overrides=["stages.1.loss.alpha=0.7"])
    report = distill.run_recipe(recipe, output="runs/alpha07")
"""

from __future__ import annotations

from distill.errors import DistillError, RecipeError
from distill.config.recipe import Recipe
from distill.config.loading import load_recipe, recipe_from_dict

__version__ = "0.1.0"


def run_recipe(recipe: Recipe, output: str | None = None, force: bool = False,
               console: object | None = None) -> dict:
    """Run a validated recipe; see `distill.run.pipeline.run_recipe`."""
    from distill.run.pipeline import run_recipe as _run

    return _run(recipe, output=output, force=force, console=console)


def __getattr__(name: str) -> object:
    # Stage functions and helpers load lazily: `import distill` stays fast for the CLI.
    lazy = {
        "finetune": ("distill.stages.finetune", "run"),
        "distill_student": ("distill.stages.distill", "run"),
        "evaluate": ("distill.stages.evaluate", "run"),
        "evaluate_saved_model": ("distill.stages.evaluate", "evaluate_saved_model"),
        "describe_model": ("distill.commands.inspect", "describe_model"),
        "load_report": ("distill.run.report", "load_report"),
        "print_report": ("distill.run.report", "print_report"),
        "keep_layers": ("distill.compress.depth", "keep_layers"),
        "select_layers": ("distill.compress.importance", "select_layers"),
        "depth_importance": ("distill.compress.importance", "depth_importance"),
        "shrink_width": ("distill.compress.width", "shrink_width"),
        "shrink_model": ("distill.commands.shrink", "shrink_model"),
        "shrink": ("distill.stages.shrink", "run"),
        "adapt": ("distill.stages.adapt", "run"),
        "attach": ("distill.commands.attach", "attach"),
        "export": ("distill.commands.export", "export"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


__all__ = ["DistillError", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict",
           "run_recipe", "finetune", "distill_student", "evaluate", "evaluate_saved_model",
           "describe_model", "load_report", "print_report", "keep_layers", "select_layers",
           "depth_importance", "shrink_width", "shrink_model", "shrink", "adapt", "attach",
           "export"]
