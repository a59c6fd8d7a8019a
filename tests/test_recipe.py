"""Recipe validation: types, ranges, unknown keys with suggestions, overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError, RecipeError
from distill.recipe import (DistillStage, Recipe, apply_overrides, dump_recipe, load_recipe,
                            recipe_from_dict)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
BASE = {"name": "t", "stages": [{"kind": "finetune"}, {"kind": "distill",
                                                      "student": {"layers": [0, 2]}},
                               {"kind": "evaluate"}]}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.stages and recipe.description


def test_defaults_fill_in() -> None:
    r = recipe_from_dict(BASE)
    assert isinstance(r, Recipe) and isinstance(r.stages[1], DistillStage)
    assert r.stages[1].loss.alpha == 0.5 and r.stages[1].loss.temperature == 2.0
    assert r.teacher.model == "builtin:minilm-l6" and r.teacher.trust_remote_code is False


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return info.value.problems


@pytest.mark.parametrize("patch, expected", [
    ({"nmae": "x"}, "nmae: unknown key; did you mean `name`?"),
    ({"data": {"max_lenght": 32}}, "data.max_lenght: unknown key; did you mean `max_length`?"),
    ({"teacher": {"modle": "x"}}, "teacher.modle: unknown key; did you mean `model`?"),
    ({"seed": "zero"}, "seed: 'zero' should be an integer"),
    ({"seed": 1.5}, "seed: 1.5 should be an integer"),
    ({"data": {"max_length": 2}}, "data.max_length: 2 is out of range; allowed: >= 8"),
    ({"data": "rotten"}, "data: 'rotten' should be a mapping"),
    ({"teacher": {"trust_remote_code": "yes"}}, "teacher.trust_remote_code: 'yes' should be "
                                                "true/false"),
    ({"teacher": {"task": "regression"}}, "teacher.task: 'regression' is not allowed; allowed: "
                                          "'sequence-classification'"),
    ({"stages": []}, "stages: the recipe has no stages"),
    ({"stages": "finetune"}, "stages: should be a list of stages"),
    ({"stages": [{"epochs": 1}]}, "stages.0: each stage needs a `kind`"),
    ({"stages": [{"kind": "distil"}]}, "stages.0.kind: unknown stage kind 'distil'; did you "
                                       "mean 'distill'?"),
    ({"stages": [{"kind": "finetune", "epochs": 0}]}, "stages.0.epochs: 0.0 is out of range; "
                                                      "allowed: > 0"),
    ({"stages": [{"kind": "finetune", "lr": 1e-4}]}, "stages.0.lr: unknown key"),
    ({"stages": [{"kind": "distill", "loss": {"alpha": 1.5}}]},
     "stages.0.loss.alpha: 1.5 is out of range; allowed: >= 0 and <= 1"),
    ({"stages": [{"kind": "distill", "loss": {"temperature": 0}}]},
     "stages.0.loss.temperature: 0.0 is out of range; allowed: > 0"),
    ({"stages": [{"kind": "distill", "student": {"layers": [0, 0]}}]},
     "stages.0.student.layers: [0, 0] repeats a layer"),
    ({"stages": [{"kind": "distill", "student": {"layers": [-1]}}]},
     "stages.0.student.layers: [-1] has negative indices"),
    ({"stages": [{"kind": "distill", "student": {"layers": [0], "num_layers": 2}}]},
     "stages.0.student: set either `layers` or `num_layers`, not both"),
    ({"stages": [{"kind": "distill", "student": {"layers": "0,2"}}]},
     "stages.0.student.layers: '0,2' should be a list of an integer"),
    ({"stages": [{"kind": "evaluate", "split": "train"}]},
     "stages.0.split: 'train' is not allowed; allowed: 'test', 'validation'"),
    ({"name": "../escape"}, "name: '../escape' must be a plain folder name"),
])
def test_bad_recipes_name_key_value_and_allowed(patch: dict, expected: str) -> None:
    problems = problems_of({**BASE, **patch})
    assert any(expected in p for p in problems), problems


def test_all_problems_reported_at_once() -> None:
    data = {"nme": "x", "seed": "a", "data": {"max_lenght": 3},
            "stages": [{"kind": "distil"}, {"kind": "distill", "epochs": "many",
                                            "loss": {"alpha": 2}}]}
    problems = problems_of(data)
    assert len(problems) == 6, problems
    message = str(RecipeError(problems))
    assert "6 problems" in message


def test_float_written_as_2e_minus_5_is_a_number() -> None:
    r = recipe_from_dict({**BASE, "stages": [{"kind": "finetune", "learning_rate": "2e-5"}]})
    assert r.stages[0].learning_rate == 2e-5


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = load_recipe(path, ["stages.1.loss.alpha=0.9", "stages.1.student.layers=[1, 3]",
                           "data.dataset=/tmp/x.csv", "seed=7"])
    assert r.stages[1].loss.alpha == 0.9 and r.stages[1].student.layers == [1, 3]
    assert r.data.dataset == "/tmp/x.csv" and r.seed == 7
    with pytest.raises(RecipeError, match="stages.1.loss.alpah: unknown key; did you mean"):
        load_recipe(path, ["stages.1.loss.alpah=0.9"])
    with pytest.raises(RecipeError, match="stages.9: no such list index; the list has 3 items"):
        load_recipe(path, ["stages.9.epochs=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(BASE, ["seed"])


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n  - kind: finetune\n")
    with pytest.raises(DistillError, match="malformed YAML at line"):
        load_recipe(bad)
    with pytest.raises(DistillError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="should be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_yaml_tags_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\nstages: []\n")
    with pytest.raises(DistillError, match="malformed YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = recipe_from_dict(BASE)
    dump_recipe(r, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == r
