"""Bad recipes through `distill run` (table-driven, `bad_input.check`): the recipe file,
--set overrides, layers, data, models and tokenizers, PEFT methods, numbers that mean nothing,
damaged files, and failures found while training. Each exits with code 2 and a one- or
two-line message, leaving every file around it as it was (see tests/bad_input.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bad_input import (LAUGHS, Case, Env, adapt, check, make_env, raw, runner, set_key,
                       set_stages, stage, tuned)
from conftest import tiny_recipe
from distill.cli import app


@pytest.fixture(scope="module")
def env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tiny_bert, tiny_csv, tmp_path_factory)


CASES: list[Case] = [
    # --- the recipe file
    Case("missing recipe file", "recipe not found", args=lambda e, out: [
        "run", str(e.root / "no-such-recipe.yaml"), "--output", str(out)], no_output=True),
    Case("malformed YAML", "malformed YAML at line", raw("name: x\nstages: [kind: finetune\n")),
    Case("YAML list, not a mapping", "should be a mapping with `name`",
         raw("- kind: finetune\n- kind: evaluate\n")),
    Case("empty recipe file", "the recipe file is empty", raw("")),
    Case("YAML tag that would run code", "YAML tags are not allowed",
         raw("name: !!python/object/apply:os.system ['echo pwned']\n")),
    Case("unknown top-level key", "teachr: unknown key; did you mean `teacher`?",
         lambda e, r: r.update(teachr={"model": "x"})),
    Case("misspelled nested key", "stages.1.loss.alpah: unknown key; did you mean `alpha`?",
         set_key("stages.1.loss", {"alpah": 0.5})),
    Case("wrong type", "stages.0.epochs: 'three' should be a number",
         set_key("stages.0.epochs", "three")),
    Case("alpha out of range", "stages.1.loss.alpha: 1.5 is out of range; allowed: >= 0",
         set_key("stages.1.loss.alpha", 1.5)),
    Case("negative learning rate", "stages.0.learning_rate: -0.001 is out of range",
         set_key("stages.0.learning_rate", -1e-3)),
    Case("unknown stage kind", "unknown stage kind 'distil'; did you mean 'distill'?",
         set_key("stages.1.kind", "distil")),
    Case("stage without kind", "stages.0: each stage needs a `kind`",
         set_stages({"epochs": 1})),
    Case("no stages", "the recipe has no stages", set_stages()),
    Case("recipe name with ..", "must be a plain folder name", set_key("name", "..")),
    Case("recipe name with /", "must be a plain folder name", set_key("name", "../escape")),
    # --- --set overrides
    Case("--set without =", "expected KEY=VALUE", args=lambda e, out: ["--set", "seed"]),
    Case("--set list index out of range", "stages.7: no such list index",
         args=lambda e, out: ["--set", "stages.7.epochs=1"]),
    Case("--set into a scalar", "cannot set a key inside",
         args=lambda e, out: ["--set", "seed.value=1"]),
    Case("--set unknown key", "stages.0.epoch: unknown key; did you mean `epochs`?",
         args=lambda e, out: ["--set", "stages.0.epoch=2"]),
    # --- layers
    Case("layer index out of range", "[9] out of range; the teacher has 4 layers",
         set_key("stages.1.student.layers", [0, 9])),
    Case("negative layer index", "has negative indices", set_key("stages.1.student.layers", [-1])),
    Case("duplicate layer indices", "repeats a layer", set_key("stages.1.student.layers", [1, 1])),
    Case("layer_map of the wrong length", "stages.1.loss.layer_map: [1, 2, 3] must give one",
         set_key("stages.1.loss.layer_map", [1, 2, 3])),
    Case("num_layers deeper than the teacher", "num_layers: 7 is out of range",
         set_key("stages.1.student", {"num_layers": 7})),
    Case("shrink step deeper than its model", "stages.1.schedule.0.layers: 3 is out of range",
         tuned(set_stages(stage("distill", student={"layers": [0, 2]}),
                          stage("shrink", schedule=[{"layers": 3}], heal={"epochs": 1})))),
    Case("shrink width that breaks heads x head size", "hidden 24 ≠ 4 heads × 8",
         tuned(set_stages(stage("shrink", start="teacher", schedule=[{"hidden": 24}])))),
    # --- data
    Case("missing data file", "no such file or folder",
         set_key("data.dataset", lambda e: str(e.root / "nope.csv"))),
    Case("unsupported data file type", "unsupported file type '.txt'",
         set_key("data.dataset", lambda e: e["txt"])),
    Case("missing text column", "data.text_column: column 'review' not found",
         set_key("data.text_column", "review")),
    Case("missing label column", "column 'labels' not found in",
         set_key("data.label_column", "labels")),
    Case("empty dataset (header only)", "the dataset is empty (no rows)",
         set_key("data.dataset", lambda e: e["header_only"])),
    Case("empty data file (0 bytes)", "the dataset is empty (an empty file)",
         set_key("data.dataset", lambda e: e["zero_bytes"])),
    Case("too few rows to split", "too few to carve",
         set_key("data.dataset", lambda e: e["few_rows"])),
    Case("validation label outside the train labels",
         "validation label(s) meh do not occur in the training data",
         set_key("data.dataset", lambda e: e["unseen_label"])),
    Case("a single class", "classification needs at least 2",
         set_key("data.dataset", lambda e: e["one_class"])),
    Case("regression labels", "is not a class",
         set_key("data.dataset", lambda e: e["float_labels"])),
    Case("an empty text", "1 row has an empty or missing text",
         set_key("data.dataset", lambda e: e["empty_text"])),
    Case("unknown built-in dataset", "did you mean `builtin:rotten_tomatoes`?",
         set_key("data.dataset", "builtin:rotten_tomato")),
    Case("adapt-stage data missing", "stages.0.data.dataset: ",
         adapt(data=lambda e: {"dataset": str(e.root / "gone.csv")})),
    Case("max_length past the model's positions",
         "data.max_length: 100 is longer than", set_key("data.max_length", 100)),
    # --- models and tokenizers
    Case("missing model directory", "model path not found",
         set_key("teacher.model", lambda e: str(e.root / "no-model"))),
    Case("model directory without config.json", "no config.json",
         set_key("teacher.model", lambda e: e["no_config"])),
    Case("model directory without weights", "no model weights in the folder",
         set_key("teacher.model", lambda e: e["no_weights"])),
    Case("shard index naming a pickle", "model.safetensors.index.json names pickled shards "
         "(pytorch_model.bin)", set_key("teacher.model", lambda e: e["bin_index"])),
    Case("shard index naming a file elsewhere", "outside the model folder",
         set_key("teacher.model", lambda e: e["outside_index"])),
    Case("model folder holding an adapter", "holds a PEFT adapter (adapter_config.json)",
         set_key("teacher.model", lambda e: e["with_adapter"])),
    Case("untrained teacher distilled before finetune", "add a `finetune` stage before it",
         set_stages(stage("distill", student={"layers": [0, 2]}))),
    Case("weights that do not fit the config", "weights do not fit its config: shape of "
         "bert.encoder.layer.1.intermediate.dense.weight is [5, 5] in the file but [64, 32]",
         set_key("teacher.model", lambda e: e["reshaped"]), during_training=True),
    Case("pickled weights only", "has only pickled weights (pytorch_model.bin)",
         set_key("teacher.model", lambda e: e["pickled"])),
    Case("a pickled weights file as the model", "is a weights file (a pickled checkpoint)",
         set_key("teacher.model", lambda e: e["pickle_file"])),
    Case("an adapter folder as the adapt model", "is a PEFT adapter folder, not a model",
         adapt(model=lambda e: e["adapter"])),
    Case("pickled adapt model", "stages.0.allow_pickle: true",
         adapt(model=lambda e: e["pickled"])),
    Case("model directory without tokenizer", "has no tokenizer files",
         set_key("teacher.model", lambda e: e["no_tokenizer"])),
    Case("tokenizer without a vocabulary", "has only its 5 special tokens and no vocabulary",
         set_key("teacher.model", lambda e: e["empty_tokenizer"])),
    Case("tokenizer larger than the model's vocabulary",
         "tokenizer/model mismatch: the tokenizer has 48 tokens but",
         set_key("teacher.model", lambda e: e["big_vocab"])),
    Case("adapt model with another tokenizer", "stages.0.model: tokenizer mismatch",
         adapt(model=lambda e: e["other_vocab"])),
    Case("custom code without trust_remote_code", "only with `teacher.trust_remote_code: true`",
         set_key("teacher.model", lambda e: e["remote"])),
    Case("unknown built-in model", "unknown built-in model 'builtin:minilm-l7'",
         set_key("teacher.model", "builtin:minilm-l7")),
    Case("hub id while offline", "teacher.model: could not load model 'no-such-org/no-such",
         set_key("teacher.model", "no-such-org/no-such-model")),
    # --- PEFT methods
    Case("unknown PEFT method", "stages.0.method: unknown PEFT method", adapt(method="lorra")),
    Case("unknown PEFT option", "unknown option 'rank'", adapt(config={"rank": 8})),
    Case("target_modules matching nothing",
         "target_modules ['qkv'] match no module of BertForSequenceClassification; its "
         "adaptable modules are dense, key, query, value",
         adapt(config={"target_modules": ["qkv"]})),
    Case("prefix-tuning option that does not fit the model",
         "encoder_prefix needs an encoder–decoder model",
         adapt(method="prefix_tuning", config={"encoder_prefix": True})),
    Case("prompt longer than the model's positions",
         "stages.0.config: 60 virtual tokens + data.max_length 16 make inputs of 76 positions",
         adapt(method="prompt_tuning", config={"num_virtual_tokens": 60})),
    # --- export formats
    Case("unknown export format", "stages.0.formats.0: 'tflite' is not allowed; allowed: 'bf16'",
         set_stages(stage("export", formats=["tflite"]))),
    Case("export with no format", "stages.0.formats: name at least one of",
         set_stages(stage("export", formats=[]))),
    Case("export format given twice", "stages.0.formats: onnx given twice",
         set_stages(stage("export", formats=["onnx", "bf16", "onnx"]))),
    # --- numbers that mean nothing, YAML that is not a plain tree, columns of the wrong kind
    Case("duplicate key in the recipe", "duplicate key 'seed' (first at line 1); a key may "
         "appear once in a mapping", raw("seed: 1\nseed: 2\nstages:\n  - kind: evaluate\n")),
    Case("recursive YAML alias", "recursive alias *s: it is used inside the value it refers to",
         raw("stages: &s\n  - kind: evaluate\n  - *s\n")),
    Case("YAML nested too deep", "nested more than 32 levels deep",
         raw("name: " + "[" * 40 + "]" * 40 + "\n")),
    Case("YAML alias bomb", "holds more than 100,000 values", raw(LAUGHS)),
    Case("NaN learning rate", "stages.0.learning_rate: nan is not a finite number; allowed: a "
         "finite number > 0", set_key("stages.0.learning_rate", float("nan"))),
    Case("infinite temperature", "stages.1.loss.temperature: inf is not a finite number",
         set_key("stages.1.loss.temperature", float("inf"))),
    Case("NaN in a PEFT option", "stages.0.config.lora_dropout: nan is not a finite number",
         adapt(config={"lora_dropout": float("nan")})),
    Case("negative seed", "seed: -1 is out of range; allowed: >= 0 and < 2**32",
         set_key("seed", -1)),
    Case("split seed past 2**32", "data.split_seed: 4294967296 is out of range",
         set_key("data.split_seed", 2**32)),
    Case("true as an integer", "stages.0.batch_size: True should be an integer",
         set_key("stages.0.batch_size", True)),
    Case("--set NaN", "stages.0.learning_rate: nan is not a finite number",
         args=lambda e, out: ["--set", "stages.0.learning_rate=.nan"]),
    Case("--set with a YAML tag", "YAML tags are not allowed",
         args=lambda e, out: ["--set", "name=!!python/name:os.system"]),
    Case("a list in the text column", "1 row is not text in column 'text'",
         set_key("data.dataset", lambda e: e["list_text"])),
    Case("mixed label kinds", "column 'label' mixes string labels",
         set_key("data.dataset", lambda e: e["mixed_labels"])),
    Case("CSV row with more fields than the header", "a row has more fields than the header",
         set_key("data.dataset", lambda e: e["extra_field"])),
    Case("test split file of an unsupported type",
         "looks like the test split but has the unsupported type '.txt'",
         set_key("data.dataset", lambda e: e["test_txt"])),
    Case("test split file a broken link", "looks like the test split but is a broken link",
         set_key("data.dataset", lambda e: e["broken_test"])),
    Case("test split file not UTF-8", "test.csv: not UTF-8 text",
         set_key("data.dataset", lambda e: e["latin1_test"])),
    # --- damaged files
    Case("teacher weights cut short", "a safetensors weights file could not be read",
         set_key("teacher.model", lambda e: e["damaged"])),
    Case("data file not UTF-8", "not UTF-8 text",
         set_key("data.dataset", lambda e: e["latin1"])),
    Case("config.json that is not JSON", "config.json: not a valid config",
         set_key("teacher.model", lambda e: e["bad_config"])),
    Case("inspect: config.json that is not JSON", "config.json: not a valid config",
         args=lambda e, out: ["inspect", e["bad_config"]]),
    # --- found during training
    Case("NaN-producing learning rate", "the loss became nan",
         set_stages(stage("finetune", learning_rate=1e6, warmup_ratio=0, log_every=1)),
         during_training=True),
    Case("NaN in a distill stage (teacher cache kept)", "distill: the loss became nan",
         tuned(set_stages(stage("distill", learning_rate=1e6, warmup_ratio=0, log_every=1,
                                student={"layers": [0, 2]}))), during_training=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_recipe(case: Case, env: Env, tmp_path: Path) -> None:
    check(case, env, tmp_path)


def test_validate_runs_the_same_checks(env: Env, tmp_path: Path) -> None:
    """`distill validate` checks data, models and stage plans too, all problems at once."""
    recipe = tiny_recipe(env["tuned"], env.csv)
    recipe["stages"] = [stage("adapt", config={"target_modules": ["qkv"]}),
                        stage("distill", student={"layers": [0, 9]})]
    path = tmp_path / "two-problems.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "cannot start the run (2 problems)" in result.stderr
    assert "stages.0.config: lora: target_modules ['qkv'] match no module" in result.stderr
    assert "stages.1.student.layers: [9] out of range" in result.stderr
