"""Data read through `datasets`: folders written by `save_to_disk` and hub ids (offline here:
the hub path is checked with `datasets.load_dataset` replaced, and the offline error for real)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from distill.config.recipe import DataConfig
from distill.data.dialogues import Dialogues
from distill.data.hub import is_hub_id, load_splits
from distill.data.tables import load_task_data
from distill.errors import DistillError
from distill.tasks import get_task


def _reviews(n: int, offset: int = 0) -> datasets.Dataset:
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    return datasets.Dataset.from_dict(
        {"text": [f"review {offset + i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
        features=features)


def test_hub_ids_and_paths_are_told_apart(tmp_path: Path) -> None:
    assert is_hub_id("imdb") and is_hub_id("org/name") and is_hub_id("org/name.v2")
    for path in ("data/train.csv", "notes.txt", "/abs/folder", "./rel", "a/b/c",
                 "builtin:shakespeare", str(tmp_path)):
        assert not is_hub_id(path), path


def test_saved_dataset_dict_keeps_its_splits_and_class_names(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _reviews(40), "test": _reviews(6, 100)}).save_to_disk(
        tmp_path / "saved")
    data = load_task_data(DataConfig(dataset=str(tmp_path / "saved")))
    assert data.label_names == ["neg", "pos"]
    assert data.test.texts == [f"review {100 + i}" for i in range(6)]  # its own test split
    assert data.test.labels == [i % 2 for i in range(6)]
    # Validation is carved out of train (10 %), as for a folder without a validation file.
    assert (len(data.train), len(data.validation)) == (36, 4)
    assert set(data.train.texts) | set(data.validation.texts) == {
        f"review {i}" for i in range(40)}
    one = load_task_data(DataConfig(dataset=str(tmp_path / "saved"), split="train"))
    assert (len(one.train), len(one.validation), len(one.test)) == (32, 4, 4)


def test_unlabelled_hub_rows_and_missing_columns_are_clear_errors(tmp_path: Path) -> None:
    bad = _reviews(20).cast_column("label", datasets.Value("int64")).map(
        lambda r, i: {"label": -1 if i == 3 else r["label"]}, with_indices=True
    ).cast_column("label", datasets.ClassLabel(names=["neg", "pos"]))
    bad.save_to_disk(tmp_path / "bad")
    with pytest.raises(DistillError, match=r"1 row has no label \(-1\).*rows, counting from "
                                           r"1: 4\)"):
        load_task_data(DataConfig(dataset=str(tmp_path / "bad")))
    _reviews(20).save_to_disk(tmp_path / "ok")
    with pytest.raises(DistillError, match="data.text_column: column 'body' not found.*"
                                           "columns: text, label"):
        load_task_data(DataConfig(dataset=str(tmp_path / "ok"), text_column="body"))
    with pytest.raises(DistillError, match="data.split: 'dev' is not a split"):
        load_task_data(DataConfig(dataset=str(tmp_path / "ok"), split="dev"))


def test_offline_hub_id_is_one_line_naming_it(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DistillError) as info:
        load_task_data(DataConfig(dataset="someone/reviews"))
    msg = str(info.value)
    assert "'someone/reviews'" in msg and "cannot be reached" in msg and "save_to_disk" in msg
    with pytest.raises(DistillError, match="did you mean `builtin:rotten_tomatoes`"):
        load_task_data(DataConfig(dataset="rotten_tomatoes"))


def test_hub_id_goes_to_load_dataset_with_config_and_split(monkeypatch) -> None:
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        whole = datasets.DatasetDict({"train": _reviews(30), "validation": _reviews(5, 50),
                                      "dev": _reviews(5, 70)})
        return whole[split] if split else whole

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_task_data(DataConfig(dataset="org/reviews", config="en"))
    assert calls == [("org/reviews", "en", None)]
    assert data.validation.texts == [f"review {50 + i}" for i in range(5)]
    assert (len(data.train), len(data.test)) == (27, 3)
    load_task_data(DataConfig(dataset="org/reviews", split="train"))
    assert calls[-1] == ("org/reviews", None, "train")


def test_language_model_text_and_chat_from_saved_datasets(tmp_path: Path) -> None:
    lines = ["", "= Title =", "first paragraph .", "", "second paragraph ."] * 8
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(tmp_path / "wiki")
    task = get_task("causal-lm")
    text = task.load_data(DataConfig(dataset=str(tmp_path / "wiki")))
    # Blank rows are no documents; the 24 others split 80/10/10 by the documented rule.
    assert text.sizes() == {"train": 20, "validation": 2, "test": 2}
    assert all(doc.strip() for doc in text.train + text.test)

    chats = [{"messages": [{"role": "user", "content": f"hi {i}"},
                           {"role": "assistant", "content": f"hello {i}"}]} for i in range(20)]
    instructions = [{"instruction": f"say {i}", "input": None, "output": f"{i}"}
                    for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats),
                          "test": datasets.Dataset.from_list(chats[:3])}).save_to_disk(
        tmp_path / "chat")
    datasets.Dataset.from_list(instructions).save_to_disk(tmp_path / "alpaca")
    chat = task.load_data(DataConfig(dataset=str(tmp_path / "chat")))
    assert isinstance(chat, Dialogues) and len(chat.test) == 3
    assert (len(chat.train), len(chat.validation)) == (18, 2)
    assert chat.test[0] == chats[0]["messages"]
    alpaca = task.load_data(DataConfig(dataset=str(tmp_path / "alpaca")))
    assert alpaca.sizes() == {"train": 8, "validation": 1, "test": 1}
    assert alpaca.train[0][0] == {"role": "user", "content": "say 0"}


def test_load_splits_maps_split_names(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _reviews(10), "valid": _reviews(2),
                          "extra": _reviews(2)}).save_to_disk(tmp_path / "d")
    assert sorted(load_splits(str(tmp_path / "d"))) == ["train", "validation"]
    datasets.DatasetDict({"test": _reviews(10)}).save_to_disk(tmp_path / "t")
    with pytest.raises(DistillError, match="has no train split"):
        load_splits(str(tmp_path / "t"))


def test_config_and_split_are_refused_where_they_would_be_ignored(tmp_path: Path) -> None:
    """A built-in, a file or a mixture is read whole: `data.split` / `data.config` there is a
    clear error naming the key, for classifiers and language models alike."""
    (tmp_path / "t.csv").write_text("text,label\n" + "a,0\nb,1\n" * 10, encoding="utf-8")
    for dataset in ("builtin:rotten_tomatoes", str(tmp_path / "t.csv")):
        with pytest.raises(DistillError, match=r"data.split: 'train' picks a split of a hub "
                                               r"dataset.*drop data.split"):
            load_task_data(DataConfig(dataset=dataset, split="train"))
    lm = get_task("causal-lm")
    with pytest.raises(DistillError, match=r"data.config: 'en' picks a config.*mixtures"):
        lm.load_data(DataConfig(dataset=["builtin:shakespeare", "builtin:bbc_news"],
                                config="en"))
    with pytest.raises(DistillError, match="data.split: 'test' picks a split"):
        lm.load_data(DataConfig(dataset="builtin:shakespeare", split="test"))
