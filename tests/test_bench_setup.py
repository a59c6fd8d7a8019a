"""The benchmarks measure what the shipped recipes do: settings a bench script writes out by
hand (because a cache is keyed by their text) are pinned here to the recipe they copy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distill import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_teacher_is_tuned_as_the_default_recipe_tunes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import minilm_stages

    shipped = load_recipe(minilm_stages.RECIPE)
    bench = load_recipe(minilm_stages.RECIPE, [f"stages=[{minilm_stages.TUNE}]"])
    tune = dataclasses.replace(shipped.stages[0], seed=shipped.seed)  # a stage's seed: the run's
    assert bench.stages == [tune]
    other = load_recipe(minilm_stages.RECIPE, ["stages=[{kind: finetune, epochs: 2}]"])
    assert other.stages != [tune]  # the comparison sees a changed setting


def test_the_serving_recipe_starts_as_the_default_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/serving.py replaces the serving recipe's teacher tuning by the cached one
    (`tuned_teacher`, the default recipe's) and calls its distill stage the default
    recipe's student: both hold only while the two recipes agree on them."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import minilm_stages
    import serving

    default, served = load_recipe(minilm_stages.RECIPE), load_recipe(serving.SERVING)
    assert (served.teacher, served.data, served.seed) == (default.teacher, default.data,
                                                          default.seed)
    assert served.stages[:2] == default.stages[:2]  # the tuning and the 3-layer student
    stages = serving.served_stages()
    export = load_recipe(serving.SERVING, [f"stages=[{stages[-1]}]"]).stages[0]
    assert export.kind == "export" and export.formats == ["onnx-int8"]
    assert export.trim_vocabulary and not export.latency  # the bench times the models itself
    assert len(stages) == len(served.stages) - 1
