"""CLI behaviour: help, listing, inspection, and user errors (exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe
from distill.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "validate", "recipes", "inspect", "eval", "report"):
        assert command in result.output


def test_recipes_lists_the_shipped_ones() -> None:
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "minilm-rotten-tomatoes" in result.output


def test_validate_shipped_recipe_by_name() -> None:
    result = runner.invoke(app, ["validate", "minilm-rotten-tomatoes"])
    assert result.exit_code == 0 and "finetune -> distill -> evaluate" in result.output


def test_inspect_tiny_model(tiny_bert: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tiny_bert)])
    assert result.exit_code == 0, result.output
    assert "num_hidden_layers" not in result.output and "layers" in result.output
    assert "bert" in result.output


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_bad_recipe_exit_2_all_problems_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "stages": [
        {"kind": "distill", "loss": {"alpah": 0.5, "temperature": -1}}]}))
    out = run_cli("validate", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    assert "stages.0.loss.alpah: unknown key; did you mean `alpha`?" in out.stderr
    assert "stages.0.loss.temperature: -1.0 is out of range" in out.stderr


def test_user_errors_exit_2_without_traceback(tiny_bert: Path, tiny_csv: Path,
                                              tmp_path: Path) -> None:
    cases = {
        "missing data file": ({"data": {"dataset": str(tmp_path / "nope.csv")}}, "nope.csv"),
        "missing column": ({"data": {"dataset": str(tiny_csv), "text_column": "review"}},
                           "review"),
        "missing model": ({"teacher": {"model": str(tmp_path / "no-model")}}, "not found"),
        "layer out of range": ({"stages": [{"kind": "distill", "student": {"layers": [0, 9]}}]},
                               "out of range; the teacher has 4 layers"),
    }
    for name, (patch, needle) in cases.items():
        recipe = tiny_recipe(tiny_bert, tiny_csv)
        for key, value in patch.items():
            recipe[key] = recipe[key] | value if isinstance(value, dict) else value
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = run_cli("run", str(path), "--output", str(tmp_path / "runs" / path.stem))
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (name, out.stderr[-2000:])
        assert needle in out.stderr, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) <= 3, (name, out.stderr)
        # every one of these is caught before any work: no run directory is created
        assert not (tmp_path / "runs" / path.stem).exists(), name


def test_unknown_recipe_name() -> None:
    result = runner.invoke(app, ["run", "no-such-recipe"])
    assert result.exit_code == 2 and "recipe not found" in result.output


def test_shrink_command_cuts_depth_and_width(tiny_bert: Path, tiny_csv: Path,
                                             tmp_path: Path) -> None:
    from transformers import AutoModel

    result = runner.invoke(app, ["shrink", str(tiny_bert), "--out", str(tmp_path / "a"),
                                 "--layers", "2", "--strategy", "uniform"])
    assert result.exit_code == 0, result.output
    assert "kept layers (uniform): [0, 2]" in result.output
    assert AutoModel.from_pretrained(tmp_path / "a").config.num_hidden_layers == 2
    # a classifier, cut in depth by importance and in width, calibrated on its task data
    clf = tmp_path / "clf"
    from conftest import classifier
    from distill.models.loading import save_model
    save_model(classifier(str(tiny_bert), ["neg", "pos"])[0], None, clf)
    result = runner.invoke(app, ["shrink", str(clf), "--out", str(tmp_path / "b"),
                                 "--layers", "3", "--hidden", "16", "--heads", "2",
                                 "--data", str(tiny_csv), "--max-length", "16"])
    assert result.exit_code == 0, result.output
    config = AutoModel.from_pretrained(tmp_path / "b").config
    assert (config.num_hidden_layers, config.hidden_size) == (3, 16)
    result = runner.invoke(app, ["shrink", str(tiny_bert), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "pass at least one of --layers" in result.output


@pytest.mark.integration
def test_shrink_command_on_a_causal_lm_calibrates_on_shakespeare(tmp_path: Path) -> None:
    """A tiny random Llama with SmolLM2's tokenizer: depth by importance and a width cut."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.models.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    src = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    result = runner.invoke(app, ["shrink", str(src), "--out", str(tmp_path / "small"),
                                 "--layers", "3", "--intermediate", "32", "--examples", "4",
                                 "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert "kept layers (importance):" in result.output
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert (small.config.num_hidden_layers, small.config.intermediate_size) == (3, 32)
    out = small.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
