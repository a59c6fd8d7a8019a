"""Tests of distill.data.tables on bad data: missing paths and columns, empty or null texts and
labels, columns of the wrong kind, split files that cannot be read, LM documents that are not
UTF-8; each a DistillError naming the file and what is allowed."""

from __future__ import annotations

import os
import json
from pathlib import Path

import pandas as pd
import pytest

from data_files import make_rows, parse, reason, write_rows
from distill.errors import DistillError


# ----------------------------------------------------------------------------- errors
def test_missing_path_and_bad_extension(tmp_path: Path) -> None:
    msg = reason(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "no such file" in msg and ".parquet" in msg
    assert "did you mean `builtin:rotten_tomatoes`" in reason("rotten_tomatoes")
    (tmp_path / "d.xlsx").write_text("x")
    msg = reason(tmp_path / "d.xlsx")
    assert "d.xlsx" in msg and "'.xlsx'" in msg and ".jsonl" in msg


def test_folder_without_train(tmp_path: Path) -> None:
    write_rows(tmp_path / "test.csv", make_rows(10, ["a", "b"]))
    msg = reason(tmp_path)
    assert str(tmp_path) in msg and "no train file" in msg and "test.csv" in msg


def test_folder_with_two_train_files(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.csv", make_rows(20, ["a", "b"]))
    write_rows(tmp_path / "train.jsonl", make_rows(20, ["a", "b"]))
    assert "several train files" in reason(tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    rows = [{"txt": r["text"], "label": r["label"]} for r in make_rows(20, ["a", "b"])]
    msg = reason(write_rows(tmp_path / "d.csv", rows))
    assert "'text'" in msg and "d.csv" in msg and "did you mean 'txt'" in msg
    assert "columns: txt, label" in msg and "data.text_column" in msg
    msg = reason(tmp_path / "d.csv", text_column="txt", label_column="category")
    assert "'category'" in msg and "data.label_column" in msg


def test_empty_and_null_texts(tmp_path: Path) -> None:
    rows = make_rows(20, ["a", "b"])
    rows[3]["text"], rows[5]["text"], rows[9]["text"] = "", "   ", None
    msg = reason(write_rows(tmp_path / "d.jsonl", rows))
    assert "3 rows" in msg and "empty or missing text" in msg and "4, 6, 10" in msg
    msg = reason(write_rows(tmp_path / "d.csv", rows))
    assert "3 rows" in msg and "d.csv" in msg


def test_null_labels(tmp_path: Path) -> None:
    rows = make_rows(20, ["a", "b"])
    rows[2]["label"] = None
    assert "1 row has no label" in reason(write_rows(tmp_path / "d.jsonl", rows))


def test_unseen_eval_label(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.csv", make_rows(20, ["a", "b"]))
    write_rows(tmp_path / "validation.csv", make_rows(4, ["a", "c", "d"]))
    msg = reason(tmp_path)
    assert "c, d" in msg and "validation" in msg and "allowed: a, b" in msg


def test_too_few_classes_and_rows(tmp_path: Path) -> None:
    msg = reason(write_rows(tmp_path / "one.csv", make_rows(20, ["only"])))
    assert "1 class" in msg and "at least 2" in msg
    msg = reason(write_rows(tmp_path / "tiny.csv", make_rows(9, ["a", "b"])))
    assert "9 rows" in msg and "too few" in msg


# Characters that str.splitlines() breaks on but JSON Lines does not: NEL, LINE and PARAGRAPH
# SEPARATOR (all three occur in real Rotten Tomatoes reviews), form feed, vertical tab, lone CR.
_LINE_BREAKERS = ["\u0085", "\u2028", "\u2029", "\x0c", "\x0b", "\r", "\x1c"]


@pytest.mark.parametrize("escape", [False, True], ids=["raw", "escaped"])
def test_jsonl_strings_keep_unicode_line_breaks(tmp_path: Path, escape: bool) -> None:
    texts = [f"before{ch}after {i}" for i, ch in enumerate(_LINE_BREAKERS * 3)]
    rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(texts)]
    # ensure_ascii=False writes U+0085/U+2028/U+2029 raw; the control characters stay escaped
    # unless written raw below (readers such as pandas and Arrow accept raw ones too).
    lines = [json.dumps(r, ensure_ascii=escape) for r in rows]
    if not escape:
        lines = [line.replace("\\f", "\f").replace("\\r", "\r").replace("\\u000b", "\x0b")
                 .replace("\\u001c", "\x1c") for line in lines]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))  # CRLF line ends too
    data = parse(path)
    assert sorted(data.train.texts + data.validation.texts + data.test.texts) == sorted(texts)


def test_jsonl_bad_line_number_counts_only_newlines(tmp_path: Path) -> None:
    # A U+2028 inside line 1 must not shift the number of the bad line.
    (tmp_path / "bad.jsonl").write_text('{"text": "a\u2028b", "label": 1}\n{"text": oops}\n',
                                        encoding="utf-8")
    assert "line 2" in reason(tmp_path / "bad.jsonl")


def test_empty_dataset_and_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "empty" in reason(tmp_path / "empty.csv")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in reason(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    assert "line 2" in reason(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text('["a", "b"]')
    assert "not an object" in reason(tmp_path / "list.json")


def test_non_integer_float_labels(tmp_path: Path) -> None:
    msg = reason(write_rows(tmp_path / "d.csv", make_rows(20, [0.5, 1.5])))
    assert "0.5" in msg and "string or integer" in msg


def test_bad_caps() -> None:
    assert "data.max_train_examples" in reason("builtin:bbc_news", max_train_examples=0)


# ----------------------------------------------------------------------------- column types
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad, shown", [
    ([1, 2], "a list [1, 2]"),
    ({"a": "b"}, "a mapping {'a': 'b'}"),
    (5, "an integer 5"),
    (2.5, "a number 2.5"),
    (True, "true/false True"),
])
def test_text_column_must_hold_strings(tmp_path: Path, bad: object, shown: str) -> None:
    rows = make_rows(20, ["a", "b"])
    rows[3]["text"] = rows[7]["text"] = bad
    path = _jsonl(tmp_path / "d.jsonl", rows)
    assert reason(path) == (f"{path}: 2 rows are not text in column 'text' (data rows, counting "
                            f"from 1: 4, 8; row 4 holds {shown}); allowed: strings")


def test_parquet_bytes_and_list_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([f"t{i}".encode() for i in range(20)]),
                             "label": [i % 2 for i in range(20)]}), path)
    assert reason(path) == (f"{path}: 20 rows are not text in column 'text' (data rows, counting "
                            "from 1: 1, 2, 3, 4, 5, ...; row 1 holds bytes b't0'); allowed: "
                            "strings")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20)],
                             "label": pa.array([[i % 2] for i in range(20)])}), path)
    assert reason(path) == (f"{path}: data row 1 of column 'label' holds a list [0]; allowed: "
                            "string or integer labels")


