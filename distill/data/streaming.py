"""`data.streaming: true`: a text corpus read as a stream; only the blocks a run uses are held.

    text = StreamedText("HuggingFaceFW/fineweb-edu", cfg)      # nothing read yet
    blocks = text.blocks("train", tokenizer, 128, cap=2000)    # (2000, 128): the first blocks

For corpora larger than memory (or disk): the documents are read one at a time -- a hub id or
a local .csv/.tsv/.json/.jsonl/.parquet/.txt file through `datasets` with `streaming=True`
(rows of `data.text_column`; a .txt file one document per line), a folder of .txt/.md files
file by file -- tokenized as they come and packed into blocks of `max_length` tokens (each
document followed by EOS, as `distill.data.text.tokenize_blocks` does) until the split's cap
(`max_train_examples`, `max_eval_examples`) is filled; reading stops there.

Splits: a hub dataset's own validation/test splits are kept; otherwise a stream's length is not
known in advance, so the whole-corpus shuffle cannot apply and documents are split by position:
document i is test when i % 10 == 0, validation when i % 10 == 1, train otherwise -- fixed, so
runs compare, and no document is in two splits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.data.hub import SPLIT_NAMES, datasets_error, is_hub_id
from distill.data.text import cut_blocks, read_document, sequence_prefix
from distill.errors import DistillError

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".txt": "text"}
_SPLITS = ("train", "validation", "test")


class StreamedText:
    """A text corpus read lazily; `split(name)` holds the documents read so far."""

    def __init__(self, source: str, text_column: str = "text", config: str | None = None,
                 split: str | None = None) -> None:
        if not isinstance(source, str):
            raise DistillError("data.streaming: streams one text source; a list (mixture) is "
                               "read whole, without streaming")
        self.source = source
        self.text_column = text_column
        self.config = config
        self.hub_split = split
        self._read: dict[str, list[str]] = {s: [] for s in _SPLITS}
        self._streams: Any = None

    def sizes(self) -> dict[str, int | None]:
        """Documents per split: not known for a stream (None each); see `documents_read`."""
        return {s: None for s in _SPLITS}

    def documents_read(self) -> dict[str, int]:
        """Documents read so far per split."""
        return {s: len(docs) for s, docs in self._read.items()}

    def split(self, name: str) -> list[str]:
        """The documents of split `name` read so far (a few are read if none were yet)."""
        if name not in _SPLITS:
            raise DistillError(f"split {name!r} is unknown; allowed: train, validation, test")
        if not self._read[name]:
            self._read[name] = [doc for _, doc in zip(range(3), self.documents(name))]
        return self._read[name]

    def documents(self, name: str) -> Iterator[str]:
        """The non-blank documents of split `name`, in stream order."""
        own = self._own_splits()
        if own is not None:
            rows = own.get(name) or iter(())
        else:
            picks = {"test": (0,), "validation": (1,)}.get(name, tuple(range(2, 10)))
            rows = (doc for i, doc in enumerate(self._all_documents()) if i % 10 in picks)
        return (doc for doc in rows if doc and doc.strip())

    def blocks(self, name: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
               cap: int) -> torch.Tensor:
        """The first `cap` blocks of `block_size` tokens of split `name`; reads no further.

        Returns:
            token ids, shape (min(cap, available), block_size), int64.

        Raises:
            DistillError: not one full block in the split.
        """
        need = cap * block_size
        pieces: list[np.ndarray] = []
        have = 0
        read: list[str] = []
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        for doc in self.documents(name):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
            pieces.append(np.asarray(ids, dtype=np.int64))
            read.append(doc)
            have += len(ids)
            if have >= need:
                break
        self._read[name] = read
        stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        blocks = cut_blocks(stream, block_size, sequence_prefix(tokenizer))[:cap]
        if len(blocks) == 0:
            raise DistillError(f"{self.source}: the streamed {name} split has {len(stream)} "
                               f"tokens, fewer than one block of {block_size}")
        return blocks

    # ------------------------------------------------------------------ reading
    def _own_splits(self) -> dict[str, Iterator[str]] | None:
        """A hub dataset's own splits as row streams, or None (split by position)."""
        if not is_hub_id(self.source) or self.hub_split is not None:
            return None
        streams = self._load()
        if not isinstance(streams, dict):
            return None
        found = {ours: next((streams[n] for n in theirs if n in streams), None)
                 for ours, theirs in SPLIT_NAMES.items()}
        if found["train"] is None or (found["validation"] is None and found["test"] is None):
            return None
        return {s: self._texts(rows) for s, rows in found.items() if rows is not None}

    def _all_documents(self) -> Iterator[str]:
        path = Path(self.source).expanduser()
        if path.is_dir():
            return (read_document(p) for p in sorted(
                p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".md")
                and not p.is_dir()))
        streams = self._load()
        if isinstance(streams, dict):
            train = next((streams[n] for n in SPLIT_NAMES["train"] if n in streams), None)
            if train is None:
                raise DistillError(f"data.dataset: {self.source} has no train split; pick one "
                                   "with data.split")
            streams = train
        return self._texts(streams)

    def _texts(self, rows: Any) -> Iterator[str]:
        for i, row in enumerate(rows):
            if self.text_column not in row:
                raise DistillError(f"data.text_column: column {self.text_column!r} not found "
                                   f"in {self.source}; columns: {', '.join(row)}")
            text = row[self.text_column]
            if text is not None and not isinstance(text, str):
                raise DistillError(f"data.text_column: {self.source} row {i + 1} holds "
                                   f"{type(text).__name__}, not text")
            yield text or ""

    def _load(self) -> Any:
        """The `datasets` stream(s) of the source: an IterableDataset or a dict of them
        (opened once; each iteration reads from the start)."""
        import datasets

        if self._streams is not None:
            return self._streams
        path = Path(self.source).expanduser()
        try:
            if path.is_file():
                builder = _BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise DistillError(f"data.dataset: {path}: cannot stream a "
                                       f"{path.suffix or 'suffix-less'} file; allowed: "
                                       f"{', '.join(_BUILDERS)} or a folder of .txt/.md")
                options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
                streams = datasets.load_dataset(builder, data_files=str(path), split="train",
                                                streaming=True, **options)
            elif not is_hub_id(self.source):
                raise DistillError(f"data.streaming: {self.source} is not a hub id, a local "
                                   "file or a folder; built-ins are read whole (set "
                                   "data.streaming: false)")
            else:
                streams = datasets.load_dataset(self.source, self.config, split=self.hub_split,
                                                streaming=True)
        except (ConnectionError, FileNotFoundError, ValueError) as exc:
            raise datasets_error(self.source, exc) from None
        self._streams = (dict(streams) if isinstance(streams, datasets.IterableDatasetDict)
                         else streams)
        return self._streams
