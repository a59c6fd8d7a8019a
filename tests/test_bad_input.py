"""Bad input, table-driven, through the real CLI (every command): each kind exits with code 2,
names the problem in one or two lines without a traceback, and leaves every file around it as
it was: the test, its fixtures' model and data folders, and the output folder are hashed file
by file before and after the command.

What a failed run may leave (the contract this file pins):
- a failure found before any work (recipe, files, columns, labels, models, tokenizers, stage
  plans, output folder): nothing at all; the run directory is not created, and an existing
  folder given as `--output` is left exactly as it was;
- a failure during training (a loss that becomes NaN): the run's record only, namely
  recipe.yaml, report.json (the stage `failed`, with the error), report.md, loss plots, and
  in the failed stage's folder its log.jsonl and checkpoint/, and the run's teacher_cache/
  (what a resume starts from); no model, adapter or metrics.json of the failed stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import (NEGATIVE, NEUTRAL, POSITIVE, SPECIAL, tiny_recipe, write_tiny_bert,
                      write_tiny_teacher)
from distill.cli import app
from distill.run.ownership import write_marker

runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    """The tiny model and data, and the broken variants the cases point at."""

    root: Path
    bert: Path
    csv: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return str(self.paths[key])


def _copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _write_csv(path: Path, rows: list[str], header: str = "text,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n" if header else "")
    return path


@pytest.fixture(scope="module")
def env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tiny_bert, tiny_csv, tmp_path_factory)


def make_env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """The broken model folders and data files the cases point at (also used by
    test_safe_loading.py)."""
    import torch
    from transformers import BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bad-input")
    e = Env(root, tiny_bert, tiny_csv)
    p = e.paths
    # --- models
    p["tuned"] = write_tiny_teacher(root / "tuned", tiny_bert)  # a teacher distill accepts
    # a shard index naming a pickle (transformers would torch.load it), and one naming a
    # shard outside the folder
    from safetensors.torch import load_file, save_file
    for name, shard in (("bin_index", "pytorch_model.bin"),
                        ("outside_index", "../outside.safetensors")):
        folder = _copy_model(tiny_bert, root / name.replace("_", "-"))
        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": dict.fromkeys(state, shard)}))
        p[name] = folder
    # a tensor of another shape than the config gives it
    reshaped = _copy_model(tiny_bert, root / "reshaped")
    state = load_file(str(reshaped / "model.safetensors"))
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(5, 5)
    save_file(state, str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    p["reshaped"] = reshaped
    # a model folder with a PEFT adapter beside it (transformers would apply it)
    with_adapter = _copy_model(tiny_bert, root / "with-adapter")
    (with_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    p["with_adapter"] = with_adapter
    p["no_weights"] = _copy_model(tiny_bert, root / "no-weights", ("model.safetensors",))
    p["no_config"] = _copy_model(tiny_bert, root / "no-config", ("config.json",))
    p["no_tokenizer"] = _copy_model(tiny_bert, root / "no-tokenizer",
                                    ("tokenizer.json", "tokenizer_config.json"))
    p["empty_tokenizer"] = _copy_model(tiny_bert, root / "empty-tokenizer", ("tokenizer.json",))
    pickled = _copy_model(tiny_bert, root / "pickled", ("model.safetensors",))
    p["pickled"], p["pickle_file"] = pickled, pickled / "pytorch_model.bin"
    torch.save(BertModel.from_pretrained(tiny_bert).state_dict(), p["pickle_file"])
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    torch.save({"w": torch.zeros(2)}, adapter / "adapter_model.bin")
    p["adapter"] = adapter
    # a config that names its own code: the code must never run (it would leave a marker)
    remote = _copy_model(tiny_bert, root / "remote-code")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="distill-custom", auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomModel"})
    (remote / "config.json").write_text(json.dumps(config))
    p["remote_marker"] = root / "REMOTE-CODE-RAN"
    code = f"open({str(p['remote_marker'])!r}, 'w').close()\n"
    (remote / "configuration_custom.py").write_text(code)
    (remote / "modeling_custom.py").write_text(code)
    p["remote"] = remote
    # a tokenizer with more tokens than the model embeds
    words = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
    big = _copy_model(tiny_bert, root / "big-vocab")
    extra = [f"extra{i}" for i in range(8)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words + extra)}).save_pretrained(big)
    p["big_vocab"] = big
    # the same architecture and size, another vocabulary (ids mean other words)
    other = write_tiny_bert(root / "other-vocab")
    shuffled = SPECIAL + list(reversed(POSITIVE + NEGATIVE + NEUTRAL))
    BertTokenizerFast(vocab={w: i for i, w in enumerate(shuffled)}).save_pretrained(other)
    p["other_vocab"] = other
    # --- data
    p["txt"] = root / "reviews.txt"
    p["txt"].write_text(tiny_csv.read_text())
    p["header_only"] = _write_csv(root / "header-only.csv", [])
    p["zero_bytes"] = _write_csv(root / "zero.csv", [], header="")
    p["few_rows"] = _write_csv(root / "few.csv", ["good film,pos", "bad film,neg"] * 2)
    p["one_class"] = _write_csv(root / "one-class.csv", ["good film,pos"] * 20)
    p["float_labels"] = _write_csv(root / "float.csv",
                                   [f"good film,{i / 7:.3f}" for i in range(20)])
    p["empty_text"] = _write_csv(root / "empty-text.csv",
                                 tiny_csv.read_text().splitlines()[1:30] + [",pos"])
    unseen = root / "unseen-label"
    unseen.mkdir()
    shutil.copy(tiny_csv, unseen / "train.csv")
    _write_csv(unseen / "validation.csv", ["good film,pos", "so so film,meh", "bad,neg"])
    p["unseen_label"] = unseen
    damaged = _copy_model(tiny_bert, root / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as a failed copy leaves it
    p["damaged"] = damaged
    p["bad_config"] = _copy_model(tiny_bert, root / "bad-config")
    (p["bad_config"] / "config.json").write_text('{"model_type": "bert", ')
    p["latin1"] = root / "latin1.csv"
    p["latin1"].write_bytes(tiny_csv.read_text().replace("film", "caf\u00e9")
                            .encode("latin-1"))
    # --- data that is not text, labels of two kinds, split files that cannot be read
    rows = [line.rsplit(",", 1) for line in tiny_csv.read_text().splitlines()[1:]]
    p["list_text"] = root / "list-text.jsonl"
    p["list_text"].write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                                      for t, lab in rows[:30])
                              + json.dumps({"text": [1, 2], "label": "pos"}) + "\n")
    p["mixed_labels"] = root / "mixed-labels.jsonl"
    p["mixed_labels"].write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                                         for t, lab in rows[:30])
                                 + json.dumps({"text": "good film", "label": 1}) + "\n")
    p["extra_field"] = _write_csv(root / "extra-field.csv",
                                     ["good, great film,pos"] + [",".join(r) for r in rows[:30]])
    for name, make in [
            ("test_txt", lambda d: (d / "test.txt").write_text("text,label\ngood film,pos\n")),
            ("broken_test", lambda d: (d / "test.csv").symlink_to(d / "gontiny_csv")),
            ("latin1_test", lambda d: (d / "test.csv").write_bytes(
                "text,label\ncaf\u00e9 film,pos\n".encode("latin-1")))]:
        folder = root / name
        folder.mkdir()
        shutil.copy(tiny_csv, folder / "train.csv")
        make(folder)
        p[name] = folder

    # --- output places
    p["a_file"] = root / "a-file.txt"
    p["a_file"].write_text("not a folder\n")
    return e


# ----------------------------------------------------------------------------- the table
Patch = Callable[[Env, dict], Any]


@dataclass
class Case:
    """One kind of bad input: how to make it, and the words the error must contain."""

    id: str
    needle: str
    patch: Patch | None = None  # edits the tiny recipe dict in place, or returns raw YAML text
    args: Callable[[Env, Path], list[str]] = lambda e, out: []  # noqa: E731
    no_output: bool = False  # the case gives its own --output
    during_training: bool = False  # found by the training loop, not before work
    root_skip: bool = False  # file permissions do not bind root


def stage(kind: str, **keys: Any) -> dict:
    """A minimal stage of `kind` with the tiny settings."""
    base = {"evaluate": {"latency_runs": 1}, "shrink": {}}.get(
        kind, {"batch_size": 16, "epochs": 1})
    return {"kind": kind, **base, **keys}


def set_stages(*stages: dict) -> Patch:
    def patch(e: Env, r: dict) -> None:
        r["stages"] = list(stages)
    return patch


def set_key(dotted: str, value: Any | Callable[[Env], Any]) -> Patch:
    """Set a dotted key of the recipe (`value` may read the fixtures)."""
    def patch(e: Env, r: dict) -> None:
        node: Any = r
        *head, last = dotted.split(".")
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[int(last) if isinstance(node, list) else last] = value(e) if callable(value) \
            else value
    return patch


def tuned(patch: Patch) -> Patch:
    """`patch` on a recipe whose teacher has a trained head (distilling needs one)."""
    def apply(e: Env, r: dict) -> Any:
        r["teacher"]["model"] = e["tuned"]
        return patch(e, r)
    return apply


def raw(text: str) -> Patch:
    return lambda e, r: text


def adapt(**keys: Any) -> Patch:
    """The recipe becomes one adapt stage with `keys` (callables read the fixtures)."""
    def patch(e: Env, r: dict) -> None:
        resolved = {k: (v(e) if callable(v) else v) for k, v in keys.items()}
        r["stages"] = [stage("adapt", **{"method": "lora", **resolved})]
    return patch


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{q}'] * 10)}]\n" for q, n in zip("abcde", "bcdef"))

def command_cases(command: str, rows: list[tuple[str, str, Callable[[Env, Path], list[str]]]]
                  ) -> list[Case]:
    """Cases of one command: (what, needle, its arguments after the command name)."""
    return [Case(f"{command}: {what}", needle,
                 args=lambda e, out, a=argv: [command, *a(e, out)])
            for what, needle, argv in rows]


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
    # --- the output folder
    Case("output exists without --force", "already exists; pass --force",
         args=lambda e, out: ["--output", str(_old_run(out))], no_output=True),
    Case("output is a folder that is not a run", "is not empty and was not made by distill",
         args=lambda e, out: ["--output", str(_foreign(out)), "--force"], no_output=True),
    Case("output is a file", "is a file, not a folder",
         args=lambda e, out: ["--output", e["a_file"]], no_output=True),
    Case("output below a file", "a-file.txt is a file, not a folder",
         args=lambda e, out: ["--output", str(e.paths["a_file"] / "run")], no_output=True),
    Case("output where nothing can be created", "the run directory /proc/distill-bad-input",
         args=lambda e, out: ["--output", "/proc/distill-bad-input/run"], no_output=True),
    Case("read-only output folder", "is not writable",
         args=lambda e, out: ["--output", str(_read_only(out) / "run")], no_output=True,
         root_skip=True),
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
    # --- whose folder it is (distill.run.ownership)
    Case("--force into an old run that holds the teacher", "which this command reads",
         args=lambda e, out: _force_into_a_run_holding(e, out, "teacher")),
    Case("--force into an old run that holds the data", "which this command reads",
         args=lambda e, out: _force_into_a_run_holding(e, out, "data")),
    Case("--force into a run another process writes", "is in use by another distill process",
         args=lambda e, out: ["--output", str(_locked_run(out)), "--force"], no_output=True),
    Case("--resume of a folder distill did not make", "not a run directory of distill",
         args=lambda e, out: ["run", "--resume", str(_foreign(out))]),
    Case("--resume of a missing folder", "not a run directory of distill",
         args=lambda e, out: ["run", "--resume", str(out)]),
    Case("--resume after recipe.yaml was edited", "recipe.yaml was changed since the run "
         "started (seed)", args=lambda e, out: ["run", "--resume", str(_edited_run(e, out))]),
    Case("--resume of a run whose recipe.yaml is gone", "its recipe.yaml is missing",
         args=lambda e, out: ["run", "--resume", str(_old_run(out, recipe=False))]),
    Case("--resume with a recipe", "give no RECIPE, --set, --output or --force with it",
         args=lambda e, out: ["run", str(e.root / "x.yaml"), "--resume", str(out)]),
    Case("recipe file not UTF-8", "not UTF-8 text", lambda e, r: "name: caf\xe9\n".encode(
        "latin-1")),
    Case("validate: missing recipe", "recipe not found",
         args=lambda e, out: ["validate", str(e.root / "nope.yaml")]),
    Case("report of a folder distill did not make", "not a run",
         args=lambda e, out: ["report", str(_foreign(out))]),
    Case("report of a missing folder", "not a run directory",
         args=lambda e, out: ["report", str(out)]),
    Case("report of a file", "not a run directory", args=lambda e, out: ["report", e["a_file"]]),
    # --- damaged files
    Case("teacher weights cut short", "a safetensors weights file could not be read",
         set_key("teacher.model", lambda e: e["damaged"])),
    Case("data file not UTF-8", "not UTF-8 text",
         set_key("data.dataset", lambda e: e["latin1"])),
    Case("config.json that is not JSON", "config.json: not a valid config",
         set_key("teacher.model", lambda e: e["bad_config"])),
    Case("inspect: config.json that is not JSON", "config.json: not a valid config",
         args=lambda e, out: ["inspect", e["bad_config"]]),
    # --- distill shrink
    *command_cases("shrink", [
        ("--out a folder distill did not make", "is not empty and was not made by distill",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(_foreign(out)), "--force"]),
        ("--out is the model it reads", "which this command reads",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(e.bert), "--force"]),
        ("--out is a file", "is a file, not a folder",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", e["a_file"]]),
        ("--out exists without --force", "already exists; pass --force",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(_old_shrink(out))]),
        ("no cut asked for", "pass at least one of --layers, --hidden",
         lambda e, out: [str(e.bert), "--out", str(out)]),
        ("missing model", "model path not found",
         lambda e, out: [str(e.root / "no-model"), "--layers", "2", "--out", str(out)]),
        ("pickled model", "pickled",
         lambda e, out: [e["pickled"], "--layers", "2", "--out", str(out)]),
        ("damaged weights", "a safetensors weights file could not be read",
         lambda e, out: [e["damaged"], "--layers", "2", "--out", str(out)]),
        ("--layers 0", "--layers 0: the model has 4 layers; allowed: 1..4",
         lambda e, out: [str(e.bert), "--layers", "0", "--out", str(out)]),
        ("--layers deeper than the model", "--layers 9: the model has 4 layers",
         lambda e, out: [str(e.bert), "--layers", "9", "--out", str(out)]),
        ("unknown strategy", "layer selection strategy 'bogus' is unknown",
         lambda e, out: [str(e.bert), "--layers", "2", "--strategy", "bogus", "--out",
                         str(out)]),
        ("unknown score", "importance score 'bogus' is unknown",
         lambda e, out: [str(e.bert), "--layers", "2", "--score", "bogus", "--out", str(out)]),
        ("--examples 0", "--examples 0: allowed: 1 or more",
         lambda e, out: [str(e.bert), "--layers", "2", "--examples", "0", "--out", str(out)]),
        ("--max-length past the model's positions", "--max-length 100: allowed: 8..64",
         lambda e, out: [str(e.bert), "--hidden", "16", "--heads", "2", "--max-length", "100",
                         "--out", str(out)]),
        ("calibration data missing", "not found",
         lambda e, out: [str(e.bert), "--layers", "2", "--data", str(e.root / "none.csv"),
                         "--out", str(out)]),
        ("a width that breaks heads x head size", "hidden 24",
         lambda e, out: [str(e.bert), "--hidden", "24", "--out", str(out)]),
    ]),
    # --- distill attach
    *command_cases("attach", [
        ("no student", "give the student to adapt", lambda e, out: []),
        ("missing student", "STUDENT: model path not found",
         lambda e, out: [str(e.root / "no-model"), "--data", str(e.csv)]),
        ("unknown method", "--method: unknown PEFT method 'lorra'",
         lambda e, out: [str(e.bert), "--method", "lorra", "--data", str(e.csv)]),
        ("option without =", "--option 'r': expected KEY=VALUE",
         lambda e, out: [str(e.bert), "-O", "r", "--data", str(e.csv)]),
        ("option with a YAML tag", "--option 'r=!!python/name:os.system': YAML tags are not "
         "allowed", lambda e, out: [str(e.bert), "-O", "r=!!python/name:os.system", "--data",
                                    str(e.csv)]),
        ("unknown option", "--option: lora: unknown option 'rank'",
         lambda e, out: [str(e.bert), "-O", "rank=8", "--data", str(e.csv)]),
        ("missing data", "--data: ",
         lambda e, out: [str(e.bert), "--data", str(e.root / "none.csv")]),
        ("output a folder distill did not make", "is not empty and was not made by distill",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--output", str(_foreign(out)),
                         "--force"]),
        ("--epochs -1", "--epochs: -1.0 is out of range",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--epochs", "-1", "-o", str(out)]),
        ("--lr 0", "--lr: 0.0 is out of range",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--lr", "0", "-o", str(out)]),
        ("--batch-size 0", "--batch-size: 0 is out of range",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--batch-size", "0", "-o",
                         str(out)]),
        ("--max-length past the model's positions", "--max-length: 100 is longer than",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--max-length", "100", "-o",
                         str(out)]),
        ("missing text column", "--text-column: column 'review' not found",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--text-column", "review", "-o",
                         str(out)]),
        ("split of a file", "--data-split: 'train' picks a split of a hub dataset",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--data-split", "train", "-o",
                         str(out)]),
    ]),
    # --- distill eval
    *command_cases("eval", [
        ("missing model", "model path not found",
         lambda e, out: [str(e.root / "no-model"), "--data", str(e.csv)]),
        ("unknown split", "--split: 'bogus' is not allowed; allowed: test, validation",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--split", "bogus"]),
        ("missing data", "--data: ",
         lambda e, out: [str(e.bert), "--data", str(e.root / "none.csv")]),
        ("damaged weights", "a safetensors weights file could not be read",
         lambda e, out: [e["damaged"], "--data", str(e.csv)]),
        ("pickled model", "pickled", lambda e, out: [e["pickled"], "--data", str(e.csv)]),
        ("data not UTF-8", "not UTF-8 text", lambda e, out: [str(e.bert), "--data",
                                                             e["latin1"]]),
        ("missing text column", "--text-column: column 'review' not found",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--text-column", "review"]),
        ("config of a file", "--data-config: 'en' picks a config of a hub dataset",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--data-config", "en"]),
    ]),
    # --- distill inspect
    *command_cases("inspect", [
        ("missing model", "model path not found", lambda e, out: [str(e.root / "no-model")]),
        ("damaged weights", "a safetensors weights file could not be read",
         lambda e, out: [e["damaged"]]),
        ("a file", "not a Hugging Face model directory", lambda e, out: [e["a_file"]]),
        ("pickled model", "pickled", lambda e, out: [e["pickled"]]),
    ]),
    # --- found during training
    Case("NaN-producing learning rate", "the loss became nan",
         set_stages(stage("finetune", learning_rate=1e6, warmup_ratio=0, log_every=1)),
         during_training=True),
    Case("NaN in a distill stage (teacher cache kept)", "distill: the loss became nan",
         tuned(set_stages(stage("distill", learning_rate=1e6, warmup_ratio=0, log_every=1,
                                student={"layers": [0, 2]}))), during_training=True),
]


def _old_run(out: Path, recipe: bool = True) -> Path:
    """A finished run's folder (a previous run of the same recipe)."""
    (out / "stages").mkdir(parents=True)
    if recipe:
        (out / "recipe.yaml").write_text("name: tiny\n")
    (out / "report.json").write_text("{}\n")
    write_marker(out, "run")
    return out


