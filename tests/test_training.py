"""The shared loop and stage wiring, through the Python API on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from distill import DistillError, recipe_from_dict, run_recipe
from distill.train.precision import bf16_is_faster


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


@pytest.mark.parametrize("setting", ["auto", False])
def test_bf16_auto_is_the_measured_choice(setting: object, tiny_bert: Path, tiny_csv: Path,
                                          tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 0.25, "bf16": setting}]
    run_tiny(tmp_path, recipe)
    metrics = json.loads((tmp_path / "run/stages/00-finetune/metrics.json").read_text())
    assert metrics["bf16"] is (bf16_is_faster("cpu") if setting == "auto" else False)


def test_bf16_is_measured_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe times one core (a busy neighbour on the others would skew an all-threads
    timing towards fp32), and the thread count is restored afterwards."""
    from distill.train import precision

    seen: list[int] = []

    def timed(bf16: bool, repeats: int = 3) -> float:
        seen.append(torch.get_num_threads())
        return 1.0 if bf16 else 2.0

    threads = torch.get_num_threads()
    monkeypatch.setattr(precision, "matmul_seconds", timed)
    precision.bf16_is_faster.cache_clear()
    try:
        assert precision.bf16_is_faster("cpu") is True
    finally:
        precision.bf16_is_faster.cache_clear()
    assert seen == [1, 1] and torch.get_num_threads() == threads


def test_bf16_setting_values() -> None:
    assert bf16_is_faster("meta") is False  # no measurement off CPU/CUDA
    assert isinstance(bf16_is_faster("cpu"), bool)
    hits = bf16_is_faster.cache_info().hits
    bf16_is_faster("cpu")
    assert bf16_is_faster.cache_info().hits == hits + 1  # measured once per process
    with pytest.raises(DistillError, match="stages.0.bf16: 'maybe' should be true/false or "
                                           "one of 'auto'"):
        recipe_from_dict({"teacher": {"model": "m"}, "data": {"dataset": "d.csv"},
                          "stages": [{"kind": "finetune", "bf16": "maybe"}]})


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
