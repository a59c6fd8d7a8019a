"""What a model folder's weight files may be, and whether they fit the model.

`from_pretrained` reads whichever weight files a folder holds, and unpickles (`torch.load`) any
that is not safetensors, including shards an index names. Before transformers sees a folder,
`weight_files` finds exactly the files it would read and refuses pickles unless they are
allowed; after loading, `check_fit` refuses weights whose names or shapes do not fit the
model's config (only a task head may be new). Name resolution lives in `distill.models.loading`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from distill.errors import DistillError

# Weight files transformers would unpickle (torch.load); ours are always safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Pickled files a training run leaves beside its weights; they hold no model weights.
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")
# The weight files `from_pretrained` looks for in a folder, in its order (no variants).
_SAFE_ENTRIES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_ENTRIES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def pickle_refusal(where: str, files: list[str], key: str | None = "teacher.allow_pickle"
                   ) -> str:
    """The message for a model folder that has pickled weights only.

    Args:
        key: the recipe key that allows pickles; None where nothing does (one-off commands).
    """
    return (f"{where} has only pickled weights ({', '.join(files)}); they are not loaded "
            "because unpickling can run code. Convert them once, where you trust them: "
            "`AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)` "
            f"writes model.safetensors{_allow_hint(key)}")


def _allow_hint(key: str | None) -> str:
    """How pickles could be allowed instead: the recipe key, if the caller has one."""
    if key is None:
        return " (this command reads safetensors only)"
    return f"; or set `{key}: true` to load them with torch.load(weights_only=True)"


def weight_files(folder: Path, name: str, allow_pickle: bool, key: str | None) -> list[Path]:
    """The files `from_pretrained` reads from a local model folder, found as it finds them.

    transformers takes the first of `model.safetensors`, its shard index, and (when pickles
    may load) `pytorch_model.bin` and its index; an index's shards are read by file name, a
    name not ending in `.safetensors` with `torch.load`. So the index, not the folder, says
    what is unpickled: each shard is checked here.
    """
    entries = _SAFE_ENTRIES + (_PICKLE_ENTRIES if allow_pickle else ())
    entry = next((folder / f for f in entries if (folder / f).is_file()), None)
    if entry is None:
        _raise_no_weights(folder, name, allow_pickle, key)
    if not entry.name.endswith(".index.json"):
        return [entry]
    shards = index_shards(entry, name)
    pickled = [s for s in shards if not s.endswith(".safetensors")]
    if pickled and not allow_pickle:
        raise DistillError(
            f"{name}: {entry.name} names pickled shards ({', '.join(pickled[:3])}"
            f"{', ...' if len(pickled) > 3 else ''}); they are not loaded because unpickling "
            f"can run code. Convert them to safetensors{_allow_hint(key)}")
    return [folder / s for s in shards]


def index_shards(index: Path, name: str) -> list[str]:
    """The shard files a `*.index.json` names in its `weight_map`: plain files beside it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) for v in weight_map.values()):
        raise DistillError(f"{name}: {index.name} is not a shard index (expected a JSON object "
                           "whose `weight_map` maps each tensor to a shard file)")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # transformers joins the name to the folder: "../x" or "/x" would read another file.
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise DistillError(f"{name}: {index.name} names the shard {shard!r} outside the "
                               "model folder; shards must be files beside the index")
        if not (index.parent / shard).is_file():
            raise DistillError(f"{name}: {index.name} names the shard {shard}, which is not in "
                               "the folder; copy every shard of the model")
    return shards


