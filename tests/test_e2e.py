"""End to end: `distill run` on a tiny model, the run directory and every key of report.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe
from distill.cli import app
from distill.config.loading import load_recipe

MODEL_KEYS = {"params", "params_non_embedding", "size_mb", "latency_ms", "metric", "retention"}
runner = CliRunner()


@pytest.fixture(scope="module")
def finished_run(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_bert, tiny_csv)))
    result = runner.invoke(app, ["run", str(recipe), "--output", str(root / "run")])
    assert result.exit_code == 0, result.output
    assert "01-distill" in result.output  # the results table was printed
    return root / "run"


def test_run_directory_layout(finished_run: Path) -> None:
    for rel in ["recipe.yaml", "report.json", "report.md", "tradeoff.png",
                "loss_00-finetune.png", "loss_01-distill.png",
                "stages/00-finetune/model/config.json",
                "stages/00-finetune/model/model.safetensors",
                "stages/00-finetune/metrics.json", "stages/00-finetune/log.jsonl",
                "stages/01-distill/model/model.safetensors",
                "stages/01-distill/model/tokenizer.json",
                "stages/01-distill/metrics.json", "stages/01-distill/log.jsonl",
                "stages/02-evaluate/metrics.json"]:
        assert (finished_run / rel).is_file(), rel
    assert not list(finished_run.rglob("*.tmp")), "temporary files left behind"
    lines = [json.loads(x) for x in
             (finished_run / "stages/01-distill/log.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert train and {"step", "epoch", "loss", "lr", "loss_ce", "loss_kd",
                      "loss_hidden"} <= set(train[0])
    assert [x["epoch"] for x in lines if x["type"] == "eval"] == [1, 2, 3, 4, 5, 6]


def test_report_json_schema_and_values(finished_run: Path) -> None:
    report = json.loads((finished_run / "report.json").read_text())
    assert report["recipe"] == "tiny"
    assert MODEL_KEYS <= set(report["teacher"])
    assert set(report["teacher"]["latency_ms"]) == {"batch1", "batch32"}
    assert report["teacher"]["metric"]["name"] == "accuracy"
    assert report["teacher"]["retention"] == 1.0
    stages = report["stages"]
    assert [(s["index"], s["kind"], s["status"]) for s in stages] == [
        (0, "finetune", "done"), (1, "distill", "done"), (2, "evaluate", "done")]
    for s in stages:
        assert {"index", "kind", "status", "seconds"} <= set(s) and s["seconds"] >= 0
    for s in stages[:2]:
        assert MODEL_KEYS <= set(s["model"])
        assert (finished_run / s["artifact"]).is_dir()
    student = stages[1]["model"]
    assert report["final"] == student
    assert student["params"] < report["teacher"]["params"]
    # The tiny task is learnable: both models must be far above chance (0.5).
    assert report["teacher"]["metric"]["value"] >= 0.8
    assert student["metric"]["value"] >= 0.75
    assert student["retention"] == pytest.approx(
        student["metric"]["value"] / report["teacher"]["metric"]["value"])
    metrics = json.loads((finished_run / "stages/01-distill/metrics.json").read_text())
    assert metrics["layers"] == [0, 2] and metrics["layer_map"] == [1, 3]
    assert metrics["teacher_cache"] is None  # hidden-state loss needs the live teacher


def test_resolved_recipe_reproduces_the_run(finished_run: Path) -> None:
    recipe = load_recipe(finished_run / "recipe.yaml")
    assert recipe.stages[1].student.layers == [0, 2]
    assert recipe.stages[1].loss.hidden_mse == 1.0 and recipe.stages[1].bf16 is False


def test_student_loads_without_the_toolkit(finished_run: Path) -> None:
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"d = {str(finished_run / 'stages/01-distill/model')!r}\n"
        "m = AutoModelForSequenceClassification.from_pretrained(d).eval()\n"
        "t = AutoTokenizer.from_pretrained(d)\n"
        "x = t(['good great film', 'bad awful plot'], return_tensors='pt', padding=True)\n"
        "print(m.config.num_hidden_layers, m.config.id2label, m(**x).logits.argmax(-1).tolist())\n"
        "assert not any(k.split('.')[0] in ('distill', 'peft_methods') for k in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2 {0: 'neg', 1: 'pos'} [1, 0]"


def test_existing_run_dir_is_not_overwritten(finished_run: Path) -> None:
    recipe = finished_run / "recipe.yaml"
    result = runner.invoke(app, ["run", str(recipe), "--output", str(finished_run)])
    assert result.exit_code == 2
    assert "already exists; pass --force" in result.output


def test_report_command_rerenders(finished_run: Path) -> None:
    (finished_run / "report.md").unlink()
    result = runner.invoke(app, ["report", str(finished_run)])
    assert result.exit_code == 0, result.output
    assert (finished_run / "report.md").is_file() and "teacher" in result.output


def test_eval_command_matches_the_report(finished_run: Path, tiny_csv: Path) -> None:
    report = json.loads((finished_run / "report.json").read_text())
    result = runner.invoke(app, ["eval", str(finished_run / "stages/01-distill/model"),
                                 "--data", str(tiny_csv), "--max-length", "16",
                                 "--no-latency"])
    assert result.exit_code == 0, result.output
    assert f"{report['final']['metric']['value']:.4f}" in result.output


def test_logit_only_kd_uses_the_teacher_cache(tiny_teacher: Path, tiny_csv: Path,
                                              tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_teacher, tiny_csv)
    recipe["stages"] = [recipe["stages"][1] | {"epochs": 1, "loss": {"alpha": 0.5}}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    stage = tmp_path / "run/stages/00-distill"
    assert (stage.parent.parent / "teacher_cache/logits.safetensors").is_file()
    assert json.loads((stage / "metrics.json").read_text())["teacher_cache"]["kind"] == "logits"
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert {"params", "size_mb"} <= set(report["final"])  # no evaluate stage: static metrics


def test_a_plain_run_prints_no_third_party_noise(tiny_bert: Path, tiny_csv: Path,
                                                 tmp_path: Path) -> None:
    """A fresh process, as a user starts it: accelerate imports DeepSpeed (installed with the
    dev tools) although this launch does not use it, and DeepSpeed's import used to warn
    "Setting accelerator to CPU" in every run."""
    import importlib.util

    assert importlib.util.find_spec("deepspeed") is not None, "the check needs DeepSpeed"
    recipe = tiny_recipe(tiny_bert, tiny_csv, stages=[
        {"kind": "finetune", "epochs": 1, "batch_size": 16},
        {"kind": "distill", "epochs": 1, "batch_size": 16, "student": {"layers": [0, 2]}},
        {"kind": "evaluate", "latency": False}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "distill", "run", str(tmp_path / "r.yaml"),
                          "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for noise in ("WARNING", "Warning", "Setting accelerator", "Writing model shards"):
        assert noise not in out.stdout + out.stderr, (noise, out.stdout + out.stderr)
    assert "01-distill" in out.stdout  # the run itself printed its table
