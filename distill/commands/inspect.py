"""`distill inspect`: the shape of a model at a glance."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModel

from distill.models.loading import (count_params, dir_size_mb, load_checked, load_config,
                            resolve_model_path)


def describe_model(name: str, trust_remote_code: bool = False) -> dict[str, object]:
    """Family, depth, widths, vocabulary, parameter counts and size on disk of a model."""
    path = resolve_model_path(name)
    config = load_config(name, trust_remote_code)  # clear errors, remote code refused
    # Safetensors only, checked before transformers opens the folder; weights that do not
    # fit the config are an error, not a model with random parts described as if loaded.
    model, _ = load_checked(AutoModel, name, trust_remote_code=trust_remote_code,
                            key=None)
    params, non_emb = count_params(model)
    def get(*keys: str) -> object:
        return next((getattr(config, k) for k in keys if hasattr(config, k)), None)
    info: dict[str, object] = {
        "path": path,
        "family": config.model_type,
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "attention_heads": get("num_attention_heads", "n_head", "num_heads"),
        "key_value_heads": get("num_key_value_heads"),
        "intermediate_size": get("intermediate_size", "n_inner", "d_ff"),
        "vocab_size": get("vocab_size"),
        "max_positions": get("max_position_embeddings", "n_positions"),
        "params": params,
        "params_non_embedding": non_emb,
    }
    if Path(path).is_dir():
        info["size_mb"] = round(dir_size_mb(Path(path)), 1)
    labels = getattr(config, "id2label", None)
    if labels and config.architectures and any("Classification" in a
                                               for a in config.architectures):
        info["labels"] = ", ".join(str(v) for v in labels.values())
    return {k: v for k, v in info.items() if v is not None}