def _old_shrink(out: Path) -> Path:
    """An earlier `distill shrink` result."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}\n")
    write_marker(out, "shrink")
    return out


def _force_into_a_run_holding(e: Env, out: Path, what: str) -> list[str]:
    """`run --force` into an old run of ours that holds the teacher (or the data) the recipe
    reads: refused before the old run is touched."""
    _old_run(out)
    recipe = tiny_recipe(e.bert, e.csv)
    if what == "teacher":
        recipe["teacher"]["model"] = str(_copy_model(e.bert, out / "stages/00-finetune/model"))
    else:
        recipe["data"]["dataset"] = str(shutil.copy(e.csv, out / "reviews.csv"))
    path = out.parent / f"reads-{what}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["run", str(path), "--output", str(out), "--force"]


def _locked_run(out: Path) -> Path:
    """An old run of ours that a live process (this one) is writing."""
    from distill.run.ownership import FolderLock

    FolderLock(_old_run(out)).acquire()  # left held: the test's own PID, alive
    return out


def _edited_run(e: Env, out: Path) -> Path:
    """A run whose recipe.yaml differs (in `seed`) from the recipe it started with."""
    from distill import recipe_from_dict
    from distill.run.pipeline import absolute_paths, recipe_digest
    from distill.config.loading import dump_recipe, recipe_to_dict

    started = absolute_paths(recipe_from_dict(tiny_recipe(e.bert, e.csv)))
    _old_run(out)
    write_marker(out, "run", recipe_sha256=recipe_digest(started),
                 recipe=recipe_to_dict(started))
    dump_recipe(recipe_from_dict(tiny_recipe(e.bert, e.csv, seed=7)), out / "recipe.yaml")
    return out


def _foreign(out: Path) -> Path:
    """A folder of the user's that is not a run: --force must not delete it."""
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("precious\n")
    return out


