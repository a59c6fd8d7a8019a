"""Checkpoints and resume: a killed or crashed run continues and ends exactly where an
uninterrupted run ends (bitwise on CPU: same data order, dropout masks, optimizer state).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from distill import recipe_from_dict, run_recipe
from distill.train.checkpoint import load_latest, save_checkpoint
from distill.run.pipeline import resume_recipe


class Crash(RuntimeError):
    pass


def crashing_recipe(model: Path, data: Path) -> dict:
    """finetune -> distill -> evaluate with checkpoints every 2 steps and dropout on."""
    recipe = tiny_recipe(model, data)
    recipe["stages"][0].update(epochs=3, checkpoint_every=2)
    recipe["stages"][1].update(epochs=3, checkpoint_every=2, grad_accum_steps=2)
    recipe["stages"][2]["latency"] = False
    return recipe


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / stage / "model" / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (a, b))
    assert ra["final"]["metric"] == rb["final"]["metric"]
    assert ra["teacher"]["metric"] == rb["teacher"]["metric"]
    for stage in ("00-finetune", "01-distill"):
        wa, wb = weights(a, stage), weights(b, stage)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{stage}: {k} differs"


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, tiny_csv: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    # One thread, like the tests below (module fixtures run outside the per-test thread
    # fixture): another thread count sums in another order, and bitwise checks would fail.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(recipe_from_dict(crashing_recipe(tiny_bert, tiny_csv)), output=out)
    finally:
        torch.set_num_threads(threads)
    return out


def crash_in_distill(model: Path, data: Path, out: Path, monkeypatch, step: int) -> Path:
    """Run `crashing_recipe` into `out` until the distill stage crashes at optimizer step
    `step` (2 micro-batches per step); the stage's forward is restored afterwards."""
    from distill.train.objective import Objective

    calls = {"n": 0}
    original = Objective.forward

    def forward(self, batch):
        if self.loss.w.alpha < 1:  # the distill stage's objective, not finetune's
            calls["n"] += 1
            if calls["n"] == 2 * step + 1:
                raise Crash("killed")
        return original(self, batch)

    monkeypatch.setattr(Objective, "forward", forward)
    with pytest.raises(Crash):
        run_recipe(recipe_from_dict(crashing_recipe(model, data)), output=out)
    monkeypatch.setattr(Objective, "forward", original)
    return out


@pytest.mark.parametrize("crash_at", [5, 9])  # mid-epoch (step 5), just after epoch 1 ends
def test_crash_in_a_stage_resumes_bitwise(tiny_bert: Path, tiny_csv: Path, tmp_path: Path,
                                          reference: Path, monkeypatch, crash_at: int) -> None:
    out = crash_in_distill(tiny_bert, tiny_csv, tmp_path / "run", monkeypatch, crash_at)
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done", "failed"]
    assert any((out / "stages/01-distill/checkpoint").glob("step-*"))
    resume_recipe(out)
    assert_same_run(out, reference)
    assert not (out / "stages/01-distill/checkpoint").exists()  # removed once finished
    log = [json.loads(x) for x in (out / "stages/01-distill/log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in log if x["type"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_damaged_checkpoints_are_named_before_the_stage_starts_again(
        tiny_bert: Path, tiny_csv: Path, tmp_path: Path, reference: Path, monkeypatch) -> None:
    from rich.console import Console

    # Crashed at step 9: checkpoints step-6 and step-8 exist.
    out = crash_in_distill(tiny_bert, tiny_csv, tmp_path / "run", monkeypatch, 9)
    folders = sorted((out / "stages/01-distill/checkpoint").glob("step-*"))
    assert [p.name for p in folders] == ["step-6", "step-8"]
    for folder in folders:  # cut short, as a full disk would leave them
        weights_file = folder / "weights.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:-9])
    console = Console(record=True, width=400)
    resume_recipe(out, console=console)
    said = console.export_text()
    assert "damaged checkpoint(s)" in said and "(step-8, step-6:" in said, said
    assert "the stage starts again from step 0" in said
    assert_same_run(out, reference)


def test_sigkill_mid_stage_then_resume_matches_uninterrupted(
        tiny_bert: Path, tiny_csv: Path, tmp_path: Path, reference: Path) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(crashing_recipe(tiny_bert, tiny_csv)))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "distill", "run", str(recipe_path), "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "stages/01-distill/log.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = log.read_text().splitlines() if log.is_file() else []
            if sum('"train"' in x for x in lines) >= 3:  # 6 of 18 steps done
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "stages/01-distill/model").exists()
    done = subprocess.run([sys.executable, "-m", "distill", "run", "--resume", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after 1 finished stage" in done.stdout
    assert "resuming from step-" in done.stdout
    assert_same_run(out, reference)


def test_a_truncated_checkpoint_is_never_used(tmp_path: Path) -> None:
    w = {"w": torch.arange(6.0)}
    save_checkpoint(tmp_path, 2, w, {"x": torch.ones(2)}, {"steps": 2})
    save_checkpoint(tmp_path, 4, {"w": w["w"] + 1}, {"x": torch.ones(2)}, {"steps": 4})
    assert load_latest(tmp_path)["loop"]["steps"] == 4
    path = tmp_path / "step-4" / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-7])  # cut short, as a crash during a copy would
    ckpt = load_latest(tmp_path)
    assert ckpt["loop"]["steps"] == 2 and torch.equal(ckpt["weights"]["w"], w["w"])
    (tmp_path / "step-2" / "state.pt").write_bytes(b"")
    assert load_latest(tmp_path) is None
    # only the newest `keep` checkpoints stay
    for step in (6, 8, 10):
        save_checkpoint(tmp_path, step, w, {}, {"steps": step})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-10", "step-8"]


def test_resume_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distill.cli import app

    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    result = CliRunner().invoke(app, ["run", "x.yaml", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "give no RECIPE" in result.output


def test_a_checkpoint_from_another_launch_mode_is_refused(tmp_path: Path) -> None:
    """An FSDP checkpoint keys the optimizer state by name, a DeepSpeed one holds per-rank
    partitions: resuming under another launch must stop with a message, not misload."""
    from torch import nn
    from torch.utils.data import DataLoader

    from distill import DistillError
    from distill.config.recipe import TrainArgs
    from distill.train.loop import make_accelerator, train_loop

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, batch):
            return self.lin(batch["x"]).pow(2).mean(), {}

    unit = Unit()
    save_checkpoint(tmp_path / "checkpoint", 2, unit.state_dict(), {}, {"parallel": "fsdp"})
    loader = DataLoader([{"x": torch.ones(2)}] * 4, batch_size=2)
    with pytest.raises(DistillError, match="written by a fsdp launch and this is a "
                                           "data-parallel launch; resume with the launch"):
        train_loop(unit, loader, TrainArgs(epochs=1), accelerator=make_accelerator(),
                   keep=unit, log_path=tmp_path / "log.jsonl")
