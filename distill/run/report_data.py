"""Reading a report.json that may be partially filled (a failed run still gets one): numbers,
stages, the models with their metrics. Shared by the tables (`distill.run.report`) and the plots
(`distill.run.plots`).
"""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> float | None:
    """A finite number, or None (bools, strings, NaN and missing values are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def report_stages(report: dict) -> list[dict]:
    stages = report.get("stages")
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def stage_label(stage: dict) -> str:
    index, kind = stage.get("index"), stage.get("kind", "stage")
    return f"{index:02d}-{kind}" if isinstance(index, int) else str(kind)


def report_models(report: dict) -> list[tuple[str, dict, dict]]:
    """(label, model metrics, stage) for the teacher and each stage with a model entry.

    Empty entries are skipped: the pipeline starts with `"teacher": {}` and fills it at the
    end, so a run that failed midway would otherwise show a teacher row of dashes only.
    """
    rows = []
    teacher = as_dict(report.get("teacher"))
    if teacher:
        rows.append(("teacher", report["teacher"], {}))
    for stage in report_stages(report):
        model = as_dict(stage.get("model"))
        if not model:
            continue
        if model == teacher:
            # A finetune stage's model *is* the teacher: one row, labelled as both.
            rows[0] = (f"teacher ({stage_label(stage)})", report["teacher"], stage)
            continue
        steps = [st for st in stage.get("steps") or [] if as_dict(st.get("model"))]
        if steps:
            # A shrink stage: one row per step; the stage's own model is its last step's.
            for st in steps:
                rows.append((f"{stage_label(stage)}/{st.get('name', st.get('index'))}",
                             st["model"], stage))
            continue
        rows.append((stage_label(stage), stage["model"], stage))
    return rows


def metric_name(model: dict) -> str | None:
    metric = as_dict(model.get("metric"))
    return str(metric.get("name") or "metric") if metric else None


def metric_names(models: list[tuple[str, dict, dict]]) -> list[str]:
    """Distinct metric names in table order (a metric without a name is just "metric")."""
    return list(dict.fromkeys(n for _, m, _ in models if (n := metric_name(m))))


def extra(model: dict, stage: dict, key: str) -> Any:
    # DESIGN.md puts method/trainable_params in the model metrics of adapter stages; accept them
    # on the stage itself too, so a pipeline that records them there still shows up.
    return model.get(key, stage.get(key))
