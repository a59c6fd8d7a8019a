"""Every PEFT method but AdaLoRA trains under FSDP2 and DeepSpeed ZeRO-2 (2 CPU processes)
and ends where the same launch under DDP ends.

The method settings are those of the shipped `recipes/attach-adapters.yaml` (sizes scaled to
the tiny BERT); each adapt stage trains one epoch from the finetuned teacher. Measured against
DDP: adapters within 1.1e-4 (FSDP) and 4.8e-5 (ZeRO-2), equal test accuracy for all 14
(against 1 process, whose batches pad differently, QLoRA's adapter moved by 2.0e-3). Asserted
with the tolerances of tests/test_multiprocess.py.
AdaLoRA is refused under both launches (its rank budget reads whole gradients; tested there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_tiny_bert
from test_multiprocess import (
    WEIGHT_TOL,
    max_diff,
    model_metrics,
    recipe,
    run_distill,
    weights,
)

ROOT = Path(__file__).resolve().parents[1]
# 14 methods x 3 launch modes, 2 processes each: ~5 min on 2 cores, so CI runs it and the
# default `make test` does not (tests/test_multiprocess.py covers every launch mode there).
pytestmark = pytest.mark.slow


def methods_recipe(model: Path, data: Path, topics: Path) -> dict:
    """finetune -> one adapt stage per method (attach-adapters.yaml settings) -> evaluate."""
    spec = recipe(model, data, topics, batch=16, accum=1)
    adapt_data = spec["stages"][3]["data"]
    shipped = yaml.safe_load((ROOT / "recipes/attach-adapters.yaml").read_text())
    stages = [spec["stages"][0]]
    for stage in shipped["stages"]:
        if stage["kind"] != "adapt" or stage["method"] == "adalora":
            continue
        config = dict(stage.get("config", {}))
        config |= {k: 4 for k in ("num_virtual_tokens",) if k in config}
        config |= {k: 8 for k in ("bottleneck",) if k in config}
        # fp32 pinned: the sharded and the 1-process runs must not each time bf16 on their own
        stages.append({**stage, "bf16": False, "config": config,
                       "model": "previous", "label": stage["method"], "data": adapt_data,
                       "epochs": 1, "batch_size": 16, "log_every": 2})
    spec["stages"] = [*stages, {"kind": "evaluate", "latency_runs": 1}]
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path, tiny_topics: Path
         ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    model = write_tiny_bert(root / "bert")
    config = json.loads((model / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model / "config.json").write_text(json.dumps(config))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(methods_recipe(model, tiny_csv, tiny_topics)))
    out = {}
    for mode in ("ddp", "fsdp", "deepspeed"):
        run_distill(path, root / mode, 2, mode)
        out[mode] = root / mode
    return out


@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_every_method_trains_sharded_like_data_parallel(runs, mode: str) -> None:
    one, sharded = runs["ddp"], runs[mode]
    w1, ws = weights(one), weights(sharded)
    adapters = [k for k in w1 if k.endswith("adapter_model.safetensors")]
    assert len(adapters) == 14 and w1.keys() == ws.keys()
    diffs = {k: max_diff(w1[k], ws[k]) for k in w1}
    assert max(diffs.values()) <= WEIGHT_TOL, diffs
    m1, ms = model_metrics(one), model_metrics(sharded)
    assert m1.keys() == ms.keys() and len(m1) == 16  # teacher, finetune, 14 adapters
    one_example = 1 / json.loads((one / "report.json").read_text())["data"]["sizes"]["test"]
    for k in m1:
        assert abs(m1[k][0] - ms[k][0]) <= one_example + 1e-9, (k, m1[k], ms[k])
