"""`bf16: auto`: the matmul screen, the timed steps of the stage's own model, the decision kept
for a resumed stage, and what the run records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from rich.console import Console
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import tiny_recipe
from distill import DistillError, recipe_from_dict, run_recipe
from distill.config.recipe import TrainArgs
from distill.data.batching import pad_collator
from distill.stages import training
from distill.train import precision
from distill.train.precision import STEP_WIN, Precision, bf16_is_faster, decide


@pytest.mark.parametrize("setting", ["auto", False])
def test_the_stage_records_its_decision(setting: object, tiny_bert: Path, tiny_csv: Path,
                                        tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_bert, tiny_csv)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 0.25, "bf16": setting}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    metrics = json.loads((tmp_path / "run/stages/00-finetune/metrics.json").read_text())
    record = metrics["precision"]
    assert report["stages"][0]["precision"] == record  # in report.json too
    assert record["setting"] == setting and metrics["bf16"] is record["bf16"]
    if setting is False:
        assert record == {"setting": False, "bf16": False, "decided_by": "setting"}
    elif not bf16_is_faster("cpu"):
        assert record == {"setting": "auto", "bf16": False, "decided_by": "matmul screen"}
    else:  # the two step times of the stage's model decided
        assert record["decided_by"] == "step timing"
        assert record["bf16"] is (record["bf16_step_s"] <= STEP_WIN * record["fp32_step_s"])
        assert record["bf16_speedup"] == pytest.approx(
            record["fp32_step_s"] / record["bf16_step_s"], rel=1e-2)


def test_auto_is_the_default() -> None:
    recipe = recipe_from_dict({"teacher": {"model": "m"}, "data": {"dataset": "d.csv"},
                               "stages": [{"kind": "finetune"}, {"kind": "distill"}]})
    assert [s.bf16 for s in recipe.stages] == ["auto", "auto"]
    assert TrainArgs().bf16 == "auto"


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.5, True), (1.0, 0.875, True),
                                                (1.0, 0.9375, False), (1.0, 2.0, False)])
def test_step_timing_decides_where_the_screen_passes(
        fp32: float, bf16: float, chosen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "bf16_is_faster", lambda device: True)
    calls: list[bool] = []
    clock = [0.0]

    def step(use_bf16: bool) -> None:  # advances a fake clock by the precision's step time
        calls.append(use_bf16)
        clock[0] += bf16 if use_bf16 else fp32

    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])
    got = decide("auto", "cpu", step)
    assert got == Precision("auto", chosen, "step timing", fp32, bf16)
    assert calls == [False, True, False, True, False, True]  # warm-up, then alternating
    assert got.record()["bf16_speedup"] == round(fp32 / bf16, 3)


def test_the_screen_spares_the_model_where_bf16_is_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without bf16 units a bf16 step can take a minute: no step is timed there."""
    monkeypatch.setattr(precision, "bf16_is_faster", lambda device: False)

    def step(use_bf16: bool) -> None:
        raise AssertionError("the model was timed")

    assert decide("auto", "cpu", step) == Precision("auto", False, "matmul screen")
    assert decide(True, "cpu", step) == Precision(True, True, "setting")
    assert decide(False, "cpu", step).record() == {"setting": False, "bf16": False,
                                                   "decided_by": "setting"}


