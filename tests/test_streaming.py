"""`data.streaming: true`: text read as a stream, split by position, packed like whole corpora,
reading no further than the blocks a run uses."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from distill.config.loading import recipe_from_dict
from distill.data import streaming
from distill.data.streaming import StreamedText
from distill.data.text import read_document, tokenize_blocks
from distill.errors import DistillError
from distill.run.pipeline import run_recipe
from test_lm_recipes import word_tokenizer, write_corpus, write_tiny_lm


def test_a_folder_streams_split_by_position_and_packs_like_a_whole_corpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_corpus(tmp_path / "docs", documents=40)
    files = sorted(folder.glob("*.txt"))
    reads = []
    monkeypatch.setattr(streaming, "read_document",
                        lambda p: reads.append(p) or read_document(p))
    tok = word_tokenizer()
    text = StreamedText(str(folder))
    train_docs = [read_document(p) for i, p in enumerate(files) if i % 10 >= 2]
    test_docs = [read_document(p) for i, p in enumerate(files) if i % 10 == 0]
    whole = tokenize_blocks(train_docs, tok, block_size=16)
    blocks = text.blocks("train", tok, 16, cap=5)
    assert torch.equal(blocks, whole[:5])
    # 5 blocks of 16 tokens fit in the first training document (~300 words): the stream
    # stopped there, after the two held-out documents before it.
    assert len(reads) == 3 and text.documents_read()["train"] == 1
    assert torch.equal(text.blocks("test", tok, 16, cap=1000),
                       tokenize_blocks(test_docs, tok, block_size=16))
    assert text.split("test") == test_docs


def test_a_jsonl_file_streams_through_datasets(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"body": f"the cat sat on a mat {i} ." * 3} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = StreamedText(str(path), text_column="body")
    blocks = text.blocks("validation", word_tokenizer(), 4, cap=2)
    assert blocks.shape == (2, 4) and text.split("validation")[0] == rows[1]["body"]
    with pytest.raises(DistillError, match="column 'text' not found in .*columns: body"):
        StreamedText(str(path)).blocks("train", word_tokenizer(), 4, cap=1)


def test_a_hub_stream_keeps_its_own_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(name, config=None, split=None, streaming=False):
        assert streaming and name == "org/corpus"
        parts = {"train": [f"train doc {i}" for i in range(50)],
                 "validation": ["val doc"] * 5}
        return datasets.IterableDatasetDict({
            s: datasets.Dataset.from_dict({"text": t}).to_iterable_dataset()
            for s, t in parts.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text = StreamedText("org/corpus")
    assert list(text.documents("validation")) == ["val doc"] * 5
    assert next(iter(text.documents("train"))) == "train doc 0"
    assert list(text.documents("test")) == []


def test_a_streamed_recipe_runs_and_bad_settings_are_refused(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "docs", documents=30)
    model = write_tiny_lm(tmp_path / "teacher", "llama")
    recipe = {"name": "s", "teacher": {"model": str(model)},
              "data": {"dataset": str(corpus), "max_length": 32, "streaming": True,
                       "max_train_examples": 24, "max_eval_examples": 8},
              "stages": [{"kind": "distill", "epochs": 1, "batch_size": 8,
                          "student": {"layers": [0, 3]},
                          "loss": {"alpha": 0.5, "temperature": 1.0, "top_k": 4}},
                         {"kind": "evaluate", "latency": False}]}
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    student = report["stages"][0]["model"]
    assert student["metric"]["name"] == "perplexity" and student["metric"]["value"] > 1
    assert report["data"]["streamed"] and report["data"]["sizes"]["train"] is None
    metrics = json.loads((tmp_path / "run" / "stages" / "00-distill" / "metrics.json")
                         .read_text())
    assert metrics["steps"] == 3  # the 24 blocks taken from the stream, 8 a batch
    for patch, needle in (({"max_eval_examples": None}, "needs data.max_train_examples"),
                          ({"dataset": "builtin:chatterbot"}, "is conversations")):
        bad = recipe | {"data": recipe["data"] | patch}
        with pytest.raises(DistillError, match=needle):
            run_recipe(recipe_from_dict(bad), output=tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_an_offline_hub_stream_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DistillError, match="'someone/corpus' is not a built-in or a local "
                                           "path.*cannot be reached"):
        StreamedText("someone/corpus").blocks("train", word_tokenizer(), 4, cap=1)
