"""What packing could still buy the language-model recipes: real tokens per padded position.

Packing (several sequences in one row, attention kept apart) saves only the positions a batch
pads. This counts them, over one epoch of each training loader the shipped language-model
recipes build, with the toolkit's own tokenization and loaders (no model runs):

- a recipe's text data (`data:`): documents cut into blocks of `max_length` tokens (already
  packed: every position of a block is a real token);
- a recipe's `adapt` stage on conversations (`builtin:chatterbot`): one conversation per row,
  each batch padded to its longest; loaders as the stage builds them, with length-grouped
  batches (the default, `group_by_length: true`) and with random ones, seeds 0, 1, 2.

`real_share` = real tokens / padded positions; packing's best case fills every position, so
it can save at most `1 - real_share` of a step's token positions (its linear layers' work;
attention, quadratic in the row's length, would grow in packed rows).

    HF_HUB_OFFLINE=1 python bench/packing_headroom.py   # -> bench/results/packing_headroom.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console

from distill import load_recipe
from distill.data.batching import make_loader
from distill.run.preflight import preflight
from provenance import RESULTS, ROOT, write_result

RECIPES = ["smollm2-shakespeare", "gemma3-shakespeare"]


def shares(task, dataset, tokenizer, batch_size: int, seeds: list[int]) -> dict:
    """Real-token share of one epoch of the shuffled training loader, grouped and random."""
    out: dict = {"examples": len(dataset), "batch_size": batch_size}
    for mode, grouped in {"grouped": True, "random": False}.items():
        per_seed = []
        for seed in seeds:
            loader = make_loader(dataset, task.collate(tokenizer), batch_size, shuffle=True,
                                 seed=seed, group_by_length=grouped)
            real = padded = 0
            for batch in loader:
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            per_seed.append(round(real / padded, 4))
        out[mode] = per_seed
    return out


def recipe_rows(name: str, seeds: list[int]) -> list[dict]:
    """The training data of the recipe's text stages and of its adapt stages."""
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    # The corpus blocks only: the teacher's sampled blocks have the same fixed length.
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, teacher_samples=0))
    checked = preflight(recipe)
    task, tokenizer = checked.task, checked.tokenizer
    rows = []
    text_stage = next(s for s in recipe.stages if s.kind == "shrink")
    train = task.tokenize(checked.data, "train", tokenizer, recipe.data)
    rows.append({"recipe": name, "stage": "shrink (heal)", "dataset": recipe.data.dataset,
                 **shares(task, train, tokenizer, text_stage.heal.batch_size, seeds)})
    for stage in recipe.stages:
        if stage.kind == "adapt" and stage.data is not None:
            data = task.load_data(stage.data)
            train = task.tokenize(data, "train", tokenizer, stage.data)
            rows.append({"recipe": name, "stage": "adapt", "dataset": stage.data.dataset,
                         **shares(task, train, tokenizer, stage.batch_size, seeds)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=RESULTS / "packing_headroom.json")
    args = ap.parse_args()
    console = Console()
    rows = [row for name in RECIPES for row in recipe_rows(name, args.seeds)]
    for row in rows:
        console.print(f"{row['recipe']} {row['stage']} ({row['dataset']}): real share grouped "
                      f"{row['grouped']}, random {row['random']}")
    worst = min(min(row["grouped"]) for row in rows)
    out = {"rows": rows, "min_real_share_grouped": worst,
           "max_packing_saving": round(1 - worst, 4)}
    console.print(f"packing could save at most {1 - worst:.1%} of the positions")
    console.print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
