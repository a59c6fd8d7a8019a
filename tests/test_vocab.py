"""Vocabulary trimming, judged by plain transformers: the trimmed model and tokenizer saved,
loaded back with AutoModel*/AutoTokenizer, tokenize the task's text into the same tokens
(renumbered) and give the same logits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BertConfig, BertForSequenceClassification,
                          PreTrainedTokenizerFast)

from conftest import tiny_recipe, write_few_words
from distill import DistillError, recipe_from_dict, run_recipe
from distill.serve import vocab

TEXTS = ["the film was good and funny", "a dull , slow film", "great acting , bad plot",
         "funny and warm", "slow and dull"]


def _round_trip(model, tokenizer, texts: list[str], tmp_path: Path):
    """Trim to the tokens of `texts`, save, reload with plain transformers; (old ids, new
    ids, lookup, reloaded model, reloaded tokenizer)."""
    old = [tokenizer(t)["input_ids"] for t in texts]
    keep = vocab.kept_ids(tokenizer, [[{"input_ids": ids} for ids in old]])
    small, small_tok, lookup = vocab.trim(model, tokenizer, keep)
    small.save_pretrained(tmp_path / "m")
    small_tok.save_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    new = [tok(t)["input_ids"] for t in texts]
    return old, new, lookup, tok


def test_a_wordpiece_classifier_predicts_identically(tiny_teacher: Path, tiny_csv: Path,
                                                     tmp_path: Path) -> None:
    with open(tiny_csv) as f:
        texts = [row["text"] for row in csv.DictReader(f)][:3]  # a part of the vocabulary
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    original = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    old, new, lookup, tok = _round_trip(model, tokenizer, texts, tmp_path)
    assert [lookup[torch.tensor(o)].tolist() for o in old] == new  # the same tokens
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.vocab_size == len(tok) < len(tokenizer)
    assert loaded.get_input_embeddings().weight.shape[0] == len(tok)
    batch = tokenizer(texts[:8], padding=True, return_tensors="pt")
    small = tok(texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = original(**batch).logits
        got = loaded(**small).logits
    assert torch.equal(got, want)
    assert tok.convert_ids_to_tokens(small["input_ids"][0].tolist())[0] == "[CLS]"
    unseen = tok("zebra")["input_ids"]  # outside the task's vocabulary
    assert tok.unk_token_id in unseen


def _unigram() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(TEXTS * 20 + ["zebras and giraffes roam"] * 20,
                                trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                        special_tokens=["<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   pad_token="<pad>")


def test_a_unigram_tokenizer_keeps_its_segmentation(tmp_path: Path) -> None:
    tokenizer = _unigram()
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, pad_token_id=tokenizer.pad_token_id))
    old, new, lookup, tok = _round_trip(model, tokenizer, TEXTS, tmp_path)
    assert [lookup[torch.tensor(o)].tolist() for o in old] == new
    assert len(tok) < len(tokenizer)


def test_a_language_model_keeps_the_rows_of_its_head(tmp_path: Path) -> None:
    from test_lm_recipes import write_tiny_lm

    path = write_tiny_lm(tmp_path / "lm", "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(path).eval()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = [" ".join(tokenizer.convert_ids_to_tokens(list(range(2, 9))))]
    old, new, lookup, _ = _round_trip(model, tokenizer, texts, tmp_path)
    assert [lookup[torch.tensor(o)].tolist() for o in old] == new
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        want = original(input_ids=torch.tensor(old)).logits
        got = loaded(input_ids=torch.tensor(new)).logits
    kept = torch.tensor(vocab.kept_ids(tokenizer, [[{"input_ids": old[0]}]]))
    assert len(kept) < len(tokenizer) and got.shape[-1] == len(kept)
    assert torch.allclose(got, want[..., kept], atol=1e-6)  # the kept tokens' scores


def test_bpe_is_refused() -> None:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(vocab_size=50,
                                                                special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32))
    with pytest.raises(DistillError, match="supports WordPiece, Unigram and WordLevel "
                                           "tokenizers; this one is BPE"):
        vocab.trim(model, tokenizer, [0, 1, 2])


def test_the_export_stage_serves_a_trimmed_student(tiny_bert: Path, tiny_csv: Path,
                                                   tmp_path: Path) -> None:
    data = write_few_words(tiny_csv, tmp_path / "few-words.csv", reviews=3, repeats=30)
    recipe = tiny_recipe(tiny_bert, data)
    recipe["stages"] = [recipe["stages"][0] | {"epochs": 1},
                        {"kind": "export", "formats": ["bf16", "onnx"], "latency": False,
                         "trim_vocabulary": True}]
    report = run_recipe(recipe_from_dict(recipe), output=tmp_path / "run")
    rows = report["stages"][1]["exports"]
    assert rows["onnx"]["agreement"] == 1.0 and rows["onnx"]["max_logit_diff"] < 1e-4
    folder = tmp_path / "run/stages/01-export/bf16"
    tok = AutoTokenizer.from_pretrained(folder)
    record = json.loads((tmp_path / "run/stages/01-export/metrics.json").read_text())
    record = record["vocabulary"]
    assert record["kept_tokens"] == len(tok) < record["of"]
    assert record["params_after"] < record["params_before"]
