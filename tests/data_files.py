"""Data files for the tests of `distill.data.tables` (test_data_sources.py, test_data_errors.py):
rows of distinct texts, written as csv/tsv/json/jsonl/parquet, loaded through a recipe's data
settings, and the error a bad one raises."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from distill.config.recipe import DataConfig
from distill.data.tables import TaskData, load_task_data
from distill.errors import DistillError


def make_rows(n: int, labels: list) -> list[dict]:
    """n rows of distinct texts cycling through `labels`."""
    return [{"text": f"example number {i} " + "word " * (i % 7), "label": labels[i % len(labels)]}
            for i in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:  # .json: a list of records
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def parse(path: Path | str, **kw) -> TaskData:
    return load_task_data(DataConfig(dataset=str(path), **kw))


def reason(path: Path | str, **kw) -> str:
    with pytest.raises(DistillError) as info:
        parse(path, **kw)
    return str(info.value)