def test_numeric_looking_csv_texts_stay_texts(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"00{i},{'ab'[i % 2]}\n" for i in range(20)))
    data = parse(path)
    assert sorted(data.train.texts + data.validation.texts + data.test.texts) == sorted(
        f"00{i}" for i in range(20))


@pytest.mark.parametrize("patch, expected", [
    ({5: 1}, "column 'label' mixes string labels (data row 1: 'a') and integer labels "
             "(data row 6: 1); allowed: one kind per column"),
    ({5: "1"}, None),  # all strings: fine
    ({0: {"x": 1}}, "data row 1 of column 'label' holds a mapping {'x': 1}; allowed: string "
                    "or integer labels"),
    ({2: ""}, "1 row has no label in column 'label' (data rows, counting from 1: 3)"),
    ({2: "  ", 4: None}, "2 rows have no label in column 'label' (data rows, counting from 1: "
                         "3, 5)"),
    ({4: 0.5}, "label 0.5 in column 'label' (data row 5) is not a class; allowed: string or "
               "integer labels (this is classification)"),
])
def test_label_column_holds_one_kind(tmp_path: Path, patch: dict, expected: str | None) -> None:
    rows = make_rows(20, ["a", "b"])
    for i, v in patch.items():
        rows[i]["label"] = v
    path = _jsonl(tmp_path / "d.jsonl", rows)
    if expected is None:
        assert parse(path).label_names == ["1", "a", "b"]
    else:
        assert reason(path) == f"{path}: {expected}"