def _read_only(out: Path) -> Path:
    out.mkdir(parents=True)
    out.chmod(0o555)
    return out


def _snapshot(path: Path) -> dict[str, str] | None:
    """Every file and folder under `path` with its SHA-256 and mode (None when `path` does not
    exist): a command that failed must leave it exactly so."""
    import hashlib
    import stat

    if not path.exists():
        return None
    items = [path] if path.is_file() else sorted(path.rglob("*"))
    return {str(p.relative_to(path)) if p != path else "": (
        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>")
        + f" {stat.S_IMODE(p.lstat().st_mode):o}" for p in items}


def _allowed_after_training_failure(rel: Path) -> bool:
    """The run's record of a failed stage (see the module docstring)."""
    parts = rel.parts
    if len(parts) == 1:
        return parts[0] in ("recipe.yaml", "report.json", "report.md", "stages",
                            ".distill.json", "teacher_cache") or (
            parts[0].startswith("loss_") and parts[0].endswith(".png"))
    if parts[0] == "teacher_cache":  # soft labels computed before the failure, kept for reuse
        return True
    if parts[0] != "stages":
        return False
    return len(parts) == 2 or parts[2] in ("log.jsonl", "checkpoint")


COMMANDS = ("run", "validate", "recipes", "inspect", "shrink", "attach", "eval", "report")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path) -> None:
    if case.root_skip and os.geteuid() == 0:
        pytest.skip("root writes through file permissions; 'output where nothing can be "
                    "created' and 'output below a file' cover this as root")
    out = tmp_path / "runs" / "tiny"
    recipe = tiny_recipe(env.bert, env.csv)
    text = case.patch(env, recipe) if case.patch else None
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if isinstance(text, str) else yaml.safe_dump(recipe))
    extra = case.args(env, out)
    if extra and extra[0] in COMMANDS:  # a whole command line
        argv = extra
    else:
        argv = ["run", str(path), *([] if case.no_output else ["--output", str(out)]), *extra]
    # Everything around the command: this test's folder (recipe, output), the broken fixtures,
    # the tiny model and data, and any other path the command names.
    watched = {tmp_path, env.root, env.bert, env.csv.parent}
    watched |= {Path(a) for a in argv if a.startswith("/") and not Path(a).is_relative_to(
        tmp_path) and not Path(a).is_relative_to(env.root)}
    before = {str(w): _snapshot(w) for w in watched}

    result = runner.invoke(app, argv)

    message = result.stderr.strip()
    assert result.exit_code == 2, (case.id, result.output[-3000:], result.exception)
    assert isinstance(result.exception, SystemExit), (case.id, result.exception)
    assert "Traceback" not in result.output, (case.id, result.output[-3000:])
    assert message.startswith("error:"), (case.id, message)
    assert case.needle in message, (case.id, message)
    assert len(message.splitlines()) <= 2, (case.id, message)
    assert not env.paths["remote_marker"].exists(), "a model folder's code ran"
    if not case.during_training:  # every file around the command is as it was
        for w in watched:
            assert _snapshot(w) == before[str(w)], (case.id, w, _changes(before[str(w)],
                                                                          _snapshot(w)))
        return
    # ...or, for a failure found while training, the run folder holds the record of the
    # failed stage only, and nothing else changed
    for w in watched - {tmp_path}:
        assert _snapshot(w) == before[str(w)], (case.id, w)
    made = {str(out.relative_to(tmp_path)), *map(str, out.relative_to(tmp_path).parents)}

    def outside(snapshot: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in snapshot.items() if k not in made and not Path(k)
                .is_relative_to(out.relative_to(tmp_path))}
    assert outside(_snapshot(tmp_path) or {}) == outside(before[str(tmp_path)]), case.id
    leftovers = [p.relative_to(out) for p in out.rglob("*")]
    assert all(_allowed_after_training_failure(r) for r in leftovers), (case.id, leftovers)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][-1]["status"] == "failed"
    assert case.needle in report["stages"][-1]["error"]


def _changes(before: dict | None, after: dict | None) -> list[str]:
    """What differs between two snapshots (for the assertion message)."""
    before, after = before or {}, after or {}
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def test_at_least_a_hundred_kinds() -> None:
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


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


def test_a_real_process_prints_no_traceback(env: Env, tmp_path: Path) -> None:
    """The same contract outside CliRunner: the installed entry point, real stderr."""
    recipe = tiny_recipe(env.bert, env.csv)
    recipe["teacher"]["model"] = env["pickled"]
    path = tmp_path / "pickled.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "distill", "run", str(path), "--output",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "has only pickled weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not out.exists()
