"""Weights that do not fit their config are an error naming them; only a task head may be new.

A head missing from the weights (a base encoder loaded as a classifier) or of another shape
(a classifier for other labels) is freshly initialised: fine for a `finetune` stage, which
trains it, but refused for a teacher that is distilled before any `finetune`, and flagged by
`distill eval`. Everything else missing, unexpected or reshaped stops the load.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import tiny_recipe
from distill.cli import app
from distill.errors import DistillError
from conftest import classifier
from distill.run.preflight import preflight
from distill.config.loading import recipe_from_dict

runner = CliRunner()
LABELS = ["neg", "pos"]
QUERY = "encoder.layer.0.attention.self.query.weight"
INTERMEDIATE = "encoder.layer.1.intermediate.dense.weight"


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]
                ) -> Path:
    """A copy of the model folder `src` whose safetensors weights `edit` changed in place."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _rename(state: dict[str, torch.Tensor]) -> None:
    state[QUERY.replace("query", "qquery")] = state.pop(QUERY)


def _reshape(state: dict[str, torch.Tensor]) -> None:
    state[INTERMEDIATE] = torch.zeros(5, 5)


def _drop_layers(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.startswith("encoder.layer.3.")]:
        del state[key]


def _drop_pooler(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.startswith("pooler.")]:
        del state[key]


