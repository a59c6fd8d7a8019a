"""What the MiniLM speed benchmarks share: the data and teacher as a run sees them, and a
real training stage run by `distill.run_recipe`, timed by its own `train_seconds`.

The teacher is MiniLM-L6 with a fresh classification head, saved once under the benchmark's
folder: speed does not depend on the weights, and a saved head is what lets a distill stage
take the model as a tuned teacher (it refuses to distill an untrained head of a base model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from torch.utils.data import DataLoader

from distill import load_recipe, run_recipe
from distill.config.recipe import Recipe
from distill.data.batching import make_loader
from distill.files import cache_root
from distill.run.preflight import Checked, preflight
from provenance import ROOT

RECIPE = ROOT / "recipes/minilm-rotten-tomatoes.yaml"
TEACHER = "builtin:minilm-l6"
LAYERS = [0, 2, 4]
ALPHA, TEMPERATURE, LR, BATCH = 0.5, 2.0, 1e-4, 32
# The default recipe's teacher tuning (recipes/minilm-rotten-tomatoes.yaml, stage 0), written
# out because the cached teacher is keyed by this text; tests/test_bench_setup.py pins it to
# the recipe.
TUNE = "{kind: finetune, epochs: 3, batch_size: 32, learning_rate: 5.0e-5, seed: 0}"


@dataclass
class Setup:
    """The tokenized training split, the teacher (frozen) and where it was saved."""

    train: object  # the task's tokenized training split
    collate: object
    teacher: torch.nn.Module
    teacher_dir: Path
    tokenizer: object
    max_length: int

    def loader(self, seed: int) -> DataLoader:
        """The shuffle order a stage with this seed trains on, from its first batch."""
        return make_loader(self.train, self.collate, BATCH, shuffle=True, seed=seed)


def flow(stage: dict) -> str:
    """A stage as a YAML flow mapping, for a `stages=[...]` override."""
    return yaml.safe_dump(stage, default_flow_style=True, sort_keys=False, width=10**6).strip()


def default_distill(**settings: object) -> str:
    """The default recipe's distill stage (recipes/minilm-rotten-tomatoes.yaml, stage 1) as a
    YAML flow mapping for a `stages=[...]` override, with `settings` added or replaced."""
    return flow(yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["stages"][1] | settings)


def train_split(overrides: list[str] = ()) -> tuple[Recipe, Checked, object]:
    """The recipe (with `overrides`), its pre-flight result and the tokenized training split,
    as a run reads them. The stages are replaced by one finetune stage first: it passes
    pre-flight with a base model (it trains the head)."""
    recipe = load_recipe(RECIPE, ["stages=[{kind: finetune}]", *overrides])
    checked = preflight(recipe)
    return recipe, checked, checked.task.tokenize(checked.data, "train", checked.tokenizer,
                                                  recipe.data)


def prepare(out: Path, overrides: list[str] = ()) -> Setup:
    """Load the data and teacher as the recipe's run does; save the teacher under `out`."""
    recipe, checked, train = train_split([f"teacher.model={TEACHER}", *overrides])
    task, tokenizer = checked.task, checked.tokenizer
    torch.manual_seed(0)
    teacher, _ = task.load_model(TEACHER, checked.data)
    teacher.eval().requires_grad_(False)
    teacher_dir = out / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    return Setup(train, task.collate(tokenizer), teacher, teacher_dir, tokenizer,
                 recipe.data.max_length)


def stage_seconds(stage: str, teacher: Path, out: Path, console: Console,
                  overrides: list[str] = ()) -> dict:
    """Run a one-stage recipe (`stage`: the stage as a YAML flow mapping) and return the
    stage's metrics.json (`train_seconds`, `steps`, `precision`, ...) plus `stage_seconds`,
    the whole stage's time (model loading, teacher cache, training, saving)."""
    recipe = load_recipe(RECIPE, [f"teacher.model={teacher}", f"stages=[{stage}]", *overrides])
    report = run_recipe(recipe, output=out, force=True, console=console)
    metrics = json.loads(next((out / "stages").glob("00-*/metrics.json")).read_text())
    return metrics | {"stage_seconds": report["stages"][0]["seconds"]}


def tuned_teacher(console: Console) -> Path:
    """MiniLM-L6 tuned on Rotten Tomatoes as the default recipe tunes it (a benchmark whose
    figure depends on accuracy needs a real teacher), run once and kept under the toolkit's
    cache (`$DISTILL_CACHE/bench/`, keyed by the stage and the data settings): its ~10 min are
    not what any figure measures. Returns the tuned model's folder."""
    recipe = load_recipe(RECIPE, [f"teacher.model={TEACHER}", f"stages=[{TUNE}]"])
    key = hashlib.sha256(f"{TEACHER} {TUNE} {recipe.data}".encode()).hexdigest()[:12]
    run = cache_root() / "bench" / f"minilm-rotten-tomatoes-teacher-{key}"
    model = run / "stages" / "00-finetune" / "model"
    report = run / "report.json"  # written when the stage ends (or fails)
    if not report.is_file() or json.loads(report.read_text())["stages"][0]["status"] != "done":
        run_recipe(recipe, output=run, force=True, console=console)
    return model
