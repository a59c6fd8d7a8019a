"""`distill inspect`: the shape of a model at a glance, as the cutters see it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModel

from distill.arch import ArchInfo, Attention, Stack, arch_info, dims, require_width
from distill.errors import DistillError
from distill.models.loading import (count_params, dir_size_mb, load_checked, load_config,
                                    resolve_model_path)


def describe_model(name: str, trust_remote_code: bool = False) -> dict[str, object]:
    """Family, the discovered layout (stacks, attention, MLP, norms, per-layer config), widths,
    which cuts apply, vocabulary, parameter counts and size on disk of a model."""
    path = resolve_model_path(name)
    config = load_config(name, trust_remote_code)  # clear errors, remote code refused
    # Safetensors only, checked before transformers opens the folder; weights that do not
    # fit the config are an error, not a model with random parts described as if loaded.
    model, _ = load_checked(AutoModel, name, trust_remote_code=trust_remote_code,
                            key=None)
    params, non_emb = count_params(model)
    info: dict[str, object] = {"path": path, "family": config.model_type}
    try:
        info |= _layout(model, arch_info(model))
    except DistillError as exc:  # not understood: say what was not found
        info["cuts"] = f"none: {exc}"
    info |= {"vocab_size": getattr(config, "vocab_size", None), "params": params,
             "params_non_embedding": non_emb}
    if Path(path).is_dir():
        info["size_mb"] = round(dir_size_mb(Path(path)), 1)
    labels = getattr(config, "id2label", None)
    if labels and config.architectures and any("Classification" in a
                                               for a in config.architectures):
        info["labels"] = ", ".join(str(v) for v in labels.values())
    return {k: v for k, v in info.items() if v is not None}


def _layout(model: object, info: ArchInfo) -> dict[str, object]:
    """What `distill.arch` discovered, one line per part (the first stack's blocks)."""
    stack = info.stacks[0]
    out: dict[str, object] = {
        "layers": ", ".join(f"{s.name} {len(model.base_model.get_submodule(s.path))}"
                            for s in info.stacks) if len(info.stacks) > 1
        else len(model.base_model.get_submodule(stack.path)),
        "blocks": ", ".join(f"{s.path}" for s in info.stacks),
        "attention": _attention(stack.attention) if stack.attention else None,
        "cross_attention": _attention(stack.cross_attention) if stack.cross_attention
        else None,
        "mlp": _mlp(stack),
        "norms": ", ".join(stack.norms) or None,
        "per_layer_config": ", ".join(stack.per_layer_keys) or None,
    }
    try:
        require_width(model, info)
        d = dims(model, info)
        out |= {"hidden_size": d.hidden_size, "attention_heads": d.num_heads,
                "key_value_heads": d.num_kv_heads, "head_dim": d.head_dim,
                "intermediate_size": d.intermediate_size, "cuts": "depth and width"}
    except DistillError as exc:
        out["cuts"] = f"depth only ({exc})"
    if stack.pinned_first:
        out["cuts"] = f"{out['cuts']}; block 0 stays first"
    return out


def _attention(a: Attention) -> str:
    if a.fused:
        layout = "per head" if a.fused_per_head else "stacked"
        text = f"{a.fused} ({a.fused_parts}, {layout})"
        if a.q:
            text = f"{a.q}, {text}"
    else:
        text = ", ".join(p for p in (a.q, a.k, a.v) if p)
    text += f" -> {a.o}"
    norms = [n for n in (a.q_norm, a.k_norm) if n]
    return text + (f"; q/k norms {', '.join(norms)}" if norms else "")


def _mlp(stack: Stack) -> str | None:
    mlp = stack.mlp
    if mlp is None:
        return None
    if mlp.experts:
        return f"mixture of experts {mlp.experts} (kept whole)"
    inputs = mlp.fused_gate_up and f"{mlp.fused_gate_up} (gate, up)" or ", ".join(
        p for p in (mlp.gate, mlp.up) if p)
    return f"{'gated ' if mlp.gate or mlp.fused_gate_up else ''}{inputs} -> {mlp.down}"
