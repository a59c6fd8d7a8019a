"""Bad input, table-driven, through the real CLI: each kind exits with code 2, names the problem
in one or two lines without a traceback, and leaves no partial artifacts.

What a failed run may leave (the contract this file pins):
- a failure found before any work (recipe, files, columns, labels, models, tokenizers, stage
  plans, output folder): nothing at all; the run directory is not created, and an existing
  folder given as `--output` is left exactly as it was;
- a failure during training (a loss that becomes NaN): the run's record only, namely
  recipe.yaml, report.json (the stage `failed`, with the error), report.md, loss plots, and
  in the failed stage's folder its log.jsonl, checkpoint/ and teacher_cache/ (what a resume
  starts from); no model, adapter or metrics.json of the failed stage.
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

from conftest import NEGATIVE, NEUTRAL, POSITIVE, SPECIAL, tiny_recipe, write_tiny_bert
from distill.cli import app
from distill.ownership import write_marker

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


def raw(text: str) -> Patch:
    return lambda e, r: text


def adapt(**keys: Any) -> Patch:
    """The recipe becomes one adapt stage with `keys` (callables read the fixtures)."""
    def patch(e: Env, r: dict) -> None:
        resolved = {k: (v(e) if callable(v) else v) for k, v in keys.items()}
        r["stages"] = [stage("adapt", **{"method": "lora", **resolved})]
    return patch


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
         set_stages(stage("distill", student={"layers": [0, 2]}),
                    stage("shrink", schedule=[{"layers": 3}], heal={"epochs": 1}))),
    Case("shrink width that breaks heads x head size", "hidden 24 ≠ 4 heads × 8",
         set_stages(stage("shrink", start="teacher", schedule=[{"hidden": 24}]))),
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
    # --- found during training
    Case("NaN-producing learning rate", "the loss became nan",
         set_stages(stage("finetune", learning_rate=1e6, warmup_ratio=0, log_every=1)),
         during_training=True),
    Case("NaN in a distill stage (teacher cache kept)", "distill: the loss became nan",
         set_stages(stage("distill", learning_rate=1e6, warmup_ratio=0, log_every=1,
                          student={"layers": [0, 2]})), during_training=True),
]


def _old_run(out: Path) -> Path:
    """A finished run's folder (a previous run of the same recipe)."""
    (out / "stages").mkdir(parents=True)
    (out / "recipe.yaml").write_text("name: tiny\n")
    (out / "report.json").write_text("{}\n")
    write_marker(out, "run")
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


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its content (None when `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


def _allowed_after_training_failure(rel: Path) -> bool:
    """The run's record of a failed stage (see the module docstring)."""
    parts = rel.parts
    if len(parts) == 1:
        return parts[0] in ("recipe.yaml", "report.json", "report.md", "stages",
                            ".distill.json") or (
            parts[0].startswith("loss_") and parts[0].endswith(".png"))
    if parts[0] != "stages":
        return False
    return len(parts) == 2 or parts[2] in ("log.jsonl", "checkpoint", "teacher_cache")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path) -> None:
    if case.root_skip and os.geteuid() == 0:
        pytest.skip("root writes through file permissions; 'output where nothing can be "
                    "created' and 'output below a file' cover this as root")
    out = tmp_path / "runs" / "tiny"
    recipe = tiny_recipe(env.bert, env.csv)
    text = case.patch(env, recipe) if case.patch else None
    path = tmp_path / "recipe.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(recipe))
    extra = case.args(env, out)
    if extra and extra[0] == "run":
        argv = extra
    else:
        argv = ["run", str(path), *([] if case.no_output else ["--output", str(out)]), *extra]
    watched = [out] + [Path(a) for a in argv if a.startswith(("/proc/",))]
    before = {str(w): _snapshot(w) for w in watched}
    before_root = sorted(p.name for p in tmp_path.iterdir())

    result = runner.invoke(app, argv)

    message = result.stderr.strip()
    assert result.exit_code == 2, (case.id, result.output[-3000:], result.exception)
    assert isinstance(result.exception, SystemExit), (case.id, result.exception)
    assert "Traceback" not in result.output, (case.id, result.output[-3000:])
    assert message.startswith("error:"), (case.id, message)
    assert case.needle in message, (case.id, message)
    assert len(message.splitlines()) <= 2, (case.id, message)
    assert not env.paths["remote_marker"].exists(), "a model folder's code ran"
    # the recipe folder holds what the test put there, and the run folder is as before...
    assert sorted(p.name for p in tmp_path.iterdir()) == before_root \
        or case.during_training, (case.id, sorted(tmp_path.iterdir()))
    if not case.during_training:
        for w in watched:
            assert _snapshot(w) == before[str(w)], (case.id, w, _snapshot(w))
        return
    # ...or, for a failure found while training, holds the record of the failed stage only
    leftovers = [p.relative_to(out) for p in out.rglob("*")]
    assert all(_allowed_after_training_failure(r) for r in leftovers), (case.id, leftovers)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][-1]["status"] == "failed"
    assert case.needle in report["stages"][-1]["error"]


def test_at_least_thirty_kinds() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def test_validate_runs_the_same_checks(env: Env, tmp_path: Path) -> None:
    """`distill validate` checks data, models and stage plans too, all problems at once."""
    recipe = tiny_recipe(env.bert, env.csv)
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
