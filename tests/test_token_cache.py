"""The on-disk tokenization cache: reused when nothing changed, a new entry when anything did,
and never a partial entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from distill.data import token_cache
from distill.data.tables import Split, tokenize_split
from distill.data.text import tokenize_blocks
from distill.files import CACHE_ENV


def _tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<unk> </s> a b c d e f".split() + ([extra] if extra else [])
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / "tokenized"


def _counting(tokenizer: PreTrainedTokenizerFast, calls: list[int]):
    def encode(texts: list[str]) -> dict[str, list]:
        calls.append(len(texts))
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}
    return encode


def test_an_entry_is_reused_and_keyed_by_everything_it_depends_on(cache: Path) -> None:
    tok, calls = _tokenizer(), []
    texts = ["a b c", "d e", "f"]
    first = token_cache.tokenized(texts, tok, "k", {"n": 1}, _counting(tok, calls))
    again = token_cache.tokenized(texts, tok, "k", {"n": 1}, _counting(tok, calls))
    assert calls == [3] and first.to_dict() == again.to_dict()
    assert first.to_dict()["input_ids"] == [[2, 3, 4], [5, 6], [7]]
    for args in ((texts[:2], tok, "k", {"n": 1}), (texts, _tokenizer("g"), "k", {"n": 1}),
                 (texts, tok, "other", {"n": 1}), (texts, tok, "k", {"n": 2}),
                 (["a b c", "d e", "f "], tok, "k", {"n": 1})):
        token_cache.tokenized(*args, _counting(tok, calls))
    assert len(calls) == 6 and len(list(cache.glob("*.arrow"))) == 6
    # Texts are length-prefixed in the key: a different cut of the same characters differs.
    assert token_cache.cache_key(["ab", "c"], tok, "k", {}) != token_cache.cache_key(
        ["a", "bc"], tok, "k", {})


def test_a_failed_tokenization_leaves_no_entry(cache: Path) -> None:
    tok, calls = _tokenizer(), []
    texts = [f"a b {i}" for i in range(2500)]

    def fails_late(batch: list[str]) -> dict[str, list]:
        calls.append(len(batch))
        if len(calls) == 2:  # the second batch of 1,000: part of the file is written
            raise KeyboardInterrupt
        return {"input_ids": tok(batch)["input_ids"]}

    with pytest.raises(KeyboardInterrupt):
        token_cache.tokenized(texts, tok, "k", {}, fails_late)
    assert not list(cache.glob("*.arrow"))
    done = token_cache.tokenized(texts, tok, "k", {}, _counting(tok, []))
    assert len(done) == 2500 and len(list(cache.glob("*.arrow"))) == 1


def test_cached_tokenization_equals_the_tokenizer(cache: Path) -> None:
    tok = _tokenizer()
    docs = ["a b c d", "", "e f a", "b"]
    blocks = tokenize_blocks(docs, tok, block_size=3)
    stream = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(blocks.flatten(), torch.tensor(stream[:len(stream) // 3 * 3]))
    assert torch.equal(tokenize_blocks(docs, tok, block_size=3), blocks)  # from the cache
    split = Split(["a b c d e", "f"], [0, 1])
    items = tokenize_split(split, tok, max_length=3)
    enc = tok(split.texts, truncation=True, max_length=3)
    assert items.input_ids == enc["input_ids"] and items.attention_mask == enc["attention_mask"]
    assert tokenize_split(split, tok, max_length=3).input_ids == enc["input_ids"]
