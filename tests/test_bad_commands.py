"""Bad command lines (table-driven, `bad_input.check`): output folders, whose folder it is
(runs of ours, the user's, in use), and `distill shrink`, `attach`, `eval`, `inspect`,
`report`, `validate`. Each exits with code 2 and a one- or two-line message, leaving every
file around it as it was (see tests/bad_input.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bad_input import (Case, Env, check, command_cases, edited_run, force_into_a_run_holding,
                       foreign, locked_run, make_env, old_run, old_shrink, read_only)
from conftest import tiny_recipe


@pytest.fixture(scope="module")
def env(tiny_bert: Path, tiny_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tiny_bert, tiny_csv, tmp_path_factory)


def exported(e: Env, out: Path, *args: str) -> list[str]:
    """`distill export` arguments: `args`, then the tiny data and `-o out`."""
    return [*args, "--data", str(e.csv), "-o", str(out)]


CASES: list[Case] = [
    # --- the output folder
    Case("output exists without --force", "already exists; pass --force",
         args=lambda e, out: ["--output", str(old_run(out))], no_output=True),
    Case("output is a folder that is not a run", "is not empty and was not made by distill",
         args=lambda e, out: ["--output", str(foreign(out)), "--force"], no_output=True),
    Case("output is a file", "is a file, not a folder",
         args=lambda e, out: ["--output", e["a_file"]], no_output=True),
    Case("output below a file", "a-file.txt is a file, not a folder",
         args=lambda e, out: ["--output", str(e.paths["a_file"] / "run")], no_output=True),
    Case("output where nothing can be created", "the run directory /proc/distill-bad-input",
         args=lambda e, out: ["--output", "/proc/distill-bad-input/run"], no_output=True),
    Case("read-only output folder", "is not writable",
         args=lambda e, out: ["--output", str(read_only(out) / "run")], no_output=True,
         root_skip=True),
    # --- whose folder it is (distill.run.ownership)
    Case("--force into an old run that holds the teacher", "which this command reads",
         args=lambda e, out: force_into_a_run_holding(e, out, "teacher")),
    Case("--force into an old run that holds the data", "which this command reads",
         args=lambda e, out: force_into_a_run_holding(e, out, "data")),
    Case("--force into a run another process writes", "is in use by another distill process",
         args=lambda e, out: ["--output", str(locked_run(out)), "--force"], no_output=True),
    Case("--resume of a folder distill did not make", "not a run directory of distill",
         args=lambda e, out: ["run", "--resume", str(foreign(out))]),
    Case("--resume of a missing folder", "not a run directory of distill",
         args=lambda e, out: ["run", "--resume", str(out)]),
    Case("--resume after recipe.yaml was edited", "recipe.yaml was changed since the run "
         "started (seed)", args=lambda e, out: ["run", "--resume", str(edited_run(e, out))]),
    Case("--resume of a run whose recipe.yaml is gone", "its recipe.yaml is missing",
         args=lambda e, out: ["run", "--resume", str(old_run(out, recipe=False))]),
    Case("--resume with a recipe", "give no RECIPE, --set, --output or --force with it",
         args=lambda e, out: ["run", str(e.root / "x.yaml"), "--resume", str(out)]),
    Case("recipe file not UTF-8", "not UTF-8 text", lambda e, r: "name: caf\xe9\n".encode(
        "latin-1")),
    Case("validate: missing recipe", "recipe not found",
         args=lambda e, out: ["validate", str(e.root / "nope.yaml")]),
    Case("report of a folder distill did not make", "not a run",
         args=lambda e, out: ["report", str(foreign(out))]),
    Case("report of a missing folder", "not a run directory",
         args=lambda e, out: ["report", str(out)]),
    Case("report of a file", "not a run directory", args=lambda e, out: ["report", e["a_file"]]),
    # --- distill shrink
    *command_cases("shrink", [
        ("--out a folder distill did not make", "is not empty and was not made by distill",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(foreign(out)), "--force"]),
        ("--out is the model it reads", "which this command reads",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(e.bert), "--force"]),
        ("--out is a file", "is a file, not a folder",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", e["a_file"]]),
        ("--out exists without --force", "already exists; pass --force",
         lambda e, out: [str(e.bert), "--layers", "2", "--out", str(old_shrink(out))]),
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
        ("unknown method",
         "distill attach: invalid options: --method: unknown PEFT method 'lorra'",
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
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--output", str(foreign(out)),
                         "--force"]),
        ("--epochs -1", "--epochs: -1.0 is out of range",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--epochs", "-1", "-o", str(out)]),
        ("--bf16 maybe", "--bf16 'maybe': choose auto, true or false",
         lambda e, out: [str(e.bert), "--data", str(e.csv), "--bf16", "maybe", "-o", str(out)]),
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
    # --- distill export (the model, then options; the tiny data and `-o` follow: `exported`)
    *command_cases("export", [
        ("missing model", "model path not found",
         lambda e, out: exported(e, out, str(e.root / "no-model"))),
        ("unknown format",
         "distill export: invalid options: --format: 'tflite' is not allowed; allowed: 'bf16'",
         lambda e, out: exported(e, out, str(e.bert), "--format", "tflite")),
        ("unknown split", "--split: 'train' is not allowed; allowed: 'test', 'validation'",
         lambda e, out: exported(e, out, str(e.bert), "--split", "train")),
        ("batch size 0", "--batch-size: 0 is out of range",
         lambda e, out: exported(e, out, str(e.bert), "--batch-size", "0")),
        ("pickled model", "pickled", lambda e, out: exported(e, out, e["pickled"])),
        ("-o a folder distill did not make, --force", "is not empty and was not made by distill",
         lambda e, out: exported(e, foreign(out), str(e.bert), "--force")),
        ("-o is the model it reads", "which this command reads",
         lambda e, out: exported(e, e.bert, str(e.bert), "--force")),
    ]),
    # --- distill inspect
    *command_cases("inspect", [
        ("missing model", "model path not found", lambda e, out: [str(e.root / "no-model")]),
        ("damaged weights", "a safetensors weights file could not be read",
         lambda e, out: [e["damaged"]]),
        ("a file", "not a Hugging Face model directory", lambda e, out: [e["a_file"]]),
        ("pickled model", "pickled", lambda e, out: [e["pickled"]]),
    ]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_command(case: Case, env: Env, tmp_path: Path) -> None:
    check(case, env, tmp_path)


def test_at_least_a_hundred_kinds() -> None:
    """Both tables together: over a hundred kinds of bad input, each named once."""
    from test_bad_recipes import CASES as RECIPE_CASES

    every = RECIPE_CASES + CASES
    assert len(every) >= 100 and len({c.id for c in every}) == len(every)


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
