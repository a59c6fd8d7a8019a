"""A kill at any instant loses no finished work: a real two-stage run is killed just before
each of its file operations across the stages' ends (the last checkpoint, the model save, the
metrics, the report, the run state, the removal of checkpoints), resumed, and compared with a
run never interrupted: the same weights bit for bit, the same files, nothing left over.

The runs happen in `tests/kill_points.py`, a fresh interpreter that forks one child per run
(see there). A plain `make test` kills at every operation of the first stage's end (12 points
with the last stage's state and checkpoint removal); CI (`slow`) at every operation of the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe

DRIVER = Path(__file__).with_name("kill_points.py")
KILLED = 77
STAGES = ("00-finetune", "01-distill")


def two_stages(model: Path, data: Path) -> dict:
    """finetune -> distill, 4 steps each, a checkpoint after step 3 (the last step is not one:
    a kill after it retrains a step from the checkpoint)."""
    recipe = tiny_recipe(model, data)
    recipe["data"]["max_train_examples"] = 64
    recipe["stages"] = recipe["stages"][:2]
    for stage in recipe["stages"]:
        stage.update(epochs=1, checkpoint_every=3)
    return recipe


def drive(recipe: Path, work: Path, points: list[int]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(DRIVER), str(recipe), str(work),
                           *map(str, points)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


@pytest.fixture(scope="module")
def traced(tiny_bert: Path, tiny_csv: Path, tmp_path_factory) -> tuple[Path, list]:
    """The recipe file and the file operations of an uninterrupted run of it."""
    root = tmp_path_factory.mktemp("kill-points")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(two_stages(tiny_bert, tiny_csv)))
    assert drive(recipe, root / "trace", [])["reference"] == 0
    return recipe, json.loads((root / "trace" / "trace.json").read_text())


def stage_ends(trace: list[list[str]]) -> list[int]:
    """1-based indices of the operations from the first stage's last checkpoint to the next
    stage's first one, and the last stage's state and checkpoint removal."""
    model = next(i for i, (_, p) in enumerate(trace, 1)
                 if p.startswith(f"stages/{STAGES[0]}/.tmp-model"))
    nxt = next(i for i, (_, p) in enumerate(trace, 1) if p.startswith(f"stages/{STAGES[1]}/"))
    last_state = max(i for i, (_, p) in enumerate(trace, 1) if ".state.json" in p)
    return list(range(model - 2, nxt + 1)) + [last_state, last_state + 1]


def check(work: Path, results: dict, points: list[int]) -> None:
    reference = work / "reference" / "run"
    expected = {s: load_file(str(reference / "stages" / s / "model" / "model.safetensors"))
                for s in STAGES}
    report = json.loads((reference / "report.json").read_text())
    for n in points:
        run = work / f"kill-{n}" / "run"
        assert results[str(n)] == {"killed": KILLED, "resumed": 0}, (n, results[str(n)])
        for stage in STAGES:
            got = load_file(str(run / "stages" / stage / "model" / "model.safetensors"))
            assert got.keys() == expected[stage].keys()
            assert all(torch.equal(got[k], expected[stage][k]) for k in got), (n, stage)
        assert json.loads((run / "report.json").read_text())["final"] == report["final"], n
        assert files(run) == files(reference), (n, files(run) ^ files(reference))
        for stage in STAGES:  # each step logged once, however often the stage was resumed
            log = [json.loads(x) for x in (run / "stages" / stage / "log.jsonl").read_text()
                   .splitlines()]
            steps = [x["step"] for x in log if x["type"] == "train"]
            assert steps == sorted(set(steps)), (n, stage, steps)


def test_a_kill_at_a_stage_end_loses_nothing(traced, tmp_path: Path) -> None:
    recipe, trace = traced
    points = stage_ends(trace)
    assert len(points) == 12, points  # the operations this test means to cover exist
    check(tmp_path, drive(recipe, tmp_path, points), points)


@pytest.mark.slow
def test_a_kill_at_any_file_operation_loses_nothing(traced, tmp_path: Path) -> None:
    recipe, trace = traced
    # From 3: a kill before the marker and recipe.yaml exist has no work to lose (and no run
    # to resume: the same command starts it again).
    points = list(range(3, len(trace) + 1))
    check(tmp_path, drive(recipe, tmp_path, points), points)
