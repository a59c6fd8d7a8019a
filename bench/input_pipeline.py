"""What the input pipeline could still buy: padding that packing would remove, and the time a
loader running off the training thread would hide. No model is trained.

Padding. Packing (several sequences in one row, their attention kept apart) saves only the
positions a batch pads. Counted over one epoch of each training loader the shipped
language-model recipes build, with the toolkit's own tokenization and loaders:
- a recipe's text data (`data:`): documents cut into blocks of `max_length` tokens (packed
  already: every position of a block is a real token);
- a recipe's `adapt` stage on conversations (`builtin:chatterbot`): one conversation per row,
  each batch padded to its longest; with length-grouped batches (the default,
  `group_by_length: true`) and with random ones; seeds 0, 1, 2.
`real_share` = real tokens / padded positions: packing fills every position, so it can save at
most `1 - real_share` of a step's positions (its linear layers' work; attention, quadratic in
a row's length, grows in packed rows).

Loading. The default recipe's training loader (Rotten Tomatoes, batch 32, length-grouped: the
sampler, the collation, the padding) timed alone over one epoch, against the cheapest training
step that consumes it, timed in the same run: the recipe's 3-layer student, forward + CE +
backward + fused AdamW under bf16 autocast, no teacher (a cached-KD step does this and more).
`loader_share` = loading time per batch / (that + the step): the most a loader on another
thread could hide.

    HF_HUB_OFFLINE=1 python bench/input_pipeline.py   # -> bench/results/input_pipeline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForSequenceClassification

from distill import load_recipe
from distill.compress.depth import keep_layers
from distill.data.batching import make_loader
from distill.models.loading import resolve_model_path
from distill.run.preflight import preflight
from minilm_stages import BATCH, LAYERS, train_split
from provenance import RESULTS, ROOT, write_result

LM_RECIPES = ["smollm2-shakespeare", "gemma3-shakespeare"]


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


def padding_rows(name: str, seeds: list[int]) -> list[dict]:
    """The training data of the recipe's shrink (heal) stage and of its adapt stages."""
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    # The corpus blocks only: the teacher's sampled blocks have the same fixed length.
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, teacher_samples=0))
    checked = preflight(recipe)
    task, tokenizer = checked.task, checked.tokenizer
    heal = next(s for s in recipe.stages if s.kind == "shrink").heal
    train = task.tokenize(checked.data, "train", tokenizer, recipe.data)
    rows = [{"recipe": name, "stage": "shrink (heal)", "dataset": recipe.data.dataset,
             **shares(task, train, tokenizer, heal.batch_size, seeds)}]
    for stage in recipe.stages:
        if stage.kind == "adapt" and stage.data is not None:
            train = task.tokenize(task.load_data(stage.data), "train", tokenizer, stage.data)
            rows.append({"recipe": name, "stage": "adapt", "dataset": stage.data.dataset,
                         **shares(task, train, tokenizer, stage.batch_size, seeds)})
    return rows


def loading(steps: int) -> dict:
    """The default recipe's training loader alone over an epoch, and the cheapest step on it."""
    _, checked, train = train_split()
    collate = checked.task.collate(checked.tokenizer)
    start = time.perf_counter()
    batches = list(make_loader(train, collate, BATCH, shuffle=True, seed=0))
    load_s = (time.perf_counter() - start) / len(batches)
    torch.manual_seed(0)
    model = keep_layers(AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("builtin:minilm-l6"), num_labels=2), LAYERS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:3]:
        step(batch)  # warm-up
    timed = list(itertools.islice(itertools.cycle(batches[3:]), steps))
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    step_s = (time.perf_counter() - start) / steps
    return {"batches": len(batches), "batch_size": BATCH, "loader_seconds_per_batch": load_s,
            "step_seconds": step_s, "steps_timed": steps,
            "loader_share": round(load_s / (load_s + step_s), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="steps timed for the loader's share")
    ap.add_argument("--json", type=Path, default=RESULTS / "input_pipeline.json")
    args = ap.parse_args()
    console = Console()
    rows = [row for name in LM_RECIPES for row in padding_rows(name, args.seeds)]
    for row in rows:
        console.print(f"{row['recipe']} {row['stage']} ({row['dataset']}): real share grouped "
                      f"{row['grouped']}, random {row['random']}")
    worst = min(min(row["grouped"]) for row in rows)
    load = loading(args.steps)
    console.print(f"packing could save at most {1 - worst:.1%} of the positions; loading is "
                  f"{load['loader_share']:.2%} of a step "
                  f"({load['loader_seconds_per_batch'] * 1e3:.2f} ms of "
                  f"{load['step_seconds'] * 1e3:.0f} ms)")
    out = {"padding": rows, "min_real_share_grouped": worst,
           "max_packing_saving": round(1 - worst, 4), "loading": load}
    console.print(f"wrote {write_result(args.json, out)}")


if __name__ == "__main__":
    main()
