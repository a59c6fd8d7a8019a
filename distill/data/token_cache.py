"""Tokenized text cached on disk with `datasets.Dataset.map`, reused across stages and runs.

    table = tokenized(texts, tokenizer, "classification", {"max_length": 128}, encode)

An entry is `<cache root>/tokenized/<key>.arrow` (`distill.files.cache_root`: `$DISTILL_CACHE`,
else `~/.cache/distill`), where key is the SHA-256 of the tokenizer (datasets' own fingerprint
of the object: vocabulary, merges, normaliser, special tokens, settings), what the tokenization
is and its settings, and the texts themselves, so any change to one of them is a new entry and
a stale one is never read. `datasets` writes the file beside its name and renames it into place,
so a killed run leaves no partial entry: a file that exists is complete. The cache can be
deleted at any time; it is rebuilt on the next run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from distill.files import cache_root

_VERSION = 1  # bump when what an entry holds changes


def cache_key(texts: list[str], tokenizer: Any, kind: str, settings: dict[str, Any]) -> str:
    """SHA-256 hex of the tokenizer, `kind`, `settings` and every text (length-prefixed)."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256(json.dumps(
        {"version": _VERSION, "kind": kind, "settings": settings,
         "tokenizer": Hasher.hash(tokenizer)}, sort_keys=True).encode())
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def tokenized(texts: list[str], tokenizer: Any, kind: str, settings: dict[str, Any],
              encode: Callable[[list[str]], dict[str, list]]) -> Any:
    """`encode` applied to `texts` in batches, as a `datasets.Dataset` read from the cache when
    an entry for these texts, tokenizer, kind and settings exists, else computed and cached.

    Args:
        texts: the texts, one row each.
        tokenizer: the tokenizer `encode` uses (part of the key).
        kind: what `encode` does, e.g. "classification" (part of the key).
        settings: everything else `encode` depends on, e.g. {"max_length": 128}.
        encode: a batch of texts -> columns, e.g. {"input_ids": [[...], ...]}.

    Returns:
        A `datasets.Dataset` with `encode`'s columns, row i from texts[i].
    """
    import datasets

    path = cache_root() / "tokenized" / f"{cache_key(texts, tokenizer, kind, settings)}.arrow"
    if path.is_file():
        return datasets.Dataset.from_file(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the run's own progress display is enough
    try:
        return datasets.Dataset.from_dict({"text": texts}).map(
            lambda batch: encode(batch["text"]), batched=True, batch_size=1000,
            remove_columns=["text"], cache_file_name=str(path), new_fingerprint=path.stem[:32])
    finally:
        if quiet:
            datasets.enable_progress_bars()


def flat_ids(table: Any, column: str = "input_ids") -> tuple[np.ndarray, np.ndarray]:
    """A list column of `tokenized`'s table as (values, offsets): row i is
    values[offsets[i]:offsets[i + 1]]; no Python list per row."""
    array = table.data.column(column).combine_chunks()
    offsets = array.offsets.to_numpy()
    return array.flatten().to_numpy(), offsets - offsets[0]
