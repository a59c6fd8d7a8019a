"""Local data files read as pandas frames, and the checks every text and label cell passes.

    df = read_frame(path, ".csv", text_column="text")   # every failure names the file
    require_column(df, "label", "label_column", path)
    check_texts(df["text"].tolist(), path, "text"); check_labels(df["label"].tolist(), ...)

Each problem raises a `DistillError` that names the file, the column and the first rows at
fault (data rows counted from 1), so a user can open the file and fix it.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill.errors import DistillError
from distill.files import json_lines

# Raw control characters inside strings are accepted, as pandas' and Arrow's JSON readers do.
_LENIENT_JSON = json.JSONDecoder(strict=False)


def _read_records(path: Path) -> pd.DataFrame:
    """A .json file (a list of records, or JSON lines) or a .jsonl file as a DataFrame."""
    text = path.read_bytes().decode("utf-8")  # as written: no "\r" folded into "\n"
    try:
        records = _LENIENT_JSON.decode(text)
        # A single object is a one-line JSON-lines file.
        records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError:  # not one JSON document: read it as JSON lines
        records = list(_json_lines(text, path))
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DistillError(f"{path}: record {bad + 1} is {type(records[bad]).__name__}, not an "
                           "object; allowed: a JSON list of records, or one object per line")
    return pd.DataFrame.from_records(records)


def _json_lines(text: str, path: Path) -> Iterator[Any]:
    """The values of a JSON-lines text, one per line (`files.json_lines` splits it)."""
    for number, line in json_lines(text):
        try:
            yield _LENIENT_JSON.decode(line)
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path}: line {number} is not valid JSON ({exc.msg}); "
                               "allowed: a JSON list of records, or one JSON object per "
                               "line") from None


def read_frame(path: Path, suffix: str, text_column: str) -> pd.DataFrame:
    """One local data file as a DataFrame, every failure a `DistillError` naming the file."""
    try:
        if path.stat().st_size == 0:
            raise DistillError(f"{path}: the dataset is empty (an empty file)")
        if suffix in (".csv", ".tsv"):
            with warnings.catch_warnings():
                # A row with more fields than the header makes pandas take the extra leading
                # fields as an index and shift the columns (index_col=None), or drop the rest
                # with this warning (index_col=False); either way the texts would be wrong.
                warnings.simplefilter("error", pd.errors.ParserWarning)
                # Only empty cells are missing: a text that reads "NA" or "null" stays a text.
                # The text column stays text: "007" or "1e5" are texts, not numbers.
                return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",",
                                   keep_default_na=False, na_values=[""], index_col=False,
                                   dtype={text_column: str})
        if suffix == ".parquet":
            return pd.read_parquet(path)
        return _read_records(path)
    except pd.errors.ParserWarning:
        sep = "tab" if suffix == ".tsv" else "comma"
        raise DistillError(f"{path}: a row has more fields than the header; quote texts that "
                           f"contain a {sep}") from None
    except UnicodeDecodeError:
        raise DistillError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except PermissionError:
        raise DistillError(f"{path}: permission denied; make the file readable") from None
    except (ValueError, OSError) as exc:  # pandas' ParserError is a ValueError
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DistillError(f"{path}: cannot read it as {suffix}: {first}") from None


def require_column(df: pd.DataFrame, column: str, key: str, path: Path) -> None:
    """`data.<key>`'s column is in the file, else an error listing the columns (and the
    closest name)."""
    if column in df.columns:
        return
    columns = [str(c) for c in df.columns]
    close = difflib.get_close_matches(column, columns, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DistillError(f"data.{key}: column {column!r} not found in {path}; {hint}"
                       f"columns: {', '.join(columns)}")


def read_text_column(path: Path, column: str) -> list[str]:
    """The texts of column `column` of one local .csv/.tsv/.parquet file (text corpora: a row
    is a document), every text checked."""
    df = read_frame(path, path.suffix.lower(), column)
    if len(df) == 0:
        raise DistillError(f"{path}: the dataset is empty (no rows)")
    require_column(df, column, "text_column", path)
    texts = df[column].tolist()
    check_texts(texts, path, column)
    return texts


def first_rows(bad: list[int]) -> str:
    """Row indices as the messages count them (data rows from 1), the first five."""
    return ", ".join(str(i + 1) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")


def count_rows(bad: list[int], one: str = "has", many: str = "have") -> str:
    """`1 row has` / `3 rows have` (or the verbs given)."""
    return f"{len(bad)} rows {many}" if len(bad) > 1 else f"1 row {one}"


def _show(value: Any) -> str:
    """What a cell holds, for an error message: its kind and a short repr."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    kind = ("true/false" if isinstance(value, (bool, np.bool_))
            else "a list" if isinstance(value, (list, tuple))
            else "a mapping" if isinstance(value, dict)
            else "bytes" if isinstance(value, (bytes, bytearray))
            else "an integer" if isinstance(value, (int, np.integer))
            else "a number" if isinstance(value, (float, np.floating))
            else type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def check_texts(texts: list[Any], path: Path | str, column: str) -> None:
    """Every text is a non-blank string; anything else names its rows.

    A number, list, mapping or bytes in the text column is a wrong column or a broken export;
    turned into a string it would train on "[1, 2]" or "b'...'" without a word.
    """
    blank = [i for i, t in enumerate(texts)
             if _is_null(t) or (isinstance(t, str) and not t.strip())]
    if blank:
        raise DistillError(f"{path}: {count_rows(blank)} an empty or missing text in column "
                           f"{column!r} (data rows, counting from 1: {first_rows(blank)})")
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise DistillError(f"{path}: {count_rows(wrong, 'is', 'are')} not text in column "
                           f"{column!r} (data rows, counting from 1: {first_rows(wrong)}; row "
                           f"{wrong[0] + 1} holds {_show(texts[wrong[0]])}); allowed: strings")


