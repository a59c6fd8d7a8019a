"""The toolkit deletes or replaces only folders it made, one writer at a time, and a resume
continues only the run it started (distill.run.ownership, distill.run.pipeline)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe
from distill.cli import app
from distill.run.ownership import (LOCK, MARKER, FolderLock, _process_start, clean_leftovers,
                               read_marker)

runner = CliRunner()


def tree(path: Path) -> dict[str, str]:
    """Every file below `path` with its SHA-256 (folders as "<dir>")."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "<dir>" for p in sorted(path.rglob("*"))}


def one_stage(tiny_bert: Path, tiny_csv: Path, tmp_path: Path, **stage: object) -> Path:
    """A recipe file with a single short finetune stage."""
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [{"kind": "finetune", "epochs": 1, "batch_size": 16, **stage}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(*argv: str) -> tuple[int, str]:
    result = runner.invoke(app, list(argv))
    return result.exit_code, result.output


def test_a_run_is_marked_and_replaced_only_with_force(tiny_bert, tiny_csv, tmp_path) -> None:
    recipe, out = one_stage(tiny_bert, tiny_csv, tmp_path), tmp_path / "run"
    code, output = run("run", str(recipe), "--output", str(out))
    assert code == 0, output
    marker = read_marker(out)
    assert marker["kind"] == "run" and len(marker["recipe_sha256"]) == 64
    assert not (out / LOCK).exists()  # released at the end
    before = tree(out)
    code, output = run("run", str(recipe), "--output", str(out))
    assert code == 2 and "already exists" in output and "--force" in output
    assert tree(out) == before
    (out / "notes.txt").write_text("mine, inside the run\n")
    code, output = run("run", str(recipe), "--output", str(out), "--force")
    assert code == 0, output
    assert not (out / "notes.txt").exists() and (out / "stages/00-finetune/model").is_dir()


def test_force_never_deletes_a_folder_of_the_users(tiny_bert, tiny_csv, tmp_path) -> None:
    """Names that look like a run's are not enough: only the marker makes a folder ours."""
    recipe, out = one_stage(tiny_bert, tiny_csv, tmp_path), tmp_path / "looks-like-a-run"
    (out / "stages").mkdir(parents=True)
    (out / "report.json").write_text("{}\n")
    (out / "recipe.yaml").write_text("name: mine\n")
    (out / "thesis.tex").write_text("precious\n")
    before = tree(out)
    for extra in ([], ["--force"]):
        code, output = run("run", str(recipe), "--output", str(out), *extra)
        assert code == 2 and "was not made by distill" in output, output
        assert tree(out) == before


def test_force_refuses_a_run_that_holds_the_teacher(tiny_bert, tiny_csv, tmp_path) -> None:
    """The tuned teacher of a first run, read by a second run into the same folder: replacing
    the folder would delete the teacher before it is loaded."""
    out = tmp_path / "run"
    code, output = run("run", str(one_stage(tiny_bert, tiny_csv, tmp_path)), "-o", str(out))
    assert code == 0, output
    recipe = tiny_recipe(out / "stages/00-finetune/model", tiny_csv)
    recipe["stages"] = [{"kind": "evaluate", "latency": False}]
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = tree(out)
    code, output = run("run", str(path), "--output", str(out), "--force")
    assert code == 2 and "which this command reads" in output, output
    assert tree(out) == before


def test_a_live_writer_holds_the_lock(tiny_bert, tiny_csv, tmp_path) -> None:
    recipe, out = one_stage(tiny_bert, tiny_csv, tmp_path), tmp_path / "run"
    assert run("run", str(recipe), "-o", str(out))[0] == 0
    before = tree(out)
    with FolderLock(out):  # this process is alive: the lock is live
        code, output = run("run", str(recipe), "-o", str(out), "--force")
        assert code == 2 and "in use by another distill process" in output, output
        code, output = run("run", "--resume", str(out))
        assert code == 2 and "in use by another distill process" in output, output
        code, output = run("report", str(out))
        assert code == 2 and "in use" in output, output
        assert {k: v for k, v in tree(out).items() if k != LOCK} == before


def test_a_stale_lock_is_taken_over(tmp_path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(gone.stdout)  # a process that has ended
    import socket

    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    with pytest.raises(Exception, match="in use by another distill process"):
        FolderLock(tmp_path).acquire()  # another host's lock: its process cannot be checked


def test_resume_refuses_an_edited_recipe(tiny_bert, tiny_csv, tmp_path) -> None:
    recipe, out = one_stage(tiny_bert, tiny_csv, tmp_path), tmp_path / "run"
    assert run("run", str(recipe), "-o", str(out))[0] == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    saved["seed"] = 7
    saved["stages"][0]["learning_rate"] = 0.5
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, output = run("run", "--resume", str(out))
    assert code == 2 and "recipe.yaml was changed since the run started" in output
    assert "seed" in output and "stages.0.learning_rate" in output


def test_resume_from_another_folder_with_a_relative_output(tiny_bert, tiny_csv, tmp_path,
                                                          monkeypatch) -> None:
    """Paths are stored absolute: a run started as `-o run` resumes from anywhere."""
    recipe = one_stage(tiny_bert, tiny_csv, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run("run", str(recipe), "-o", "run")[0] == 0
    stored = yaml.safe_load((work / "run/recipe.yaml").read_text())
    assert Path(stored["teacher"]["model"]).is_absolute()
    state = json.loads((work / "run/state.json").read_text())
    assert all(Path(m["path"]).is_absolute() for m in state["models"])
    monkeypatch.chdir(tmp_path)
    code, output = run("run", "--resume", str(work / "run"))
    assert code == 0, output
    assert "resuming after 1 finished stage" in output


def test_report_writes_only_into_runs_of_its_own(tmp_path) -> None:
    folder = tmp_path / "someone-elses"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"recipe": "x", "stages": []}))
    (folder / "report.md").write_text("their notes\n")
    before = tree(folder)
    code, output = run("report", str(folder))
    assert code == 2 and "was not made by distill" in output
    assert tree(folder) == before