def test_true_false_labels_are_one_kind_not_integers(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", make_rows(20, [True, False]))
    assert parse(path).label_names == ["False", "True"]
    rows = make_rows(20, [True, False])
    rows[1]["label"] = 0
    _jsonl(path, rows)
    assert reason(path) == (f"{path}: column 'label' mixes true/false labels (data row 1: True) "
                            "and integer labels (data row 2: 0); allowed: one kind per column")


def test_integer_valued_float_labels_are_integers(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", make_rows(20, [1.0, 2]))
    assert parse(path).label_names == ["1", "2"]


def test_csv_row_with_extra_fields(tmp_path: Path) -> None:
    # Without the check pandas made "hello" and " world" an index and read the label as text.
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello, world,a\n" + "".join(
        f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    assert reason(path) == (f"{path}: a row has more fields than the header; quote texts that "
                            "contain a comma")


# ----------------------------------------------------------------------------- unreadable splits
def _folder(tmp_path: Path) -> Path:
    write_rows(tmp_path / "train.csv", make_rows(40, ["a", "b"]))
    return tmp_path


_OR_NONE = ("; allowed: a {s}{{.csv,.tsv,.json,.jsonl,.parquet}} file, or no {s} file (then "
            "10 % of train is held out for it)")


@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "test.txt").write_text("text,label\nx,a\n"),
     "{d}/test.txt looks like the test split but has the unsupported type '.txt'"
     + _OR_NONE.format(s="test")),
    (lambda d: (d / "validation.csv").mkdir(),
     "{d}/validation.csv looks like the validation split but is a folder, not a file"
     + _OR_NONE.format(s="validation")),
    (lambda d: (d / "dev.jsonl").symlink_to(d / "gone.jsonl"),
     "{d}/dev.jsonl looks like the validation split but is a broken link"
     + _OR_NONE.format(s="validation")),
    (lambda d: (d / "test.csv.gz").write_bytes(b"\x1f\x8b"),
     "{d}/test.csv.gz looks like the test split but has the unsupported type '.gz'"
     + _OR_NONE.format(s="test")),
], ids=["txt", "folder", "broken-link", "compressed"])
def test_split_file_that_cannot_be_used_is_an_error(tmp_path: Path, make, expected: str) -> None:
    # Before, each of these was skipped and 10 % of train silently became the split.
    d = _folder(tmp_path)
    make(d)
    assert reason(d) == "data.dataset: " + expected.replace("{d}", str(d))


def test_train_lookalike_gets_its_own_message(tmp_path: Path) -> None:
    (tmp_path / "train.xlsx").write_text("x")
    assert reason(tmp_path) == (f"data.dataset: {tmp_path}/train.xlsx looks like the train split "
                                "but has the unsupported type '.xlsx'; allowed: a "
                                "train{.csv,.tsv,.json,.jsonl,.parquet} file")


def test_unrelated_files_are_still_ignored(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "notes.txt").write_text("x")
    (d / "test_ideas.md").write_text("x")
    (d / ".test.csv").write_text("hidden")
    assert parse(d).sizes() == {"train": 32, "validation": 4, "test": 4}


@pytest.mark.parametrize("name, content, expected", [
    ("test.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "not UTF-8 text; save it as UTF-8"),
    ("test.csv", b'text,label\n"never closed,a\n',
     "cannot read it as .csv: Error tokenizing data. C error: EOF inside string starting at "
     "row 1"),
    ("validation.json", b'[{"text": "x", "label": "a"},',
     "line 1 is not valid JSON (Expecting value); allowed: a JSON list of records, or one JSON "
     "object per line"),
    ("test.parquet", b"PAR1 not really",
     "cannot read it as .parquet: Could not open Parquet input source"),
])
def test_unreadable_split_file_is_named(tmp_path: Path, name: str, content: bytes,
                                        expected: str) -> None:
    d = _folder(tmp_path)
    (d / name).write_bytes(content)
    msg = reason(d)
    assert msg.startswith(f"{d / name}: {expected}"), msg


def test_permission_denied_split_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _folder(tmp_path)
    test = write_rows(d / "test.csv", make_rows(10, ["a", "b"]))
    real = pd.read_csv

    def read_csv(path, *args, **kwargs):  # root reads through chmod, so the OS is stood in for
        if Path(path) == test:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_csv", read_csv)
    assert reason(d) == f"{test}: permission denied; make the file readable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_split_file_for_real(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    test = write_rows(d / "test.csv", make_rows(10, ["a", "b"]))
    test.chmod(0)
    assert reason(d) == f"{test}: permission denied; make the file readable"


def test_split_seed_out_of_range_for_direct_callers(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.csv", make_rows(20, ["a", "b"]))
    assert reason(path, split_seed=-1) == ("data.split_seed: -1 is out of range; allowed: an "
                                           "integer >= 0 and < 2**32")


# ----------------------------------------------------------------------------- LM documents
def test_lm_document_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    from distill.data.text import load_lm_text

    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "notes.md").mkdir()  # a folder named like a document is none
    assert len(load_lm_text(str(tmp_path)).train) == 8
    (tmp_path / "doc3.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DistillError) as info:
        load_lm_text(str(tmp_path))
    assert str(info.value) == (f"{tmp_path / 'doc3.txt'}: not UTF-8 text (invalid continuation "
                               "byte at byte 3); save it as UTF-8")
    with pytest.raises(DistillError, match=r"^split_seed: -1 is out of range; allowed: an "
                                           r"integer >= 0 and < 2\*\*32$"):
        load_lm_text(str(tmp_path), split_seed=-1)
