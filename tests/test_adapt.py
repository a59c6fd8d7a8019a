"""The `adapt` stage and `distill attach`: a PEFT method on the run's student, new task/head.

Tiny BERT + tiny csv data; the adapter must be saved in PEFT's layout, reload to the same
predictions, and report trainable parameters, their share, test accuracy and seconds per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import peft_methods
from distill.cli import app
from distill.run.pipeline import run_recipe
from distill.config.loading import recipe_from_dict
from distill.errors import RecipeError
from conftest import tiny_recipe

runner = CliRunner()


def adapt_recipe(model: Path, data: Path, topics: Path, method: str = "full",
                 config: dict | None = None) -> dict:
    """finetune on reviews -> distill -> adapt (new 3-label topic task) -> evaluate."""
    recipe = tiny_recipe(model, data)
    recipe["stages"].insert(2, {
        "kind": "adapt", "method": method, "config": config or {}, "epochs": 10,
        "batch_size": 16, "learning_rate": 2e-3, "log_every": 2,
        "data": {"dataset": str(topics), "max_length": 16}})
    return recipe


def test_adapt_stage_trains_saves_and_reports(tiny_bert: Path, tiny_csv: Path,
                                             tiny_topics: Path, tmp_path: Path) -> None:
    recipe = recipe_from_dict(adapt_recipe(tiny_bert, tiny_csv, tiny_topics))
    report = run_recipe(recipe, output=tmp_path / "run")
    stage = report["stages"][2]
    assert stage["kind"] == "adapt" and stage["status"] == "done"
    assert stage["artifact"] == "stages/02-adapt/adapter"
    model = stage["model"]
    assert model["method"] == "full"
    assert model["trainable_params"] == model["params"]
    assert model["metric"]["name"] == "accuracy" and model["metric"]["split"] == "test"
    assert model["metric"]["value"] > 0.5  # 3 balanced classes: chance is 1/3
    assert model["seconds_per_step"] > 0
    adapter = tmp_path / "run" / stage["artifact"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "FULL" and config["task_type"] == "SEQ_CLS"
    # The evaluate stage measured the teacher and the student on the recipe's task only.
    evaluated = json.loads((tmp_path / "run/stages/03-evaluate/metrics.json").read_text())
    assert set(evaluated["models"]) == {"teacher", "01-distill"}
    # The adapter reloads onto its base (the distilled student) and predicts the same.
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run/stages/01-distill/model")
    assert base.config.num_labels == 2
    fresh = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run/stages/01-distill/model", num_labels=3, ignore_mismatched_sizes=True)
    loaded = peft_methods.load_adapter(fresh, adapter).eval()
    ids = torch.randint(5, 30, (3, 9))
    assert loaded(input_ids=ids).logits.shape == (3, 3)
    assert report["final"]["method"] == "full"


def test_adapt_recipe_errors_name_the_key(tiny_bert: Path, tiny_csv: Path,
                                          tiny_topics: Path) -> None:
    bad = adapt_recipe(tiny_bert, tiny_csv, tiny_topics, method="lorra")
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    assert "stages.2.method" in str(err.value) and "unknown PEFT method 'lorra'" in str(err.value)
    bad = adapt_recipe(tiny_bert, tiny_csv, tiny_topics, config={"rank": 4})
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    assert "stages.2.config" in str(err.value) and "'rank'" in str(err.value)


def test_attach_cli_lists_methods_and_rejects_bad_options(tiny_bert: Path) -> None:
    result = runner.invoke(app, ["attach", "--list"])
    assert result.exit_code == 0, result.output
    assert "full" in result.output
    result = runner.invoke(app, ["attach", str(tiny_bert), "--method", "nope"])
    assert result.exit_code == 2
    assert "unknown PEFT method 'nope'" in result.output
    result = runner.invoke(app, ["attach", str(tiny_bert), "-O", "r8"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_lora_adapter_from_a_run_loads_in_hugging_face_peft(tiny_bert: Path, tiny_csv: Path,
                                                            tiny_topics: Path,
                                                            tmp_path: Path) -> None:
    """The adapt stage's LoRA adapter is what PEFT reads: same predictions from
    `peft.PeftModel.from_pretrained` and from our `load_adapter` on the same student."""
    import peft
    from transformers import AutoModelForSequenceClassification

    raw = adapt_recipe(tiny_bert, tiny_csv, tiny_topics, method="lora",
                       config={"r": 4, "lora_alpha": 8})
    report = run_recipe(recipe_from_dict(raw), output=tmp_path / "run")
    stage = report["stages"][2]
    assert stage["model"]["method"] == "lora"
    # LoRA + the new head + the pooler: a small share of the model
    assert stage["model"]["trainable_params"] < 0.5 * stage["model"]["params"]
    student = tmp_path / "run/stages/01-distill/model"
    adapter = tmp_path / "run" / stage["artifact"]

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            student, num_labels=3, ignore_mismatched_sizes=True).eval()

    ids = torch.randint(5, 30, (4, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base(), adapter).eval()(
            input_ids=ids, attention_mask=mask).logits
        ours = peft_methods.load_adapter(base(), adapter).eval()(
            input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs)


def test_adalora_total_step_defaults_to_the_stage_steps(tiny_bert: Path, tiny_csv: Path,
                                                        tiny_topics: Path,
                                                        tmp_path: Path) -> None:
    raw = adapt_recipe(tiny_bert, tiny_csv, tiny_topics, method="adalora",
                       config={"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2})
    raw["stages"] = raw["stages"][:1] + raw["stages"][2:3]   # finetune -> adapt
    raw["stages"][1]["epochs"] = 2
    report = run_recipe(recipe_from_dict(raw), output=tmp_path / "run")
    adapter = tmp_path / "run" / report["stages"][1]["artifact"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    # 180 examples, 80 % train = 144 -> 9 batches of 16 per epoch, 2 epochs
    assert config["total_step"] == 18
    # the budget was spent: on average target_r triplets kept per layer
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert sum(kept) == 2 * len(kept)