@pytest.fixture(scope="module")
def models(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny base encoder edited in each way, and classifiers saved from it."""
    from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

    root = tmp_path_factory.mktemp("fit")
    out = {"base": tiny_bert,
           "renamed": edited_copy(tiny_bert, root / "renamed", _rename),
           "reshaped": edited_copy(tiny_bert, root / "reshaped", _reshape),
           "short": edited_copy(tiny_bert, root / "short", _drop_layers),
           "no_pooler": edited_copy(tiny_bert, root / "no-pooler", _drop_pooler)}
    config = BertConfig.from_pretrained(tiny_bert)
    for name, model in (("tuned", BertForSequenceClassification(config)),
                        ("pretraining", BertForPreTraining(config))):
        if name == "tuned":  # a head for the run's labels, as a finetune stage saves it
            model.config.id2label = dict(enumerate(LABELS))
            model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        shutil.copytree(tiny_bert, root / name)
        (root / name / "model.safetensors").unlink()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


# ----------------------------------------------------------------------------- fit
def test_a_renamed_tensor_is_an_error_naming_it(models: dict[str, Path]) -> None:
    with pytest.raises(DistillError, match="weights do not fit its config") as err:
        classifier(str(models["renamed"]), LABELS)
    assert f"missing bert.{QUERY}" in str(err.value)
    assert f"unexpected {QUERY.replace('query', 'qquery')}" in str(err.value)
    assert len(str(err.value).splitlines()) <= 2


def test_a_tensor_of_another_shape_is_an_error_naming_both_shapes(
        models: dict[str, Path]) -> None:
    with pytest.raises(DistillError) as err:
        classifier(str(models["reshaped"]), LABELS)
    assert (f"shape of bert.{INTERMEDIATE} is [5, 5] in the file but [64, 32] in the model"
            in str(err.value))


def test_many_mismatches_name_the_first_few_and_count_the_rest(
        models: dict[str, Path]) -> None:
    with pytest.raises(DistillError, match=r"missing bert\.encoder\.layer\.3\..*, and \d+ more"):
        classifier(str(models["short"]), LABELS)


@pytest.mark.parametrize("name", ["tuned", "pretraining", "no_pooler"])
def test_a_new_task_head_loads(models: dict[str, Path], name: str) -> None:
    """Only the head may be new: another task's head (masked-LM, next sentence) is left out,
    and a missing pooler (which only the classification head reads) is made with it."""
    model, trained = classifier(str(models[name]), LABELS)
    assert trained is (name == "tuned")
    assert model.config.num_labels == 2


def test_a_head_for_other_labels_is_replaced(models: dict[str, Path]) -> None:
    """A classifier for 2 labels, loaded for 3 (a finetune or adapt stage on another task):
    the head has another shape and is made afresh; the body loads."""
    body = load_file(str(models["tuned"] / "model.safetensors"))
    model, trained = classifier(str(models["tuned"]), ["a", "b", "c"])
    assert not trained and model.classifier.weight.shape == (3, 32)
    torch.testing.assert_close(model.state_dict()[f"bert.{QUERY}"], body[f"bert.{QUERY}"])


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_cli_commands_refuse_weights_that_do_not_fit(models: dict[str, Path], tiny_csv: Path,
                                                     command: str) -> None:
    args = [command, str(models["reshaped"])]
    if command == "eval":
        args += ["--data", str(tiny_csv), "--max-length", "16", "--no-latency"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "weights do not fit its config" in result.stderr
    assert "[5, 5] in the file" in result.stderr and "Traceback" not in result.output


def test_a_run_whose_teacher_does_not_fit_fails_naming_it(models: dict[str, Path],
                                                          tiny_csv: Path, tmp_path: Path
                                                          ) -> None:
    recipe = tiny_recipe(models["renamed"], tiny_csv)
    recipe["stages"] = [{"kind": "finetune", "epochs": 0.2, "keep_best": False}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "r.yaml"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"missing bert.{QUERY}" in result.stderr


# ----------------------------------------------------------------------------- untrained head
def _recipe(model: Path, data: Path, *stages: dict) -> dict:
    return tiny_recipe(model, data, stages=list(stages))


DISTILL = {"kind": "distill", "epochs": 1, "student": {"layers": [0, 2]}}
SHRINK = {"kind": "shrink", "start": "teacher", "schedule": [{"layers": 2}]}


@pytest.mark.parametrize("stages, refused_at", [
    ([DISTILL], 0),
    ([{"kind": "evaluate"}, SHRINK], 1),
    ([DISTILL | {"loss": {"alpha": 1.0}}], None),  # hard labels only: the head is not taught
    ([{"kind": "finetune"}, DISTILL, SHRINK], None),  # the finetune stage trains the head
])
def test_a_base_model_is_refused_as_a_teacher_before_finetune(
        models: dict[str, Path], tiny_csv: Path, stages: list[dict],
        refused_at: int | None) -> None:
    recipe = recipe_from_dict(_recipe(models["base"], tiny_csv, *stages))
    if refused_at is None:
        preflight(recipe)
        return
    with pytest.raises(DistillError) as err:
        preflight(recipe)
    message = str(err.value)
    assert f"stages.{refused_at}: the teacher {models['base']} has no trained classification " \
           "head" in message
    assert "add a `finetune` stage before it" in message


def test_a_tuned_teacher_is_distilled_without_finetune(models: dict[str, Path],
                                                       tiny_csv: Path) -> None:
    preflight(recipe_from_dict(_recipe(models["tuned"], tiny_csv, DISTILL, SHRINK)))


def test_the_cli_refuses_an_untrained_teacher_before_any_work(models: dict[str, Path],
                                                              tiny_csv: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(models["base"], tiny_csv, DISTILL)))
    result = runner.invoke(app, ["run", str(tmp_path / "r.yaml"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "has no trained classification head" in result.stderr
    assert "add a `finetune` stage" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, warned", [("base", True), ("tuned", False)])
def test_eval_warns_about_an_untrained_head(models: dict[str, Path], tiny_csv: Path,
                                            name: str, warned: bool) -> None:
    result = runner.invoke(app, ["eval", str(models[name]), "--data", str(tiny_csv),
                                 "--max-length", "16", "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    line = "has no trained classification head"
    assert (line in result.output) is warned, result.output


def test_a_runs_evaluate_stage_warns_about_an_untrained_teacher(
        models: dict[str, Path], tiny_csv: Path, tmp_path: Path) -> None:
    """A recipe that only evaluates a base model runs (exit code 0), with the warning."""
    recipe = _recipe(models["base"], tiny_csv, {"kind": "evaluate", "latency": False})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "r.yaml"),
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output[-3000:]
    assert "has no trained classification head" in result.output
