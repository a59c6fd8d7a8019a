"""Recipe validation: types, ranges, unknown keys with suggestions, overrides, round trip."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

import distill.config.recipe as recipe_mod
from distill.errors import DistillError, RecipeError
from distill.config.recipe import DistillStage, Recipe
from distill.config.loading import (apply_overrides, dump_recipe, load_recipe,
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


# ----------------------------------------------------------------------------- numbers
def load_text(tmp_path: Path, text: str, overrides: list[str] | None = None) -> Recipe:
    """`text` as a recipe file, loaded through the real YAML reader."""
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return load_recipe(path, overrides)


def yaml_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, text)
    return info.value.problems


STAGES_YAML = "stages:\n  - kind: finetune\n"


@pytest.mark.parametrize("value, shown", [(".nan", "nan"), (".NaN", "nan"), (".inf", "inf"),
                                          ("-.inf", "-inf"), ("nan", "nan"),
                                          ("1.0e400", "inf")])
def test_non_finite_floats_are_refused_with_the_range(tmp_path: Path, value: str,
                                                      shown: str) -> None:
    problems = yaml_problems(tmp_path, STAGES_YAML + f"    learning_rate: {value}\n")
    assert problems == [f"stages.0.learning_rate: {shown} is not a finite number; allowed: "
                        "a finite number > 0"]


@pytest.mark.parametrize("stage, key, allowed", [
    ("finetune", "epochs", "> 0"),
    ("finetune", "weight_decay", ">= 0"),
    ("finetune", "warmup_ratio", ">= 0 and <= 1"),
    ("finetune", "max_grad_norm", "> 0"),
    ("distill", "loss.alpha", ">= 0 and <= 1"),
    ("distill", "loss.temperature", "> 0"),
    ("distill", "loss.hidden_mse", ">= 0"),
    ("distill", "loss.attention_kl", ">= 0"),
    ("distill", "loss.cosine", ">= 0"),
    ("shrink", "heal.learning_rate", "> 0"),
    ("shrink", "heal.loss.alpha", ">= 0 and <= 1"),
    ("adapt", "learning_rate", "> 0"),
])
def test_every_float_setting_refuses_nan(tmp_path: Path, stage: str, key: str,
                                         allowed: str) -> None:
    *parents, last = key.split(".")
    body = "".join(f"{'  ' * i}    {p}:\n" for i, p in enumerate(parents))
    body += f"{'  ' * len(parents)}    {last}: .nan\n"
    extra = "    schedule: [{layers: 2}]\n" if stage == "shrink" else ""
    problems = yaml_problems(tmp_path, f"stages:\n  - kind: {stage}\n{extra}{body}")
    assert problems == [f"stages.0.{key}: nan is not a finite number; allowed: a finite "
                        f"number {allowed}"]


def test_float_keys_are_all_covered_by_the_nan_test() -> None:
    """Every float field of the recipe dataclasses has a range the NaN test above reads back;
    a new float field fails here until it gets one (and a row above)."""
    floats = sorted(f"{cls.__name__}.{f.name}" for cls in _recipe_classes()
                    for f in dataclasses.fields(cls)
                    if _holds(_hints(cls)[f.name], float) and not f.metadata.get("range"))
    assert floats == []


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _holds(tp: object, base: type) -> bool:
    """Whether type `tp` is `base` or holds it (`base | None`, `list[base]`); Literal values
    and bool (for int) do not count."""
    if tp is base:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return False
    return any(_holds(arg, base) for arg in typing.get_args(tp))


def _recipe_classes() -> list[type]:
    return [recipe_mod.ModelSpec, recipe_mod.DataConfig, recipe_mod.TrainArgs,
            recipe_mod.StudentSpec, recipe_mod.LossConfig, recipe_mod.FinetuneStage,
            recipe_mod.DistillStage, recipe_mod.EvaluateStage, recipe_mod.ShrinkStep,
            recipe_mod.HealConfig, recipe_mod.ShrinkStage, recipe_mod.AdaptStage,
            recipe_mod.Recipe]


def test_every_int_field_has_a_range() -> None:
    # StudentSpec.layers: teacher indices, checked by StudentSpec.check (>= 0, no repeats) and
    # against the teacher's depth by preflight.
    unchecked = sorted(f"{cls.__name__}.{f.name}" for cls in _recipe_classes()
                       for f in dataclasses.fields(cls)
                       if _holds(_hints(cls)[f.name], int) and not f.metadata.get("range"))
    assert unchecked == ["StudentSpec.layers"]


@pytest.mark.parametrize("patch, expected", [
    ({"seed": -1}, "seed: -1 is out of range; allowed: >= 0 and < 2**32"),
    ({"seed": 2**32}, "seed: 4294967296 is out of range; allowed: >= 0 and < 2**32"),
    ({"seed": True}, "seed: True should be an integer"),
    ({"data": {"split_seed": -3}}, "data.split_seed: -3 is out of range; allowed: >= 0 and "
                                   "< 2**32"),
    ({"stages": [{"kind": "finetune", "seed": 2**40}]},
     "stages.0.seed: 1099511627776 is out of range; allowed: >= 0 and < 2**32"),
    ({"stages": [{"kind": "finetune", "batch_size": True}]},
     "stages.0.batch_size: True should be an integer"),
    ({"stages": [{"kind": "finetune", "batch_size": 0}]},
     "stages.0.batch_size: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "finetune", "epochs": False}]},
     "stages.0.epochs: False should be a number"),
    ({"stages": [{"kind": "finetune", "checkpoint_every": 0}]},
     "stages.0.checkpoint_every: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "finetune", "grad_accum_steps": -2}]},
     "stages.0.grad_accum_steps: -2 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "evaluate", "latency_runs": 0}]},
     "stages.0.latency_runs: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "shrink", "schedule": [{"heads": 0}], "calibration_examples": 5}]},
     "stages.0.schedule.0.heads: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "shrink", "schedule": [{"layers": 2}], "calibration_examples": 0}]},
     "stages.0.calibration_examples: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "distill", "loss": {"layer_map": [0, -1]}}]},
     "stages.0.loss.layer_map: -1 is out of range; allowed: >= 0"),
    ({"data": {"max_train_examples": 0}},
     "data.max_train_examples: 0 is out of range; allowed: >= 1"),
    ({"stages": [{"kind": "adapt", "config": {"lora_dropout": float("nan")}}]},
     "stages.0.config.lora_dropout: nan is not a finite number; allowed: a finite number"),
    ({"stages": [{"kind": "adapt", "config": {"target_modules": [float("-inf")]}}]},
     "stages.0.config.target_modules.0: -inf is not a finite number; allowed: a finite number"),
])
def test_integer_ranges_and_booleans(patch: dict, expected: str) -> None:
    problems = problems_of({**BASE, **patch})
    assert expected in problems, problems


def test_largest_seed_is_accepted() -> None:
    r = recipe_from_dict({**BASE, "seed": 2**32 - 1, "data": {"split_seed": 0}})
    assert r.seed == 2**32 - 1


# ----------------------------------------------------------------------------- YAML
def yaml_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(DistillError) as info:
        load_text(tmp_path, text)
    assert not isinstance(info.value, RecipeError)  # the file, not its keys, is at fault
    return str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("name: a\nseed: 1\nname: b\n" + STAGES_YAML,
     "malformed YAML at line 3, column 1: duplicate key 'name' (first at line 1); a key may "
     "appear once in a mapping"),
    ("stages:\n  - kind: finetune\n    epochs: 1\n    epochs: 2\n",
     "malformed YAML at line 4, column 5: duplicate key 'epochs' (first at line 3)"),
    ("data: {dataset: a.csv, dataset: b.csv}\n" + STAGES_YAML,
     "malformed YAML at line 1, column 24: duplicate key 'dataset' (first at line 1)"),
    # YAML 1.1 reads both as the boolean true: one key written twice.
    ("teacher:\n  model: x\n  config: {yes: 1, true: 2}\n" + STAGES_YAML,
     "malformed YAML at line 3, column 20: duplicate key True (first at line 3)"),
    ("stages: &s\n  - kind: finetune\n  - *s\n",
     "malformed YAML at line 3, column 5: recursive alias *s: it is used inside the value it "
     "refers to (&s)"),
    ("name: &n {a: *n}\n", "malformed YAML at line 1, column 14: recursive alias *n"),
    ("name: " + "[" * 40 + "]" * 40 + "\n",
     # the root mapping is level 1, the 32nd "[" (column 38) level 33
     "malformed YAML at line 1, column 38: nested more than 32 levels deep; a recipe needs far "
     "fewer"),
    ("a: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 15 + "*a" + "]" * 15 + "\n",
     "malformed YAML at line 2, column 19: nested more than 32 levels deep through the alias *a"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
               for p, n in zip("abcde", "bcdef")),
     # e: 10 x d = 10 x 10 x c = ... = 111,111 values
     "malformed YAML at line 5, column 4: holds more than 100,000 values (an alias counts its "
     "whole value each time); a recipe needs far fewer"),
    ("name: !!str run\n" + STAGES_YAML,
     "malformed YAML at line 1, column 7: YAML tags are not allowed (a recipe is plain data): "
     "found !!str"),
    ("seed: !!binary aGVsbG8=\n", "YAML tags are not allowed (a recipe is plain data): found "
                                  "!!binary"),
    ("seed: " + "9" * 5000 + "\n",
     "malformed YAML at line 1, column 7: the integer has 5,000 digits; far more than any "
     "setting takes"),
])
def test_yaml_the_loader_refuses(tmp_path: Path, text: str, expected: str) -> None:
    message = yaml_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'r.yaml'}: "), message
    assert expected in message, message
    assert len(message.splitlines()) == 1


def test_yaml_aliases_and_merges_still_work(tmp_path: Path) -> None:
    r = load_text(tmp_path, "stages:\n  - &d {kind: finetune, epochs: 2, batch_size: 8}\n"
                            "  - {<<: *d, epochs: 5}\n  - *d\n")
    assert [s.epochs for s in r.stages] == [2.0, 5.0, 2.0]
    assert all(s.batch_size == 8 for s in r.stages)


def test_override_of_an_aliased_stage_changes_only_that_stage(tmp_path: Path) -> None:
    text = "stages:\n  - &d {kind: finetune, epochs: 2}\n  - *d\n"
    r = load_text(tmp_path, text, ["stages.1.epochs=7"])
    assert [s.epochs for s in r.stages] == [2.0, 7.0]
    # merged stages share their nested mappings too (the shipped adapters recipe)
    path = Path(__file__).parent.parent / "recipes" / "attach-adapters.yaml"
    r = load_recipe(path, ["stages.3.data.max_length=64"])
    lengths = [s.data.max_length for s in r.stages if getattr(s, "data", None)]
    assert lengths.count(64) == 1 and r.stages[3].data.max_length == 64


def test_dates_stay_text(tmp_path: Path) -> None:
    r = load_text(tmp_path, "name: 2024-05-01\ndescription: 2024-13-45\n" + STAGES_YAML)
    assert r.name == "2024-05-01" and r.description == "2024-13-45"


def test_recipe_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1") + STAGES_YAML.encode())
    with pytest.raises(DistillError, match=r"r\.yaml: not UTF-8 text \(invalid continuation "
                                           r"byte at byte 9\); save it as UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("override, expected", [
    ("data={dataset: a.csv, dataset: b.csv}",
     "--set data={dataset: a.csv, dataset: b.csv}: duplicate key 'dataset' (first at line 1); "
     "a key may appear once in a mapping"),
    ("name=!!python/object/apply:os.system [ls]",
     "--set name=!!python/object/apply:os.system [ls]: YAML tags are not allowed (a recipe is "
     "plain data): found !!python/object/apply:os.system"),
    ("stages.0.learning_rate=.nan",
     "stages.0.learning_rate: nan is not a finite number; allowed: a finite number > 0"),
    ("seed=true", "seed: True should be an integer"),
])
def test_set_overrides_use_the_same_loader(tmp_path: Path, override: str,
                                           expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, STAGES_YAML, [override])
    assert info.value.problems == [expected]