def _label_kind(value: Any) -> str | None:
    """`string`, `integer` or `true/false` for a usable label (1.0 counts as an integer)."""
    if isinstance(value, (bool, np.bool_)):
        return "true/false"
    if isinstance(value, str):
        return "string"
    return "integer" if as_int(value) is not None else None


def check_labels(labels: list[Any], path: Path | str, column: str) -> None:
    """Every label is present and of one kind: all strings, all integers or all true/false.

    Mixed kinds would meet as text (1 and "1" the same class, 2 sorted after "10"), and floats,
    lists or bytes are no class names at all.
    """
    missing = [i for i, v in enumerate(labels)
               if _is_null(v) or (isinstance(v, str) and not v.strip())]
    if missing:
        raise DistillError(f"{path}: {count_rows(missing)} no label in column {column!r} "
                           f"(data rows, counting from 1: {first_rows(missing)})")
    first: dict[str, int] = {}
    for i, value in enumerate(labels):
        kind = _label_kind(value)
        if kind is None and isinstance(value, (float, np.floating)):
            raise DistillError(f"{path}: label {value!r} in column {column!r} (data row {i + 1}) "
                               "is not a class; allowed: string or integer labels (this is "
                               "classification)")
        if kind is None:
            raise DistillError(f"{path}: data row {i + 1} of column {column!r} holds "
                               f"{_show(value)}; allowed: string or integer labels")
        first.setdefault(kind, i)
        if len(first) > 1:
            (a, j), (b, k) = first.items()
            raise DistillError(f"{path}: column {column!r} mixes {a} labels (data row {j + 1}: "
                               f"{labels[j]!r}) and {b} labels (data row {k + 1}: "
                               f"{labels[k]!r}); allowed: one kind per column")


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (
        isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def as_int(value: Any) -> int | None:
    """The label as an integer class id if it is one (1, np.int64(1), 1.0), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None  # booleans read better as the names "False"/"True"
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)  # a CSV integer column with a NaN elsewhere becomes float
    return None
