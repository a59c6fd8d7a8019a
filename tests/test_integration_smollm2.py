"""Integration: the shipped SmolLM2 recipe, every stage, on the real SmolLM2-135M and the real
packaged corpora, cut down to a few blocks so that it runs in CI (the full recipe's numbers
come from `bench/smollm2_recipe.py`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distill import load_recipe, run_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-shakespeare.yaml"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_smollm2_recipe_slice(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPE, [
        "data.max_length=32", "data.max_train_examples=8", "data.teacher_samples=8",
        "data.max_eval_examples=4",
        "stages.0.calibration_examples=4",
        "stages.1.data.max_length=48", "stages.1.data.max_train_examples=16",
        "stages.1.data.max_eval_examples=8",
        "stages.2.eval_data.0.max_length=32", "stages.2.eval_data.0.max_eval_examples=4",
        "stages.2.latency=false"])
    report = run_recipe(recipe, output=tmp_path / "run")
    shrink, adapt, evaluate = report["stages"]
    steps = [json.loads(p.read_text()) for p in
             sorted((tmp_path / "run" / "stages" / "00-shrink" / "steps").glob("*/step.json"))]
    assert [s["layers"] for s in steps] == [24, 20]
    # The second cut keeps 20 of the 24 survivors: teacher layers, named in the teacher's terms.
    assert set(steps[1]["start_layers"]) < set(steps[0]["start_layers"])
    assert all(s["teacher_cache"]["kind"] == "top-k" and s["teacher_cache"]["k"] == 64
               for s in steps)
    assert adapt["model"]["method"] == "lora" and adapt["model"]["trainable_params"] > 0
    for model in [report["teacher"], *(s["model"] for s in shrink["steps"])]:
        assert math.isfinite(model["metric"]["value"]) and model["metric"]["value"] > 1
        [bbc] = model["eval_data"]
        assert bbc["dataset"] == "builtin:bbc_news" and math.isfinite(bbc["perplexity"])
    assert evaluate["status"] == "done"
    assert "perplexity on bbc_news" in (tmp_path / "run" / "report.md").read_text()