def _raise_no_weights(folder: Path, name: str, allow_pickle: bool, key: str | None
                      ) -> NoReturn:
    """The error for a folder without the weight files transformers would look for."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickled = [f for f in files if (f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))
               and not f.startswith(_NOT_WEIGHTS)]
    if pickled and not allow_pickle:
        raise DistillError(pickle_refusal(name, pickled, key))
    other = [f for f in files if f.endswith((".h5", ".msgpack", ".ckpt.index", ".safetensors"))
             or f in pickled]
    found = f" (found {', '.join(other)}, which transformers does not read by that name)" \
        if other else ""
    raise DistillError(f"{name}: no model weights in the folder{found}; expected "
                       "model.safetensors (or model.safetensors.index.json and its shards)")


def checkpoint_shapes(files: list[Path], name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in weight files, without reading the weights: safetensors
    headers; pickled files (only ever given when allowed) onto the meta device.

    Raises:
        DistillError: a damaged safetensors file, or a pickle that holds more than tensors.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            if file.name.endswith(".safetensors"):
                with safe_open(str(file), framework="pt") as handle:
                    for k in handle.keys():
                        shapes[k] = tuple(handle.get_slice(k).get_shape())
            else:
                state = torch.load(file, map_location="meta", weights_only=True)
                shapes.update({k: tuple(v.shape) for k, v in state.items()
                               if isinstance(v, torch.Tensor)})
        except SafetensorError as exc:
            first = (str(exc).strip().splitlines() or ["unreadable"])[0]
            raise DistillError(f"{name}: a safetensors weights file could not be read "
                               f"({file.name}: {first}); it is damaged (a copy cut short?) or "
                               "not a safetensors file") from None
        except pickle.UnpicklingError as exc:
            raise refused_pickle(name, exc) from None
    return shapes


def refused_pickle(name: str, exc: pickle.UnpicklingError) -> DistillError:
    """torch.load(weights_only=True) met an object that is not a tensor or plain container."""
    first = (str(exc).strip().splitlines() or ["not tensors only"])[0]
    return DistillError(f"{name}: its pickled weights hold more than tensors, and unpickling "
                        f"them could run code; they are not loaded ({first[:160]}). Convert "
                        "them to safetensors where you trust them")


def check_fit(name: str, model: PreTrainedModel, info: dict[str, Any]) -> bool:
    """Raise a DistillError naming the first mismatches unless the loaded weights fit the
    model; return whether its task head was freshly initialised.

    Args:
        info: `from_pretrained(..., output_loading_info=True)`'s report: `missing_keys` and
            `mismatched_keys` (name, shape in the file, shape in the model) in the model's
            names, `unexpected_keys` in the file's.
    """
    prefix = _base_prefix(model)
    missing = sorted(k for k in info.get("missing_keys", ()) if not _in_head(k, prefix))
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ())
                        if not _in_head(k, prefix))
    base = _base_names(model)
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if _in_base(k, model.base_model_prefix, base))
    problems = ([f"missing {k}" for k in missing]
                + [f"shape of {k} is {list(a)} in the file but {list(b)} in the model"
                   for k, a, b in mismatched]
                + [f"unexpected {k}" for k in unexpected])
    if problems:
        more = f", and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DistillError(f"{name}: its weights do not fit its config: "
                           f"{', '.join(problems[:3])}{more}\nonly a task head (classifier) "
                           "may be missing or of another shape; were the weights saved from "
                           "another model, or edited?")
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    return any(_in_head(k, prefix) for k in fresh)


def head_is_new(shapes: dict[str, tuple[int, ...]], model: PreTrainedModel) -> bool:
    """Whether loading weights of these tensor shapes (`checkpoint_shapes`) into `model` would
    initialise its task head afresh: a head tensor is absent, or of another shape (a head for
    other labels). `model` may be on the meta device."""
    prefix = _base_prefix(model)
    for k, param in model.named_parameters():
        if not _in_head(k, prefix):
            continue
        # A base checkpoint names the base model's tensors without its prefix.
        names = (k, k.removeprefix(f"{prefix}.")) if prefix else (k,)
        if not any(shapes.get(n) == tuple(param.shape) for n in names):
            return True
    return False


def _base_prefix(model: PreTrainedModel) -> str:
    """The attribute holding the base model inside a model with a task head ("" if none)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module) else ""


def _in_head(key: str, prefix: str) -> bool:
    """Whether a tensor of the model (by its name in the model) belongs to the task head:
    outside the base model, or in its pooler, which only a classification head reads and
    base checkpoints may leave out."""
    return (bool(prefix) and not key.startswith(f"{prefix}.")) or "pooler" in key.split(".")


def _base_names(model: PreTrainedModel) -> set[str]:
    """Top-level names of the base model's submodules, parameters and buffers."""
    base = model.base_model
    return ({n for n, _ in base.named_children()}
            | {n for n, _ in base.named_parameters(recurse=False)}
            | {n for n, _ in base.named_buffers(recurse=False)})


def _in_base(file_key: str, prefix: str, base_names: set[str]) -> bool:
    """Whether an unexpected tensor of the file (by its name there) belongs to the base model;
    the tensors of another task's head (a language-model head, say) are left out as the
    model has no place for them."""
    parts = file_key.split(".")
    if prefix and parts[0] == prefix:
        parts = parts[1:]
    return bool(parts) and parts[0] in base_names and "pooler" not in parts
