"""The frozen teacher's `teacher.dtype` / `device_map` / `offload_folder` recipe keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from distill import DistillError, recipe_from_dict, run_recipe
from distill.run.context import RunContext
from distill.data.tables import load_task_data
from distill.errors import RecipeError
from distill.tasks import get_task
from distill.models.loading import load_tokenizer, teacher_load_options
from distill.stages.training import load_frozen_teacher, student_source
from distill.train.loop import make_accelerator


def context(model: Path, data: Path, **teacher: object) -> RunContext:
    recipe = recipe_from_dict(tiny_recipe(model, data) | {"teacher": {"model": str(model),
                                                                      **teacher}})
    return RunContext(recipe=recipe, run_dir=Path("."), data=load_task_data(recipe.data),
                      tokenizer=load_tokenizer(str(model)), accelerator=make_accelerator(),
                      teacher_source=str(model), task=get_task("sequence-classification"))


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_recipe_keys_are_validated(tiny_bert: Path, tiny_csv: Path) -> None:
    ok = recipe_from_dict(tiny_recipe(tiny_bert, tiny_csv) | {
        "teacher": {"model": str(tiny_bert), "dtype": "bfloat16", "device_map": "auto",
                    "offload_folder": "/tmp/offload"}})
    assert ok.teacher.dtype == "bfloat16" and ok.teacher.device_map == "auto"
    with pytest.raises(RecipeError, match=r"teacher\.offload_folder: needs `device_map`"):
        recipe_from_dict(tiny_recipe(tiny_bert, tiny_csv) | {
            "teacher": {"model": str(tiny_bert), "offload_folder": "/tmp/offload"}})
    with pytest.raises(RecipeError, match=r"teacher\.dtype.*'bfloat16'"):
        recipe_from_dict(tiny_recipe(tiny_bert, tiny_csv) | {
            "teacher": {"model": str(tiny_bert), "dtype": "int8"}})


def test_load_options() -> None:
    assert teacher_load_options(None, None, None) == {}
    assert teacher_load_options("bfloat16", "auto", "/o", {"0": "10GiB", "cpu": "1GiB"}) == {
        "dtype": torch.bfloat16, "device_map": "auto", "offload_folder": "/o",
        "max_memory": {0: "10GiB", "cpu": "1GiB"}}


def test_bfloat16_teacher_halves_its_memory_and_the_student_stays_float32(
        tiny_bert: Path, tiny_csv: Path) -> None:
    full = load_frozen_teacher(context(tiny_bert, tiny_csv))
    ctx = context(tiny_bert, tiny_csv, dtype="bfloat16")
    half = load_frozen_teacher(ctx)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert param_bytes(half) * 2 == param_bytes(full)
    assert not any(p.requires_grad for p in half.parameters()) and not half.training
    # The student is cut from a float32 copy, not from the bf16 teacher.
    assert {p.dtype for p in student_source(ctx, half).parameters()} == {torch.float32}
    ids = ctx.tokenizer(["good great film", "bad awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = full(**ids).logits, half(**ids).logits.float()
    assert torch.allclose(a, b, atol=0.05), (a, b)  # bf16 keeps ~3 significant digits


def test_distill_stage_with_a_bfloat16_teacher(tiny_teacher: Path, tiny_csv: Path,
                                               tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_teacher, tiny_csv)
    recipe["teacher"] |= {"dtype": "bfloat16"}
    distill = recipe["stages"][1] | {"epochs": 1}  # hidden-state MSE: the live bf16 teacher
    recipe["stages"] = [distill, dict(distill, loss={"alpha": 0.5})]  # then: cached logits
    run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    for stage in ("00-distill", "01-distill"):
        weights = load_file(str(tmp_path / f"run/stages/{stage}/model/model.safetensors"))
        assert {t.dtype for t in weights.values()} == {torch.float32}, stage
    logits = load_file(str(tmp_path / "run/teacher_cache/logits.safetensors"))
    assert logits["logits"].dtype == torch.float32 and torch.isfinite(logits["logits"]).all()
    metrics = json.loads((tmp_path / "run/stages/01-distill/metrics.json").read_text())
    assert metrics["teacher_cache"]["kind"] == "logits" and metrics["steps"] > 0


def test_device_map_offloads_layers_to_disk(tiny_bert: Path, tiny_csv: Path,
                                            tmp_path: Path) -> None:
    tuned = tmp_path / "tuned"  # a teacher with its task head (what distill stages get)
    head = load_frozen_teacher(context(tiny_bert, tiny_csv))
    head.save_pretrained(tuned)
    ctx = context(tiny_bert, tiny_csv)  # for the tokenizer
    ids = ctx.tokenizer(["good great film", "bad awful plot"], return_tensors="pt", padding=True)
    ctx = context(tuned, tiny_csv, device_map="auto", max_memory={"cpu": "60KB"},
                  offload_folder=str(tmp_path / "offload"))
    teacher = load_frozen_teacher(ctx)
    # accelerate's big-model dispatch: what does not fit in 60 KB of RAM stays on disk.
    assert "disk" in set(teacher.hf_device_map.values()), teacher.hf_device_map
    with torch.no_grad():
        assert torch.equal(teacher(**ids).logits, head(**ids).logits)


def test_device_map_is_refused_with_several_processes(tiny_bert: Path, tiny_csv: Path) -> None:
    ctx = context(tiny_bert, tiny_csv, device_map="auto")
    ctx = dataclasses.replace(ctx, accelerator=SimpleNamespace(num_processes=2,
                                                               is_main_process=True))
    with pytest.raises(DistillError, match="teacher.device_map.*2 processes.*teacher.dtype"):
        load_frozen_teacher(ctx)
