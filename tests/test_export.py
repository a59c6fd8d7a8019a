"""Exporting for serving: every format read back by the library that serves it (transformers,
ONNX Runtime), not by our own loader, and compared with the float32 model; the export stage's
checks and report; the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from conftest import tiny_recipe, write_few_words
from distill import export, load_recipe, recipe_from_dict, run_recipe
from distill.cli import app
from distill.config.loading import recipe_to_dict
from distill.config.recipe import DataConfig
from distill.serve import formats


def _inputs(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 35, (batch, length), generator=g)  # the tiny vocabularies: 40+
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _ort_logits(folder: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The artifact run by a plain ONNX Runtime session (the oracle, not distill's wrapper)."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


@pytest.fixture(scope="module")
def classifier(tiny_teacher: Path) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8"])
def test_onnx_formats_run_in_onnx_runtime_at_any_shape(fmt: str, classifier, tiny_teacher: Path,
                                                       tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    out = formats.write(fmt, classifier, tokenizer, tmp_path / fmt, _inputs(2, 8))
    # Self-contained: the server needs the config and tokenizer beside the graph.
    assert {"config.json", "model.onnx", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    onnx.checker.check_model(str(out / "model.onnx"))
    # Another batch and sequence size than the traced example: the axes are free.
    inputs = _inputs(3, 11, seed=1)
    with torch.no_grad():
        want = classifier(**inputs).logits.numpy()
    got = _ort_logits(out, inputs)
    assert got.shape == want.shape
    if fmt == "onnx":
        assert np.abs(got - want).max() < 1e-4
    else:  # int8 weights: close, not equal; and the matrices are stored as int8
        assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 0.05
        graph = onnx.load(str(out / "model.onnx")).graph
        int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(int8) >= 4 * 4  # Q, K, V, O (and the MLP) of each of the 4 layers
        # One scale per output channel of each quantized matrix (not one per matrix).
        scales = {t.name: t for t in graph.initializer if t.name.endswith("_scale")}
        weights = [scales[t.name.removesuffix("_quantized") + "_scale"] for t in int8
                   if t.name.endswith("_quantized")]
        assert weights and all(s.dims and s.dims[0] > 1 for s in weights)
    assert not list(out.glob("fp32-*"))  # the float graph quantized from is gone


def test_bf16_loads_with_transformers_in_bfloat16(classifier, tiny_teacher: Path,
                                                  tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    out = formats.write("bf16", classifier, tokenizer, tmp_path / "bf16", _inputs(2, 8))
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert next(classifier.parameters()).dtype == torch.float32  # the source is untouched
    inputs = _inputs(2, 8)
    with torch.no_grad():
        want = classifier(**inputs).logits
        got = loaded(**inputs).logits.float()
    assert torch.allclose(got, want, atol=0.05, rtol=0.05)  # bf16 keeps ~3 digits


def test_a_causal_lm_exports_to_onnx(tmp_path: Path) -> None:
    from test_lm_recipes import write_tiny_lm

    path = write_tiny_lm(tmp_path / "lm", "llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = formats.write("onnx", model, AutoTokenizer.from_pretrained(path), tmp_path / "onnx",
                        _inputs(2, 8))
    inputs = _inputs(2, 5, seed=2)
    inputs["attention_mask"][:] = 1
    with torch.no_grad():
        want = model(**inputs).logits.numpy()
    assert np.abs(_ort_logits(out, inputs) - want).max() < 1e-4


def test_the_export_stage_checks_and_times_every_artifact(tiny_bert: Path, tiny_csv: Path,
                                                          tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 2},
                        {"kind": "export", "latency_runs": 2}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    rows = report["stages"][1]["exports"]
    assert list(rows) == ["fp32", "bf16", "onnx", "onnx-int8"]
    fp32 = rows["fp32"]
    assert fp32["max_logit_diff"] == 0.0 and fp32["agreement"] == 1.0
    assert rows["onnx"]["max_logit_diff"] < 1e-4 and rows["onnx"]["agreement"] == 1.0
    assert rows["onnx"]["metric"]["value"] == fp32["metric"]["value"]
    for name in ("bf16", "onnx-int8"):
        assert 0 < rows[name]["max_logit_diff"] < 1.0 and rows[name]["agreement"] > 0.9
    for row in rows.values():
        assert set(row["latency_ms"]) == {"batch1", "batch32"} and row["size_mb"] > 0
    assert rows["bf16"]["size_mb"] < 0.6 * fp32["size_mb"]
    assert rows["onnx-int8"]["size_mb"] < 0.8 * rows["onnx"]["size_mb"]  # tiny: norms weigh
    stage = tmp_path / "run/stages/01-export"
    assert json.loads((stage / "metrics.json").read_text())["exports"] == rows
    assert (stage / "onnx-int8/model.onnx").is_file()
    # The exported student is no model of the run: nothing after it starts from it.
    assert rows["bf16"]["artifact"] == "stages/01-export/bf16"


def test_the_python_api_and_the_cli(tiny_teacher: Path, tiny_csv: Path, tmp_path: Path) -> None:
    data = DataConfig(dataset=str(tiny_csv), max_length=16)
    got = export(str(tiny_teacher), data, ["onnx"], output=tmp_path / "api", latency=False)
    assert list(got["exports"]) == ["fp32", "onnx"]
    assert "latency_ms" not in got["exports"]["onnx"]
    result = CliRunner().invoke(app, ["export", str(tiny_teacher), "--format", "onnx-int8",
                                      "--data", str(tiny_csv), "--max-length", "16",
                                      "--split", "validation", "--batch-size", "3",
                                      "--no-latency", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "onnx-int8" in result.output and "agreement" in result.output
    assert (tmp_path / "cli/stages/00-export/onnx-int8/model.onnx").is_file()
    stage = yaml.safe_load((tmp_path / "cli/recipe.yaml").read_text())["stages"][0]
    assert (stage["split"], stage["batch_size"]) == ("validation", 3)
    rows = json.loads((tmp_path / "cli/stages/00-export/metrics.json").read_text())["exports"]
    assert rows["onnx-int8"]["metric"]["split"] == "validation"


def test_missing_onnx_packages_are_named_before_anything_runs(
        tiny_teacher: Path, tiny_csv: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    result = CliRunner().invoke(app, ["export", str(tiny_teacher), "--format", "onnx",
                                      "--data", str(tiny_csv), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "need onnxruntime (not installed)" in result.output
    assert "pip install 'distill[serve]'" in result.output
    assert not (tmp_path / "x").exists()


def test_the_serving_recipe_runs_end_to_end(tiny_bert: Path, tiny_csv: Path,
                                            tmp_path: Path) -> None:
    """recipes/minilm-serving.yaml's stages, in its order and with its settings, on the tiny
    model (shortened; sizes and learning rate scaled to the tiny model): distill a depth cut,
    narrow its MLPs with a heal, export the trimmed int8 graph that a plain ONNX Runtime
    session serves, predicting as the float32 student does."""
    shipped = recipe_to_dict(load_recipe(Path(__file__).parent.parent
                                         / "recipes/minilm-serving.yaml"))
    assert [s["kind"] for s in shipped["stages"]] == ["finetune", "distill", "shrink", "export"]
    tune, distill, shrink, export_stage = shipped["stages"]
    short = {"epochs": 2, "bf16": False, "batch_size": 16, "learning_rate": 2e-3}
    data = write_few_words(tiny_csv, tmp_path / "few-words.csv", reviews=4, repeats=20)
    recipe = tiny_recipe(tiny_bert, data)
    recipe["stages"] = [
        tune | short, distill | short | {"student": {"layers": [0, 2]}},
        shrink | {"schedule": [{"intermediate": 40}], "calibration_examples": 16,
                  "heal": shrink["heal"] | short},
        export_stage | {"latency": False}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    assert [s["status"] for s in report["stages"]] == ["done"] * 4
    student = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run" / report["stages"][2]["artifact"])
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 40
    served = tmp_path / "run/stages/03-export/onnx-int8"
    record = json.loads((tmp_path / "run/stages/03-export/metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(served)
    assert record["vocabulary"]["kept_tokens"] == len(tokenizer) < record["vocabulary"]["of"]
    assert record["exports"]["onnx-int8"]["agreement"] >= 0.9
    with data.open(newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:4]

    def encode(tok) -> dict[str, torch.Tensor]:  # the graph's inputs, each model's own ids
        encoded = tok(texts, padding=True, return_tensors="pt")
        return {k: encoded[k] for k in ("input_ids", "attention_mask")}

    trimmed, full = encode(tokenizer), encode(AutoTokenizer.from_pretrained(tiny_bert))
    assert not torch.equal(trimmed["input_ids"], full["input_ids"])  # renumbered
    logits = _ort_logits(served, trimmed)
    with torch.no_grad():
        fp32 = student(**full).logits.numpy()
    spread = np.ptp(fp32[:, 1] - fp32[:, 0])  # how much the inputs move the prediction
    assert logits.shape == (4, 2) and np.abs(logits - fp32).max() < 0.1 * spread