def test_saved_files_follow_the_umask(tiny_bert, tiny_csv, tmp_path) -> None:
    recipe, out = one_stage(tiny_bert, tiny_csv, tmp_path), tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run("run", str(recipe), "-o", str(out))[0] == 0
    finally:
        os.umask(old)
    model = out / "stages/00-finetune/model"
    for path in (model, model / "model.safetensors", out / "report.json", out / MARKER):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_leftovers_of_an_interrupted_save_are_cleaned(tmp_path) -> None:
    from distill.run.ownership import write_marker

    (tmp_path / "stages/00-finetune/.tmp-model-ab1_x9zq").mkdir(parents=True)
    (tmp_path / "stages/00-finetune/.tmp-model-ab1_x9zq/model.safetensors").write_bytes(b"x")
    (tmp_path / ".report.json.123.ab12cd34.tmp").write_text("{")
    # The user's own files that merely look alike: not names our writers give.
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / ".notes.tmp").write_text("x")
    (tmp_path / ".tmp-mine").mkdir()
    assert clean_leftovers(tmp_path) == []  # not ours: nothing is touched
    write_marker(tmp_path, "run")
    gone = clean_leftovers(tmp_path)
    assert len(gone) == 2 and sorted(p.name for p in tmp_path.rglob("*")) == [
        ".distill.json", ".notes.tmp", ".tmp-mine", "00-finetune", "keep.txt", "stages"]


def test_shrink_out_is_owned_like_a_run(tiny_bert, tmp_path) -> None:
    cut = ["shrink", str(tiny_bert), "--layers", "1", "--strategy", "uniform"]
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes/todo.txt").write_text("the user's\n")
    before = tree(mine)
    code, output = run(*cut, "--out", str(mine), "--force")  # not ours: --force changes nothing
    assert code == 2 and "was not made by distill" in output, output
    assert tree(mine) == before
    source = tree(tiny_bert)
    code, output = run(*cut, "--out", str(tiny_bert), "--force")  # the model it reads
    assert code == 2 and "which this command reads" in output, output
    assert tree(tiny_bert) == source
    small = tmp_path / "small"
    assert run(*cut, "--out", str(small))[0] == 0
    assert read_marker(small)["kind"] == "shrink" and (small / "model.safetensors").is_file()
    assert not list(tmp_path.glob(f".*{LOCK}"))  # the sibling lock is released
    code, output = run(*cut, "--out", str(small))
    assert code == 2 and "already exists; pass --force" in output, output
    assert run(*cut, "--out", str(small), "--force")[0] == 0


def test_a_live_shrink_lock_blocks_a_second_writer(tiny_bert, tmp_path) -> None:
    small = tmp_path / "small"
    with FolderLock(tmp_path, f".small{LOCK}"):
        code, output = run("shrink", str(tiny_bert), "--layers", "1", "--strategy", "uniform",
                           "--out", str(small))
    assert code == 2 and f"{small} is in use by another distill process" in output, output
    assert not small.exists()


def test_a_lock_of_a_killed_unreaped_process_is_stale(tmp_path) -> None:
    """A writer killed whose parent has not reaped it yet (a zombie: `kill -0` still succeeds)
    holds no lock: a resume right after a kill must not wait for the reaper."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({
            "pid": child.pid, "host": socket.gethostname(),
            "process_start": _process_start(child.pid)}))
        child.kill()
        deadline = time.time() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
        with FolderLock(tmp_path):  # not reaped yet, and still taken over
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()


def test_only_checkpoint_folders_of_ours_are_removed(tmp_path) -> None:
    from distill.train.checkpoint import remove_all

    ours = tmp_path / "stages/00-finetune/checkpoint"
    (ours / "step-4").mkdir(parents=True)
    (ours / "latest").write_text("step-4\n")
    mine = tmp_path / "stages/00-finetune/notes/checkpoint"  # a folder of the same name
    mine.mkdir(parents=True)
    (mine / "plan.txt").write_text("x")
    remove_all(tmp_path / "stages/00-finetune")
    assert not ours.exists() and (mine / "plan.txt").is_file()
