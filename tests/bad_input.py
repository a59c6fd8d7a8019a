"""Bad input through the real CLI: the harness of test_bad_recipes.py and test_bad_commands.py.

Each case exits with code 2, names the problem in one or two lines without a traceback, and
leaves every file around it as it was: the test, its fixtures' model and data folders, and the
output folder are hashed file by file before and after the command (`check`).

What a failed run may leave (the contract `check` pins):
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


def make_env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    """The broken model folders and data files the cases point at (each test module's `env`
    fixture, test_safe_loading.py's too)."""
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
    base = {"evaluate": {"latency_runs": 1}, "export": {"latency_runs": 1}, "shrink": {}}.get(
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


def old_run(out: Path, recipe: bool = True) -> Path:
    """A finished run's folder (a previous run of the same recipe)."""
    (out / "stages").mkdir(parents=True)
    if recipe:
        (out / "recipe.yaml").write_text("name: tiny\n")
    (out / "report.json").write_text("{}\n")
    write_marker(out, "run")
    return out


def old_shrink(out: Path) -> Path:
    """An earlier `distill shrink` result."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}\n")
    write_marker(out, "shrink")
    return out


def force_into_a_run_holding(e: Env, out: Path, what: str) -> list[str]:
    """`run --force` into an old run of ours that holds the teacher (or the data) the recipe
    reads: refused before the old run is touched."""
    old_run(out)
    recipe = tiny_recipe(e.bert, e.csv)
    if what == "teacher":
        recipe["teacher"]["model"] = str(_copy_model(e.bert, out / "stages/00-finetune/model"))
    else:
        recipe["data"]["dataset"] = str(shutil.copy(e.csv, out / "reviews.csv"))
    path = out.parent / f"reads-{what}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["run", str(path), "--output", str(out), "--force"]


def locked_run(out: Path) -> Path:
    """An old run of ours that a live process (this one) is writing."""
    from distill.run.ownership import FolderLock

    FolderLock(old_run(out)).acquire()  # left held: the test's own PID, alive
    return out


def edited_run(e: Env, out: Path) -> Path:
    """A run whose recipe.yaml differs (in `seed`) from the recipe it started with."""
    from distill import recipe_from_dict
    from distill.run.pipeline import absolute_paths, recipe_digest
    from distill.config.loading import dump_recipe, recipe_to_dict

    started = absolute_paths(recipe_from_dict(tiny_recipe(e.bert, e.csv)))
    old_run(out)
    write_marker(out, "run", recipe_sha256=recipe_digest(started),
                 recipe=recipe_to_dict(started))
    dump_recipe(recipe_from_dict(tiny_recipe(e.bert, e.csv, seed=7)), out / "recipe.yaml")
    return out


def foreign(out: Path) -> Path:
    """A folder of the user's that is not a run: --force must not delete it."""
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("precious\n")
    return out


def read_only(out: Path) -> Path:
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
    # precision.json: the stage's `bf16` decision, which a resume keeps
    return len(parts) == 2 or parts[2] in ("log.jsonl", "checkpoint", "precision.json")


COMMANDS = ("run", "validate", "recipes", "inspect", "shrink", "attach", "eval", "export",
            "report")


def check(case: Case, env: Env, tmp_path: Path) -> None:
    """Run `case` through the CLI and assert the contract (see the module docstring)."""
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
            assert _snapshot(w) == before[str(w)], (
                case.id, w, _changes(before[str(w)], _snapshot(w)))
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