def test_bf16_is_measured_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen times one core (a busy neighbour on the others would skew an all-threads
    timing towards fp32), and the thread count is restored afterwards."""
    seen: list[int] = []

    def timed(bf16: bool, repeats: int = 3) -> float:
        seen.append(torch.get_num_threads())
        return 1.0 if bf16 else 2.0

    threads = torch.get_num_threads()
    monkeypatch.setattr(precision, "matmul_seconds", timed)
    precision.bf16_is_faster.cache_clear()
    try:
        assert precision.bf16_is_faster("cpu") is True
    finally:
        precision.bf16_is_faster.cache_clear()
    assert seen == [1, 1] and torch.get_num_threads() == threads


def test_bf16_setting_values() -> None:
    assert bf16_is_faster("meta") is False  # no measurement off CPU/CUDA
    assert isinstance(bf16_is_faster("cpu"), bool)
    hits = bf16_is_faster.cache_info().hits
    bf16_is_faster("cpu")
    assert bf16_is_faster.cache_info().hits == hits + 1  # screened once per process
    with pytest.raises(DistillError, match="stages.0.bf16: 'maybe' should be true/false or "
                                           "one of 'auto'"):
        recipe_from_dict({"teacher": {"model": "m"}, "data": {"dataset": "d.csv"},
                          "stages": [{"kind": "finetune", "bf16": "maybe"}]})


def _ctx(tiny_bert: Path) -> SimpleNamespace:
    """What `probe_step` and `stage_precision` read of a run's context."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"input_ids": [1, 5, 6, 2][:n], "attention_mask": [1] * min(n, 4), "labels": n % 2,
             "idx": n} for n in range(2, 9)]
    task = SimpleNamespace(collate=lambda tok: pad_collator(tok))
    return SimpleNamespace(tokenized=lambda split: rows, task=task, tokenizer=tokenizer,
                           accelerator=Accelerator(cpu=True), is_main=True,
                           console=Console(quiet=True), from_main=lambda value: value)


def test_the_probe_step_leaves_no_trace(tiny_bert: Path) -> None:
    """Timing the steps changes no weight, leaves no gradient and draws no random numbers
    that training would otherwise have drawn (dropout)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step = training.probe_step(_ctx(tiny_bert), model, batch_size=4)
    for bf16 in (False, True):
        step(bf16)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training  # its mode restored


def test_a_frozen_model_is_timed_as_if_it_trained(tiny_bert: Path) -> None:
    """A shrink stage's starting model is frozen: its step is timed with a backward pass all
    the same, and it is frozen again afterwards."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model.requires_grad_(False)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.logits.requires_grad))
    training.probe_step(_ctx(tiny_bert), model, batch_size=4)(False)
    assert seen == [True]  # a graph to the weights was built (and backward ran through it)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_a_resumed_stage_keeps_its_decision(tiny_bert: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision is written beside the stage's log; a resumed stage reads it instead of
    measuring again (a new measurement could flip it, and the teacher cache with it)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    ctx = _ctx(tiny_bert)
    first = training.stage_precision(ctx, model, TrainArgs(), tmp_path, "finetune")
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert saved == first.record()
    flipped = first.record() | {"bf16": not first.bf16}
    (tmp_path / "precision.json").write_text(json.dumps(flipped))

    def no_measuring(*args: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(training, "decide", no_measuring)
    again = training.stage_precision(ctx, model, TrainArgs(), tmp_path, "finetune")
    assert again.bf16 is not first.bf16 and again.record() == flipped


def test_probe_costs_a_few_steps(tiny_bert: Path) -> None:
    """Six forward + backward passes (two warm-up, four timed), no more."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(time.perf_counter()))
    fp32, bf16 = precision.time_steps(training.probe_step(_ctx(tiny_bert), model, 4))
    assert len(calls) == 6 and fp32 > 0 and bf16 > 0


def test_every_rank_takes_rank_zeros_decision(tiny_bert: Path, tmp_path: Path) -> None:
    """A rank other than 0 reads no file and measures nothing: it joins rank 0's broadcast
    even when rank 0 has already written precision.json (skipping the broadcast there hung a
    2-process run)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    (tmp_path / "precision.json").write_text(json.dumps(
        {"setting": "auto", "bf16": True, "decided_by": "step timing",
         "fp32_step_s": 2.0, "bf16_step_s": 1.0}))
    rank0 = {"setting": "auto", "bf16": False, "decided_by": "matmul screen"}
    calls: list[object] = []

    def broadcast(value: object) -> dict:
        calls.append(value)
        return rank0

    ctx = _ctx(tiny_bert)
    ctx.is_main, ctx.from_main = False, broadcast
    got = training.stage_precision(ctx, model, TrainArgs(), tmp_path, "distill")
    assert calls == [None] and got == Precision.from_record(rank0)
