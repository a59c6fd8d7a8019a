"""The progressive `shrink` stage end to end on the tiny model: cut, heal, measure, per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import tiny_recipe
from distill import recipe_from_dict, run_recipe

SCHEDULE = [{"layers": 3}, {"layers": 2}, {"hidden": 16, "heads": 2}]


@pytest.fixture(scope="module")
def shrink_run(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, dict]:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [
        recipe["stages"][0],
        {"kind": "shrink", "start": "teacher", "depth_strategy": "importance",
         "calibration_examples": 32, "schedule": SCHEDULE,
         "heal": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "log_every": 2}},
        {"kind": "evaluate", "latency_runs": 2},
    ]
    out = tmp_path_factory.mktemp("shrink") / "run"
    return out, run_recipe(recipe_from_dict(recipe), output=out)


def test_every_step_is_saved_measured_and_reloadable(shrink_run: tuple[Path, dict]) -> None:
    run_dir, report = shrink_run
    stage = report["stages"][1]
    assert stage["kind"] == "shrink" and stage["status"] == "done"
    names = [s["name"] for s in stage["steps"]]
    assert names == ["0-layers3", "1-layers2", "2-hidden16-heads2"]
    params = [s["model"]["params"] for s in stage["steps"]]
    assert params == sorted(params, reverse=True) and params[0] < report["teacher"]["params"]
    for step in stage["steps"]:
        assert {"metric", "retention", "latency_ms", "size_mb"} <= set(step["model"])
        assert (run_dir / step["artifact"] / "model.safetensors").is_file()
    assert report["final"] == stage["steps"][-1]["model"] == stage["model"]
    last = AutoModelForSequenceClassification.from_pretrained(run_dir / stage["artifact"])
    assert (last.config.num_hidden_layers, last.config.hidden_size,
            last.config.num_attention_heads) == (2, 16, 2)
    x = torch.randint(5, 40, (2, 6))
    assert last(input_ids=x).logits.shape == (2, 2)


def test_step_metrics_record_the_cut_and_the_heal(shrink_run: tuple[Path, dict]) -> None:
    run_dir, _ = shrink_run
    metrics = json.loads((run_dir / "stages/01-shrink/metrics.json").read_text())
    steps = metrics["steps"]
    assert [s["layers"] for s in steps] == [3, 2, 2]
    assert len(steps[0]["kept_layers"]) == 3 and len(steps[1]["kept_layers"]) == 2
    # The default score `auto` is `loss` here: the stage's model has a classifier head.
    assert steps[0]["score"] == steps[1]["score"] == "loss" and "score" not in steps[2]
    # layers of the starting model that survive, composed across steps
    assert steps[1]["start_layers"] == [steps[0]["start_layers"][i]
                                        for i in steps[1]["kept_layers"]]
    assert steps[2]["start_layers"] == steps[1]["start_layers"]
    assert steps[2]["hidden_size"] == 16
    for s in steps:
        assert s["teacher_cache"]["kind"] == "logits" and s["steps"] > 0
        assert 0 <= s["validation_before_heal"] <= 1
        assert s["best_validation_accuracy"] >= s["validation_before_heal"] - 1e-9
    for s in steps:
        assert (run_dir / "stages/01-shrink/steps" / s["name"] / "log.jsonl").is_file()
    # the teacher's logits were computed once for the whole run (the run's teacher cache)
    assert len(list(run_dir.rglob("logits.safetensors"))) == 1
    assert (run_dir / "teacher_cache/logits.safetensors").is_file()


def test_report_lists_each_step(shrink_run: tuple[Path, dict]) -> None:
    run_dir, _ = shrink_run
    md = (run_dir / "report.md").read_text()
    for name in ("01-shrink/0-layers3", "01-shrink/1-layers2", "01-shrink/2-hidden16-heads2"):
        assert name in md
