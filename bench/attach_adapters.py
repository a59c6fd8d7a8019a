"""The shipped recipe `recipes/attach-adapters.yaml`, run whole, summarised as JSON.

Stages 0-1 are `recipes/minilm-rotten-tomatoes.yaml` exactly (the MiniLM-L6 teacher tuned on
Rotten Tomatoes, the 3-layer KD student): they give the README's main results table. The 15
adapt stages put every PEFT method in turn on that student for BBC News topics: they give
the adapters table. The last stage evaluates teacher and student on the sentiment test split.

    HF_HUB_OFFLINE=1 nice -n 19 python bench/attach_adapters.py     # the whole recipe
    python bench/attach_adapters.py --resume       # continue a killed run (distill run --resume)
    python bench/attach_adapters.py --summarise    # only re-read the finished run
    # -> bench/results/attach_adapters.json, then: python bench/readme_tables.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from provenance import RESULTS, ROOT, write_result

RECIPE = ROOT / "recipes" / "attach-adapters.yaml"


# The recipe settings a table states beside its numbers (epochs, learning rate, method ...).
SETTINGS = ("epochs", "batch_size", "learning_rate", "bf16", "method", "config", "student",
            "loss", "data")


def summarise(run: Path) -> dict:
    """The numbers the README's tables show, read from the finished run directory: per stage
    the report's entry, the recipe's settings (as resolved in the run's recipe.yaml), the
    stage's metrics.json and the depth of the model it wrote."""
    report = json.loads((run / "report.json").read_text())
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    stages = []
    for stage, settings in zip(report["stages"], recipe["stages"], strict=True):
        folder = run / "stages" / f"{stage['index']:02d}-{stage['kind']}"
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        config_file = folder / "model" / "config.json"
        layers = (json.loads(config_file.read_text()).get("num_hidden_layers")
                  if config_file.is_file() else None)
        stages.append({**stage, "settings": {k: settings[k] for k in SETTINGS if k in settings},
                       "num_hidden_layers": layers, "metrics": {k: metrics[k] for k in (
            "layers", "layer_map", "loss", "method", "label", "steps", "train_seconds", "bf16",
            "best_validation_accuracy", "best_epoch") if k in metrics}})
    where = run.resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    return {"recipe": str(RECIPE.relative_to(ROOT)), "run": str(where),
            "teacher_model": recipe["teacher"]["model"],
            "teacher": report["teacher"], "data": report.get("data"), "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "attach-adapters",
                    help="the run directory")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run")
    ap.add_argument("--summarise", action="store_true",
                    help="do not run: summarise the finished run in --run")
    ap.add_argument("--json", type=Path, default=RESULTS / "attach_adapters.json")
    args = ap.parse_args()

    start = time.perf_counter()
    if args.resume:
        from distill.run.pipeline import resume_recipe

        resume_recipe(args.run)
    elif not args.summarise:
        from distill import load_recipe, run_recipe

        run_recipe(load_recipe(RECIPE), output=str(args.run), force=True)
    summary = summarise(args.run)
    if not args.summarise:
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    elif args.json.is_file():  # re-read only: the run's wall time is the one measured before
        wall = json.loads(args.json.read_text()).get("wall_seconds")
        if wall is not None:
            summary["wall_seconds"] = wall
    print(f"wrote {write_result(args.json, summary)}")


if __name__ == "__main__":
    main()
