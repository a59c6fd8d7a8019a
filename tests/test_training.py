"""The shared loop and stage wiring, through the Python API on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from distill import DistillError, recipe_from_dict, run_recipe
from distill.train.compiling import CompiledForward


def run_tiny(tmp_path: Path, recipe: dict, name: str = "run") -> dict:
    return run_recipe(recipe_from_dict(recipe), output=tmp_path / name)


def test_bf16_and_gradient_accumulation(tiny_bert: Path, tiny_csv: Path,
                                        tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 1, "bf16": True,
                                               "grad_accum_steps": 3, "log_every": 1}]
    run_tiny(tmp_path, recipe)
    metrics = json.loads((tmp_path / "run/stages/00-finetune/metrics.json").read_text())
    assert metrics["bf16"] is True  # forced, whatever the machine measures
    micro_batches = math.ceil(192 / 16)  # 192 training rows, batch 16
    assert metrics["steps"] == math.ceil(micro_batches / 3)
    lines = (tmp_path / "run/stages/00-finetune/log.jsonl").read_text().splitlines()
    train = [json.loads(x) for x in lines if '"train"' in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss"]) for x in train)


def test_fractional_epochs_and_warmup(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 0.5, "log_every": 1,
                                               "warmup_ratio": 0.5}]
    run_tiny(tmp_path, recipe)
    lines = [json.loads(x) for x in
             (tmp_path / "run/stages/00-finetune/log.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert len(train) == 6  # half of 12 batches
    lrs = [x["lr"] for x in train]
    assert lrs[:3] == sorted(lrs[:3]) and lrs[-1] < max(lrs)  # warm-up, then decay


def test_finetune_skipped_when_teacher_already_tuned(tiny_bert: Path, tiny_csv: Path,
                                                     tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 1}]
    run_tiny(tmp_path, recipe, "first")
    tuned = tmp_path / "first/stages/00-finetune/model"
    again = recipe | {"teacher": {"model": str(tuned)}}
    report = run_tiny(tmp_path, again, "second")
    assert report["stages"][0]["status"] == "skipped"
    assert "artifact" not in report["stages"][0]


def test_diverging_loss_stops_with_a_clear_error(tiny_bert: Path, tiny_csv: Path,
                                                 tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"learning_rate": 1e12, "warmup_ratio": 0.0,
                                               "max_grad_norm": None}]
    with pytest.raises(DistillError, match=r"the loss became (nan|inf).*lower learning_rate"):
        run_tiny(tmp_path, recipe)
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert report["stages"][0]["status"] == "failed"
    assert not (tmp_path / "run/stages/00-finetune/model").exists()


def test_hub_id_fails_clearly_offline(tiny_csv: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tiny_recipe(Path("distill-test/no-such-model"), tiny_csv)
    with pytest.raises(DistillError, match="could not load model 'distill-test/no-such-model'"):
        run_tiny(tmp_path, recipe)
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_compiled_forward_is_installed_for_training_and_taken_out_for_validation() -> None:
    layer = torch.nn.Linear(2, 2)
    compiled = CompiledForward(layer, enabled=True)  # compiles lazily: nothing runs here
    assert "forward" not in vars(layer)
    with compiled.active():
        assert layer.forward is compiled.compiled
        with compiled.paused():  # validation: the class's own forward
            assert "forward" not in vars(layer)
        assert layer.forward is compiled.compiled
    assert "forward" not in vars(layer)  # the model the stage saves and hands on is eager
    with CompiledForward(layer, enabled=False).active():
        assert "forward" not in vars(layer)


def test_compile_trains_what_eager_trains(tiny_bert: Path, tiny_csv: Path,
                                          tmp_path: Path) -> None:
    """`compile: true`: the training steps run a graph dynamo compiled, and the losses are
    eager training's up to the compiled kernels' rounding (dropout off: compiled code draws
    its masks from another generator)."""
    import shutil

    from torch._dynamo.utils import counters

    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model / "config.json").write_text(json.dumps(config))
    recipe = tiny_recipe(model, tiny_csv)
    losses = {}
    for compile in (False, True):
        counters.clear()
        stage = recipe["stages"][0] | {"epochs": 1, "log_every": 1, "compile": compile}
        run_tiny(tmp_path, recipe | {"stages": [stage]}, f"compile-{compile}")
        folder = tmp_path / f"compile-{compile}/stages/00-finetune"
        assert json.loads((folder / "metrics.json").read_text())["compile"] is compile
        assert (counters["stats"]["unique_graphs"] > 0) is compile
        losses[compile] = [json.loads(x)["loss"] for x in
                           (folder / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(losses[True]) == 12
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
