"""Data read through Hugging Face `datasets`: hub ids and folders written by `save_to_disk`.

    splits = load_splits("imdb")                      # {"train": Dataset, "test": Dataset}
    splits = load_splits("org/name", config="en", split="train")   # {"train": Dataset}
    splits = load_splits("/data/saved")               # a `Dataset.save_to_disk` folder

A name is a hub id when it is not a built-in, not an existing path and reads like one: `name`
or `org/name`, no file suffix of ours (so a mistyped `data/train.csv` is reported as a missing
file, not looked up on the hub). The splits come back under our names (`validation` for
`valid`/`val`/`dev`); what a caller does with the missing ones (carve them out of train) is its
own rule, the same as for its local files. With `split` set, that one split is the whole
source and the caller carves all three out of it.

Offline (this project's machines, `HF_HUB_OFFLINE=1`) a hub id fails with one line naming it
and how to bring the data over; nothing is downloaded at run time here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from distill.errors import DistillError

# Our split names and the names datasets use for them, in the order they are looked for.
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test",)}
# Suffixes that make a name a path, never a hub id.
_PATH_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".md", ".arrow")
# Built-in names (distill.data.tables, text, dialogues) a bare hub id may have meant.
_BUILTIN_NAMES = ("rotten_tomatoes", "bbc_news", "shakespeare", "chatterbot")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset(Dict).save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def is_hub_id(name: str) -> bool:
    """Whether `name` is read as a hub dataset id (see the module docstring)."""
    return (not name.startswith("builtin:") and not Path(name).expanduser().exists()
            and bool(_HUB_ID.match(name))
            and not name.lower().endswith(_PATH_SUFFIXES))


def is_datasets_source(name: str) -> bool:
    """Whether `name` is read by `load_splits` (a hub id or a saved folder)."""
    return is_hub_id(name) or is_saved_dataset(Path(name).expanduser())


def check_source_options(dataset: str | list[str], config: str | None,
                         split: str | None) -> None:
    """`data.config` and `data.split` choose a configuration and a split of a `datasets`
    source; any other source is read whole, so there they are refused, not ignored."""
    for key, value in (("config", config), ("split", split)):
        if value is not None and (isinstance(dataset, list) or not is_datasets_source(dataset)):
            raise DistillError(
                f"data.{key}: {value!r} picks a {key} of a hub dataset or of a folder written "
                f"by `save_to_disk`; {dataset} is not one (built-ins, files, folders of files "
                f"and mixtures are read whole): drop data.{key}")


def load_splits(name: str, config: str | None = None, split: str | None = None,
                key: str = "data.dataset") -> dict[str, Any]:
    """The splits of a hub dataset or a `save_to_disk` folder, under our split names.

    Args:
        name: hub id or folder.
        config: the dataset's configuration (`data.config`), e.g. "wikitext-2-raw-v1".
        split: one split to read as the whole source (`data.split`); None: all of them.
        key: the recipe key named in errors.

    Returns:
        {"train": Dataset, "validation"?: Dataset, "test"?: Dataset}; splits of other names
        are left out.

    Raises:
        DistillError: the hub cannot be reached or has no such dataset, an unknown
            configuration or split, or no train split.
    """
    import datasets

    path = Path(name).expanduser()
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if split is not None:
                if not isinstance(loaded, datasets.DatasetDict) or split not in loaded:
                    have = list(loaded) if isinstance(loaded, datasets.DatasetDict) else []
                    raise DistillError(f"data.split: {split!r} is not a split of {name}; "
                                       f"splits: {', '.join(have) or '(one unnamed dataset)'}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        raise datasets_error(name, exc, key) from None
    if not isinstance(loaded, datasets.DatasetDict):
        return {"train": loaded}
    out = {}
    for ours, theirs in SPLIT_NAMES.items():
        found = next((loaded[n] for n in theirs if n in loaded), None)
        if found is not None:
            out[ours] = found
    if "train" not in out:
        raise DistillError(f"{key}: {name} has no train split (splits: {', '.join(loaded)}); "
                           "pick the one to split with data.split")
    return out


def datasets_error(name: str, exc: Exception, key: str = "data.dataset") -> DistillError:
    """What a user error of `datasets` (no network, no such dataset, configuration or split;
    `DatasetNotFoundError` is a FileNotFoundError) means, in one line naming `name`."""
    if isinstance(exc, DistillError):
        return exc
    if isinstance(exc, ConnectionError):
        hint = f"did you mean `builtin:{name}`? " if name in _BUILTIN_NAMES else ""
        return DistillError(
            f"{key}: {hint}{name!r} is not a built-in or a local path, so it was looked up on the "
            "Hugging Face Hub, which cannot be reached from here; where there is a network, "
            f"save it with `datasets.load_dataset({name!r}).save_to_disk(DIR)` and give DIR")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DistillError(f"{key}: cannot read {name!r} with `datasets`: {first}")


def column_values(dataset: Any, name: str, source: str, key: str) -> list[Any]:
    """Column `name` of a `datasets.Dataset` as a list; a missing one names what there is."""
    if name not in dataset.column_names:
        raise DistillError(f"{key}: column {name!r} not found in {source}; columns: "
                           f"{', '.join(dataset.column_names)}")
    return dataset.select_columns([name]).to_dict()[name]  # a list, indices applied


def class_names(dataset: Any, name: str) -> list[str] | None:
    """The names of a `ClassLabel` column (index = id), or None for any other column."""
    import datasets

    feature = dataset.features.get(name)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
